"""Sign-in through a real OpenID provider.

oidc-provider (a certified OpenID Connect implementation, pinned in
tests/oidc/package.json and installed with npm on first use) runs on
loopback HTTPS with a certificate the test makes; meshbox serve uses it as
its issuer.  The test plays the browser through the provider's own login
and consent pages and checks that the waiting node joins as the person the
provider vouched for, and that a wrong state, audience, nonce or person is
refused.
"""

import asyncio
import base64
import hashlib
import html
import http.cookiejar
import itertools
import json
import os
import re
import shutil
import ssl
import subprocess
import sys
import time
import types
import urllib.error
import urllib.parse
import urllib.request

import pytest

import meshbox
import meshproc
import tsclient
from meshproc import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROVIDER_DIR = os.path.join(ROOT, "tests", "oidc")
CLIENT_ID, CLIENT_SECRET = "meshbox", "client-secret-for-tests"
ACCOUNTS = {
    "alice": {"email": "alice@example.com", "email_verified": True, "name": "Alice Example",
              "groups": ["mesh-users", "staff"]},
    "mallory": {"email": "mallory@elsewhere.example", "email_verified": True, "name": "Mallory",
                "groups": ["mesh-users"]},
    "bob": {"email": "bob@example.com", "email_verified": True, "name": "Bob", "groups": ["contractors"]},
    "carol": {"email": "carol@example.com", "email_verified": True, "name": "Carol", "groups": ["mesh-users"]},
    # Emails the provider does not vouch for: no email_verified, or false with a name that is alice's.
    "erin": {"email": "erin@example.com", "name": "Erin", "groups": ["mesh-users"]},
    "frank": {"email": "frank@example.com", "email_verified": False, "preferred_username": "alice@example.com",
              "name": "Frank", "groups": ["mesh-users"]},
}


_hostnames = itertools.count(1)


def fresh_hostname(prefix):
    """A host name no earlier test used, so one test's node cannot pass for another's."""
    return f"{prefix}-{next(_hostnames)}"


def install_provider():
    """The pinned oidc-provider under tests/oidc/node_modules; skip when node or npm cannot provide it."""
    if not shutil.which("node") or not shutil.which("npm"):
        pytest.skip("node and npm are needed to run the OpenID provider (oidc-provider)")
    if os.path.isdir(os.path.join(PROVIDER_DIR, "node_modules", "oidc-provider")):
        return
    result = subprocess.run(["npm", "install", "--no-audit", "--no-fund"], cwd=PROVIDER_DIR, capture_output=True,
                            text=True, timeout=300)
    if result.returncode != 0:
        pytest.skip(f"npm install of oidc-provider failed: {result.stderr.strip()[-300:]}")


def wait_for_line(path, text, proc, seconds=30):
    deadline = time.monotonic() + seconds
    while text not in path.read_text():
        assert proc.poll() is None and time.monotonic() < deadline, path.read_text()
        time.sleep(0.1)


