#!/usr/bin/env python3
"""meshbox: a self-hosted Tailscale control plane and gateway in one file.

Stock Tailscale clients join with ``--login-server``; meshbox registers them,
hands out addresses, serves their network maps, relays their traffic (DERP)
and answers STUN.  Run ``python3 meshbox.py --help`` to start.

Map of this file (sections in dependency order, each opened by a banner
comment ``# ---- Name ----``):

  Shim            imports, optional dependencies and their fallbacks
  Helpers         time, JSON, key text forms, durations
  Crypto          X25519, ChaCha20-Poly1305, BLAKE2s, NaCl box, Ed25519
  Noise           Noise_IK handshake and transport records (ts2021)
  Zstd framing    map-response compression
  WebSocket       the small RFC 6455 framing for browser-style upgrades
  Store           SQLite: users, pre-auth keys, nodes, server secrets
  Addresses       tailnet IPv4/IPv6 allocation
  Policy          packet filter and peer visibility (allow-all for now)
  Map builder     pure: node records in, MapResponse JSON out
  Coordinator     registration, map sessions, fan-out of changes
  TLS certificate self-signed Ed25519 certificate for DERP, pinned by hash
  DERP            the relay: frames, clients, forwarding
  STUN            RFC 5389 binding responses
  HTTP front      HTTP/1.1 on asyncio streams: /key, upgrades, DERP
  Control server  ts2021 over HTTP/2 (h2): register, map
  Server          listeners and lifetime of ``serve``
  CLI             argument parsing and the commands
"""

# ---- Shim ----
# Only modules that OpenWrt's python3-light (plus its asyncio, sqlite3,
# openssl, ctypes and logging packages) carries are imported here; the
# third-party ones are optional where a fallback exists.

import argparse
import asyncio
import base64
import binascii
import dataclasses
import hashlib
import hmac
import ipaddress
import json
import logging
import os
import secrets
import socket
import sqlite3
import struct
import sys
import time

try:
    import ssl
except ImportError:  # python3-openssl missing: DERP over TLS is unavailable
    ssl = None

try:
    import nacl.bindings as _sodium
    import nacl.signing as _nacl_signing
except ImportError:
    _sodium = None
    _nacl_signing = None

try:
    import h2.config
    import h2.connection
    import h2.errors
    import h2.events
    import h2.exceptions
except ImportError:
    h2 = None

try:  # Python 3.14's standard library (OpenWrt's python3-light has it)
    from compression import zstd as _zstd_std
except ImportError:
    _zstd_std = None
try:
    import zstandard as _zstandard
except ImportError:
    _zstandard = None

log = logging.getLogger("meshbox")

VERSION = "0.1.0"


# ---- Helpers ----

def now():
    """Seconds since the epoch, as a float (one clock for the whole file)."""
    return time.time()


def rfc3339(ts):
    """Go's time.Time JSON form, UTC with second precision; None for zero."""
    if not ts:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def json_bytes(obj):
    """Compact JSON as UTF-8 bytes, the form sent on the wire."""
    return json.dumps(obj, separators=(",", ":")).encode()


def key_text(prefix, raw):
    """A 32-byte key in Tailscale's text form, e.g. ``nodekey:<hex>``."""
    return prefix + ":" + raw.hex()


def key_bytes(text, prefix):
    """Parse ``prefix:<64 hex>`` into 32 raw bytes, or raise ValueError."""
    if not isinstance(text, str) or not text.startswith(prefix + ":"):
        raise ValueError(f"expected a {prefix}: key, got {str(text)[:80]!r}")
    try:
        raw = bytes.fromhex(text[len(prefix) + 1:])
    except ValueError:
        raise ValueError(f"{prefix}: key is not hex: {text[:80]!r}") from None
    if len(raw) != 32:
        raise ValueError(f"{prefix}: key must be 32 bytes, got {len(raw)}")
    return raw


_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text):
    """``90d``, ``12h``, ``30m``, ``45s`` or ``1h30m`` to seconds."""
    text = str(text).strip().lower()
    total, number = 0, ""
    for ch in text:
        if ch.isdigit():
            number += ch
        elif ch in _DURATION_UNITS and number:
            total += int(number) * _DURATION_UNITS[ch]
            number = ""
        else:
            raise ValueError(f"bad duration {text!r}: use e.g. 90d, 12h, 30m")
    if number or not text:
        raise ValueError(f"bad duration {text!r}: a unit (s, m, h, d, w) is required")
    return total


def parse_host_port(text, default_port):
    """``host:port``, ``[v6]:port`` or ``host`` into (host, port)."""
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif text.count(":") == 1:
        host, port = text.split(":")
    else:
        host, port = text, ""
    if port and not port.isdigit():
        raise ValueError(f"bad port in {text!r}")
    return host or "127.0.0.1", int(port) if port else default_port


# ---- Crypto ----
# One small surface that the rest of the file calls; pynacl serves it today
# and the native helper (native/) can replace the functions it covers.

class CryptoError(Exception):
    """A MAC did not verify or a key was unusable."""


def _require_sodium():
    if _sodium is None:
        raise RuntimeError("pynacl is required: pip install pynacl")
    return _sodium


def new_private_key():
    """A fresh X25519 private key (clamped, as WireGuard stores them)."""
    k = bytearray(secrets.token_bytes(32))
    k[0] &= 248
    k[31] = (k[31] & 127) | 64
    return bytes(k)


def x25519_public(private):
    """The public key of an X25519 private key."""
    return _require_sodium().crypto_scalarmult_base(private)


def x25519(private, public):
    """X25519 shared secret; refuses low-order points (all-zero output)."""
    try:
        shared = _require_sodium().crypto_scalarmult(private, public)
    except Exception as e:  # libsodium refuses all-zero results
        raise CryptoError("X25519 with a low-order point") from e
    if not any(shared):
        raise CryptoError("X25519 with a low-order point")
    return shared


def aead_seal(key, nonce, plaintext, ad=b""):
    """ChaCha20-Poly1305 (IETF, 12-byte nonce): ciphertext with its tag."""
    return _require_sodium().crypto_aead_chacha20poly1305_ietf_encrypt(
        bytes(plaintext), ad or None, nonce, key)


def aead_open(key, nonce, ciphertext, ad=b""):
    """Open a ChaCha20-Poly1305 message or raise CryptoError."""
    try:
        return _require_sodium().crypto_aead_chacha20poly1305_ietf_decrypt(
            bytes(ciphertext), ad or None, nonce, key)
    except Exception as e:
        raise CryptoError("ChaCha20-Poly1305 tag mismatch") from e


def blake2s(data, key=b""):
    """BLAKE2s-256 (hashlib)."""
    return hashlib.blake2s(data, key=key).digest()


def box_seal(private, public, nonce, message):
    """NaCl crypto_box (X25519 + XSalsa20-Poly1305), as DERP uses it."""
    return _require_sodium().crypto_box(message, nonce, public, private)


def box_open(private, public, nonce, sealed):
    """Open a NaCl box or raise CryptoError."""
    try:
        return _require_sodium().crypto_box_open(sealed, nonce, public, private)
    except Exception as e:
        raise CryptoError("NaCl box did not open") from e


def ed25519_public(seed):
    """The Ed25519 public key for a 32-byte seed."""
    if _nacl_signing is None:
        raise RuntimeError("pynacl is required: pip install pynacl")
    return bytes(_nacl_signing.SigningKey(seed).verify_key)


def ed25519_sign(seed, message):
    """An Ed25519 signature (64 bytes) of message."""
    if _nacl_signing is None:
        raise RuntimeError("pynacl is required: pip install pynacl")
    return _nacl_signing.SigningKey(seed).sign(message).signature


# ---- Noise ----
# Noise_IK_25519_ChaChaPoly_BLAKE2s as Tailscale's controlbase uses it: the
# prologue names the protocol version, and transport nonces carry their
# counter big-endian.

NOISE_PROTOCOL_NAME = b"Noise_IK_25519_ChaChaPoly_BLAKE2s"
NOISE_PROLOGUE_PREFIX = b"Tailscale Control Protocol v"

MSG_INITIATION = 1
MSG_RESPONSE = 2
MSG_ERROR = 3
MSG_RECORD = 4

HEADER_LEN = 3                      # type, big-endian length
INITIATION_LEN = 2 + HEADER_LEN + 32 + 48 + 16
RESPONSE_LEN = HEADER_LEN + 32 + 16
MAX_RECORD_LEN = 4096
MAX_RECORD_PLAINTEXT = MAX_RECORD_LEN - HEADER_LEN - 16


class NoiseError(Exception):
    """A handshake or transport record was malformed or did not verify."""


def _hmac_blake2s(key, data):
    return hmac.new(key, data, hashlib.blake2s).digest()


def noise_hkdf(chaining_key, input_key, outputs):
    """The Noise spec's HKDF with HMAC-BLAKE2s; returns `outputs` keys."""
    temp = _hmac_blake2s(chaining_key, input_key)
    out, prev = [], b""
    for i in range(1, outputs + 1):
        prev = _hmac_blake2s(temp, prev + bytes([i]))
        out.append(prev)
    return out


class SymmetricState:
    """Noise SymmetricState: the running hash h and chaining key ck."""

    def __init__(self, version):
        self.h = hashlib.blake2s(NOISE_PROTOCOL_NAME).digest()
        self.ck = self.h
        self.mix_hash(NOISE_PROLOGUE_PREFIX + str(version).encode())

    def mix_hash(self, data):
        self.h = blake2s(self.h + data)

    def mix_dh(self, private, public):
        """MixKey(DH(private, public)); returns the new cipher key."""
        self.ck, key = noise_hkdf(self.ck, x25519(private, public), 2)
        return key

    def encrypt_and_hash(self, key, plaintext):
        ciphertext = aead_seal(key, bytes(12), plaintext, self.h)
        self.mix_hash(ciphertext)
        return ciphertext

    def decrypt_and_hash(self, key, ciphertext):
        try:
            plaintext = aead_open(key, bytes(12), ciphertext, self.h)
        except CryptoError:
            raise NoiseError("handshake message did not decrypt") from None
        self.mix_hash(ciphertext)
        return plaintext

    def split(self):
        """The two transport keys: initiator-to-responder, then back."""
        return noise_hkdf(self.ck, b"", 2)


