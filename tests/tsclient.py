"""The client side of ts2021, for tests and benchmarks.

A simulated Tailscale node: fetches /key, does the Noise IK handshake as the
initiator, speaks HTTP/2 inside the transport records (h2), registers with an
auth key and reads the streaming map.  It makes the requests a stock client
makes (see control/controlclient/direct.go in Tailscale's source), so many of
them can stand in for real nodes in one process.

Requests, as a stock client (1.90) sends them: ``GET /key?v=CAPVER`` once,
``POST /ts2021`` with the initiation in ``X-Tailscale-Handshake``, then over
HTTP/2 ``/machine/register`` (RegisterRequest, Version 1, with a Timestamp
and Auth.AuthKey), a streaming ``/machine/map`` (KeepAlive, Compress zstd)
and, when endpoints change, a non-streaming ``/machine/map`` with OmitPeers
(the "lite" update).  Map messages are decoded as they arrive and kept with
their arrival time, so hundreds of nodes cost little to watch.
"""

import asyncio
import base64
import collections
import json
import os
import random
import struct
import sys
import time

import h2.config
import h2.connection
import h2.events
import zstandard

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import meshbox  # noqa: E402

CAPABILITY_VERSION = 130
_zstd = zstandard.ZstdDecompressor()


def split_map_frames(buffer):
    """Split a map stream buffer into (zstd frames, rest)."""
    frames = []
    while len(buffer) >= 4:
        size = struct.unpack("<I", buffer[:4])[0]
        if len(buffer) < 4 + size:
            break
        frames.append(buffer[4:4 + size])
        buffer = buffer[4 + size:]
    return frames, buffer


def decompress_map_frame(frame):
    return _zstd.decompress(frame, max_output_size=64 << 20)


def decode_map_frame(frame):
    return json.loads(decompress_map_frame(frame))



async def fetch_server_key(host, port, version=CAPABILITY_VERSION, timeout=10):
    """The server's Noise public key from ``/key`` (a stock client caches it)."""
    status, body = await http_get(host, port, f"/key?v={version}", timeout)
    if status != 200:
        raise ConnectionError(f"/key answered {status}: {body[:200]!r}")
    return meshbox.key_bytes(json.loads(body)["publicKey"], "mkey")


async def http_get(host, port, path, timeout=10):
    """A plain HTTP/1.1 GET: (status, body)."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        data = await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), body


class Stream:
    """One HTTP/2 request's response, as it arrives."""

    def __init__(self):
        self.stream_id = None
        self.broken = False
        self.status = None
        self.data = bytearray()
        self.ended = False
        self.event = asyncio.Event()


