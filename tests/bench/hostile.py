"""Good nodes beside an attacker on loopback (a benchmark, not a test).

    python3 tests/bench/hostile.py [--nodes 200] [--seconds 60] [--attacks keyless,idle,...]

Four processes.  meshbox, with its default limits, serves control and
DERP-TLS on loopback.  The fleet (--nodes simulated nodes, tests/tsclient.py)
joins, keeps its map sessions and, while the attack lasts, makes endpoint
changes at a steady rate, timing until every other good node sees each one
(as fanout.py does).  The attacker runs the chosen ATTACKS together for
--seconds from its own loopback address (--attacker-source), each bounded in
count and rate, and counts what became of them.
The bench itself starts the three, samples the server's RSS from /proc, and
kills the server past --rss-ceiling, as a router's OOM killer would.

A good node lost its session when its map stream closed, or when it went
LOST_AFTER seconds without a map message other than a keep-alive while
changes flowed (a silent stream, which a stock client does not notice).
After a close it rejoins as a stock client does, a bounded number of times.
One new node joins halfway through the attack and one after it.  A change
that a node did not see within CHANGE_TIMEOUT counts as missed, and at that
latency in the percentiles.  Prints a table, then a JSON summary as the last
line.
"""

import argparse
import asyncio
import base64
import collections
import gc
import json
import os
import random
import secrets
import ssl
import struct
import sys
import tempfile
import time
import urllib.parse

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))
sys.path.insert(0, HERE)

import derpclient  # noqa: E402
import meshbox  # noqa: E402
import meshproc  # noqa: E402
import tsclient  # noqa: E402
from fanout import percentile  # noqa: E402

HOST = "127.0.0.1"
CHANGES_PER_SECOND = 2.0
CHANGE_TIMEOUT = 10.0     # seconds: a change not seen by then is missed
LOST_AFTER = 10.0         # seconds without a map message, while changes flow, that make a session lost
REJOIN_ATTEMPTS = 20
UPDATES_IN_FLIGHT = 20    # endpoint updates waiting for an answer; more are skipped, not queued
NETWORK_TIMEOUT = 10.0    # every connect, request and read of both sides
SAMPLE_INTERVAL = 0.25    # seconds between RSS samples
TIMELINE_STEP = 5.0       # seconds between the RSS figures printed
JOIN_TIMEOUT = 120.0

# Each attack: what it does, and its bounds (rates per second, counts in total).
ATTACKS = {
    "keyless": "interactive logins from new machine keys, each with a Hostinfo near the 1 MiB body limit",
    "wrongkey": "registrations with wrong pre-auth keys, first the displayed prefix of a real one",
    "idle": "connections left silent: raw to the control and DERP-TLS ports, "
            "upgraded to ts2021 and never registering, upgraded to DERP and never sending ClientInfo",
    "slowhead": "request heads sent one byte per second",
    "bighead": "request heads of 64 headers of 60 KiB",
    "pingflood": "WebSocket pings of 64 KiB on /derp and /ts2021 upgrades, pongs never read",
    "hostinfo": "a registered node sending malformed Hostinfo and map requests",
    "derpkeys": "DERP clients with random keys, sending to random keys",
}
KEYLESS_RATE, KEYLESS_COUNT, KEYLESS_IN_FLIGHT = 5, 300, 8
KEYLESS_BODY = 1_000_000           # bytes of RegisterRequest (the limit is MAX_REQUEST_BODY, 1 MiB)
WRONGKEY_RATE, WRONGKEY_COUNT, WRONGKEY_MACHINES = 50, 3000, 4
IDLE_RATE = 400                    # connections opened per second, all kinds together
IDLE_KINDS = {"control_silent": 1200, "tls_silent": 500, "ts2021_upgraded": 400, "derp_upgraded": 300}
IDLE_REOPENS = 3                   # a slot the server closes is opened again, at most this many times
SLOWHEAD_SLOTS, SLOWHEAD_RATE, SLOWHEAD_OPENS = 200, 20, 1000
BIGHEAD_RATE, BIGHEAD_COUNT, BIGHEAD_IN_FLIGHT = 2, 120, 4
PINGFLOOD_CONNECTIONS = {"derp": 2, "ts2021": 2}
PINGFLOOD_SIZE, PINGFLOOD_RATE, PINGFLOOD_RECONNECTS = 65535, 16, 3   # rate: pings per second per connection
HOSTINFO_RATE, HOSTINFO_COUNT, HOSTINFO_RECONNECTS = 2, 120, 20
DERPKEYS_CLIENTS, DERPKEYS_RATE, DERPKEYS_SEND_INTERVAL = 300, 20, 2.0


