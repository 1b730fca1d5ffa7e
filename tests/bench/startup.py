"""Time from process start to accepting connections (a benchmark, not a test).

    python3 tests/bench/startup.py [--runs 5] [--stored-nodes 1000]

Starts ``meshbox.py serve`` (DERP and STUN on loopback too, as deployed)
and polls its control port every 2 ms.  The first start creates the state
(database, server keys, DERP certificate); later starts open it.  With
--stored-nodes the store holds that many nodes first, so the start includes
loading them and compiling the policy.  Prints a line per case, then a JSON
summary as the last line; ready_s is the median warm start, empty store.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

import meshbox  # noqa: E402
import meshproc  # noqa: E402


def store_nodes(state_dir, count):
    """Insert count registered nodes straight into the store."""
    meshproc.auth_key(state_dir)
    store = meshbox.Store(os.path.join(state_dir, "meshbox.db"))
    user = store.user_named("alice")
    with store.transaction():
        for i in range(1, count + 1):
            node = meshbox.Node(
                id=0, machine_key=os.urandom(32), node_key=os.urandom(32), disco_key=os.urandom(32),
                user_id=user.id, hostname=f"stored{i}", given_name=f"stored{i}",
                ipv4=f"100.64.{i // 250}.{i % 250 + 1}", ipv6=f"fd7a:115c:a1e0::{i:x}", tags=[],
                ephemeral=False, auth_key_id=None, expiry=None, created=meshbox.now(), last_seen=meshbox.now(),
                hostinfo={"Hostname": f"stored{i}", "OS": "linux"}, endpoints=["192.0.2.1:41641"],
                approved_routes=[], cap=130)
            store.insert_node(node)
    store.db.close()


def start_times(state_dir, runs):
    """Seconds to ready for each run against state_dir (the first may create it)."""
    times = []
    for _ in range(runs):
        server = meshproc.MeshboxProcess(state_dir, derp_port=meshproc.free_port(),
                                         log_path=os.path.join(os.path.dirname(state_dir), "meshbox.log"),
                                         extra_args=["--log-level", "warning"])
        try:
            times.append(server.start(timeout=120))
        finally:
            server.stop()
    return times


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--stored-nodes", type=int, default=1000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        empty = start_times(os.path.join(tmp, "empty"), args.runs + 1)
        result = {"ready_s": round(statistics.median(empty[1:]), 3), "first_start_s": round(empty[0], 3),
                  "runs": args.runs}
        print(f"first start {result['first_start_s']} s, warm start (median of {args.runs}) {result['ready_s']} s")
        if args.stored_nodes:
            state = os.path.join(tmp, "full")
            store_nodes(state, args.stored_nodes)
            full = start_times(state, args.runs)
            result["stored_nodes"] = args.stored_nodes
            result["ready_s_with_nodes"] = round(statistics.median(full), 3)
            print(f"with {args.stored_nodes} stored nodes: {result['ready_s_with_nodes']} s")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
