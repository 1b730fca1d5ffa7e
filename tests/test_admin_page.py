"""The admin page in a real browser: Debian's chromium, headless, driven by
selenium through chromedriver, against meshbox on loopback.  Chromium is
kept off the network: every host name but 127.0.0.1 fails to resolve, a
dead proxy on loopback takes anything else, and its background services
(updates, sync, safe browsing, translation...) are off."""

import asyncio
import io
import os
import shutil
import threading
import time
import urllib.request

import pytest

import meshbox
import tsclient
from meshproc import MeshboxProcess

selenium = pytest.importorskip("selenium")
zxingcpp = pytest.importorskip("zxingcpp")
from PIL import Image  # noqa: E402
from selenium import webdriver  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="needs Debian's chromium and chromium-driver")

PHONE, DESKTOP = (390, 844), (1280, 900)
BAD_POLICY = '{\n  "acls": [\n    {"action": "accept", "src": ["group:nobody"], "dst": ["*:*"]},\n  ],\n}\n'
GOOD_POLICY = '// set from the admin page\n{\n  "acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}],\n}\n'


def browser(profile):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--no-default-browser-check", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--disable-default-apps", "--disable-extensions", "--disable-domain-reliability",
                 "--disable-client-side-phishing-detection", "--metrics-recording-only", "--safebrowsing-disable-auto-update",
                 "--disable-features=OptimizationHints,MediaRouter,Translate,AutofillServerCommunication,"
                 "CertificateTransparencyComponentUpdater,InterestFeedContentSuggestions,NetworkTimeServiceQuerying",
                 "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
                 "--proxy-server=http://127.0.0.1:9", f"--user-data-dir={profile}",
                 f"--window-size={DESKTOP[0]},{DESKTOP[1]}"):
        options.add_argument(flag)
    os.environ["SE_AVOID_STATS"] = "true"
    return webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))


def prepared_state(state_dir):
    """A state folder with a user, an API key and the box's own node (so plain WireGuard devices can be added)."""
    os.makedirs(state_dir, mode=0o700)
    store = meshbox.Store(os.path.join(state_dir, "meshbox.db"))
    try:
        admin = meshbox.Admin(store, meshbox.Config(state_dir=str(state_dir)))
        admin.users_create("alice@example.com")
        key = admin.apikeys_create()["key"]
        admin.oauthclients_create(scopes="dns:read")       # listed beside the auth keys
        coordinator = meshbox.Coordinator(store, meshbox.MapSettings("mesh.internal", {"Regions": {}}, {}))
        coordinator.ensure_gateway_node(meshbox.x25519_public(meshbox.new_private_key()), "box", [],
                                        ["192.0.2.1:41641"])
        return key
    finally:
        store.db.close()


class PendingLogin(threading.Thread):
    """A simulated node that logs in without a key and waits (up to 90 s) for an admin to approve it."""

    def __init__(self, port):
        super().__init__(daemon=True)
        self.port, self.result, self.asked, self.online = port, None, threading.Event(), threading.Event()
        self.stop = threading.Event()

    def run(self):
        async def main():
            client = tsclient.ControlClient("127.0.0.1", self.port, hostname="waiting-phone")
            await client.connect()
            try:
                first = await client.register("")
                self.asked.set()
                self.result = await client.register("", timeout=90, Followup=first["AuthURL"])
                client.open_map()                  # online from now on, until the test is done
                await client.next_map_message()
                self.online.set()
                while not self.stop.is_set():
                    await asyncio.sleep(0.1)
            finally:
                await client.close()
        asyncio.run(main())


def read_qr(driver, element_id, path):
    """The text of the QR code in an element, read from a screenshot of it."""
    element = driver.find_element(By.ID, element_id)
    driver.execute_script("arguments[0].scrollIntoView()", element)
    png = element.screenshot_as_png
    path.write_bytes(png)
    found = zxingcpp.read_barcodes(Image.open(io.BytesIO(png)).convert("L"))
    assert len(found) == 1, f"no QR code found in {path}"
    return found[0].text


def text_of(driver, selector, contains, timeout=15):
    WebDriverWait(driver, timeout).until(lambda d: contains in d.find_element(By.CSS_SELECTOR, selector).text)
    return driver.find_element(By.CSS_SELECTOR, selector).text


