"""A small DERP client and a loopback DERP-over-HTTP server, for tests and benchmarks.

The frame format, constants and limits come from meshbox; this file only adds
the client's side of the handshake (the mirror image of the server's).
"""

import asyncio
import base64
import collections
import hashlib
import json
import secrets
import ssl
import struct

import meshbox
from meshbox import (DERP_KEY_LEN, DERP_MAGIC, DERP_MAX_INFO, DERP_NONCE_LEN,
                     DERP_PROTOCOL_VERSION, FRAME_CLIENT_INFO, FRAME_KEEP_ALIVE,
                     FRAME_HEALTH, FRAME_PING, FRAME_PONG, FRAME_RECV_PACKET, FRAME_SEND_PACKET,
                     FRAME_SERVER_INFO, FRAME_SERVER_KEY, frame, read_frame)


class DerpClient:
    """One DERP client connection: handshake done, frames in and out."""

    def __init__(self, private_key, reader, writer):
        self.private_key = private_key
        self.public_key = meshbox.x25519_public(private_key)
        self.reader = reader
        self.writer = writer
        self.server_key = None
        self.server_info = None
        self.http_response = b""
        self._pending = collections.deque()   # frames read while waiting for a pong

    @classmethod
    async def connect(cls, host, port, private_key=None, pin=None, server_name=None,
                      fast_start_key=None, websocket=False, timeout=5.0):
        """Connect, upgrade and handshake.

        pin: a ``sha256-raw:<hex>`` CertName to use TLS and check the
        certificate against (as Tailscale clients do). fast_start_key: the
        server key, to send ``Derp-Fast-Start: 1`` and skip the HTTP reply.
        websocket: upgrade to WebSocket with the ``derp`` subprotocol, as
        browser clients do.
        """
        ctx = None
        if pin is not None:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE   # trust comes from the pin below
        reader, writer = await asyncio.wait_for(asyncio.open_connection(
            host, port, ssl=ctx, server_hostname=(server_name or host) if ctx else None),
            timeout)
        client = cls(private_key or meshbox.new_private_key(), reader, writer)
        try:
            if pin is not None:
                cert = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
                if meshbox.certificate_pin(cert) != pin:
                    raise ssl.SSLError("certificate does not match the pin")
            await asyncio.wait_for(client._handshake(host, fast_start_key, websocket), timeout)
        except BaseException:
            writer.close()
            raise
        return client

    async def _handshake(self, host, fast_start_key, websocket):
        request = f"GET /derp HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\n"
        if websocket:
            ws_key = base64.b64encode(secrets.token_bytes(16)).decode()
            request += ("Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
                        f"Sec-WebSocket-Key: {ws_key}\r\nSec-WebSocket-Protocol: derp\r\n")
        else:
            request += "Upgrade: DERP\r\n"
        if fast_start_key is not None:
            request += "Derp-Fast-Start: 1\r\n"
        self.writer.write((request + "\r\n").encode())
        if fast_start_key is None:
            self.http_response = await self.reader.readuntil(b"\r\n\r\n")
            if not self.http_response.startswith(b"HTTP/1.1 101 "):
                raise ConnectionError(f"no upgrade: {self.http_response[:200]!r}")
        if websocket:
            accept = meshbox.websocket_accept_value(ws_key)
            if f"Sec-WebSocket-Accept: {accept}\r\n".encode() not in self.http_response:
                raise ConnectionError("bad Sec-WebSocket-Accept")
            self.reader = self.writer = WebSocketClientStream(self.reader, self.writer)
        frame_type, body = await read_frame(self.reader, 1024)
        if frame_type != FRAME_SERVER_KEY or not body.startswith(DERP_MAGIC) \
                or len(body) < len(DERP_MAGIC) + DERP_KEY_LEN:
            raise ConnectionError("bad ServerKey frame")
        self.server_key = body[len(DERP_MAGIC):len(DERP_MAGIC) + DERP_KEY_LEN]
        if fast_start_key is not None and fast_start_key != self.server_key:
            raise ConnectionError("server key differs from the fast-start key")
        nonce = secrets.token_bytes(DERP_NONCE_LEN)
        info = json.dumps({"version": DERP_PROTOCOL_VERSION, "CanAckPings": True}).encode()
        self.writer.write(frame(FRAME_CLIENT_INFO, self.public_key + nonce + meshbox.box_seal(
            self.private_key, self.server_key, nonce, info)))
        frame_type, body = await read_frame(self.reader, DERP_MAX_INFO)
        if frame_type == FRAME_HEALTH:
            raise ConnectionError(f"refused: {body.decode(errors='replace')}")
        if frame_type != FRAME_SERVER_INFO or len(body) < DERP_NONCE_LEN:
            raise ConnectionError(f"expected ServerInfo, got frame 0x{frame_type:02x}")
        self.server_info = json.loads(meshbox.box_open(
            self.private_key, self.server_key, body[:DERP_NONCE_LEN], body[DERP_NONCE_LEN:]))

    async def send_packet(self, dst_key, data):
        self.writer.write(frame(FRAME_SEND_PACKET, dst_key + data))
        await self.writer.drain()

    async def recv_frame(self, timeout=5.0):
        """The next frame other than KeepAlive, as (type, body)."""
        if self._pending:
            return self._pending.popleft()
        while True:
            frame_type, body = await asyncio.wait_for(read_frame(self.reader, DERP_MAX_INFO), timeout)
            if frame_type != FRAME_KEEP_ALIVE:
                return frame_type, body

    async def recv_packet(self, timeout=5.0):
        """The next relayed packet as (source key, data); other frames are skipped."""
        while True:
            frame_type, body = await self.recv_frame(timeout)
            if frame_type == FRAME_RECV_PACKET:
                return body[:DERP_KEY_LEN], body[DERP_KEY_LEN:]

    async def ping(self, data=None, timeout=5.0):
        """Send a Ping and wait for its Pong; returns the 8 echoed bytes."""
        data = data or secrets.token_bytes(8)
        self.writer.write(frame(FRAME_PING, data))
        await self.writer.drain()
        seen = []
        try:
            while True:
                frame_type, body = await self.recv_frame(timeout)
                if frame_type == FRAME_PONG and body == data:
                    return body
                seen.append((frame_type, body))
        finally:
            self._pending.extend(seen)

    async def close(self):
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except (OSError, ssl.SSLError):
            pass


