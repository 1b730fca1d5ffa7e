"""Coordinator memory, idle and with N nodes connected (a benchmark, not a test).

    python3 tests/bench/memory.py --nodes 1000 [--policy]

meshbox runs in its own process; RSS is read from /proc once it has been
idle for a while, then again after N simulated nodes (tests/tsclient.py)
have joined and their maps have gone quiet.  With --policy, an ACL policy
(every node may reach every other on port 22, as in fanout.py) is in force
from the start instead of the default allow-all.  Prints a line, then a JSON
summary as the last line.
"""

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import meshproc  # noqa: E402
import tsclient  # noqa: E402
from fanout import POLICY, settle  # noqa: E402
import meshbox  # noqa: E402

IDLE_WAIT = 2.0


def peak_rss_mb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return None


async def run(args, state_dir):
    key = meshproc.auth_key(state_dir)
    if args.policy:
        store = meshbox.Store(os.path.join(state_dir, "meshbox.db"))
        store.set_setting("policy", POLICY % 22)
        store.db.close()
    bytecode = None if args.from_source else meshproc.compile_bytecode(os.path.dirname(state_dir))
    server = meshproc.MeshboxProcess(state_dir, log_path=os.path.join(os.path.dirname(state_dir), "meshbox.log"),
                                     extra_args=["--log-level", "warning"], bytecode_dir=bytecode)
    server.start()
    clients = []
    try:
        await asyncio.sleep(IDLE_WAIT)
        idle = server.rss_mb()
        t0 = time.monotonic()
        clients, _ = await tsclient.join_fleet("127.0.0.1", server.port, key, args.nodes, timeout=120)
        join_s = time.monotonic() - t0
        await settle(clients)
        await asyncio.sleep(IDLE_WAIT)
        return {"nodes": args.nodes, "from_source": args.from_source, "policy": args.policy,
                "rss_idle_mb": round(idle, 1), "rss_mb": round(server.rss_mb(), 1),
                "rss_peak_mb": round(peak_rss_mb(server.pid), 1), "join_s": round(join_s, 1)}
    finally:
        for c in clients:
            await c.close()
        server.stop()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--from-source", action="store_true",
                        help="run meshbox.py itself (compiling 7,000 lines at start costs ~18 MB of RSS) "
                             "instead of its bytecode, as installed packages run it")
    parser.add_argument("--policy", action="store_true", help="an ACL policy in force instead of allow-all")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        result = asyncio.run(run(args, os.path.join(tmp, "state")))
    print(f"RSS idle {result['rss_idle_mb']} MiB, with {args.nodes} nodes {result['rss_mb']} MiB "
          f"(peak {result['rss_peak_mb']} MiB)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
