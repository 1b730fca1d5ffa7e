"""The client side of ts2021, for tests and benchmarks.

A simulated Tailscale node: fetches /key, does the Noise IK handshake as the
initiator, speaks HTTP/2 inside the transport records (h2), registers with an
auth key and reads the streaming map.  It makes the requests a stock client
makes (see control/controlclient/direct.go in Tailscale's source), so many of
them can stand in for real nodes in one process.
"""

import asyncio
import base64
import json
import os
import struct
import sys

import h2.config
import h2.connection
import h2.events
import zstandard

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import meshbox  # noqa: E402

CAPABILITY_VERSION = 130
_zstd = zstandard.ZstdDecompressor()


def decode_map_frames(buffer):
    """Split a map stream buffer into (messages, rest)."""
    messages = []
    while len(buffer) >= 4:
        size = struct.unpack("<I", buffer[:4])[0]
        if len(buffer) < 4 + size:
            break
        frame, buffer = buffer[4:4 + size], buffer[4 + size:]
        messages.append(json.loads(_zstd.decompress(frame, max_output_size=64 << 20)))
    return messages, buffer


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
        self.early_payload = None
        self.reader_task = None

    @property
    def node_key(self):
        return meshbox.key_text("nodekey", meshbox.x25519_public(self.node_private))

    async def connect(self, timeout=10):
        status, body = await http_get(self.host, self.port, f"/key?v={self.version}", timeout)
        assert status == 200, body
        server_public = meshbox.key_bytes(json.loads(body)["publicKey"], "mkey")
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
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            for stream in self.streams.values():
                stream.ended = True
                stream.event.set()

    def on_event(self, event):
        stream = self.streams.get(getattr(event, "stream_id", None))
        if stream is None:
            return
        if isinstance(event, h2.events.ResponseReceived):
            stream.status = int(dict(event.headers)[":status"])
        elif isinstance(event, h2.events.DataReceived):
            stream.data += event.data
            self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        if isinstance(event, (h2.events.StreamEnded, h2.events.StreamReset)) or getattr(event, "stream_ended", None):
            stream.ended = True
        stream.event.set()

    def start_request(self, path, body):
        stream_id = self.h2.get_next_available_stream_id()
        data = json.dumps(body).encode()
        self.streams[stream_id] = stream = Stream()
        self.h2.send_headers(stream_id, [(":method", "POST"), (":path", path), (":scheme", "http"),
                                         (":authority", self.host), ("content-type", "application/json")])
        self.h2.send_data(stream_id, data, end_stream=True)
        self.flush()
        return stream

    async def request(self, path, body, timeout=10):
        """A non-streaming request: (status, body bytes)."""
        stream = self.start_request(path, body)
        async with asyncio.timeout(timeout):
            while not stream.ended:
                stream.event.clear()
                await stream.event.wait()
        return stream.status, bytes(stream.data)

    def hostinfo(self):
        return {"Hostname": self.hostname, "OS": "linux", "BackendLogID": "sim-" + self.hostname}

    async def register(self, auth_key, **extra):
        body = {"Version": self.version, "NodeKey": self.node_key, "Hostinfo": self.hostinfo(),
                "Auth": {"AuthKey": auth_key} if auth_key else None, **extra}
        status, data = await self.request("/machine/register", body)
        assert status == 200, (status, data)
        return json.loads(data)

    def map_request(self, stream=True, endpoints=("192.0.2.10:41641",), **extra):
        return {"Version": self.version, "KeepAlive": True, "Compress": "zstd", "Stream": stream,
                "NodeKey": self.node_key,
                "DiscoKey": meshbox.key_text("discokey", meshbox.x25519_public(self.disco_private)),
                "Endpoints": list(endpoints), "Hostinfo": self.hostinfo(), **extra}

    def open_map(self, **kw):
        """Start a streaming map; read it with next_map_message."""
        self.map_stream = self.start_request("/machine/map", self.map_request(**kw))
        self.map_buffer = b""
        return self.map_stream

    async def next_map_message(self, timeout=10, skip_keepalive=True):
        """The next message of the streaming map (or raise TimeoutError)."""
        stream = self.map_stream
        async with asyncio.timeout(timeout):
            while True:
                self.map_buffer += bytes(stream.data)
                stream.data.clear()
                messages, self.map_buffer = decode_map_frames(self.map_buffer)
                if messages:
                    # Put back all but the first, framed again, for the next call.
                    rest = b"".join(struct.pack("<I", len(f)) + f for f in
                                    (zstandard.ZstdCompressor().compress(json.dumps(m).encode()) for m in messages[1:]))
                    self.map_buffer = rest + self.map_buffer
                    if skip_keepalive and messages[0] == {"KeepAlive": True}:
                        continue
                    return messages[0]
                if stream.ended:
                    raise ConnectionError(f"map stream ended (status {stream.status})")
                stream.event.clear()
                await stream.event.wait()

    async def close(self):
        if self.reader_task:
            self.reader_task.cancel()
        if getattr(self, "writer", None):
            self.writer.close()