class NoiseCipher:
    """One direction of a transport: a key and its big-endian counter."""

    def __init__(self, key):
        self.key = key
        self.counter = 0

    def _next_nonce(self):
        if self.counter >= 2**64 - 1:
            raise NoiseError("nonce space exhausted")
        nonce = bytes(4) + self.counter.to_bytes(8, "big")
        self.counter += 1
        return nonce

    def seal(self, plaintext):
        return aead_seal(self.key, self._next_nonce(), plaintext)

    def open(self, ciphertext):
        try:
            return aead_open(self.key, self._next_nonce(), ciphertext)
        except CryptoError:
            raise NoiseError("transport record did not decrypt") from None


@dataclasses.dataclass
class NoiseSession:
    """The result of a handshake: the peer's static key and both ciphers."""
    peer_static: bytes
    version: int
    send: NoiseCipher
    recv: NoiseCipher


def initiation_version(message):
    """The protocol version in an initiation message, checking its frame."""
    if len(message) != INITIATION_LEN:
        raise NoiseError(f"handshake initiation must be {INITIATION_LEN} bytes, got {len(message)}")
    version, mtype, length = struct.unpack(">HBH", message[:5])
    if mtype != MSG_INITIATION:
        raise NoiseError(f"unexpected handshake message type {mtype}")
    if length != INITIATION_LEN - 5:
        raise NoiseError("wrong handshake initiation length")
    return version


def noise_respond(static_private, message):
    """Responder side of IK: (response message, NoiseSession)."""
    version = initiation_version(message)
    ss = SymmetricState(version)
    ss.mix_hash(x25519_public(static_private))
    their_ephemeral = message[5:37]
    ss.mix_hash(their_ephemeral)
    key = ss.mix_dh(static_private, their_ephemeral)                 # es
    their_static = ss.decrypt_and_hash(key, message[37:85])
    key = ss.mix_dh(static_private, their_static)                    # ss
    ss.decrypt_and_hash(key, message[85:101])
    ephemeral = new_private_key()
    ephemeral_public = x25519_public(ephemeral)
    ss.mix_hash(ephemeral_public)
    ss.mix_dh(ephemeral, their_ephemeral)                            # ee
    key = ss.mix_dh(ephemeral, their_static)                         # se
    tag = ss.encrypt_and_hash(key, b"")
    response = struct.pack(">BH", MSG_RESPONSE, RESPONSE_LEN - HEADER_LEN) + ephemeral_public + tag
    to_responder, to_initiator = ss.split()
    return response, NoiseSession(their_static, version, NoiseCipher(to_initiator), NoiseCipher(to_responder))


def noise_initiate(static_private, server_public, version):
    """Initiator side of IK: (initiation message, finish(response) -> NoiseSession)."""
    ss = SymmetricState(version)
    ss.mix_hash(server_public)
    ephemeral = new_private_key()
    ephemeral_public = x25519_public(ephemeral)
    ss.mix_hash(ephemeral_public)
    key = ss.mix_dh(ephemeral, server_public)                        # es
    sealed_static = ss.encrypt_and_hash(key, x25519_public(static_private))
    key = ss.mix_dh(static_private, server_public)                   # ss
    tag = ss.encrypt_and_hash(key, b"")
    message = struct.pack(">HBH", version, MSG_INITIATION, INITIATION_LEN - 5) + ephemeral_public + sealed_static + tag

    def finish(response):
        if len(response) < HEADER_LEN:
            raise NoiseError("short handshake response")
        mtype, length = struct.unpack(">BH", response[:3])
        if mtype == MSG_ERROR:
            raise NoiseError("server refused: " + response[3:3 + length].decode(errors="replace"))
        if mtype != MSG_RESPONSE or length != RESPONSE_LEN - HEADER_LEN or len(response) != RESPONSE_LEN:
            raise NoiseError("malformed handshake response")
        their_ephemeral = response[3:35]
        ss.mix_hash(their_ephemeral)
        ss.mix_dh(ephemeral, their_ephemeral)                        # ee
        key = ss.mix_dh(static_private, their_ephemeral)             # se
        ss.decrypt_and_hash(key, response[35:51])
        to_responder, to_initiator = ss.split()
        return NoiseSession(server_public, version, NoiseCipher(to_responder), NoiseCipher(to_initiator))

    return message, finish


def seal_records(cipher, data):
    """Split plaintext into sealed transport records, ready to write."""
    out = bytearray()
    for i in range(0, len(data), MAX_RECORD_PLAINTEXT):
        sealed = cipher.seal(data[i:i + MAX_RECORD_PLAINTEXT])
        out += struct.pack(">BH", MSG_RECORD, len(sealed)) + sealed
    return bytes(out)


async def read_record(reader, cipher):
    """Read one transport record from a stream and return its plaintext."""
    header = await reader.readexactly(HEADER_LEN)
    mtype, length = struct.unpack(">BH", header)
    if mtype != MSG_RECORD:
        raise NoiseError(f"unexpected record type {mtype}")
    if length > MAX_RECORD_LEN - HEADER_LEN or length < 16:
        raise NoiseError(f"record length {length} out of range")
    return cipher.open(await reader.readexactly(length))


# ---- Zstd framing ----
# Clients always ask for zstd and always decode it.  Without a zstd library
# meshbox still emits valid frames made of raw (stored) blocks.

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
ZSTD_MAX_BLOCK = 128 * 1024


def zstd_raw_frame(data):
    """A valid zstd frame of uncompressed blocks (no library needed)."""
    # Frame header: single segment, 4-byte content size, no checksum.
    out = bytearray(ZSTD_MAGIC + b"\xa0" + struct.pack("<I", len(data)))
    blocks = [data[i:i + ZSTD_MAX_BLOCK] for i in range(0, len(data), ZSTD_MAX_BLOCK)] or [b""]
    for i, block in enumerate(blocks):
        last = 1 if i == len(blocks) - 1 else 0
        out += (len(block) << 3 | last).to_bytes(3, "little") + block
    return bytes(out)


if _zstd_std is not None:
    def zstd_compress(data):
        """Compress one map message into a zstd frame."""
        return _zstd_std.compress(data, level=3)
elif _zstandard is not None:
    _zstd_compressor = _zstandard.ZstdCompressor(level=3)

    def zstd_compress(data):
        """Compress one map message into a zstd frame."""
        return _zstd_compressor.compress(data)
else:
    zstd_compress = zstd_raw_frame


def map_frame(message):
    """One map-stream message: little-endian length, then the zstd frame."""
    body = zstd_compress(json_bytes(message))
    return struct.pack("<I", len(body)) + body


# ---- WebSocket ----
# Browser-style clients carry the control connection in WebSocket binary
# messages; this adapter gives them the same readexactly/write surface as a
# TCP stream.

WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
WS_OP_CONT, WS_OP_BINARY, WS_OP_CLOSE, WS_OP_PING, WS_OP_PONG = 0x0, 0x2, 0x8, 0x9, 0xA
WS_MAX_MESSAGE = 1 << 20


def websocket_accept_value(client_key):
    """Sec-WebSocket-Accept for a client's Sec-WebSocket-Key."""
    return base64.b64encode(hashlib.sha1(client_key.encode() + WS_GUID).digest()).decode()


def websocket_frame(opcode, payload):
    """One unmasked server frame."""
    n = len(payload)
    if n < 126:
        head = struct.pack(">BB", 0x80 | opcode, n)
    elif n < 65536:
        head = struct.pack(">BBH", 0x80 | opcode, 126, n)
    else:
        head = struct.pack(">BBQ", 0x80 | opcode, 127, n)
    return head + payload


class WebSocketStream:
    """A byte stream over WebSocket binary messages (server side)."""

    def __init__(self, reader, writer):
        self.reader, self.writer = reader, writer
        self.buffer = bytearray()

    async def _read_message(self):
        while True:
            b0, b1 = await self.reader.readexactly(2)
            opcode, masked, n = b0 & 0x0F, b1 & 0x80, b1 & 0x7F
            if n == 126:
                n = struct.unpack(">H", await self.reader.readexactly(2))[0]
            elif n == 127:
                n = struct.unpack(">Q", await self.reader.readexactly(8))[0]
            if n > WS_MAX_MESSAGE:
                raise ConnectionError("websocket frame too large")
            mask = await self.reader.readexactly(4) if masked else b""
            data = bytearray(await self.reader.readexactly(n))
            if mask:
                for i in range(n):
                    data[i] ^= mask[i & 3]
            if opcode == WS_OP_CLOSE:
                raise asyncio.IncompleteReadError(b"", None)
            if opcode == WS_OP_PING:
                self.writer.write(websocket_frame(WS_OP_PONG, bytes(data)))
                continue
            if opcode in (WS_OP_BINARY, WS_OP_CONT):
                return bytes(data)

    async def readexactly(self, n):
        while len(self.buffer) < n:
            self.buffer += await self._read_message()
        out = bytes(self.buffer[:n])
        del self.buffer[:n]
        return out

    def write(self, data):
        self.writer.write(websocket_frame(WS_OP_BINARY, data))

    async def drain(self):
        await self.writer.drain()

    def close(self):
        self.writer.close()


# ---- Store ----
# SQLite in the state folder.  Registrations, deletions and keys commit
# before the client hears back; endpoints and last-seen times live in memory
# and are written at most once a minute (routers write to flash).

SCHEMA = """
CREATE TABLE IF NOT EXISTS secrets (name TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS users (
    id INTEGER PRIMARY KEY, name TEXT UNIQUE NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS preauth_keys (
    id INTEGER PRIMARY KEY, prefix TEXT NOT NULL, hash TEXT UNIQUE NOT NULL,
    user_id INTEGER NOT NULL REFERENCES users(id), reusable INTEGER NOT NULL,
    ephemeral INTEGER NOT NULL, tags TEXT NOT NULL, created REAL NOT NULL,
    expiration REAL, used INTEGER NOT NULL DEFAULT 0, revoked INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS nodes (
    id INTEGER PRIMARY KEY, machine_key BLOB UNIQUE NOT NULL, node_key BLOB UNIQUE NOT NULL,
    disco_key BLOB, user_id INTEGER NOT NULL REFERENCES users(id), hostname TEXT NOT NULL,
    given_name TEXT UNIQUE NOT NULL, ipv4 TEXT UNIQUE NOT NULL, ipv6 TEXT UNIQUE NOT NULL,
    tags TEXT NOT NULL, ephemeral INTEGER NOT NULL, auth_key_id INTEGER,
    expiry REAL, created REAL NOT NULL, last_seen REAL, hostinfo TEXT NOT NULL,
    endpoints TEXT NOT NULL, approved_routes TEXT NOT NULL DEFAULT '[]', cap INTEGER NOT NULL DEFAULT 0);
"""