# Hostinfo shapes a hostile node sends (tailcfg.Hostinfo's fields with the
# wrong types or sizes); a str is sent as raw JSON text.
BAD_HOSTINFOS = {
    "netinfo_list": {"NetInfo": [1]},
    "netinfo_fields": {"NetInfo": {"PreferredDERP": "900", "DERPLatency": [1], "MappingVariesByDestIP": "yes"}},
    "services_huge": {"Services": [{"Proto": "tcp", "Port": p, "Description": "s" * 40} for p in range(12000)]},
    "services_shape": {"Services": {"Proto": 1}},
    "hostname_control": {"Hostname": "evil\nlevel=error msg=\"forged line\" \x1b[31mred\x1b[0m"},
    "hostname_long": {"Hostname": "h" * 200_000},
    "routable_ips_text": {"RoutableIPs": "0.0.0.0/0"},
    "request_tags_object": {"RequestTags": {"tag:x": 1}},
    "wrong_types": {"OS": 5, "OSVersion": [], "IPNVersion": {}, "ShieldsUp": "no", "Userspace": 1},
    "not_an_object": [],
    "deep_nesting": '{"Hostname": "deep", "Services": %s%s}' % ("[" * 100_000, "]" * 100_000),
}
BAD_ENDPOINTS = {"endpoints_huge": ["192.0.2.%d:%d" % (i % 250 + 1, 1024 + i) for i in range(20000)],
                 "endpoints_shape": [{"IP": 1}, 5, None]}


class Pace:
    """At most `rate` starts per second, shared by the tasks of one attack."""

    def __init__(self, rate):
        self.interval, self.next = 1 / rate, time.monotonic()

    async def wait(self):
        at = max(self.next, time.monotonic())
        self.next = at + self.interval
        await asyncio.sleep(at - time.monotonic())


async def until(deadline, awaitable):
    """awaitable, cut off at the deadline (TimeoutError)."""
    async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
        return await awaitable


# ---- The fleet: good nodes ----

class Change:
    __slots__ = ("t0", "mover", "seen", "ok")

    def __init__(self, mover):
        self.t0, self.mover, self.seen, self.ok = time.monotonic(), mover, {}, False


class Fleet:
    """Good nodes' sessions and the changes they make and see."""

    def __init__(self, clients, ids, auth_key):
        self.clients, self.ids, self.auth_key = clients, ids, auth_key
        self.changes = {}                      # (node ID, endpoints) -> Change
        self.last_message = [time.monotonic()] * len(clients)
        self.closed, self.silent, self.rejoined = set(), set(), set()
        self.rejoin_failures = 0
        self.update_errors = collections.Counter()
        self.changing = False
        self.over = False

    def saw(self, index, arrival, message):
        """Note which changes a map message carries for good node `index`."""
        entries = [(p.get("ID"), p.get("Endpoints")) for p in
                   (message.get("Peers") or []) + (message.get("PeersChanged") or [])]
        entries += [(p.get("NodeID"), p.get("Endpoints")) for p in message.get("PeersChangedPatch") or ()]
        for node_id, endpoints in entries:
            change = self.changes.get((node_id, tuple(endpoints or ())))
            if change is not None:
                change.seen.setdefault(index, arrival)

    async def watch(self, index):
        """Read one good node's map stream until the run is over; rejoin after a close."""
        client = self.clients[index]
        while not self.over:
            try:
                arrival, frame = await asyncio.wait_for(client.next_map_frame(), 1.0)
            except TimeoutError:
                if self.changing and time.monotonic() - self.last_message[index] > LOST_AFTER:
                    self.silent.add(index)
                continue
            except ConnectionError:
                self.closed.add(index)
                await self.rejoin(index)
                continue
            message = tsclient.decode_map_frame(frame)
            if message != {"KeepAlive": True}:     # keep-alives alone do not make a live session
                self.last_message[index] = arrival
            self.saw(index, arrival, message)

    async def rejoin(self, index):
        client = self.clients[index]
        delay = 0.1
        for _ in range(REJOIN_ATTEMPTS):
            if self.over:
                return
            await asyncio.sleep(delay * (0.5 + random.random()))
            try:
                first = await client.rejoin(self.auth_key, NETWORK_TIMEOUT)
            except (OSError, ConnectionError, TimeoutError, AssertionError, ValueError, meshbox.NoiseError,
                    asyncio.IncompleteReadError):
                delay = min(delay * 2, 2.0)
                continue
            self.rejoined.add(index)
            self.last_message[index] = time.monotonic()
            self.saw(index, time.monotonic(), first)
            return
        self.rejoin_failures += 1
        await asyncio.sleep(1.0)      # the stream stays ended: do not spin

    async def update(self, change, endpoints):
        try:
            await self.clients[change.mover].update_endpoints(endpoints, NETWORK_TIMEOUT)
            change.ok = True
        except (OSError, ConnectionError, TimeoutError, meshbox.NoiseError) as e:
            self.update_errors[type(e).__name__] += 1

    async def make_changes(self, seconds):
        """Endpoint changes at CHANGES_PER_SECOND, from each good node in turn."""
        start, in_flight = time.monotonic(), set()
        for n in range(int(seconds * CHANGES_PER_SECOND)):
            await asyncio.sleep(max(0.0, start + n / CHANGES_PER_SECOND - time.monotonic()))
            if len(in_flight) >= UPDATES_IN_FLIGHT:
                self.update_errors["skipped"] += 1
                continue
            change = Change(n % len(self.clients))
            endpoints = [f"198.51.100.{1 + n % 250}:{1024 + n}"]
            self.changes[(self.ids[change.mover], tuple(endpoints))] = change
            task = asyncio.ensure_future(self.update(change, endpoints))
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
        await asyncio.gather(*in_flight)

    def all_seen(self):
        return all(len(c.seen) >= len(self.clients) - 1 for c in self.changes.values() if c.ok)

    def latencies(self):
        """Seconds from each change until each other good node saw it; missed ones at CHANGE_TIMEOUT."""
        out, missed = [], 0
        for change in self.changes.values():
            if not change.ok:
                continue
            for index in range(len(self.clients)):
                if index == change.mover:
                    continue
                seen = change.seen.get(index)
                if seen is None or seen - change.t0 > CHANGE_TIMEOUT:
                    missed += 1
                    out.append(CHANGE_TIMEOUT)
                else:
                    out.append(max(0.0, seen - change.t0))
        return out, missed