@pytest.fixture(scope="module")
def oidc(tmp_path_factory):
    """oidc-provider on HTTPS and meshbox serve signing in through it, both on loopback."""
    install_provider()
    tmp = tmp_path_factory.mktemp("oidc")
    cert, key = tmp / "provider-cert.pem", tmp / "provider-key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True, timeout=60)
    provider_port, port = free_port(), free_port()
    issuer, url = f"https://127.0.0.1:{provider_port}", f"http://127.0.0.1:{port}"
    provider_config = tmp / "provider.json"
    provider_config.write_text(json.dumps({
        "port": provider_port, "cert": str(cert), "key": str(key), "accounts": ACCOUNTS,
        "clients": [{"client_id": CLIENT_ID, "client_secret": CLIENT_SECRET, "redirect_uris": [url + "/oidc/callback"],
                     "grant_types": ["authorization_code"], "response_types": ["code"]}]}))
    config = tmp / "meshbox.json"
    config.write_text(json.dumps({
        "oidc_issuer": issuer, "oidc_client_id": CLIENT_ID, "oidc_client_secret": CLIENT_SECRET,
        "oidc_allowed_domains": ["example.com"], "oidc_allowed_groups": ["mesh-users"], "oidc_ca_file": str(cert),
        "oidc_admins": ["alice@example.com"]}))
    state, provider_log, serve_log = tmp / "state", tmp / "provider.log", tmp / "serve.log"
    procs = []
    try:
        with open(provider_log, "w") as out:
            procs.append(subprocess.Popen(["node", "provider.mjs", str(provider_config)], cwd=PROVIDER_DIR,
                                          stdout=out, stderr=out))
        wait_for_line(provider_log, "ready " + issuer, procs[0])
        with open(serve_log, "w") as out:
            procs.append(subprocess.Popen(
                [sys.executable, os.path.join(ROOT, "meshbox.py"), "--state", str(state), "--config", str(config),
                 "serve", "--listen", f"127.0.0.1:{port}", "--derp-listen", "off", "--stun-listen", "off"],
                stdout=out, stderr=out))
        wait_for_line(serve_log, "serving", procs[1])
        yield types.SimpleNamespace(port=port, url=url, issuer=issuer, cert=str(cert), state=state, log=serve_log)
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(10)


class CallbackCatcher(urllib.request.HTTPRedirectHandler):
    """Follows redirects, but can hold back the one to meshbox's callback."""
    hold = False
    held = None

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if self.hold and "/oidc/callback" in newurl:
            self.held = newurl
            return None
        return super().redirect_request(req, fp, code, msg, headers, newurl)


class Browser:
    """A person's browser: cookies, redirects, forms."""

    def __init__(self, cafile):
        self.redirects = CallbackCatcher()
        self.opener = urllib.request.build_opener(
            urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()),
            urllib.request.HTTPSHandler(context=ssl.create_default_context(cafile=cafile)), self.redirects)

    def open(self, url, form=None):
        """(status, final URL, page text)."""
        data = urllib.parse.urlencode(form).encode() if form is not None else None
        try:
            with self.opener.open(url, data, timeout=20) as response:
                return response.status, response.url, response.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.url, e.read().decode()

    def sign_in(self, auth_url, login, hold_callback=False):
        """Through the provider's login and consent pages; what meshbox's callback shows (or held)."""
        self.redirects.hold = hold_callback
        status, url, page = self.open(auth_url)
        assert status == 200 and 'name="login"' in page, (status, url, page[:300])
        status, url, page = self.open(form_action(page), {"prompt": "login", "login": login, "password": "any"})
        assert status == 200 and 'value="consent"' in page, (status, url, page[:300])
        return self.open(form_action(page), {"prompt": "consent"})


def form_action(page):
    return html.unescape(re.search(r'<form[^>]*action="([^"]+)"', page)[1])


def tamper_next_id_token(oidc, claims):
    """Make the provider's next token response carry an ID token with these claims."""
    request = urllib.request.Request(oidc.issuer + "/test/tamper", json.dumps(claims).encode(), method="POST")
    with urllib.request.urlopen(request, timeout=10, context=ssl.create_default_context(cafile=oidc.cert)) as r:
        assert r.status == 200


async def waiting_client(oidc, hostname):
    """A client that asked to log in: (client, AuthURL, its held-open follow-up)."""
    client = tsclient.ControlClient("127.0.0.1", oidc.port, hostname)
    await client.connect()
    first = await client.register("")
    assert not first["MachineAuthorized"] and first["AuthURL"].startswith(oidc.url + "/register/")
    follow = asyncio.ensure_future(client.register("", timeout=60, Followup=first["AuthURL"]))
    return client, first["AuthURL"], follow


async def in_browser(function, *args):
    return await asyncio.get_running_loop().run_in_executor(None, function, *args)


def node_owners(oidc):
    listing = meshproc.cli("nodes", "list", "-o", "json", state=oidc.state, check=True).stdout
    return {n["hostname"]: n["user"] for n in json.loads(listing)}


