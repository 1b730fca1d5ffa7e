"""Simulated nodes in a process of their own, for tests that need them where
the test process cannot reach (inside a network namespace).

    python3 tests/fleet.py HOST PORT AUTH_KEY COUNT REPORT.json [--lifetime 600]

Joins COUNT nodes (tests/tsclient.py), keeps them connected, rejoining after
the server goes away as a stock client does, and rewrites REPORT.json after
the first joins and after every rejoin: {"joined": {hostname: [node ID,
addresses]}, "rejoined": {hostname: [node ID, addresses]}}.  Stops by itself
after --lifetime seconds.
"""

import argparse
import asyncio
import json
import os

import tsclient


def identity(first_map):
    return [first_map["Node"]["ID"], first_map["Node"]["Addresses"]]


async def run(args):
    report = {"joined": {}, "rejoined": {}}

    def save():
        with open(args.report + ".tmp", "w") as f:
            json.dump(report, f)
        os.replace(args.report + ".tmp", args.report)

    clients, firsts = await tsclient.join_fleet(args.host, args.port, args.auth_key, args.count, timeout=60)
    report["joined"] = {c.hostname: identity(f) for c, f in zip(clients, firsts)}
    save()

    def rejoined(client, first_map):
        report["rejoined"][client.hostname] = identity(first_map)
        save()

    keepers = [asyncio.ensure_future(c.stay_connected(on_rejoin=lambda f, c=c: rejoined(c, f))) for c in clients]
    try:
        await asyncio.wait(keepers, timeout=args.lifetime)
    finally:
        for task in keepers:
            task.cancel()
        for c in clients:
            await c.close()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("host")
    parser.add_argument("port", type=int)
    parser.add_argument("auth_key")
    parser.add_argument("count", type=int)
    parser.add_argument("report")
    parser.add_argument("--lifetime", type=float, default=600)
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