async def one_join(port, auth_key, hostname):
    """Whether a new node can join now, and how long it took."""
    client = tsclient.ControlClient(HOST, port, hostname)
    t0 = time.monotonic()
    try:
        await client.join(auth_key, NETWORK_TIMEOUT)
        return {"ok": True, "s": round(time.monotonic() - t0, 2)}
    except (OSError, ConnectionError, TimeoutError, AssertionError, ValueError, meshbox.NoiseError,
            asyncio.IncompleteReadError) as e:
        return {"ok": False, "s": round(time.monotonic() - t0, 2), "error": f"{type(e).__name__}: {e}"[:200]}
    finally:
        await client.close()


async def run_fleet(spec):
    t0 = time.monotonic()
    clients, firsts = await tsclient.join_fleet(HOST, spec["port"], spec["auth_key"], spec["nodes"],
                                                timeout=JOIN_TIMEOUT)
    fleet = Fleet(clients, [f["Node"]["ID"] for f in firsts], spec["auth_key"])
    watchers = [asyncio.ensure_future(fleet.watch(i)) for i in range(len(clients))]
    # The fleet's own garbage collector would pause every node's reading at once.
    gc.collect()
    gc.freeze()
    print(json.dumps({"joined": len(clients), "join_s": round(time.monotonic() - t0, 1)}), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)   # "go"
    fleet.last_message = [time.monotonic()] * len(clients)
    fleet.changing = True
    seconds = spec["seconds"]
    changes = asyncio.ensure_future(fleet.make_changes(seconds))
    await asyncio.sleep(seconds / 2)
    join_during = await one_join(spec["port"], spec["auth_key"], "joined-during-attack")
    await changes
    fleet.changing = False
    deadline = time.monotonic() + CHANGE_TIMEOUT
    while not fleet.all_seen() and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    fleet.over = True
    await asyncio.gather(*watchers)
    await asyncio.sleep(spec["settle"])      # the attacker has closed its connections by now
    join_after = await one_join(spec["port"], spec["auth_key"], "joined-after-attack")
    for c in clients:
        await c.close()
    latencies, missed = fleet.latencies()
    ms = [x * 1000 for x in latencies] or [0.0]
    print(json.dumps({
        "changes": sum(c.ok for c in fleet.changes.values()), "update_errors": dict(fleet.update_errors),
        "p50_ms": round(percentile(ms, 50), 1), "p99_ms": round(percentile(ms, 99), 1),
        "max_ms": round(max(ms), 1), "missed": missed,
        "sessions_lost": len(fleet.closed | fleet.silent), "closed": len(fleet.closed),
        "silent": len(fleet.silent), "rejoined": len(fleet.rejoined),
        "not_back": len(fleet.closed - fleet.rejoined), "rejoin_failures": fleet.rejoin_failures,
        "join_during_attack": join_during, "join_after_attack": join_after}), flush=True)


# ---- The attacker ----

async def open_tcp(port, counters, ssl_context=None):
    """A connection, or None (counted) when the server does not take it."""
    try:
        return await asyncio.wait_for(asyncio.open_connection(
            HOST, port, ssl=ssl_context, server_hostname=HOST if ssl_context else None), NETWORK_TIMEOUT)
    except (OSError, TimeoutError, ssl.SSLError) as e:
        counters["connect_errors" if not isinstance(e, TimeoutError) else "connect_timeouts"] += 1
        return None