def test_sign_in_at_the_provider_admits_the_node(oidc):
    async def main():
        client, auth_url, follow = await waiting_client(oidc, "laptop")
        browser = Browser(oidc.cert)
        status, url, page = await in_browser(browser.sign_in, auth_url, "alice")
        assert status == 200 and url.startswith(oidc.url + "/oidc/callback?"), (status, url)
        assert "Signed in as alice@example.com" in page
        response = await asyncio.wait_for(follow, 10)
        assert response["MachineAuthorized"] and response["User"]["LoginName"] == "alice@example.com"
        client.open_map()
        message = await client.next_map_message()
        assert message["Node"]["Name"] == "laptop.mesh.internal."
        await client.close()
    asyncio.run(main())
    assert node_owners(oidc)["laptop"] == "alice@example.com"
    users = meshproc.cli("users", "list", "-o", "json", state=oidc.state, check=True).stdout
    assert "alice@example.com" in [u["name"] for u in json.loads(users)]
    assert "Alice Example" in oidc.log.read_text()


def test_an_admin_signs_in_to_the_admin_page_at_the_provider(oidc):
    browser = Browser(oidc.cert)
    status, _, page = browser.open(oidc.url + "/admin")
    assert status == 200 and 'href="/admin/oidc"' in page
    status, url, page = browser.sign_in(oidc.url + "/admin/oidc", "alice")
    assert status == 200 and url == oidc.url + "/admin" and "/admin/admin.js" in page, (status, url)
    status, _, answer = browser.open(oidc.url + "/admin/session")
    assert status == 200
    request = urllib.request.Request(oidc.url + "/api/v2/tailnet/-/users",
                                     headers={"X-CSRF-Token": json.loads(answer)["csrf"]})
    with browser.opener.open(request, timeout=10) as response:
        assert "alice@example.com" in response.read().decode()
    # carol may join the tailnet, but is not one of oidc_admins
    other = Browser(oidc.cert)
    status, _, page = other.sign_in(oidc.url + "/admin/oidc", "carol")
    assert status == 403 and "is not one of this" in page and "oidc_admins" in page
    assert other.open(oidc.url + "/admin/session")[0] == 401


def test_callback_with_a_wrong_state_is_refused(oidc):
    async def main():
        client, auth_url, follow = await waiting_client(oidc, "phone")
        browser = Browser(oidc.cert)
        status, _, _ = await in_browser(browser.sign_in, auth_url, "alice", True)
        callback = browser.redirects.held
        assert status in (302, 303) and callback and "state=" in callback
        forged = re.sub(r"state=[^&]+", "state=forged-state", callback)
        status, _, page = await in_browser(browser.open, forged)
        assert status == 403 and "unknown, was already used or has expired" in page
        await asyncio.sleep(0.3)
        assert not follow.done() and "phone" not in node_owners(oidc)
        # The real answer still works once, and only once.
        browser.redirects.hold = False
        status, _, page = await in_browser(browser.open, callback)
        assert status == 200 and "Signed in as alice@example.com" in page
        assert (await asyncio.wait_for(follow, 10))["MachineAuthorized"]
        status, _, page = await in_browser(browser.open, callback)
        assert status == 403 and "already used" in page
        await client.close()
    asyncio.run(main())


@pytest.mark.parametrize("claims, refusal", [
    ({"aud": "another-client"}, "meant for another client (another-client)"),
    ({"aud": [CLIENT_ID, "another-client"], "azp": "another-client"}, "handed to another client"),
    ({"nonce": "the-nonce-of-another-sign-in"}, "nonce does not match"),
    ({"iss": "https://127.0.0.1:1"}, "not by the configured issuer"),
    ({"exp": 1000000000}, "has expired"),
])
def test_id_token_not_for_this_sign_in_is_refused(oidc, claims, refusal):
    async def main():
        hostname = fresh_hostname("tampered")
        client, auth_url, follow = await waiting_client(oidc, hostname)
        await in_browser(tamper_next_id_token, oidc, claims)
        status, _, page = await in_browser(Browser(oidc.cert).sign_in, auth_url, "alice")
        assert status == 403 and refusal in html.unescape(page), page
        await asyncio.sleep(0.3)
        assert not follow.done() and hostname not in node_owners(oidc)
        follow.cancel()
        await client.close()
    asyncio.run(main())


