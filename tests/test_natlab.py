"""Real networks: stock tailscaled 1.96.4 behind NAT routers (tests/netlab.py's
NatLab), meshbox on the "internet".  Each case asserts the path the clients
take (`tailscale ping` says "via DERP(meshbox)" or "via IP:PORT") and that
bytes flow, and checks meshbox's own view of it (`meshbox paths`, the
nodes' NAT kind, their endpoints).

One lab and one meshbox serve the whole module; the sites:

    e1, e2, e3  easy NAT (plain masquerade): devices ea, eb; e3 is empty
                until ea moves there
    h1, h2      hard NAT (masquerade random,fully-random): ha, hb
    f1          easy NAT with UDP 41641 forwarded to its device: fa
    u1          UDP blocked (only TCP out): ua
    home        easy NAT, two devices hc and hd (no hairpinning)
"""

import json
import os
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

import netlab
import realclients
from realclients import meshbox_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BOX = netlab.INTERNET_ADDR
CONTROL_URL = f"http://{BOX}:8080"
SITES = {"e1": ("easy", ["ea"]), "e2": ("easy", ["eb"]), "e3": ("easy", []), "h1": ("hard", ["ha"]),
         "h2": ("hard", ["hb"]), "f1": ("forwarded", ["fa"]), "u1": ("udp-blocked", ["ua"]),
         "home": ("easy", ["hc", "hd"])}
DIRECT_TIMEOUT = 40      # seconds from the first ping until "via IP:PORT"
RELAYED_WATCH = 12       # seconds a relayed pair is watched to stay relayed
PEER_TIMEOUT = 30
DIRECT_PONG = re.compile(r"via (\d+\.\d+\.\d+\.\d+):(\d+)")

pytestmark = pytest.mark.skipif(netlab.have_netns() is not None, reason=str(netlab.have_netns()))


class NatTailnet:
    """A NatLab with SITES, meshbox serving in its internet and a stock
    client joined from every device (a context manager)."""

    def __init__(self, folder, binaries, sites=SITES, join=True):
        self.folder, self.binaries, self.sites, self.join_all = folder, binaries, sites, join
        self.state = folder / "state"
        self.lab = self.server = self.key = None
        self.clients = {}
        self.restarts = 0

    def __enter__(self):
        self.lab = netlab.NatLab()
        try:
            for site, (kind, devices) in self.sites.items():
                built = self.lab.add_site(site, kind)
                for device in devices:
                    built.add_device(device)
            meshbox_cli(self.state, "users", "create", "alice")
            self.start_meshbox()
            self.key = meshbox_cli(self.state, "preauthkeys", "create", "--user", "alice", "--reusable").split()[-1]
            if self.join_all:
                with ThreadPoolExecutor(4) as pool:    # joins take seconds each: side by side
                    list(pool.map(self.join, list(self.lab.devices)))
        except BaseException:
            self.__exit__()
            raise
        return self

    def join(self, name, workdir=None):
        """Start a stock client on device `name` and join it as node `name`."""
        client = realclients.StockClient(self.lab[name], workdir or self.folder / name, self.binaries,
                                         ca_file=self.state / "derp-cert.pem", hub=None).start()
        self.clients[name] = client
        client.up(CONTROL_URL, self.key, name)
        return client

    def start_meshbox(self):
        log = self.folder / f"meshbox-{self.restarts}.log"
        self.server = self.lab.internet.spawn(
            [sys.executable, os.path.join(ROOT, "meshbox.py"), "--state", str(self.state), "serve",
             "--listen", f"{BOX}:8080", "--derp-listen", f"{BOX}:443",
             "--stun-listen", f"{BOX}:3478,{BOX}:3479"], log)
        self.server.wait_for_log(r"serving http://", 20)

    def restart_meshbox(self):
        self.server.stop()
        self.restarts += 1
        self.start_meshbox()

    def address(self, name):
        return self.clients[name].status()["Self"]["TailscaleIPs"][0]

    def node(self, name):
        return next(n for n in json.loads(meshbox_cli(self.state, "status", "-o", "json"))["nodes"]
                    if n["name"] == name)

    def pair(self, a, b):
        """meshbox's `paths` row for nodes a and b (None when DERP carried nothing for them)."""
        rows = json.loads(meshbox_cli(self.state, "paths", "-o", "json"))
        return next((r for r in rows if sorted(r["nodes"]) == sorted([a, b])), None)

    def relayed_bytes(self, a, b):
        row = self.pair(a, b)
        return row["relayed_bytes"] if row else 0

    def __exit__(self, *exc):
        for name, client in self.clients.items():
            client.stop()
            print(f"---- tailscaled {name}:\n{client.log_text()[-1500:]}")
        if self.server:
            self.server.stop()
            print(f"---- meshbox:\n{self.server.log_text()[-4000:]}")
        self.lab.close()


