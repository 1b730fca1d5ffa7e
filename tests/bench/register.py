"""Registrations per second (a benchmark, not a test).

    python3 tests/bench/register.py [--count 300] [--concurrency 16] [--stay]

meshbox runs in its own process; simulated nodes (tests/tsclient.py) each do
what a new stock client does: Noise handshake, RegisterRequest with a
pre-auth key, and a streaming map until its first message.  The rate counts
all three.  The load client runs on the same cores, so it decompresses the
first map but does not parse its JSON (that would cost it more than the
server spends on the whole registration).  By default each node leaves after its first map, so the figure
is the registration path itself; --stay keeps them connected (then every
join is also fanned out to those already there, see fanout.py).  Prints a
line, then a JSON summary as the last line.
"""

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import meshproc  # noqa: E402
import tsclient  # noqa: E402


async def run(args, state_dir):
    key = meshproc.auth_key(state_dir)
    server = meshproc.MeshboxProcess(state_dir, log_path=os.path.join(os.path.dirname(state_dir), "meshbox.log"),
                                     extra_args=["--log-level", "warning"])
    server.start()
    server_public = await tsclient.fetch_server_key("127.0.0.1", server.port)
    gate = asyncio.Semaphore(args.concurrency)
    kept, durations = [], []

    async def one(i):
        client = tsclient.ControlClient("127.0.0.1", server.port, f"reg{i}")
        async with gate:
            t = time.monotonic()
            try:
                await client.join(key, 120, server_public, parse=False)
                durations.append(time.monotonic() - t)
            finally:
                if args.stay:
                    kept.append(client)
                else:
                    await client.close()

    try:
        cpu0, t0 = server.cpu_seconds(), time.monotonic()
        await asyncio.gather(*(one(i) for i in range(args.count)))
        seconds, cpu = time.monotonic() - t0, server.cpu_seconds() - cpu0
    finally:
        for c in kept:
            await c.close()
        server.stop()
    return {"count": args.count, "concurrency": args.concurrency, "stay": args.stay,
            "seconds": round(seconds, 2), "per_s": round(args.count / seconds, 1),
            "server_cpu_ms_per_registration": round(cpu / args.count * 1000, 2),
            "median_ms": round(statistics.median(durations) * 1000, 1)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--stay", action="store_true", help="keep every node connected")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        result = asyncio.run(run(args, os.path.join(tmp, "state")))
    print(f"{result['count']} registrations in {result['seconds']} s = {result['per_s']}/s "
          f"({result['server_cpu_ms_per_registration']} ms server CPU each)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