def test_admin_page_in_chromium(tmp_path):
    api_key = prepared_state(tmp_path / "state")
    shots = tmp_path / "screenshots"
    shots.mkdir()
    with MeshboxProcess(tmp_path / "state", log_path=str(tmp_path / "meshbox.log")) as server:
        base = f"http://127.0.0.1:{server.port}"
        with urllib.request.urlopen(base + "/admin") as answer:
            csp = answer.headers["Content-Security-Policy"]
            assert "script-src 'self'" in csp and "unsafe-inline" not in csp
            assert "<script>" not in answer.read().decode()          # the script is its own path only
        pending = PendingLogin(server.port)
        pending.start()
        assert pending.asked.wait(20)
        driver = browser(tmp_path / "profile")
        try:
            driver.get(base + "/admin")
            driver.find_element(By.ID, "apikey").send_keys(api_key)
            driver.find_element(By.CSS_SELECTOR, "#signin button").click()
            text_of(driver, "#logins", "waiting-phone")
            (cookie,) = driver.get_cookies()
            assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and api_key not in cookie["value"]
            assert api_key not in driver.current_url

            # approve the waiting login: the node joins as alice
            driver.find_element(By.CSS_SELECTOR, "#logins .login button").click()
            text_of(driver, "#nodes", "waiting-phone.mesh.internal")
            assert pending.online.wait(30) and pending.result["MachineAuthorized"], pending.result

            # a pre-auth key: its tailscale up command, copy button and QR code
            driver.find_element(By.ID, "key-reusable").click()
            driver.find_element(By.ID, "key-create").click()
            command = text_of(driver, "#key-command", "--auth-key mskey-")
            assert command == f"tailscale up --login-server {base} --auth-key " + command.rsplit(" ", 1)[1]
            WebDriverWait(driver, 10).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#key-qr svg"))
            assert read_qr(driver, "key-qr", shots / "key-qr.png") == command
            text_of(driver, "#keys", "reusable")
            text_of(driver, "#keys", "OAuth client · dns:read")

            # a plain WireGuard device, its configuration read back from the QR code on screen
            driver.find_element(By.ID, "wg-name").send_keys("tablet")
            driver.find_element(By.ID, "wg-add").click()
            WebDriverWait(driver, 10).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#wg-qr svg"))
            config = driver.find_element(By.CSS_SELECTOR, "#new-wg pre").text
            assert config.startswith("[Interface]") and "192.0.2.1:41641" in config
            assert read_qr(driver, "wg-qr", shots / "wg-qr.png").strip() == config.strip()
            text_of(driver, "#wg", "tablet")

            # the policy: a mistake shows its error, a good one saves
            area = driver.find_element(By.ID, "policy")
            WebDriverWait(driver, 10).until(lambda d: '"acls"' in area.get_attribute("value"))
            driver.execute_script("arguments[0].value = arguments[1]", area, BAD_POLICY)
            driver.find_element(By.ID, "policy-save").click()
            error = text_of(driver, "#policy-error", "policy refused")
            assert "group:nobody" in error
            assert driver.find_element(By.ID, "policy-error").get_attribute("class") == "error"
            driver.execute_script("arguments[0].value = arguments[1]", area, GOOD_POLICY)
            driver.find_element(By.ID, "policy-check").click()
            text_of(driver, "#policy-error", "valid")
            driver.find_element(By.ID, "policy-save").click()
            text_of(driver, "#policy-error", "Saved")
            request = urllib.request.Request(base + "/api/v2/tailnet/-/acl", headers={
                "Authorization": f"Bearer {api_key}", "Accept": "application/hujson"})
            with urllib.request.urlopen(request) as answer:
                assert answer.read().decode() == GOOD_POLICY

            # the tailnet's picture at a desktop's width and at a phone's
            sizes = {}
            for name, (width, height) in (("desktop", DESKTOP), ("phone", PHONE)):
                driver.set_window_size(width, height)
                time.sleep(0.5)
                graph = driver.find_element(By.ID, "graph-section")
                driver.execute_script("arguments[0].scrollIntoView()", graph)
                (shots / f"graph-{name}.png").write_bytes(graph.screenshot_as_png)
                sizes[name] = Image.open(shots / f"graph-{name}.png").size
                driver.find_element(By.ID, "refresh").click()
                WebDriverWait(driver, 10).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#graph line.edge.direct"))
                overflow = driver.execute_script("return document.documentElement.scrollWidth > window.innerWidth")
                assert not overflow, f"the page is wider than the {name}'s screen"
            assert sizes["phone"][0] < sizes["desktop"][0] and sizes["phone"][0] <= PHONE[0]
            assert "waiting-phone" in driver.find_element(By.ID, "graph").text

            # the cookie alone, without the page's CSRF token, is refused
            status = driver.execute_script(
                "return fetch('/api/v2/tailnet/-/devices', {credentials: 'same-origin'}).then(r => r.status)")
            assert status == 401

            # signing out ends the session: the API no longer takes its cookie
            driver.find_element(By.ID, "signout").click()
            WebDriverWait(driver, 10).until(lambda d: d.find_element(By.ID, "signin").is_displayed())
            status = driver.execute_script(
                "return fetch('/api/v2/tailnet/-/devices', {credentials: 'same-origin'}).then(r => r.status)")
            assert status == 401
        finally:
            driver.quit()
            pending.stop.set()
            pending.join(10)
        assert "registered node" in server.log_text()
