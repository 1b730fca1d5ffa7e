"""Direct or relayed, per pair of NAT kinds (a benchmark, not a test).

    python3 tests/bench/paths.py [--direct-wait 30]

Runs the NAT lab of tests/test_natlab.py (stock tailscaled 1.96.4 behind
home-router NATs, meshbox on the lab's "internet"; root and network
namespaces needed) over every pair of NAT kinds, and two devices behind
one NAT.  For each pair two fresh clients start; it measures the time from
their start until the first byte of a stream between them arrives, and
until `tailscale ping` answers "via IP:PORT" (direct; "-" when it stays
relayed for --direct-wait seconds).  Then, for an easy/easy pair streaming
directly, the time the stream stalls when a site's public address changes
(renumbering) and when a device moves to another NAT, and until it is
direct again.  Prints a table, then a JSON line.
"""

import argparse
import itertools
import json
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import netlab  # noqa: E402
import realclients  # noqa: E402
from test_natlab import NatTailnet, recovery_after, wait_direct  # noqa: E402

KINDS = ("easy", "hard", "forwarded", "udp-blocked")
# Two sites of each kind (so a pair of one kind sits behind two NATs), a
# spare easy site to move to, and one site with two devices.
SITES = {f"{kind[:2]}{i}": (kind, [f"{kind[:2]}{i}d"]) for kind in KINDS for i in (1, 2)}
SITES["spare"] = ("easy", [])
SITES["home"] = ("easy", ["hm1", "hm2"])
FIRST_BYTES = 4096


def device_of(kind, i):
    return f"{kind[:2]}{i}d"


def measure_pair(net, a, b, folder, direct_wait):
    """(seconds to first byte, seconds to direct or None, direct endpoint) for fresh clients on a and b."""
    started = time.monotonic()
    for name in (a, b):
        net.join(name, folder / name)
    stream = realclients.Stream(net.clients[a], net.clients[b], net.address(b), direct_wait + 30)
    try:
        first = time.monotonic() - started if stream.wait_bytes(FIRST_BYTES, 60) else None
        endpoint, _ = wait_direct(net, a, b, direct_wait)
        to_direct = time.monotonic() - started if endpoint else None
        return first, to_direct, endpoint
    finally:
        stream.stop()
        for name in (a, b):
            net.clients.pop(name).stop()


def measure_roaming(net, a, b, folder):
    """Stall and time-to-direct-again after a renumbering and after a move, for easy/easy."""
    for name in (a, b):
        net.join(name, folder / name)
    out = {}
    assert wait_direct(net, a, b, 40)[0], "the easy/easy pair never went direct"
    stream = realclients.Stream(net.clients[a], net.clients[b], net.address(b), 200)
    try:
        stream.wait_bytes(100_000, 20)
        for change in ("renumber", "move"):
            at = time.monotonic()
            if change == "renumber":
                net.lab.site_of[a].renumber()
            else:
                net.lab.move(a, net.lab.sites["spare"])
            stall = recovery_after(stream, at)
            endpoint, _ = wait_direct(net, a, b, 60)
            out[change] = {"stall_s": round(stall, 1),
                           "direct_again_s": round(time.monotonic() - at, 1) if endpoint else None}
    finally:
        stream.stop()
        for name in (a, b):
            net.clients.pop(name).stop()
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--direct-wait", type=float, default=30.0,
                        help="seconds of pinging before a pair counts as relayed")
    args = parser.parse_args()
    if netlab.have_netns():
        sys.exit(f"paths.py: {netlab.have_netns()}")
    binaries = realclients.stock_binaries()
    pairs = [(k1, k2) for k1, k2 in itertools.combinations_with_replacement(KINDS, 2)]
    rows = []
    with tempfile.TemporaryDirectory(prefix="paths-") as tmp, \
            NatTailnet(Path(tmp), binaries, sites=SITES, join=False) as net:
        cases = [(f"{k1}/{k2}", device_of(k1, 1), device_of(k2, 2)) for k1, k2 in pairs]
        cases.append(("same NAT", "hm1", "hm2"))
        for run, (label, a, b) in enumerate(cases):
            first, to_direct, endpoint = measure_pair(net, a, b, Path(tmp) / f"run{run}", args.direct_wait)
            rows.append({"pair": label, "path": "direct" if to_direct else "relayed",
                         "first_byte_s": round(first, 1) if first else None,
                         "direct_s": round(to_direct, 1) if to_direct else None})
            print(f"{label:24} {rows[-1]['path']:8} first byte {rows[-1]['first_byte_s']} s, "
                  f"direct {rows[-1]['direct_s'] if to_direct else '-'} s", flush=True)
        roaming = measure_roaming(net, device_of("easy", 1), device_of("easy", 2), Path(tmp) / "roaming")
    print()
    print(f"{'pair':24} {'path':8} {'first byte s':>12} {'direct s':>9}")
    for r in rows:
        print(f"{r['pair']:24} {r['path']:8} {r['first_byte_s'] or '-':>12} {r['direct_s'] or '-':>9}")
    for change, figures in roaming.items():
        print(f"roaming ({change}): stream stalled {figures['stall_s']} s, direct again after "
              f"{figures['direct_again_s']} s")
    print(json.dumps({"pairs": rows, "roaming": roaming}))


if __name__ == "__main__":
    main()