PREAUTH_KEY_PREFIX = "mskey-"


class StoreError(Exception):
    """The state database could not be read or written (disk full, read-only...)."""


@dataclasses.dataclass
class User:
    """A person (or owner of devices) in the tailnet."""
    id: int
    name: str
    created: float


@dataclasses.dataclass
class Node:
    """A registered machine: durable fields from the store, live ones in memory."""
    id: int
    machine_key: bytes
    node_key: bytes
    disco_key: bytes
    user_id: int
    hostname: str
    given_name: str
    ipv4: str
    ipv6: str
    tags: list
    ephemeral: bool
    auth_key_id: int
    expiry: float
    created: float
    last_seen: float
    hostinfo: dict
    endpoints: list
    approved_routes: list
    cap: int
    online: bool = False

    @classmethod
    def from_row(cls, row):
        return cls(
            id=row["id"], machine_key=row["machine_key"], node_key=row["node_key"],
            disco_key=row["disco_key"] or b"", user_id=row["user_id"], hostname=row["hostname"],
            given_name=row["given_name"], ipv4=row["ipv4"], ipv6=row["ipv6"],
            tags=json.loads(row["tags"]), ephemeral=bool(row["ephemeral"]),
            auth_key_id=row["auth_key_id"], expiry=row["expiry"], created=row["created"],
            last_seen=row["last_seen"], hostinfo=json.loads(row["hostinfo"]),
            endpoints=json.loads(row["endpoints"]),
            approved_routes=json.loads(row["approved_routes"]), cap=row["cap"])

    def durable_fields(self):
        """The fields a CLI edit can change (compared on reload)."""
        return (self.node_key, self.user_id, self.given_name, self.tags, self.expiry,
                self.approved_routes, self.ipv4, self.ipv6)


def hash_secret(secret):
    """Keys are stored hashed; the prefix alone is kept for display."""
    return hashlib.sha256(secret.encode()).hexdigest()


class Store:
    """The SQLite state: every method commits before it returns."""

    def __init__(self, path):
        self.path = path
        try:
            self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=10)
            self.db.row_factory = sqlite3.Row
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.execute("PRAGMA foreign_keys=ON")
            self.db.executescript(SCHEMA)
        except sqlite3.Error as e:
            raise StoreError(f"cannot open state database {path}: {e}") from e

    def transaction(self):
        """A write transaction: ``with store.transaction(): ...``."""
        return _Transaction(self.db)

    def data_version(self):
        """Changes when another process (the CLI) commits."""
        return self.db.execute("PRAGMA data_version").fetchone()[0]

    # secrets
    def secret(self, name, make):
        """A server secret, created (by ``make()``) and stored on first use."""
        row = self.db.execute("SELECT value FROM secrets WHERE name=?", (name,)).fetchone()
        if row:
            return bytes(row[0])
        value = make()
        with self.transaction():
            self.db.execute("INSERT OR IGNORE INTO secrets(name, value) VALUES(?, ?)", (name, value))
        return bytes(self.db.execute("SELECT value FROM secrets WHERE name=?", (name,)).fetchone()[0])

    # users
    def create_user(self, name):
        if not name or len(name) > 63 or any(c.isspace() for c in name):
            raise ValueError(f"bad user name {name!r}: use 1-63 characters, no spaces")
        try:
            with self.transaction():
                cur = self.db.execute("INSERT INTO users(name, created) VALUES(?, ?)", (name, now()))
        except sqlite3.IntegrityError:
            raise ValueError(f"user {name!r} already exists") from None
        return User(cur.lastrowid, name, now())

    def users(self):
        return [User(r["id"], r["name"], r["created"]) for r in self.db.execute("SELECT * FROM users ORDER BY id")]

    def user_named(self, name):
        row = self.db.execute("SELECT * FROM users WHERE name=?", (name,)).fetchone()
        if not row:
            raise ValueError(f"no user named {name!r} (create it with: users create {name})")
        return User(row["id"], row["name"], row["created"])

    def delete_user(self, name):
        user = self.user_named(name)
        if self.db.execute("SELECT 1 FROM nodes WHERE user_id=?", (user.id,)).fetchone():
            raise ValueError(f"user {name!r} still owns nodes; delete them first")
        with self.transaction():
            self.db.execute("DELETE FROM preauth_keys WHERE user_id=?", (user.id,))
            self.db.execute("DELETE FROM users WHERE id=?", (user.id,))

    # pre-auth keys
    def create_preauth_key(self, user_id, reusable, ephemeral, expiration, tags):
        """Store a new key; returns the secret, which is shown only once."""
        secret = PREAUTH_KEY_PREFIX + secrets.token_hex(24)
        with self.transaction():
            self.db.execute(
                "INSERT INTO preauth_keys(prefix, hash, user_id, reusable, ephemeral, tags, created, expiration)"
                " VALUES(?,?,?,?,?,?,?,?)",
                (secret[:14], hash_secret(secret), user_id, int(reusable), int(ephemeral),
                 json.dumps(tags), now(), expiration))
        return secret

    def preauth_keys(self):
        return [dict(r) for r in self.db.execute(
            "SELECT k.*, u.name AS user FROM preauth_keys k JOIN users u ON u.id=k.user_id ORDER BY k.id")]

    def preauth_key(self, secret_or_prefix):
        """A key row by its secret, or by its displayed prefix."""
        row = self.db.execute("SELECT * FROM preauth_keys WHERE hash=?", (hash_secret(secret_or_prefix),)).fetchone()
        if row is None and len(secret_or_prefix) >= 10:
            rows = self.db.execute("SELECT * FROM preauth_keys WHERE prefix=?", (secret_or_prefix,)).fetchall()
            row = rows[0] if len(rows) == 1 else None
        return dict(row) if row else None

    def expire_preauth_key(self, secret_or_prefix):
        row = self.preauth_key(secret_or_prefix)
        if not row:
            raise ValueError("no such pre-auth key")
        with self.transaction():
            self.db.execute("UPDATE preauth_keys SET revoked=1 WHERE id=?", (row["id"],))

    # nodes
    def nodes(self):
        return [Node.from_row(r) for r in self.db.execute("SELECT * FROM nodes ORDER BY id")]

    def insert_node(self, node):
        """Insert a node (inside the caller's transaction); sets node.id."""
        cur = self.db.execute(
            "INSERT INTO nodes(machine_key, node_key, disco_key, user_id, hostname, given_name, ipv4, ipv6,"
            " tags, ephemeral, auth_key_id, expiry, created, last_seen, hostinfo, endpoints, approved_routes, cap)"
            " VALUES(?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (node.machine_key, node.node_key, node.disco_key, node.user_id, node.hostname, node.given_name,
             node.ipv4, node.ipv6, json.dumps(node.tags), int(node.ephemeral), node.auth_key_id, node.expiry,
             node.created, node.last_seen, json.dumps(node.hostinfo), json.dumps(node.endpoints),
             json.dumps(node.approved_routes), node.cap))
        node.id = cur.lastrowid

    def update_node(self, node_id, **fields):
        """Update durable fields of one node (inside or outside a transaction)."""
        encoded = {k: json.dumps(v) if k in ("tags", "hostinfo", "endpoints", "approved_routes") else v
                   for k, v in fields.items()}
        sets = ", ".join(f"{k}=?" for k in encoded)
        self.db.execute(f"UPDATE nodes SET {sets} WHERE id=?", (*encoded.values(), node_id))

    def delete_node(self, node_id):
        self.db.execute("DELETE FROM nodes WHERE id=?", (node_id,))


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT, rolled back on error; disk errors become StoreError."""

    def __init__(self, db):
        self.db = db

    def __enter__(self):
        try:
            self.db.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as e:
            raise StoreError(f"state database unavailable: {e}") from e
        return self.db

    def __exit__(self, kind, value, tb):
        if kind is None:
            try:
                self.db.execute("COMMIT")
                return False
            except sqlite3.Error as e:
                self.db.execute("ROLLBACK")
                raise StoreError(f"could not save state: {e}") from e
        self.db.execute("ROLLBACK")
        if isinstance(value, sqlite3.OperationalError):
            raise StoreError(f"could not save state: {value}") from value
        return False


# ---- Addresses ----

DEFAULT_PREFIX_V4 = "100.64.0.0/10"
DEFAULT_PREFIX_V6 = "fd7a:115c:a1e0::/48"
# 100.100.100.0/24 holds Tailscale's service addresses (100.100.100.100 DNS).
RESERVED_V4 = ipaddress.ip_network("100.100.100.0/24")


def allocate_addresses(prefix_v4, prefix_v6, taken_v4, taken_v6):
    """The lowest free IPv4 in the prefix and the IPv6 at the same offset."""
    net4, net6 = ipaddress.ip_network(prefix_v4), ipaddress.ip_network(prefix_v6)
    for offset in range(1, net4.num_addresses - 1):
        addr4 = net4.network_address + offset
        if addr4 in RESERVED_V4 or str(addr4) in taken_v4:
            continue
        addr6 = net6.network_address + offset
        if str(addr6) in taken_v6:
            continue
        return str(addr4), str(addr6)
    raise ValueError(f"address pool {prefix_v4} is exhausted")


# ---- Policy ----
# Until the ACL compiler lands every node may reach and see every other one,
# as Headscale does with no policy.  The map builder asks only these two
# functions.

ALLOW_ALL_FILTER = [{"SrcIPs": ["*"], "DstPorts": [{"IP": "*", "Ports": {"First": 0, "Last": 65535}}]}]


def packet_filter_for(node, nodes):
    """The PacketFilter rules a node enforces on traffic it receives."""
    return ALLOW_ALL_FILTER


def visible_peers(node, nodes):
    """The nodes a node is shown in its netmap."""
    return [peer for peer in nodes if peer.id != node.id]


# ---- Map builder ----
# Pure: node records and settings in, tailcfg JSON out.

DERP_REGION_ID = 900
LEGACY_DERP_IP = "127.3.3.40"       # clients' magic address for "DERP region N"


def sanitize_hostname(hostname):
    """A DNS label from a client's hostname (lower case, a-z0-9-, at most 63)."""
    label = "".join(c if c.isalnum() and c.isascii() else "-" for c in (hostname or "").lower())
    label = "-".join(part for part in label.split("-") if part)[:63].strip("-")
    return label or "node"


