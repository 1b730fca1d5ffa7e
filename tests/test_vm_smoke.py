"""Kernel WireGuard inside the test VM: two namespaces, a tunnel, a ping through it."""

import json
import sys
import time

import pytest

from vm.runner import run_in_vm, vm_available

# ---- Constants ----

VM_TIMEOUT = 180.0  # boot plus script: 12-25 s under TCG, ~55 s at load average 8
RESULT_MARK = "WG-PAIR-RESULT "

# Runs inside the guest with the host's python3. Two namespaces joined by a
# veth (TEST-NET-1), one wg0 in each (100.64.0.0/10), keys made by the
# kernel from random private keys, then a bounded ping across the tunnel.
WG_PAIR_SCRIPT = r'''
import base64, json, os, subprocess
from pyroute2 import IPRoute, WireGuard, netns

SIDES = {
    "mbvm-a": {"veth": "veth-a", "underlay": "192.0.2.1", "tunnel": "100.64.0.1"},
    "mbvm-b": {"veth": "veth-b", "underlay": "192.0.2.2", "tunnel": "100.64.0.2"},
}
PORT = 51820

def configure_links(ns, side):
    with IPRoute(netns=ns) as ipr:
        ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
        ipr.link("add", ifname="wg0", kind="wireguard")
        for ifname, address, prefixlen in ((side["veth"], side["underlay"], 24),
                                           ("wg0", side["tunnel"], 10)):
            index = ipr.link_lookup(ifname=ifname)[0]
            ipr.addr("add", index=index, address=address, prefixlen=prefixlen)
            ipr.link("set", index=index, state="up")

def public_key(ns):
    with WireGuard(netns=ns) as wg:
        return next(m.get_attr("WGDEVICE_A_PUBLIC_KEY") for m in wg.info("wg0")).decode()

def first_peer(ns):
    with WireGuard(netns=ns) as wg:
        return next(m.get_attr("WGDEVICE_A_PEERS") for m in wg.info("wg0"))[0]

for ns in SIDES:
    netns.create(ns)
try:
    with IPRoute(netns="mbvm-a") as ipr:
        ipr.link("add", ifname="veth-a", kind="veth", peer={"ifname": "veth-b", "net_ns_fd": "mbvm-b"})
    for ns, side in SIDES.items():
        configure_links(ns, side)
        with WireGuard(netns=ns) as wg:
            wg.set("wg0", private_key=base64.b64encode(os.urandom(32)).decode(), listen_port=PORT)
        side["public_key"] = public_key(ns)
    for ns, other in (("mbvm-a", SIDES["mbvm-b"]), ("mbvm-b", SIDES["mbvm-a"])):
        with WireGuard(netns=ns) as wg:
            wg.set("wg0", peer={"public_key": other["public_key"], "endpoint_addr": other["underlay"],
                                "endpoint_port": PORT, "allowed_ips": [other["tunnel"] + "/32"]})
    ping = subprocess.run(["ip", "netns", "exec", "mbvm-a", "ping", "-c", "3", "-W", "2",
                           SIDES["mbvm-b"]["tunnel"]], capture_output=True, text=True, timeout=30)
    print(ping.stdout + ping.stderr)
    peer = first_peer("mbvm-a")
    print("WG-PAIR-RESULT " + json.dumps({
        "ping_rc": ping.returncode,
        "handshake_sec": peer.get_attr("WGPEER_A_LAST_HANDSHAKE_TIME")["tv_sec"],
        "rx_bytes": peer.get_attr("WGPEER_A_RX_BYTES"),
        "public_keys_differ": SIDES["mbvm-a"]["public_key"] != SIDES["mbvm-b"]["public_key"],
    }))
finally:
    for ns in SIDES:
        netns.remove(ns)
'''


# ---- Tests ----

def test_kernel_wireguard_ping_between_namespaces_in_vm():
    available, reason = vm_available()
    if not available:
        pytest.skip(f"test VM cannot be prepared: {reason}")
    started = time.monotonic()
    rc, output = run_in_vm([sys.executable, "-c", WG_PAIR_SCRIPT], VM_TIMEOUT)
    print(f"vm: boot to result in {time.monotonic() - started:.1f} s")
    text = output.decode(errors="replace")
    assert rc == 0, text
    lines = [line for line in text.splitlines() if line.startswith(RESULT_MARK)]
    assert lines, text
    result = json.loads(lines[-1][len(RESULT_MARK):])
    assert result["ping_rc"] == 0, text
    assert result["handshake_sec"] > 0, text
    assert result["rx_bytes"] > 0, text
    assert result["public_keys_differ"], text
