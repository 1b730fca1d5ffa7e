"""Faults: meshbox killed, its disk full or read-only, many nodes, stalled clients.

meshbox runs as its own process (tests/meshproc.py) so it can be killed with
SIGKILL; simulated nodes (tests/tsclient.py) reconnect by themselves the way
stock clients do.  Tests that need root (mounts, namespaces) skip otherwise.
"""

import asyncio
import base64
import contextlib
import json
import os
import sqlite3
import subprocess
import time

import pytest

import meshbox
import meshproc
import tsclient

NEEDS_ROOT = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to mount a small or read-only filesystem")


def durable_state(state_dir):
    """Nodes (identity, addresses, routes) and keys as stored, read without the server."""
    db = sqlite3.connect(os.path.join(str(state_dir), "meshbox.db"))
    try:
        nodes = db.execute("SELECT id, machine_key, node_key, ipv4, ipv6, approved_routes, auth_key_id"
                           " FROM nodes ORDER BY id").fetchall()
        keys = db.execute("SELECT id, hash, used, revoked FROM preauth_keys ORDER BY id").fetchall()
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        db.close()
    return nodes, keys


async def until_all(clients, predicate, timeout):
    """Wait until predicate(client) holds for every client."""
    async with asyncio.timeout(timeout):
        while not all(predicate(c) for c in clients):
            await asyncio.sleep(0.1)


# ---- kill -9 ----

def test_kill9_with_50_nodes_and_a_registration_burst(tmp_path):
    state = tmp_path / "state"
    key = meshproc.auth_key(str(state))
    burst_keys = [meshproc.auth_key(str(state), reusable=False) for _ in range(24)]
    server = meshproc.MeshboxProcess(state, log_path=str(tmp_path / "meshbox.log"))

    async def main():
        server.start()
        clients, firsts = await tsclient.join_fleet("127.0.0.1", server.port, key, 50, timeout=60)
        identity = {c.hostname: (f["Node"]["ID"], f["Node"]["Addresses"]) for c, f in zip(clients, firsts)}
        # A subnet router whose route the admin approved: it must survive too.
        router = tsclient.ControlClient("127.0.0.1", server.port, "router")
        router.hostinfo_extra = {"RoutableIPs": ["198.51.100.0/24"]}
        firsts.append(await router.join(key))
        clients.append(router)
        identity[router.hostname] = (firsts[-1]["Node"]["ID"], firsts[-1]["Node"]["Addresses"])
        await asyncio.to_thread(meshproc.cli, "routes", "approve", "router", "198.51.100.0/24", state=state,
                                check=True)
        before_nodes, before_keys = durable_state(state)
        assert json.loads(before_nodes[-1][5]) == ["198.51.100.0/24"]

        rejoined = {}
        keepers = [asyncio.ensure_future(c.stay_connected(
            on_rejoin=lambda first, c=c: rejoined.__setitem__(c.hostname, first))) for c in clients]

        # A burst of fresh registrations, each with its own single-use key;
        # the server dies in the middle of it.
        answered = {}

        async def register(i, secret):
            client = tsclient.ControlClient("127.0.0.1", server.port, f"burst{i}")
            try:
                await client.connect(5)
                answered[i] = (client, await client.register(secret, timeout=5))
            except (OSError, ConnectionError, TimeoutError, AssertionError, asyncio.IncompleteReadError):
                await client.close()

        burst = [asyncio.ensure_future(register(i, k)) for i, k in enumerate(burst_keys)]
        async with asyncio.timeout(10):      # kill once a few have been answered
            while len(answered) < 3:
                await asyncio.sleep(0.005)
        server.kill()
        await asyncio.gather(*burst)

        after_nodes, after_keys = durable_state(state)
        spent = sum(k[2] for k in after_keys[1:])
        print(f"burst: {len(answered)} of {len(burst_keys)} answered, {spent} keys spent at the kill")
        assert len(answered) < len(burst_keys)     # the kill did interrupt the burst
        # Nothing that existed before the kill is lost or changed.
        assert [n for n in after_nodes if n[0] in {b[0] for b in before_nodes}] == before_nodes
        reusable = before_keys[0]
        assert [k[:2] + k[3:] for k in after_keys if k[0] == reusable[0]] == [reusable[:2] + reusable[3:]]
        # Each registration in flight either happened fully (key spent, node
        # stored with addresses) or not at all (key unspent, no node).
        by_key = {n[6]: n for n in after_nodes}
        for key_id, _, used, _ in after_keys:
            if key_id == reusable[0]:
                continue
            node = by_key.get(key_id)
            assert bool(used) == (node is not None), (key_id, used, node)
            if node:
                assert node[3].startswith("100.64.") and node[4].startswith("fd7a:")
        # Every registration the client heard succeed is stored.
        stored_machines = {n[1] for n in after_nodes}
        for client, response in answered.values():
            if response.get("MachineAuthorized"):
                assert meshbox.x25519_public(client.machine_private) in stored_machines
            await client.close()

        server.start()
        await until_all(clients, lambda c: c.hostname in rejoined, 60)
        for c in clients:
            first = rejoined[c.hostname]
            assert (first["Node"]["ID"], first["Node"]["Addresses"]) == identity[c.hostname]
            assert len(first["Peers"]) >= 50
        assert durable_state(state)[0][:len(before_nodes)] == before_nodes
        for task in keepers:
            task.cancel()
        for c in clients:
            await c.close()

    try:
        asyncio.run(main())
    finally:
        server.stop()