@pytest.mark.parametrize("login, refusal", [
    ("mallory", "mallory@elsewhere.example may not sign in to this meshbox: neither the user nor the email domain"),
    ("bob", "bob@example.com may not sign in to this meshbox: not in any allowed group (mesh-users)"),
])
def test_people_the_settings_do_not_allow_are_refused(oidc, login, refusal):
    hostname = fresh_hostname("stranger")

    async def main():
        client, auth_url, follow = await waiting_client(oidc, hostname)
        status, _, page = await in_browser(Browser(oidc.cert).sign_in, auth_url, login)
        assert status == 403 and refusal in html.unescape(page), page
        assert not follow.done()
        follow.cancel()
        await client.close()
    asyncio.run(main())
    users = [u["name"] for u in json.loads(meshproc.cli("users", "list", "-o", "json", state=oidc.state,
                                                        check=True).stdout)]
    assert ACCOUNTS[login]["email"] not in users and hostname not in node_owners(oidc)


@pytest.mark.parametrize("login", ["erin", "frank"])
def test_an_email_the_provider_did_not_verify_names_no_one(oidc, login):
    """Such a person is their subject at the issuer, and the allowed email domain does not let them in."""
    hostname = fresh_hostname("unverified")

    async def main():
        client, auth_url, follow = await waiting_client(oidc, hostname)
        status, _, page = await in_browser(Browser(oidc.cert).sign_in, auth_url, login)
        subject = f"{login}@{oidc.issuer.removeprefix('https://')}"
        assert status == 403 and f"{subject} may not sign in to this meshbox: neither the user nor the email " \
            "domain is allowed" in html.unescape(page), page
        assert not follow.done()
        follow.cancel()
        await client.close()
    asyncio.run(main())
    assert hostname not in node_owners(oidc)


def test_unknown_login_request_is_not_sent_to_the_provider(oidc):
    status, _, page = Browser(oidc.cert).open(oidc.url + "/register/no-such-request")
    assert status == 404 and "unknown or has expired" in page


SIGN_IN_ON_OPENWRT = """
import asyncio, sys, types
path, issuer, cafile, url = sys.argv[1:]
meshbox = sys.modules["meshbox"] = types.ModuleType("meshbox")    # not imported: the hook knows no meshbox
meshbox.__file__ = path
exec(compile(open(path).read(), path, "exec"), meshbox.__dict__)
config = meshbox.Config(server_url=url, oidc_issuer=issuer, oidc_client_id="meshbox",
                        oidc_client_secret="client-secret-for-tests", oidc_ca_file=cafile)

async def main():
    login = meshbox.OidcLogin(config)
    there = await login.authorization_url("some-request")
    print("to", there.partition("?")[0])
    try:
        await login.finish({"state": meshbox.parse_query(there.partition("?")[2])["state"], "code": "made-up"})
    except meshbox.OidcError as e:
        print("refused:", e)
asyncio.run(main())
"""


def test_the_way_to_the_provider_needs_nothing_openwrt_lacks(oidc, tmp_path):
    """Discovery, the token endpoint over TLS and the answers, in a Python limited to python3-light's
    modules: no urllib, no email, and no idna codec (whose unicodedata OpenWrt splits out)."""
    from test_restricted_imports import OPTIONAL, Restricted
    script = tmp_path / "sign_in.py"
    script.write_text(SIGN_IN_ON_OPENWRT)
    result, imports = Restricted(tmp_path, "off").run(str(script), os.path.join(ROOT, "meshbox.py"), oidc.issuer,
                                                      oidc.cert, oidc.url)
    assert result.returncode == 0, result.stderr
    assert set(imports["refused"]) <= OPTIONAL, imports["refused"]
    assert result.stdout.splitlines() == [f"to {oidc.issuer}/auth", "refused: the identity provider did not accept "
                                          "the sign-in (HTTP 400: invalid_grant grant request is invalid)"]


