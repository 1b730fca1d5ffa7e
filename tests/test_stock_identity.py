"""Tailscale's own client (tailscaled 1.96.4) against meshbox: identity,
keys and routing, each command seen from the client and from meshbox.

One tailnet serves the whole module: meshbox in the hub, stock-a and
stock-b joined with an auth key, stock-c left to log in interactively.
stock-b has a LAN (198.51.100.0/24) behind it, and the hub answers HTTP
with the address a request came from, so that the path a client's
traffic takes (direct, or through an exit node) can be told. The tests
run in file order and each leaves the tailnet as the next expects.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

import netlab
import realclients
from realclients import CONTROL_URL, HUB, StockTailnet, meshbox_cli

pytestmark = pytest.mark.skipif(netlab.have_netns() is not None, reason=str(netlab.have_netns()))

LAN_PREFIX, LAN_ROUTER, LAN_HOST = "198.51.100.0/24", "198.51.100.1", "198.51.100.2"
EXTRA_PREFIX = "203.0.113.0/24"        # advertised later, approved by autoApprovers
PROXY = "127.0.0.1:1080"               # each tailscaled's HTTP proxy into the tailnet (userspace networking)
ECHO_PORT = 9000                       # the hub's "which address asked" page
LAN_PORT = 8000
SETTLE = 20                            # seconds for a change to reach a client or meshbox
EPHEMERAL_TIMEOUT = 3                  # seconds an ephemeral node may be offline here

# A page answering each GET with the client's address (hub) or a fixed text (LAN).
PAGE = ("import http.server, sys\n"
        "class Page(http.server.BaseHTTPRequestHandler):\n"
        "    def do_GET(self):\n"
        "        body = (sys.argv[3] if len(sys.argv) > 3 else self.client_address[0]).encode()\n"
        "        self.send_response(200); self.send_header('Content-Length', str(len(body))); self.end_headers()\n"
        "        self.wfile.write(body)\n"
        "    def log_message(self, *args): pass\n"
        "http.server.HTTPServer((sys.argv[1], int(sys.argv[2])), Page).serve_forever()\n")


def serve_page(ns, addr, port, log_path, body=None):
    proc = ns.spawn([sys.executable, "-c", PAGE, addr, str(port), *([body] if body else [])], log_path,
                    env=netlab.clean_env())
    assert netlab.wait_until(lambda: ns.python(f"import socket; socket.create_connection(({addr!r}, {port}), 1)",
                                               check=False).returncode == 0, 30), f"page on {addr}:{port} did not start"
    return proc


def add_lan(net):
    """A LAN namespace behind stock-b's namespace, serving a page."""
    lan = netlab.Netns(f"{net.lab.tag}-lan")
    netlab.link(net.lab["b"], "lan0", lan, "eth0")
    net.lab["b"].run(["ip", "addr", "add", f"{LAN_ROUTER}/24", "dev", "lan0"])
    lan.run(["ip", "addr", "add", f"{LAN_HOST}/24", "dev", "eth0"])
    lan.run(["ip", "route", "add", "default", "via", LAN_ROUTER])
    return lan


@pytest.fixture(scope="module")
def net(tmp_path_factory, stock_binaries):
    folder = tmp_path_factory.mktemp("stockid")
    with StockTailnet(folder, stock_binaries, names=("a", "b", "c"), join=("a", "b"),
                      settings={"ephemeral_timeout": f"{EPHEMERAL_TIMEOUT}s"},
                      daemon_args=(f"--outbound-http-proxy-listen={PROXY}",)) as net:
        lan = add_lan(net)
        pages = [serve_page(net.lab.hub, HUB, ECHO_PORT, folder / "echo.log"),
                 serve_page(lan, LAN_HOST, LAN_PORT, folder / "lan.log", "hello from the LAN")]
        try:
            yield net
        finally:
            for page in pages:
                page.stop()
            lan.close()


def mb(net, *args):
    """A meshbox verb against the running server, its JSON answer."""
    return json.loads(meshbox_cli(net.state, *args, *(("-o", "json") if args[-1] == "list" else ())))


def node_row(net, name):
    return next((n for n in mb(net, "nodes", "list") if n["name"] == name), None)