class WebSocketClientStream:
    """Client side of a WebSocket carrying a byte stream (masked binary frames)."""

    def __init__(self, reader, writer):
        self.reader, self.writer = reader, writer
        self.buffer = bytearray()

    async def readexactly(self, n):
        while len(self.buffer) < n:
            b0, b1 = await self.reader.readexactly(2)
            size = b1 & 0x7F
            if size == 126:
                size = struct.unpack(">H", await self.reader.readexactly(2))[0]
            elif size == 127:
                size = struct.unpack(">Q", await self.reader.readexactly(8))[0]
            payload = await self.reader.readexactly(size)
            if b0 & 0x0F == 0x8:
                raise asyncio.IncompleteReadError(b"", None)
            if b0 & 0x0F in (0x0, 0x2):
                self.buffer += payload
        out = bytes(self.buffer[:n])
        del self.buffer[:n]
        return out

    def write(self, data):
        mask = secrets.token_bytes(4)
        n = len(data)
        if n < 126:
            head = struct.pack(">BB", 0x82, 0x80 | n)
        elif n < 65536:
            head = struct.pack(">BBH", 0x82, 0x80 | 126, n)
        else:
            head = struct.pack(">BBQ", 0x82, 0x80 | 127, n)
        self.writer.write(head + mask + meshbox.websocket_mask(mask, data))

    async def drain(self):
        await self.writer.drain()

    def close(self):
        self.writer.close()

    async def wait_closed(self):
        await self.writer.wait_closed()


class FakeTransport:
    """A transport whose write buffer holds `size` bytes, for DerpConnection."""

    def __init__(self, size=0):
        self.size = size

    def get_write_buffer_size(self):
        return self.size


class FakeWriter:
    """A stream writer that keeps what is written to it."""

    def __init__(self, transport=None):
        self.frames = []
        self.transport = transport or FakeTransport()

    def write(self, data):
        self.frames.append(bytes(data))

    def close(self):
        pass


def fake_connection(derp, key=None):
    """A client joined to derp without a socket: its writer keeps its frames."""
    conn = meshbox.DerpConnection(key or secrets.token_bytes(DERP_KEY_LEN), "fake", FakeWriter(), FakeTransport())
    derp._register(conn)
    return conn


def split_frames(data):
    """(type, body) of each whole frame in data."""
    out, offset = [], 0
    while offset < len(data):
        frame_type, length = struct.unpack_from(">BI", data, offset)
        out.append((frame_type, data[offset + 5:offset + 5 + length]))
        offset += 5 + length
    return out


async def serve_derp_http(derp, host="127.0.0.1", port=0, ssl_context=None):
    """A loopback HTTP/1.1 server that hands ``GET /derp`` to derp.handle_upgrade."""

    async def on_connection(reader, writer):
        try:
            request = await asyncio.wait_for(meshbox.read_http_request(reader), 5)
            if request is not None:
                await derp.handle_upgrade(request.headers, reader, writer)
        except (meshbox.HttpError, TimeoutError, OSError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(on_connection, host, port, ssl=ssl_context)


def write_self_signed(directory, hostname="derp.test", ips=("127.0.0.1",)):
    """Certificate and key files for a DERP test server; returns (cert, key, pin)."""
    seed = secrets.token_bytes(32)
    der = meshbox.self_signed_certificate(seed, hostname, ips)
    cert_path, key_path = directory / "derp.crt", directory / "derp.key"
    cert_path.write_bytes(meshbox.pem(der, "CERTIFICATE"))
    key_path.write_bytes(meshbox.ed25519_private_key_pem(seed))
    return str(cert_path), str(key_path), "sha256-raw:" + hashlib.sha256(der).hexdigest()
