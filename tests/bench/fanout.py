"""Fan-out latency and cost of one change (a benchmark, not a test).

    python3 tests/bench/fanout.py --nodes 1000 [--changes 5]

meshbox runs in its own process; N simulated nodes (tests/tsclient.py) join
over ts2021 from this one.  Then one node reports new endpoints (the stock
client's non-streaming OmitPeers map request), and we time until every other
node's streaming map carries them; the same for a new node joining and for a
policy change (through the admin socket, as `meshbox policy set` does).  CPU seconds per change are the server process's CPU time
across the change, divided by the number of changes.  Prints a line per
phase and a JSON summary as the last line.
"""

import argparse
import asyncio
import gc
import json
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

import meshbox  # noqa: E402
import meshproc  # noqa: E402
import tsclient  # noqa: E402

SETTLE = 1.0          # seconds with no map traffic before a change is made
CHANGE_TIMEOUT = 30.0
POLICY = '{"acls": [{"action": "accept", "src": ["*"], "dst": ["*:%d"]}]}'


def percentile(values, p):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


async def settle(clients, quiet=SETTLE, limit=120):
    """Wait until no client has received anything for `quiet` seconds, then drop what they got."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        last = max((c.map_messages[-1][0] for c in clients if c.map_messages), default=0)
        if time.monotonic() - last >= quiet:
            break
        await asyncio.sleep(0.1)
    for c in clients:
        c.map_messages.clear()


async def time_change(server, watchers, make_change, seen):
    """Apply one change; returns (latencies in s, server CPU seconds)."""
    cpu0 = server.cpu_seconds()
    t0 = time.monotonic()
    await make_change()
    arrivals = await asyncio.gather(*(c.map_message_where(seen, CHANGE_TIMEOUT) for c in watchers))
    cpu = server.cpu_seconds() - cpu0
    return [arrival - t0 for arrival, _ in arrivals], cpu


def summary(name, latencies, cpu, changes):
    ms = [x * 1000 for x in latencies]
    result = {"p50_ms": round(percentile(ms, 50), 1), "p99_ms": round(percentile(ms, 99), 1),
              "max_ms": round(max(ms), 1), "cpu_s_per_change": round(cpu / changes, 3), "changes": changes}
    print(f"{name:9s} p50 {result['p50_ms']:8.1f} ms  p99 {result['p99_ms']:8.1f} ms  "
          f"max {result['max_ms']:8.1f} ms  server CPU {result['cpu_s_per_change']:.3f} s/change", flush=True)
    return result


async def run(args, state_dir):
    key = meshproc.auth_key(state_dir)
    server = meshproc.MeshboxProcess(state_dir, log_path=os.path.join(os.path.dirname(state_dir), "meshbox.log"),
                                     extra_args=["--log-level", "warning"])
    server.start()
    clients = []
    try:
        t0, cpu0 = time.monotonic(), server.cpu_seconds()
        clients, firsts = await tsclient.join_fleet("127.0.0.1", server.port, key, args.nodes,
                                                    concurrency=args.concurrency, timeout=60)
        join_s, join_cpu = time.monotonic() - t0, server.cpu_seconds() - cpu0
        print(f"{args.nodes} nodes joined in {join_s:.1f} s (server CPU {join_cpu:.1f} s)", flush=True)
        ids = [f["Node"]["ID"] for f in firsts]
        await settle(clients)
        # The load client's own garbage collector would pause every node's
        # reading at once (half a second at 500 nodes) and look like latency.
        gc.collect()
        gc.freeze()
        result = {"nodes": args.nodes, "join_s": round(join_s, 2), "join_server_cpu_s": round(join_cpu, 2)}

        # Endpoint changes, from different nodes in turn.
        latencies, cpu = [], 0.0
        for i in range(args.changes):
            mover, new = clients[i], [f"198.51.100.{i + 1}:{40000 + i}"]
            moved = ids[i]
            lat, c = await time_change(
                server, clients[:i] + clients[i + 1:], lambda: mover.update_endpoints(new),
                lambda m: any(p["ID"] == moved and p["Endpoints"] == new for p in m.get("PeersChanged", ())))
            latencies += lat
            cpu += c
            await settle(clients)
        result["endpoint"] = summary("endpoint", latencies, cpu, args.changes)

        # A new node joins.
        joiner = tsclient.ControlClient("127.0.0.1", server.port, "joiner")
        name = "joiner." + "mesh.internal."
        lat, c = await time_change(server, clients, lambda: joiner.join(key),
                                   lambda m: any(p["Name"] == name for p in m.get("PeersChanged", ())))
        clients.append(joiner)
        result["join"] = summary("join", lat, c, 1)
        await settle(clients)

        # A policy change, through the admin socket as `meshbox policy set` does.
        lat, c = await time_change(server, clients, lambda: asyncio.to_thread(
            meshbox.admin_socket_call, state_dir, "policy", "set", {"policy": POLICY % 22}),
            lambda m: "PacketFilter" in m)
        result["policy"] = summary("policy", lat, c, 1)
        result["rss_mb"] = round(server.rss_mb(), 1)
        result.update(p50_ms=result["endpoint"]["p50_ms"], p99_ms=result["endpoint"]["p99_ms"],
                      cpu_s_per_change=result["endpoint"]["cpu_s_per_change"])
        return result
    finally:
        for c in clients:
            await c.close()
        server.stop()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=100)
    parser.add_argument("--changes", type=int, default=5)
    parser.add_argument("--concurrency", type=int, default=32, help="joins in flight at once")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        result = asyncio.run(run(args, os.path.join(tmp, "state")))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