def routes(net, node):
    return {r["prefix"]: (r["advertised"], r["approved"]) for r in mb(net, "routes", "list") if r["node"] == node}


def peer(client, hostname):
    return next((p for p in client.peers() if p["HostName"] == hostname), None)


def fetch(client, url):
    """GET `url` through the client's tailnet proxy: (status, body); status 0 when nothing answered."""
    return client.ns.http_get(url, timeout=5, proxy=f"http://{PROXY}")


def pings(net, source, target):
    return netlab.wait_until(lambda: net.clients[source].ping(net.address(target)), SETTLE)


def wait_login_url(proc, timeout=SETTLE):
    """The /register/ URL `tailscale up` prints for an interactive login."""
    found = netlab.wait_until(lambda: re.search(r"https?://\S+/register/(\S+)", proc.log_text()), timeout)
    assert found, f"no login URL from tailscale up:\n{proc.log_text()[-2000:]}"
    return found.group(0), found.group(1)


def wait_exit(proc, timeout=SETTLE):
    assert netlab.wait_until(lambda: not proc.running(), timeout), f"tailscale up still waits:\n{proc.log_text()}"
    return proc.popen.returncode


def test_up_with_an_auth_key_joins(net):
    a = net.clients["a"]
    assert a.status()["BackendState"] == "Running"
    assert peer(a, "stock-b")["Online"]
    assert pings(net, "a", "b")
    rows = {n["name"]: n for n in mb(net, "nodes", "list")}
    assert rows["stock-a"]["online"] and rows["stock-b"]["online"]
    assert rows["stock-a"]["ipv4"] == net.address("a")


def test_down_takes_the_node_offline_and_up_brings_it_back(net):
    a, b = net.clients["a"], net.clients["b"]
    a.cli("down")
    assert a.status()["BackendState"] == "Stopped"
    assert netlab.wait_until(lambda: not node_row(net, "stock-a")["online"], SETTLE)
    assert netlab.wait_until(lambda: not peer(b, "stock-a")["Online"], SETTLE)
    a.up(CONTROL_URL, net.key, "stock-a")
    assert netlab.wait_until(lambda: node_row(net, "stock-a")["online"] and peer(b, "stock-a")["Online"], SETTLE)
    assert pings(net, "b", "a")


def test_read_verbs_show_live_state_at_once(net):
    """Issue 14: routes a client advertises, and its disco key, show in
    `routes list` / `nodes show` at once, not after the once-a-minute write."""
    b = net.clients["b"]
    b.cli("set", f"--advertise-routes={LAN_PREFIX}", "--advertise-exit-node")
    started = time.monotonic()
    want = {LAN_PREFIX: (True, False), "0.0.0.0/0": (True, False), "::/0": (True, False)}
    assert netlab.wait_until(lambda: routes(net, "stock-b") == want, 5), routes(net, "stock-b")
    print(f"advertised routes in `routes list` after {time.monotonic() - started:.1f} s")
    shown = mb(net, "nodes", "show", "stock-b")
    assert shown["disco_key"] and shown["disco_key"].startswith("discokey:")
    assert set(shown["advertised_routes"]) == set(want)
    meshbox_cli(net.state, "routes", "approve", "stock-b", LAN_PREFIX)     # no "does not advertise"
    assert routes(net, "stock-b")[LAN_PREFIX] == (True, True)


def test_accept_routes_reaches_the_lan_behind_a_node(net):
    a = net.clients["a"]
    assert fetch(a, f"http://{LAN_HOST}:{LAN_PORT}/")[0] != 200     # no route yet
    a.cli("set", "--accept-routes")
    assert netlab.wait_until(lambda: LAN_PREFIX in (peer(a, "stock-b").get("PrimaryRoutes") or []), SETTLE)
    assert netlab.wait_until(lambda: fetch(a, f"http://{LAN_HOST}:{LAN_PORT}/") == (200, "hello from the LAN"),
                             SETTLE)
    assert [r["primary"] for r in mb(net, "routes", "list") if r["prefix"] == LAN_PREFIX] == [True]