class ControlClient:
    """A simulated node: machine and node keys, a Noise channel, HTTP/2."""

    def __init__(self, host, port, hostname="sim", version=CAPABILITY_VERSION):
        self.host, self.port, self.hostname, self.version = host, port, hostname, version
        self.machine_private = meshbox.new_private_key()
        self.node_private = meshbox.new_private_key()
        self.disco_private = meshbox.new_private_key()
        self.streams = {}
        self.unsent = {}                           # stream id -> request body bytes not yet sent
        self.early_payload = None
        self.reader_task = None
        self.map_stream = None
        self.map_buffer = b""
        self.map_messages = collections.deque()   # (arrival monotonic time, message)
        self.map_arrived = asyncio.Event()
        self.hostinfo_extra = {}                   # e.g. {"RoutableIPs": [...]} for a subnet router

    @property
    def node_key(self):
        return meshbox.key_text("nodekey", meshbox.x25519_public(self.node_private))

    async def connect(self, timeout=10, server_public=None):
        """Handshake and start HTTP/2; server_public skips the ``/key`` fetch."""
        if server_public is None:
            server_public = await fetch_server_key(self.host, self.port, self.version, timeout)
        initiation, finish = meshbox.noise_initiate(self.machine_private, server_public, self.version)
        self.reader, self.writer = await asyncio.wait_for(asyncio.open_connection(self.host, self.port), timeout)
        self.writer.write((
            f"POST /ts2021 HTTP/1.1\r\nHost: {self.host}\r\nUpgrade: tailscale-control-protocol\r\n"
            f"Connection: upgrade\r\nX-Tailscale-Handshake: {base64.b64encode(initiation).decode()}\r\n\r\n").encode())
        head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), timeout)
        if not head.startswith(b"HTTP/1.1 101"):
            raise ConnectionError(head.decode(errors="replace"))
        response = await asyncio.wait_for(self.reader.readexactly(meshbox.RESPONSE_LEN), timeout)
        self.noise = finish(response)
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
        self.h2.initiate_connection()
        self.flush()
        self.reader_task = asyncio.ensure_future(self.read_loop())

    def flush(self):
        data = self.h2.data_to_send()
        if data:
            self.writer.write(meshbox.seal_records(self.noise.send, data))

    async def read_loop(self):
        pending = b""
        try:
            while True:
                pending += await meshbox.read_record(self.reader, self.noise.recv)
                if self.early_payload is None:
                    if len(pending) < 9:
                        continue
                    if pending[:5] == meshbox.EARLY_PAYLOAD_MAGIC:
                        size = struct.unpack(">I", pending[5:9])[0]
                        if len(pending) < 9 + size:
                            continue
                        self.early_payload = json.loads(pending[9:9 + size])
                        pending = pending[9 + size:]
                    else:
                        self.early_payload = {}
                for event in self.h2.receive_data(pending):
                    self.on_event(event)
                pending = b""
                self.flush()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError, OSError):
            pass
        finally:
            for stream in self.streams.values():
                stream.broken = not stream.ended     # the connection went before the response did
                stream.ended = True
                stream.event.set()
            self.map_arrived.set()

    def on_event(self, event):
        if isinstance(event, (h2.events.WindowUpdated, h2.events.RemoteSettingsChanged)) and self.unsent:
            self.send_unsent()
        stream = self.streams.get(getattr(event, "stream_id", None))
        if stream is None:
            return
        if isinstance(event, h2.events.ResponseReceived):
            stream.status = int(dict(event.headers)[":status"])
        elif isinstance(event, h2.events.DataReceived):
            self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            if stream is self.map_stream:
                # Decoded only when read: a fleet of simulated nodes that
                # nobody reads should not spend the load generator's CPU.
                self.map_buffer += event.data
                frames, self.map_buffer = split_map_frames(self.map_buffer)
                arrival = time.monotonic()
                self.map_messages.extend((arrival, f) for f in frames)
            else:
                stream.data += event.data
        if isinstance(event, (h2.events.StreamEnded, h2.events.StreamReset)) or getattr(event, "stream_ended", None):
            stream.ended = True
        stream.event.set()
        if stream is self.map_stream:
            self.map_arrived.set()

    def start_request(self, path, body, method="POST"):
        """Send a request whose body is JSON, or bytes sent as they are (malformed
        on purpose); a GET (body None) sends none."""
        stream_id = self.h2.get_next_available_stream_id()
        self.streams[stream_id] = stream = Stream()
        stream.stream_id = stream_id
        self.h2.send_headers(stream_id, [(":method", method), (":path", path), (":scheme", "http"),
                                         (":authority", self.host), ("content-type", "application/json")],
                             end_stream=body is None)
        if body is not None:
            self.unsent[stream_id] = memoryview(body if isinstance(body, bytes) else json.dumps(body).encode())
            self.send_unsent()
        else:
            self.flush()
        return stream

    def send_unsent(self):
        """Send request bodies as far as HTTP/2 flow control allows (the rest on WINDOW_UPDATE)."""
        for stream_id, view in list(self.unsent.items()):
            while view:
                size = min(len(view), self.h2.local_flow_control_window(stream_id), self.h2.max_outbound_frame_size)
                if size <= 0:
                    break
                chunk, view = view[:size], view[size:]
                self.h2.send_data(stream_id, bytes(chunk), end_stream=not view)
            if view:
                self.unsent[stream_id] = view
            else:
                del self.unsent[stream_id]
        self.flush()

    async def request(self, path, body, timeout=10, method="POST"):
        """A non-streaming request: (status, body bytes)."""
        stream = self.start_request(path, body, method)
        async with asyncio.timeout(timeout):
            while not stream.ended:
                stream.event.clear()
                await stream.event.wait()
        if stream.broken:
            raise ConnectionError(f"connection closed before the answer to {path} was complete")
        return stream.status, bytes(stream.data)

    def hostinfo(self):
        return {"Hostname": self.hostname, "OS": "linux", "IPNVersion": "1.90.9-sim",
                "BackendLogID": "sim-" + self.hostname, **self.hostinfo_extra}

    def register_request(self, auth_key, **extra):
        """A RegisterRequest as a stock client builds it (its Version is 1, not the capability version)."""
        return {"Version": 1, "NodeKey": self.node_key, "OldNodeKey": "", "Hostinfo": self.hostinfo(),
                "Timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "Ephemeral": False,
                "Auth": {"AuthKey": auth_key} if auth_key else None, **extra}

    async def register(self, auth_key, timeout=10, **extra):
        status, data = await self.request("/machine/register", self.register_request(auth_key, **extra), timeout)
        assert status == 200, (status, data)
        return json.loads(data)

    def map_request(self, stream=True, endpoints=("192.0.2.10:41641",), **extra):
        return {"Version": self.version, "KeepAlive": True, "Compress": "zstd", "Stream": stream,
                "NodeKey": self.node_key,
                "DiscoKey": meshbox.key_text("discokey", meshbox.x25519_public(self.disco_private)),
                "Endpoints": list(endpoints), "EndpointTypes": [1] * len(endpoints),
                "Hostinfo": self.hostinfo(), "OmitPeers": False, **extra}

    def open_map(self, **kw):
        """Start a streaming map; read it with next_map_message."""
        self.map_messages.clear()
        self.map_buffer = b""
        self.map_stream = self.start_request("/machine/map", self.map_request(**kw))
        return self.map_stream

    async def next_map_frame(self):
        """The next streaming-map frame, still compressed: (monotonic arrival seconds, frame)."""
        while not self.map_messages:
            if self.map_stream.ended:
                raise ConnectionError(f"map stream ended (status {self.map_stream.status})")
            self.map_arrived.clear()
            await self.map_arrived.wait()
        return self.map_messages.popleft()

    async def next_map_entry(self, timeout=10, skip_keepalive=True):
        """The next streaming-map message and its arrival time: (monotonic seconds, message)."""
        async with asyncio.timeout(timeout):
            while True:
                arrival, frame = await self.next_map_frame()
                message = decode_map_frame(frame)
                if not (skip_keepalive and message == {"KeepAlive": True}):
                    return arrival, message

    async def next_map_message(self, timeout=10, skip_keepalive=True):
        """The next message of the streaming map (or raise TimeoutError)."""
        return (await self.next_map_entry(timeout, skip_keepalive))[1]

    async def map_message_where(self, predicate, timeout=10):
        """Skip streaming-map messages until predicate(message); returns (arrival, message)."""
        async with asyncio.timeout(timeout):
            while True:
                arrival, message = await self.next_map_entry(timeout)
                if predicate(message):
                    return arrival, message

    async def update_endpoints(self, endpoints, timeout=10):
        """Report new endpoints the way a stock client does: a non-streaming map with OmitPeers."""
        status, body = await self.request("/machine/map", self.map_request(
            stream=False, endpoints=endpoints, OmitPeers=True), timeout)
        if status != 200:
            raise ConnectionError(f"endpoint update answered {status}: {body[:200]!r}")

    async def join(self, auth_key, timeout=10, server_public=None, parse=True):
        """Connect, register, open the streaming map and return its first
        message; parse=False returns it as JSON text, checked only for the
        node's own entry (a load generator's shortcut: parsing a large map
        costs more CPU than the server spends sending it)."""
        await self.connect(timeout, server_public)
        response = await self.register(auth_key, timeout)
        if not response.get("MachineAuthorized"):
            raise ConnectionError(f"registration refused: {response}")
        self.open_map()
        if parse:
            return await self.next_map_message(timeout)
        async with asyncio.timeout(timeout):
            text = decompress_map_frame((await self.next_map_frame())[1])
        if not text.startswith(b'{"Node":{'):
            raise ConnectionError(f"first map message without the node: {text[:100]!r}")
        return text

    @property
    def connected(self):
        return self.reader_task is not None and not self.reader_task.done()

    async def rejoin(self, auth_key="", timeout=10, server_public=None):
        """Come back after the connection dropped, as a stock client does: the
        same machine and node keys, a new Noise channel, the streaming map
        again, registering first only if the server refuses the map."""
        await self.close()
        self.streams, self.unsent, self.early_payload = {}, {}, None
        await self.connect(timeout, server_public)
        self.open_map()
        try:
            return await self.next_map_message(timeout)
        except ConnectionError:
            if self.map_stream.status != 401:
                raise
        response = await self.register(auth_key, timeout)
        if not response.get("MachineAuthorized"):
            raise ConnectionError(f"registration refused: {response}")
        self.open_map()
        return await self.next_map_message(timeout)

    async def stay_connected(self, on_rejoin=None, attempts=600, backoff=(0.1, 2.0)):
        """Rejoin whenever the map stream ends, with capped backoff and a bounded
        number of attempts; on_rejoin(first map message) after each success."""
        delay = backoff[0]
        for _ in range(attempts):
            while not self.map_stream.ended:
                self.map_arrived.clear()
                await self.map_arrived.wait()
            await asyncio.sleep(delay * (0.5 + random.random()))
            try:
                first = await self.rejoin()
            except (OSError, ConnectionError, TimeoutError, AssertionError, meshbox.NoiseError,
                    asyncio.IncompleteReadError):
                delay = min(delay * 2, backoff[1])
                continue
            delay = backoff[0]
            if on_rejoin:
                on_rejoin(first)

    async def close(self):
        if self.reader_task:
            self.reader_task.cancel()
            await asyncio.gather(self.reader_task, return_exceptions=True)
        if getattr(self, "writer", None):
            self.writer.close()


# ---- Fleet ----

async def join_fleet(host, port, auth_key, count, concurrency=32, prefix="sim", timeout=30):
    """Join count simulated nodes, at most concurrency at a time; returns (clients, first maps)."""
    server_public = await fetch_server_key(host, port, timeout=timeout)
    gate = asyncio.Semaphore(concurrency)

    async def one(i):
        client = ControlClient(host, port, f"{prefix}{i}")
        async with gate:
            first = await client.join(auth_key, timeout, server_public)
        return client, first

    tasks = [asyncio.ensure_future(one(i)) for i in range(count)]
    try:
        results = await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for task in tasks:
            if not task.cancelled() and task.exception() is None:
                await task.result()[0].close()
        raise
    return [c for c, _ in results], [f for _, f in results]