async def held_until_closed(reader, deadline):
    """Read and drop until the server closes (returns what it sent first) or the deadline (None)."""
    first = b""
    try:
        async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
            while True:
                data = await reader.read(65536)
                if not data:
                    return first or b"(closed)"
                first = first or data[:64]
    except TimeoutError:
        return None
    except (OSError, ssl.SSLError):
        return first or b"(reset)"


def count_end(counters, answer):
    """Count how a held connection ended: still open, turned away at the limit, or closed by the server."""
    if answer is None:
        counters["open_at_end"] += 1
    elif answer.startswith(b"HTTP/1.1 503"):
        counters["refused"] += 1
    else:
        counters["closed_by_server"] += 1


def masked_ws_frame(opcode, payload):
    """A client's frame (masked, as RFC 6455 requires of clients)."""
    mask = secrets.token_bytes(4)
    n = len(payload)
    head = struct.pack(">BB", 0x80 | opcode, 0x80 | n) if n < 126 else (
        struct.pack(">BBH", 0x80 | opcode, 0x80 | 126, n) if n < 65536 else
        struct.pack(">BBQ", 0x80 | opcode, 0x80 | 127, n))
    masked = (int.from_bytes(payload, "big") ^ int.from_bytes(mask * (n // 4 + 1), "big") >> (8 * (-n % 4))
              ).to_bytes(n, "big")
    return head + mask + masked


def websocket_request(path, protocol):
    key = base64.b64encode(secrets.token_bytes(16)).decode()
    return (f"GET {path} HTTP/1.1\r\nHost: {HOST}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
            f"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Protocol: {protocol}\r\n\r\n"
            ).encode()


async def guarded(counters, awaitable):
    """One connection's part of an attack: an unexpected error is counted, not fatal to the others."""
    try:
        await awaitable
    except Exception as e:
        counters["crashed_" + type(e).__name__] += 1


class Attacker:
    """The attacks of one run, each a method named as in ATTACKS, and their counters."""

    def __init__(self, spec):
        self.spec = spec
        self.port, self.derp_port = spec["port"], spec["derp_port"]
        self.deadline = time.monotonic() + spec["seconds"]
        # One Counter per attack; idle has one per kind of connection.
        self.counters = {name: {kind: collections.Counter() for kind in IDLE_KINDS} if name == "idle"
                         else collections.Counter() for name in spec["attacks"]}
        self.server_public = None

    def time_left(self):
        return time.monotonic() < self.deadline

    async def noise_client(self, hostname, counters):
        """A ControlClient with its Noise channel up, or None (counted)."""
        client = tsclient.ControlClient(HOST, self.port, hostname)
        try:
            await client.connect(NETWORK_TIMEOUT, self.server_public)
            return client
        except (OSError, ConnectionError, TimeoutError, ValueError, meshbox.NoiseError,
                asyncio.IncompleteReadError) as e:
            counters["refused" if "503" in str(e) else "connect_errors"] += 1
            await client.close()
            return None

    async def keyless(self, counters):
        extra = KEYLESS_BODY - len(json.dumps(tsclient.ControlClient(HOST, 0).register_request(None)))
        service = {"Proto": "tcp", "Port": 65535, "Description": "d" * 20}
        services = [{**service, "Port": p} for p in range(extra // (len(json.dumps(service)) + 2))]
        pace, gate = Pace(KEYLESS_RATE), asyncio.Semaphore(KEYLESS_IN_FLIGHT)

        async def login(i):
            async with gate:
                client = await self.noise_client(f"stranger{i}", counters)
                if client is None:
                    return
                client.hostinfo_extra = {"Services": services}
                try:
                    status, body = await client.request("/machine/register", client.register_request(None),
                                                        NETWORK_TIMEOUT)
                    answer = json.loads(body) if status == 200 else {}
                    counters["login_pending" if answer.get("AuthURL") else "refused"] += 1
                except (OSError, ConnectionError, TimeoutError, ValueError) as e:
                    counters["errors_" + type(e).__name__] += 1
                finally:
                    await client.close()

        tasks = []
        for i in range(KEYLESS_COUNT):
            await pace.wait()
            if not self.time_left():
                break
            counters["sent"] += 1
            tasks.append(asyncio.ensure_future(guarded(counters, login(i))))
        await asyncio.gather(*tasks)

    async def wrongkey(self, counters):
        pace = Pace(WRONGKEY_RATE)
        prefix = self.spec["displayed_prefix"]

        async def machine(m):
            client, guesses = None, 0
            while self.time_left() and counters["sent"] < WRONGKEY_COUNT:
                if client is None or not client.connected:
                    if client is not None:
                        await client.close()
                    client = await self.noise_client(f"guesser{m}", counters)
                    if client is None:
                        await asyncio.sleep(1.0)
                        continue
                await pace.wait()
                secret = prefix if guesses == 0 else meshbox.PREAUTH_KEY_PREFIX + secrets.token_hex(24)
                guesses += 1
                counters["sent"] += 1
                try:
                    status, body = await client.request("/machine/register", client.register_request(secret),
                                                        NETWORK_TIMEOUT)
                    answer = json.loads(body) if status == 200 else {}
                    if answer.get("MachineAuthorized"):
                        counters["registered_by_prefix" if secret == prefix else "registered"] += 1
                    else:
                        counters["refused"] += 1
                except (OSError, ConnectionError, TimeoutError, ValueError) as e:
                    counters["errors_" + type(e).__name__] += 1
            if client is not None:
                await client.close()

        await asyncio.gather(*(guarded(counters, machine(m)) for m in range(WRONGKEY_MACHINES)))

    async def idle(self, counters):
        pace = Pace(IDLE_RATE)

        async def open_one(kind, c):
            """A connection of this kind at the stage where it goes silent: (reader, closer) or None."""
            if kind == "tls_silent":          # a TCP connection to the TLS port: no ClientHello
                conn = await open_tcp(self.derp_port, c)
            elif kind == "control_silent":
                conn = await open_tcp(self.port, c)
            elif kind == "ts2021_upgraded":   # Noise done, HTTP/2 started, never a register request
                client = await self.noise_client("idler", c)
                return client and (client, client.close)
            else:                             # DERP upgraded, ServerKey read, never a ClientInfo
                conn = await open_tcp(self.port, c)
                if conn:
                    conn[1].write(f"GET /derp HTTP/1.1\r\nHost: {HOST}\r\nUpgrade: DERP\r\n"
                                  "Connection: Upgrade\r\n\r\n".encode())
            if conn is None:
                return None
            reader, writer = conn

            async def close():
                writer.close()
            return reader, close

        async def slot(kind):
            c = counters[kind]
            for _ in range(1 + IDLE_REOPENS):
                await pace.wait()
                if not self.time_left():
                    return
                c["attempts"] += 1
                opened = await open_one(kind, c)
                if opened is None:
                    continue
                c["opened"] += 1
                held, close = opened
                if isinstance(held, tsclient.ControlClient):
                    try:
                        await until(self.deadline, asyncio.shield(held.reader_task))
                        c["closed_by_server"] += 1
                    except TimeoutError:
                        c["open_at_end"] += 1
                else:
                    count_end(c, await held_until_closed(held, self.deadline))
                await close()

        await asyncio.gather(*(guarded(counters[kind], slot(kind)) for kind, n in IDLE_KINDS.items() for _ in range(n)))

    async def slowhead(self, counters):
        pace = Pace(SLOWHEAD_RATE)
        head = f"GET / HTTP/1.1\r\nHost: {HOST}\r\nX-Slow: ".encode()

        async def dribble(writer, closed):
            """One byte a second: the head, then its last header's value without end."""
            for i in range(int(self.spec["seconds"]) + 1):
                if closed.done() or not self.time_left():
                    return
                writer.write(head[i:i + 1] if i < len(head) else b"a")
                counters["bytes_sent"] += 1
                await asyncio.sleep(1.0)

        async def slot():
            while self.time_left() and counters["opened"] < SLOWHEAD_OPENS:
                await pace.wait()
                conn = await open_tcp(self.port, counters)
                if conn is None:
                    continue
                counters["opened"] += 1
                reader, writer = conn
                closed = asyncio.ensure_future(held_until_closed(reader, self.deadline))
                await dribble(writer, closed)
                count_end(counters, await closed)
                writer.close()

        await asyncio.gather(*(guarded(counters, slot()) for _ in range(SLOWHEAD_SLOTS)))

    async def bighead(self, counters):
        lines = "".join(f"X-Big-{i}: {'b' * 60 * 1024}\r\n" for i in range(64))
        request = f"GET / HTTP/1.1\r\nHost: {HOST}\r\n{lines}\r\n".encode()
        pace, gate = Pace(BIGHEAD_RATE), asyncio.Semaphore(BIGHEAD_IN_FLIGHT)

        async def one():
            async with gate:
                conn = await open_tcp(self.port, counters)
                if conn is None:
                    return
                reader, writer = conn
                try:
                    writer.write(request)
                    answer = await until(time.monotonic() + NETWORK_TIMEOUT, reader.read(64))
                    counters["answered_" + (answer.split(b" ")[1].decode() if answer else "close")] += 1
                except (OSError, TimeoutError, IndexError) as e:
                    counters["errors_" + type(e).__name__] += 1
                finally:
                    writer.close()

        tasks = []
        for _ in range(BIGHEAD_COUNT):
            await pace.wait()
            if not self.time_left():
                break
            counters["sent"] += 1
            tasks.append(asyncio.ensure_future(guarded(counters, one())))
        await asyncio.gather(*tasks)

    async def pingflood(self, counters):
        ping = masked_ws_frame(meshbox.WS_OP_PING, secrets.token_bytes(PINGFLOOD_SIZE))

        async def upgraded(path):
            """A WebSocket upgrade of /derp or /ts2021, its answer read: (reader, writer) or None."""
            conn = await open_tcp(self.port, counters)
            if conn is None:
                return None
            reader, writer = conn
            if path == "derp":
                writer.write(websocket_request("/derp", "derp"))
            else:
                initiation, _ = meshbox.noise_initiate(meshbox.new_private_key(), self.server_public,
                                                       tsclient.CAPABILITY_VERSION)
                handshake = urllib.parse.quote(base64.b64encode(initiation).decode())
                writer.write(websocket_request(f"/ts2021?X-Tailscale-Handshake={handshake}",
                                               meshbox.CONTROL_UPGRADE))
            try:
                head = await until(time.monotonic() + NETWORK_TIMEOUT, reader.readuntil(b"\r\n\r\n"))
            except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                head = b""
            if not head.startswith(b"HTTP/1.1 101"):
                counters["refused"] += 1
                writer.close()
                return None
            return reader, writer

        async def flood(path):
            pace = Pace(PINGFLOOD_RATE)
            for _ in range(1 + PINGFLOOD_RECONNECTS):
                if not self.time_left():
                    return
                conn = await upgraded(path)
                if conn is None:
                    await asyncio.sleep(1.0)
                    continue
                counters[f"{path}_upgraded"] += 1
                writer = conn[1]
                try:
                    while self.time_left():
                        await pace.wait()
                        writer.write(ping)
                        counters[f"{path}_pings_sent"] += 1
                        t0 = time.monotonic()
                        await until(self.deadline, writer.drain())
                        if time.monotonic() - t0 > 1.0:
                            counters[f"{path}_stalled"] += 1     # the server stopped reading our pings a while
                    counters[f"{path}_open_at_end"] += 1
                    return
                except TimeoutError:
                    counters[f"{path}_stalled_at_end"] += 1
                    return
                except (OSError, ConnectionError):
                    counters[f"{path}_closed_by_server"] += 1
                finally:
                    writer.close()

        await asyncio.gather(*(guarded(counters, flood(path)) for path, n in PINGFLOOD_CONNECTIONS.items()
                               for _ in range(n)))

    async def hostinfo(self, counters):
        """A registered node cycles through bad Hostinfo shapes, in map updates and re-registrations."""
        key = self.spec["hostile_key"]
        client = tsclient.ControlClient(HOST, self.port, "hostile")
        try:
            await client.join(key, NETWORK_TIMEOUT, self.server_public)
        except (OSError, ConnectionError, TimeoutError, AssertionError, ValueError, meshbox.NoiseError) as e:
            counters["join_failed_" + type(e).__name__] += 1
            await client.close()
            return
        shapes = [(name, "Hostinfo", shape) for name, shape in BAD_HOSTINFOS.items()]
        shapes += [(name, "Endpoints", shape) for name, shape in BAD_ENDPOINTS.items()]
        pace, reconnects = Pace(HOSTINFO_RATE), 0
        for n in range(HOSTINFO_COUNT):
            await pace.wait()
            if not self.time_left():
                break
            name, field, shape = shapes[n % len(shapes)]
            path = "/machine/map" if n // len(shapes) % 2 == 0 else "/machine/register"
            body = (client.map_request(stream=False, OmitPeers=True) if path == "/machine/map"
                    else client.register_request(key))
            if isinstance(shape, str):
                text = json.dumps({**body, field: None})
                body = text.replace(f'"{field}": null', f'"{field}": {shape}').encode()
            else:
                body[field] = shape
            counters["sent"] += 1
            try:
                status, answer = await client.request(path, body, NETWORK_TIMEOUT)
                counters["ok" if status == 200 and b'"Error"' not in answer[:200] else "refused"] += 1
            except (OSError, ConnectionError, TimeoutError) as e:
                counters["errors_" + type(e).__name__] += 1
            if not client.connected and reconnects < HOSTINFO_RECONNECTS:
                reconnects += 1
                counters["reconnects"] += 1
                try:
                    await client.rejoin(key, NETWORK_TIMEOUT, self.server_public)
                except (OSError, ConnectionError, TimeoutError, AssertionError, ValueError, meshbox.NoiseError,
                        asyncio.IncompleteReadError):
                    counters["rejoin_failed"] += 1
        await client.close()

    async def derpkeys(self, counters):
        pin = await self.derp_pin(counters)
        if pin is None:
            return
        pace = Pace(DERPKEYS_RATE)

        async def one():
            await pace.wait()
            if not self.time_left():
                return
            try:
                client = await derpclient.DerpClient.connect(HOST, self.derp_port, pin=pin, timeout=NETWORK_TIMEOUT)
            except (OSError, ConnectionError, TimeoutError, ValueError, ssl.SSLError, asyncio.IncompleteReadError,
                    EOFError) as e:
                counters["refused_" + type(e).__name__] += 1
                return
            counters["joined"] += 1
            drained = asyncio.ensure_future(held_until_closed(client.reader, self.deadline))
            try:
                while self.time_left() and not drained.done():
                    await client.send_packet(secrets.token_bytes(32), secrets.token_bytes(100))
                    counters["packets_sent"] += 1
                    await asyncio.wait([drained], timeout=DERPKEYS_SEND_INTERVAL)
            except (OSError, ConnectionError):
                pass
            count_end(counters, await drained)
            client.writer.close()

        await asyncio.gather(*(guarded(counters, one()) for _ in range(DERPKEYS_CLIENTS)))

    async def derp_pin(self, counters):
        """The DERP certificate's pin, as the DERP map gives it to nodes."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        conn = await open_tcp(self.derp_port, counters, context)
        if conn is None:
            return None
        cert = conn[1].get_extra_info("ssl_object").getpeercert(binary_form=True)
        conn[1].close()
        return meshbox.certificate_pin(cert)

    async def run(self):
        """Every attack at once; their counters, and the attacks cut off at the end."""
        self.server_public = await tsclient.fetch_server_key(HOST, self.port, timeout=NETWORK_TIMEOUT)
        attacks = {asyncio.ensure_future(getattr(self, name)(self.counters[name])): name
                   for name in self.spec["attacks"]}
        pending = set()
        if attacks:
            _, pending = await asyncio.wait(attacks, timeout=self.spec["seconds"] + 2 * NETWORK_TIMEOUT)
        else:                      # a baseline: the good nodes alone
            await asyncio.sleep(self.spec["seconds"])
        for task in pending:       # bounded even when the server hangs mid-request
            task.cancel()
        await asyncio.gather(*attacks, return_exceptions=True)
        crashed = {name: f"{type(task.exception()).__name__}: {task.exception()}"[:300]
                   for task, name in attacks.items() if not task.cancelled() and task.exception()}

        def plain(counters):
            if isinstance(counters, collections.Counter):
                return dict(sorted(counters.items()))
            return {kind: plain(c) for kind, c in counters.items()}
        return {"counters": plain(self.counters), "cut_off": sorted(attacks[t] for t in pending), "crashed": crashed}


def connect_from(source):
    """Make every connection this process opens start at source: a stranger has an
    address of its own, and meshbox's per-address limits must not lock the good
    nodes (on 127.0.0.1) out along with the attacker."""
    open_connection = asyncio.open_connection

    async def opened(*args, **kw):
        kw.setdefault("local_addr", (source, 0))
        return await open_connection(*args, **kw)
    asyncio.open_connection = opened


async def run_attacker(spec):
    if spec["source"]:
        connect_from(spec["source"])
    print(json.dumps(await Attacker(spec).run()), flush=True)


# ---- The bench ----

def proc_status(pid):
    """VmRSS and VmHWM of a process in MiB, or None once it has gone."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    out[line[:5]] = int(line.split()[1]) / 1024
    except OSError:
        return None
    return out if len(out) == 2 else None


async def child(role, spec):
    return await asyncio.create_subprocess_exec(
        sys.executable, os.path.abspath(__file__), "--role", role, "--spec", json.dumps(spec),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)


async def last_json_line(proc, timeout):
    """The JSON a child prints last, or an error note if it does not in time."""
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), timeout)
        return json.loads(line) if line else {"error": f"exited with {await proc.wait()} and no report"}
    except TimeoutError:
        proc.kill()
        return {"error": f"no report within {timeout:.0f} s"}


async def run(args, tmp):
    state = os.path.join(tmp, "state")
    auth_key = meshproc.auth_key(state)
    hostile_key = meshproc.auth_key(state, user="mallory")
    server = meshproc.MeshboxProcess(state, derp_port=meshproc.free_port(), log_path=os.path.join(tmp, "meshbox.log"),
                                     extra_args=["--log-level", "warning"],
                                     bytecode_dir=meshproc.compile_bytecode(tmp))
    server.start()
    result = {"nodes": args.nodes, "seconds": args.seconds, "attacks": args.attacks,
              "attacker_source": args.attacker_source or HOST,
              "rss_ceiling_mb": args.rss_ceiling}
    fleet = attacker = None
    try:
        await asyncio.sleep(2.0)
        result["rss_idle_mb"] = round(server.rss_mb(), 1)
        spec = {"port": server.port, "derp_port": server.derp_port, "seconds": args.seconds}
        fleet = await child("fleet", {**spec, "auth_key": auth_key, "nodes": args.nodes, "settle": 2.0})
        joined = await last_json_line(fleet, JOIN_TIMEOUT + 30)
        if "error" in joined:
            raise RuntimeError(f"the good nodes did not join: {joined['error']}")
        result.update(join_s=joined["join_s"], rss_joined_mb=round(server.rss_mb(), 1))
        print(f"{args.nodes} good nodes joined in {joined['join_s']} s; server RSS idle {result['rss_idle_mb']} MiB, "
              f"with the nodes {result['rss_joined_mb']} MiB", flush=True)

        attacker = await child("attacker", {**spec, "attacks": args.attacks, "hostile_key": hostile_key,
                                            "source": args.attacker_source,
                                            "displayed_prefix": auth_key[:14]})
        fleet.stdin.write(b"go\n")
        await fleet.stdin.drain()
        reports = asyncio.gather(last_json_line(attacker, args.seconds + 60),
                                 last_json_line(fleet, args.seconds + 90))
        start, peak, timeline, server_fate = time.monotonic(), 0.0, [], "running"
        while not reports.done():
            status = proc_status(server.pid) if server.running() else None
            at = time.monotonic() - start
            if status is None:
                if server_fate == "running":
                    server_fate = f"exited with {server.proc.poll()} {at:.0f} s into the attack"
            else:
                peak = max(peak, status["VmRSS"])
                if at >= len(timeline) * TIMELINE_STEP:
                    timeline.append(round(status["VmRSS"], 1))
                if status["VmRSS"] > args.rss_ceiling:
                    server_fate = (f"killed at {status['VmRSS']:.0f} MiB (over --rss-ceiling) "
                                   f"{at:.0f} s into the attack")
                    server.kill()
                result["rss_hwm_mb"] = round(status["VmHWM"], 1)
            await asyncio.wait([reports], timeout=SAMPLE_INTERVAL)
        attack_report, fleet_report = reports.result()
        status = proc_status(server.pid) if server.running() else None
        result.update(rss_peak_mb=round(peak, 1), rss_end_mb=round(status["VmRSS"], 1) if status else None,
                      rss_timeline_mb=timeline, server=server_fate, attackers=attack_report, **fleet_report)
        return result
    finally:
        for proc in (fleet, attacker):
            if proc is not None and proc.returncode is None:
                proc.kill()
                await proc.wait()
        server.stop()


def print_table(result):
    attackers = result.get("attackers") or {}
    rows = [(name, c) for name, c in attackers.get("counters", {}).items() if name != "idle"]
    rows += [("idle." + kind, c) for kind, c in attackers.get("counters", {}).get("idle", {}).items()]
    print(f"{'attack':22s} counters")
    for name, counters in rows:
        print(f"{name:22s} " + (", ".join(f"{k} {v}" for k, v in counters.items()) or "-"))
    for problem in ("cut_off", "crashed", "error"):
        if attackers.get(problem):
            print(f"attacks {problem.replace('_', ' ')}: {attackers[problem]}")
    print(f"server RSS: peak {result.get('rss_peak_mb')} MiB (VmHWM {result.get('rss_hwm_mb')}), "
          f"at the end {result.get('rss_end_mb')}; server {result.get('server')}")
    print(f"server RSS every {TIMELINE_STEP:.0f} s of the attack (MiB): {result.get('rss_timeline_mb')}")
    if "p99_ms" in result:
        print(f"good nodes: {result['changes']} changes, p50 {result['p50_ms']} ms, p99 {result['p99_ms']} ms, "
              f"max {result['max_ms']} ms, {result['missed']} missed; update errors {result['update_errors']}")
        print(f"sessions lost {result['sessions_lost']} of {result['nodes']} (closed {result['closed']}, "
              f"silent {result['silent']}), rejoined {result['rejoined']}, not back {result['not_back']}")
        print(f"a new node joining during the attack: {result['join_during_attack']}, "
              f"after it: {result['join_after_attack']}")
    else:
        print(f"good nodes: {result.get('error')}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--attacks", default=",".join(ATTACKS),
                        help="comma-separated subset (empty: none, a baseline) of: " + "; ".join(f"{k} ({v})" for k, v in ATTACKS.items()))
    parser.add_argument("--rss-ceiling", dest="rss_ceiling", type=float, default=600,
                        help="MiB of server RSS at which the bench kills the server, as an OOM killer would "
                             "(default 600; a router has 128 MB)")
    parser.add_argument("--attacker-source", dest="attacker_source", default="127.0.0.2",
                        help="loopback address the attacker connects from (default 127.0.0.2; "
                             "empty: the good nodes' own, 127.0.0.1)")
    parser.add_argument("--role", choices=["fleet", "attacker"], help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role:
        asyncio.run((run_fleet if args.role == "fleet" else run_attacker)(json.loads(args.spec)))
        return
    args.attacks = [a for a in args.attacks.split(",") if a]
    unknown = [a for a in args.attacks if a not in ATTACKS]
    if unknown:
        parser.error(f"unknown attack {', '.join(unknown)}: choose from {', '.join(ATTACKS)}")
    with tempfile.TemporaryDirectory() as tmp:
        result = asyncio.run(run(args, tmp))
    print_table(result)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