def test_exit_node_carries_a_clients_traffic(net):
    a, b = net.clients["a"], net.clients["b"]
    echo = f"http://{HUB}:{ECHO_PORT}/"
    assert fetch(a, echo) == (200, net.lab.addr["a"])            # straight from a's namespace
    assert a.cli("set", "--exit-node=stock-b", check=False).returncode != 0   # not approved yet
    for prefix in ("0.0.0.0/0", "::/0"):
        meshbox_cli(net.state, "routes", "approve", "stock-b", prefix)
    assert netlab.wait_until(lambda: peer(a, "stock-b").get("ExitNodeOption"), SETTLE)
    a.cli("set", "--exit-node=stock-b")
    assert netlab.wait_until(lambda: fetch(a, echo) == (200, net.lab.addr["b"]), SETTLE)   # out through b
    status = a.status()
    assert status["ExitNodeStatus"]["ID"] == peer(a, "stock-b")["ID"]
    assert peer(b, "stock-a") and all(v == (True, True) for v in routes(net, "stock-b").values())
    # LAN access is the client's own routing: it keeps private (RFC 1918,
    # ULA) interface networks local, which this lab's TEST-NET addresses
    # are not; what control takes part in is that the exit node still works.
    a.cli("set", "--exit-node-allow-lan-access")
    assert json.loads(a.cli("debug", "prefs").stdout)["ExitNodeAllowLANAccess"] is True
    assert fetch(a, echo) == (200, net.lab.addr["b"])
    a.cli("set", "--exit-node=", "--exit-node-allow-lan-access=false")
    assert netlab.wait_until(lambda: fetch(a, echo) == (200, net.lab.addr["a"]), SETTLE)
    assert not a.status().get("ExitNodeStatus")


def test_auto_approvers_approve_an_advertised_route(net, tmp_path):
    a, b = net.clients["a"], net.clients["b"]
    policy = tmp_path / "policy.hujson"
    policy.write_text(json.dumps({"acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}],
                                  "autoApprovers": {"routes": {EXTRA_PREFIX: ["alice@"]}}}))
    meshbox_cli(net.state, "policy", "set", str(policy))
    try:
        b.cli("set", f"--advertise-routes={LAN_PREFIX},{EXTRA_PREFIX}", "--advertise-exit-node")
        assert netlab.wait_until(lambda: routes(net, "stock-b").get(EXTRA_PREFIX) == (True, True), 5), \
            routes(net, "stock-b")
        assert [r["auto_approved"] for r in mb(net, "routes", "list") if r["prefix"] == EXTRA_PREFIX] == [True]
        assert netlab.wait_until(lambda: EXTRA_PREFIX in (peer(a, "stock-b").get("PrimaryRoutes") or []), SETTLE)
    finally:
        meshbox_cli(net.state, "policy", "clear")
    assert netlab.wait_until(lambda: EXTRA_PREFIX not in (peer(a, "stock-b").get("PrimaryRoutes") or []), SETTLE)
    assert routes(net, "stock-b")[EXTRA_PREFIX] == (True, False)


def test_up_without_a_key_is_approved_with_nodes_register(net):
    c = net.clients["c"]
    login = c.start_login(CONTROL_URL, "stock-c")
    url, request_id = wait_login_url(login)
    assert url.startswith(CONTROL_URL + "/register/")
    assert node_row(net, "stock-c") is None                        # nothing registered before approval
    meshbox_cli(net.state, "nodes", "register", "--user", "alice", "--key", request_id)
    assert wait_exit(login) == 0
    assert c.status()["BackendState"] == "Running"
    assert node_row(net, "stock-c")["user"] == "alice"
    assert pings(net, "a", "c")