def jwt(claims):
    part = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    return f"eyJhbGciOiJSUzI1NiJ9.{part}.c2lnbmF0dXJl"


def test_id_token_claim_checks():
    at = 1_700_000_000
    good = {"iss": "https://id.example.com", "aud": "meshbox", "exp": at + 300, "nonce": "n-1", "sub": "123"}
    claims = meshbox.id_token_claims(jwt(good))
    assert claims == good
    meshbox.check_id_token(claims, "https://id.example.com", "meshbox", "n-1", at)
    meshbox.check_id_token({**good, "aud": ["meshbox", "api"], "azp": "meshbox"}, "https://id.example.com",
                           "meshbox", "n-1", at)
    meshbox.check_id_token({**good, "exp": at - 60}, "https://id.example.com", "meshbox", "n-1", at)   # clock skew
    for changed, refusal in [({"iss": "https://id.example.com/"}, "issued by"), ({"aud": ["api"]}, "another client"),
                             ({"aud": ["meshbox", "api"]}, "handed to another client"),
                             ({"azp": "api"}, "handed to another client"), ({"exp": at - 600}, "expired"),
                             ({"exp": "never"}, "expired"), ({"nonce": "n-2"}, "nonce"), ({"nonce": None}, "nonce"),
                             ({"sub": ""}, "no subject")]:
        with pytest.raises(meshbox.OidcError, match=refusal):
            meshbox.check_id_token({**good, **changed}, "https://id.example.com", "meshbox", "n-1", at)
    for token in ("not-a-jwt", "a.b", "a.W10.c", "a.!!!.c", None):
        with pytest.raises(meshbox.OidcError):
            meshbox.id_token_claims(token)


def test_identity_and_who_may_sign_in():
    issuer = "https://id.example.com"
    identity = meshbox.oidc_identity({"sub": "42", "email": "Dana@Example.COM", "email_verified": True, "name": "Dana",
                                      "groups": "ops"}, issuer)
    assert identity == {"name": "Dana@Example.COM", "display_name": "Dana", "email": "Dana@Example.COM",
                        "groups": ["ops"]}
    unverified = meshbox.oidc_identity({"sub": "42", "email": "boss@example.com", "email_verified": False,
                                        "preferred_username": "boss@example.com"}, issuer)
    assert unverified["name"] == "42@id.example.com" and unverified["email"] == ""
    # Without email_verified an email is not believed either; preferred_username never names anyone.
    for claims in ({"sub": "42", "email": "boss@example.com"}, {"sub": "42", "preferred_username": "dana"},
                   {"sub": "42", "email": "boss@example.com", "email_verified": "yes"}):
        assert meshbox.oidc_identity(claims, issuer)["name"] == "42@id.example.com"
    # The subject is unique at its issuer: the same subject elsewhere is someone else.
    assert meshbox.oidc_identity({"sub": "42"}, "https://login.example.org:8443/realms/x")["name"] == \
        "42@login.example.org:8443"
    # A subject that cannot be a user name is shortened to a stable hash of it.
    long_sub = {"sub": "x" * 200}
    name = meshbox.oidc_identity(long_sub, issuer)["name"]
    assert name == meshbox.oidc_identity(long_sub, issuer)["name"] and name.endswith("@id.example.com")
    assert len(name) <= 63 and name != meshbox.oidc_identity({"sub": "x" * 199}, issuer)["name"]
    for odd in ("a b", "evil@example.com", "line\nbreak"):
        name = meshbox.oidc_identity({"sub": odd}, issuer)["name"]
        assert name.endswith("@id.example.com") and odd not in name and " " not in name
    meshbox.check_allowed(identity, ["example.com"], [], ["ops"])
    meshbox.check_allowed(identity, [], [], [])
    meshbox.check_allowed(meshbox.oidc_identity({"sub": "1", "email": "eve@other.example", "email_verified": True},
                                                issuer), ["example.com"], ["eve@other.example"], [])
    with pytest.raises(meshbox.OidcError, match="email domain"):
        meshbox.check_allowed(unverified, ["example.com"], [], [])     # an unverified email is no domain
    with pytest.raises(meshbox.OidcError, match="email domain"):
        meshbox.check_allowed(unverified, [], ["boss@example.com"], [])
    with pytest.raises(meshbox.OidcError, match="allowed group"):
        meshbox.check_allowed(identity, ["example.com"], [], ["admins"])