# ---- state disk full or read-only ----

@contextlib.contextmanager
def mounted(*argv_before_dir, path):
    """mount ... path for the duration; unmounted (lazily if busy) afterwards."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", *argv_before_dir, str(path)], check=True, capture_output=True, timeout=30)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30)


def fill(path):
    """Write a file until the filesystem is full; returns its path."""
    filler = path / "filler"
    chunk = b"\0" * (64 << 10)
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(chunk)
                f.flush()
        except OSError:
            pass
    return filler


async def register_until_refused(port, key, names, timeout=5):
    """Register fresh nodes until one gets an error; returns (accepted names, the error text)."""
    accepted = []
    for name in names:
        client = tsclient.ControlClient("127.0.0.1", port, name)
        try:
            await client.connect(timeout)
            status, body = await client.request("/machine/register", client.register_request(key), timeout)
        finally:
            await client.close()
        if status == 200 and json.loads(body).get("MachineAuthorized"):
            accepted.append(name)
        else:
            return accepted, f"{status} {body.decode(errors='replace')}"
    return accepted, None


async def state_fault_scenario(server, key, state, make_fault, clear_fault):
    """Nodes keep being served through a state fault; new registrations get a
    clear error and nothing partial is stored; all works again once it clears."""
    server.start()
    steady, _ = await tsclient.join_fleet("127.0.0.1", server.port, key, 3, timeout=20)
    before_nodes, _ = durable_state(state)
    make_fault()
    try:
        accepted, error = await register_until_refused(server.port, key, [f"late{i}" for i in range(40)])
        assert error is not None, "no registration failed while the state could not be written"
        assert error.startswith("503") and "state database" in error, error
        assert server.running()
        # Connected nodes are still served: an endpoint change reaches the others.
        await steady[0].update_endpoints(["203.0.113.9:41641"])
        _, message = await steady[1].map_message_where(
            lambda m: any(p["Endpoints"] == ["203.0.113.9:41641"] for p in m.get("PeersChanged", ())), 5)
    finally:
        clear_fault()
    client = tsclient.ControlClient("127.0.0.1", server.port, "after")
    first = await client.join(key)
    assert first["Node"]["Addresses"]
    await client.close()
    for c in steady:
        await c.close()
    server.stop()
    after_nodes, _ = durable_state(state)
    assert after_nodes[:len(before_nodes)] == before_nodes
    names = {n[0] for n in after_nodes}
    assert len(after_nodes) == len(before_nodes) + len(accepted) + 1, (len(after_nodes), accepted)
    return error, names


@NEEDS_ROOT
def test_state_disk_full(tmp_path):
    with mounted("-t", "tmpfs", "-o", "size=4m", "tmpfs", path=tmp_path / "small") as small:
        state = small / "state"
        key = meshproc.auth_key(str(state))
        server = meshproc.MeshboxProcess(state, log_path=str(tmp_path / "meshbox.log"))
        filler = []
        try:
            error, _ = asyncio.run(state_fault_scenario(
                server, key, state, lambda: filler.append(fill(small)), lambda: filler[0].unlink()))
            assert "full" in server.log_text()
        finally:
            server.stop()


@NEEDS_ROOT
def test_state_read_only(tmp_path):
    state = tmp_path / "state"
    key = meshproc.auth_key(str(state))
    server = meshproc.MeshboxProcess(state, log_path=str(tmp_path / "meshbox.log"))
    # While running: the database and its journal refuse writes (chattr +i:
    # EPERM, as a filesystem gone read-only under an open file gives EROFS).
    # A bind mount cannot be remounted read-only while the server holds
    # files open for writing, so that case is the next start's.
    journal = [state / "meshbox.db", state / "meshbox.db-wal"]

    def immutable(flag):
        for path in journal:
            subprocess.run(["chattr", flag, str(path)], check=True, timeout=10)

    try:
        asyncio.run(state_fault_scenario(server, key, state, lambda: immutable("+i"), lambda: immutable("-i")))
    finally:
        subprocess.run(["chattr", "-i", *map(str, journal)], capture_output=True, timeout=10)
        server.stop()
    before = durable_state(state)
    with mounted("--bind", str(state), path=state):
        subprocess.run(["mount", "-o", "remount,ro,bind", str(state)], check=True, capture_output=True, timeout=30)
        refused = subprocess.run(server.argv(), capture_output=True, text=True, timeout=30)
        assert refused.returncode != 0
        assert "Traceback" not in refused.stderr, refused.stderr[-2000:]
        assert "cannot open state database" in refused.stderr and str(state) in refused.stderr
    server.start()            # writable again: it serves, and nothing was lost
    try:
        async def rejoin():
            client = tsclient.ControlClient("127.0.0.1", server.port, "after-ro")
            await client.join(key)
            await client.close()
        asyncio.run(rejoin())
    finally:
        server.stop()
    assert durable_state(state)[0][:len(before[0])] == before[0]


# ---- many nodes, slow clients ----

def test_thousand_nodes_connect_within_60s(tmp_path):
    state = tmp_path / "state"
    key = meshproc.auth_key(str(state))
    server = meshproc.MeshboxProcess(state, log_path=str(tmp_path / "meshbox.log"),
                                     extra_args=["--log-level", "warning"])

    async def main():
        server.start()
        started = time.monotonic()
        async with asyncio.timeout(60):
            clients, firsts = await tsclient.join_fleet("127.0.0.1", server.port, key, 1000, concurrency=32,
                                                        timeout=60)
        print(f"1000 nodes joined in {time.monotonic() - started:.1f} s")
        try:
            assert len({f["Node"]["ID"] for f in firsts}) == 1000
            assert all(c.connected for c in clients)
            assert "ERROR" not in server.log_text() and "Traceback" not in server.log_text()
        finally:
            for c in clients:
                await c.close()

    try:
        asyncio.run(main())
    finally:
        server.stop()


UPDATES = 120
MOVERS = 5              # nodes that move in each round...
MOVER_POOL = UPDATES * MOVERS // meshbox.NODE_CHANGE_BURST     # ...taken in turn, so none moves past its burst


def test_stalled_client_holds_up_nobody_and_stays_bounded(tmp_path):
    state = tmp_path / "state"
    key = meshproc.auth_key(str(state))
    server = meshproc.MeshboxProcess(state, log_path=str(tmp_path / "meshbox.log"))

    async def main():
        server.start()
        clients, _ = await tsclient.join_fleet("127.0.0.1", server.port, key, 1 + MOVER_POOL + 8, timeout=30)
        stalled, movers, watchers = clients[0], clients[1:1 + MOVER_POOL], clients[1 + MOVER_POOL:]
        # The stalled client grants the server a huge HTTP/2 window, then stops reading.
        stalled.h2.increment_flow_control_window(2**31 - 1 - 65535)
        stalled.h2.increment_flow_control_window(2**31 - 1 - 65535, stalled.map_stream.stream_id)
        stalled.flush()
        stalled.reader_task.cancel()
        stalled.writer.transport.pause_reading()
        rss_before = server.rss_mb()
        # Big Hostinfo makes each update to the stalled client big: SSH host
        # keys (a field peers get), near the Hostinfo cap, random so that zstd
        # keeps about 11 kB of each mover's, 56 kB a round.
        host_keys = [[base64.b64encode(os.urandom(740)).decode() for _ in range(meshbox.HOSTINFO_MAX_HOST_KEYS - 1)]
                     for _ in movers]
        latencies = []
        for i in range(UPDATES):
            for j in range(MOVERS):
                m = (i * MOVERS + j) % MOVER_POOL
                movers[m].hostinfo_extra = {"sshHostKeys": [f"{i} {k}" for k in host_keys[m]]}
                new = [f"198.51.100.{m + 1}:{1000 + i}"]
                if j == 0:
                    t0 = time.monotonic()
                await movers[m].update_endpoints(new)
            arrivals = await asyncio.gather(*(w.map_message_where(
                lambda msg: any(p["Endpoints"] == new for p in msg.get("PeersChanged", ())), 5) for w in watchers))
            latencies.append(max(a for a, _ in arrivals) - t0)
        latencies.sort()
        await asyncio.sleep(0.5)
        growth = server.rss_mb() - rss_before
        print(f"updates to 8 watchers: median {latencies[UPDATES // 2] * 1000:.0f} ms, worst {latencies[-1] * 1000:.0f} ms; "
              f"server RSS grew {growth:.1f} MiB with a stalled client")
        assert latencies[-1] < 2.0
        assert growth < 4       # queued without bound, the stalled client's updates would take 6.7 MB
        for c in clients:
            await c.close()

    try:
        asyncio.run(main())
    finally:
        server.stop()