def test_expired_key_is_rotated_on_the_same_node(net):
    """Issue 14: after `nodes expire`, the client waits for a new login
    (meshbox does not refuse its maps, or its DERP connections, over and
    over); `up --force-reauth
    --auth-key` gives the same node (ID, addresses) a new node key, and its
    peers get the new key."""
    a, b = net.clients["a"], net.clients["b"]
    before = mb(net, "nodes", "show", "stock-a")
    old_key = a.status()["Self"]["PublicKey"]
    meshbox_cli(net.state, "nodes", "expire", "stock-a")
    assert netlab.wait_until(lambda: a.status()["BackendState"] == "NeedsLogin", SETTLE)
    assert netlab.wait_until(lambda: (peer(b, "stock-a") or {}).get("Expired"), SETTLE)
    time.sleep(1)
    log_mark = len(net.server.log_text())
    time.sleep(3)
    refused = net.server.log_text()[log_mark:].count("refused")
    assert refused == 0, f"{refused} refused maps or DERP connections in 3 s"
    started = time.monotonic()
    a.up(CONTROL_URL, net.key, "stock-a", "--force-reauth", "--accept-routes", timeout=SETTLE)
    print(f"re-authenticated after {time.monotonic() - started:.1f} s")
    status = a.status()
    assert status["BackendState"] == "Running" and status["Self"]["PublicKey"] != old_key
    after = mb(net, "nodes", "show", "stock-a")
    assert (after["id"], after["ipv4"], after["ipv6"]) == (before["id"], before["ipv4"], before["ipv6"])
    assert after["node_key"] == status["Self"]["PublicKey"] and not after["expired"]
    assert netlab.wait_until(lambda: (peer(b, "stock-a") or {}).get("PublicKey") == status["Self"]["PublicKey"]
                             and not peer(b, "stock-a").get("Expired"), SETTLE)
    # The peer reaches it by its home DERP, which the client does not send
    # again after a re-login (it sends NetInfo only when it changes).
    assert pings(net, "b", "a")
    assert mb(net, "nodes", "show", "stock-a")["derp_home"] == before["derp_home"] != 0


def test_force_reauth_without_a_key_gets_a_login_url(net):
    """An interactive re-login (the user's key expired, no auth key at
    hand): a login URL, approved with `nodes register`, rotates the key."""
    c = net.clients["c"]
    before = mb(net, "nodes", "show", "stock-c")
    meshbox_cli(net.state, "nodes", "expire", "stock-c")
    assert netlab.wait_until(lambda: c.status()["BackendState"] == "NeedsLogin", SETTLE)
    login = c.start_login(CONTROL_URL, "stock-c", "--force-reauth")
    _, request_id = wait_login_url(login)
    assert mb(net, "nodes", "show", "stock-c")["node_key"] == before["node_key"]    # not rotated by asking
    meshbox_cli(net.state, "nodes", "register", "--user", "alice", "--key", request_id)
    assert wait_exit(login) == 0
    after = mb(net, "nodes", "show", "stock-c")
    assert (after["id"], after["ipv4"]) == (before["id"], before["ipv4"])
    assert after["node_key"] != before["node_key"] and after["node_key"] == c.status()["Self"]["PublicKey"]
    assert pings(net, "a", "c")


def test_nodes_expiry_disable(net):
    a, b = net.clients["a"], net.clients["b"]
    assert a.status()["Self"].get("KeyExpiry")
    meshbox_cli(net.state, "nodes", "expiry", "disable", "stock-a")
    assert mb(net, "nodes", "show", "stock-a")["expiry"] is None
    assert netlab.wait_until(lambda: not a.status()["Self"].get("KeyExpiry"), SETTLE)
    assert netlab.wait_until(lambda: not (peer(b, "stock-a") or {}).get("KeyExpiry"), SETTLE)


def test_logout_expires_the_node_and_login_brings_it_back(net):
    a, c = net.clients["a"], net.clients["c"]
    before = mb(net, "nodes", "show", "stock-c")
    c.cli("logout")
    assert c.status()["BackendState"] == "NeedsLogin"
    row = mb(net, "nodes", "show", "stock-c")
    assert row["expired"] and row["id"] == before["id"]            # kept, expired (not ephemeral)
    assert netlab.wait_until(lambda: (peer(a, "stock-c") or {}).get("Expired"), SETTLE)
    c.cli("login", f"--login-server={CONTROL_URL}", f"--auth-key={net.key}", "--hostname=stock-c",
          "--accept-dns=false", f"--timeout={SETTLE}s", timeout=SETTLE + 15)
    assert c.status()["BackendState"] == "Running"
    after = mb(net, "nodes", "show", "stock-c")
    assert (after["id"], after["ipv4"], after["expired"]) == (before["id"], before["ipv4"], False)
    assert pings(net, "a", "c")