def home_derp(node):
    """The DERP region a node reports as its home, 0 when it has none."""
    netinfo = node.hostinfo.get("NetInfo") or {}
    region = netinfo.get("PreferredDERP") or 0
    return region if isinstance(region, int) else 0


def user_profile(user):
    """tailcfg.UserProfile for a user."""
    return {"ID": user.id, "LoginName": user.name, "DisplayName": user.name}


def is_expired(node, at):
    return bool(node.expiry) and node.expiry <= at


def node_json(node, base_domain, at):
    """A node as tailcfg.Node, as its peers (and itself) see it."""
    addresses = [f"{node.ipv4}/32", f"{node.ipv6}/128"]
    region = home_derp(node)
    out = {
        "ID": node.id,
        "StableID": f"n{node.id}",
        "Name": f"{node.given_name}.{base_domain}.",
        "User": node.user_id,
        "Key": key_text("nodekey", node.node_key),
        "Machine": key_text("mkey", node.machine_key),
        "Addresses": addresses,
        "AllowedIPs": addresses + list(node.approved_routes),
        "Endpoints": list(node.endpoints),
        "Hostinfo": node.hostinfo,
        "Created": rfc3339(node.created),
        "Cap": node.cap,
        "Tags": list(node.tags),
        "MachineAuthorized": True,
        "Online": node.online,
        "ComputedName": node.given_name,
        "ComputedNameWithHost": node.given_name,
    }
    if node.disco_key:
        out["DiscoKey"] = key_text("discokey", node.disco_key)
    if region:
        out["HomeDERP"] = region
        out["DERP"] = f"{LEGACY_DERP_IP}:{region}"
    if node.expiry:
        out["KeyExpiry"] = rfc3339(node.expiry)
        if is_expired(node, at):
            out["Expired"] = True
    if node.last_seen and not node.online:
        out["LastSeen"] = rfc3339(node.last_seen)
    return out


def dns_config(base_domain, nameservers):
    """tailcfg.DNSConfig: MagicDNS names under the base domain."""
    config = {"Domains": [base_domain], "Proxied": True}
    if nameservers:
        config["Resolvers"] = [{"Addr": ns} for ns in nameservers]
    return config


def derp_map(host, derp_port, stun_port, cert_name):
    """tailcfg.DERPMap with meshbox's own relay as the only region."""
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        addr = None
    node = {
        "Name": f"{DERP_REGION_ID}a", "RegionID": DERP_REGION_ID, "HostName": host,
        "IPv4": str(addr) if addr and addr.version == 4 else ("none" if addr else ""),
        "IPv6": str(addr) if addr and addr.version == 6 else ("none" if addr else ""),
        "STUNPort": stun_port if stun_port else -1,
        "DERPPort": derp_port,
    }
    if cert_name:
        node["CertName"] = cert_name
    region = {"RegionID": DERP_REGION_ID, "RegionCode": "meshbox", "RegionName": "meshbox", "Nodes": [node]}
    return {"Regions": {str(DERP_REGION_ID): region}, "OmitDefaultRegions": True}


@dataclasses.dataclass
class MapSettings:
    """Tailnet-wide parts of every MapResponse."""
    base_domain: str
    derp_map: dict
    dns_config: dict


def map_response_for(node, peers, users, settings, at):
    """The full MapResponse for one node: itself, its peers and the tailnet settings."""
    peer_nodes = visible_peers(node, peers)
    user_ids = {node.user_id} | {p.user_id for p in peer_nodes}
    return {
        "Node": node_json(node, settings.base_domain, at),
        "Peers": [node_json(p, settings.base_domain, at) for p in peer_nodes],
        "DERPMap": settings.derp_map,
        "DNSConfig": settings.dns_config,
        "Domain": settings.base_domain,
        "PacketFilter": packet_filter_for(node, peers),
        "UserProfiles": [user_profile(users[uid]) for uid in sorted(user_ids) if uid in users],
        "ControlTime": rfc3339(at),
    }


# ---- Coordinator ----
# The live tailnet: registration, map sessions and the fan-out of changes.
# Each map session keeps the set of node IDs whose view it owes its client;
# a change marks those sets and wakes the sessions, so a slow client only
# delays itself and its backlog never grows past one entry per node.

KEEPALIVE_INTERVAL = 50      # seconds; clients give up after 120 s of silence
FLUSH_INTERVAL = 60          # seconds between writes of live fields (flash)
RELOAD_INTERVAL = 0.5        # seconds between checks for CLI edits
UPDATE_BATCH_DELAY = 0.05    # let a burst of changes go out as one message


class RegistrationRefused(Exception):
    """A registration that must fail with a message the client shows."""

    def __init__(self, reason, message):
        super().__init__(message)
        self.reason = reason


class MapRefused(Exception):
    """A map request that cannot be served; status is the HTTP code to answer."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status = status


class MapSession:
    """One client's streaming map: what it is owed and a wake-up event."""

    def __init__(self, node_id):
        self.node_id = node_id
        self.changed = set()
        self.removed = set()
        self.self_changed = False
        self.full = False
        self.closed = False
        self.wake = asyncio.Event()

    def owe(self, changed=(), removed=(), full=False):
        for node_id in changed:
            if node_id == self.node_id:
                self.self_changed = True
            else:
                self.changed.add(node_id)
                self.removed.discard(node_id)
        for node_id in removed:
            if node_id == self.node_id:
                self.close()
            self.removed.add(node_id)
            self.changed.discard(node_id)
        self.full = self.full or full
        self.wake.set()

    def close(self):
        self.closed = True
        self.wake.set()


def parse_go_time(text):
    """A Go time.Time JSON string to epoch seconds; None for the zero time."""
    if not text or text.startswith("0001-01-01"):
        return None
    text = text.rstrip("Z").split("+")[0]
    base, _, frac = text.partition(".")
    try:
        ts = time.mktime(time.strptime(base, "%Y-%m-%dT%H:%M:%S")) - time.timezone
    except ValueError:
        raise ValueError(f"bad time {text!r}") from None
    return ts + (float("0." + frac) if frac.isdigit() else 0)