@pytest.fixture(scope="module")
def net(tmp_path_factory, stock_binaries):
    with NatTailnet(tmp_path_factory.mktemp("nat"), stock_binaries) as built:
        yield built


def wait_direct(net, a, b, timeout=DIRECT_TIMEOUT):
    """Ping b from a until a pong comes "via IP:PORT": that (ip, port), or
    None; and the pongs seen."""
    seen = []
    target = net.address(b)

    def direct():
        pongs = net.clients[a].ping(target, count=1)
        seen.extend(pongs)
        found = DIRECT_PONG.search(pongs[-1]) if pongs else None
        return (found.group(1), int(found.group(2))) if found else None

    return netlab.wait_until(direct, timeout, interval=0.3), seen


def assert_stays_relayed(net, a, b, seconds=RELAYED_WATCH):
    """Pings from a to b keep coming back through meshbox's DERP for `seconds`."""
    target, deadline, pongs = net.address(b), time.monotonic() + seconds, []
    while time.monotonic() < deadline:
        pongs += net.clients[a].ping(target, count=1)
        time.sleep(0.5)
    assert pongs, f"{a} -> {b}: no pong at all"
    assert all("via DERP(meshbox)" in p for p in pongs), pongs


def stream_between(net, a, b, duration):
    return realclients.Stream(net.clients[a], net.clients[b], net.address(b), duration)


def direct_stream(net, a, b, duration):
    """A stream from a to b once they are direct, its first 100 KB arrived."""
    assert wait_direct(net, a, b)[0], f"{a} -> {b} is not direct"
    stream = stream_between(net, a, b, duration)
    if not stream.wait_bytes(100_000, 20):
        stream.stop()
        raise AssertionError(f"stream {a} -> {b} moved only {stream.received()} bytes")
    return stream


# ---- Paths ----

@pytest.mark.parametrize("a, b", [("ea", "eb"), ("hc", "hd"), ("fa", "ha")],
                         ids=["easy-easy", "same-nat", "forwarded-hard"])
def test_pair_upgrades_to_direct_and_leaves_derp(net, a, b):
    started = time.monotonic()
    endpoint, pongs = wait_direct(net, a, b)
    assert endpoint, f"{a} -> {b} never went direct: {pongs}"
    print(f"{a} -> {b}: direct via {endpoint[0]}:{endpoint[1]} after {time.monotonic() - started:.1f} s; {pongs}")
    if (a, b) == ("hc", "hd"):     # no hairpinning: they must have found each other's LAN address
        assert endpoint[0] == net.lab.sites["home"].devices["hd"], endpoint
    stream = stream_between(net, a, b, 20)
    try:
        assert stream.wait_bytes(100_000, 20), f"stream {a} -> {b} moved {stream.received()} bytes"
        before, got_before = net.relayed_bytes(a, b), stream.received()
        assert stream.wait_bytes(got_before + 500_000, 20)
        relayed = net.relayed_bytes(a, b) - before
        moved = stream.received() - got_before
        print(f"{a} -> {b}: {moved} bytes moved, of which meshbox's DERP relayed {relayed}")
        assert relayed < moved // 20, (relayed, moved)     # the data went direct, not through meshbox
    finally:
        stream.stop()
    row = net.pair(a, b)
    assert row is None or not row["relayed"] or row["why"], row