def test_no_allow_list_is_warned_about_at_start(tmp_path):
    async def start(state, **allowed):
        config = meshbox.Config(state_dir=str(state), listen=f"127.0.0.1:{free_port()}", derp_listen="off",
                                stun_listen="off", oidc_issuer="https://id.example.com", oidc_client_id="meshbox",
                                **allowed)
        server = meshbox.Server(config)
        await server.start()
        await server.stop()
        return [line for line in server.recent_logs.lines if "every account" in line]

    warned = asyncio.run(start(tmp_path / "open"))
    assert len(warned) == 1 and "https://id.example.com" in warned[0] and "oidc_allowed_domains" in warned[0]
    assert asyncio.run(start(tmp_path / "narrow", oidc_allowed_domains=["example.com"])) == []


def test_answers_the_provider_may_send():
    assert meshbox.parse_http_answer(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                                     b"4\r\n{\"a\"\r\n3;x=y\r\n:1}\r\n0\r\n\r\n") == (200, b'{"a":1}')
    assert meshbox.parse_http_answer(b"HTTP/1.1 400 Bad\r\nContent-Length: 2\r\n\r\n{}xx") == (400, b"{}")
    with pytest.raises(ValueError):
        meshbox.parse_http_answer(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n10\r\nshort")
    assert meshbox.split_https_url("https://id.example.com:8443/auth?x=1#frag") == \
        ("id.example.com", 8443, "id.example.com:8443", "/auth?x=1")
    with pytest.raises(meshbox.OidcError):
        meshbox.split_https_url("http://id.example.com/auth")
    verifier, challenge = meshbox.pkce_pair()
    assert 43 <= len(verifier) <= 128
    assert challenge == base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    assert meshbox.form_encode({"redirect_uri": "http://h/cb", "scope": "openid email"}) == \
        "redirect_uri=http%3A%2F%2Fh%2Fcb&scope=openid%20email"


def test_config_checks_the_oidc_settings():
    for settings, refusal in [({"oidc_issuer": "http://id.example.com", "oidc_client_id": "m"}, "https://"),
                              ({"oidc_issuer": "https://id.example.com"}, "oidc_client_id")]:
        with pytest.raises(ValueError, match=refusal):
            meshbox.Config(**settings).check()
    meshbox.Config(oidc_issuer="https://id.example.com", oidc_client_id="m").check()


def test_a_login_request_opened_again_and_again_pushes_out_no_other_sign_in():
    login = meshbox.OidcLogin(meshbox.Config(oidc_issuer="https://id.example.com", oidc_client_id="meshbox"))
    login.metadata = {"issuer": "https://id.example.com", "authorization_endpoint": "https://id.example.com/auth",
                      "token_endpoint": "https://id.example.com/token"}
    login.metadata_at = meshbox.now()

    async def main():
        theirs = await login.authorization_url("someone-else")
        for _ in range(meshbox.OIDC_MAX_PENDING + 10):       # a stranger reloading their own AuthURL page
            mine = await login.authorization_url("strangers-request")
        return theirs, mine

    theirs, mine = asyncio.run(main())
    states = {login.pending[s][0] for s in login.pending}
    assert states == {"someone-else", "strangers-request"}
    assert sum(p[0] == "strangers-request" for p in login.pending.values()) == meshbox.OIDC_PENDING_PER_LOGIN
    assert meshbox.parse_query(mine.partition("?")[2])["state"] in login.pending
    assert meshbox.OIDC_PENDING_PER_LOGIN * meshbox.AUTH_REQUESTS_MAX < meshbox.OIDC_MAX_PENDING
