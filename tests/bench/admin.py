"""The admin page's first load and API v2's device list (a benchmark, not a test).

    python3 tests/bench/admin.py --nodes 1000 [--repeat 20]

meshbox runs in its own process on loopback.  First the page's first load:
the bytes and requests of its HTML, style sheet and script, then of the
API calls its script makes once signed in (the same list as admin.js's
refresh: sign-in, users, devices, logins, keys, WireGuard devices, logs,
policy).  Then N simulated nodes (tests/tsclient.py) join, and
GET /api/v2/tailnet/-/devices?fields=all (what the page and Home
Assistant's integration ask for) is timed REPEAT times.  Prints lines, then
a JSON summary as the last line.
"""

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))
sys.path.insert(0, HERE)

import meshbox  # noqa: E402
import meshproc  # noqa: E402
import tsclient  # noqa: E402
from fanout import settle  # noqa: E402

PAGE_FILES = ("/admin", "/admin/admin.css", "/admin/admin.js")
PAGE_API_CALLS = ("tailnet/-/users", "tailnet/-/devices?fields=all", "tailnet/-/logins", "tailnet/-/keys",
                  "tailnet/-/wireguard-devices", "tailnet/-/logs?lines=200", "tailnet/-/acl")


def fetch(url, headers=None):
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=60) as answer:
        return answer.read()


def api_key(state_dir):
    store = meshbox.Store(os.path.join(state_dir, "meshbox.db"))
    try:
        return meshbox.Admin(store, meshbox.Config(state_dir=state_dir)).apikeys_create()["key"]
    finally:
        store.db.close()


async def run(args, state_dir):
    node_key = meshproc.auth_key(state_dir)
    secret = api_key(state_dir)
    server = meshproc.MeshboxProcess(state_dir, log_path=os.path.join(os.path.dirname(state_dir), "meshbox.log"),
                                     extra_args=["--log-level", "warning"])
    server.start()
    base = f"http://127.0.0.1:{server.port}"
    auth = {"Authorization": f"Bearer {secret}"}
    clients = []
    try:
        page = [len(fetch(base + path)) for path in PAGE_FILES]
        sign_in = urllib.request.Request(base + "/admin/session", data=json.dumps({"key": secret}).encode())
        with urllib.request.urlopen(sign_in, timeout=60) as answer:
            calls = [len(answer.read())]
        calls += [len(fetch(f"{base}/api/v2/{path}", auth)) for path in PAGE_API_CALLS]
        print(f"first load: {len(PAGE_FILES)} requests, {sum(page)} bytes (HTML {page[0]}, CSS {page[1]}, "
              f"JS {page[2]}); then {len(calls)} API calls, {sum(calls)} bytes on an empty tailnet")
        t0 = time.monotonic()
        clients, _ = await tsclient.join_fleet("127.0.0.1", server.port, node_key, args.nodes, timeout=180)
        join_s = time.monotonic() - t0
        await settle(clients)
        loop = asyncio.get_running_loop()
        url = f"{base}/api/v2/tailnet/-/devices?fields=all"
        times, size = [], 0
        for _ in range(args.repeat):
            started = time.perf_counter()
            body = await loop.run_in_executor(None, fetch, url, auth)
            times.append((time.perf_counter() - started) * 1000)
            size = len(body)
        assert len(json.loads(body)["devices"]) == args.nodes
        times.sort()
        print(f"list devices at {args.nodes} nodes: median {statistics.median(times):.1f} ms, "
              f"p95 {times[int(len(times) * 0.95) - 1]:.1f} ms, {size} bytes (joined in {join_s:.1f} s)")
        return {"page_requests": len(PAGE_FILES), "page_bytes": sum(page), "html_bytes": page[0],
                "css_bytes": page[1], "js_bytes": page[2], "api_calls_after_sign_in": len(calls),
                "api_bytes_empty_tailnet": sum(calls), "nodes": args.nodes,
                "list_devices_median_ms": round(statistics.median(times), 1),
                "list_devices_p95_ms": round(times[int(len(times) * 0.95) - 1], 1), "list_devices_bytes": size}
    finally:
        for client in clients:
            await client.close()
        server.stop()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        summary = asyncio.run(run(args, os.path.join(tmp, "state")))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