class Coordinator:
    """The tailnet as the server sees it; all state changes go through here."""

    def __init__(self, store, settings, prefix_v4=DEFAULT_PREFIX_V4, prefix_v6=DEFAULT_PREFIX_V6):
        self.store = store
        self.settings = settings
        self.prefix_v4, self.prefix_v6 = prefix_v4, prefix_v6
        self.users = {u.id: u for u in store.users()}
        self.nodes = {n.id: n for n in store.nodes()}
        self.sessions = {}           # node id -> set of MapSession
        self.dirty_live = set()      # node ids whose live fields await a flush
        self.data_version = store.data_version()

    # lookups
    def node_by_machine(self, machine_key):
        return next((n for n in self.nodes.values() if n.machine_key == machine_key), None)

    def node_by_node_key(self, node_key):
        return next((n for n in self.nodes.values() if n.node_key == node_key), None)

    # fan-out
    def notify(self, changed=(), removed=(), full=False):
        """Tell every map session which nodes changed or went away."""
        for sessions in self.sessions.values():
            for session in sessions:
                session.owe(changed, removed, full)

    def map_message(self, session, at=None):
        """The next message a session owes its client, or None."""
        at = at or now()
        node = self.nodes.get(session.node_id)
        if node is None:
            session.close()
            return None
        if session.full:
            session.full, session.self_changed = False, False
            session.changed.clear(), session.removed.clear()
            return map_response_for(node, list(self.nodes.values()), self.users, self.settings, at)
        msg = {}
        visible = {p.id for p in visible_peers(node, [self.nodes[i] for i in session.changed if i in self.nodes])}
        changed = [node_json(self.nodes[i], self.settings.base_domain, at) for i in sorted(visible)]
        if changed:
            msg["PeersChanged"] = changed
            new_users = {self.nodes[i].user_id for i in visible}
            msg["UserProfiles"] = [user_profile(self.users[u]) for u in sorted(new_users) if u in self.users]
        if session.removed:
            msg["PeersRemoved"] = sorted(session.removed)
        if session.self_changed:
            msg["Node"] = node_json(node, self.settings.base_domain, at)
        session.changed.clear(), session.removed.clear()
        session.self_changed = False
        return msg or None

    def open_session(self, node):
        session = MapSession(node.id)
        session.full = True
        first = not self.sessions.get(node.id)
        self.sessions.setdefault(node.id, set()).add(session)
        if first:
            node.online = True
            log.info("map session start: node %d %s", node.id, node.given_name)
            self.notify(changed=[node.id])
        return session

    def close_session(self, session):
        sessions = self.sessions.get(session.node_id, set())
        sessions.discard(session)
        session.close()
        node = self.nodes.get(session.node_id)
        if not sessions:
            self.sessions.pop(session.node_id, None)
            if node:
                node.online = False
                node.last_seen = now()
                self.dirty_live.add(node.id)
                log.info("map session end: node %d %s", node.id, node.given_name)
                self.notify(changed=[node.id])

    # registration
    def _check_auth_key(self, secret, at):
        row = self.store.preauth_key(secret) if secret else None
        if row is None:
            raise RegistrationRefused("unknown_key", "invalid auth key: no such pre-auth key on this server")
        if row["revoked"]:
            raise RegistrationRefused("expired_key", "auth key expired: it was revoked on the server")
        if row["expiration"] and row["expiration"] <= at:
            raise RegistrationRefused("expired_key", "auth key expired at " + rfc3339(row["expiration"]))
        if not row["reusable"] and row["used"]:
            raise RegistrationRefused("spent_key", "auth key already used: it is a single-use key")
        return row

    def _unique_given_name(self, hostname, exclude_id=None):
        base = sanitize_hostname(hostname)
        taken = {n.given_name for n in self.nodes.values() if n.id != exclude_id}
        name, i = base, 1
        while name in taken:
            name = f"{base[:58]}-{i}"
            i += 1
        return name

    def register(self, machine_key, req):
        """Handle a RegisterRequest; returns the RegisterResponse body."""
        at = now()
        try:
            node_key = key_bytes(req.get("NodeKey"), "nodekey")
            old_text = req.get("OldNodeKey") or ""
            old_key = key_bytes(old_text, "nodekey") if old_text and old_text != key_text("nodekey", bytes(32)) else None
            expiry = parse_go_time(req.get("Expiry"))
        except (ValueError, TypeError) as e:
            raise RegistrationRefused("malformed", f"malformed register request: {e}") from None
        auth = req.get("Auth") or {}
        secret = auth.get("AuthKey") or ""
        hostinfo = req.get("Hostinfo") if isinstance(req.get("Hostinfo"), dict) else {}
        node = self.node_by_machine(machine_key)
        holder = self.node_by_node_key(node_key)
        if holder and holder.machine_key != machine_key:
            raise RegistrationRefused("key_in_use", "node key already belongs to another machine")

        if node and not secret and node.node_key in (node_key, old_key):
            if expiry and expiry <= at:
                return self._logout(node, at)
            if node.node_key != node_key:          # client-driven key rotation
                with self.store.transaction():
                    self.store.update_node(node.id, node_key=node_key)
                node.node_key = node_key
                log.info("node key rotated: node %d %s", node.id, node.given_name)
                self.notify(changed=[node.id])
            if is_expired(node, at):
                return {"NodeKeyExpired": True, "MachineAuthorized": False}
            return self._registered_response(node)
        if not secret:
            raise RegistrationRefused(
                "no_key", "this server needs a pre-auth key: create one with "
                "'meshbox preauthkeys create --user NAME' and pass it with --auth-key")

        key_row = self._check_auth_key(secret, at)
        tags = json.loads(key_row["tags"])
        with self.store.transaction():
            if not key_row["reusable"]:
                cur = self.store.db.execute("UPDATE preauth_keys SET used=used+1 WHERE id=? AND used=0", (key_row["id"],))
                if cur.rowcount != 1:
                    raise RegistrationRefused("spent_key", "auth key already used: it is a single-use key")
            else:
                self.store.db.execute("UPDATE preauth_keys SET used=used+1 WHERE id=?", (key_row["id"],))
            if node:
                self.store.update_node(node.id, node_key=node_key, user_id=key_row["user_id"], tags=tags,
                                       ephemeral=key_row["ephemeral"], auth_key_id=key_row["id"], expiry=None,
                                       hostinfo=hostinfo or node.hostinfo)
                node.node_key, node.user_id, node.tags = node_key, key_row["user_id"], tags
                node.ephemeral, node.auth_key_id, node.expiry = bool(key_row["ephemeral"]), key_row["id"], None
                node.hostinfo = hostinfo or node.hostinfo
                verb = "re-registered"
            else:
                taken4 = {n.ipv4 for n in self.nodes.values()}
                taken6 = {n.ipv6 for n in self.nodes.values()}
                ipv4, ipv6 = allocate_addresses(self.prefix_v4, self.prefix_v6, taken4, taken6)
                hostname = str(hostinfo.get("Hostname") or "node")[:255]
                node = Node(id=0, machine_key=machine_key, node_key=node_key, disco_key=b"",
                            user_id=key_row["user_id"], hostname=hostname,
                            given_name=self._unique_given_name(hostname), ipv4=ipv4, ipv6=ipv6, tags=tags,
                            ephemeral=bool(key_row["ephemeral"]), auth_key_id=key_row["id"], expiry=None,
                            created=at, last_seen=at, hostinfo=hostinfo, endpoints=[], approved_routes=[], cap=0)
                self.store.insert_node(node)
                verb = "registered"
        self.nodes[node.id] = node
        self.users.setdefault(node.user_id, next(u for u in self.store.users() if u.id == node.user_id))
        log.info("%s node %d %s (%s, %s) for user %s", verb, node.id, node.given_name, node.ipv4, node.ipv6,
                 self.users[node.user_id].name)
        self.notify(changed=[node.id])
        return self._registered_response(node)

    def _registered_response(self, node):
        profile = user_profile(self.users[node.user_id])
        return {"User": profile, "Login": profile, "MachineAuthorized": True, "NodeKeyExpired": False}

    def _logout(self, node, at):
        if node.ephemeral:
            self.delete_node(node.id)
        else:
            with self.store.transaction():
                self.store.update_node(node.id, expiry=at)
            node.expiry = at
            self.notify(changed=[node.id])
        log.info("logout: node %d %s", node.id, node.given_name)
        return {"NodeKeyExpired": True, "MachineAuthorized": False}

    # map requests
    def node_for_map(self, machine_key, req):
        """Check a MapRequest and apply what it reports; returns the node."""
        node = self.node_by_machine(machine_key)
        if node is None:
            raise MapRefused(401, "machine not registered")
        try:
            node_key = key_bytes(req.get("NodeKey"), "nodekey")
        except ValueError as e:
            raise MapRefused(400, str(e)) from None
        if node_key != node.node_key:
            raise MapRefused(401, "node key does not match the registered one")
        if is_expired(node, now()):
            raise MapRefused(401, "node key expired: re-authenticate")
        if req.get("ReadOnly"):
            return node
        changed = False
        disco = req.get("DiscoKey")
        if disco:
            try:
                disco = key_bytes(disco, "discokey")
            except ValueError as e:
                raise MapRefused(400, str(e)) from None
            changed |= disco != node.disco_key
            node.disco_key = disco
        endpoints = req.get("Endpoints")
        if isinstance(endpoints, list):
            endpoints = [str(e) for e in endpoints[:64]]
            changed |= endpoints != node.endpoints
            node.endpoints = endpoints
        hostinfo = req.get("Hostinfo")
        if isinstance(hostinfo, dict) and hostinfo != node.hostinfo:
            node.hostinfo, changed = hostinfo, True
        version = req.get("Version")
        if isinstance(version, int) and version != node.cap:
            node.cap, changed = version, True
        if changed:
            self.dirty_live.add(node.id)
            self.notify(changed=[node.id])
        return node

    # administrative changes (CLI and API)
    def delete_node(self, node_id):
        with self.store.transaction():
            self.store.delete_node(node_id)
        node = self.nodes.pop(node_id, None)
        self.dirty_live.discard(node_id)
        if node:
            log.info("deleted node %d %s", node.id, node.given_name)
        self.notify(removed=[node_id])

    def reload_if_changed(self):
        """Pick up edits another process (the CLI) committed to the store."""
        version = self.store.data_version()
        if version == self.data_version:
            return
        self.data_version = version
        self.users = {u.id: u for u in self.store.users()}
        fresh = {n.id: n for n in self.store.nodes()}
        removed = [i for i in self.nodes if i not in fresh]
        changed = []
        for node_id, new in fresh.items():
            old = self.nodes.get(node_id)
            if old is None:
                self.nodes[node_id] = new
                changed.append(node_id)
            elif old.durable_fields() != new.durable_fields():
                for field in ("node_key", "user_id", "given_name", "tags", "expiry", "approved_routes"):
                    setattr(old, field, getattr(new, field))
                changed.append(node_id)
        for node_id in removed:
            self.nodes.pop(node_id)
            self.dirty_live.discard(node_id)
        if changed or removed:
            log.info("state changed on disk: %d node(s) changed, %d removed", len(changed), len(removed))
            self.notify(changed=changed, removed=removed)

    def flush_live(self):
        """Write endpoints, disco keys, host info and last-seen times."""
        if not self.dirty_live:
            return
        with self.store.transaction():
            for node_id in self.dirty_live:
                node = self.nodes.get(node_id)
                if node:
                    self.store.update_node(node_id, disco_key=node.disco_key, endpoints=node.endpoints,
                                           hostinfo=node.hostinfo, last_seen=node.last_seen, cap=node.cap)
        self.dirty_live.clear()


# ---- HTTP front ----
# The little HTTP/1.1 that meshbox needs, on asyncio streams (http.server
# would pull in the email package, which OpenWrt ships separately).

MAX_HEADER_LINE = 8192
MAX_HEADERS = 64
HTTP_REASONS = {101: "Switching Protocols", 200: "OK", 204: "No Content", 400: "Bad Request",
                401: "Unauthorized", 403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed",
                413: "Payload Too Large", 426: "Upgrade Required", 500: "Internal Server Error",
                501: "Not Implemented", 503: "Service Unavailable"}


