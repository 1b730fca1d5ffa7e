"""A small DERP client and a loopback DERP-over-HTTP server, for tests and benchmarks.

The frame format, constants and limits come from meshbox; this file only adds
the client's side of the handshake (the mirror image of the server's).
"""

import asyncio
import collections
import hashlib
import json
import secrets
import ssl

import meshbox
from meshbox import (DERP_KEY_LEN, DERP_MAGIC, DERP_MAX_INFO, DERP_NONCE_LEN,
                     DERP_PROTOCOL_VERSION, FRAME_CLIENT_INFO, FRAME_KEEP_ALIVE,
                     FRAME_PING, FRAME_PONG, FRAME_RECV_PACKET, FRAME_SEND_PACKET,
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
                      fast_start_key=None, timeout=5.0):
        """Connect, upgrade and handshake.

        pin: a ``sha256-raw:<hex>`` CertName to use TLS and check the
        certificate against (as Tailscale clients do). fast_start_key: the
        server key, to send ``Derp-Fast-Start: 1`` and skip the HTTP reply.
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
            await asyncio.wait_for(client._handshake(host, fast_start_key), timeout)
        except BaseException:
            writer.close()
            raise
        return client

    async def _handshake(self, host, fast_start_key):
        request = (f"GET /derp HTTP/1.1\r\nHost: {host}\r\n"
                   "Upgrade: DERP\r\nConnection: Upgrade\r\n")
        if fast_start_key is not None:
            request += "Derp-Fast-Start: 1\r\n"
        self.writer.write((request + "\r\n").encode())
        if fast_start_key is None:
            self.http_response = await self.reader.readuntil(b"\r\n\r\n")
            if not self.http_response.startswith(b"HTTP/1.1 101 "):
                raise ConnectionError(f"no upgrade: {self.http_response[:200]!r}")
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


async def serve_derp_http(derp, host="127.0.0.1", port=0, ssl_context=None):
    """A loopback HTTP/1.1 server that hands ``GET /derp`` to derp.handle_upgrade."""

    async def on_connection(reader, writer):
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, OSError):
            writer.close()
            return
        lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        await derp.handle_upgrade(headers, reader, writer)

    return await asyncio.start_server(on_connection, host, port, ssl=ssl_context)


def write_self_signed(directory, hostname="derp.test", ips=("127.0.0.1",)):
    """Certificate and key files for a DERP test server; returns (cert, key, pin)."""
    seed = secrets.token_bytes(32)
    der = meshbox.self_signed_certificate(seed, hostname, ips)
    cert_path, key_path = directory / "derp.crt", directory / "derp.key"
    cert_path.write_bytes(meshbox.pem(der, "CERTIFICATE"))
    key_path.write_bytes(meshbox.ed25519_private_key_pem(seed))
    return str(cert_path), str(key_path), "sha256-raw:" + hashlib.sha256(der).hexdigest()