@pytest.mark.parametrize("a, b", [("ha", "hb"), ("ua", "ea")], ids=["hard-hard", "udp-blocked"])
def test_pair_stays_relayed_and_flows(net, a, b):
    stream = stream_between(net, a, b, 25)
    try:
        assert stream.wait_bytes(100_000, 30), f"stream {a} -> {b} moved {stream.received()} bytes"
        assert_stays_relayed(net, a, b)
        before, got_before = net.relayed_bytes(a, b), stream.received()
        assert stream.wait_bytes(got_before + 300_000, 20)
        relayed = net.relayed_bytes(a, b) - before
        assert relayed >= stream.received() - got_before, relayed       # every byte crossed meshbox
        row = net.pair(a, b)
        print(f"meshbox paths {a} <-> {b}: {row}")
        assert row["relayed"], row
        assert f"derp: {row['nodes'][0]} <-> {row['nodes'][1]} now relayed" in net.server.log_text()
    finally:
        stream.stop()
    why = " ".join(row["why"])
    if "ua" in (a, b):
        assert "ua: UDP blocked" in why, why
        assert net.node("ua")["network"]["nat"][0] == "UDP blocked"
    else:
        assert "both are behind hard NATs" in why, why


# ---- What meshbox sees ----

def test_nodes_report_their_nat_kind(net):
    """Each client's own netcheck, as meshbox shows it, matches its site."""
    expected = {"easy": "easy", "hard": "hard", "forwarded": "easy", "udp-blocked": "udp-blocked"}

    def kinds():
        nodes = json.loads(meshbox_cli(net.state, "status", "-o", "json"))["nodes"]
        return {n["name"]: n["network"] for n in nodes}

    want = {d: expected[kind] for kind, devices in SITES.values() for d in devices}
    netlab.wait_until(lambda: {n: f["nat_kind"] for n, f in kinds().items()} == want, 30)
    seen = kinds()
    assert {n: f["nat_kind"] for n, f in seen.items()} == want, seen
    assert "hard NAT: mapping varies by destination" in seen["ha"]["nat"]
    assert seen["ea"]["derp_home"] == 900 and seen["ea"]["derp_latency_ms"], seen["ea"]
    assert seen["ea"]["client_version"].startswith(realclients.STOCK_VERSION)
    assert seen["ea"]["capability"] >= 100
    sources = {e["endpoint"]: e["from"] for e in seen["ea"]["endpoints_from"]}
    assert sources.get(f"{net.lab.sites['e1'].wan_addr}:41641") == "stun", sources
    assert sources.get(f"{net.lab.sites['e1'].devices['ea']}:41641") == "local", sources
    shown = meshbox_cli(net.state, "nodes", "show", "ha")
    assert "hard NAT: mapping varies by destination" in json.loads(shown)["network"]["nat"]
    metrics = net.lab.internet.http_get(f"http://{BOX}:8080/metrics")[1]
    assert 'meshbox_nodes_by_nat{kind="hard"} 2' in metrics, metrics


# ---- Roaming and restarts ----

def recovery_after(stream, change_at, timeout=60):
    """Seconds from `change_at` until bytes flow again steadily after a stall."""
    got = stream.received()
    assert stream.wait_bytes(got + 200_000, timeout), f"stream stuck at {stream.received()} bytes"
    return stream.longest_stall(since=change_at - 1)


def test_roaming_renumbered_wan_and_moved_device(net):
    """ea streams to eb directly.  Its site's public address changes: the
    stream recovers by itself, meshbox's endpoints for ea follow, eb's map
    carries them, the pair goes direct again.  Then ea moves to another NAT
    (its link staying up): the stream recovers and goes direct again.

    After the move tailscaled 1.96.4 keeps its control and DERP connections
    on the vanished source address until they time out (minutes; newer
    clients close connections whose local address disappeared), so meshbox
    hears of the new endpoints only then: the move checks the data path."""
    a, b = "ea", "eb"
    stream = direct_stream(net, a, b, 120)
    try:
        at = time.monotonic()
        public = net.lab.sites["e1"].renumber()
        stall = recovery_after(stream, at)
        print(f"roaming (renumbered WAN): the stream stalled {stall:.1f} s at most")
        assert netlab.wait_until(lambda: any(e.startswith(public + ":") for e in net.node(a)["endpoints"]), 60), \
            f"meshbox's endpoints for {a} do not follow to {public}: {net.node(a)['endpoints']}"
        assert netlab.wait_until(lambda: any(x.startswith(public + ":") for x in net.clients[b].peer_endpoints(a)),
                                 PEER_TIMEOUT), f"{b}'s map lacks {a}'s new endpoint"
        endpoint, pongs = wait_direct(net, a, b, 60)
        print(f"roaming (renumbered WAN): direct again via {endpoint} after {time.monotonic() - at:.1f} s")
        assert endpoint, pongs

        at = time.monotonic()
        net.lab.move(a, net.lab.sites["e3"])
        stall = recovery_after(stream, at)
        print(f"roaming (moved to another NAT): the stream stalled {stall:.1f} s at most")
        endpoint, pongs = wait_direct(net, a, b, 60)
        print(f"roaming (moved to another NAT): direct again via {endpoint} after {time.monotonic() - at:.1f} s; "
              f"meshbox has {net.node(a)['endpoints']}")
        assert endpoint, pongs
        assert stream.wait_bytes(stream.received() + 100_000, 20)
    finally:
        stream.stop()