class HttpError(Exception):
    """A request that gets an HTTP error status and a one-line reason."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status = status


@dataclasses.dataclass
class HttpRequest:
    """A parsed HTTP/1.1 request head."""
    method: str
    path: str
    query: dict
    headers: dict   # lower-case names


def parse_query(text):
    """``a=1&b=2`` into a dict of the last value of each name (percent-decoded)."""
    out = {}
    for part in text.split("&"):
        if part:
            name, _, value = part.partition("=")
            out[_percent_decode(name)] = _percent_decode(value)
    return out


def _percent_decode(text):
    raw = text.replace("+", " ").encode()
    out, i = bytearray(), 0
    while i < len(raw):
        pair = raw[i + 1:i + 3]
        if raw[i] == 0x25 and len(pair) == 2 and all(c in b"0123456789abcdefABCDEF" for c in pair):
            out.append(int(pair, 16))
            i += 3
        else:
            out.append(raw[i])
            i += 1
    return out.decode(errors="replace")


async def read_http_request(reader):
    """Read a request head; None on a clean close before any byte."""
    try:
        line = await reader.readuntil(b"\r\n")
    except asyncio.IncompleteReadError as e:
        if not e.partial:
            return None
        raise HttpError(400, "truncated request line") from None
    except asyncio.LimitOverrunError:
        raise HttpError(400, "request line too long") from None
    parts = line.decode("latin-1").strip().split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise HttpError(400, "malformed request line")
    method, target, _ = parts
    headers = {}
    for _ in range(MAX_HEADERS + 1):
        try:
            line = await reader.readuntil(b"\r\n")
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            raise HttpError(400, "malformed header") from None
        if line == b"\r\n":
            break
        name, sep, value = line.decode("latin-1").partition(":")
        if not sep:
            raise HttpError(400, "malformed header line")
        headers[name.strip().lower()] = value.strip()
    else:
        raise HttpError(400, "too many headers")
    path, _, query = target.partition("?")
    return HttpRequest(method.upper(), path, parse_query(query), headers)


def http_response(status, body=b"", content_type="text/plain; charset=utf-8", headers=()):
    """A complete HTTP/1.1 response that closes the connection."""
    if isinstance(body, str):
        body = body.encode()
    head = [f"HTTP/1.1 {status} {HTTP_REASONS.get(status, 'Status')}",
            f"Content-Type: {content_type}", f"Content-Length: {len(body)}", "Connection: close"]
    head += [f"{k}: {v}" for k, v in headers]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def http_upgrade_response(protocol, headers=()):
    """A 101 response switching to `protocol`."""
    lines = ["HTTP/1.1 101 Switching Protocols", f"Upgrade: {protocol}", "Connection: Upgrade"]
    lines += [f"{k}: {v}" for k, v in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


# ---- Control server ----
# ts2021: after the Noise handshake the client speaks HTTP/2 with prior
# knowledge inside transport records.  h2 does the framing; this section
# moves bytes between it and the records and routes the requests.

EARLY_PAYLOAD_MAGIC = b"\xff\xff\xffTS"
MAX_REQUEST_BODY = 1 << 20
CONTROL_HANDSHAKE_TIMEOUT = 30


class ControlConnection:
    """One client's Noise channel carrying HTTP/2 requests."""

    def __init__(self, server, stream, writer, noise, peer):
        self.server, self.stream, self.writer = server, stream, writer
        self.noise, self.peer = noise, peer
        self.machine_key = noise.peer_static
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding="utf-8"))
        self.requests = {}       # stream id -> [headers, body]
        self.tasks = set()
        self.window_open = asyncio.Event()

    def flush(self):
        data = self.h2.data_to_send()
        if data:
            self.writer.write(seal_records(self.noise.send, data))

    async def run(self, early_payload):
        self.writer.write(seal_records(self.noise.send, early_payload))
        self.h2.initiate_connection()
        self.flush()
        try:
            while True:
                data = await read_record(self.stream, self.noise.recv)
                try:
                    events = self.h2.receive_data(data)
                except h2.exceptions.ProtocolError as e:
                    log.info("control %s: HTTP/2 error: %s", self.peer, e)
                    self.flush()
                    return
                for event in events:
                    self.on_event(event)
                self.flush()
                await self.writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        except NoiseError as e:
            log.info("control %s: %s", self.peer, e)
        finally:
            for task in list(self.tasks):
                task.cancel()

    def on_event(self, event):
        if isinstance(event, h2.events.RequestReceived):
            self.requests[event.stream_id] = [dict(event.headers), bytearray()]
            if event.stream_ended:
                self.dispatch(event.stream_id)
        elif isinstance(event, h2.events.DataReceived):
            request = self.requests.get(event.stream_id)
            self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            if request is None:
                return
            request[1] += event.data
            if len(request[1]) > MAX_REQUEST_BODY:
                del self.requests[event.stream_id]
                self.h2.reset_stream(event.stream_id, h2.errors.ErrorCodes.REFUSED_STREAM)
            elif event.stream_ended:
                self.dispatch(event.stream_id)
        elif isinstance(event, h2.events.StreamEnded):
            if event.stream_id in self.requests:
                self.dispatch(event.stream_id)
        elif isinstance(event, (h2.events.WindowUpdated, h2.events.RemoteSettingsChanged)):
            self.window_open.set()
        elif isinstance(event, h2.events.StreamReset):
            self.requests.pop(event.stream_id, None)
            self.window_open.set()

    def dispatch(self, stream_id):
        headers, body = self.requests.pop(stream_id)
        task = asyncio.ensure_future(self.handle(stream_id, headers, bytes(body)))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def respond(self, stream_id, status, content_type="application/json", end=False):
        self.h2.send_headers(stream_id, [(":status", str(status)), ("content-type", content_type)],
                             end_stream=end)
        self.flush()

    async def send(self, stream_id, data, end=False):
        """Send body bytes on a stream, waiting for HTTP/2 flow-control window."""
        view = memoryview(data)
        while view:
            window = min(self.h2.local_flow_control_window(stream_id), self.h2.max_outbound_frame_size)
            if window <= 0:
                self.window_open.clear()
                await self.window_open.wait()
                continue
            chunk, view = view[:window], view[window:]
            self.h2.send_data(stream_id, bytes(chunk), end_stream=end and not view)
            self.flush()
        if end and not data:
            self.h2.end_stream(stream_id)
            self.flush()
        await self.writer.drain()

    async def reply(self, stream_id, status, body, content_type="application/json"):
        if not isinstance(body, bytes):
            body = json_bytes(body) if content_type == "application/json" else str(body).encode()
        self.respond(stream_id, status, content_type, end=not body)
        if body:
            await self.send(stream_id, body, end=True)

    async def handle(self, stream_id, headers, body):
        method, path = headers.get(":method"), headers.get(":path", "").partition("?")[0]
        try:
            try:
                request = json.loads(body) if body else {}
                if not isinstance(request, dict):
                    raise ValueError("expected a JSON object")
            except ValueError as e:
                raise HttpError(400, f"malformed JSON body: {e}") from None
            if method != "POST":
                raise HttpError(405, "control requests must be POST")
            if path == "/machine/register":
                await self.reply(stream_id, 200, self.register(request))
            elif path == "/machine/map":
                await self.serve_map(stream_id, request)
            elif path in ("/machine/update-health", "/machine/set-dns"):
                await self.reply(stream_id, 200, {})
            else:
                raise HttpError(404, f"{path} is not served here")
        except HttpError as e:
            await self.reply(stream_id, e.status, e.args[0] + "\n", "text/plain; charset=utf-8")
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError, ConnectionError):
            pass
        except StoreError as e:
            log.error("%s", e)
            await self.reply(stream_id, 503, "state database unavailable, try again\n", "text/plain; charset=utf-8")

    def register(self, request):
        coordinator = self.server.coordinator
        try:
            return coordinator.register(self.machine_key, request)
        except RegistrationRefused as e:
            log.warning("registration refused (%s) for %s from %s: %s", e.reason,
                        key_text("mkey", self.machine_key)[:16], self.peer, e)
            self.server.refusals[e.reason] = self.server.refusals.get(e.reason, 0) + 1
            return {"Error": str(e)}

    async def serve_map(self, stream_id, request):
        coordinator = self.server.coordinator
        try:
            node = coordinator.node_for_map(self.machine_key, request)
        except MapRefused as e:
            log.info("map refused for %s: %s", self.peer, e)
            raise HttpError(e.status, str(e)) from None
        compress = request.get("Compress") == "zstd"

        def encode(message):
            if compress:
                return map_frame(message)
            body = json_bytes(message)
            return struct.pack("<I", len(body)) + body

        if not request.get("Stream"):
            if request.get("OmitPeers"):
                await self.reply(stream_id, 200, b"")
            else:
                message = map_response_for(node, list(coordinator.nodes.values()), coordinator.users,
                                           coordinator.settings, now())
                self.respond(stream_id, 200)
                await self.send(stream_id, encode(message), end=True)
            return
        self.respond(stream_id, 200)
        session = coordinator.open_session(node)
        keepalive = request.get("KeepAlive", True)
        try:
            while not session.closed:
                session.wake.clear()
                message = coordinator.map_message(session)
                if message:
                    await self.send(stream_id, encode(message))
                try:
                    await asyncio.wait_for(session.wake.wait(), KEEPALIVE_INTERVAL)
                    await asyncio.sleep(UPDATE_BATCH_DELAY)
                except asyncio.TimeoutError:
                    if keepalive:
                        await self.send(stream_id, encode({"KeepAlive": True}))
            self.h2.end_stream(stream_id)
            self.flush()
        finally:
            coordinator.close_session(session)


# ---- Server ----
# ``serve``: the listeners (control HTTP, DERP over TLS, STUN, the local
# admin socket), the background upkeep, and a clean stop.

CONTROL_UPGRADE = "tailscale-control-protocol"
HANDSHAKE_HEADER = "x-tailscale-handshake"


@dataclasses.dataclass
class Config:
    """Settings of ``serve``: defaults < config file < environment < flags."""
    state_dir: str = "meshbox-state"
    listen: str = "127.0.0.1:8080"
    server_url: str = ""        # what clients use as --login-server; default http://LISTEN
    derp_listen: str = ""       # DERP over TLS; default LISTEN's host, port 8443; "off" disables
    stun_listen: str = ""       # STUN; default LISTEN's host, port 3478; "off" disables
    derp_host: str = ""         # address clients dial for DERP and STUN; default SERVER_URL's host
    base_domain: str = "mesh.internal"
    prefix_v4: str = DEFAULT_PREFIX_V4
    prefix_v6: str = DEFAULT_PREFIX_V6
    nameservers: list = dataclasses.field(default_factory=list)
    log_level: str = "info"

    def control_address(self):
        return parse_host_port(self.listen, 8080)

    def derp_address(self):
        if self.derp_listen == "off":
            return None
        return parse_host_port(self.derp_listen or f"[{self.control_address()[0]}]:8443", 8443)

    def stun_address(self):
        if self.stun_listen == "off":
            return None
        return parse_host_port(self.stun_listen or f"[{self.control_address()[0]}]:3478", 3478)

    def public_url(self):
        if self.server_url:
            return self.server_url.rstrip("/")
        host, port = self.control_address()
        return f"http://{'[' + host + ']' if ':' in host else host}:{port}"

    def public_host(self):
        if self.derp_host:
            return self.derp_host
        hostport = self.public_url().split("://", 1)[-1].split("/", 1)[0]
        return parse_host_port(hostport, 0)[0]

    def check(self):
        """Refuse settings that cannot work, saying which and why."""
        for prefix, version in ((self.prefix_v4, 4), (self.prefix_v6, 6)):
            try:
                net = ipaddress.ip_network(prefix)
            except ValueError:
                raise ValueError(f"bad address prefix {prefix!r}") from None
            if net.version != version:
                raise ValueError(f"prefix {prefix} must be IPv{version}")
        if ipaddress.ip_network(self.prefix_v6).prefixlen > 96 or ipaddress.ip_network(self.prefix_v4).prefixlen > 30:
            raise ValueError("address prefixes are too small")
        self.control_address(), self.derp_address(), self.stun_address()
        if not self.public_url().startswith(("http://", "https://")):
            raise ValueError(f"server URL must start with http:// or https://, got {self.server_url!r}")
        if self.public_host() in ("0.0.0.0", "::", ""):
            raise ValueError("listening on a wildcard address: set --server-url to the address clients use")