def test_ephemeral_nodes_go_after_logout_and_after_they_vanish(net):
    c = net.clients["c"]
    ephemeral = realclients.auth_key(net.state, "--ephemeral")
    c.cli("logout")
    meshbox_cli(net.state, "nodes", "delete", "stock-c")
    c.up(CONTROL_URL, ephemeral, "stock-eph")
    row = node_row(net, "stock-eph")
    assert row["ephemeral"] and row["online"]
    c.cli("logout")
    assert node_row(net, "stock-eph") is None                      # removed at logout
    assert netlab.wait_until(lambda: peer(net.clients["a"], "stock-eph") is None, SETTLE)
    c.up(CONTROL_URL, ephemeral, "stock-eph")
    assert node_row(net, "stock-eph")["online"]
    os.kill(c.proc.pid, signal.SIGKILL)                            # vanishes without a logout
    c.stop()
    assert netlab.wait_until(lambda: node_row(net, "stock-eph") is None, EPHEMERAL_TIMEOUT + SETTLE)
    assert netlab.wait_until(lambda: peer(net.clients["a"], "stock-eph") is None, SETTLE)


# ---- OIDC: a tailnet of its own, whose meshbox signs people in ----

OIDC_PORT = 8443                       # the provider, on the hub's loopback
BROWSER = ("import sys\n"             # a person's browser in the hub namespace, through the sign-in
           "import test_oidc\n"
           "status, url, page = test_oidc.Browser(sys.argv[1]).sign_in(sys.argv[2], 'alice')\n"
           "print(status, url); print(page[:400])\n")


def test_up_without_a_key_signs_in_through_oidc(tmp_path, stock_binaries):
    """`tailscale up` without a key prints meshbox's login URL; the person
    signs in at the OpenID provider (tests/oidc) and the client joins as
    the user the provider vouched for."""
    import test_oidc
    test_oidc.install_provider()
    issuer = f"https://127.0.0.1:{OIDC_PORT}"
    cert, key = tmp_path / "provider-cert.pem", tmp_path / "provider-key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True, timeout=60)
    provider_config = tmp_path / "provider.json"
    provider_config.write_text(json.dumps({
        "port": OIDC_PORT, "cert": str(cert), "key": str(key), "accounts": test_oidc.ACCOUNTS,
        "clients": [{"client_id": test_oidc.CLIENT_ID, "client_secret": test_oidc.CLIENT_SECRET,
                     "redirect_uris": [CONTROL_URL + "/oidc/callback"],
                     "grant_types": ["authorization_code"], "response_types": ["code"]}]}))
    settings = {"oidc_issuer": issuer, "oidc_client_id": test_oidc.CLIENT_ID,
                "oidc_client_secret": test_oidc.CLIENT_SECRET, "oidc_allowed_domains": "example.com",
                "oidc_ca_file": str(cert)}
    with StockTailnet(tmp_path, stock_binaries, names=("a",), join=(), settings=settings) as net:
        provider = net.lab.hub.spawn(["node", "provider.mjs", str(provider_config)], tmp_path / "provider.log",
                                     env=dict(os.environ), cwd=test_oidc.PROVIDER_DIR)
        try:
            provider.wait_for_log("ready " + re.escape(issuer), 30)
            a = net.clients["a"]
            login = a.start_login(CONTROL_URL, "stock-oidc")
            url, _ = wait_login_url(login)
            browser = net.lab.hub.run([sys.executable, "-c", BROWSER, str(cert), url], timeout=60, check=False,
                                      env=netlab.clean_env(PYTHONPATH=str(realclients.ROOT / "tests")))
            assert browser.returncode == 0, browser.stderr[-2000:]
            assert wait_exit(login) == 0, login.log_text()
            assert a.status()["BackendState"] == "Running"
            assert a.status()["User"][str(a.status()["Self"]["UserID"])]["LoginName"] == "alice@example.com"
            assert node_row(net, "stock-oidc")["user"] == "alice@example.com"
        finally:
            provider.stop()