def test_meshbox_restart_does_not_stop_a_direct_session(net):
    a, b = "hc", "hd"
    stream = direct_stream(net, a, b, 40)
    try:
        at = time.monotonic()
        net.server.stop()
        time.sleep(5)                      # control and DERP gone for a while
        assert stream.wait_bytes(stream.received() + 300_000, 10), "the direct stream stopped with meshbox"
        net.restarts += 1
        net.start_meshbox()
        assert stream.wait_bytes(stream.received() + 300_000, 20)
        stall = stream.longest_stall(since=at)
        print(f"meshbox restarted during a direct session: the stream stalled {stall:.1f} s at most")
        assert stall < 2.0, stall
        assert wait_direct(net, a, b, 10)[0]
    finally:
        stream.stop()


def test_box_behind_nat_with_forwarded_ports(net, tmp_path):
    """meshbox itself on a LAN behind an easy NAT that forwards its TCP
    control and DERP ports and both STUN ports: clients outside join through
    the public address, learn their own public endpoints and go direct."""
    site = net.lab.add_site("box", "easy", lan_net="198.51.100.0/24")
    box = site.add_device("box")
    addr, public = site.devices["box"], site.wan_addr
    for proto, port in (("tcp", 8080), ("tcp", 443), ("udp", 3478), ("udp", 3479)):
        site.forward(proto, port, addr)
    state = tmp_path / "state"
    meshbox_cli(state, "users", "create", "alice")
    server = box.spawn([sys.executable, os.path.join(ROOT, "meshbox.py"), "--state", str(state), "serve",
                        "--listen", f"{addr}:8080", "--server-url", f"http://{public}:8080",
                        "--derp-listen", f"{addr}:443", "--stun-listen", f"{addr}:3478,{addr}:3479"],
                       tmp_path / "box.log")
    clients = {}
    try:
        server.wait_for_log(r"serving http://", 20)
        key = meshbox_cli(state, "preauthkeys", "create", "--user", "alice", "--reusable").split()[-1]
        for name, where in (("bx1", "e2"), ("bx2", "home")):
            net.lab.sites[where].add_device(name)
            clients[name] = realclients.StockClient(net.lab[name], tmp_path / name, net.binaries,
                                                    ca_file=state / "derp-cert.pem", hub=None).start()
            clients[name].up(f"http://{public}:8080", key, name)
        target = clients["bx2"].status()["Self"]["TailscaleIPs"][0]

        def direct():
            pongs = clients["bx1"].ping(target)
            return pongs and DIRECT_PONG.search(pongs[-1])
        assert netlab.wait_until(direct, DIRECT_TIMEOUT, interval=0.3), "clients of a box behind NAT never went direct"
        nodes = {n["name"]: n for n in json.loads(meshbox_cli(state, "status", "-o", "json"))["nodes"]}
        wan = net.lab.sites["e2"].wan_addr
        assert any(e["endpoint"].startswith(wan + ":") and e["from"] == "stun"
                   for e in nodes["bx1"]["network"]["endpoints_from"]), nodes["bx1"]["network"]
        assert nodes["bx1"]["network"]["nat_kind"] == "easy", nodes["bx1"]["network"]
    finally:
        for client in clients.values():
            client.stop()
        server.stop()
        print(f"---- meshbox behind NAT:\n{server.log_text()[-3000:]}")