class Server:
    """A running meshbox: store, coordinator, DERP, STUN and their listeners."""

    def __init__(self, config):
        self.config = config
        self.refusals = {}
        self.listeners = []
        self.tasks = []
        self.connections = {}       # handler task -> its writer, closed on stop
        self.stopping = asyncio.Event()

    def _open_state(self):
        os.makedirs(self.config.state_dir, mode=0o700, exist_ok=True)
        self.store = Store(os.path.join(self.config.state_dir, "meshbox.db"))
        self.noise_private = self.store.secret("noise_private", new_private_key)
        self.challenge_private = self.store.secret("challenge_private", new_private_key)
        self.derp = DerpServer(self.store.secret("derp_private", new_private_key)) if self.config.derp_address() else None

    def _derp_certificate(self):
        """Create (once per DERP host name) the pinned self-signed certificate."""
        host = self.config.public_host()
        seed = self.store.secret("derp_cert_seed", lambda: secrets.token_bytes(32))
        try:
            ips = (str(ipaddress.ip_address(host)),)
        except ValueError:
            ips = ()
        der = self.store.secret(f"derp_cert:{host}", lambda: self_signed_certificate(seed, host, ips))
        cert_path = os.path.join(self.config.state_dir, "derp-cert.pem")
        key_path = os.path.join(self.config.state_dir, "derp-key.pem")
        with open(cert_path, "wb") as f:
            f.write(pem(der, "CERTIFICATE"))
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(ed25519_private_key_pem(seed))
        return tls_server_context(cert_path, key_path), certificate_pin(der)

    async def start(self):
        config = self.config
        config.check()
        self._open_state()
        loop = asyncio.get_running_loop()
        derp_port = stun_port = 0
        cert_name = ""
        if config.derp_address():
            if ssl is None:
                raise RuntimeError("DERP needs TLS but this Python has no ssl module "
                                   "(OpenWrt: opkg install python3-openssl), or use --derp-listen off")
            context, cert_name = self._derp_certificate()
            host, derp_port = config.derp_address()
            self.listeners.append(await asyncio.start_server(
                lambda r, w: self.handle_http(r, w, tls=True), host, derp_port, ssl=context))
        if config.stun_address():
            host, stun_port = config.stun_address()
            transport, _ = await loop.create_datagram_endpoint(StunProtocol, local_addr=(host, stun_port))
            self.stun_transport = transport
        settings = MapSettings(
            base_domain=config.base_domain,
            derp_map=derp_map(config.public_host(), derp_port, stun_port, cert_name) if derp_port else {"Regions": {}},
            dns_config=dns_config(config.base_domain, config.nameservers))
        self.coordinator = Coordinator(self.store, settings, config.prefix_v4, config.prefix_v6)
        host, port = config.control_address()
        self.listeners.append(await asyncio.start_server(self.handle_http, host, port))
        admin_path = os.path.join(config.state_dir, "admin.sock")
        if os.path.exists(admin_path):
            os.unlink(admin_path)
        self.listeners.append(await asyncio.start_unix_server(self.handle_admin, admin_path))
        os.chmod(admin_path, 0o600)
        self.tasks.append(asyncio.ensure_future(self.upkeep()))
        log.info("meshbox %s serving %s (control on %s:%d, DERP %s, STUN %s), state in %s",
                 VERSION, config.public_url(), host, port,
                 f"TLS port {derp_port}" if derp_port else "off", f"port {stun_port}" if stun_port else "off",
                 os.path.abspath(config.state_dir))

    async def upkeep(self):
        """Pick up CLI edits quickly; write live fields sparingly."""
        last_flush = time.monotonic()
        while True:
            await asyncio.sleep(RELOAD_INTERVAL)
            try:
                self.coordinator.reload_if_changed()
                if time.monotonic() - last_flush >= FLUSH_INTERVAL:
                    self.coordinator.flush_live()
                    last_flush = time.monotonic()
            except (StoreError, sqlite3.Error) as e:
                log.error("state database: %s (will retry)", e)

    async def stop(self):
        for listener in self.listeners:
            listener.close()
        for task in self.tasks:
            task.cancel()
        for writer in list(self.connections.values()):
            writer.close()
        if self.connections:
            await asyncio.wait(list(self.connections), timeout=2)
        if getattr(self, "stun_transport", None):
            self.stun_transport.close()
        try:
            self.coordinator.flush_live()
        except StoreError as e:
            log.error("%s", e)
        log.info("meshbox stopped")

    # HTTP/1.1 requests
    async def handle_http(self, reader, writer, tls=False):
        peer = writer.get_extra_info("peername")
        peer = f"{peer[0]}:{peer[1]}" if peer else "?"
        self.connections[asyncio.current_task()] = writer
        try:
            request = await asyncio.wait_for(read_http_request(reader), CONTROL_HANDSHAKE_TIMEOUT)
            if request is None:
                return
            await self.route_http(request, reader, writer, peer)
        except HttpError as e:
            writer.write(http_response(e.status, e.args[0] + "\n"))
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, ConnectionError, ssl.SSLError if ssl else OSError):
            pass
        except Exception:
            log.exception("error serving %s", peer)
        finally:
            self.connections.pop(asyncio.current_task(), None)
            try:
                await writer.drain()
                writer.close()
            except (ConnectionError, OSError):
                pass

    async def route_http(self, request, reader, writer, peer):
        path, upgrade = request.path, request.headers.get("upgrade", "").lower()
        if path == "/key" and request.method == "GET":
            body = {"legacyPublicKey": key_text("mkey", bytes(32)),
                    "publicKey": key_text("mkey", x25519_public(self.noise_private))}
            writer.write(http_response(200, json_bytes(body), "application/json"))
        elif path == "/ts2021":
            await self.upgrade_control(request, upgrade, reader, writer, peer)
        elif path == "/derp" and upgrade in ("derp", "websocket") and self.derp:
            await self.derp.handle_upgrade(request.headers, reader, writer)
        elif path in ("/derp/probe", "/derp/latency-check"):
            writer.write(http_response(200, b""))
        elif path == "/generate_204":
            challenge = request.headers.get("x-tailscale-challenge", "")
            extra = [("X-Tailscale-Response", "response " + challenge)] if challenge.isalnum() and len(challenge) < 64 else []
            writer.write(http_response(204, b"", headers=extra))
        elif path == "/health":
            writer.write(http_response(200, json_bytes({"status": "ok"}), "application/json"))
        elif path == "/":
            writer.write(http_response(200, landing_page(self.config.public_url()), "text/html; charset=utf-8"))
        else:
            raise HttpError(404, f"{path} is not served here")

    async def upgrade_control(self, request, upgrade, reader, writer, peer):
        if upgrade == "websocket":
            protocols = [p.strip() for p in request.headers.get("sec-websocket-protocol", "").split(",")]
            if CONTROL_UPGRADE not in protocols or "sec-websocket-key" not in request.headers:
                raise HttpError(400, "websocket clients must ask for the tailscale-control-protocol subprotocol")
            handshake = request.query.get("X-Tailscale-Handshake", "")
        elif upgrade == CONTROL_UPGRADE:
            handshake = request.headers.get(HANDSHAKE_HEADER, "")
        else:
            raise HttpError(400, f"unknown Upgrade {upgrade!r}: expected {CONTROL_UPGRADE}")
        try:
            initiation = base64.b64decode(handshake, validate=True)
            response, noise = noise_respond(self.noise_private, initiation)
        except (binascii.Error, ValueError):
            raise HttpError(400, "missing or invalid X-Tailscale-Handshake") from None
        except (NoiseError, CryptoError) as e:
            log.info("control handshake from %s refused: %s", peer, e)
            raise HttpError(400, f"noise handshake failed: {e}") from None
        if upgrade == "websocket":
            writer.write(http_upgrade_response("websocket", [
                ("Sec-WebSocket-Accept", websocket_accept_value(request.headers["sec-websocket-key"])),
                ("Sec-WebSocket-Protocol", CONTROL_UPGRADE)]))
            stream = out = WebSocketStream(reader, writer)
            out.write(response)
        else:
            writer.write(http_upgrade_response(CONTROL_UPGRADE) + response)
            stream, out = reader, writer
        challenge = json_bytes({"nodeKeyChallenge": key_text("chalpub", x25519_public(self.challenge_private))})
        early = EARLY_PAYLOAD_MAGIC + struct.pack(">I", len(challenge)) + challenge
        await ControlConnection(self, stream, out, noise, peer).run(early)

    # local admin socket: live state for the CLI
    async def handle_admin(self, reader, writer):
        try:
            line = await asyncio.wait_for(reader.readline(), 10)
            command = json.loads(line or b"{}").get("command")
            if command == "live":
                body = {"nodes": {str(n.id): live_fields(n) for n in self.coordinator.nodes.values()},
                        "derp": self.derp.stats() if self.derp else {},
                        "refusals": self.refusals}
            else:
                body = {"error": f"unknown command {command!r}"}
            writer.write(json_bytes(body) + b"\n")
            await writer.drain()
        except (ValueError, asyncio.TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()


def live_fields(node):
    """The fast-changing fields the server keeps in memory."""
    return {"online": node.online, "last_seen": rfc3339(node.last_seen), "endpoints": node.endpoints,
            "home_derp": home_derp(node), "os": node.hostinfo.get("OS", "")}


def landing_page(url):
    return f"""<!doctype html><title>meshbox</title>
<h1>meshbox is running</h1>
<p>Join a device to this tailnet:</p>
<pre>meshbox preauthkeys create --user NAME
tailscale up --login-server {url} --auth-key KEY</pre>"""


# ---- CLI ----
# Headscale's nouns and verbs, so scripts carry over.  Commands other than
# ``serve`` edit the state database directly; a running server notices
# within half a second and pushes the change to its clients.

CLI_EPILOG = """\
first steps:
  meshbox.py serve                                  # control on 127.0.0.1:8080
  meshbox.py users create alice
  meshbox.py preauthkeys create --user alice        # prints the key last
  tailscale up --login-server http://127.0.0.1:8080 --auth-key KEY

settings come from (later wins): defaults, the JSON file given by --config
(keys as in the flags, e.g. {"listen": "0.0.0.0:443", "server_url": ...}),
environment variables MESHBOX_<NAME> (e.g. MESHBOX_LISTEN), then flags.
"""


def load_config(args):
    """Build the Config from file, environment and flags, naming what is wrong."""
    config = Config()
    names = {f.name for f in dataclasses.fields(Config)}
    values = {}
    if args.config:
        try:
            with open(args.config) as f:
                values.update({k.replace("-", "_"): v for k, v in json.load(f).items()})
        except (OSError, ValueError) as e:
            raise SystemExit(f"meshbox: cannot read config file {args.config}: {e}")
        unknown = set(values) - names
        if unknown:
            raise SystemExit(f"meshbox: unknown setting(s) in {args.config}: {', '.join(sorted(unknown))}")
    for name in names:
        env = os.environ.get("MESHBOX_" + name.upper())
        if env is not None:
            values[name] = env
    for name in names:
        flag = getattr(args, name, None)
        if flag is not None:
            values[name] = flag
    for name, value in values.items():
        if name == "nameservers" and isinstance(value, str):
            value = [v for v in value.split(",") if v]
        setattr(config, name, value)
    return config


def print_table(rows, columns):
    widths = [max([len(c)] + [len(str(r.get(c, ""))) for r in rows]) for c in columns]
    print("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths)).rstrip())
    for r in rows:
        print("  ".join(str(r.get(c, "")).ljust(w) for c, w in zip(columns, widths)).rstrip())


def output(args, rows, columns):
    if getattr(args, "output", None) == "json":
        print(json.dumps(rows, indent=2))
    else:
        print_table(rows, columns)


def live_state(state_dir):
    """Live node fields from a running server, or None when none runs."""
    path = os.path.join(state_dir, "admin.sock")
    if not os.path.exists(path):
        return None
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect(path)
            s.sendall(b'{"command": "live"}\n')
            data = b""
            while not data.endswith(b"\n"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        return json.loads(data)
    except (OSError, ValueError):
        return None


def node_rows(store, state_dir):
    users = {u.id: u.name for u in store.users()}
    live = (live_state(state_dir) or {}).get("nodes", {})
    rows = []
    for n in store.nodes():
        fields = live.get(str(n.id)) or {"online": False, "last_seen": rfc3339(n.last_seen),
                                         "endpoints": n.endpoints, "home_derp": home_derp(n)}
        rows.append({"id": n.id, "name": n.given_name, "hostname": n.hostname, "user": users.get(n.user_id),
                     "ipv4": n.ipv4, "ipv6": n.ipv6, "online": fields["online"], "last_seen": fields["last_seen"],
                     "endpoints": fields["endpoints"], "derp_home": fields["home_derp"], "tags": n.tags,
                     "ephemeral": n.ephemeral, "expiry": rfc3339(n.expiry), "created": rfc3339(n.created),
                     "expired": is_expired(n, now())})
    return rows


def find_node(store, ident):
    for n in store.nodes():
        if str(n.id) == str(ident) or n.given_name == ident:
            return n
    raise ValueError(f"no node {ident!r} (see: nodes list)")


def cmd_serve(args, config):
    async def main():
        server = Server(config)
        await server.start()
        loop = asyncio.get_running_loop()
        import signal
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, server.stopping.set)
        await server.stopping.wait()
        await server.stop()
    asyncio.run(main())


def cmd_users(args, store):
    if args.verb == "create":
        user = store.create_user(args.name)
        print(f"created user {user.name} (id {user.id})")
    elif args.verb == "delete":
        store.delete_user(args.name)
        print(f"deleted user {args.name}")
    else:
        output(args, [{"id": u.id, "name": u.name, "created": rfc3339(u.created)} for u in store.users()],
               ["id", "name", "created"])


def cmd_preauthkeys(args, store):
    if args.verb == "create":
        user = store.user_named(args.user)
        tags = [t for t in (args.tags or "").split(",") if t]
        for tag in tags:
            if not tag.startswith("tag:") or len(tag) < 5:
                raise ValueError(f"bad tag {tag!r}: tags look like tag:name")
        expiration = now() + parse_duration(args.expiration)
        secret = store.create_preauth_key(user.id, args.reusable, args.ephemeral, expiration, tags)
        print(f"pre-auth key for {user.name}, {'reusable' if args.reusable else 'single use'}"
              f"{', ephemeral' if args.ephemeral else ''}, expires {rfc3339(expiration)}:", file=sys.stderr)
        print(secret)
    elif args.verb == "expire":
        store.expire_preauth_key(args.key)
        print("pre-auth key expired")
    else:
        at = now()
        rows = [{"id": k["id"], "key": k["prefix"] + "…", "user": k["user"], "reusable": bool(k["reusable"]),
                 "ephemeral": bool(k["ephemeral"]), "used": k["used"], "tags": json.loads(k["tags"]),
                 "expiration": rfc3339(k["expiration"]),
                 "valid": not k["revoked"] and not (k["expiration"] and k["expiration"] <= at)
                 and bool(k["reusable"] or not k["used"])} for k in store.preauth_keys()]
        output(args, rows, ["id", "key", "user", "reusable", "ephemeral", "used", "expiration", "valid"])


def cmd_nodes(args, store):
    if args.verb == "list":
        output(args, node_rows(store, args.state), ["id", "name", "user", "ipv4", "ipv6", "online", "last_seen", "tags"])
        return
    node = find_node(store, args.id)
    with store.transaction():
        if args.verb == "delete":
            store.delete_node(node.id)
            message = f"deleted node {node.id} {node.given_name}"
        elif args.verb == "expire":
            store.update_node(node.id, expiry=now())
            message = f"expired node {node.id} {node.given_name}: it must log in again"
        else:
            name = sanitize_hostname(args.name)
            if name != args.name:
                raise ValueError(f"bad name {args.name!r}: use a DNS label such as {name!r}")
            if any(n.given_name == name and n.id != node.id for n in store.nodes()):
                raise ValueError(f"name {name!r} is taken by another node")
            store.update_node(node.id, given_name=name)
            message = f"renamed node {node.id} to {name}"
    print(message)


def cmd_status(args, store):
    live = live_state(args.state)
    rows = node_rows(store, args.state)
    if getattr(args, "output", None) == "json":
        print(json.dumps({"server_running": live is not None, "nodes": rows,
                          "derp": (live or {}).get("derp", {}), "refusals": (live or {}).get("refusals", {})}, indent=2))
        return
    print(f"server: {'running' if live else 'not running'}; {len(rows)} node(s), "
          f"{sum(1 for r in rows if r['online'])} online")
    for r in rows:
        r["endpoints"] = ",".join(r["endpoints"]) or "-"
        r["state"] = "expired" if r["expired"] else ("online" if r["online"] else "offline")
    print_table(rows, ["id", "name", "user", "ipv4", "state", "derp_home", "endpoints", "last_seen"])


def build_parser():
    parser = argparse.ArgumentParser(
        prog="meshbox.py", description="meshbox: a self-hosted Tailscale control server, DERP relay and gateway.",
        epilog=CLI_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--state", default=None, help="state folder (default ./meshbox-state; env MESHBOX_STATE_DIR)")
    parser.add_argument("--config", help="JSON settings file")
    parser.add_argument("--version", action="version", version=f"meshbox {VERSION}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the control server, DERP relay and STUN")
    serve.add_argument("--listen", help="control HTTP address (default 127.0.0.1:8080)")
    serve.add_argument("--server-url", dest="server_url", help="URL clients use as --login-server (default http://LISTEN)")
    serve.add_argument("--derp-listen", dest="derp_listen", help="DERP-over-TLS address (default LISTEN's host:8443, or off)")
    serve.add_argument("--stun-listen", dest="stun_listen", help="STUN UDP address (default LISTEN's host:3478, or off)")
    serve.add_argument("--derp-host", dest="derp_host", help="host clients dial for DERP/STUN (default SERVER_URL's host)")
    serve.add_argument("--base-domain", dest="base_domain", help="MagicDNS domain (default mesh.internal)")
    serve.add_argument("--log-level", dest="log_level", choices=["debug", "info", "warning", "error"])

    def with_output(p):
        p.add_argument("--output", "-o", choices=["table", "json"], default="table")
        return p

    users = sub.add_parser("users", help="manage users").add_subparsers(dest="verb", required=True)
    users.add_parser("create", help="add a user").add_argument("name")
    users.add_parser("delete", help="remove a user with no nodes").add_argument("name")
    with_output(users.add_parser("list", help="list users"))

    keys = sub.add_parser("preauthkeys", help="manage pre-auth keys").add_subparsers(dest="verb", required=True)
    create = keys.add_parser("create", help="make a key that lets a device join")
    create.add_argument("--user", required=True)
    create.add_argument("--reusable", action="store_true", help="usable by many devices")
    create.add_argument("--ephemeral", action="store_true", help="devices go away when they log out")
    create.add_argument("--expiration", default="1h", help="how long the key is valid (default 1h; e.g. 90d)")
    create.add_argument("--tags", help="tags the devices get, e.g. tag:server,tag:web")
    with_output(keys.add_parser("list", help="list keys (secrets are not shown again)"))
    keys.add_parser("expire", help="revoke a key").add_argument("key", help="the key or its listed prefix")

    nodes = sub.add_parser("nodes", help="manage nodes").add_subparsers(dest="verb", required=True)
    with_output(nodes.add_parser("list", help="list nodes"))
    nodes.add_parser("delete", help="remove a node").add_argument("id", help="node ID or name")
    nodes.add_parser("expire", help="force a node to log in again").add_argument("id", help="node ID or name")
    rename = nodes.add_parser("rename", help="change a node's MagicDNS name")
    rename.add_argument("id", help="node ID or name")
    rename.add_argument("name")

    with_output(sub.add_parser("status", help="the tailnet as the server sees it"))
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.state is not None:
        os.environ["MESHBOX_STATE_DIR"] = args.state
    config = load_config(args)
    args.state = config.state_dir
    logging.basicConfig(level=getattr(logging, config.log_level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    try:
        if args.command == "serve":
            return cmd_serve(args, config)
        os.makedirs(config.state_dir, mode=0o700, exist_ok=True)
        store = Store(os.path.join(config.state_dir, "meshbox.db"))
        {"users": cmd_users, "preauthkeys": cmd_preauthkeys, "nodes": cmd_nodes, "status": cmd_status}[args.command](args, store)
    except (ValueError, StoreError, RuntimeError, OSError) as e:
        print(f"meshbox: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
