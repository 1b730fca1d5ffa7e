#!/usr/bin/env python3
"""meshbox: a self-hosted Tailscale control plane and gateway in one file.

Stock Tailscale clients join with ``--login-server``; meshbox registers them,
hands out addresses, serves their network maps, compiles the ACL policy into
their packet filters, relays their traffic (DERP) and answers STUN.  With
``--gateway`` the box itself is a WireGuard peer, subnet router and exit node
of the tailnet.  Run ``python3 meshbox.py --help`` to start.

Map of this file (sections in dependency order, each opened by a banner
comment ``# ---- Name ----``):

  Shim            imports, optional dependencies and their fallbacks
  Helpers         the root exception (MeshboxError), time, bounded JSON, key text
                  forms, control-character escaping, durations, private files,
                  per-source blocks, the refused-attempt limiter, tailcfg's Go
                  shapes (Hostinfo, endpoints), input checks (routes, DNS names)
  Settings        Config: what ``serve`` is told, checked; log formats, recent logs
  Native crypto   the optional C helper (native/), loaded with ctypes
  Crypto          X25519, ChaCha20-Poly1305, BLAKE2s, NaCl box, Ed25519
  Noise           Noise_IK handshake and transport records (ts2021)
  Zstd framing    map-response compression
  WebSocket       the small RFC 6455 framing for browser-style upgrades
  Addresses       tailnet IPv4/IPv6 allocation
  Store           SQLite, every SQL statement: users, keys, OAuth clients, nodes,
                  devices, settings, server secrets; schema versions and migrations
  Policy          Tailscale's ACL language: parse, compile per node (NodeView), check tests
  Map builder     pure: node records and views in, MapResponse JSON out
  Coordinator     the live tailnet and the one way to change it (registrations,
                  MapRequest intake, administrative changes as objects: NodeEdit,
                  PolicyChange...), with its parts: FanOut (map sessions, shared
                  deltas and their frames), PolicyViews (what each node may see),
                  Registrar (keys, logins, lockouts), SshChecks (held sessions)
  HTTP front      HTTP/1.1 on asyncio streams: request heads, bounded bodies, cookies,
                  responses; and meshbox's own requests as a client
  TLS certificate self-signed Ed25519 certificate for DERP, pinned by hash
  DERP            the relay: frames, clients, forwarding, bytes per pair of clients
  STUN            RFC 5389 binding responses
  Control server  ts2021 over HTTP/2 (h2): register, map, SSH check verdicts, set-dns;
                  a connection sees the server only through a ControlContext
  Gateway plan    pure: the box's WireGuard peers and nftables rules
  Gateway         kernel or userspace WireGuard, routes, nftables; TailnetFollower
                  keeps the gateway, the hosts file and DERP's refusals in step
  OIDC            sign-in through an OpenID provider (authorization code, PKCE)
  Admin           the administrative verbs, shared by the CLI and the APIs; DNS
                  settings; what NetInfo says about a node's NAT, why a pair is relayed
  QR code         a QR encoder (byte mode, level M) for keys and WireGuard configs
  API v2          Tailscale's public API v2 in its shapes, OAuth tokens; each change an Admin verb
  Admin page      /admin: HTML, CSS and script, its cookie sessions and CSRF tokens
  Web front       login pages, OIDC callback, admin page and APIs over HTTP (WebFront),
                  with its sessions, tokens and refused-credential lockouts
  Server          listeners and connection budgets, the protocol routes (ts2021, DERP,
                  /key, /health, /metrics), the admin socket, lifetime of ``serve``
  CLI             argument parsing, output, local or remote verbs
"""

# ---- Shim ----
# Only modules that OpenWrt's python3-light (plus its asyncio, sqlite3,
# openssl, ctypes and logging packages) carries are imported here; the
# third-party ones are optional where a fallback exists.

import argparse
import asyncio
import base64
import binascii
import bisect
import collections
import collections.abc
import dataclasses
import functools
import hashlib
import hmac
import ipaddress
import json
import logging
import math
import os
import random
import re
import secrets
import socket
import sqlite3
import struct
import sys
import time
import types

try:
    import ssl
except ImportError:  # python3-openssl missing: DERP over TLS is unavailable
    ssl = None

try:
    import ctypes
except ImportError:  # python3-light without python3-ctypes: no native helper
    ctypes = None

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
else:
    import h2.settings
    import hpack.table

    class _ShortQueue(list):
        """A deque's ends on a list, for the few-item queues h2 and hpack keep
        per connection (a value per HTTP/2 setting, the HPACK dynamic table):
        a deque costs 600 bytes even when it holds one item, and a
        connection holds a dozen of them."""

        def popleft(self):
            return self.pop(0)

        def appendleft(self, item):
            self.insert(0, item)

    if getattr(h2.settings, "collections", None) is collections:
        h2.settings.collections = types.SimpleNamespace(**{**vars(collections), "deque": _ShortQueue})
    if getattr(hpack.table, "deque", None) is collections.deque:
        hpack.table.deque = _ShortQueue

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

class MeshboxError(Exception):
    """The root of meshbox's own errors: input, peers or the machine were
    wrong, and the message says how.  The CLI and the APIs show these to the
    user; any other exception is a bug and keeps its traceback."""


class InvalidInput(MeshboxError, ValueError):
    """An argument, name, key, duration or document that cannot be used."""


class Unavailable(MeshboxError, RuntimeError):
    """Something this machine lacks (a Python module, a crypto backend)."""


def now():
    """Seconds since the epoch, as a float (one clock for the whole file)."""
    return time.time()


class Signal:
    """asyncio.Event's set, clear and wait in a few dozen bytes (an Event
    holds a 600-byte deque; every connection needs two)."""

    __slots__ = ("flag", "waiters")

    def __init__(self):
        self.flag, self.waiters = False, None

    def set(self):
        self.flag = True
        for waiter in self.waiters or ():
            if not waiter.done():
                waiter.set_result(True)

    def clear(self):
        self.flag = False

    async def wait(self, timeout=None):
        """True once set; False if timeout seconds pass first (without the
        task asyncio.wait_for would add)."""
        if self.flag:
            return True
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        timer = loop.call_later(timeout, _resolve_future, waiter, False) if timeout is not None else None
        self.waiters = (self.waiters or []) + [waiter]
        try:
            return await waiter
        finally:
            self.waiters = [w for w in self.waiters if w is not waiter] or None
            if timer is not None:
                timer.cancel()


def _resolve_future(future, value):
    if not future.done():
        future.set_result(value)


def rfc3339(ts):
    """Go's time.Time JSON form, UTC with second precision; None for zero."""
    if not ts:
        return None
    return _rfc3339_seconds(int(ts))


@functools.lru_cache(maxsize=4096)       # the same few times recur in every netmap
def _rfc3339_seconds(seconds):
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def json_bytes(obj):
    """Compact JSON as UTF-8 bytes, the form sent on the wire."""
    return json.dumps(obj, separators=(",", ":")).encode()


MAX_JSON_DEPTH = 64     # Tailscale's messages and policies nest a handful of levels


def parse_json(data):
    """json.loads for input others control: malformed JSON, and nesting deeper
    than MAX_JSON_DEPTH (which would exhaust the recursion of the parser or of
    whatever walks the value later), are InvalidInput."""
    try:
        value = json.loads(data)
    except RecursionError:
        raise InvalidInput(f"JSON nested deeper than {MAX_JSON_DEPTH} levels") from None
    except ValueError as e:           # JSONDecodeError, or bytes that are not UTF-8
        raise InvalidInput(str(e)) from None
    opening = (b"[", b"{") if isinstance(data, (bytes, bytearray)) else ("[", "{")
    if data.count(opening[0]) + data.count(opening[1]) <= MAX_JSON_DEPTH:
        return value           # too few brackets to nest that deep: no walk needed
    containers, level = ([value] if isinstance(value, (list, dict)) else []), 0
    while containers and level < MAX_JSON_DEPTH:      # one level of containers at a time
        containers = [v for c in containers for v in (c.values() if isinstance(c, dict) else c)
                      if isinstance(v, (list, dict))]
        level += 1
    if containers:
        raise InvalidInput(f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
    return value


_CONTROL_CHARACTER = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_TERMINAL_SEQUENCE = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)?|[@-_]?)|\x9b[0-?]*[ -/]*[@-~]")


def escape_control(text):
    """text with its control characters written out (\\n, \\x1b): text a node
    chose cannot forge a log line or reach a terminal raw."""
    return _CONTROL_CHARACTER.sub(lambda m: repr(m.group())[1:-1], text)


def strip_control(text):
    """text without terminal escape sequences and control characters, for tables."""
    return _CONTROL_CHARACTER.sub("", _TERMINAL_SEQUENCE.sub("", text))


def key_text(prefix, raw):
    """A 32-byte key in Tailscale's text form, e.g. ``nodekey:<hex>``."""
    return prefix + ":" + raw.hex()


def key_bytes(text, prefix):
    """Parse ``prefix:<64 hex>`` into 32 raw bytes, or raise InvalidInput."""
    if not isinstance(text, str) or not text.startswith(prefix + ":"):
        raise InvalidInput(f"expected a {prefix}: key, got {str(text)[:80]!r}")
    try:
        raw = bytes.fromhex(text[len(prefix) + 1:])
    except ValueError:
        raise InvalidInput(f"{prefix}: key is not hex: {text[:80]!r}") from None
    if len(raw) != 32:
        raise InvalidInput(f"{prefix}: key must be 32 bytes, got {len(raw)}")
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
            raise InvalidInput(f"bad duration {text!r}: use e.g. 90d, 12h, 30m")
    if number or not text:
        raise InvalidInput(f"bad duration {text!r}: a unit (s, m, h, d, w) is required")
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
        raise InvalidInput(f"bad port in {text!r}")
    return host or "127.0.0.1", int(port) if port else default_port


def make_private(path, mode):
    """Narrow path to mode (0700 for a folder, 0600 for a file) when its group
    or others may use it, saying so; where the filesystem has no such
    permissions (FAT), a warning instead."""
    current = os.stat(path).st_mode & 0o777
    if not current & 0o077:
        return
    try:
        os.chmod(path, mode)
    except OSError as e:
        log.warning("cannot make %s private (mode %o): %s; it holds meshbox's secrets, keep it where only "
                    "meshbox's user can read it", path, current, e.strerror)
        return
    log.warning("%s was open to others (mode %o): tightened to %o", path, current, mode)


def write_file_atomically(path, data, mode=0o600):
    """Write bytes to path through a temporary file renamed over it: readers never
    see half a file, and it has exactly mode, whatever the umask or an older file."""
    temporary = path + ".tmp"
    with os.fdopen(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode), "wb") as f:
        os.fchmod(f.fileno(), mode)     # O_CREAT keeps an existing file's mode; the umask narrows a new one
        f.write(data)
    os.replace(temporary, path)


def address_block(host):
    """The block of addresses one party holds, for per-source limits: an IPv4
    address, or an IPv6 /64 (one home or server gets a whole /64)."""
    try:
        address = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return host
    if address.version == 6 and address.ipv4_mapped:
        address = address.ipv4_mapped
    return str(address) if address.version == 4 else str(ipaddress.ip_network((address, 64), strict=False))


class AttemptLimiter:
    """Failed attempts per key (a source address, a machine key; also a
    node's logged Hostinfos and told changes): a burst of `burst` failures,
    then one more per `interval` seconds (a token bucket kept as one number
    per key: when its failures are forgotten).  The table
    holds at most `capacity` keys; past that the key that failed longest ago
    goes, so no number of keys grows it without bound."""

    def __init__(self, burst, interval, capacity):
        self.burst, self.interval, self.capacity = burst, interval, capacity
        self.forgotten_at = {}      # key -> when its failures are forgotten; least recent failure first

    def __len__(self):
        return len(self.forgotten_at)

    def wait(self, key, at):
        """Seconds until key may try again; 0 when it may now."""
        forgotten_at = self.forgotten_at.get(key)
        if forgotten_at is None:
            return 0
        if forgotten_at <= at:
            del self.forgotten_at[key]
            return 0
        return max(0, forgotten_at - at - (self.burst - 1) * self.interval)

    def failed(self, key, at):
        """Count a failure; True for the one that locks the key out (log it once)."""
        was_locked = self.wait(key, at) > 0
        forgotten_at = max(self.forgotten_at.pop(key, at), at) + self.interval
        while len(self.forgotten_at) >= self.capacity:
            del self.forgotten_at[next(iter(self.forgotten_at))]
        self.forgotten_at[key] = forgotten_at
        return not was_locked and self.wait(key, at) > 0


# Tailscale's tailcfg shapes, for what nodes send.  The Go client decodes a
# peer's Hostinfo strictly (one mistyped field and it refuses the whole map),
# so a value a node sends is kept only where it has its Go type and a size a
# router can hold; unknown fields (newer clients) are dropped quietly.
GO_INT_MAX = 2 ** 63 - 1              # Go's int and int64 on the 64-bit clients
GO_UINT64_MAX = 2 ** 64 - 1
HOSTINFO_MAX_BYTES = 16 * 1024        # the whole Hostinfo, re-encoded
HOSTINFO_MAX_TEXT = 256               # per string
HOSTINFO_MAX_ITEMS = 64               # per list or map
HOSTINFO_MAX_SERVICES = 128
HOSTINFO_MAX_HOST_KEYS = 16           # sshHostKeys
SSH_HOST_KEY_MAX_TEXT = 1024          # an RSA-4096 host key is about 730 characters
MAX_ENDPOINTS = 64
HOSTINFO_LOG_BURST = 3                # bad Hostinfos logged for one sender in a row...
HOSTINFO_LOG_INTERVAL = 60            # ...then one per this many seconds (a node may send hundreds a second)


def json_type(value):
    """A decoded value's JSON type with its article ("an array"), for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    return {str: "a string", list: "an array", dict: "an object"}.get(type(value), type(value).__name__)


def go_string(value, limit=HOSTINFO_MAX_TEXT):
    if not isinstance(value, str):
        raise InvalidInput(f"{json_type(value)}, not a string")
    if len(value) > limit:
        raise InvalidInput(f"{len(value)} characters, more than {limit}")
    return value


def go_bool(value):
    """A Go bool, or an opt.Bool (whose JSON is true or false; null is "unset")."""
    if not isinstance(value, bool):
        raise InvalidInput(f"{json_type(value)}, not true or false")
    return value


def go_int(value, low=-GO_INT_MAX - 1, high=GO_INT_MAX):
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidInput(f"{json_type(value)}, not an integer")
    if not low <= value <= high:
        raise InvalidInput(f"{str(value)[:24]} is outside {low}..{high}")
    return value


def go_float(value):
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise InvalidInput(f"{json_type(value)}, not a number")
    try:
        number = float(value)       # an integer past float64's range overflows here
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        raise InvalidInput("not a finite float64")
    return number


class GoList:
    """A Go slice of what `item` accepts, at most `limit` long: bad items are
    dropped (and reported), a longer list cut to its first `limit`."""

    def __init__(self, item, limit=HOSTINFO_MAX_ITEMS):
        self.item, self.limit = item, limit

    def check(self, value, problems, path):
        if not isinstance(value, list):
            raise InvalidInput(f"{json_type(value)}, not an array")
        if len(value) > self.limit:
            problems.append((path, f"{len(value)} items, only the first {self.limit} kept"))
        out, dropped = [], []
        for i, item in enumerate(value[:self.limit]):
            try:
                out.append(go_checked(self.item, item, problems, f"{path}[{i}]"))
            except ValueError as e:
                dropped.append(f"item {i}: {e}")
        if dropped:
            problems.append((path, f"{len(dropped)} item(s) dropped, the first: {dropped[0]}"))
        return out


class GoMap:
    """A Go map[string]T of at most `limit` entries; a bad entry is dropped (and reported)."""

    def __init__(self, item, limit=HOSTINFO_MAX_ITEMS):
        self.item, self.limit = item, limit

    def check(self, value, problems, path):
        if not isinstance(value, dict):
            raise InvalidInput(f"{json_type(value)}, not an object")
        if len(value) > self.limit:
            raise InvalidInput(f"{len(value)} entries, more than {self.limit}")
        out, dropped = {}, []
        for key, item in value.items():
            try:
                go_string(key)
                out[key] = go_checked(self.item, item, problems, f"{path}[{key[:40]!r}]")
            except ValueError as e:
                dropped.append(f"{key[:40]!r}: {e}")
        if dropped:
            problems.append((path, f"{len(dropped)} entries dropped, the first: {dropped[0]}"))
        return out


class GoStruct:
    """A Go struct of these {JSON name: checker} fields: unknown and null
    fields dropped quietly (newer clients add fields), a bad one dropped and
    reported.  `strict` (a list item): a bad field makes the whole item bad."""

    def __init__(self, fields, strict=False):
        self.fields, self.strict = fields, strict

    def check(self, value, problems, path):
        if not isinstance(value, dict):
            raise InvalidInput(f"{json_type(value)}, not an object")
        out = {}
        for name, check in self.fields.items():
            if value.get(name) is None:
                continue
            try:
                out[name] = go_checked(check, value[name], problems, f"{path}.{name}" if path else name)
            except ValueError as e:
                if self.strict:
                    raise InvalidInput(f"{name}: {e}") from None
                problems.append((f"{path}.{name}" if path else name, f"dropped: {e}"))
        return out


def go_checked(check, value, problems, path):
    """value through `check`: a function of the value, or a GoList, GoMap or
    GoStruct that reports the parts it drops into problems as (path, why)."""
    return check.check(value, problems, path) if isinstance(check, (GoList, GoMap, GoStruct)) else check(value)


def canonical_prefix(text):
    """An IP prefix in its canonical text (as netip.Prefix writes it), or ValueError."""
    go_string(text)
    try:
        prefix = str(ipaddress.ip_network(text))
    except ValueError:
        raise InvalidInput(f"{text[:60]!r} is not an IP prefix with its host bits zero") from None
    if prefix != text:
        raise InvalidInput(f"{text[:60]!r} is not in canonical form ({prefix})")
    return prefix


def checked_endpoint(text):
    """An ip:port endpoint (netip.AddrPort's text), canonical, or ValueError."""
    go_string(text, 64)
    host, colon, port = text.rpartition(":")
    try:
        if not colon or not port.isdigit() or not 0 < int(port) <= 65535 or \
                host.startswith("[") != host.endswith("]") or (":" in host) != host.startswith("["):
            raise ValueError
        address = ipaddress.ip_address(host[1:-1] if host.startswith("[") else host)
    except ValueError:
        raise InvalidInput(f"{text[:64]!r} is not an ip:port") from None
    return f"[{address}]:{int(port)}" if address.version == 6 else f"{address}:{int(port)}"


def strict_list(check, limit):
    """A checker for a JSON array of at most `limit` items, each through
    `check`: ValueError naming the first bad one."""
    def checked(value):
        if not isinstance(value, list):
            raise InvalidInput(f"{json_type(value)}, not an array")
        if len(value) > limit:
            raise InvalidInput(f"{len(value)} items, more than {limit}")
        out = []
        for i, item in enumerate(value):
            try:
                out.append(check(item))
            except ValueError as e:
                raise InvalidInput(f"item {i}: {e}") from None
        return out
    return checked


checked_endpoints = strict_list(checked_endpoint, MAX_ENDPOINTS)     # []netip.AddrPort, canonical


_SERVICE = GoStruct({"Proto": go_string, "Port": lambda v: go_int(v, 0, 65535), "Description": go_string},
                    strict=True)
_NETINFO = GoStruct({
    **{name: go_bool for name in ("MappingVariesByDestIP", "HairPinning", "WorkingIPv6", "OSHasIPv6", "WorkingUDP",
                                  "WorkingICMPv4", "HavePortMap", "UPnP", "PMP", "PCP")},
    "PreferredDERP": go_int, "LinkType": go_string, "FirewallMode": go_string,
    "DERPLatency": GoMap(go_float)})
_LOCATION = GoStruct({"Country": go_string, "CountryCode": go_string, "City": go_string, "CityCode": go_string,
                      "Latitude": go_float, "Longitude": go_float, "Priority": go_int})
_TPM = GoStruct({"Manufacturer": go_string, "Vendor": go_string, "Model": go_int,
                 "FirmwareVersion": lambda v: go_int(v, 0, GO_UINT64_MAX), "SpecRevision": go_int,
                 "FamilyIndicator": go_string})
HOSTINFO_LISTS = ("Services", "sshHostKeys", "WoLMACs", "RequestTags", "RoutableIPs")  # dropped first when too big
HOSTINFO_IDENTITY = ("Hostname", "OS", "OSVersion", "IPNVersion", "GoArch", "GoVersion", "Distro",
                     "DistroVersion", "Machine", "ShareeNode", "AppConnector")   # kept last when too big
HOSTINFO_SHAPE = GoStruct({
    **{name: go_string for name in (
        "IPNVersion", "FrontendLogID", "BackendLogID", "OS", "OSVersion", "Env", "Distro", "DistroVersion",
        "DistroCodeName", "App", "Package", "DeviceModel", "PushDeviceToken", "Hostname", "Machine", "GoArch",
        "GoArchVar", "GoVersion", "Cloud", "ServicesHash", "ExitNodeID")},
    **{name: go_bool for name in (       # bool and opt.Bool alike: true or false on the wire
        "Container", "Desktop", "ShieldsUp", "ShareeNode", "NoLogsNoSupport", "RemoteConfig", "WireIngress",
        "IngressEnabled", "AllowsUpdate", "Userspace", "UserspaceRouter", "AppConnector", "PeerRelay",
        "StateEncrypted")},
    "RoutableIPs": GoList(canonical_prefix), "RequestTags": GoList(go_string), "WoLMACs": GoList(go_string),
    "Services": GoList(_SERVICE, HOSTINFO_MAX_SERVICES),
    "sshHostKeys": GoList(lambda v: go_string(v, SSH_HOST_KEY_MAX_TEXT), HOSTINFO_MAX_HOST_KEYS),
    "NetInfo": _NETINFO, "Location": _LOCATION, "TPM": _TPM})


def log_hostinfo_problems(whose, problems, quota):
    """Log what was dropped from a Hostinfo of `whose`; with a quota (an
    AttemptLimiter keyed by whose), only HOSTINFO_LOG_BURST Hostinfos in a
    row and then one per HOSTINFO_LOG_INTERVAL, saying when it stops."""
    at = now()
    if not problems or quota is not None and quota.wait(whose, at):
        return
    for path, why in problems:
        log.warning("Hostinfo from %s%s: %s", whose, path and ", " + path, why)
    if quota is not None and quota.failed(whose, at):
        log.warning("Hostinfo from %s: its next problems are not logged for %d s", whose,
                    math.ceil(quota.wait(whose, at)))


def checked_hostinfo(value, whose="a node", quota=None):
    """A node's Hostinfo in tailcfg's shape, or None if it is not an object:
    each field of the wrong Go type or size dropped with a log line naming
    it (see log_hostinfo_problems for `quota`), unknown fields dropped, and
    over HOSTINFO_MAX_BYTES as a whole the lists go first, then all but the
    identity fields."""
    if not isinstance(value, dict):
        if value is not None:
            log_hostinfo_problems(whose, [("", f"dropped: {json_type(value)}, not an object")], quota)
        return None
    problems = []
    out = HOSTINFO_SHAPE.check(value, problems, "")
    size = len(json_bytes(out))
    if size > HOSTINFO_MAX_BYTES:
        for name in HOSTINFO_LISTS:
            out.pop(name, None)
        if len(json_bytes(out)) > HOSTINFO_MAX_BYTES:
            identity, out = out, {}
            for name in HOSTINFO_IDENTITY:      # escaped text may take 12 bytes a character
                if name in identity and len(json_bytes({**out, name: identity[name]})) <= HOSTINFO_MAX_BYTES:
                    out[name] = identity[name]
        problems.append(("Hostinfo", f"{size} bytes, more than {HOSTINFO_MAX_BYTES}: only "
                         f"{', '.join(sorted(out)) or 'nothing'} kept"))
    log_hostinfo_problems(whose, problems, quota)
    return out


PEER_HOSTINFO = ("Hostname", "OS", "OSVersion", "ShareeNode", "AppConnector", "sshHostKeys", "Location")
PEER_SERVICES = ("peerapi4", "peerapi6", "peerapi-dns-proxy")


def keeping_netinfo(hostinfo, before):
    """A client's new Hostinfo, with the NetInfo it had when the new one has
    none: a client sends NetInfo only when it changes (a re-login starts a
    fresh control client that sends none), and without it peers lose the
    home DERP they reach the node by."""
    if "NetInfo" in hostinfo or "NetInfo" not in before:
        return hostinfo
    return {**hostinfo, "NetInfo": before["NetInfo"]}


def peer_hostinfo(hostinfo):
    """The part of a (checked) Hostinfo a peer needs: its name and OS for
    status, SSH host keys, the peer API services, where an exit node is;
    the rest (log IDs, versions, NetInfo, tags asked for) stays with control."""
    out = {name: hostinfo[name] for name in PEER_HOSTINFO if name in hostinfo}
    services = [s for s in hostinfo.get("Services") or () if s.get("Proto") in PEER_SERVICES]
    if services:
        out["Services"] = services
    return out


_URL_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")


def percent_encode(text):
    """RFC 3986 percent-encoding of everything but the unreserved characters."""
    return "".join(chr(b) if b in _URL_UNRESERVED else f"%{b:02X}" for b in str(text).encode())


def read_text_file(path, what):
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as e:
        raise InvalidInput(f"cannot read {what} {path}: {e.strerror}") from None


EXIT_ROUTES = ("0.0.0.0/0", "::/0")


def check_routes(routes, prefix_v4, prefix_v6):
    """Normalise advertised subnet routes, refusing bad or overlapping ones."""
    tailnet = [ipaddress.ip_network(prefix_v4), ipaddress.ip_network(prefix_v6)]
    out = []
    for text in routes:
        try:
            net = ipaddress.ip_network(text.strip(), strict=True)
        except ValueError as e:
            raise InvalidInput(f"bad route {text!r}: {e}") from None
        if net.prefixlen == 0:
            raise InvalidInput(f"route {net} is the whole internet: use --advertise-exit-node instead")
        if any(net.version == t.version and net.overlaps(t) for t in tailnet):
            raise InvalidInput(f"route {net} overlaps the tailnet's own addresses")
        out.append(str(net))
    return out


# The tailnet's DNS settings start as the configuration's and, once changed
# through the API or the CLI, are the stored ones.
MAX_DNS_ENTRIES = 64       # resolvers, search domains or split-DNS domains in one setting
DNS_LABEL = r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9])?"
DNS_NAME = re.compile(rf"^(?=.{{1,253}}$){DNS_LABEL}(\.{DNS_LABEL})*\.?$")


def bounded_list(value, what):
    if not isinstance(value, list) or len(value) > MAX_DNS_ENTRIES:
        raise InvalidInput(f"{what} must be a list of at most {MAX_DNS_ENTRIES} entries")
    return value


def checked_nameservers(value, what):
    """A list of resolver IP addresses, each checked."""
    out = []
    for item in bounded_list(value, what):
        try:
            out.append(str(ipaddress.ip_address(item if isinstance(item, str) else "")))
        except ValueError:
            raise InvalidInput(f"bad resolver address {str(item)[:64]!r} in {what}: use an IP address") from None
    return out


def checked_domain(value):
    if not isinstance(value, str) or not DNS_NAME.match(value):
        raise InvalidInput(f"bad domain {str(value)[:64]!r}: use a DNS name such as corp.example")
    return value.rstrip(".").lower()


def endpoint_pair(text):
    """``1.2.3.4:41641`` or ``[v6]:41641`` to (host, port), or None."""
    try:
        host, port = parse_host_port(text, 0)
        ipaddress.ip_address(host)
    except ValueError:
        return None
    return (host, port) if port else None


# ---- Settings ----
# What ``serve`` is told (defaults < config file < environment < flags),
# checked before anything starts, and the formats of what it logs.


DEFAULT_PREFIX_V4 = "100.64.0.0/10"
DEFAULT_PREFIX_V6 = "fd7a:115c:a1e0::/48"
MAX_STUN_ADDRESSES = 4


@dataclasses.dataclass
class Config:
    """Settings of ``serve``: defaults < config file < environment < flags."""
    state_dir: str = "meshbox-state"
    listen: str = "127.0.0.1:8080"
    server_url: str = ""        # what clients use as --login-server; default http://LISTEN
    derp_listen: str = ""       # DERP over TLS; default LISTEN's host, port 8443; "off" disables
    stun_listen: str = ""       # STUN, HOST:PORT[,HOST:PORT]; default LISTEN's host, ports 3478 and 3479; "off"
    derp_host: str = ""         # address clients dial for DERP and STUN; default SERVER_URL's host
    base_domain: str = "mesh.internal"
    prefix_v4: str = DEFAULT_PREFIX_V4
    prefix_v6: str = DEFAULT_PREFIX_V6
    nameservers: list = dataclasses.field(default_factory=list)        # global DNS resolvers for clients
    split_dns: dict = dataclasses.field(default_factory=dict)          # {"corp.example": ["192.0.2.53"]}
    search_domains: list = dataclasses.field(default_factory=list)
    extra_records: list = dataclasses.field(default_factory=list)      # [{"name", "type", "value"}]
    magic_dns: bool = True
    taildrop: bool = True       # nodes of one user may send each other files (tailscale file cp)
    dns_hook: str = ""          # command run as CMD NAME TXT VALUE to publish an ACME challenge (tailscale cert)
    hosts_file: str = ""        # the tailnet's names for dnsmasq; default STATE_DIR/hosts
    policy_file: str = ""       # a HuJSON policy file, reloaded when it changes (else the stored policy)
    node_expiry: str = "180d"   # how long a node key lasts before its owner logs in again; 0: forever
    ephemeral_timeout: str = "30m"   # how long an ephemeral node may be offline before it is removed
    log_level: str = "info"
    max_connections: int = 2048  # open TCP connections of every kind; more are turned away
    max_control_connections: int = 1024   # of them, control (ts2021) connections
    max_derp_connections: int = 1024      # DERP clients
    max_http_connections: int = 64        # plain HTTP: login pages, API, metrics
    max_connections_per_source: int = 128  # from one address (IPv6: /64), before they show a node or DERP key
    derp_serve_any: bool = False  # relay for any DERP client key, not only the tailnet's nodes and the box's
    log_format: str = "text"    # text, or json (one object per line)
    gateway: bool = False       # be a WireGuard peer, subnet router and exit node of the tailnet
    wg_interface: str = "meshbox0"
    wg_port: int = 41641
    wg_backend: str = "auto"    # kernel, userspace (wireguard-go, boringtun) or auto
    public_endpoint: list = dataclasses.field(default_factory=list)   # HOST:PORT clients reach the box at
    advertise_routes: list = dataclasses.field(default_factory=list)  # LAN prefixes behind the box
    advertise_exit_node: bool = False
    snat_subnet_routes: bool = True   # masquerade tailnet traffic into the LAN
    netlink_tools: str = "auto"  # pyroute2, or the ip and wg commands (OpenWrt without python3-pyroute2)
    oidc_issuer: str = ""       # sign in at this OpenID provider (https://...) instead of an admin approving
    oidc_client_id: str = ""    # meshbox's client at the provider, whose redirect URI is SERVER_URL/oidc/callback
    oidc_client_secret: str = ""
    oidc_allowed_domains: list = dataclasses.field(default_factory=list)   # email domains that may sign in
    oidc_allowed_users: list = dataclasses.field(default_factory=list)     # and users (emails) outside them
    oidc_allowed_groups: list = dataclasses.field(default_factory=list)    # when set, one of them is required
    oidc_ca_file: str = ""      # CA bundle for the provider's TLS (default: the system's)
    oidc_admins: list = dataclasses.field(default_factory=list)   # users (emails) who may sign in to /admin

    def control_address(self):
        return parse_host_port(self.listen, 8080)

    def derp_address(self):
        if self.derp_listen == "off":
            return None
        return parse_host_port(self.derp_listen or f"[{self.control_address()[0]}]:8443", 8443)

    def stun_addresses(self):
        """Where STUN listens: a second address lets clients see a NAT whose mapping varies by destination."""
        if self.stun_listen == "off":
            return []
        host = f"[{self.control_address()[0]}]"
        listed = [a.strip() for a in (self.stun_listen or f"{host}:3478,{host}:3479").split(",") if a.strip()]
        if not 1 <= len(listed) <= MAX_STUN_ADDRESSES:
            raise InvalidInput(f"--stun-listen takes 1 to {MAX_STUN_ADDRESSES} addresses, got {self.stun_listen!r}")
        return [parse_host_port(a, 3478) for a in listed]

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
                raise InvalidInput(f"bad address prefix {prefix!r}") from None
            if net.version != version:
                raise InvalidInput(f"prefix {prefix} must be IPv{version}")
        if ipaddress.ip_network(self.prefix_v6).prefixlen > 96 or ipaddress.ip_network(self.prefix_v4).prefixlen > 30:
            raise InvalidInput("address prefixes are too small")
        self.control_address(), self.derp_address(), self.stun_addresses()
        if not self.public_url().startswith(("http://", "https://")):
            raise InvalidInput(f"server URL must start with http:// or https://, got {self.server_url!r}")
        if self.public_host() in ("0.0.0.0", "::", ""):
            raise InvalidInput("listening on a wildcard address: set --server-url to the address clients use")
        for name in ("node_expiry", "ephemeral_timeout"):
            value = getattr(self, name)
            if str(value) != "0":
                parse_duration(value)
        if self.gateway:
            self.gateway_routes()
            for endpoint in self.public_endpoint:
                if endpoint_pair(endpoint) is None:
                    raise InvalidInput(f"bad public endpoint {endpoint!r}: use IP:PORT")
            if self.wg_backend not in ("auto", "kernel", "userspace"):
                raise InvalidInput(f"bad WireGuard backend {self.wg_backend!r}: use auto, kernel or userspace")
            if self.netlink_tools not in ("auto", "pyroute2", "commands"):
                raise InvalidInput(f"bad netlink_tools {self.netlink_tools!r}: use auto, pyroute2 or commands")
            if not 0 < int(self.wg_port) < 65536:
                raise InvalidInput(f"bad WireGuard port {self.wg_port}")
        if self.oidc_issuer:
            if not self.oidc_issuer.startswith("https://"):
                raise InvalidInput(f"OIDC issuer must be an https:// URL, got {self.oidc_issuer!r}")
            if not self.oidc_client_id:
                raise InvalidInput("OIDC needs oidc_client_id: register meshbox as a client at the provider, with "
                                   f"the redirect URI {self.public_url()}/oidc/callback")

    def gateway_routes(self):
        """The routes the box advertises (checked), with the exit routes when it is an exit node."""
        routes = check_routes(self.advertise_routes, self.prefix_v4, self.prefix_v6)
        return routes + list(EXIT_ROUTES) if self.advertise_exit_node else routes


class JsonLogFormatter(logging.Formatter):
    """One JSON object per log line, for log collectors."""

    def format(self, record):
        entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
                 + f".{int(record.msecs):03d}Z", "level": record.levelname.lower(), "message": record.getMessage()}
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


class TextLogFormatter(logging.Formatter):
    """Plain log lines with the message's control characters escaped: one
    record is one line, whatever a node put in the text logged."""

    def formatMessage(self, record):
        record.message = escape_control(record.message)
        return super().formatMessage(record)


class RecentLogs(logging.Handler):
    """The last lines logged, kept for 'meshbox logs'."""

    def __init__(self, size=1000):
        super().__init__()
        self.lines = collections.deque(maxlen=size)

    def emit(self, record):
        self.lines.append(self.format(record))


def log_formatter(config):
    if config.log_format == "json":
        return JsonLogFormatter()
    return TextLogFormatter("%(asctime)s %(levelname)s %(message)s")


# ---- Native crypto ----
# native/ builds a freestanding libmeshbox_crypto.so (ChaCha20-Poly1305,
# X25519, BLAKE2s; NEON on ARM).  It is looked for in this order:
#   $MESHBOX_NATIVE          a file, or a folder holding the file ("off": none)
#   <this file's folder>/native/libmeshbox_crypto.so        (installed copy)
#   <this file's folder>/dist/native/<arch>/libmeshbox_crypto.so
#                                            (a checkout after build/native)
# Absent or unloadable, load_native_crypto() returns None and pynacl serves.

class CryptoError(MeshboxError):
    """A MAC did not verify or a key was unusable."""


NATIVE_LIBRARY = "libmeshbox_crypto.so"
NATIVE_ABI_VERSION = 1
_AT_HWCAP = 16
_HWCAP_ARM_NEON = 1 << 12


def native_arch():
    """The dist/native/<arch> name for this interpreter, or None."""
    machine = os.uname().machine.lower()
    wide = struct.calcsize("P") == 8  # a 32-bit userland on a 64-bit kernel
    if machine in ("x86_64", "amd64"):
        return "x86_64" if wide else None
    if machine in ("aarch64", "arm64") or machine.startswith("armv8"):
        return "aarch64" if wide else "armv7"
    if machine.startswith("armv7"):
        return "armv7"
    return None


def native_library_candidates():
    """Paths where the native helper may be, in the order they are tried."""
    override = os.environ.get("MESHBOX_NATIVE", "")
    if override.lower() in ("off", "0", "no"):
        return []
    if override:
        if os.path.isdir(override):
            return [os.path.join(override, NATIVE_LIBRARY)]
        return [override]
    here = os.path.dirname(os.path.abspath(__file__))
    paths = [os.path.join(here, "native", NATIVE_LIBRARY)]
    arch = native_arch()
    if arch:
        paths.append(os.path.join(here, "dist", "native", arch, NATIVE_LIBRARY))
    return paths


def auxv_hwcap(auxv, word_size):
    """AT_HWCAP from the bytes of /proc/self/auxv (words of word_size), or 0."""
    word = "=II" if word_size == 4 else "=QQ"
    usable = len(auxv) - len(auxv) % struct.calcsize(word)
    for key, value in struct.iter_unpack(word, auxv[:usable]):
        if key == _AT_HWCAP:
            return value
    return 0


def cpu_has_neon():
    """Whether this CPU has NEON: always on aarch64, AT_HWCAP on 32-bit ARM."""
    arch = native_arch()
    if arch != "armv7":
        return arch == "aarch64"
    try:
        with open("/proc/self/auxv", "rb") as f:
            auxv = f.read()
    except OSError:
        return False  # unknown: the portable path is always safe
    return bool(auxv_hwcap(auxv, struct.calcsize("P")) & _HWCAP_ARM_NEON)


def _fixed(value, size, what):
    """value as bytes of exactly size bytes, or ValueError."""
    value = bytes(value)
    if len(value) != size:
        raise InvalidInput(f"{what} must be {size} bytes, got {len(value)}")
    return value


class NativeCrypto:
    """ctypes binding of libmeshbox_crypto.so (ABI in native/README.md)."""

    def __init__(self, path):
        lib = ctypes.CDLL(path)
        u8p, size, cint = ctypes.c_char_p, ctypes.c_size_t, ctypes.c_int
        for name, args in (
            ("mb_version", []),
            ("mb_has_neon", []),
            ("mb_use_neon", [cint]),
            ("mb_aead_seal", [u8p, u8p, u8p, u8p, size, u8p, size]),
            ("mb_aead_open", [u8p, u8p, u8p, u8p, size, u8p, size]),
            ("mb_x25519", [u8p, u8p, u8p]),
            ("mb_x25519_base", [u8p, u8p]),
            ("mb_blake2s", [u8p, size, u8p, size, u8p, size]),
        ):
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = args, cint
        if lib.mb_version() != NATIVE_ABI_VERSION:
            raise OSError(f"{path}: ABI version {lib.mb_version()}, "
                          f"expected {NATIVE_ABI_VERSION}")
        self.path = path
        self._lib = lib
        self.use_neon(cpu_has_neon())

    @property
    def has_neon(self):
        """Whether the library carries a NEON path at all."""
        return bool(self._lib.mb_has_neon())

    @property
    def neon(self):
        """Whether the NEON path is in use now."""
        return bool(self._lib.mb_use_neon(-1))

    def use_neon(self, on):
        """Use the NEON path (when built and asked for); returns whether it is on."""
        return bool(self._lib.mb_use_neon(1 if on else 0))

    def x25519(self, scalar, point):
        """X25519 shared secret; raises CryptoError for a low-order point."""
        out = ctypes.create_string_buffer(32)
        if self._lib.mb_x25519(out, _fixed(scalar, 32, "scalar"),
                               _fixed(point, 32, "point")) != 0:
            raise CryptoError("X25519 with a low-order point")
        return out.raw

    def x25519_base(self, scalar):
        """The public key of an X25519 private key."""
        out = ctypes.create_string_buffer(32)
        self._lib.mb_x25519_base(out, _fixed(scalar, 32, "scalar"))
        return out.raw

    def aead_seal(self, key, nonce, plaintext, ad=b""):
        """ChaCha20-Poly1305 (IETF): ciphertext followed by the 16-byte tag."""
        plaintext, ad = bytes(plaintext), bytes(ad)
        out = ctypes.create_string_buffer(len(plaintext) + 16)
        if self._lib.mb_aead_seal(out, _fixed(key, 32, "key"),
                                  _fixed(nonce, 12, "nonce"), ad, len(ad),
                                  plaintext, len(plaintext)) != 0:
            raise InvalidInput("ChaCha20-Poly1305 message too long")
        return out.raw

    def aead_open(self, key, nonce, ciphertext, ad=b""):
        """Plaintext of a ChaCha20-Poly1305 message, or raise CryptoError."""
        ciphertext, ad = bytes(ciphertext), bytes(ad)
        out = ctypes.create_string_buffer(max(len(ciphertext) - 16, 0))
        if self._lib.mb_aead_open(out, _fixed(key, 32, "key"),
                                  _fixed(nonce, 12, "nonce"), ad, len(ad),
                                  ciphertext, len(ciphertext)) != 0:
            raise CryptoError("ChaCha20-Poly1305 tag mismatch")
        return out.raw

    def blake2s(self, data, key=b"", digest_size=32):
        """BLAKE2s (keyed when key is given), as hashlib.blake2s computes it."""
        data, key = bytes(data), bytes(key)
        if not 1 <= digest_size <= 32 or len(key) > 32:
            raise InvalidInput("BLAKE2s: digest_size 1..32, key at most 32 bytes")
        out = ctypes.create_string_buffer(digest_size)
        self._lib.mb_blake2s(out, digest_size, key, len(key), data, len(data))
        return out.raw


def load_native_crypto(path=None):
    """The native helper at path, or the first one found; None if there is none.

    An explicit path must load (errors propagate); a found file that fails
    to load is logged and skipped.
    """
    if ctypes is None:
        return None
    if path is not None:
        return NativeCrypto(path)
    for candidate in native_library_candidates():
        if not os.path.isfile(candidate):
            continue
        try:
            return NativeCrypto(candidate)
        except (OSError, AttributeError) as e:
            log.warning("native crypto helper %s not used: %s", candidate, e)
    return None


# ---- Crypto ----
# One small surface that the rest of the file calls.  pynacl serves it; the
# native helper, when found, replaces the functions it covers (below).

def _require_sodium():
    if _sodium is None:
        raise Unavailable("pynacl is required: pip install pynacl")
    return _sodium


def new_private_key():
    """A fresh X25519 private key (clamped, as WireGuard stores them)."""
    k = bytearray(secrets.token_bytes(32))
    k[0] &= 248
    k[31] = (k[31] & 127) | 64
    return bytes(k)


def _sodium_x25519_public(private):
    """The public key of an X25519 private key."""
    return _require_sodium().crypto_scalarmult_base(private)


def _sodium_x25519(private, public):
    """X25519 shared secret; refuses low-order points (all-zero output)."""
    try:
        shared = _require_sodium().crypto_scalarmult(private, public)
    except Exception as e:  # libsodium refuses all-zero results
        raise CryptoError("X25519 with a low-order point") from e
    if not any(shared):
        raise CryptoError("X25519 with a low-order point")
    return shared


def _sodium_aead_seal(key, nonce, plaintext, ad=b""):
    """ChaCha20-Poly1305 (IETF, 12-byte nonce): ciphertext with its tag."""
    return _require_sodium().crypto_aead_chacha20poly1305_ietf_encrypt(
        bytes(plaintext), ad or None, nonce, key)


def _sodium_aead_open(key, nonce, ciphertext, ad=b""):
    """Open a ChaCha20-Poly1305 message or raise CryptoError."""
    try:
        return _require_sodium().crypto_aead_chacha20poly1305_ietf_decrypt(
            bytes(ciphertext), ad or None, nonce, key)
    except Exception as e:
        raise CryptoError("ChaCha20-Poly1305 tag mismatch") from e


def blake2s(data, key=b""):
    """BLAKE2s-256 (hashlib)."""
    return hashlib.blake2s(data, key=key).digest()


def _sodium_box_seal(private, public, nonce, message):
    """NaCl crypto_box (X25519 + XSalsa20-Poly1305), as DERP uses it."""
    return _require_sodium().crypto_box(message, nonce, public, private)


def _sodium_box_open(private, public, nonce, sealed):
    """Open a NaCl box or raise CryptoError."""
    try:
        return _require_sodium().crypto_box_open(sealed, nonce, public, private)
    except Exception as e:
        raise CryptoError("NaCl box did not open") from e


def _sodium_ed25519_public(seed):
    """The Ed25519 public key for a 32-byte seed."""
    return bytes(_nacl_signing.SigningKey(seed).verify_key)


def _sodium_ed25519_sign(seed, message):
    """An Ed25519 signature (64 bytes) of message."""
    return _nacl_signing.SigningKey(seed).sign(message).signature


# Without pynacl (OpenWrt: the native helper serves X25519 and the AEAD),
# the NaCl box of the DERP handshake and the Ed25519 signature of the DERP
# certificate come from the pure-Python versions below.  They run a few
# times per DERP connection and once per certificate, never per packet.
# Not constant-time: the one secret they touch on a schedule an attacker
# could time is the certificate seed, used once at startup.

_MASK32 = 0xFFFFFFFF
_SALSA20_SIGMA = struct.unpack("<4I", b"expand 32-byte k")
# Salsa20's quarter-rounds (y0, y1, y2, y3): the four columns, then the four rows.
_SALSA20_QUARTERS = ((0, 4, 8, 12), (5, 9, 13, 1), (10, 14, 2, 6), (15, 3, 7, 11),
                     (0, 1, 2, 3), (5, 6, 7, 4), (10, 11, 8, 9), (15, 12, 13, 14))
_POLY1305_P = (1 << 130) - 5
_POLY1305_R_CLAMP = 0x0FFFFFFC0FFFFFFC0FFFFFFC0FFFFFFF
_BOX_ZERO_NONCE = bytes(16)


def _salsa20_doublerounds(key, block16):
    """Salsa20's 20 rounds over (key, 16 input bytes): (final, initial) state words."""
    k, n = struct.unpack("<8I", key), struct.unpack("<4I", block16)
    start = [_SALSA20_SIGMA[0], *k[:4], _SALSA20_SIGMA[1], *n,
             _SALSA20_SIGMA[2], *k[4:], _SALSA20_SIGMA[3]]
    x = list(start)
    for _ in range(10):
        for a, b, c, d in _SALSA20_QUARTERS:
            t = (x[a] + x[d]) & _MASK32
            x[b] ^= (t << 7 | t >> 25) & _MASK32
            t = (x[b] + x[a]) & _MASK32
            x[c] ^= (t << 9 | t >> 23) & _MASK32
            t = (x[c] + x[b]) & _MASK32
            x[d] ^= (t << 13 | t >> 19) & _MASK32
            t = (x[d] + x[c]) & _MASK32
            x[a] ^= (t << 18 | t >> 14) & _MASK32
    return x, start


def hsalsa20(key, block16):
    """HSalsa20: a 32-byte subkey from a key and 16 input bytes."""
    x, _ = _salsa20_doublerounds(key, block16)
    return struct.pack("<8I", *(x[i] for i in (0, 5, 10, 15, 6, 7, 8, 9)))


def xsalsa20_stream(key, nonce, length):
    """length bytes of XSalsa20 key stream for a 24-byte nonce."""
    subkey, out = hsalsa20(key, nonce[:16]), bytearray()
    for counter in range((length + 63) // 64):
        x, start = _salsa20_doublerounds(subkey, nonce[16:24] + struct.pack("<Q", counter))
        out += struct.pack("<16I", *((a + b) & _MASK32 for a, b in zip(x, start)))
    return bytes(out[:length])


def poly1305(key, message):
    """The Poly1305 one-time authenticator (RFC 8439, 2.5) of message."""
    r = int.from_bytes(key[:16], "little") & _POLY1305_R_CLAMP
    s = int.from_bytes(key[16:32], "little")
    acc = 0
    for i in range(0, len(message), 16):
        acc = (acc + int.from_bytes(message[i:i + 16] + b"\x01", "little")) * r % _POLY1305_P
    return ((acc + s) & ((1 << 128) - 1)).to_bytes(16, "little")


def _pure_box_key(private, public):
    """crypto_box_beforenm: HSalsa20 of the X25519 shared secret."""
    return hsalsa20(x25519(private, public), _BOX_ZERO_NONCE)


def _pure_box_seal(private, public, nonce, message):
    """NaCl crypto_box in pure Python: the 16-byte tag, then the ciphertext."""
    message = bytes(message)
    stream = xsalsa20_stream(_pure_box_key(private, public), nonce, 32 + len(message))
    sealed = bytes(a ^ b for a, b in zip(message, stream[32:]))
    return poly1305(stream[:32], sealed) + sealed


def _pure_box_open(private, public, nonce, sealed):
    """Open a pure-Python NaCl box or raise CryptoError."""
    sealed = bytes(sealed)
    if len(sealed) < 16:
        raise CryptoError("NaCl box did not open")
    stream = xsalsa20_stream(_pure_box_key(private, public), nonce, 16 + len(sealed))
    if not hmac.compare_digest(poly1305(stream[:32], sealed[16:]), sealed[:16]):
        raise CryptoError("NaCl box did not open")
    return bytes(a ^ b for a, b in zip(sealed[16:], stream[32:]))


# Ed25519 (RFC 8032) on the twisted Edwards curve -x^2 + y^2 = 1 + d x^2 y^2,
# points in extended coordinates (X, Y, Z, T) with x = X/Z, y = Y/Z, xy = T/Z.
_ED_P = (1 << 255) - 19
_ED_D = -121665 * pow(121666, -1, _ED_P) % _ED_P
_ED_ORDER = (1 << 252) + 27742317777372353535851937790883648493
_ED_SQRT_M1 = pow(2, (_ED_P - 1) // 4, _ED_P)


def _ed_base_point():
    """The base point: y = 4/5 and the even x."""
    y = 4 * pow(5, -1, _ED_P) % _ED_P
    xx = (y * y - 1) * pow(_ED_D * y * y + 1, -1, _ED_P) % _ED_P
    x = pow(xx, (_ED_P + 3) // 8, _ED_P)
    if x * x % _ED_P != xx:
        x = x * _ED_SQRT_M1 % _ED_P
    if x & 1:
        x = _ED_P - x
    return (x, y, 1, x * y % _ED_P)


_ED_BASE = _ed_base_point()


def _ed_add(p, q):
    """Point addition (also doubling) in extended coordinates."""
    x1, y1, z1, t1 = p
    x2, y2, z2, t2 = q
    a = (y1 - x1) * (y2 - x2) % _ED_P
    b = (y1 + x1) * (y2 + x2) % _ED_P
    c = 2 * _ED_D * t1 * t2 % _ED_P
    d = 2 * z1 * z2 % _ED_P
    e, f, g, h = b - a, d - c, d + c, b + a
    return (e * f % _ED_P, g * h % _ED_P, f * g % _ED_P, e * h % _ED_P)


def _ed_base_times(scalar):
    """[scalar] times the base point, as its 32-byte encoding."""
    result, addend = (0, 1, 1, 0), _ED_BASE
    while scalar:
        if scalar & 1:
            result = _ed_add(result, addend)
        addend = _ed_add(addend, addend)
        scalar >>= 1
    x, y, z, _ = result
    zinv = pow(z, -1, _ED_P)
    x, y = x * zinv % _ED_P, y * zinv % _ED_P
    return (y | (x & 1) << 255).to_bytes(32, "little")


def _ed_expanded_seed(seed):
    """The secret scalar and the nonce prefix that a 32-byte seed stands for."""
    h = hashlib.sha512(_fixed(seed, 32, "seed")).digest()
    a = int.from_bytes(h[:32], "little")
    a = (a & ~7 & ((1 << 254) - 1)) | (1 << 254)
    return a, h[32:]


def _pure_ed25519_public(seed):
    """The Ed25519 public key for a 32-byte seed, in pure Python."""
    return _ed_base_times(_ed_expanded_seed(seed)[0])


def _pure_ed25519_sign(seed, message):
    """An Ed25519 signature (64 bytes) of message, in pure Python."""
    a, prefix = _ed_expanded_seed(seed)
    public = _ed_base_times(a)
    r = int.from_bytes(hashlib.sha512(prefix + message).digest(), "little") % _ED_ORDER
    big_r = _ed_base_times(r)
    k = int.from_bytes(hashlib.sha512(big_r + public + message).digest(), "little") % _ED_ORDER
    return big_r + ((r + k * a) % _ED_ORDER).to_bytes(32, "little")


_native = load_native_crypto()
x25519_public = _native.x25519_base if _native else _sodium_x25519_public
x25519 = _native.x25519 if _native else _sodium_x25519
aead_seal = _native.aead_seal if _native else _sodium_aead_seal
aead_open = _native.aead_open if _native else _sodium_aead_open
box_seal = _sodium_box_seal if _sodium else _pure_box_seal
box_open = _sodium_box_open if _sodium else _pure_box_open
ed25519_public = _sodium_ed25519_public if _nacl_signing else _pure_ed25519_public
ed25519_sign = _sodium_ed25519_sign if _nacl_signing else _pure_ed25519_sign


def crypto_backend_problem():
    """Why this Python cannot run meshbox's crypto, or None when it can."""
    if _native is None and _sodium is None:
        return ("meshbox needs pynacl (pip install pynacl) or its native helper "
                "(build/native; the OpenWrt package carries it)")
    return None


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


class NoiseError(MeshboxError):
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


def noise_respond(static_private, message, static_public=None):
    """Responder side of IK: (response message, NoiseSession).  A server
    passes its static public key to save an X25519 per handshake."""
    version = initiation_version(message)
    ss = SymmetricState(version)
    ss.mix_hash(static_public or x25519_public(static_private))
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


# Level 1: on map JSON (random keys, repeated field names) it is twice as
# fast as level 3 and no larger; a full map is compressed at every join.
ZSTD_LEVEL = 1

if _zstd_std is not None:
    def zstd_compress(data):
        """Compress one map message into a zstd frame."""
        return _zstd_std.compress(data, level=ZSTD_LEVEL)
elif _zstandard is not None:
    _zstd_compressor = _zstandard.ZstdCompressor(level=ZSTD_LEVEL)

    def zstd_compress(data):
        """Compress one map message into a zstd frame."""
        return _zstd_compressor.compress(data)
else:
    zstd_compress = zstd_raw_frame


def map_frame(message):
    """One map-stream message (a dict, or its JSON already encoded):
    little-endian length, then the zstd frame."""
    body = zstd_compress(message if isinstance(message, bytes) else json_bytes(message))
    return struct.pack("<I", len(body)) + body


# ---- WebSocket ----
# Browser-style clients carry the control connection in WebSocket binary
# messages; this adapter gives them the same readexactly/write surface as a
# TCP stream.

WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
WS_OP_CONT, WS_OP_BINARY, WS_OP_CLOSE, WS_OP_PING, WS_OP_PONG = 0x0, 0x2, 0x8, 0x9, 0xA
WS_MAX_MESSAGE = 1 << 20
WS_MAX_CONTROL = 125                 # RFC 6455 5.5: control frames are short and never fragmented
WS_CONTROL_BUFFER = 64 << 10         # bytes waiting for a peer past which its pings get no pong


def websocket_accept_value(client_key):
    """Sec-WebSocket-Accept for a client's Sec-WebSocket-Key."""
    return base64.b64encode(hashlib.sha1(client_key.encode() + WS_GUID).digest()).decode()


def websocket_mask(mask, data):
    """data XORed with the 4-byte mask repeated (masking and unmasking are
    the same): one big-integer XOR, 20 times faster than a loop over bytes."""
    n = len(data)
    key = (mask * (n // 4 + 1))[:n]
    return (int.from_bytes(data, "little") ^ int.from_bytes(key, "little")).to_bytes(n, "little")


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
        self.transport = writer.transport
        self.buffer = bytearray()

    async def _read_message(self):
        while True:
            b0, b1 = await self.reader.readexactly(2)
            opcode, masked, n = b0 & 0x0F, b1 & 0x80, b1 & 0x7F
            if not masked:
                raise ConnectionError("unmasked websocket frame: clients must mask (RFC 6455 5.1)")
            if opcode & 0x08 and (n > WS_MAX_CONTROL or not b0 & 0x80):
                raise ConnectionError("websocket control frame longer than 125 bytes or fragmented")
            if n == 126:
                n = struct.unpack(">H", await self.reader.readexactly(2))[0]
            elif n == 127:
                n = struct.unpack(">Q", await self.reader.readexactly(8))[0]
            if n > WS_MAX_MESSAGE:
                raise ConnectionError("websocket frame too large")
            mask = await self.reader.readexactly(4)
            data = websocket_mask(mask, await self.reader.readexactly(n))
            if opcode == WS_OP_CLOSE:
                raise asyncio.IncompleteReadError(b"", None)
            if opcode == WS_OP_PING:
                # Pings need no login: a peer that sends them without reading gets no more pongs.
                if self.transport.get_write_buffer_size() <= WS_CONTROL_BUFFER:
                    self.writer.write(websocket_frame(WS_OP_PONG, data))
                continue
            if opcode in (WS_OP_BINARY, WS_OP_CONT):
                return data

    async def readexactly(self, n):
        while len(self.buffer) < n:
            self.buffer += await self._read_message()
        out = bytes(self.buffer[:n])
        del self.buffer[:n]
        return out

    async def read(self, n):
        """Up to n bytes: what is buffered, else the next message's; b"" at close."""
        if not self.buffer:
            try:
                self.buffer += await self._read_message()
            except asyncio.IncompleteReadError:
                return b""
        out = bytes(self.buffer[:n])
        del self.buffer[:n]
        return out

    def write(self, data):
        self.writer.write(websocket_frame(WS_OP_BINARY, data))

    async def drain(self):
        await self.writer.drain()

    def close(self):
        self.writer.close()


# ---- Addresses ----

# 100.100.100.0/24 holds Tailscale's service addresses (100.100.100.100 DNS).
RESERVED_V4 = ipaddress.ip_network("100.100.100.0/24")


def allocate_addresses(prefix_v4, prefix_v6, taken, start=1):
    """The first IPv4 in the prefix from offset start on that is free, with
    the IPv6 at the same offset: (ipv4, ipv6, offset).  taken(ipv4, ipv6)
    says whether either address is in use."""
    net4, net6 = ipaddress.ip_network(prefix_v4), ipaddress.ip_network(prefix_v6)
    base4, base6 = int(net4.network_address), int(net6.network_address)
    reserved = range(int(RESERVED_V4.network_address) - base4, int(RESERVED_V4.broadcast_address) - base4 + 1)
    for offset in range(max(start, 1), net4.num_addresses - 1):
        if offset in reserved:
            continue
        ipv4, ipv6 = str(ipaddress.IPv4Address(base4 + offset)), str(ipaddress.IPv6Address(base6 + offset))
        if not taken(ipv4, ipv6):
            return ipv4, ipv6, offset
    if start > 1:                # freed addresses below start: look there too
        return allocate_addresses(prefix_v4, prefix_v6, taken)
    raise InvalidInput(f"address pool {prefix_v4} is exhausted")


# ---- Store ----
# SQLite in the state folder.  Registrations, deletions and keys commit
# before the client hears back; endpoints and last-seen times live in memory
# and are written at most once a minute (routers write to flash).

# The schema version lives in the database (PRAGMA user_version).  Version 0
# is every release before versions were kept; MIGRATIONS[n] takes a database
# from version n - 1 to n, and a new database gets them all in turn.
SCHEMA_VERSION = 1

SCHEMA_V1 = """
CREATE TABLE IF NOT EXISTS secrets (name TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS settings (name TEXT PRIMARY KEY, value TEXT NOT NULL);
-- login requests live in the server's memory (older versions kept them here)
DROP TABLE IF EXISTS auth_requests;
CREATE TABLE IF NOT EXISTS api_keys (
    id INTEGER PRIMARY KEY, prefix TEXT NOT NULL, hash TEXT UNIQUE NOT NULL, created REAL NOT NULL,
    expiration REAL, revoked INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS oauth_clients (
    id INTEGER PRIMARY KEY, client_id TEXT UNIQUE NOT NULL, hash TEXT UNIQUE NOT NULL, scopes TEXT NOT NULL,
    created REAL NOT NULL, expiration REAL, revoked INTEGER NOT NULL DEFAULT 0);
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
    endpoints TEXT NOT NULL, approved_routes TEXT NOT NULL DEFAULT '[]', cap INTEGER NOT NULL DEFAULT 0,
    kind TEXT NOT NULL DEFAULT 'client');
CREATE TABLE IF NOT EXISTS devices (
    id INTEGER PRIMARY KEY, name TEXT UNIQUE NOT NULL, user_id INTEGER NOT NULL REFERENCES users(id),
    public_key BLOB UNIQUE NOT NULL, ipv4 TEXT UNIQUE NOT NULL, ipv6 TEXT UNIQUE NOT NULL,
    full_tunnel INTEGER NOT NULL, created REAL NOT NULL);
"""

MIGRATIONS = {1: SCHEMA_V1}

PREAUTH_KEY_PREFIX = "mskey-"
NODE_CLIENT = "client"       # a Tailscale client that registered itself
NODE_GATEWAY = "gateway"     # meshbox's own kernel-WireGuard node
GATEWAY_USER = "meshbox"     # owner of the gateway node and its devices


# A node's fields that an administrative edit (or another process) may change.
NODE_EDITABLE_FIELDS = ("node_key", "user_id", "given_name", "tags", "expiry", "approved_routes", "ipv4", "ipv6")


class StoreError(MeshboxError):
    """The state database could not be read or written (disk full, read-only...)."""


@dataclasses.dataclass
class User:
    """A person (or owner of devices) in the tailnet."""
    id: int
    name: str
    created: float


def stored_hostinfo(text, whose):
    """A node's Hostinfo as stored, checked again: a value an older meshbox
    stored that no longer passes is cleaned as it loads (a restart heals the
    tailnet); {} for one nested too deep to use."""
    try:
        return checked_hostinfo(parse_json(text), whose) or {}
    except ValueError:
        return {}


def stored_endpoints(text, whose):
    """A node's endpoints as stored; [] for a list an older meshbox let through."""
    try:
        return checked_endpoints(json.loads(text))
    except ValueError as e:
        log.warning("stored endpoints of %s dropped: %s", whose, e)
        return []


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
    kind: str = NODE_CLIENT
    online: bool = False
    endpoint_types: list = dataclasses.field(default_factory=list)   # how the node found each endpoint

    @classmethod
    def from_row(cls, row):
        return cls(
            id=row["id"], machine_key=row["machine_key"], node_key=row["node_key"],
            disco_key=row["disco_key"] or b"", user_id=row["user_id"], hostname=row["hostname"],
            given_name=row["given_name"], ipv4=row["ipv4"], ipv6=row["ipv6"],
            tags=json.loads(row["tags"]), ephemeral=bool(row["ephemeral"]),
            auth_key_id=row["auth_key_id"], expiry=row["expiry"], created=row["created"],
            last_seen=row["last_seen"], hostinfo=stored_hostinfo(row["hostinfo"], f"stored node {row['id']}"),
            endpoints=stored_endpoints(row["endpoints"], f"stored node {row['id']}"),
            approved_routes=json.loads(row["approved_routes"]), cap=row["cap"], kind=row["kind"])

    def durable_fields(self):
        """The fields an administrative edit can change (compared on reload)."""
        return tuple(getattr(self, name) for name in NODE_EDITABLE_FIELDS)


def hash_secret(secret):
    """Keys are stored hashed; the prefix alone is kept for display."""
    return hashlib.sha256(secret.encode()).hexdigest()


def key_in_force(row, at):
    """Whether a stored key or client (its row) is neither revoked nor past
    its expiration; a pre-auth key may also be spent (see its own check)."""
    return not row["revoked"] and not (row["expiration"] and row["expiration"] <= at)


class Store:
    """The SQLite state: every method commits before it returns."""

    def __init__(self, path):
        self.path = path
        self.free_from = 1       # address offset where the next allocation starts looking
        try:
            # SQLite creates -wal and -shm with the database's mode: 0600, as it holds the server's keys.
            os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
            for name in (path, path + "-wal", path + "-shm"):
                if os.path.exists(name):
                    make_private(name, 0o600)
            self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=10)
            self.db.row_factory = sqlite3.Row
            version = self.db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:         # refused before anything is written
                raise StoreError(f"state database {path} has schema version {version}, but this meshbox "
                                 f"({VERSION}) knows versions up to {SCHEMA_VERSION}: it is older than the state. "
                                 "Run the newer meshbox again, or restore the .bak copy its upgrade left")
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.execute("PRAGMA foreign_keys=ON")
            self._migrate(version)
        except (sqlite3.Error, OSError) as e:
            raise StoreError(f"cannot open state database {path}: {e}") from e

    def _migrate(self, version):
        """Bring the database from version to SCHEMA_VERSION in one
        transaction, after a backup copy of an older one (meshbox.db.vN.bak)."""
        if version == SCHEMA_VERSION:
            return
        if self.db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]:
            backup = f"{self.path}.v{version}.bak"
            os.close(os.open(backup, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600))
            make_private(backup, 0o600)
            copy = sqlite3.connect(backup)
            try:
                self.db.backup(copy)
            finally:
                copy.close()
            log.info("state database at schema version %d: upgrading to %d (a copy is kept in %s)",
                     version, SCHEMA_VERSION, backup)
        with self.transaction():
            for step in range(version + 1, SCHEMA_VERSION + 1):
                for statement in MIGRATIONS[step].split(";\n"):
                    if statement.strip():
                        self.db.execute(statement)
            self.db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

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

    # settings (the policy)
    def setting(self, name):
        row = self.db.execute("SELECT value FROM settings WHERE name=?", (name,)).fetchone()
        return row[0] if row else None

    def set_setting(self, name, value):
        """Store a setting; None removes it."""
        with self.transaction():
            if value is None:
                self.db.execute("DELETE FROM settings WHERE name=?", (name,))
            else:
                self.db.execute("INSERT OR REPLACE INTO settings(name, value) VALUES(?, ?)", (name, value))

    # users
    def create_user(self, name):
        if not name or len(name) > 63 or any(c.isspace() for c in name):
            raise InvalidInput(f"bad user name {name!r}: use 1-63 characters, no spaces")
        try:
            with self.transaction():
                cur = self.db.execute("INSERT INTO users(name, created) VALUES(?, ?)", (name, now()))
        except sqlite3.IntegrityError:
            raise InvalidInput(f"user {name!r} already exists") from None
        return User(cur.lastrowid, name, now())

    def users(self):
        return [User(r["id"], r["name"], r["created"]) for r in self.db.execute("SELECT * FROM users ORDER BY id")]

    def user_named(self, name):
        row = self.db.execute("SELECT * FROM users WHERE name=?", (name,)).fetchone()
        if not row:
            raise InvalidInput(f"no user named {name!r} (create it with: users create {name})")
        return User(row["id"], row["name"], row["created"])

    def user_named_or_created(self, name):
        """The user of that name, created first if there is none (a first sign-in, the gateway's owner)."""
        row = self.db.execute("SELECT * FROM users WHERE name=?", (name,)).fetchone()
        return User(row["id"], row["name"], row["created"]) if row else self.create_user(name)

    def delete_user(self, name):
        user = self.user_named(name)
        if self.db.execute("SELECT 1 FROM nodes WHERE user_id=?", (user.id,)).fetchone():
            raise InvalidInput(f"user {name!r} still owns nodes; delete them first")
        with self.transaction():
            self.db.execute("DELETE FROM preauth_keys WHERE user_id=?", (user.id,))
            self.db.execute("DELETE FROM users WHERE id=?", (user.id,))
        return user

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

    def preauth_key(self, secret):
        """A key row by its secret, found by the secret's hash only: the
        displayed prefix (32 bits) must never pass for the key."""
        row = self.db.execute("SELECT * FROM preauth_keys WHERE hash=?", (hash_secret(secret),)).fetchone()
        return dict(row) if row else None

    def expire_preauth_key(self, secret_or_prefix):
        """Revoke a key given its secret or the prefix `preauthkeys list` shows."""
        row = self.preauth_key(secret_or_prefix)
        prefix = secret_or_prefix.rstrip("…")
        if row is None and len(prefix) >= 10:
            rows = self.db.execute("SELECT * FROM preauth_keys WHERE prefix=?", (prefix,)).fetchall()
            row = rows[0] if len(rows) == 1 else None
        if not row:
            raise InvalidInput("no such pre-auth key")
        with self.transaction():
            self.db.execute("UPDATE preauth_keys SET revoked=1 WHERE id=?", (row["id"],))

    def spend_preauth_key(self, key_id):
        """Count one use of a key (inside the registration's transaction);
        False if a single-use key was spent meanwhile."""
        return self.db.execute("UPDATE preauth_keys SET used=used+1 WHERE id=? AND (reusable OR used=0)",
                               (key_id,)).rowcount == 1

    # nodes
    def nodes(self):
        return [Node.from_row(r) for r in self.db.execute("SELECT * FROM nodes ORDER BY id")]

    def insert_node(self, node):
        """Insert a node (inside the caller's transaction); sets node.id."""
        cur = self.db.execute(
            "INSERT INTO nodes(machine_key, node_key, disco_key, user_id, hostname, given_name, ipv4, ipv6,"
            " tags, ephemeral, auth_key_id, expiry, created, last_seen, hostinfo, endpoints, approved_routes, cap, kind)"
            " VALUES(?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (node.machine_key, node.node_key, node.disco_key, node.user_id, node.hostname, node.given_name,
             node.ipv4, node.ipv6, json.dumps(node.tags), int(node.ephemeral), node.auth_key_id, node.expiry,
             node.created, node.last_seen, json.dumps(node.hostinfo), json.dumps(node.endpoints),
             json.dumps(node.approved_routes), node.cap, node.kind))
        node.id = cur.lastrowid

    def update_node(self, node_id, **fields):
        """Update durable fields of one node (inside or outside a transaction)."""
        encoded = {k: json.dumps(v) if k in ("tags", "hostinfo", "endpoints", "approved_routes") else v
                   for k, v in fields.items()}
        sets = ", ".join(f"{k}=?" for k in encoded)
        self.db.execute(f"UPDATE nodes SET {sets} WHERE id=?", (*encoded.values(), node_id))

    def delete_node(self, node_id):
        self.db.execute("DELETE FROM nodes WHERE id=?", (node_id,))
        self.free_from = 1

    # plain WireGuard devices behind the gateway
    def devices(self):
        return [dict(r) for r in self.db.execute(
            "SELECT d.*, u.name AS user FROM devices d JOIN users u ON u.id=d.user_id ORDER BY d.id")]

    def insert_device(self, name, user_id, public_key, full_tunnel, prefix_v4, prefix_v6):
        """A new plain WireGuard device with the next free addresses: (ipv4, ipv6)."""
        with self.transaction():
            if self.db.execute("SELECT 1 FROM devices WHERE name=?", (name,)).fetchone():
                raise InvalidInput(f"a device named {name!r} exists")
            ipv4, ipv6 = self.allocate_addresses(prefix_v4, prefix_v6)
            self.db.execute("INSERT INTO devices(name, user_id, public_key, ipv4, ipv6, full_tunnel, created)"
                            " VALUES(?,?,?,?,?,?,?)", (name, user_id, public_key, ipv4, ipv6, int(full_tunnel), now()))
        return ipv4, ipv6

    def delete_device(self, name):
        """Remove a plain WireGuard device; False if there is none by that name."""
        deleted = self.db.execute("DELETE FROM devices WHERE name=?", (name,)).rowcount == 1
        self.free_from = 1
        return deleted

    # API keys and OAuth clients (API v2's client credentials)
    def api_keys(self):
        return [dict(r) for r in self.db.execute("SELECT * FROM api_keys ORDER BY id")]

    def api_key(self, key_hash):
        row = self.db.execute("SELECT * FROM api_keys WHERE hash=?", (key_hash,)).fetchone()
        return dict(row) if row else None

    def create_api_key(self, secret, expiration):
        with self.transaction():
            self.db.execute("INSERT INTO api_keys(prefix, hash, created, expiration) VALUES(?,?,?,?)",
                            (secret[:14], hash_secret(secret), now(), expiration))

    def revoke_api_key(self, prefix_or_secret):
        """Revoke the one key with this displayed prefix or this secret; False if not exactly one."""
        with self.transaction():
            return self.db.execute("UPDATE api_keys SET revoked=1 WHERE prefix=? OR hash=?",
                                   (prefix_or_secret.rstrip("…"), hash_secret(prefix_or_secret))).rowcount == 1

    def oauth_clients(self):
        return [dict(r, scopes=json.loads(r["scopes"]))
                for r in self.db.execute("SELECT * FROM oauth_clients ORDER BY id")]

    def oauth_client(self, client_id):
        row = self.db.execute("SELECT * FROM oauth_clients WHERE client_id=?", (client_id,)).fetchone()
        return dict(row, scopes=json.loads(row["scopes"])) if row else None

    def create_oauth_client(self, client_id, secret, scopes, expiration):
        with self.transaction():
            self.db.execute("INSERT INTO oauth_clients(client_id, hash, scopes, created, expiration)"
                            " VALUES(?,?,?,?,?)", (client_id, hash_secret(secret), json.dumps(scopes), now(), expiration))

    def revoke_oauth_client(self, client_id):
        with self.transaction():
            return self.db.execute("UPDATE oauth_clients SET revoked=1 WHERE client_id=?", (client_id,)).rowcount == 1

    def address_taken(self, ipv4, ipv6):
        """Whether a node or device holds either address (index lookups)."""
        return self.db.execute("SELECT EXISTS(SELECT 1 FROM nodes WHERE ipv4=?1 OR ipv6=?2)"
                               " OR EXISTS(SELECT 1 FROM devices WHERE ipv4=?1 OR ipv6=?2)",
                               (ipv4, ipv6)).fetchone()[0] == 1

    def allocate_addresses(self, prefix_v4, prefix_v6):
        """The lowest free address pair for a new node or device (inside its
        transaction).  The search starts where the last one ended, so a
        registration costs a few index lookups, not a scan of the tailnet;
        a deletion sends it back to the start to reuse what was freed."""
        ipv4, ipv6, self.free_from = allocate_addresses(prefix_v4, prefix_v6, self.address_taken, self.free_from)
        return ipv4, ipv6


def open_state(state_dir):
    """The Store of a state folder, which is created, or narrowed, 0700: it holds
    the server's private keys."""
    os.makedirs(state_dir, mode=0o700, exist_ok=True)
    make_private(state_dir, 0o700)
    return Store(os.path.join(state_dir, "meshbox.db"))


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
                self._rollback()
                raise StoreError(f"could not save state: {e}") from e
        self._rollback()
        if isinstance(value, sqlite3.OperationalError):
            raise StoreError(f"could not save state: {value}") from value
        return False

    def _rollback(self):
        # SQLite rolls back by itself when a COMMIT fails on a full or
        # read-only disk; a second ROLLBACK would raise and hide the cause.
        if self.db.in_transaction:
            self.db.execute("ROLLBACK")


# ---- Policy ----
# Tailscale ACL policy engine, pure: HuJSON text -> parse_policy -> Policy;
# compile_policy(Policy or None, topology) -> what each node is sent.
#   topology = {"users": [{id, name, email}],
#               "nodes": {name: {hostname, tags, user (name) or user_id, ipv4, ipv6,
#                                routable_ips, approved_routes, id (registration order)}}}
#   result   = {name: NodeView(packet_filter_rules, peers {hostname: {"AllowedIPs",
#                                 "PrimaryRoutes"?}}, ssh_rules, cap_map)}
# Names and hostnames are opaque keys: meshbox names each node by its integer
# id (a rename changes nothing a policy sees); the conformance corpus, by text.
# check_policy_tests runs the policy's tests/sshTests when a policy is set;
# auto_approved_routes says which advertised routes autoApprovers approve.


class PolicyError(InvalidInput):
    """A policy that Tailscale would refuse; the message says what and where."""


# -- IP ranges and sets --

_FAMILY_MAX = {4: (1 << 32) - 1, 6: (1 << 128) - 1}


def _bit_indexes(mask):
    """Positions of the set bits of an int (node sets are int bitmasks by node index)."""
    while mask:
        low = mask & -mask
        yield low.bit_length() - 1
        mask ^= low


def _addr_text(family, value):
    return str(ipaddress.IPv4Address(value) if family == 4 else ipaddress.IPv6Address(value))


def _parse_addr(text):
    """'100.64.0.1' -> (family, int); raises ValueError."""
    if "%" in text:
        raise InvalidInput(text)
    addr = ipaddress.ip_address(text)
    return addr.version, int(addr)


def _parse_prefix(text):
    """'10.0.0.0/8' or '10.1.2.3' -> (family, lo, hi, bits); raises ValueError."""
    if "/" not in text:
        family, value = _parse_addr(text)
        return family, value, value, 32 if family == 4 else 128
    addr_text, bits_text = text.split("/", 1)
    family, value = _parse_addr(addr_text)
    width = 32 if family == 4 else 128
    if not bits_text.isdigit() or int(bits_text) > width or bits_text != str(int(bits_text)):
        raise InvalidInput(text)
    bits = int(bits_text)
    host = (1 << (width - bits)) - 1
    return family, value & ~host, (value & ~host) | host, bits


def _parse_range(text):
    """One SrcIPs/DstPorts entry ('*', 'a-b', prefix, address) -> list of (family, lo, hi)."""
    if text == "*":
        return [(4, 0, _FAMILY_MAX[4]), (6, 0, _FAMILY_MAX[6])]
    if "-" in text:
        first, last = text.split("-", 1)
        (f1, lo), (f2, hi) = _parse_addr(first), _parse_addr(last)
        if f1 != f2 or lo > hi:
            raise InvalidInput(text)
        return [(f1, lo, hi)]
    family, lo, hi, _ = _parse_prefix(text)
    return [(family, lo, hi)]


def _range_as_prefix(family, lo, hi):
    """The CIDR text of [lo, hi] if it is exactly one prefix, else None."""
    size = hi - lo + 1
    if size & (size - 1) or lo % size:
        return None
    width = 32 if family == 4 else 128
    return "%s/%d" % (_addr_text(family, lo), width - size.bit_length() + 1)


class IPSet:
    """An immutable set of addresses as sorted (family, lo, hi) ranges.

    Overlapping ranges merge; merely adjacent ones stay apart, because Tailscale
    lists neighbouring node addresses one by one rather than as a range.
    """

    __slots__ = ("ranges", "_keys")

    def __init__(self, ranges=()):
        merged = []
        for family, lo, hi in sorted(ranges):
            if merged and merged[-1][0] == family and lo <= merged[-1][2]:
                if hi > merged[-1][2]:
                    merged[-1] = (family, merged[-1][1], hi)
            else:
                merged.append((family, lo, hi))
        self.ranges = tuple(merged)
        self._keys = [(f, lo) for f, lo, _ in merged]

    @classmethod
    def parse(cls, texts):
        out = []
        for text in texts:
            out.extend(_parse_range(text))
        return cls(out)

    def __bool__(self):
        return bool(self.ranges)

    def __or__(self, other):
        return IPSet(self.ranges + other.ranges)

    def __sub__(self, other):
        out = []
        for family, lo, hi in self.ranges:
            pieces = [(lo, hi)]
            for cut_family, cut_lo, cut_hi in other.ranges:
                if cut_family != family:
                    continue
                cut = []
                for a, b in pieces:
                    if cut_hi < a or cut_lo > b:
                        cut.append((a, b))
                        continue
                    if a < cut_lo:
                        cut.append((a, cut_lo - 1))
                    if cut_hi < b:
                        cut.append((cut_hi + 1, b))
                pieces = cut
            out.extend((family, a, b) for a, b in pieces)
        return IPSet(out)

    def _at(self, family, value):
        i = bisect.bisect_right(self._keys, (family, value)) - 1
        if i >= 0 and self.ranges[i][0] == family:
            return self.ranges[i]
        return None

    def contains(self, family, value):
        r = self._at(family, value)
        return r is not None and r[2] >= value

    def covers(self, family, lo, hi):
        i = bisect.bisect_right(self._keys, (family, lo)) - 1
        if i < 0 or self.ranges[i][0] != family or self.ranges[i][2] < lo:
            return False
        end = self.ranges[i][2]
        while end < hi:  # walk across adjacent ranges
            i += 1
            if i == len(self.ranges) or self.ranges[i][0] != family or self.ranges[i][1] > end + 1:
                return False
            end = self.ranges[i][2]
        return True

    def overlaps(self, family, lo, hi):
        r = self._at(family, hi)
        return r is not None and r[2] >= lo

    def overlaps_set(self, other):
        return any(self.overlaps(*r) for r in other.ranges)

    def issubset(self, other):
        return all(other.covers(*r) for r in self.ranges)

    def strings(self):
        """Wire form used in SrcIPs: addresses, prefixes, or 'a-b' ranges."""
        out = []
        for family, lo, hi in self.ranges:
            if lo == hi:
                out.append(_addr_text(family, lo))
            else:
                out.append(_range_as_prefix(family, lo, hi)
                           or "%s-%s" % (_addr_text(family, lo), _addr_text(family, hi)))
        return out

    def prefixes(self):
        """The minimal list of CIDR strings covering the set."""
        out = []
        for family, lo, hi in self.ranges:
            cls = ipaddress.IPv4Address if family == 4 else ipaddress.IPv6Address
            out.extend(str(n) for n in ipaddress.summarize_address_range(cls(lo), cls(hi)))
        return out


def _prefix_set(*texts):
    return IPSet.parse(texts)


CGNAT = _prefix_set("100.64.0.0/10")
TAILSCALE_ULA = _prefix_set("fd7a:115c:a1e0::/48")
# "*" means every tailnet address: CGNAT minus the ChromeOS VM range, plus the ULA.
WILDCARD_ADDRS = (CGNAT - _prefix_set("100.115.92.0/23")) | TAILSCALE_ULA
ALL_ADDRS = _prefix_set("0.0.0.0/0", "::/0")
# autogroup:internet: public IPv4 and global-unicast IPv6, without private,
# tailnet and link-local space.
THE_INTERNET = _prefix_set("0.0.0.0/0", "2000::/3") - _prefix_set(
    "fc00::/7", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16",
    "fd7a:115c:a1e0::/48", "100.64.0.0/10", "fe80::/10", "169.254.0.0/16")


def _is_internet(dests):
    """True when a destination set covers a whole family or all of the internet."""
    return (dests.covers(4, 0, _FAMILY_MAX[4]) or dests.covers(6, 0, _FAMILY_MAX[6])
            or THE_INTERNET.issubset(dests))


# -- HuJSON --

def _strip_hujson(text):
    """Blank out comments and trailing commas, keeping every offset in place."""
    out = list(text)
    i, n = 0, len(text)
    last_comma = None  # index of a comma after a value, not yet followed by another
    prev = ""          # the last significant character
    while i < n:
        c = text[i]
        if c == '"':
            last_comma = None
            prev = c
            i += 1
            while i < n and text[i] != '"':
                i += 2 if text[i] == "\\" else 1
            i += 1
        elif text.startswith("//", i):
            while i < n and text[i] != "\n":
                out[i] = " "
                i += 1
        elif text.startswith("/*", i):
            end = text.find("*/", i + 2)
            if end < 0:
                raise _syntax_error(text, i, "unterminated block comment")
            for j in range(i, end + 2):
                if out[j] != "\n":
                    out[j] = " "
            i = end + 2
        else:
            if c == ",":
                last_comma = i if prev not in "{[,:" else None
            elif c in "]}":
                if last_comma is not None:
                    out[last_comma] = " "
                last_comma = None
            elif not c.isspace():
                last_comma = None
            if not c.isspace():
                prev = c
            i += 1
    return "".join(out)


def _line_col(text, pos):
    line = text.count("\n", 0, pos) + 1
    return line, pos - (text.rfind("\n", 0, pos) + 1) + 1


def _syntax_error(text, pos, what):
    line, col = _line_col(text, pos)
    return PolicyError("hujson: line %d, column %d: %s" % (line, col, what))


def parse_hujson(text):
    """HuJSON (JSON + comments + trailing commas) -> Python value; PolicyError on bad syntax."""
    try:
        return parse_json(_strip_hujson(text))
    except json.JSONDecodeError as e:
        raise _syntax_error(text, e.pos, e.msg) from None
    except ValueError as e:
        raise PolicyError(f"hujson: {e}") from None


# -- Policy model --

AUTOGROUPS = ("internet", "member", "nonroot", "tagged", "self", "danger-all")
# Accepted only as nodeAttrs targets (admin roles are not node identities here).
NODEATTR_ONLY_AUTOGROUPS = ("admin", "owner", "it-admin", "network-admin",
                            "billing-admin", "auditor")
PROTOCOLS = {"icmp": 1, "igmp": 2, "ipv4": 4, "ip-in-ip": 4, "tcp": 6, "egp": 8,
             "igp": 9, "udp": 17, "gre": 47, "esp": 50, "ah": 51,
             "ipv6-icmp": 58, "sctp": 132, "fc": 133}
PORTED_PROTOCOLS = ("", "tcp", "udp", "sctp")
ALL_PORTS = (0, 65535)
# tailscale.com capabilities a policy may grant; their companions are implied.
GRANTABLE_TS_CAPS = {"tailscale.com/cap/drive", "tailscale.com/cap/relay",
                     "tailscale.com/cap/webui", "tailscale.com/cap/kubernetes",
                     "tailscale.com/cap/tsidp", "tailscale.com/cap/secrets"}
COMPANION_CAPS = (("tailscale.com/cap/drive", "tailscale.com/cap/drive-sharer"),
                  ("tailscale.com/cap/relay", "tailscale.com/cap/relay-target"))
SSH_CHECK_PERIOD_MAX = 168 * 3600
SSH_CHECK_PERIOD_DEFAULT = 12 * 3600    # a check rule without checkPeriod, as Tailscale's
HOST_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
TAG_NAME = re.compile(r"^tag:[A-Za-z][A-Za-z0-9._-]*$")
SECTIONS = {"acls", "groups", "tagowners", "hosts", "autoapprovers", "ssh", "nodeattrs",
            "tests", "sshtests", "grants", "randomizeclientport",
            # tailnet settings a Tailscale policy may carry; meshbox has its own
            "derpmap", "disableipv4", "onecgnatroute"}
# Sections that narrow access: ignoring them would grant more than the policy says.
UNSUPPORTED = {"postures", "defaultsrcposture", "ipsets", "srcposture"}


@dataclasses.dataclass(frozen=True)
class Alias:
    """One selector: kind is wildcard|user|domain|group|tag|host|prefix|autogroup."""
    kind: str
    value: str

    def __str__(self):
        return self.value


@dataclasses.dataclass
class Grant:
    """A grant (ACLs are lowered to grants): sources, destinations, ip and app."""
    src: list
    dst: list
    ip: list          # [(protocol name, [(first, last), ...])]
    app: dict = dataclasses.field(default_factory=dict)
    via: list = dataclasses.field(default_factory=list)
    from_acl: bool = False


@dataclasses.dataclass
class SSHRule:
    """One ssh section entry."""
    action: str
    src: list
    dst: list
    users: list
    accept_env: list
    check_period: float = SSH_CHECK_PERIOD_DEFAULT   # seconds a check holds; 0: every session


@dataclasses.dataclass
class Policy:
    """A parsed, validated policy document."""
    groups: dict
    tag_owners: dict
    hosts: dict                 # name -> IPSet of its one prefix
    single_host: dict           # name -> True when it names one address
    grants: list
    has_rules: bool             # False: no acls and no grants section (allow all)
    ssh: list
    node_attrs: list            # [(targets, attrs)]
    route_approvers: dict       # prefix text -> [Alias]
    exit_approvers: list
    tests: list
    ssh_tests: list
    randomize_client_port: bool


def _keys_lower(obj, where):
    if not isinstance(obj, dict):
        raise PolicyError("%s: expected an object" % where)
    out = {}
    for key, value in obj.items():
        if not key.startswith("#"):
            out[key.lower()] = value
    return out


def _as_object(value, where):
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise PolicyError("%s: expected an object" % where)
    return value


def _refuse_unsupported(keys, where):
    for key in sorted(set(keys) & UNSUPPORTED):
        raise PolicyError("%s: %s is not supported by meshbox" % (where, json.dumps(key)))


def _section(doc, key, where):
    """A list-valued section (acls, grants, ssh, ...), empty when absent."""
    value = doc.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise PolicyError("%s: expected a list" % where)
    return value


def _as_list(value, where, allow_null=True):
    if value is None and allow_null:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise PolicyError("%s: expected a list of strings" % where)
    return value


def parse_alias(text):
    """'tag:web' -> Alias('tag', 'tag:web'); raises PolicyError."""
    text = text.strip()
    try:
        _parse_prefix(text)
        return Alias("prefix", text)
    except ValueError:
        pass
    if text == "*":
        return Alias("wildcard", text)
    if text.startswith("user:*@"):
        return Alias("domain", text)
    if "@" in text:
        return Alias("user", text)
    for kind in ("group", "tag", "autogroup"):
        if text.startswith(kind + ":"):
            if kind == "autogroup" and text[10:] not in AUTOGROUPS + NODEATTR_ONLY_AUTOGROUPS:
                raise PolicyError("invalid autogroup: got %r, must be one of %s"
                                  % (text, ", ".join("autogroup:" + a for a in AUTOGROUPS)))
            return Alias(kind, text)
    if ":" not in text and HOST_NAME.match(text):
        return Alias("host", text)
    raise PolicyError("%s: invalid address" % json.dumps(text))


def parse_port_ranges(text):
    """'22,80-90' or '*' -> [(first, last), ...]; raises PolicyError (message without context)."""
    if text == "*":
        return [ALL_PORTS]
    out = []
    for part in text.split(","):
        if "-" in part:
            pieces = [p for p in part.split("-") if p]
            if len(pieces) != 2:
                raise PolicyError("invalid port range format")
            first, last = _port_number(pieces[0]), _port_number(pieces[1])
            if first > last:
                raise PolicyError("invalid port range: first port is greater than last port")
        else:
            first = last = _port_number(part)
            if first < 1:
                raise PolicyError("first port must be >0, or use '*' for wildcard")
        out.append((first, last))
    return out


def _port_number(text):
    if not re.fullmatch(r"[+-]?\d+", text):
        raise PolicyError("invalid first integer")
    value = int(text)
    if not 0 <= value <= 65535:
        raise PolicyError("port number out of range")
    return value


def split_host_port(text):
    """'host:22' / '[v6]:22' -> ('host', '22'); raises PolicyError."""
    if text.startswith("["):
        close = text.find("]")
        host = text[1:close] if close > 0 else ""
        try:
            if close < 0 or _parse_addr(host)[0] != 6:
                raise ValueError
        except ValueError:
            raise PolicyError("square brackets are only valid around IPv6 addresses: %r" % text)
        text = host + text[close + 1:]
    cut = text.rfind(":")
    if cut < 0:
        raise PolicyError("hostport must contain a colon")
    if cut == 0 or cut == len(text) - 1:
        raise PolicyError("%r: destination and port must both be present" % text)
    return text[:cut], text[cut + 1:]


def parse_destination(text):
    """ACL dst 'alias:ports' -> (Alias, [(first, last)]); raises PolicyError."""
    host, ports = split_host_port(text)
    try:
        port_ranges = parse_port_ranges(ports)
    except PolicyError as e:
        raise PolicyError("dst=%s: port range %s: %s" % (json.dumps(text), json.dumps(ports), e))
    return parse_alias(host), port_ranges


def parse_protocol(text):
    """'tcp' / '6' / '' -> canonical protocol name or number text; raises PolicyError."""
    name = str(text).strip().lower()
    if name in PROTOCOLS or name == "":
        return name
    if name == "*":
        raise PolicyError('proto name "*" not known; use protocol number 0-255 or '
                          'protocol name (icmp, tcp, udp, etc.)')
    if not name.isdigit():
        raise PolicyError("invalid protocol number: %r must be a known protocol name or "
                          "valid protocol number 0-255" % name)
    if name.startswith("0"):
        raise PolicyError("leading 0 not permitted in protocol number: %r" % name)
    number = int(name)
    if number > 255:
        raise PolicyError("protocol number out of range (0-255): %d" % number)
    for known, value in PROTOCOLS.items():
        if value == number:
            return known
    return name


def protocol_numbers(name):
    """Canonical protocol -> IPProto list ([] means the client's default set)."""
    if name == "":
        return []
    return [PROTOCOLS[name]] if name in PROTOCOLS else [int(name)]


def parse_internet_protocol(text):
    """A grant 'ip' entry ('*', '443', 'tcp:80-90') -> (protocol, [(first, last)])."""
    if text == "*":
        return "", [ALL_PORTS]
    if ":" not in text:
        try:
            return "", parse_port_ranges(text)
        except PolicyError as e:
            raise PolicyError("port range %s: %s" % (json.dumps(text), e))
    parts = text.split(":")
    if len(parts) != 2:
        raise PolicyError("expected only one colon in Internet protocol and port type, got %r"
                          % text)
    protocol = parse_protocol(parts[0])
    try:
        ports = parse_port_ranges(parts[1])
    except PolicyError as e:
        raise PolicyError("port range %s: %s" % (json.dumps(parts[1]), e))
    return protocol, ports


def _acl_to_grants(acl, where):
    """Lower one ACL entry to grants, one per destination (non-self first, as Tailscale orders)."""
    acl = _keys_lower(acl, where)
    _refuse_unsupported(acl, where)
    unknown = set(acl) - {"action", "src", "dst", "proto", "users", "ports"}
    if unknown:
        raise PolicyError("%s: unknown field %s" % (where, json.dumps(sorted(unknown)[0])))
    action = acl.get("action")
    if action != "accept":
        raise PolicyError("action=%s is not supported" % json.dumps(action))
    protocol = parse_protocol(acl.get("proto", ""))
    # "users" and "ports" are the legacy spellings of "src" and "dst"
    src = [parse_alias(s) for s in _as_list(acl.get("src", acl.get("users")), where + ".src")]
    dsts = [parse_destination(d)
            for d in _as_list(acl.get("dst", acl.get("ports")), where + ".dst")]
    if protocol not in PORTED_PROTOCOLS:
        for _, ports in dsts:
            if any(p != ALL_PORTS for p in ports):
                raise PolicyError('protocol does not support specific ports: %r, only "*" is '
                                  'allowed' % protocol)
    if any(a.kind != "autogroup" for a, _ in dsts):
        dsts = ([d for d in dsts if d[0].value != "autogroup:self"]
                + [d for d in dsts if d[0].value == "autogroup:self"])
    return src, [Grant(src, [alias], [(protocol, ports)], from_acl=True) for alias, ports in dsts]


def _parse_grant(raw, where):
    raw = _keys_lower(raw, where)
    _refuse_unsupported(raw, where)
    unknown = set(raw) - {"src", "dst", "ip", "app", "via"}
    if unknown:
        raise PolicyError("%s: unknown field %s" % (where, json.dumps(sorted(unknown)[0])))
    src = [parse_alias(s) for s in _as_list(raw.get("src"), where + ".src")]
    dst = [parse_alias(s) for s in _as_list(raw.get("dst"), where + ".dst")]
    ip = [parse_internet_protocol(p) for p in _as_list(raw.get("ip"), where + ".ip")]
    app = raw.get("app") or {}
    if not isinstance(app, dict):
        raise PolicyError("%s.app: expected an object" % where)
    via = raw.get("via") or []
    if not isinstance(via, list) or not all(isinstance(v, str) and v.startswith("tag:")
                                            for v in via):
        raise PolicyError("via can only be a tag")
    return Grant(src, dst, ip, app, via)


def _parse_groups(raw):
    raw = _as_object(raw, "groups")
    groups = {}
    for name, members in raw.items():
        if not name.startswith("group:"):
            raise PolicyError("group must start with 'group:', got: %r" % name)
        if not isinstance(members, list) or not all(isinstance(m, str) for m in members):
            raise PolicyError("group value must be an array of users: group %r" % name)
    for name in sorted(raw, reverse=True):  # report the deepest parent first
        for member in raw[name]:
            if member.startswith("group:"):
                raise PolicyError("groups[%s]: %s: group members cannot be recursive"
                                  % (json.dumps(name), json.dumps(member)))
    for name, members in raw.items():
        for member in members:
            if "@" not in member:
                raise PolicyError("username must contain @, got: %r (in %s)" % (member, name))
        groups[name] = [Alias("user", m.strip()) for m in members]
    return groups


def _parse_tag_owners(raw):
    owners = {}
    for tag, members in _as_object(raw, "tagOwners").items():
        if not tag.startswith("tag:"):
            raise PolicyError("tag must start with 'tag:', got: %r" % tag)
        if not TAG_NAME.match(tag):
            raise PolicyError("tagOwners[%s]: tag names must start with a letter, after 'tag:'"
                              % json.dumps(tag, ensure_ascii=False))
        parsed = []
        for member in _as_list(members, "tagOwners[%s]" % json.dumps(tag)):
            alias = parse_alias(member)
            if alias.kind not in ("user", "group", "tag", "autogroup"):
                raise PolicyError("invalid owner format: %r" % member)
            parsed.append(alias)
        owners[tag] = parsed
    return owners


def _parse_hosts(raw):
    hosts, single = {}, {}
    for name, value in _as_object(raw, "hosts").items():
        if not HOST_NAME.match(name) or "@" in name:
            raise PolicyError("invalid hostname: %r" % name)
        try:
            family, lo, hi, bits = _parse_prefix(str(value))
        except ValueError:
            raise PolicyError("hostname contains invalid IP address: hostname %r address %r"
                              % (name, value))
        hosts[name] = IPSet([(family, lo, hi)])
        single[name] = lo == hi
    return hosts, single


def _parse_duration(text):
    """Go-style duration ('12h', '1h30m', '-1m') -> seconds; raises PolicyError."""
    match = isinstance(text, str) and re.fullmatch(r"([+-]?)((?:\d+(?:\.\d+)?(?:ns|us|µs|ms|s|m|h))+|0)", text)
    if not match:
        raise PolicyError("time: invalid duration %s" % json.dumps(text))
    unit = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "h": 3600}
    total = sum(float(n) * unit[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)",
                                                             match.group(2)))
    return -total if match.group(1) == "-" else total


def _go_duration(seconds):
    sign = "-" if seconds < 0 else ""
    seconds = abs(int(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    if h:
        return "%s%dh%dm%ds" % (sign, h, m, s)
    if m:
        return "%s%dm%ds" % (sign, m, s)
    return "%s%ds" % (sign, s)


def _parse_ssh_rule(raw, where):
    raw = _keys_lower(raw, where)
    action = (raw.get("action") or "").strip()
    if action not in ("", "accept", "check"):
        raise PolicyError("%s is not a valid action" % json.dumps(action))
    if not action:
        raise PolicyError("action must be specified")
    users = [u.strip() for u in _as_list(raw.get("users"), where + ".users")]
    if not users:
        raise PolicyError("users must be specified")
    for user in users:
        if user in ("", "*"):
            raise PolicyError("user %s is not valid" % json.dumps(user))
    accept_env = _as_list(raw.get("acceptenv"), where + ".acceptEnv")
    if any(e == "" for e in accept_env):
        raise PolicyError("acceptEnv values cannot be empty")
    period = SSH_CHECK_PERIOD_DEFAULT
    if raw.get("checkperiod") is not None:       # null is the same as leaving it out
        if action != "check":
            raise PolicyError('checkPeriod is only valid with action "check"')
        period = 0 if raw["checkperiod"] == "always" else _parse_duration(raw["checkperiod"])
        if period < 0:
            raise PolicyError("checkPeriod %s must be a positive duration" % _go_duration(period))
        if period > SSH_CHECK_PERIOD_MAX:
            raise PolicyError("checkPeriod %s is above the max (168h)" % _go_duration(period))
    src = [parse_alias(s) for s in _as_list(raw.get("src"), where + ".src")]
    dst = [parse_alias(s) for s in _as_list(raw.get("dst"), where + ".dst")]
    for alias in src:
        if alias.kind not in ("user", "domain", "group", "tag", "autogroup"):
            raise PolicyError("alias not supported for SSH source: %s" % alias)
    for alias in dst:
        if alias.kind == "wildcard":
            raise PolicyError("wildcard (*) is not supported as SSH destination; use "
                              "'autogroup:member' for user-owned devices, 'autogroup:tagged' "
                              "for tagged devices, or specific tags/users")
        if alias.kind in ("host", "prefix"):
            raise PolicyError("invalid dst %s" % json.dumps(alias.value))
        if alias.kind not in ("user", "tag", "autogroup"):
            raise PolicyError("alias not supported for SSH destination: %s" % alias)
    return SSHRule(action, src, dst, users, accept_env, period)


def _parse_node_attrs(raw):
    out = []
    for i, entry in enumerate(raw):
        entry = _keys_lower(entry, "nodeAttrs[%d]" % i)
        targets = [parse_alias(t) for t in _as_list(entry.get("target"), "nodeAttrs.target")]
        attrs = _as_list(entry.get("attr"), "nodeAttrs.attr")
        for pool in _as_list(entry.get("ippool"), "nodeAttrs.ipPool"):
            try:
                family, lo, hi, _ = _parse_prefix(pool)
            except ValueError:
                raise PolicyError("IPPool(%s): invalid prefix" % pool)
            if not CGNAT.covers(family, lo, hi):
                raise PolicyError("IPPool(%s): must be within 100.64.0.0/10" % pool)
            if _prefix_set("100.100.100.0/24", "100.115.92.0/23").overlaps(family, lo, hi):
                raise PolicyError("IPPool(%s): network within reserved range" % pool)
        for target in targets:
            if target.kind == "autogroup" and target.value[10:] in ("self", "internet",
                                                                    "danger-all", "nonroot"):
                raise PolicyError("nodeAttrs target does not support %s" % target)
        out.append((targets, attrs))
    return out


def _parse_auto_approvers(raw):
    raw = _keys_lower(raw or {}, "autoApprovers")
    routes = {}
    for prefix, approvers in _as_object(raw.get("routes"), "autoApprovers.routes").items():
        try:
            _parse_prefix(prefix)
        except ValueError:
            raise PolicyError("autoApprovers: invalid route prefix %r" % prefix)
        routes[prefix] = [_approver(a) for a in _as_list(approvers, "autoApprovers.routes")]
    exit_node = [_approver(a) for a in _as_list(raw.get("exitnode"), "autoApprovers.exitNode")]
    return routes, exit_node


def _approver(text):
    alias = parse_alias(text)
    if alias.kind not in ("user", "group", "tag"):
        raise PolicyError("invalid auto approver format: %r" % text)
    return alias


def _parse_tests(raw):
    tests = []
    for i, entry in enumerate(raw):
        entry = _keys_lower(entry, "tests[%d]" % i)
        test = {"src": entry.get("src") if isinstance(entry.get("src"), str) else "",
                "proto": parse_protocol(entry.get("proto", "")),
                "accept": _as_list(entry.get("accept"), "tests.accept"),
                "deny": _as_list(entry.get("deny"), "tests.deny")}
        tests.append(test)
    return tests


def _parse_ssh_tests(raw):
    tests = []
    for i, entry in enumerate(raw):
        entry = _keys_lower(entry, "sshTests[%d]" % i)
        src = (entry.get("src") or "").strip()
        dst = [parse_alias(d) for d in _as_list(entry.get("dst"), "sshTests.dst")]
        test = {"src": parse_alias(src) if src else None, "dst": dst}
        for key in ("accept", "deny", "check"):
            test[key] = [u.strip() for u in _as_list(entry.get(key), "sshTests." + key)]
            for user in test[key]:
                if user == "*":
                    raise PolicyError("user %s is not valid" % json.dumps(user))
        tests.append(test)
    return tests


def parse_policy(text):
    """HuJSON policy text -> validated Policy; raises PolicyError saying what and where."""
    doc = parse_hujson(text)
    if doc is None:
        doc = {}
    doc = _keys_lower(doc, "policy")
    _refuse_unsupported(doc, "policy")
    unknown = set(doc) - SECTIONS
    if unknown:
        raise PolicyError("unknown field %s" % json.dumps(sorted(unknown)[0]))
    groups = _parse_groups(doc.get("groups"))
    tag_owners = _parse_tag_owners(doc.get("tagowners"))
    hosts, host_single = _parse_hosts(doc.get("hosts"))
    grants = [_parse_grant(g, "grants[%d]" % i)
              for i, g in enumerate(_section(doc, "grants", "grants"))]
    acl_sources = []
    for i, acl in enumerate(_section(doc, "acls", "acls")):
        src, lowered = _acl_to_grants(acl, "acls[%d]" % i)
        acl_sources.append((src, lowered))
        grants.extend(lowered)
    routes, exit_node = _parse_auto_approvers(doc.get("autoapprovers"))
    policy = Policy(
        groups=groups, tag_owners=tag_owners, hosts=hosts, single_host=host_single,
        grants=grants, has_rules="acls" in doc or "grants" in doc,
        ssh=[_parse_ssh_rule(r, "ssh[%d]" % i) for i, r in enumerate(_section(doc, "ssh", "ssh"))],
        node_attrs=_parse_node_attrs(_section(doc, "nodeattrs", "nodeAttrs")),
        route_approvers=routes, exit_approvers=exit_node,
        tests=_parse_tests(_section(doc, "tests", "tests")),
        ssh_tests=_parse_ssh_tests(_section(doc, "sshtests", "sshTests")),
        randomize_client_port=bool(doc.get("randomizeclientport")))
    _validate(policy, acl_sources)
    return policy


# -- Validation --

def _check_defined(policy, alias, side):
    """Refuse references to undefined groups, tags and hosts."""
    if alias.kind == "group" and alias.value not in policy.groups:
        raise PolicyError("group not defined in policy: %s" % json.dumps(alias.value))
    if alias.kind == "host" and alias.value not in policy.hosts:
        raise PolicyError("host not defined in policy: %s" % json.dumps(alias.value))
    if alias.kind == "tag" and alias.value not in policy.tag_owners:
        found = "tag not found: %s" % json.dumps(alias.value)
        if side == "src":
            raise PolicyError("src=" + found)
        if side == "dst":
            raise PolicyError("dst=%s: %s" % (json.dumps(alias.value), found))
        raise PolicyError(found)


def _check_src_autogroup(alias):
    if alias.kind != "autogroup":
        return
    name = alias.value
    if name == "autogroup:self":
        raise PolicyError('"autogroup:self" not valid on the src side of a rule')
    if name == "autogroup:internet":
        raise PolicyError("autogroup:internet can only be used in ACL destinations")
    if name not in ("autogroup:member", "autogroup:tagged", "autogroup:danger-all"):
        raise PolicyError("autogroup not supported for ACL sources: %s" % json.dumps(name))


def _check_dst_autogroup(alias):
    if alias.kind != "autogroup":
        return
    if alias.value == "autogroup:danger-all":
        raise PolicyError("cannot use autogroup:danger-all as a dst")
    if alias.value not in ("autogroup:internet", "autogroup:member", "autogroup:tagged",
                           "autogroup:self"):
        raise PolicyError("autogroup not supported for ACL destinations: %s"
                          % json.dumps(alias.value))


def _self_sources_ok(sources, allow_wildcard):
    """autogroup:self destinations need user-identity sources only."""
    for alias in sources:
        if alias.kind in ("user", "group", "domain") or alias.value == "autogroup:member":
            continue
        if alias.kind == "wildcard" and allow_wildcard:
            continue
        return False
    return True


SELF_SOURCE_ERROR = "autogroup:self can only be used with users, groups, or supported autogroups"


def _validate_grant(policy, grant):
    for alias in grant.src:
        _check_src_autogroup(alias)
        _check_defined(policy, alias, "src")
    for alias in grant.dst:
        _check_dst_autogroup(alias)
        _check_defined(policy, alias, "dst" if grant.from_acl else None)
    if grant.from_acl:
        return
    if not grant.ip and not grant.app:
        raise PolicyError("ip and app can not both be empty")
    for cap in grant.app:
        if "://" in cap or "/" not in cap:
            raise PolicyError("capability name must have the form {domain}/{path}")
        if cap.startswith("tailscale.com/") and cap not in GRANTABLE_TS_CAPS:
            raise PolicyError("capability name must not be in the tailscale.com domain")
    if grant.app and any(a.value == "autogroup:internet" for a in grant.dst):
        raise PolicyError("cannot use app grants with autogroup:internet")
    for alias in grant.dst:
        if alias.kind == "prefix" and _parse_prefix(alias.value)[3] == 0:
            raise PolicyError('dst %s: to allow all IP addresses, use "*" or '
                              '"autogroup:internet"' % json.dumps(_canonical_prefix(alias.value)))
    for tag in grant.via:
        if tag not in policy.tag_owners:
            raise PolicyError("tag %s not found" % json.dumps(tag))
    # grants are stricter than ACLs: "*" includes tagged nodes, which have no self
    if any(a.value == "autogroup:self" for a in grant.dst) and \
            not _self_sources_ok(grant.src, allow_wildcard=False):
        raise PolicyError(SELF_SOURCE_ERROR)


def _validate(policy, acl_sources):
    for grant in policy.grants:
        _validate_grant(policy, grant)
    for src, lowered in acl_sources:
        if any(g.dst[0].value == "autogroup:self" for g in lowered) and \
                not _self_sources_ok(src, allow_wildcard=True):
            raise PolicyError(SELF_SOURCE_ERROR)
    for rule in policy.ssh:
        _validate_ssh_rule(policy, rule)
    for targets, _ in policy.node_attrs:
        for alias in targets:
            _check_defined(policy, alias, None)
    for owners in policy.tag_owners.values():
        for alias in owners:
            _check_defined(policy, alias, None)
    for approvers in list(policy.route_approvers.values()) + [policy.exit_approvers]:
        for alias in approvers:
            _check_defined(policy, alias, None)
    _validate_tests(policy)
    _validate_ssh_tests(policy)


def _canonical_prefix(text):
    family, lo, _, bits = _parse_prefix(text)
    return "%s/%d" % (_addr_text(family, lo), bits)


def _validate_ssh_rule(policy, rule):
    for alias in rule.src:
        if alias.kind == "autogroup" and alias.value not in ("autogroup:member",
                                                             "autogroup:tagged"):
            if alias.value == "autogroup:internet":
                raise PolicyError("autogroup:internet can only be used in ACL destinations")
            raise PolicyError("autogroup not supported for SSH sources: %s"
                              % json.dumps(alias.value))
        _check_defined(policy, alias, None)
    for alias in rule.dst:
        if alias.kind == "autogroup" and alias.value not in ("autogroup:member",
                                                             "autogroup:tagged",
                                                             "autogroup:self"):
            if alias.value == "autogroup:internet":
                raise PolicyError("autogroup:internet can only be used in ACL destinations")
            raise PolicyError("autogroup not supported for SSH destinations: %s"
                              % json.dumps(alias.value))
        _check_defined(policy, alias, None)
    tagged_src = any(a.kind == "tag" or a.value == "autogroup:tagged" for a in rule.src)
    group_src = any(a.kind in ("group", "domain") or a.value == "autogroup:member"
                    for a in rule.src)
    user_src = {a.value for a in rule.src if a.kind == "user"}
    for alias in rule.dst:
        if alias.kind == "user":
            if tagged_src:
                raise PolicyError("tags in SSH source cannot access user-owned devices (%s); use "
                                  "autogroup:tagged or specific tags as destinations instead"
                                  % alias)
            if group_src or user_src != {alias.value}:
                raise PolicyError("user destination requires source to contain only that same "
                                  "user %s; use autogroup:self instead for same-user SSH access"
                                  % json.dumps(alias.value))
        elif alias.value == "autogroup:self" and tagged_src:
            raise PolicyError("autogroup:self destination requires source to contain only users "
                              "or groups, not tags or autogroup:tagged")
        elif alias.value == "autogroup:member" and tagged_src:
            raise PolicyError("tags in SSH source cannot access autogroup:member "
                              "(user-owned devices)")


def _validate_tests(policy):
    try:
        _validate_test_shapes(policy)
    except PolicyError as e:
        raise PolicyError("test(s) failed:\n%s" % e) from None


def _validate_test_shapes(policy):
    """Each test entry names one connection: one host, one port, a ported protocol."""
    for i, test in enumerate(policy.tests):
        if not test["accept"] and not test["deny"]:
            raise PolicyError('test %d: test entry must have at least one of "accept" or "deny"'
                              % i)
        if test["proto"] not in PORTED_PROTOCOLS:
            raise PolicyError("test %d: test protocol must be tcp, udp, sctp, or empty: %r"
                              % (i, test["proto"]))
        for dst in test["accept"] + test["deny"]:
            alias, ports = parse_destination(dst)
            if alias.value == "autogroup:internet":
                raise PolicyError("test %d, %r: autogroup:internet not valid as a test "
                                  "destination" % (i, dst))
            if len(ports) != 1 or ports[0][0] != ports[0][1]:
                raise PolicyError("test %d, %r: test destination port must be a single port"
                                  % (i, dst))
            if (alias.kind == "prefix" and "/" in alias.value) or \
                    (alias.kind == "host" and not policy.single_host.get(alias.value, True)):
                raise PolicyError("test %d, %r: test destination must be a single host, not a "
                                  "CIDR range" % (i, dst))


def _validate_ssh_tests(policy):
    for i, test in enumerate(policy.ssh_tests):
        if test["src"] is None:
            raise PolicyError("sshTest %d: SSH tests entry must have a non-empty src" % i)
        if not test["dst"]:
            raise PolicyError("sshTest %d: SSH tests entry must have at least one dst" % i)
        for alias in test["dst"]:
            bad = (alias.value == "autogroup:internet"
                   or (alias.kind == "prefix" and _parse_prefix(alias.value)[1]
                       != _parse_prefix(alias.value)[2])
                   or (alias.kind == "host" and not policy.single_host.get(alias.value, True)))
            if bad:
                raise PolicyError("SSH tests dst contains disallowed element %s"
                                  % json.dumps(alias.value))
            if alias.kind == "tag" and alias.value not in policy.tag_owners:
                raise PolicyError("SSH tests dst contains unknown tag %s" % json.dumps(alias.value))


# -- Topology --

@dataclasses.dataclass
class NodeInfo:
    """One node of the topology with its addresses and approved routes resolved."""
    index: int
    name: str
    hostname: str
    tags: tuple
    user_id: object              # None for tagged or ownerless nodes
    addrs: tuple                 # ((family, value), ...) v4 first
    addr_texts: tuple            # the same addresses as text
    order_key: tuple             # registration order: HA primary election prefers the first
    advertised: list             # routable_ips as the node announced them
    subnet_routes: list = ()     # approved, advertised, non-exit prefixes (text)
    subnet_set: IPSet = IPSet()
    exit_routes: list = ()       # approved, advertised exit routes (text)

    def approve(self, approved):
        live = [r for r in self.advertised if r in approved]
        self.subnet_routes = [r for r in live if r not in EXIT_ROUTES]
        self.subnet_set = IPSet.parse(self.subnet_routes)
        self.exit_routes = [r for r in live if r in EXIT_ROUTES]

    def addr_strings(self):
        return list(self.addr_texts)

    def prefixes(self):
        return ["%s/%d" % (text, 32 if f == 4 else 128)
                for (f, _), text in zip(self.addrs, self.addr_texts)]

    def has_routes(self):
        return bool(self.subnet_routes or self.exit_routes)

    def in_set(self, ipset):
        return any(ipset.contains(f, v) for f, v in self.addrs)


class Tailnet:
    """Users and nodes with the indexes selector resolution needs."""

    def __init__(self, topology):
        self.users = list(topology.get("users") or [])
        by_name = {u.get("name"): u.get("id") for u in self.users}
        self.nodes = []
        for index, (name, raw) in enumerate(sorted((topology.get("nodes") or {}).items())):
            tags = tuple(raw.get("tags") or ())
            node = NodeInfo(
                index=index, name=name, hostname=raw.get("hostname") or name, tags=tags,
                user_id=None if tags else raw.get("user_id", by_name.get(raw.get("user"))),
                addrs=tuple(_parse_addr(raw[k]) for k in ("ipv4", "ipv6") if raw.get(k)),
                addr_texts=tuple(_addr_text(*_parse_addr(raw[k])) for k in ("ipv4", "ipv6")
                                 if raw.get(k)),
                order_key=_sort_key(raw.get("id")), advertised=list(raw.get("routable_ips") or ()))
            node.approve(set(raw.get("approved_routes") or ()))
            self.nodes.append(node)
        self.by_name = {n.name: n for n in self.nodes}
        self.user_nodes = {}
        for node in self.nodes:
            if node.user_id is not None:
                self.user_nodes.setdefault(node.user_id, []).append(node)
        self.index_routes()

    def index_routes(self):
        self.approved_subnets = []
        for node in self.nodes:
            for route in node.subnet_routes:
                if route not in self.approved_subnets:
                    self.approved_subnets.append(route)
        self.routers = [n for n in self.nodes if n.subnet_routes]
        self.exit_mask = sum(1 << n.index for n in self.nodes if n.exit_routes)
        self._addr_index = sorted((f, v, n.index) for n in self.nodes for f, v in n.addrs)
        self._addr_keys = [(f, v) for f, v, _ in self._addr_index]

    def mask_in(self, ipset):
        """Bitmask of the nodes with an address in the set."""
        mask = 0
        for family, lo, hi in ipset.ranges:
            start = bisect.bisect_left(self._addr_keys, (family, lo))
            stop = bisect.bisect_right(self._addr_keys, (family, hi))
            for _, _, index in self._addr_index[start:stop]:
                mask |= 1 << index
        return mask

    def router_mask(self, ipset):
        """Bitmask of the routers with an approved subnet overlapping the set."""
        return sum(1 << n.index for n in self.routers if ipset.overlaps_set(n.subnet_set))

    def user_ids(self, token):
        """'alice@example.com' / 'alice@' -> ids of the matching users (exactly one, or none)."""
        token = token[:-1] if token.endswith("@") else token
        found = [u.get("id") for u in self.users
                 if u.get("email") == token or u.get("name") == token]
        return found if len(found) == 1 else []

    def domain_user_ids(self, domain):
        return [u.get("id") for u in self.users
                if (u.get("email") or "").rpartition("@")[2] == domain]

    def nodes_in(self, ipset):
        return [self.nodes[i] for i in _bit_indexes(self.mask_in(ipset))]


class Resolver:
    """Resolves selectors to address sets, caching each selector once per compile."""

    def __init__(self, policy, tailnet):
        self.policy = policy
        self.tailnet = tailnet
        self._cache = {}

    def nodes_of_users(self, user_ids):
        return [n for uid in user_ids for n in self.tailnet.user_nodes.get(uid, ())]

    def _node_set(self, nodes):
        return IPSet((f, v, v) for n in nodes for f, v in n.addrs)

    def resolve(self, alias):
        """Alias -> IPSet (autogroup:self resolves to nothing here: it is per node)."""
        if alias not in self._cache:
            self._cache[alias] = self._resolve(alias)
        return self._cache[alias]

    def _resolve(self, alias):
        kind, value, tailnet = alias.kind, alias.value, self.tailnet
        if kind == "wildcard":
            return WILDCARD_ADDRS
        if kind == "prefix":
            return IPSet.parse([value])
        if kind == "host":
            return self.policy.hosts.get(value, IPSet())
        if kind == "user":
            return self._node_set(self.nodes_of_users(tailnet.user_ids(value)))
        if kind == "domain":
            return self._node_set(self.nodes_of_users(tailnet.domain_user_ids(value[7:])))
        if kind == "group":
            out = IPSet()
            for member in self.policy.groups.get(value, ()):
                out = out | self.resolve(member)
            return out
        if kind == "tag":
            return self._node_set(n for n in tailnet.nodes if value in n.tags)
        if value == "autogroup:member":
            return self._node_set(n for n in tailnet.nodes if not n.tags)
        if value == "autogroup:tagged":
            return self._node_set(n for n in tailnet.nodes if n.tags)
        if value == "autogroup:internet":
            return THE_INTERNET
        if value == "autogroup:danger-all":
            return ALL_ADDRS
        return IPSet()

    def resolve_all(self, aliases):
        out = IPSet()
        for alias in aliases:
            out = out | self.resolve(alias)
        return out


# -- Filter compilation --

def _port_range(first_last):
    return {"First": first_last[0], "Last": first_last[1]}


def _dst_ip_text(prefix):
    """Single-address prefixes go on the wire as bare addresses."""
    addr, _, bits = prefix.partition("/")
    return addr if bits in ("32", "128") else prefix


def _rule(src_ips, dst_ports, protocol):
    rule = {"SrcIPs": src_ips, "DstPorts": dst_ports}
    numbers = protocol_numbers(protocol)
    if numbers:
        rule["IPProto"] = numbers
    return rule


@dataclasses.dataclass
class CompiledGrant:
    """A grant with sources resolved; per-node parts (self, via) kept for later."""
    rules: list
    test_rules: list = dataclasses.field(default_factory=list)   # seen by policy tests only
    self_sources: object = None   # IPSet of sources when the grant has autogroup:self dsts
    grant: Grant = None
    via_src_ips: list = None
    via_dsts: list = None         # [(text, IPSet)]
    via_internet: bool = False


def _source_strings(grant, resolver, keep_explicit=True):
    """SrcIPs for a grant: the merged sources; under '*' also every approved subnet and,
    for plain grants, each explicit source's own addresses again (as Tailscale lists them)."""
    if any(a.value == "autogroup:danger-all" for a in grant.src):
        return ["*"]
    merged = resolver.resolve_all(grant.src)
    if not merged:
        return []
    out = merged.strings()
    if any(a.kind == "wildcard" for a in grant.src):
        seen = set(out)
        extra = list(resolver.tailnet.approved_subnets)
        if keep_explicit:
            for alias in grant.src:
                if alias.kind != "wildcard":
                    extra.extend(resolver.resolve(alias).strings())
        for text in extra:
            if text not in seen:
                seen.add(text)
                out.append(text)
    return out


def _dst_ports_for(alias, ports, resolver):
    if alias.kind == "wildcard":
        return [{"IP": "*", "Ports": _port_range(p)} for p in ports]
    return [{"IP": _dst_ip_text(prefix), "Ports": _port_range(p)}
            for prefix in resolver.resolve(alias).prefixes() for p in ports]


def _companion_rules(dst_ips, src_prefixes, app):
    """Reverse rules Tailscale adds for drive and relay caps."""
    return [{"SrcIPs": dst_ips, "CapGrant": [{"Dsts": src_prefixes, "CapMap": {companion: None}}]}
            for cap, companion in COMPANION_CAPS if cap in app]


def names_no_node(alias):
    """A bare IPv6 address (no /128) as a grant or SSH test destination: Tailscale's
    control plane matches it to no node, even the one that has that address (its
    packet filter and peers leave it out), while the policy's `tests` still see it."""
    return alias.kind == "prefix" and ":" in alias.value and "/" not in alias.value


def _compile_grant(grant, resolver):
    if grant.via:
        return _compile_via_grant(grant, resolver)
    if not grant.src or not grant.dst:
        return None
    sources = resolver.resolve_all(grant.src)
    if not sources and not grant.app:
        return None
    src_ips = _source_strings(grant, resolver)
    others = [a for a in grant.dst if a.value != "autogroup:self"]
    compiled = CompiledGrant(rules=[], grant=grant)
    if len(others) < len(grant.dst):
        compiled.self_sources = sources
    if not others:
        return compiled
    for protocol, ports in grant.ip:
        for rules, aliases in ((compiled.rules, [a for a in others if not names_no_node(a)]),
                               (compiled.test_rules, [a for a in others if names_no_node(a)])):
            dst_ports = [dp for alias in aliases for dp in _dst_ports_for(alias, ports, resolver)]
            if dst_ports and src_ips:
                rules.append(_rule(src_ips, dst_ports, protocol))
    if grant.app:
        cap_grants, dst_ips = [], []
        for alias in others:
            resolved = resolver.resolve(alias)
            cap_grants.append({"Dsts": resolved.prefixes(), "CapMap": grant.app})
            dst_ips.extend(resolved.strings())
        compiled.rules.append({"SrcIPs": src_ips, "CapGrant": cap_grants})
        if any(a.kind == "wildcard" for a in others):
            dst_ips.extend(resolver.tailnet.approved_subnets)
        compiled.rules.extend(_companion_rules(dst_ips, sources.prefixes(), grant.app))
    return compiled


def _compile_via_grant(grant, resolver):
    if not resolver.resolve_all(grant.src):
        return None
    src_ips = _source_strings(grant, resolver, keep_explicit=False)
    dsts = []
    for alias in grant.dst:
        if alias.value in ("autogroup:internet", "autogroup:self"):
            continue
        for prefix in resolver.resolve(alias).prefixes():
            dsts.append((prefix, IPSet.parse([prefix])))
    return CompiledGrant(rules=[], grant=grant, via_src_ips=src_ips, via_dsts=dsts,
                         via_internet=any(a.value == "autogroup:internet" for a in grant.dst))


def _self_rules(compiled, node, resolver):
    """autogroup:self rules for one node: same-user sources to same-user devices."""
    if node.user_id is None or compiled.self_sources is None:
        return []
    same_user = resolver.tailnet.user_nodes.get(node.user_id, [])
    sources = IPSet((f, v, v) for n in same_user if n.in_set(compiled.self_sources)
                    for f, v in n.addrs)
    if not sources:
        return []
    src_ips = sources.strings()
    rules = []
    for protocol, ports in compiled.grant.ip:
        dst_ports = [{"IP": ip, "Ports": _port_range(p)}
                     for n in same_user for p in ports for ip in n.addr_strings()]
        if dst_ports:
            rules.append(_rule(src_ips, dst_ports, protocol))
    if compiled.grant.app:
        rules.append({"SrcIPs": src_ips,
                      "CapGrant": [{"Dsts": n.prefixes(), "CapMap": compiled.grant.app}
                                   for n in same_user]})
        rules.extend(_companion_rules([ip for n in same_user for ip in n.addr_strings()],
                                      sources.prefixes(), compiled.grant.app))
    return rules


def _via_prefixes(compiled, node):
    """The destinations of a via grant that this node routes for (none unless it has the tag)."""
    if not any(t in node.tags for t in compiled.grant.via):
        return []
    prefixes = [text for text, ipset in compiled.via_dsts if node.subnet_set.overlaps_set(ipset)]
    if compiled.via_internet and node.exit_routes:
        prefixes.extend(THE_INTERNET.prefixes())
    return prefixes


def _via_rules(compiled, node):
    """Via grants: rules only on via-tagged routers that serve a destination."""
    prefixes = _via_prefixes(compiled, node)
    rules = []
    for protocol, ports in compiled.grant.ip:
        dst_ports = [{"IP": prefix, "Ports": _port_range(p)} for prefix in prefixes for p in ports]
        if dst_ports:
            rules.append(_rule(compiled.via_src_ips, dst_ports, protocol))
    return rules


def merge_rules(rules):
    """Join rules with equal SrcIPs and IPProto into one (CapGrant rules stay as they are)."""
    out, index = [], {}
    for rule in rules:
        if "CapGrant" in rule:
            out.append(rule)
            continue
        key = (tuple(rule["SrcIPs"]), tuple(rule.get("IPProto", ())))
        if key in index:
            out[index[key]]["DstPorts"].extend(rule["DstPorts"])
        else:
            index[key] = len(out)
            out.append(dict(rule, DstPorts=list(rule["DstPorts"])))
    return out


class Matcher:
    """A rule reduced to source and destination address sets, and the nodes in each."""

    __slots__ = ("srcs", "dsts", "src_mask", "dst_mask")

    def __init__(self, srcs, dsts, tailnet):
        self.srcs, self.dsts = srcs, dsts
        # a node is a source by its own address or by a subnet it routes
        self.src_mask = tailnet.mask_in(srcs) | tailnet.router_mask(srcs)
        self.dst_mask = tailnet.mask_in(dsts) | tailnet.router_mask(dsts)
        if _is_internet(dsts):
            self.dst_mask |= tailnet.exit_mask


class Compiler:
    """One compile of a policy against a topology; caches work shared between nodes.

    Rules from grants are the same objects for every node, so each is indexed once
    by the nodes its destinations serve; a node's filter is then a lookup per rule.
    """

    def __init__(self, policy, tailnet):
        self.policy = policy
        self.tailnet = tailnet
        self.resolver = Resolver(policy, tailnet)
        self._parsed = {}
        self._matchers = {}
        self._served = {}
        self._by_node = {}
        self._self_rules = {}
        grants = policy.grants if policy.has_rules else [
            Grant([Alias("wildcard", "*")], [Alias("wildcard", "*")], [("", [ALL_PORTS])])]
        self.compiled = [c for c in (_compile_grant(g, self.resolver) for g in grants) if c]
        self.per_node = any(c.self_sources is not None or c.grant.via for c in self.compiled)
        self.global_rules = merge_rules([r for c in self.compiled for r in c.rules])
        self.test_rules = merge_rules([r for c in self.compiled for r in c.rules + c.test_rules])
        self.global_matchers = self.matchers(self.global_rules)

    def parse_set(self, texts):
        """Parse wire address lists once per distinct list."""
        if texts not in self._parsed:
            self._parsed[texts] = IPSet.parse(texts)
        return self._parsed[texts]

    def self_rules(self, compiled, node):
        """autogroup:self rules depend only on the node's user: built once per user."""
        key = (id(compiled), node.user_id)
        if key not in self._self_rules:
            self._self_rules[key] = _self_rules(compiled, node, self.resolver)
        return self._self_rules[key]

    def node_rules(self, node):
        """Rules that exist for this node alone: autogroup:self and via expansions."""
        rules = []
        for compiled in self.compiled:
            if compiled.self_sources is not None:
                rules.extend(self.self_rules(compiled, node))
            if compiled.grant.via:
                rules.extend(_via_rules(compiled, node))
        return rules

    def node_matchers(self, node):
        """What the node's unreduced filter allows, for peer and route decisions."""
        if not self.per_node:
            return self.global_matchers
        matchers = self.global_matchers + self.matchers(self.node_rules(node))
        for compiled in self.compiled:
            if compiled.grant.via and compiled.grant.app and not compiled.grant.ip:
                # an app-only via grant sends no packet filter, yet makes the router a peer
                prefixes = _via_prefixes(compiled, node)
                if prefixes:
                    matchers += self.matchers([{"SrcIPs": compiled.via_src_ips,
                                                "DstPorts": [{"IP": p} for p in prefixes]}])
        return matchers

    def packet_filter(self, node):
        """The node's filter: every rule cut down to destinations this node serves."""
        rules = []
        for compiled in self.compiled:
            for rule in compiled.rules:
                reduced = self._by_node_index(rule).get(node.index)
                if reduced:
                    rules.append(reduced)
            if compiled.self_sources is not None:
                rules.extend(self._reduce(node, self.self_rules(compiled, node)))
            if compiled.grant.via:
                rules.extend(self._reduce(node, _via_rules(compiled, node), keep=False))
        return merge_rules(rules)

    def _reduce(self, node, rules, keep=True):
        reduced = (self._by_node_index(rule, keep).get(node.index) for rule in rules)
        return [rule for rule in reduced if rule]

    def _served_mask(self, text):
        """Nodes a destination serves: its addresses, overlapping subnets, or the internet."""
        if text not in self._served:
            dests = self.parse_set((text,))
            mask = self.tailnet.mask_in(dests) | self.tailnet.router_mask(dests)
            if dests.issubset(THE_INTERNET):
                mask |= self.tailnet.exit_mask
            self._served[text] = mask
        return self._served[text]

    def _by_node_index(self, rule, keep=True):
        """rule -> {node index: the rule reduced for that node}, built once per shared rule."""
        if id(rule) in self._by_node:
            return self._by_node[id(rule)][1]
        if "CapGrant" in rule:
            index = self._cap_index(rule)
        else:
            ports = {}
            for dp in rule["DstPorts"]:
                for i in _bit_indexes(self._served_mask(dp["IP"])):
                    ports.setdefault(i, []).append(dp)
            index = {i: dict(rule, DstPorts=dps) for i, dps in ports.items()}
        if keep:  # the rule object is kept alive with its index, so its id stays unique
            self._by_node[id(rule)] = (rule, index)
        return index

    def _cap_index(self, rule):
        """Cap grants narrow broad destinations to each node's own /32 and /128."""
        per_node = {}
        for position, cap in enumerate(rule["CapGrant"]):
            for prefix in cap["Dsts"]:
                family, lo, hi, _ = _parse_prefix(prefix)
                dests = IPSet([(family, lo, hi)])
                nodes = self.tailnet.nodes
                for i in _bit_indexes(self.tailnet.mask_in(dests)):
                    per_node.setdefault(i, {}).setdefault(position, set()).update(
                        p for p, (f, v) in zip(nodes[i].prefixes(), nodes[i].addrs)
                        if f == family and lo <= v <= hi)
                for i in _bit_indexes(self.tailnet.router_mask(dests)):
                    per_node.setdefault(i, {}).setdefault(position, set()).add(prefix)
        return {i: {"SrcIPs": rule["SrcIPs"],
                    "CapGrant": [{"Dsts": _sorted_prefixes(dsts),
                                  "CapMap": rule["CapGrant"][position]["CapMap"]}
                                 for position, dsts in sorted(caps.items())]}
                for i, caps in per_node.items()}

    def matchers(self, rules):
        """Matchers for rules; equal rules (shared by many nodes) are built once."""
        out = []
        for rule in rules:
            texts = [dp["IP"] for dp in rule.get("DstPorts", ())]
            for cap in rule.get("CapGrant", ()):
                texts.extend(cap["Dsts"])
            key = (tuple(rule["SrcIPs"]), tuple(texts))
            if key not in self._matchers:
                self._matchers[key] = Matcher(self.parse_set(key[0]), self.parse_set(key[1]),
                                              self.tailnet)
            out.append(self._matchers[key])
        return out


def _sorted_prefixes(prefixes):
    def key(text):
        family, lo, _, bits = _parse_prefix(text)
        return family, lo, bits
    return sorted(prefixes, key=key)


# -- Peers and routes --

def _registration_key(node):
    return node.order_key, node.name


def primary_routes(tailnet):
    """HA election: each subnet goes to the first (lowest id, then name) approved advertiser."""
    owners = {}
    for node in sorted(tailnet.nodes, key=_registration_key):
        for route in node.subnet_routes:
            owners.setdefault(route, node.name)
    return owners


def _can_access_route(node, matchers, route_set):
    """Whether a node needs a route: it may reach it, it is reached from it, or routes for it."""
    for m in matchers:
        if node.in_set(m.srcs) and m.dsts.overlaps_set(route_set):
            return True
        if m.srcs.overlaps_set(route_set) and node.in_set(m.dsts):
            return True
        if node.subnet_routes:
            if m.srcs.overlaps_set(node.subnet_set) and m.dsts.overlaps_set(route_set):
                return True
            if m.srcs.overlaps_set(route_set) and m.dsts.overlaps_set(node.subnet_set):
                return True
    return False


def _peer_bits(nodes, node_matchers, shared):
    """Peer relation as an int bitmask per node: either side may reach the other.

    Shared (global) matchers relate every source to every destination; a node's own
    matchers only relate pairs that include that node.
    """
    bits = [0] * len(nodes)
    if shared:
        for m in node_matchers[0] if node_matchers else ():
            for i in _bit_indexes(m.src_mask):
                bits[i] |= m.dst_mask
            for i in _bit_indexes(m.dst_mask):
                bits[i] |= m.src_mask
    else:
        for n, matchers in zip(nodes, node_matchers):
            own = 1 << n.index
            for m in matchers:
                if m.src_mask & own:
                    bits[n.index] |= m.dst_mask
                if m.dst_mask & own:
                    bits[n.index] |= m.src_mask
        for n in nodes:
            for i in _bit_indexes(bits[n.index]):
                bits[i] |= 1 << n.index
    for n in nodes:
        bits[n.index] &= ~(1 << n.index)
    return bits


def _overlaps_text(ipset, route):
    return any(ipset.overlaps(*r) for r in _parse_range(route))


@dataclasses.dataclass
class SteeringGrant:
    """A grant as route steering sees it: who it is for, where it goes, through which tags."""
    sources: IPSet
    dests: IPSet          # every destination except autogroup:internet and autogroup:self
    internet: bool
    via: list


def steering_grants(policy, resolver):
    """Every grant (ACLs included) with sources and destinations resolved, for via steering."""
    out = []
    for grant in policy.grants:
        dests = [a for a in grant.dst if a.value not in ("autogroup:internet", "autogroup:self")]
        out.append(SteeringGrant(resolver.resolve_all(grant.src), resolver.resolve_all(dests),
                                 any(a.value == "autogroup:internet" for a in grant.dst),
                                 grant.via))
    return out


class PeerView:
    """Builds each viewer's picture of its peers: addresses, usable routes, primaries."""

    def __init__(self, tailnet, primaries, no_ipv4=(), steering=()):
        self.tailnet = tailnet
        self.primaries = primaries
        self.no_ipv4 = set(no_ipv4)
        self.steering = list(steering) if any(g.via for g in steering) else []
        self.plain = {}          # peer name -> its entry for every viewer, when it has no routes

    def entry(self, viewer, peer, matchers):
        """A peer as the viewer sees it: its addresses plus the routes the viewer may use."""
        if not peer.has_routes() and not self.no_ipv4:
            # The same for every viewer: built once and shared (N, not N x N, entries).
            shared = self.plain.get(peer.name)
            if shared is None:
                shared = self.plain[peer.name] = {"AllowedIPs": peer.prefixes()}
            return shared
        owned = [r for r in peer.subnet_routes if self.primaries.get(r) == peer.name]
        include, exclude, use_primary = self._via_steering(viewer, peer)
        routes = [r for r in owned + peer.exit_routes if r not in exclude
                  and (r in EXIT_ROUTES or _can_access_route(viewer, matchers, IPSet.parse([r])))]
        for route in include:
            if route not in routes and (route in owned or route not in use_primary):
                routes.append(route)
        # An HA secondary must see which peer is primary for the prefix it shares.
        routes.extend(r for r in owned if r in viewer.subnet_routes and r not in routes)
        addresses = peer.prefixes()
        if viewer.name in self.no_ipv4 or peer.name in self.no_ipv4:
            addresses = [a for a in addresses if ":" in a]
        entry = {"AllowedIPs": addresses + routes}
        subnets = [r for r in routes if r not in EXIT_ROUTES]
        if subnets:
            entry["PrimaryRoutes"] = subnets
        return entry

    def _via_steering(self, viewer, peer):
        """Via grants: (routes to use through this peer, routes not to, routes left to HA)."""
        include, exclude, use_primary = [], [], []
        mine = [g for g in self.steering if viewer.in_set(g.sources)]
        for g in mine:
            if not g.via:
                continue
            matched = [r for r in peer.subnet_routes if _overlaps_text(g.dests, r)]
            if g.internet:
                matched += peer.exit_routes
            target = include if any(t in peer.tags for t in g.via) else exclude
            target.extend(r for r in matched if r not in target)
        if not include and not exclude:
            return include, exclude, use_primary
        for g in mine:
            if not g.via:
                continue
            for route in [r for r in include if _overlaps_text(g.dests, r)]:
                routers = [n for n in self.tailnet.nodes if route in n.subnet_routes
                           and any(t in n.tags for t in g.via)]
                first = min(routers, key=_registration_key, default=None)
                if first is not None and first is not peer:
                    include.remove(route)
                    if route not in exclude:
                        exclude.append(route)
        for g in mine:
            if g.via:
                continue
            use_primary.extend(r for r in include if _overlaps_text(g.dests, r))
            exclude = [r for r in exclude if not _overlaps_text(g.dests, r)]
        return include, exclude, use_primary


# -- SSH --

def _ssh_action(rule, control_url):
    if rule.action == "check":
        return {"holdAndDelegate": control_url + "/machine/ssh/action/$SRC_NODE_ID/to/"
                                                 "$DST_NODE_ID?local_user=$LOCAL_USER"}
    return {"accept": True, "allowAgentForwarding": True, "allowLocalPortForwarding": True,
            "allowRemotePortForwarding": True}


def _localpart_domain(user):
    """'localpart:*@example.com' -> 'example.com'; None for anything else."""
    match = re.fullmatch(r"localpart:\*@(.+)", user)
    return match.group(1) if match else None


def _ssh_principals_by_user(tailnet, sources):
    """Group source nodes: per user (sorted addresses) and tagged (one copy per tag)."""
    by_user, tagged = {}, []
    for node in tailnet.nodes:
        if not node.in_set(sources):
            continue
        if node.tags:
            for _ in node.tags:
                tagged.extend({"nodeIP": ip} for ip in node.addr_strings())
        elif node.user_id is not None:
            by_user.setdefault(node.user_id, []).extend(node.addrs)
    principals = {uid: [{"nodeIP": _addr_text(f, lo)} for f, lo, hi in
                        IPSet((f, v, v) for f, v in addrs).ranges]
                  for uid, addrs in by_user.items()}
    return principals, tagged


@dataclasses.dataclass
class PreparedSSHRule:
    """An ssh rule with its sources grouped into principals and its users map built."""
    rule: SSHRule
    sources: IPSet
    has_self: bool            # autogroup:self among the destinations
    dests: object             # IPSet of the other destinations, None when there are none
    users_map: dict
    localparts: object        # {user id: local part} for localpart:*@domain, else None
    by_user: dict             # user id -> principals of that user's devices
    tagged: list              # principals of tagged sources (one copy per tag)
    action: dict

    def emit(self, out, principals, uid):
        out.append(self._rule(principals, self.users_map))
        local = (self.localparts or {}).get(uid)
        if local is not None:
            out.append(self._rule(principals, {local: local}))

    def _rule(self, principals, users_map):
        rule = {"principals": principals, "sshUsers": users_map, "action": self.action}
        if self.rule.accept_env:
            rule["acceptEnv"] = self.rule.accept_env
        return rule


def _ssh_users_map(users):
    """SSH users list -> sshUsers: root only when listed, '*': '=' for autogroup:nonroot."""
    users_map = {"*": "="} if "autogroup:nonroot" in users else {}
    users_map["root"] = "root" if "root" in users else ""
    for user in users:
        if user not in ("root", "autogroup:nonroot") and not _localpart_domain(user):
            users_map[user] = user
    return users_map


def _localparts(tailnet, users):
    """localpart:*@domain entries -> {user id: local part of that user's email}."""
    domains = {d.lower() for d in map(_localpart_domain, users) if d}
    if not domains:
        return None
    out = {}
    for user in tailnet.users:
        local, _, domain = (user.get("email") or "").rpartition("@")
        if local and domain.lower() in domains:
            out[user.get("id")] = local
    return out


class SSHCompiler:
    """Compiles the ssh section for each node, resolving every rule once."""

    def __init__(self, policy, tailnet, resolver, control_url):
        self.prepared = []
        for rule in policy.ssh:
            sources = resolver.resolve_all(rule.src)
            if not sources:
                continue
            other = [a for a in rule.dst if a.value != "autogroup:self"]
            by_user, tagged = _ssh_principals_by_user(tailnet, sources)
            self.prepared.append(PreparedSSHRule(
                rule=rule, sources=sources, has_self=len(other) < len(rule.dst),
                dests=resolver.resolve_all(other) if other else None,
                users_map=_ssh_users_map(rule.users), localparts=_localparts(tailnet, rule.users),
                by_user=by_user, tagged=tagged, action=_ssh_action(rule, control_url)))

    def rules_for(self, node):
        """The node's SSHPolicy rules, check rules first as Tailscale orders them."""
        out = []
        for p in self.prepared:
            if p.has_self and node.user_id is not None and p.by_user.get(node.user_id):
                p.emit(out, p.by_user[node.user_id], node.user_id)
            if p.dests is None:
                continue
            if node.in_set(p.dests):
                uids = sorted(p.by_user, key=_sort_key)
                if p.localparts is not None:
                    # one rule per user, so each can carry its own local-part mapping
                    for uid in uids:
                        p.emit(out, p.by_user[uid], uid)
                    if p.tagged:
                        p.emit(out, p.tagged, None)
                else:
                    merged = [pr for uid in uids for pr in p.by_user[uid]] + p.tagged
                    if merged:
                        p.emit(out, merged, None)
            elif p.localparts is not None and node.in_set(p.sources):
                # a source that is not a destination still gets its own user's rules
                if node.tags:
                    p.emit(out, [{"nodeIP": ip} for ip in node.addr_strings()], None)
                elif node.user_id is not None and p.by_user.get(node.user_id):
                    p.emit(out, p.by_user[node.user_id], node.user_id)
        return sorted(out, key=lambda r: "holdAndDelegate" not in r["action"])


def _sort_key(value):
    return (0, value) if isinstance(value, int) else (1, str(value))


# -- Public entry points --

ALLOW_ALL_RULES = [{"SrcIPs": ["*"], "DstPorts": [{"IP": "*", "Ports": _port_range(ALL_PORTS)}]}]


def _tailnet(topology, policy=None):
    """The topology, with routes the policy auto-approves counted as approved."""
    tailnet = Tailnet(topology)
    if policy is not None:
        resolver = Resolver(policy, tailnet)
        raw_nodes = topology.get("nodes") or {}
        for node in tailnet.nodes:
            extra = _auto_approved(policy, resolver, node)
            if extra:
                node.approve(set(raw_nodes[node.name].get("approved_routes") or ()) | set(extra))
        tailnet.index_routes()
    return tailnet


class PeersExcept(collections.abc.Mapping):
    """Peer entries shared by many viewers, as one viewer sees them: all but
    its own, with the entries that differ for this viewer (routers) on top.
    Shared, a tailnet's views take O(N) memory rather than O(N x N)."""

    def __init__(self, entries, own_id, overrides=None):
        self.entries, self.own_id, self.overrides = entries, own_id, overrides or {}

    def __getitem__(self, key):
        if key == self.own_id:
            raise KeyError(key)
        return self.overrides[key] if key in self.overrides else self.entries[key]

    def get(self, key, default=None):     # Mapping.get goes through an exception per miss
        if key == self.own_id:
            return default
        return self.overrides[key] if key in self.overrides else self.entries.get(key, default)

    def __iter__(self):
        return (k for k in self.entries if k != self.own_id)

    def __len__(self):
        return len(self.entries) - (self.own_id in self.entries)

    def as_dict(self):
        """The same as a plain dict, built by C-level copies (fast to compare)."""
        out = dict(self.entries)
        out.pop(self.own_id, None)
        out.update(self.overrides)
        return out


@dataclasses.dataclass(slots=True)
class NodeView:
    """What one node is sent: its packet filter (None: send [], block all),
    how it sees each peer ({peer: {"AllowedIPs", "PrimaryRoutes"?}}, a
    Mapping), its SSH rules (None: none) and the capabilities it is granted."""
    packet_filter_rules: list
    peers: collections.abc.Mapping
    ssh_rules: list
    cap_map: dict


def peers_dict(peers):
    """A view's peers as a plain dict (the view's own when it is one)."""
    return peers.as_dict() if isinstance(peers, PeersExcept) else peers


def compile_policy(policy, topology, control_url=""):
    """Policy (None: allow all) + topology -> {node name: NodeView}.
    control_url prefixes the SSH check-mode callback URL."""
    tailnet = _tailnet(topology, policy)
    primaries = primary_routes(tailnet)
    out = {}
    if policy is None:
        view = PeerView(tailnet, primaries)
        matchers = [Matcher(ALL_ADDRS, ALL_ADDRS, tailnet)]
        for node in tailnet.nodes:
            peers = {p.hostname: view.entry(node, p, matchers)
                     for p in tailnet.nodes if p is not node}
            out[node.name] = NodeView([dict(r) for r in ALLOW_ALL_RULES], peers, [], {})
        return out
    compiler = Compiler(policy, tailnet)
    ssh = SSHCompiler(policy, tailnet, compiler.resolver, control_url)
    node_matchers = [compiler.node_matchers(n) for n in tailnet.nodes]
    peer_bits = _peer_bits(tailnet.nodes, node_matchers, not compiler.per_node)
    caps = node_capabilities(policy, tailnet, compiler.resolver)
    view = PeerView(tailnet, primaries,
                    no_ipv4=[name for name, cap in caps.items() if "disable-ipv4" in cap],
                    steering=steering_grants(policy, compiler.resolver))
    # A peer without routes looks the same to every viewer: a viewer that sees
    # every other node shares one dict of them (in node order) and has only
    # the routers' entries of its own.
    everyone = (1 << len(tailnet.nodes)) - 1
    routers = [p for p in tailnet.nodes if p.has_routes()]
    shared = None if view.no_ipv4 else {
        p.hostname: None if p.has_routes() else view.entry(None, p, ()) for p in tailnet.nodes}
    for node in tailnet.nodes:
        rules = compiler.packet_filter(node)
        matchers = node_matchers[node.index]
        if shared is not None and peer_bits[node.index] | (1 << node.index) == everyone:
            peers = PeersExcept(shared, node.hostname, {r.hostname: view.entry(node, r, matchers)
                                                        for r in routers if r is not node})
        else:
            peers = {tailnet.nodes[i].hostname: view.entry(node, tailnet.nodes[i], matchers)
                     for i in _bit_indexes(peer_bits[node.index])}
        out[node.name] = NodeView(rules or None, peers, ssh.rules_for(node), caps.get(node.name, {}))
    return out


def node_capabilities(policy, tailnet, resolver):
    """nodeAttrs -> {node name: {capability: None}}."""
    out = {}
    for targets, attrs in policy.node_attrs:
        if not attrs:
            continue
        targeted = resolver.resolve_all(targets)
        for node in tailnet.nodes:
            if node.in_set(targeted):
                for attr in attrs:
                    out.setdefault(node.name, {}).setdefault(attr, None)
    if policy.randomize_client_port:
        for node in tailnet.nodes:
            out.setdefault(node.name, {}).setdefault("randomize-client-port", None)
    return out


def _auto_approved(policy, resolver, node):
    """Exit routes need exitNode; a subnet needs a routes entry that contains it."""
    approved = []
    for route in node.advertised:
        if route in EXIT_ROUTES:
            ok = node.in_set(resolver.resolve_all(policy.exit_approvers))
        else:
            family, lo, hi, _ = _parse_prefix(route)
            ok = any(IPSet.parse([prefix]).covers(family, lo, hi)
                     and node.in_set(resolver.resolve_all(approvers))
                     for prefix, approvers in policy.route_approvers.items())
        if ok:
            approved.append(route)
    return approved


def may_own_tag(policy, tag, user_name):
    """Whether tagOwners let a user put `tag` on a machine it registers."""
    def matches(alias, depth=0):
        if alias.kind == "user":      # "alice@" names user alice; an email names itself
            return alias.value in (user_name, user_name + "@")
        if alias.kind == "group" and depth < 4:
            return any(matches(member, depth + 1) for member in policy.groups.get(alias.value, []))
        return alias.kind == "autogroup" and alias.value == "autogroup:member"
    return any(matches(alias) for alias in policy.tag_owners.get(tag, []))


def auto_approved_routes(policy, topology, node_name):
    """The node's advertised routes that autoApprovers let it approve (exit needs exitNode)."""
    if policy is None:
        return []
    tailnet = Tailnet(topology)
    return _auto_approved(policy, Resolver(policy, tailnet), tailnet.by_name[node_name])


# -- Policy tests (tests and sshTests) --

TAILSCALE_DEFAULT_PROTOCOLS = (6, 17, 1, 58)     # TCP, UDP, ICMP, ICMPv6 when IPProto is empty


def _tailnet_domain(topology, tailnet):
    """The tailnet's own mail domain: given, or the first (lowest id) user's."""
    if topology.get("tailnet_domain"):
        return topology["tailnet_domain"]
    users = sorted(tailnet.users, key=lambda u: _sort_key(u.get("id")))
    return (users[0].get("email") or "").rpartition("@")[2] if users else ""


def _check_domains(policy, domain):
    """user:*@domain and localpart:*@domain may only name the tailnet's own domain."""
    named = [("", a.value[7:]) for g in policy.grants for a in g.src + g.dst
             if a.kind == "domain"]
    for rule in policy.ssh:
        named.extend(("[ssh] ", a.value[7:]) for a in rule.src + rule.dst if a.kind == "domain")
        named.extend(("", d) for d in map(_localpart_domain, rule.users) if d)
    for section, other in named:
        if other != domain:
            raise PolicyError("%s%s is not associated with this Tailnet and cannot be used in "
                              "user:*@<domain> expressions" % (section, other))


def _rule_allows(rule, src_set, dst_set, ports, protocols):
    if not src_set.overlaps_set(rule[0]):
        return False
    if rule[1] and not set(rule[1]) & set(protocols):
        return False
    return any(dests.overlaps_set(dst_set) and first <= ports[0] and ports[1] <= last
               for dests, first, last in rule[2])


def _reaches(rules, sources, dst_set, ports, protocols):
    """Every source prefix must be let through to the destination by some rule."""
    return all(any(_rule_allows(r, IPSet.parse([prefix]), dst_set, ports, protocols)
                   for r in rules)
               for prefix in sources.prefixes())


def _policy_test_failures(policy, compiler):
    """Evaluate tests against the tailnet-wide filter (autogroup:self rules are per node)."""
    rules = [(compiler.parse_set(tuple(r["SrcIPs"])), r.get("IPProto", []),
              [(compiler.parse_set((dp["IP"],)), dp["Ports"]["First"], dp["Ports"]["Last"])
               for dp in r["DstPorts"]])
             for r in compiler.test_rules if "DstPorts" in r]
    failures = []
    for test in policy.tests:
        label = test["src"] + (" (%s)" % test["proto"] if test["proto"] else "")
        try:
            sources = compiler.resolver.resolve(parse_alias(test["src"]))
        except PolicyError as e:
            failures.append("%s: %s" % (label, e))
            continue
        if not sources:
            failures.append("%s: source resolved to no IP addresses" % label)
            continue
        protocols = protocol_numbers(test["proto"]) or TAILSCALE_DEFAULT_PROTOCOLS
        for dst, want in [(d, True) for d in test["accept"]] + [(d, False) for d in test["deny"]]:
            alias, ports = parse_destination(dst)
            dst_set = compiler.resolver.resolve(alias)
            if alias.value == "autogroup:self" or not dst_set:
                failures.append("%s -> %s: destination resolved to no IP addresses" % (label, dst))
                continue
            if _reaches(rules, sources, dst_set, ports[0], protocols) != want:
                failures.append("%s -> %s: expected %s, got %s" % (
                    label, dst, "ALLOWED" if want else "DENIED", "DENIED" if want else "ALLOWED"))
    return failures


def _ssh_user_allowed(users_map, user):
    if not user:
        return False
    if user in users_map:
        return users_map[user] != ""
    return user != "root" and users_map.get("*", "") != ""


def _ssh_hits(rules, addr, user):
    """(accepted, via check) for one source address and login user on a node."""
    accepted = checked = False
    for rule in rules:
        if any(p.get("nodeIP") == addr for p in rule["principals"]) and \
                _ssh_user_allowed(rule["sshUsers"], user):
            accepted = True
            checked = checked or "holdAndDelegate" in rule["action"]
    return accepted, checked


def _ssh_test_failures(policy, tailnet, resolver, ssh):
    """Evaluate sshTests against the compiled SSH rules of each destination node."""
    failures = []
    cache = {}
    for test in policy.ssh_tests:
        src = test["src"]
        sources = resolver.resolve(src)
        addrs = [text for n in tailnet.nodes_in(sources)
                 for (f, v), text in zip(n.addrs, n.addr_texts) if sources.contains(f, v)]
        # addresses in the source that are no node's can never match a principal
        strays = sum(hi - lo + 1 for _, lo, hi in sources.ranges) > len(addrs)
        if not addrs:
            failures.append("%s: source resolved to no IP addresses" % src)
            continue
        if not (test["accept"] or test["deny"] or test["check"]):
            failures.append("%s: no accept, deny, or check assertions specified" % src)
            continue
        src_users = resolver.tailnet.user_ids(src.value) if src.kind == "user" else []
        dst_nodes = []
        for alias in test["dst"]:
            if alias.value == "autogroup:self":
                found = resolver.nodes_of_users(src_users)
            elif names_no_node(alias):
                found = []
            else:
                found = tailnet.nodes_in(resolver.resolve(alias))
            if not found:
                failures.append("%s: dst alias %s resolved to no nodes" % (src, alias))
            dst_nodes.extend(n for n in found if n not in dst_nodes)
        for kind in ("accept", "deny", "check"):
            for user in test[kind]:
                for node in dst_nodes:
                    if node.name not in cache:
                        cache[node.name] = ssh.rules_for(node)
                    hits = [_ssh_hits(cache[node.name], addr, user) for addr in addrs]
                    if kind == "accept":
                        ok = not strays and all(a for a, _ in hits)
                    elif kind == "deny":
                        ok = not any(a for a, _ in hits)
                    else:
                        ok = not strays and all(c for _, c in hits)
                    if not ok:
                        failures.append("%s/%s -> %s: %s assertion failed"
                                        % (src, user or '""', node.hostname, kind))
    return failures


def check_policy_tests(policy, topology):
    """Run the policy's tests and sshTests against a topology; PolicyError names what failed."""
    if policy is None:
        return
    tailnet = _tailnet(topology, policy)
    _check_domains(policy, _tailnet_domain(topology, tailnet))
    if not policy.tests and not policy.ssh_tests:
        return
    compiler = Compiler(policy, tailnet)
    ssh = SSHCompiler(policy, tailnet, compiler.resolver, "")
    failures = _policy_test_failures(policy, compiler)
    failures += _ssh_test_failures(policy, tailnet, compiler.resolver, ssh)
    if failures:
        raise PolicyError("test(s) failed:\n" + "\n".join(failures))


# ---- Map builder ----
# Pure: node records and settings in, tailcfg JSON out.

DERP_REGION_ID = 900
STUN_ONLY_REGION_SCORE = 1000.0   # latency x1000: never a client's home
LEGACY_DERP_IP = "127.3.3.40"       # clients' magic address for "DERP region N"


def sanitize_hostname(hostname):
    """A DNS label from a client's hostname (lower case, a-z0-9-, at most 63)."""
    label = "".join(c if c.isalnum() and c.isascii() else "-" for c in (hostname or "").lower())
    label = "-".join(part for part in label.split("-") if part)[:63].strip("-")
    return label or "node"


def netinfo(hostinfo):
    """The NetInfo of a Hostinfo that checked_hostinfo passed (every Hostinfo
    meshbox holds, stored ones included): each field has its Go type or is absent."""
    return hostinfo.get("NetInfo") or {}


def home_derp_region(hostinfo):
    """The DERP region a Hostinfo reports as home, 0 when none."""
    return max(netinfo(hostinfo).get("PreferredDERP") or 0, 0)


def home_derp(node):
    """The DERP region a node reports as its home, 0 when it has none."""
    return home_derp_region(node.hostinfo)


def user_profile(user):
    """tailcfg.UserProfile for a user."""
    return {"ID": user.id, "LoginName": user.name, "DisplayName": user.name}


# A tagged node belongs to no person: clients see it owned by this user (as
# Tailscale shows it), so it is not the tagger's own in Taildrop or in status.
TAGGED_DEVICES = {"ID": 2147455555, "LoginName": "tagged-devices", "DisplayName": "Tagged Devices"}


def shown_user_id(node):
    return TAGGED_DEVICES["ID"] if node.tags else node.user_id


def user_profiles(nodes, users):
    """The UserProfiles that describe the owners of `nodes`."""
    ids = {n.user_id for n in nodes if not n.tags}
    return [user_profile(users[uid]) for uid in sorted(ids) if uid in users] + \
        ([TAGGED_DEVICES] if any(n.tags for n in nodes) else [])


def is_expired(node, at):
    return bool(node.expiry) and node.expiry <= at


def node_json(node, base_domain, at, seen_as=None):
    """A node as tailcfg.Node.  `seen_as` holds its AllowedIPs and
    PrimaryRoutes as the viewer's policy shows them (None: as itself)."""
    addresses = [f"{node.ipv4}/32", f"{node.ipv6}/128"]
    region = home_derp(node)
    out = {
        "ID": node.id,
        "StableID": f"n{node.id}",
        "Name": f"{node.given_name}.{base_domain}.",
        "User": shown_user_id(node),
        "Key": key_text("nodekey", node.node_key),
        "Machine": key_text("mkey", node.machine_key),
        "Addresses": addresses,
        "AllowedIPs": seen_as["AllowedIPs"] if seen_as else addresses + list(node.approved_routes),
        "Endpoints": list(node.endpoints),
        "Hostinfo": peer_hostinfo(node.hostinfo),
        "Created": rfc3339(node.created),
        "Cap": node.cap,
        "Tags": list(node.tags),
        "MachineAuthorized": True,
        "Online": node.online,
        "ComputedName": node.given_name,
        "ComputedNameWithHost": node.given_name,
    }
    if seen_as and seen_as.get("PrimaryRoutes"):
        out["PrimaryRoutes"] = seen_as["PrimaryRoutes"]
    if node.kind == NODE_GATEWAY:
        # Plain WireGuard: clients dial its Endpoints, no disco, no DERP.
        out["IsWireGuardOnly"] = True
        return out
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


def dns_config(base_domain, nameservers=(), split_dns=None, search_domains=(), extra_records=(), magic_dns=True):
    """tailcfg.DNSConfig: MagicDNS under the base domain, global and split
    resolvers, search domains and extra records."""
    config = {"Domains": [base_domain] + [d for d in search_domains if d != base_domain], "Proxied": bool(magic_dns)}
    if nameservers:
        config["Resolvers"] = [{"Addr": ns} for ns in nameservers]
    if split_dns:
        config["Routes"] = {domain.rstrip(".") + ".": [{"Addr": ns} for ns in servers]
                            for domain, servers in split_dns.items()}
    if extra_records:
        config["ExtraRecords"] = [{"Name": r["name"], "Type": r.get("type", "A"), "Value": r["value"]}
                                  for r in extra_records]
    return config


def hosts_file_text(nodes, devices, base_domain):
    """/etc/hosts-format lines for every node and device: address and FQDN.  No
    short name: the LAN's resolver would answer for a node named ``wpad``,
    ``router`` or ``localhost`` as if it were the LAN's own."""
    lines = ["# written by meshbox: the tailnet's names; do not edit"]
    named = [(n.given_name, n.ipv4, n.ipv6) for n in sorted(nodes, key=lambda n: n.id)]
    named += [(d["name"], d["ipv4"], d["ipv6"]) for d in devices]
    for name, ipv4, ipv6 in named:
        for address in (ipv4, ipv6):
            lines.append(f"{address}\t{name}.{base_domain}")
    return "\n".join(lines) + "\n"


def derp_map(host, derp_port, stun_ports, cert_name):
    """tailcfg.DERPMap with meshbox's own relay as the only DERP region.

    Each STUN port after the first is a region of its own holding one
    STUN-only node: a client's netcheck counts one answer per region, and
    tells a NAT whose mapping varies by destination only from two.  Their
    home score keeps clients from choosing them as home."""
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        addr = None
    node = {
        "Name": f"{DERP_REGION_ID}a", "RegionID": DERP_REGION_ID, "HostName": host,
        "IPv4": str(addr) if addr and addr.version == 4 else ("none" if addr else ""),
        "IPv6": str(addr) if addr and addr.version == 6 else ("none" if addr else ""),
        "STUNPort": stun_ports[0] if stun_ports else -1,
        "DERPPort": derp_port,
    }
    if cert_name:
        node["CertName"] = cert_name
    regions = {str(DERP_REGION_ID): {"RegionID": DERP_REGION_ID, "RegionCode": "meshbox", "RegionName": "meshbox",
                                     "Nodes": [node]}}
    for region_id, port in enumerate(stun_ports[1:], DERP_REGION_ID + 1):
        stun_node = dict(node, Name=f"{region_id}a", RegionID=region_id, STUNPort=port, STUNOnly=True)
        regions[str(region_id)] = {"RegionID": region_id, "RegionCode": f"meshbox-stun{port}",
                                   "RegionName": f"meshbox STUN {port}", "Nodes": [stun_node]}
    out = {"Regions": regions, "OmitDefaultRegions": True}
    if len(regions) > 1:
        out["HomeParams"] = {"RegionScore": {key: STUN_ONLY_REGION_SCORE for key in regions
                                             if key != str(DERP_REGION_ID)}}
    return out


@dataclasses.dataclass
class MapSettings:
    """Tailnet-wide parts of every MapResponse."""
    base_domain: str
    derp_map: dict
    dns_config: dict
    control_url: str = ""
    node_caps: dict = dataclasses.field(default_factory=dict)    # capabilities every node has
    cert_domains: bool = False   # offer each node its name for `tailscale cert` (a DNS hook is set)


def policy_topology(nodes, users):
    """The policy compiler's input for the tailnet; nodes are named by ID,
    so a rename changes nothing a policy can see."""
    return {
        "users": [{"id": u.id, "name": u.name, "email": u.name if "@" in u.name else ""} for u in users.values()],
        "nodes": {n.id: {"id": n.id, "hostname": n.id, "tags": n.tags, "user_id": n.user_id,
                              "user": users[n.user_id].name if n.user_id in users else "",
                              "ipv4": n.ipv4, "ipv6": n.ipv6,
                              "routable_ips": list(n.hostinfo.get("RoutableIPs") or []),
                              "approved_routes": n.approved_routes} for n in nodes},
    }


def live_routes(node):
    """The routes a node advertises that are approved."""
    return [r for r in node.hostinfo.get("RoutableIPs") or [] if r in node.approved_routes]


def allow_all_entry(node, primaries):
    """How every viewer sees one node under the default policy; primaries
    maps each shared subnet to the id of the node that carries it."""
    live = live_routes(node)
    owned = [r for r in live if r not in EXIT_ROUTES and primaries.get(r) == node.id]
    entry = {"AllowedIPs": [f"{node.ipv4}/32", f"{node.ipv6}/128"] + owned + [r for r in live if r in EXIT_ROUTES]}
    if owned:
        entry["PrimaryRoutes"] = owned
    return entry


def allow_all_entries(nodes):
    """What compile_policy(None, ...) shows of each node, computed once per
    node instead of once per viewer: with no policy every viewer sees a peer
    the same way (its addresses, the subnets it is primary for, its exit routes)."""
    primaries = {}
    for node in sorted(nodes, key=lambda n: n.id):        # HA: the first approved advertiser wins
        for route in live_routes(node):
            if route not in EXIT_ROUTES:
                primaries.setdefault(route, node.id)
    return {node.id: allow_all_entry(node, primaries) for node in nodes}


# What an expired node, or one the policy has not placed yet, is sent: no peers, nothing allowed.
NO_PEERS_VIEW = NodeView(None, {}, None, {})


def allow_all_view(entries, node_id):
    """A node's view under the default policy, without copying the peer entries."""
    return NodeView(ALLOW_ALL_RULES, PeersExcept(entries, node_id), [], {})


def peers_in_view(view, nodes):
    """(peer node, how the viewer sees it) for each peer a compiled view shows."""
    out = []
    for peer_id, seen_as in view.peers.items():
        peer = nodes.get(peer_id)
        if peer is not None:
            out.append((peer, seen_as))
    return out


CAP_FILE_SHARING = "https://tailscale.com/cap/file-sharing"    # Taildrop: tailscale file cp
CAP_SSH = "https://tailscale.com/cap/ssh"                      # the node may run Tailscale SSH


def self_node_json(node, view, settings, at):
    """The node as it sees itself, with the tailnet's capabilities and those its policy grants."""
    out = node_json(node, settings.base_domain, at)
    out["Hostinfo"] = node.hostinfo
    caps = {**settings.node_caps, **view.cap_map}
    if caps:
        out["CapMap"] = caps
    return out


def map_response_for(node, view, nodes, users, settings, at, peer_json=node_json):
    """The full MapResponse for one node, from its compiled policy view."""
    peers = peers_in_view(view, nodes)
    return {
        "Node": self_node_json(node, view, settings, at),
        "Peers": [peer_json(p, settings.base_domain, at, seen_as) for p, seen_as in peers],
        "DERPMap": settings.derp_map,
        "DNSConfig": dict(settings.dns_config, CertDomains=[f"{node.given_name}.{settings.base_domain}"])
        if settings.cert_domains else settings.dns_config,
        "Domain": settings.base_domain,
        "PacketFilter": view.packet_filter_rules or [],
        "SSHPolicy": {"rules": view.ssh_rules or []},
        "UserProfiles": user_profiles([node] + [p for p, _ in peers], users),
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
NODE_CHANGE_BURST = 10       # a node's own changes (endpoints, disco key, Hostinfo) peers hear of at once in a row...
NODE_CHANGE_INTERVAL = 1.0   # ...then its latest state once per this many seconds (a flapping node keeps no peer busy)
RECOMPILE_DELAY = 0.05       # under a policy, a burst of joins shares one compile...
RECOMPILE_SHARE = 0.5        # ...and compiling takes at most this share of a burst's time


class RegistrationRefused(MeshboxError):
    """A registration that must fail with a message the client shows."""

    def __init__(self, reason, message):
        super().__init__(message)
        self.reason = reason


class MapRefused(MeshboxError):
    """A map request that cannot be served; status is the HTTP code to answer."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status = status


# MapRequest's fields and their Go types (tailcfg.MapRequest); a field of the
# wrong type is refused naming it, the others are not read.
MAP_REQUEST_FIELDS = {
    "Version": go_int, "Compress": go_string, "KeepAlive": go_bool, "Stream": go_bool, "ReadOnly": go_bool,
    "OmitPeers": go_bool, "MapSessionHandle": go_string, "MapSessionSeq": go_int, "TKAHead": go_string,
    "Endpoints": checked_endpoints, "EndpointTypes": strict_list(go_int, MAX_ENDPOINTS),
    "DebugFlags": strict_list(go_string, HOSTINFO_MAX_ITEMS),
}


def checked_map_request(req, whose, hostinfo_log_quota=None):
    """The MapRequest fields meshbox reads, checked: MapRefused(400) naming
    the first of the wrong Go type; Hostinfo through checked_hostinfo (its
    bad parts dropped, not refused)."""
    if not isinstance(req, dict):
        raise MapRefused(400, f"MapRequest: {json_type(req)}, not an object")
    out = {}
    for name, check in MAP_REQUEST_FIELDS.items():
        if req.get(name) is not None:
            try:
                out[name] = check(req[name])
            except ValueError as e:
                raise MapRefused(400, f"MapRequest.{name}: {e}") from None
    for name, prefix in (("NodeKey", "nodekey"), ("DiscoKey", "discokey")):
        if req.get(name):
            try:
                out[name] = key_bytes(req[name], prefix)
            except ValueError as e:
                raise MapRefused(400, f"MapRequest.{name}: {e}") from None
    if req.get("Hostinfo") is not None:
        out["Hostinfo"] = checked_hostinfo(req["Hostinfo"], whose, hostinfo_log_quota)
        if out["Hostinfo"] is None:
            raise MapRefused(400, f"MapRequest.Hostinfo: {json_type(req['Hostinfo'])}, not an object")
    return out


class MapSession:
    """One client's streaming map: what it is owed and a wake-up event."""

    def __init__(self, node_id):
        self.node_id = node_id
        self.changed = set()
        self.removed = set()
        self.self_changed = False
        self.policy_changed = False
        self.full = False
        self.told_expired = False    # whether its client was told its key expired
        self.closed = False
        self.wake = Signal()

    def owe(self, changed=(), removed=(), full=False, policy=False):
        self.policy_changed = self.policy_changed or policy
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


AUTH_REQUEST_TTL = 15 * 60   # seconds a login request waits for approval
AUTH_REQUESTS_MAX = 256      # login requests waiting at once (a few KB each)...
AUTH_REQUESTS_PER_SOURCE = 16    # ...and from one address (an IPv6 /64)
AUTH_REQUEST_MAX_TAGS = 32   # tags a login may ask for, each of at most...
AUTH_REQUEST_MAX_TAG_LEN = 128   # ...this many characters
REGISTER_ATTEMPT_BURST = 10      # failed registrations a source or machine may make in a row...
REGISTER_ATTEMPT_INTERVAL = 6    # ...then one per this many seconds
REGISTER_ATTEMPT_KEYS = 1024     # sources and machines whose failures are remembered (~200 bytes each)
DEFAULT_NODE_EXPIRY = 180 * 86400


@dataclasses.dataclass(slots=True)
class AuthRequest:
    """A client waiting at its AuthURL for an admin (or its identity
    provider), with only what approving it needs: a stranger's Hostinfo may
    be a megabyte, and the client sends it again in its first map request."""
    id: str
    machine_key: bytes
    node_key: bytes
    hostname: str
    requested_tags: list
    created: float
    base_url: str
    source: str              # the address block it came from (None: from within)
    done: Signal = dataclasses.field(default_factory=Signal)
    result: dict = None

    @property
    def url(self):
        return self.base_url + self.id


def parse_go_time(text):
    """A Go time.Time JSON string to epoch seconds; None for the zero time."""
    if not text:
        return None
    if not isinstance(text, str):
        raise InvalidInput(f"bad time {str(text)[:40]!r}")
    if text.startswith("0001-01-01"):
        return None
    text = text.rstrip("Z").split("+")[0]
    base, _, frac = text.partition(".")
    try:
        ts = time.mktime(time.strptime(base, "%Y-%m-%dT%H:%M:%S")) - time.timezone
    except ValueError:
        raise InvalidInput(f"bad time {text!r}") from None
    return ts + (float("0." + frac) if frac.isdigit() else 0)


def json_field(obj, name, kind, default):
    """obj[name] when it has the JSON type kind, else default: clients may send anything."""
    value = obj.get(name)
    return value if isinstance(value, kind) else default


SSH_CHECKS_MAX = 64             # SSH check approvals waiting at once (each holds one request open)
SSH_CHECKS_PER_NODE = 8         # of them, to one destination (a node cannot crowd out the others)
SSH_CHECK_TTL = 10 * 60         # seconds a check waits for an admin
SSH_CHECK_HOLD = 55             # seconds one follow-up request is held before the client is told to ask again
SSH_ACCEPT = {"accept": True, "allowAgentForwarding": True, "allowLocalPortForwarding": True,
              "allowRemotePortForwarding": True}


@dataclasses.dataclass(slots=True)
class SSHCheck:
    """An SSH session held by its destination node (a check rule's
    holdAndDelegate) until an admin approves or denies it."""
    id: str
    src_id: int
    dst_id: int
    local_user: str
    created: float
    done: Signal = dataclasses.field(default_factory=Signal)
    approved: bool = False


@dataclasses.dataclass(frozen=True)
class NodeEdit:
    """New values of some of a node's NODE_EDITABLE_FIELDS."""
    node_id: int
    fields: dict


@dataclasses.dataclass(frozen=True)
class NodeRemoval:
    node_id: int


@dataclasses.dataclass(frozen=True)
class UserAddition:
    name: str


@dataclasses.dataclass(frozen=True)
class UserRemoval:
    name: str


@dataclasses.dataclass(frozen=True)
class DeviceAddition:
    """A plain WireGuard device behind the gateway; apply() returns its (ipv4, ipv6)."""
    name: str
    user_id: int
    public_key: bytes
    full_tunnel: bool


@dataclasses.dataclass(frozen=True)
class DeviceRemoval:
    name: str


@dataclasses.dataclass(frozen=True)
class PolicyChange:
    """A policy that parsed and passed its tests (text and policy None: allow all)."""
    text: str
    policy: object


@dataclasses.dataclass(frozen=True)
class DnsChange:
    """The admin's DNS settings as stored, and the DNSConfig every node gets from them."""
    settings: dict
    dns_config: dict


class NodeTable(dict):
    """Nodes by id, and by machine key (a machine's identity: it never
    changes), so that each request finds its node without a scan."""

    def __init__(self, nodes=()):
        super().__init__()
        self.by_machine = {}
        for node in nodes:
            self[node.id] = node

    def __setitem__(self, node_id, node):
        self.pop(node_id, None)
        super().__setitem__(node_id, node)
        self.by_machine[node.machine_key] = node

    def pop(self, node_id, *default):
        node = super().pop(node_id, *default)
        if node is not None and self.by_machine.get(node.machine_key) is node:
            del self.by_machine[node.machine_key]
        return node

    def __delitem__(self, node_id):
        self.pop(node_id)


class FanOut:
    """Tells each map session what changed.  Each session keeps the set of
    node ids whose view it owes its client; a change marks those sets and
    wakes the sessions, so a slow client only delays itself.  Owns what is
    built once for many sessions: peers' JSON, deltas every session gets,
    and their encoded frames."""

    def __init__(self, tailnet):
        self.tailnet = tailnet
        self.sessions = {}           # node id -> set of MapSession
        self.generation = 0          # counts notifications: a shared delta is valid for one
        self.shared_deltas = {}      # (generation, changed, removed) -> message
        self.json_cache = {}         # node id -> node_json, under a policy (each viewer adds its AllowedIPs)
        self.peer_texts = {}         # node id -> its JSON as a peer (default policy: one for all viewers)
        self.frames = {}             # id(shared delta) -> (delta, its encoded frame)
        self.on_change = None        # called after any change (the gateway and hosts file follow)

    def notify(self, changed=(), removed=(), full=False, policy=False):
        """Tell every map session (and the gateway) which nodes changed or went away."""
        self.generation += 1
        for node_id in (*changed, *removed):
            self.json_cache.pop(node_id, None)
            self.peer_texts.pop(node_id, None)
        if full:
            self.json_cache.clear()
            self.peer_texts.clear()
        for sessions in self.sessions.values():
            for session in sessions:
                session.owe(changed, removed, full, policy)
        self.tell_followers()

    def peer_json(self, node, base_domain, at, seen_as):
        """node_json for a peer, from a per-node cache that notify() invalidates."""
        base = self.json_cache.get(node.id)
        if base is None or (is_expired(node, at) and not base.get("Expired")):
            base = node_json(node, base_domain, at)
            if self.tailnet.policy_views.policy is not None:     # each viewer's delta needs it; by default one serves all
                self.json_cache[node.id] = base
        out = dict(base)
        out["AllowedIPs"] = seen_as["AllowedIPs"]
        if seen_as.get("PrimaryRoutes"):
            out["PrimaryRoutes"] = seen_as["PrimaryRoutes"]
        return out

    def encoded_full_map(self, node, view, at):
        """The full map as JSON bytes, with each peer's JSON encoded once and
        reused: under the default policy every viewer sees a peer the same way."""
        message = map_response_for(node, view, self.tailnet.nodes, self.tailnet.users, self.tailnet.settings, at,
                                   peer_json=lambda peer, *_: peer.id)
        texts = []
        for peer_id in message.pop("Peers"):
            text = self.peer_texts.get(peer_id)
            if text is None:
                peer = self.tailnet.nodes[peer_id]
                text = self.peer_texts[peer_id] = json_bytes(
                    self.peer_json(peer, self.tailnet.settings.base_domain, at, view.peers[peer_id]))
            texts.append(text)
        return json_bytes(message)[:-1] + b',"Peers":[' + b",".join(texts) + b"]}"

    def map_message(self, session, at=None):
        """The next message a session owes its client, or None."""
        at = at or now()
        node = self.tailnet.nodes.get(session.node_id)
        if node is None:
            session.close()
            return None
        views = self.tailnet.policy_views
        if views.policy is not None and node.id not in views.views and views.pending_compile:
            return None              # a new node's view comes with the scheduled compile
        if is_expired(node, at):
            # Each map message makes a blocked stock client restart its engine
            # (and its DERP connection, refused): an expired node is told once.
            if session.told_expired:
                session.changed.clear(), session.removed.clear()
                session.full = session.self_changed = session.policy_changed = False
                return None
            session.told_expired = True
        elif session.told_expired:      # its key was extended: its peers come back
            session.told_expired, session.full = False, True
        view = views.view_of(node, at)
        if session.full:
            session.full = session.self_changed = session.policy_changed = False
            session.changed.clear(), session.removed.clear()
            if views.policy is None:
                return self.encoded_full_map(node, view, at)
            return map_response_for(node, view, self.tailnet.nodes, self.tailnet.users, self.tailnet.settings, at,
                                    self.peer_json)
        # Under the default policy every session owed the same changes gets
        # the same message: build it once per change (and the server encodes
        # it once), not once per session.
        shared = views.policy is None and not session.self_changed and not session.policy_changed
        key = (self.generation, frozenset(session.changed), frozenset(session.removed))
        if shared and key in self.shared_deltas:
            session.changed.clear(), session.removed.clear()
            return self.shared_deltas[key]
        msg = {}
        changed = [(self.tailnet.nodes[i], view.peers[i]) for i in sorted(session.changed)
                   if i in view.peers and i in self.tailnet.nodes]
        if changed:
            base_domain = self.tailnet.settings.base_domain
            msg["PeersChanged"] = [self.peer_json(p, base_domain, at, seen_as) for p, seen_as in changed]
            msg["UserProfiles"] = user_profiles([p for p, _ in changed], self.tailnet.users)
        if session.removed:
            msg["PeersRemoved"] = sorted(session.removed)
        if session.self_changed or session.policy_changed:
            msg["Node"] = self_node_json(node, view, self.tailnet.settings, at)
        if session.policy_changed:
            msg["PacketFilter"] = view.packet_filter_rules or []
            msg["SSHPolicy"] = {"rules": view.ssh_rules or []}
        session.changed.clear(), session.removed.clear()
        session.self_changed = session.policy_changed = False
        if shared and msg:
            if any(k[0] != self.generation for k in self.shared_deltas):
                self.shared_deltas.clear()        # only this generation's deltas can be reused
            self.shared_deltas[key] = msg
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
        node = self.tailnet.nodes.get(session.node_id)
        if not sessions:
            self.sessions.pop(session.node_id, None)
            if node:
                node.online = False
                node.last_seen = now()
                self.tailnet.dirty_live.add(node.id)
                log.info("map session end: node %d %s", node.id, node.given_name)
                self.notify(changed=[node.id])

    def tell_followers(self):
        """What follows the tailnet outside the maps (the gateway, the hosts file, DERP) hears of a change."""
        if self.on_change is not None:
            self.on_change()

    def views_changed(self, old, new):
        """Tell each session what a compile changed in its node's view (the
        peers it gained, lost or sees differently, and whether its filter,
        SSH rules or capabilities changed), then the gateway."""
        for node_id, sessions in self.sessions.items():
            before, after = old.get(node_id), new.get(node_id)
            if before is None or after is None:
                for session in sessions:
                    session.owe(full=True)
                continue
            peers_before, peers_after = before.peers, after.peers
            if peers_dict(peers_before) == peers_dict(peers_after):    # the usual case, compared in C
                removed = changed = []
            else:
                removed = [p for p in peers_before if p not in peers_after]
                changed = [p for p, seen in peers_after.items() if peers_before.get(p) != seen]
            policy = (before.packet_filter_rules, before.ssh_rules, before.cap_map) != \
                (after.packet_filter_rules, after.ssh_rules, after.cap_map)
            if removed or changed or policy:
                for session in sessions:
                    session.owe(changed, removed, policy=policy)
        self.tell_followers()

    def frame(self, message, compress):
        """A map message as its length-prefixed frame.  A delta shared by many
        sessions is compressed once; a full map is one session's and is not
        kept (at 1,000 nodes it is 600 KB)."""
        shared = any(message is delta for delta in self.shared_deltas.values())
        cached = self.frames.get(id(message)) if shared else None
        if cached is not None and cached[0] is message:
            return cached[1]
        if compress:
            encoded = map_frame(message)
            if shared:
                if len(self.frames) >= 4:   # a burst shares a frame or two; keep memory flat
                    self.frames.clear()
                self.frames[id(message)] = (message, encoded)
            return encoded
        body = message if isinstance(message, bytes) else json_bytes(message)
        return struct.pack("<I", len(body)) + body


class PolicyViews:
    """What the policy lets each node see, kept current as the tailnet
    changes: a NodeView per node under a policy (compiled once for a burst
    of changes), or one shared entry per node under the default policy
    (updated per change).  The fan-out tells the sessions what moved."""

    def __init__(self, tailnet, text):
        self.tailnet = tailnet
        self.text = text             # the policy in force, as written (None: allow all)
        self.refused = None          # why the stored policy cannot be used (serve refuses to start)
        try:
            self.policy = parse_policy(text) if text else None
        except PolicyError as e:     # stored by another meshbox: the admin must replace it
            self.policy, self.refused = None, e
        self.views = {}              # node id -> its NodeView (with a policy)
        self.allow_all = {}          # node id -> its shared peer entry (with no policy)
        self.pending_compile = None  # the scheduled recompile of a burst of changes, under a policy
        self.compile_seconds = 0.0   # how long the last compile took

    def recompile(self, changed=None, removed=()):
        """Compile the policy for the current tailnet and tell each session
        what its view gained, lost or changed.  changed and removed, when
        given, are the only nodes that differ since the last compile."""
        if self.pending_compile is not None:      # this compile covers it
            self.pending_compile.cancel()
            self.pending_compile = None
        if self.policy is None:
            # The default policy: one shared entry per node, diffed once.
            old, self.views = self.allow_all, {}
            if changed is not None and old and self._routes_untouched(changed, removed):
                # Nodes without routes cannot change who carries a subnet:
                # only their own entries change (a join costs O(1), not O(N)).
                self.allow_all = dict(old)
                for node_id in removed:
                    self.allow_all.pop(node_id, None)
                for node_id in changed:
                    if node_id in self.tailnet.nodes:
                        self.allow_all[node_id] = allow_all_entry(self.tailnet.nodes[node_id], {})
                touched = (*changed, *removed)
            else:
                self.allow_all = allow_all_entries(self.tailnet.nodes.values())
                touched = self.allow_all.keys() | old.keys()
            if not old and self.tailnet.fanout.sessions:     # coming from a policy: resend everything
                self.tailnet.fanout.notify(full=True, policy=True)
                return
            removed = [k for k in touched if k in old and k not in self.allow_all]
            changed = [k for k in touched if k in self.allow_all and old.get(k) != self.allow_all[k]]
            if removed or changed:
                self.tailnet.fanout.notify(changed, removed)
            return
        old = self.views or {n.id: allow_all_view(self.allow_all, n.id) for n in self.tailnet.nodes.values()}
        self.allow_all = {}
        started = time.perf_counter()
        self.views = compile_policy(self.policy, self.topology(), self.tailnet.settings.control_url)
        self.compile_seconds = time.perf_counter() - started
        self.tailnet.fanout.views_changed(old, self.views)

    def _routes_untouched(self, changed, removed):
        """Whether none of these nodes carries, or carried at the last compile, a route."""
        for node_id in (*changed, *removed):
            entry = self.allow_all.get(node_id)
            if entry is not None and len(entry["AllowedIPs"]) > 2:
                return False
            node = self.tailnet.nodes.get(node_id)
            if node is not None and live_routes(node):
                return False
        return True

    def topology_changed(self, changed=(), removed=()):
        """Nodes joined, left or changed in a way a policy can see."""
        if self.policy is not None:
            self.recompile_soon()
        else:
            self.recompile(changed, removed)
        self.tailnet.fanout.notify(changed=changed, removed=removed)

    def recompile_soon(self):
        """Compile the policy shortly, once for every change until then: a
        compile costs O(N), and a burst of N joins must not cost O(N x N)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:         # no event loop (the CLI, tests): now
            self.recompile()
            return
        if self.pending_compile is None:
            delay = max(RECOMPILE_DELAY, self.compile_seconds * (1 - RECOMPILE_SHARE) / RECOMPILE_SHARE)
            self.pending_compile = loop.call_later(delay, self._scheduled_recompile)

    def _scheduled_recompile(self):
        self.pending_compile = None
        self.recompile()

    def set_policy(self, text):
        """Check and apply a new policy (None: allow all); the old one stays on error."""
        policy = parse_policy(text) if text else None
        if policy is not None:
            check_policy_tests(policy, self.topology())
        self.apply_policy(text, policy)

    def apply_policy(self, text, policy):
        """Apply a policy that parsed and passed its tests against this tailnet."""
        self.text, self.policy = text, policy
        self.recompile()
        log.info("policy %s", "applied" if policy else "cleared: every node may reach every other")

    def topology(self):
        """The tailnet as the policy compiler takes it."""
        return policy_topology(self.tailnet.nodes.values(), self.tailnet.users)

    def view_of(self, node, at=None):
        """The node's compiled view; an expired node sees no peers.  Its map
        session is kept rather than refused: told once that it expired, the
        stock client stops its engine and waits quietly for a new login,
        while a refused map it retries several times a second."""
        if is_expired(node, at or now()):
            return NO_PEERS_VIEW
        if self.policy is None:
            return allow_all_view(self.allow_all, node.id)
        return self.views.get(node.id) or NO_PEERS_VIEW

    def primary_routes(self):
        """Node id -> the subnets its peers are sent as its primary routes."""
        if self.policy is None:
            seen_by = [self.allow_all]
        else:
            if self.pending_compile is not None:     # a burst of joins is waiting: compile it now
                self.recompile()
            seen_by = [view.peers for view in self.views.values()]
        primary = {}
        for peers in seen_by:
            for peer_id, seen in peers.items():
                if seen and seen.get("PrimaryRoutes"):
                    primary.setdefault(peer_id, set()).update(seen["PrimaryRoutes"])
        return primary


class Registrar:
    """Registration and login: pre-auth keys, interactive logins waiting for
    an admin or an identity provider, logouts, and the lockout of sources
    and machines that keep failing.  Admitting a machine is the tailnet's."""

    def __init__(self, tailnet):
        self.tailnet = tailnet
        self.auth_requests = {}      # id -> AuthRequest, in memory only: their clients ask again after a restart
        self.failed_registrations = AttemptLimiter(REGISTER_ATTEMPT_BURST, REGISTER_ATTEMPT_INTERVAL,
                                                   REGISTER_ATTEMPT_KEYS)

    def register(self, machine_key, req, source=None):
        """Handle a RegisterRequest from a client at address source (None:
        from within); returns the RegisterResponse body, or for a follow-up
        the AuthRequest to wait for.  Strangers that keep failing are turned
        away for a while without their keys being looked at; a registered
        machine without a key proves itself by its machine key and is not."""
        at = now()
        secret = json_field(json_field(req, "Auth", dict, {}), "AuthKey", str, "")
        blocks = [key for key in (address_block(source) if source else None, machine_key) if key is not None]
        if secret or self.tailnet.node_by_machine(machine_key) is None:
            wait = max(self.failed_registrations.wait(key, at) for key in blocks)
            if wait:
                raise RegistrationRefused("too_many_attempts", f"too many attempts, try again in {math.ceil(wait)} s "
                                          f"(registrations from this address or machine failed repeatedly)")
        try:
            return self._answer_registration(machine_key, req, secret, source, at)
        except RegistrationRefused:
            locked = [key for key in blocks if self.failed_registrations.failed(key, at)]
            if locked:
                log.warning("too many failed registrations from %s: refused for %d s", " and ".join(
                    f"address {key}" if isinstance(key, str) else "machine " + key_text("mkey", key)[:16]
                    for key in locked), math.ceil(max(self.failed_registrations.wait(key, at) for key in locked)))
            raise

    def _answer_registration(self, machine_key, req, secret, source, at):
        try:
            node_key = key_bytes(req.get("NodeKey"), "nodekey")
            expiry = parse_go_time(req.get("Expiry"))
        except (ValueError, TypeError) as e:
            raise RegistrationRefused("malformed", f"malformed register request: {e}") from None
        hostinfo = checked_hostinfo(req.get("Hostinfo"), "registering machine " + key_text("mkey", machine_key)[:16],
                                    self.tailnet.hostinfo_log_quota) or {}
        node = self.tailnet.node_by_machine(machine_key)
        holder = self.tailnet.node_by_node_key(node_key)
        if holder and holder.machine_key != machine_key:
            raise RegistrationRefused("key_in_use", "node key already belongs to another machine")

        if node and node.node_key == node_key:
            if expiry and expiry <= at:            # logout: the client may send its auth key along
                return self._logout(node, at)
            if not secret:                         # a restart or refresh: the node as it is
                if is_expired(node, at):
                    return {"NodeKeyExpired": True, "MachineAuthorized": False}
                return self._registered_response(node)
        # A new node key (the client regenerates one when its key expired or
        # at --force-reauth) is a login: with an auth key or an approval, never by itself.
        requested = [t for t in (hostinfo.get("RequestTags") or []) if isinstance(t, str)]
        if not secret:
            if req.get("Followup"):
                pending = self.auth_requests.get(str(req["Followup"]).rstrip("/").rsplit("/", 1)[-1])
                # Its AuthURL is no secret from other machines: only the one that asked gets the answer.
                if pending is None or (pending.machine_key, pending.node_key) != (machine_key, node_key):
                    raise RegistrationRefused("unknown_login", "this login request expired or is unknown: log in again")
                return pending
            return self._new_auth_request(machine_key, node_key, hostinfo, requested, source, at)
        key_row = self._check_auth_key(secret, at)
        tags = json.loads(key_row["tags"]) or self._checked_requested_tags(requested, key_row["user_id"])

        def consume_key():
            # In the registration's transaction: a single-use key is spent exactly once.
            if not self.tailnet.store.spend_preauth_key(key_row["id"]):
                raise RegistrationRefused("spent_key", "auth key already used: it is a single-use key")

        node = self.tailnet.admit(machine_key, node_key, hostinfo, key_row["user_id"], tags,
                                  bool(key_row["ephemeral"]), key_row["id"], consume_key)
        return self._registered_response(node)

    def _check_auth_key(self, secret, at):
        row = self.tailnet.store.preauth_key(secret) if secret else None
        if row is None:
            raise RegistrationRefused("unknown_key", "invalid auth key: no such pre-auth key on this server")
        if row["revoked"]:
            raise RegistrationRefused("expired_key", "auth key expired: it was revoked on the server")
        if row["expiration"] and row["expiration"] <= at:
            raise RegistrationRefused("expired_key", "auth key expired at " + rfc3339(row["expiration"]))
        if not row["reusable"] and row["used"]:
            raise RegistrationRefused("spent_key", "auth key already used: it is a single-use key")
        return row

    def _checked_requested_tags(self, requested, user_id):
        """Tags a client asks for, if the policy's tagOwners let its user own them."""
        user = self.tailnet.users.get(user_id)
        for tag in requested:
            policy = self.tailnet.policy_views.policy
            if policy is None or not may_own_tag(policy, tag, user.name if user else ""):
                raise RegistrationRefused("tag_not_owned", f"requested tag {tag} is not permitted: the policy's "
                                                           f"tagOwners do not let {user.name if user else '?'} own it")
        return requested

    def _registered_response(self, node):
        profile = user_profile(self.tailnet.users[node.user_id])
        return {"User": profile, "Login": profile, "MachineAuthorized": True, "NodeKeyExpired": False}

    def _logout(self, node, at):
        if node.ephemeral:
            self.tailnet.delete_node(node.id)
        else:
            with self.tailnet.store.transaction():
                self.tailnet.store.update_node(node.id, expiry=at)
            node.expiry = at
            self.tailnet.fanout.notify(changed=[node.id])
        log.info("logout: node %d %s", node.id, node.given_name)
        return {"NodeKeyExpired": True, "MachineAuthorized": False}

    # interactive login: the client gets an AuthURL; an admin (or OIDC)
    # approves it; the client's follow-up request, held open, then succeeds.
    def _new_auth_request(self, machine_key, node_key, hostinfo, requested, source, at):
        """A login request waiting in memory (nothing durable: a restart
        forgets it and its client asks again), within the caps."""
        hostname = str(hostinfo.get("Hostname") or "node")[:255]
        for pending in self.auth_requests.values():   # the same machine asking again
            if pending.machine_key == machine_key and not pending.done.flag:
                pending.node_key, pending.hostname = node_key, hostname
                return {"AuthURL": pending.url, "MachineAuthorized": False}
        if len(requested) > AUTH_REQUEST_MAX_TAGS or any(len(t) > AUTH_REQUEST_MAX_TAG_LEN for t in requested):
            raise RegistrationRefused("malformed", f"too many or too long requested tags: at most "
                                      f"{AUTH_REQUEST_MAX_TAGS} tags of {AUTH_REQUEST_MAX_TAG_LEN} characters")
        if len(self.auth_requests) >= AUTH_REQUESTS_MAX:
            raise RegistrationRefused("too_many_logins", f"too many login requests are waiting for approval "
                                      f"({AUTH_REQUESTS_MAX}): try again in a few minutes, or join with a pre-auth key")
        source = address_block(source) if source else None
        if source and sum(r.source == source for r in self.auth_requests.values()) >= AUTH_REQUESTS_PER_SOURCE:
            raise RegistrationRefused("too_many_logins", f"too many login requests from this address are waiting "
                                      f"for approval ({AUTH_REQUESTS_PER_SOURCE}): approve or let them expire "
                                      f"({AUTH_REQUEST_TTL // 60} min), or join with a pre-auth key")
        request = AuthRequest(secrets.token_urlsafe(18), machine_key, node_key, hostname, list(requested), at,
                              f"{self.tailnet.settings.control_url}/register/", source)
        self.auth_requests[request.id] = request
        log.info("login request %s from %s: waiting for approval at %s", request.id, hostname, request.url)
        return {"AuthURL": request.url, "MachineAuthorized": False}

    def approve(self, request_id, user_id):
        """Admit the machine behind a login request for a user; wakes its client."""
        request = self.auth_requests.get(request_id)
        if request is None or request.done.flag:
            raise InvalidInput(f"no login request {request_id!r} is waiting (it may have expired)")
        try:
            tags = self._checked_requested_tags(request.requested_tags, user_id)
            node = self.tailnet.admit(request.machine_key, request.node_key, {"Hostname": request.hostname}, user_id,
                                      tags, False, None)
            request.result = self._registered_response(node)
        except RegistrationRefused as e:
            request.result = {"Error": str(e)}
        request.done.set()
        del self.auth_requests[request_id]
        return request.result

    def user_signing_in(self, name):
        """The user an identity provider vouched for, created at its first sign-in."""
        user = self.tailnet.store.user_named_or_created(name)
        if user.id not in self.tailnet.users:
            log.info("created user %s at its first sign-in", name)
        self.tailnet.users[user.id] = user
        return user

    def expire_auth_requests(self, at):
        for request in [r for r in self.auth_requests.values() if r.created + AUTH_REQUEST_TTL <= at]:
            request.result = {"Error": "login request expired before anyone approved it: log in again"}
            request.done.set()
            del self.auth_requests[request.id]
            log.info("login request %s expired", request.id)


class SshChecks:
    """SSH sessions a check rule holds (holdAndDelegate) until an admin
    approves or denies them, in memory only, within caps."""

    def __init__(self, tailnet):
        self.tailnet = tailnet
        self.waiting = {}            # id -> SSHCheck waiting for an admin
        self.approved = {}           # (src node id, dst node id) -> when an admin last approved a check

    def check_period(self):
        """How long an approval lets the same source in again: the policy's
        shortest check period (one rule with "always" makes every session ask)."""
        policy = self.tailnet.policy_views.policy
        periods = [r.check_period for r in (policy.ssh if policy else ()) if r.action == "check"]
        return min(periods, default=0)

    def action(self, src_id, dst_id, query, at):
        """The SSHAction for a session a check rule holds on node dst_id (both
        known nodes): accept when an admin approved this source within the
        check period, else a held check."""
        check_id = query.get("auth_id")
        if check_id is None:
            approved = self.approved.get((src_id, dst_id))
            if approved is not None and at - approved < self.check_period():
                return dict(SSH_ACCEPT)
            return self._new_check(src_id, dst_id, query.get("local_user", ""), at)
        check = self.waiting.get(check_id)
        if check is None or (check.src_id, check.dst_id) != (src_id, dst_id):
            return {"reject": True, "message": "meshbox: this SSH check expired or is unknown: connect again\n"}
        return check

    def _new_check(self, src_id, dst_id, local_user, at):
        if len(self.waiting) >= SSH_CHECKS_MAX or \
                sum(c.dst_id == dst_id for c in self.waiting.values()) >= SSH_CHECKS_PER_NODE:
            return {"reject": True, "message": "meshbox: too many SSH checks are waiting: try again in a few "
                                               "minutes\n"}
        check = SSHCheck(secrets.token_hex(8), src_id, dst_id, local_user, at)
        self.waiting[check.id] = check
        src, dst = self.tailnet.nodes[src_id], self.tailnet.nodes[dst_id]
        log.info("SSH check %s: %s to %s as %s waits for: meshbox ssh approve %s", check.id, src.given_name,
                 dst.given_name, local_user, check.id)
        return {"message": f"# meshbox: SSH from {src.given_name} to {dst.given_name} as {local_user} "
                           f"needs an admin's approval:\n#   meshbox ssh approve {check.id}\n",
                "holdAndDelegate": f"{self.tailnet.settings.control_url}/machine/ssh/action/{src_id}/to/{dst_id}"
                                   f"?local_user={percent_encode(local_user)}&auth_id={check.id}"}

    def decide(self, check_id, approve):
        """An admin's verdict on a held SSH session; wakes the request that holds it."""
        check = self.waiting.pop(check_id, None)
        if check is None:
            raise InvalidInput(f"no SSH check {check_id!r} is waiting (it may have expired)")
        check.approved = approve
        if approve:
            self.approved[(check.src_id, check.dst_id)] = now()
        check.done.set()
        return check

    def expire(self, at):
        for check in [c for c in self.waiting.values() if c.created + SSH_CHECK_TTL <= at]:
            del self.waiting[check.id]
            check.done.set()           # not approved: its session is refused
        period = self.check_period()
        self.approved = {k: t for k, t in self.approved.items() if at - t < period}


class Coordinator:
    """The live tailnet (nodes and users, loaded from the store) and the one
    way to change it: registrations, what nodes report in map requests, and
    administrative changes (apply), each stored, then applied in memory,
    then handed to the policy views and the fan-out."""

    def __init__(self, store, settings, prefix_v4=DEFAULT_PREFIX_V4, prefix_v6=DEFAULT_PREFIX_V6,
                 node_expiry=DEFAULT_NODE_EXPIRY):
        self.store = store
        self.settings = settings
        self.node_expiry = node_expiry   # seconds; 0: keys never expire
        self.hostinfo_log_quota = AttemptLimiter(HOSTINFO_LOG_BURST, HOSTINFO_LOG_INTERVAL, REGISTER_ATTEMPT_KEYS)
        self.node_changes = AttemptLimiter(NODE_CHANGE_BURST, NODE_CHANGE_INTERVAL, REGISTER_ATTEMPT_KEYS)
        self.held_changes = {}       # node id -> whether its routes changed, for a node over its change rate
        self.prefix_v4, self.prefix_v6 = prefix_v4, prefix_v6
        self.users = {u.id: u for u in store.users()}
        self.nodes = NodeTable(store.nodes())
        self.dirty_live = set()      # node ids whose live fields await a flush
        self.data_version = store.data_version()
        self.known_expired = set()   # node ids whose expiry peers have been told of
        self.fanout = FanOut(self)
        self.policy_views = PolicyViews(self, store.setting("policy"))
        self.registrar = Registrar(self)
        self.ssh_checks = SshChecks(self)
        self.policy_views.recompile()

    # lookups
    def node_by_machine(self, machine_key):
        return self.nodes.by_machine.get(machine_key)

    def node_by_node_key(self, node_key):
        return next((n for n in self.nodes.values() if n.node_key == node_key), None)

    def _unique_given_name(self, hostname):
        base = sanitize_hostname(hostname)
        taken = {n.given_name for n in self.nodes.values()}
        name, i = base, 1
        while name in taken:
            name = f"{base[:58]}-{i}"
            i += 1
        return name

    def admit(self, machine_key, node_key, hostinfo, user_id, tags, ephemeral, auth_key_id, before=None):
        """Register a machine (or re-register a known one, keeping its
        addresses) for a user; `before` runs inside the same transaction."""
        at = now()
        node = self.node_by_machine(machine_key)
        expiry = None if tags or not self.node_expiry else at + self.node_expiry
        with self.store.transaction():
            if before:
                before()
            if node:
                hostinfo = keeping_netinfo(hostinfo or node.hostinfo, node.hostinfo)
                self.store.update_node(node.id, node_key=node_key, user_id=user_id, tags=tags, ephemeral=ephemeral,
                                       auth_key_id=auth_key_id, expiry=expiry, hostinfo=hostinfo)
                verb = "re-registered"
            else:
                ipv4, ipv6 = self.store.allocate_addresses(self.prefix_v4, self.prefix_v6)
                hostname = str(hostinfo.get("Hostname") or "node")[:255]
                node = Node(id=0, machine_key=machine_key, node_key=node_key, disco_key=b"", user_id=user_id,
                            hostname=hostname, given_name=self._unique_given_name(hostname), ipv4=ipv4, ipv6=ipv6,
                            tags=tags, ephemeral=ephemeral, auth_key_id=auth_key_id, expiry=expiry, created=at,
                            last_seen=at, hostinfo=hostinfo, endpoints=[], approved_routes=[], cap=0)
                self.store.insert_node(node)
                verb = "registered"
        if verb == "re-registered":        # memory follows the store only once it committed
            node.node_key, node.user_id, node.tags = node_key, user_id, tags
            node.ephemeral, node.auth_key_id, node.expiry = ephemeral, auth_key_id, expiry
            node.hostinfo = hostinfo
        self.nodes[node.id] = node
        self.users.setdefault(node.user_id, next(u for u in self.store.users() if u.id == node.user_id))
        log.info("%s node %d %s (%s, %s) for user %s", verb, node.id, node.given_name, node.ipv4, node.ipv6,
                 self.users[node.user_id].name)
        self.policy_views.topology_changed(changed=[node.id])
        return node

    # map requests
    def node_for_map(self, machine_key, req):
        """Check a MapRequest and apply what it reports; returns the node."""
        node = self.node_by_machine(machine_key)
        if node is None:
            raise MapRefused(401, "machine not registered")
        req = checked_map_request(req, f"node {node.id} {node.given_name}", self.hostinfo_log_quota)
        if "NodeKey" not in req:
            raise MapRefused(400, "MapRequest.NodeKey: missing")
        if req["NodeKey"] != node.node_key:
            raise MapRefused(401, "node key does not match the registered one")
        if req.get("ReadOnly"):
            return node
        changed = False
        if "DiscoKey" in req:
            changed |= req["DiscoKey"] != node.disco_key
            node.disco_key = req["DiscoKey"]
        if "Endpoints" in req:
            changed |= req["Endpoints"] != node.endpoints
            node.endpoints = req["Endpoints"]
            node.endpoint_types = req.get("EndpointTypes") or []
        hostinfo = req.get("Hostinfo")
        if hostinfo is not None:
            hostinfo = keeping_netinfo(hostinfo, node.hostinfo)
        routes_changed = stored = False
        if hostinfo is not None and hostinfo != node.hostinfo:
            routes_changed = hostinfo.get("RoutableIPs") != node.hostinfo.get("RoutableIPs")
            # Peers hear of a new Hostinfo only when the part they are sent
            # changes, so a node churning its other fields costs no fan-out.
            changed |= routes_changed or peer_hostinfo(hostinfo) != peer_hostinfo(node.hostinfo) or \
                home_derp_region(hostinfo) != home_derp_region(node.hostinfo)
            node.hostinfo, stored = hostinfo, True
        version = req.get("Version")
        if version is not None and version != node.cap:
            node.cap, changed = version, True
        if stored or changed:
            self.dirty_live.add(node.id)
        if changed:
            self.node_changed_itself(node.id, routes_changed)
        return node

    def node_changed_itself(self, node_id, routes_changed):
        """Tell the peers of what a node reported about itself: at once for
        NODE_CHANGE_BURST changes in a row, then its latest state at most once
        per NODE_CHANGE_INTERVAL, so that a node flapping its endpoints (or a
        hostile one) cannot keep every peer's map busy."""
        if node_id in self.held_changes:
            self.held_changes[node_id] |= routes_changed
            return
        wait = self.node_changes.wait(node_id, now())
        if wait:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:         # no event loop (the CLI, tests): now
                pass
            else:
                self.held_changes[node_id] = routes_changed
                loop.call_later(wait, self._release_held_change, node_id)
                return
        if self._tell_node_changed(node_id, routes_changed):      # the burst is spent: said once
            log.info("node %d %s reports changes faster than its peers are told: they get its latest state "
                     "once per %g s", node_id, self.nodes[node_id].given_name, NODE_CHANGE_INTERVAL)

    def _release_held_change(self, node_id):
        routes_changed = self.held_changes.pop(node_id)
        if node_id in self.nodes:
            self._tell_node_changed(node_id, routes_changed)

    def _tell_node_changed(self, node_id, routes_changed):
        """Fan out a node's own change, counted against its rate: True when
        this one spends its burst."""
        spent = self.node_changes.failed(node_id, now())
        if routes_changed:
            self.policy_views.topology_changed(changed=[node_id])
        else:
            self.fanout.notify(changed=[node_id])
        return spent

    # meshbox's own node
    def gateway_node(self):
        return next((n for n in self.nodes.values() if n.kind == NODE_GATEWAY), None)

    def ensure_gateway_node(self, public_key, hostname, routes, endpoints):
        """Create or update the box's own WireGuard-only node; the routes it
        advertises are approved by its configuration."""
        node = self.gateway_node()
        endpoints = checked_endpoints(endpoints)
        hostinfo = {"Hostname": hostname, "OS": "linux", "RoutableIPs": routes}
        user = self.store.user_named_or_created(GATEWAY_USER)
        self.users[user.id] = user
        with self.store.transaction():
            if node is None:
                ipv4, ipv6 = self.store.allocate_addresses(self.prefix_v4, self.prefix_v6)
                node = Node(id=0, machine_key=blake2s(b"meshbox gateway " + public_key), node_key=public_key,
                            disco_key=b"", user_id=user.id, hostname=hostname,
                            given_name=self._unique_given_name(hostname), ipv4=ipv4, ipv6=ipv6, tags=[],
                            ephemeral=False, auth_key_id=None, expiry=None, created=now(), last_seen=now(),
                            hostinfo=hostinfo, endpoints=endpoints, approved_routes=routes, cap=0, kind=NODE_GATEWAY)
                self.store.insert_node(node)
                self.nodes[node.id] = node
                log.info("created gateway node %d %s (%s, %s)", node.id, node.given_name, node.ipv4, node.ipv6)
            else:
                self.store.update_node(node.id, node_key=public_key, hostinfo=hostinfo, endpoints=endpoints,
                                       approved_routes=routes)
                node.node_key, node.hostinfo, node.endpoints, node.approved_routes = \
                    public_key, hostinfo, endpoints, routes
        node.online = True
        self.policy_views.topology_changed(changed=[node.id])
        return node

    # administrative changes (CLI and API): each edit is one change object,
    # and apply() is the one way it reaches the tailnet: stored first (one
    # transaction), then this coordinator's memory, then the fan-out.
    def apply(self, change):
        return getattr(self, "_apply_" + type(change).__name__)(change)

    def _apply_NodeEdit(self, change):
        node = self.nodes[change.node_id]
        with self.store.transaction():
            self.store.update_node(node.id, **change.fields)
        for name, value in change.fields.items():
            setattr(node, name, value)
        self.policy_views.topology_changed(changed=[node.id])

    def _apply_NodeRemoval(self, change):
        self.delete_node(change.node_id)

    def _apply_UserAddition(self, change):
        user = self.store.create_user(change.name)
        self.users[user.id] = user
        return user

    def _apply_UserRemoval(self, change):
        self.users.pop(self.store.delete_user(change.name).id, None)

    def _apply_DeviceAddition(self, change):
        addresses = self.store.insert_device(change.name, change.user_id, change.public_key, change.full_tunnel,
                                             self.prefix_v4, self.prefix_v6)
        self.fanout.tell_followers()             # the gateway adds its peer
        return addresses

    def _apply_DeviceRemoval(self, change):
        with self.store.transaction():
            if not self.store.delete_device(change.name):
                raise InvalidInput(f"no device named {change.name!r}")
        self.fanout.tell_followers()

    def _apply_PolicyChange(self, change):
        self.store.set_setting("policy", change.text)
        self.policy_views.apply_policy(change.text, change.policy)

    def _apply_DnsChange(self, change):
        self.store.set_setting("dns", json.dumps(change.settings))
        self.settings.dns_config = change.dns_config
        self.fanout.notify(full=True)

    def delete_node(self, node_id):
        with self.store.transaction():
            self.store.delete_node(node_id)
        node = self.nodes.pop(node_id, None)
        self.dirty_live.discard(node_id)
        if node:
            log.info("deleted node %d %s", node.id, node.given_name)
        self.policy_views.topology_changed(removed=[node_id])

    def reload_if_changed(self):
        """Pick up edits another process (the offline CLI) committed to the store."""
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
                for field in NODE_EDITABLE_FIELDS:
                    setattr(old, field, getattr(new, field))
                changed.append(node_id)
        for node_id in removed:
            self.nodes.pop(node_id)
            self.dirty_live.discard(node_id)
        text = self.store.setting("policy")
        if text != self.policy_views.text:
            try:
                self.policy_views.set_policy(text)
            except PolicyError as e:
                log.error("stored policy refused, keeping the previous one: %s", e)
        if changed or removed:
            log.info("state changed on disk: %d node(s) changed, %d removed", len(changed), len(removed))
            self.policy_views.topology_changed(changed=changed, removed=removed)
        else:                                        # e.g. a device was added: the gateway cares
            self.fanout.tell_followers()

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

    def expire_due(self, at, ephemeral_timeout):
        """Time-driven changes: node keys that just expired are told to their
        peers and (in a map without peers) to the node; ephemeral nodes
        offline too long are removed."""
        for node in list(self.nodes.values()):
            if not is_expired(node, at):
                self.known_expired.discard(node.id)
            elif node.id not in self.known_expired:      # just expired: tell everyone once
                self.known_expired.add(node.id)
                log.info("node key expired: node %d %s", node.id, node.given_name)
                self.fanout.notify(changed=[node.id])
            if node.ephemeral and not node.online and node.last_seen and \
                    node.last_seen + ephemeral_timeout <= at:
                log.info("removing ephemeral node %d %s, offline since %s", node.id, node.given_name,
                         rfc3339(node.last_seen))
                self.delete_node(node.id)
        self.registrar.expire_auth_requests(at)
        self.ssh_checks.expire(at)


# ---- HTTP front ----
# The little HTTP/1.1 that meshbox needs, on asyncio streams (http.server
# would pull in the email package, which OpenWrt ships separately).

MAX_HEADER_LINE = 8192       # bytes of the request line or of one header line
MAX_HEADERS = 64
MAX_REQUEST_HEAD = 32 << 10  # bytes of a whole request head (a browser's cookies fit)
WRITE_TIMEOUT = 30           # seconds a peer may leave a full buffer unread before it is dropped
HTTP_REASONS = {101: "Switching Protocols", 200: "OK", 204: "No Content", 302: "Found", 400: "Bad Request",
                401: "Unauthorized", 403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed",
                411: "Length Required", 412: "Precondition Failed", 413: "Payload Too Large",
                426: "Upgrade Required", 429: "Too Many Requests", 431: "Request Header Fields Too Large", 500: "Internal Server Error",
                501: "Not Implemented", 503: "Service Unavailable"}


class HttpError(MeshboxError):
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


async def _read_head_line(reader, budget, what):
    """One CRLF-ended line of a request head, within MAX_HEADER_LINE and the head's remaining budget."""
    try:
        line = await reader.readuntil(b"\r\n")
    except asyncio.LimitOverrunError:
        raise HttpError(431, f"{what} too long (limit {MAX_HEADER_LINE} bytes)") from None
    if len(line) > MAX_HEADER_LINE:
        raise HttpError(431, f"{what} too long (limit {MAX_HEADER_LINE} bytes)")
    if len(line) > budget:
        raise HttpError(431, f"request head too large (limit {MAX_REQUEST_HEAD} bytes)")
    return line


async def read_http_request(reader):
    """Read a request head; None on a clean close before any byte."""
    try:
        line = await _read_head_line(reader, MAX_REQUEST_HEAD, "request line")
    except asyncio.IncompleteReadError as e:
        if not e.partial:
            return None
        raise HttpError(400, "truncated request line") from None
    budget = MAX_REQUEST_HEAD - len(line)
    parts = line.decode("latin-1").strip().split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise HttpError(400, "malformed request line")
    method, target, _ = parts
    headers = {}
    for _ in range(MAX_HEADERS + 1):
        try:
            line = await _read_head_line(reader, budget, "header line")
        except asyncio.IncompleteReadError:
            raise HttpError(400, "malformed header") from None
        budget -= len(line)
        if line == b"\r\n":
            break
        name, sep, value = line.decode("latin-1").partition(":")
        if not sep:
            raise HttpError(400, "malformed header line")
        headers[name.strip().lower()] = value.strip()
    else:
        raise HttpError(431, "too many headers")
    path, _, query = target.partition("?")
    return HttpRequest(method.upper(), path, parse_query(query), headers)


async def drain_within(writer):
    """writer.drain(), but a peer that leaves what waits for it unread for
    WRITE_TIMEOUT seconds is dropped (ConnectionError) instead of holding
    the buffer and the task that feeds it forever."""
    if writer.transport.is_closing():
        return          # nothing more goes out (and 3.11's closed TLS transport cannot say what is left)
    if not writer.transport.get_write_buffer_size():
        return          # all taken already: the common case, without a timer
    try:
        async with asyncio.timeout(WRITE_TIMEOUT):
            await writer.drain()
    except TimeoutError:
        writer.transport.abort()
        raise ConnectionError(f"peer read nothing for {WRITE_TIMEOUT} s") from None


def http_response(status, body=b"", content_type="text/plain; charset=utf-8", headers=()):
    """A complete HTTP/1.1 response that closes the connection."""
    if isinstance(body, str):
        body = body.encode()
    head = [f"HTTP/1.1 {status} {HTTP_REASONS.get(status, 'Status')}",
            f"Content-Type: {content_type}", f"Content-Length: {len(body)}", "Connection: close"]
    head += [f"{k}: {v}" for k, v in headers]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


BODY_TIMEOUT = 30            # seconds to send a request body (at most MAX_REQUEST_BODY)


async def read_request_body(request, reader):
    """A request's body by its Content-Length, bounded in size and time."""
    if request.headers.get("transfer-encoding"):
        raise HttpError(411, "send the body with a Content-Length, not chunked")
    length = request.headers.get("content-length", "0") or "0"
    if not length.isdigit() or len(length) > 12:
        raise HttpError(400, "bad Content-Length")
    if int(length) > MAX_REQUEST_BODY:
        raise HttpError(413, f"request body too large (limit {MAX_REQUEST_BODY >> 20} MiB)")
    return await asyncio.wait_for(reader.readexactly(int(length)), BODY_TIMEOUT) if int(length) else b""


def request_cookie(request, name):
    """The value of one cookie of a request ("" when it has none by that name)."""
    for part in request.headers.get("cookie", "").split(";"):
        key, _, value = part.strip().partition("=")
        if key == name:
            return value
    return ""


def http_upgrade_response(protocol, headers=()):
    """A 101 response switching to `protocol`."""
    lines = ["HTTP/1.1 101 Switching Protocols", f"Upgrade: {protocol}", "Connection: Upgrade"]
    lines += [f"{k}: {v}" for k, v in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


MAX_REQUEST_BODY = 1 << 20


def html_text(text):
    """Text made safe to place in HTML."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


def dechunk(body):
    """The payload of a chunked transfer coding (RFC 9112 7.1); ValueError if cut short."""
    out = bytearray()
    while True:
        size_line, _, body = body.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            return bytes(out)
        if len(body) < size + 2:
            raise InvalidInput("truncated chunk")
        out += body[:size]
        body = body[size + 2:]


def parse_http_answer(data):
    """Status and body of a complete HTTP/1.1 response, read to its end."""
    head, sep, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = lines[0].split(" ")
    if not sep or len(status) < 2 or not status[1].isdigit():
        raise InvalidInput("not an HTTP response")
    headers = {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in lines[1:])}
    if "chunked" in headers.get("transfer-encoding", "").lower():
        body = dechunk(body)
    elif headers.get("content-length", "").isdigit():
        body = body[:int(headers["content-length"])]
    return int(status[1]), body


def http_request_bytes(method, target, host, headers=(), body=b""):
    """An HTTP/1.1 request meshbox sends as a client (to an identity provider,
    or to a remote meshbox's API): one per connection, closed after."""
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}", f"User-Agent: meshbox/{VERSION}", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in headers]
    if body or method == "POST":
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


# ---- TLS certificate ----
# Tailscale clients pin a DERP node's certificate by the SHA-256 of its DER
# bytes (DERPNode.CertName "sha256-raw:<hex>"), so a self-signed certificate
# is enough.  Go's client still checks the validity dates and that the
# subjectAltName covers the host name it dialed (IP SANs for IP literals).
# A few lines of DER writing keep this free of third-party packages.

OID_ED25519 = "1.3.101.112"
OID_COMMON_NAME = "2.5.4.3"
OID_SUBJECT_ALT_NAME = "2.5.29.17"
OID_BASIC_CONSTRAINTS = "2.5.29.19"
OID_KEY_USAGE = "2.5.29.15"
OID_EXT_KEY_USAGE = "2.5.29.37"
OID_SERVER_AUTH = "1.3.6.1.5.5.7.3.1"

CERT_VALID_BEFORE_NOW = 86400             # tolerate clients whose clock lags
CERT_LIFETIME = 10 * 365 * 86400


def der(tag, content):
    """One DER element: tag byte, definite length, content."""
    n = len(content)
    if n < 0x80:
        return bytes([tag, n]) + content
    size = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(size)]) + size + content


def der_sequence(*items):
    return der(0x30, b"".join(items))


def der_set(*items):
    return der(0x31, b"".join(items))


def der_integer(value):
    """A non-negative INTEGER (a leading zero keeps the sign bit clear)."""
    return der(0x02, value.to_bytes(value.bit_length() // 8 + 1, "big"))


def der_oid(dotted):
    parts = [int(p) for p in dotted.split(".")]
    body = bytearray([40 * parts[0] + parts[1]])
    for p in parts[2:]:
        chunk = [p & 0x7F]
        while p > 0x7F:
            p >>= 7
            chunk.append(0x80 | (p & 0x7F))
        body += bytes(reversed(chunk))
    return der(0x06, bytes(body))


def der_bit_string(data):
    return der(0x03, b"\x00" + data)      # no unused bits


def der_time(ts):
    """UTCTime through 2049, GeneralizedTime after (RFC 5280, 4.1.2.5)."""
    t = time.gmtime(ts)
    if t.tm_year < 2050:
        return der(0x17, time.strftime("%y%m%d%H%M%SZ", t).encode())
    return der(0x18, time.strftime("%Y%m%d%H%M%SZ", t).encode())


def der_name(common_name):
    """An X.501 Name holding only a commonName."""
    cn = der_sequence(der_oid(OID_COMMON_NAME), der(0x0C, common_name.encode()))
    return der_sequence(der_set(cn))


def der_extension(oid, value, critical=False):
    flag = der(0x01, b"\xff") if critical else b""
    return der_sequence(der_oid(oid), flag, der(0x04, value))


def subject_alt_names(hostname, ips):
    """GeneralNames: dNSName for a host name, iPAddress for every IP."""
    names, addrs = [], [ipaddress.ip_address(ip) for ip in ips]
    try:
        addrs.insert(0, ipaddress.ip_address(hostname))
    except ValueError:
        # ASCII names need no IDNA conversion, and the idna codec imports
        # unicodedata, which OpenWrt's python3-light lacks.
        names.append(der(0x82, hostname.encode("ascii" if hostname.isascii() else "idna")))
    names += [der(0x87, a.packed) for a in dict.fromkeys(addrs)]
    return der_sequence(*names)


def self_signed_certificate(seed, hostname, ips=()):
    """A self-signed X.509 v3 Ed25519 certificate (DER) for hostname and ips."""
    ed25519_id = der_sequence(der_oid(OID_ED25519))
    start = int(now())
    tbs = der_sequence(
        der(0xA0, der_integer(2)),                                  # v3
        der_integer(secrets.randbits(127) | 1 << 120),              # 16 bytes, positive
        ed25519_id,
        der_name(hostname),
        der_sequence(der_time(start - CERT_VALID_BEFORE_NOW),
                     der_time(start + CERT_LIFETIME)),
        der_name(hostname),
        der_sequence(ed25519_id, der_bit_string(ed25519_public(seed))),
        der(0xA3, der_sequence(
            der_extension(OID_BASIC_CONSTRAINTS, der_sequence(), critical=True),
            der_extension(OID_KEY_USAGE, der(0x03, b"\x07\x80"), critical=True),
            der_extension(OID_EXT_KEY_USAGE, der_sequence(der_oid(OID_SERVER_AUTH))),
            der_extension(OID_SUBJECT_ALT_NAME, subject_alt_names(hostname, ips)),
        )),
    )
    return der_sequence(tbs, ed25519_id, der_bit_string(ed25519_sign(seed, tbs)))


def ed25519_private_key_pem(seed):
    """The Ed25519 seed as a PKCS#8 PEM private key (RFC 8410)."""
    key = der_sequence(der_integer(0), der_sequence(der_oid(OID_ED25519)),
                       der(0x04, der(0x04, seed)))
    return pem(key, "PRIVATE KEY")


def pem(der_bytes, label):
    """PEM armour: base64 in 64-column lines between BEGIN/END lines."""
    b64 = base64.b64encode(der_bytes).decode()
    lines = [b64[i:i + 64] for i in range(0, len(b64), 64)]
    return ("-----BEGIN %s-----\n%s\n-----END %s-----\n"
            % (label, "\n".join(lines), label)).encode()


def certificate_pin(der_bytes):
    """The DERPNode.CertName that pins this exact certificate."""
    return "sha256-raw:" + hashlib.sha256(der_bytes).hexdigest()


def tls_server_context(cert_path, key_path):
    """A TLS 1.2+ server context serving the certificate and key files."""
    if ssl is None:
        raise Unavailable("DERP over TLS needs Python's ssl module "
                          "(OpenWrt: opkg install python3-openssl)")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert_path, key_path)
    return ctx


# ---- DERP ----
# The relay Tailscale nodes fall back to when no direct path works
# (derp/derp.go).  After the HTTP upgrade the connection carries frames:
# 1-byte type, 4-byte big-endian length, body.  Handshake: server sends
# ServerKey, client sends ClientInfo (its key and a box of JSON), server
# answers ServerInfo; then clients send SendPacket and receive RecvPacket.

DERP_MAGIC = "DERP🔑".encode()         # 44 45 52 50 f0 9f 94 91
DERP_PROTOCOL_VERSION = 2
DERP_KEY_LEN = 32
DERP_NONCE_LEN = 24
DERP_FRAME_HEADER_LEN = 5
DERP_MAX_PACKET = 64 << 10
DERP_MAX_FRAME = DERP_KEY_LEN + DERP_MAX_PACKET  # largest frame a joined client may send
DERP_MAX_CLIENT_INFO = 256 << 10                 # before the box opens, trust nothing big
DERP_MAX_INFO = 1 << 20                          # largest frame a client accepts
DERP_KEEPALIVE = 60.0
DERP_HANDSHAKE_TIMEOUT = 10.0
# Bytes that may wait for one client before its packets drop; disco and
# control frames get a little more room than bulk data.
DERP_READ_SIZE = 256 * 1024          # one socket read: many frames handled together
DERP_SEND_BUFFER = 256 << 10
DERP_DISCO_BUFFER = DERP_SEND_BUFFER + (64 << 10)
DERP_PEER_GONE_BURST = 3                         # NotHere replies per client: 3, then 1/s
DISCO_MAGIC = "TS💬".encode()
# Pairs of clients whose packets DERP carries, for `meshbox paths`: the
# table holds at most DERP_PAIR_LIMIT pairs (when full, the half that relayed
# least goes), a pair idle for DERP_PAIR_FORGET seconds is forgotten, and
# one that carried no data for DERP_PAIR_QUIET seconds counts as not relayed.
DERP_PAIR_LIMIT = 256
DERP_PAIR_FORGET = 3600.0
DERP_PAIR_QUIET = 15.0

FRAME_SERVER_KEY = 0x01        # magic + server public key
FRAME_CLIENT_INFO = 0x02       # client public key + nonce + box(JSON)
FRAME_SERVER_INFO = 0x03       # nonce + box(JSON)
FRAME_SEND_PACKET = 0x04       # destination key + packet
FRAME_RECV_PACKET = 0x05       # source key + packet
FRAME_KEEP_ALIVE = 0x06        # empty
FRAME_NOTE_PREFERRED = 0x07    # 1 byte: is this the client's home DERP
FRAME_PEER_GONE = 0x08         # key + reason
FRAME_PEER_PRESENT = 0x09      # mesh only
FRAME_FORWARD_PACKET = 0x0A    # mesh only
FRAME_WATCH_CONNS = 0x10       # mesh only
FRAME_CLOSE_PEER = 0x11        # mesh only
FRAME_PING = 0x12              # 8 bytes, echoed in a Pong
FRAME_PONG = 0x13
FRAME_HEALTH = 0x14            # text of a problem; empty clears it
FRAME_RESTARTING = 0x15        # reconnect-in and try-for, milliseconds

PEER_GONE_DISCONNECTED = 0x00  # the peer left this server
PEER_GONE_NOT_HERE = 0x01      # the server never had the peer

MESH_FRAMES = (FRAME_FORWARD_PACKET, FRAME_WATCH_CONNS, FRAME_CLOSE_PEER)


class DerpError(MeshboxError):
    """A DERP peer broke the protocol."""


def short_key(raw):
    """A key as Tailscale logs it: ``[`` + first 5 base64 characters + ``]``."""
    return "[" + base64.b64encode(raw[:4]).decode()[:5] + "]"


def address_text(peername):
    """A socket address as ``host:port`` (``[v6]:port``) for logs."""
    if not peername:
        return "?"
    host, port = peername[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def looks_like_disco(packet):
    """Whether a relayed packet is a disco message (magic, key, nonce)."""
    return len(packet) >= len(DISCO_MAGIC) + DERP_KEY_LEN + DERP_NONCE_LEN and \
        packet[:len(DISCO_MAGIC)] == DISCO_MAGIC


# Reading

async def read_frame(reader, max_len):
    """Read one frame as ``(type, body)``.

    A connection closed between frames raises EOFError; one cut inside a
    frame, or a frame longer than max_len, raises DerpError.
    """
    try:
        header = await reader.readexactly(DERP_FRAME_HEADER_LEN)
    except asyncio.IncompleteReadError as e:
        if e.partial:
            raise DerpError("connection closed inside a frame header") from None
        raise EOFError("connection closed") from None
    frame_type, length = struct.unpack(">BI", header)
    if length > max_len:
        raise DerpError(f"frame 0x{frame_type:02x} of {length} bytes, limit {max_len}")
    try:
        return frame_type, await reader.readexactly(length)
    except asyncio.IncompleteReadError:
        raise DerpError(f"connection closed inside a frame 0x{frame_type:02x}") from None


def open_client_info(server_private, body):
    """The client's key and its ClientInfo JSON, from a ClientInfo body."""
    if len(body) < DERP_KEY_LEN + DERP_NONCE_LEN:
        raise DerpError("short ClientInfo")
    client_key = body[:DERP_KEY_LEN]
    nonce = body[DERP_KEY_LEN:DERP_KEY_LEN + DERP_NONCE_LEN]
    sealed = body[DERP_KEY_LEN + DERP_NONCE_LEN:]
    try:
        info = parse_json(box_open(server_private, client_key, nonce, sealed))
    except CryptoError:
        raise DerpError("ClientInfo box does not open") from None
    except ValueError:
        raise DerpError("ClientInfo is not JSON") from None
    if not isinstance(info, dict):
        raise DerpError("ClientInfo is not a JSON object")
    return client_key, info


# Writing

def frame(frame_type, body=b""):
    """One frame: type, big-endian body length, body."""
    return struct.pack(">BI", frame_type, len(body)) + body


def server_key_frame(server_public):
    return frame(FRAME_SERVER_KEY, DERP_MAGIC + server_public)


def server_info_frame(server_private, client_key):
    """ServerInfo as derper sends it: only the version (no rate limit)."""
    nonce = secrets.token_bytes(DERP_NONCE_LEN)
    info = json_bytes({"version": DERP_PROTOCOL_VERSION})
    return frame(FRAME_SERVER_INFO, nonce + box_seal(server_private, client_key, nonce, info))


def peer_gone_frame(peer_key, reason):
    return frame(FRAME_PEER_GONE, peer_key + bytes([reason]))


KEEP_ALIVE_FRAME = frame(FRAME_KEEP_ALIVE)
RECV_PACKET_TYPE = bytes([FRAME_RECV_PACKET])


class DerpConnection:
    """One joined client connection: its key, address and output."""

    def __init__(self, key, remote, writer, transport):
        self.key = key
        self.remote = remote
        self.writer = writer
        self.transport = transport
        self.senders = set()          # keys relayed to it: told PeerGone when they leave
        self.preferred = False
        self._peer_gone_tokens = float(DERP_PEER_GONE_BURST)
        self._peer_gone_at = time.monotonic()

    def send(self, data, limit):
        """Write a frame unless limit bytes already wait for this client.

        The transport's buffer is the send queue: writing never waits, and
        a client that reads too slowly loses its own packets without
        holding up anyone else.
        """
        if self.transport.get_write_buffer_size() > limit:
            return False
        self.writer.write(data)
        return True

    def allow_peer_gone(self):
        """Token bucket for NotHere replies (burst 3, then one a second)."""
        t = time.monotonic()
        self._peer_gone_tokens = min(float(DERP_PEER_GONE_BURST),
                                     self._peer_gone_tokens + t - self._peer_gone_at)
        self._peer_gone_at = t
        if self._peer_gone_tokens < 1:
            return False
        self._peer_gone_tokens -= 1
        return True


class DerpPair:
    """What DERP carried between two client keys (either way): data and disco."""
    __slots__ = ("keys", "data_packets", "data_bytes", "disco_packets", "first", "last", "last_data",
                 "relayed_since")

    def __init__(self, keys, at):
        self.keys = keys
        self.data_packets = self.data_bytes = self.disco_packets = 0
        self.first = self.last = at
        self.last_data = self.relayed_since = None   # relayed_since: start of the current data run

    def relayed(self, at):
        """Whether data crossed DERP within the last DERP_PAIR_QUIET seconds."""
        return self.last_data is not None and at - self.last_data < DERP_PAIR_QUIET


class DerpServer:
    """The DERP relay: joined clients by key and the packets between them."""

    def __init__(self, private_key, admit=None):
        self.private_key = private_key
        self.public_key = x25519_public(private_key)
        # admit(client key): None to serve the client, or why it is refused
        # (told in a Health frame before the close); None serves any key.
        self.admit = admit
        # key -> its connections; the last one (newest, or the last to send
        # a frame) is the one packets go to, as derper's default policy.
        self._clients = {}
        self._watchers = {}   # key -> connections that received from it
        self.connections_total = 0
        self.packets_relayed = 0
        self.bytes_relayed = 0
        self.packets_dropped = 0
        self.pairs = {}       # (lower key, higher key) -> DerpPair
        self.clock = time.monotonic()   # read once per socket read, not per packet
        # name_of(key): how log lines name a client (default: its short key)
        self.name_of = short_key

    @property
    def clients(self):
        """Connected clients (connections, duplicates included)."""
        return sum(len(conns) for conns in self._clients.values())

    def stats(self):
        """Counters for logs and metrics."""
        home = sum(conn.preferred for conns in self._clients.values() for conn in conns)
        return {"clients": self.clients, "home_clients": home,
                "connections_total": self.connections_total,
                "packets_relayed": self.packets_relayed, "bytes_relayed": self.bytes_relayed,
                "packets_dropped": self.packets_dropped}

    def close(self):
        """Drop every client connection (on shutdown)."""
        for conns in list(self._clients.values()):
            for conn in conns:
                conn.writer.close()

    def close_refused(self):
        """Tell the clients whose keys admit() now refuses (a node deleted,
        a key expired) why, and close them."""
        for key, conns in list(self._clients.items()):
            refusal = self.admit(key) if self.admit else None
            for conn in conns if refusal else ():
                log.info("derp: %s from %s dropped: %s", short_key(key), conn.remote, refusal)
                conn.send(frame(FRAME_HEALTH, refusal.encode()), DERP_DISCO_BUFFER)
                conn.writer.close()

    async def handle_upgrade(self, headers, reader, writer, joined=None):
        """Answer ``GET /derp`` asking for an upgrade, then serve the connection;
        joined() is called once the client's key is admitted."""
        upgrade = headers.get("upgrade", "").lower()
        if upgrade == "websocket" and "derp" in headers.get("sec-websocket-protocol", ""):
            # Browser clients (tsconnect): frames inside WebSocket binary messages.
            writer.write(http_upgrade_response("websocket", [
                ("Sec-WebSocket-Accept", websocket_accept_value(headers.get("sec-websocket-key", ""))),
                ("Sec-WebSocket-Protocol", "derp")]))
            stream = WebSocketStream(reader, writer)
            await self.serve_client(stream, stream, joined)
            return
        # Old clients said "websocket" but spoke plain DERP, so derper takes both.
        if upgrade not in ("derp", "websocket"):
            writer.write(http_response(426, "DERP requires connection upgrade\n"))
            return
        # A fast-start client already knows our key (from a TLS meta
        # certificate) and reads frames straight after its request.
        if headers.get("derp-fast-start") != "1":
            writer.write(http_upgrade_response("DERP", [
                ("Derp-Version", DERP_PROTOCOL_VERSION),
                ("Derp-Public-Key", self.public_key.hex())]))
        await self.serve_client(reader, writer, joined)

    async def serve_client(self, reader, writer, joined=None):
        """Run DERP on an upgraded connection until it ends (writer may be a
        WebSocketStream: its transport is the socket's own)."""
        transport = writer.transport
        remote = address_text(transport.get_extra_info("peername"))
        try:
            writer.write(server_key_frame(self.public_key))
            frame_type, body = await asyncio.wait_for(
                read_frame(reader, DERP_MAX_CLIENT_INFO), DERP_HANDSHAKE_TIMEOUT)
            if frame_type != FRAME_CLIENT_INFO:
                raise DerpError(f"expected ClientInfo, got frame 0x{frame_type:02x}")
            client_key, _info = open_client_info(self.private_key, body)
            refusal = self.admit(client_key) if self.admit else None
            if refusal:
                writer.write(frame(FRAME_HEALTH, refusal.encode()))
                raise DerpError(f"{short_key(client_key)} refused: {refusal}")
            writer.write(server_info_frame(self.private_key, client_key))
        except (DerpError, EOFError, OSError, TimeoutError) as e:
            log.info("derp: handshake with %s failed: %s", remote, e or type(e).__name__)
            writer.close()
            return
        if joined:
            joined()
        conn = DerpConnection(client_key, remote, writer, transport)
        self._register(conn)
        log.info("derp: %s connected from %s", short_key(client_key), remote)
        keep_alive = asyncio.create_task(self._keep_alive_loop(conn))
        reason = "closed"
        try:
            await self._receive_loop(conn, reader)
        except EOFError:
            pass
        except (DerpError, OSError) as e:
            reason = str(e) or type(e).__name__
        finally:
            keep_alive.cancel()
            self._unregister(conn)
            writer.close()
            log.info("derp: %s from %s disconnected: %s", short_key(client_key), remote, reason)

    async def _receive_loop(self, conn, reader):
        """Frames as they come, a whole socket read at a time: the frames of
        one read are handled together and each destination gets one write."""
        pending = b""
        while True:
            chunk = await reader.read(DERP_READ_SIZE)
            if not chunk:
                if pending:
                    raise DerpError("connection closed inside a frame")
                raise EOFError("connection closed")
            data = pending + chunk if pending else chunk
            view, offset, outgoing = memoryview(data), 0, {}
            try:
                while len(data) - offset >= DERP_FRAME_HEADER_LEN:
                    frame_type, length = struct.unpack_from(">BI", data, offset)
                    if length > DERP_MAX_FRAME:
                        raise DerpError(f"frame 0x{frame_type:02x} of {length} bytes, limit {DERP_MAX_FRAME}")
                    start, end = offset + DERP_FRAME_HEADER_LEN, offset + DERP_FRAME_HEADER_LEN + length
                    if end > len(data):
                        break
                    if frame_type == FRAME_SEND_PACKET:       # the hot path, without slicing a body first
                        self._relay(conn, data, view, start, end, outgoing)
                    else:
                        self._handle_frame(conn, frame_type, view[start:end])
                    offset = end
            finally:       # the packets before a bad frame still go out
                self._send_queued(conn, outgoing)
            pending = data[offset:]
            self._note_activity(conn)
            self.clock = time.monotonic()

    def _handle_frame(self, conn, frame_type, body):
        """Any frame but SendPacket."""
        if frame_type == FRAME_PING:
            if not 8 <= len(body) <= 1000:
                raise DerpError(f"ping of {len(body)} bytes")
            conn.send(frame(FRAME_PONG, bytes(body[:8])), DERP_DISCO_BUFFER)
        elif frame_type == FRAME_NOTE_PREFERRED:
            if len(body) != 1:
                raise DerpError("NotePreferred is not 1 byte")
            conn.preferred = body != b"\x00"
        elif frame_type in MESH_FRAMES:
            raise DerpError(f"mesh frame 0x{frame_type:02x} without a mesh key")
        # KeepAlive, Pong and frames from newer clients are ignored.

    def _relay(self, src, data, view, start, end, outgoing):
        """Queue the packet of the SendPacket body data[start:end] for its
        destination (in `outgoing`, as pieces of frames), or drop it."""
        if end - start < DERP_KEY_LEN:
            raise DerpError("short SendPacket")
        dst_key, packet = data[start:start + DERP_KEY_LEN], view[start + DERP_KEY_LEN:end]
        disco = looks_like_disco(packet)
        conns = self._clients.get(dst_key)
        if not conns:
            self.packets_dropped += 1
            # Only disco tells a client to forget a path; answering data
            # packets would just add load.
            if disco and src.allow_peer_gone():
                src.send(peer_gone_frame(dst_key, PEER_GONE_NOT_HERE), DERP_DISCO_BUFFER)
            return
        dst = conns[-1]
        queued = outgoing.get(dst)
        if queued is None:   # pieces of frames, buffered bytes with them, disco packets and bytes among them
            queued = outgoing[dst] = [[], dst.transport.get_write_buffer_size(), 0, 0]
        if queued[1] > (DERP_DISCO_BUFFER if disco else DERP_SEND_BUFFER):
            self.packets_dropped += 1
            return
        # RecvPacket has SendPacket's length: the source key takes the destination key's place.
        queued[0] += (RECV_PACKET_TYPE, data[start - 4:start], src.key, packet)
        queued[1] += DERP_FRAME_HEADER_LEN + DERP_KEY_LEN + len(packet)
        if disco:
            queued[2] += 1
            queued[3] += len(packet)
        self.packets_relayed += 1
        self.bytes_relayed += len(packet)
        if src.key not in dst.senders:
            dst.senders.add(src.key)
            self._watchers.setdefault(src.key, set()).add(dst)

    def _send_queued(self, src, outgoing):
        """Write what _relay queued from src, one write per destination, and
        count it: once per destination and socket read, not per packet."""
        for dst, (pieces, _, disco, disco_bytes) in outgoing.items():
            frames = b"".join(pieces)
            dst.writer.write(frames)
            packets = len(pieces) // 4
            payload = len(frames) - packets * (DERP_FRAME_HEADER_LEN + DERP_KEY_LEN)
            self._count_pair(src.key, dst.key, packets - disco, payload - disco_bytes, disco)

    def _count_pair(self, src_key, dst_key, data_packets, data_bytes, disco_packets):
        keys = (src_key, dst_key) if src_key < dst_key else (dst_key, src_key)
        pair, at = self.pairs.get(keys), self.clock
        if pair is None:
            if len(self.pairs) >= DERP_PAIR_LIMIT:
                self._shrink_pairs()
            pair = self.pairs[keys] = DerpPair(keys, at)
        pair.last = at
        pair.disco_packets += disco_packets
        if not data_packets:
            return
        if not pair.relayed(at):
            pair.relayed_since = at
            log.info("derp: %s <-> %s now relayed", self.name_of(keys[0]), self.name_of(keys[1]))
        pair.data_packets += data_packets
        pair.data_bytes += data_bytes
        pair.last_data = at

    def _shrink_pairs(self):
        """Keep the half of the pairs that relayed most (a client cannot grow the table)."""
        ranked = sorted(self.pairs.values(), key=lambda p: p.data_bytes, reverse=True)
        self.pairs = {p.keys: p for p in ranked[:DERP_PAIR_LIMIT // 2]}

    def sweep_pairs(self, at=None):
        """Log the pairs that stopped being relayed; forget the long idle ones."""
        at = time.monotonic() if at is None else at
        for keys, pair in list(self.pairs.items()):
            if pair.relayed_since is not None and not pair.relayed(at):
                log.info("derp: %s <-> %s no longer relayed, after %.0f s (%d bytes relayed in all)",
                         self.name_of(keys[0]), self.name_of(keys[1]), pair.last_data - pair.relayed_since,
                         pair.data_bytes)
                pair.relayed_since = None
            if at - pair.last > DERP_PAIR_FORGET:
                del self.pairs[keys]

    @staticmethod
    async def _keep_alive_loop(conn):
        # Besides telling the client we are alive, this keeps TCP sending to
        # a vanished client, so its retransmissions time out and end the
        # connection; meanwhile its buffer stays within DERP_DISCO_BUFFER.
        # A client whose buffer is full at two keepalives in a row reads
        # nothing: it is dropped rather than held.
        stalled = False
        while True:
            await asyncio.sleep(DERP_KEEPALIVE * random.uniform(1.0, 1.08))   # jitter as derper
            if conn.send(KEEP_ALIVE_FRAME, DERP_DISCO_BUFFER):
                stalled = False
            elif stalled:
                log.info("derp: %s from %s read nothing for %d s, dropped", short_key(conn.key), conn.remote,
                         2 * DERP_KEEPALIVE)
                conn.transport.abort()
                return
            else:
                stalled = True

    def _register(self, conn):
        self._clients.setdefault(conn.key, []).append(conn)
        self.connections_total += 1

    def _note_activity(self, conn):
        conns = self._clients[conn.key]
        if conns[-1] is not conn:        # last writer is the active one
            conns.remove(conn)
            conns.append(conn)

    def _unregister(self, conn):
        for sender in conn.senders:
            watchers = self._watchers.get(sender)
            if watchers is not None:
                watchers.discard(conn)
                if not watchers:
                    del self._watchers[sender]
        conns = self._clients[conn.key]
        conns.remove(conn)
        if conns:
            return
        del self._clients[conn.key]
        # Whoever this client sent to can forget their path back to it.
        for watcher in self._watchers.pop(conn.key, ()):
            watcher.send(peer_gone_frame(conn.key, PEER_GONE_DISCONNECTED), DERP_DISCO_BUFFER)


# ---- STUN ----
# RFC 5389 binding: tell a client the address its packet came from, so it
# learns its NAT mapping.  Tailscale clients read only XOR-MAPPED-ADDRESS
# (net/stun), so the answer carries nothing else.  Anything that is not a
# well-formed binding request gets no answer at all.

STUN_HEADER_LEN = 20
STUN_MAGIC_COOKIE = b"\x21\x12\xa4\x42"
STUN_BINDING_REQUEST = 0x0001
STUN_BINDING_SUCCESS = 0x0101
STUN_ATTR_XOR_MAPPED_ADDRESS = 0x0020
STUN_ATTR_FINGERPRINT = 0x8028
STUN_FINGERPRINT_XOR = 0x5354554E
STUN_FAMILY_IPV4 = 0x01
STUN_FAMILY_IPV6 = 0x02


def stun_attributes_valid(message):
    """Attributes fill the body exactly; a FINGERPRINT, if any, is last and right."""
    body, offset = message[STUN_HEADER_LEN:], 0
    while offset < len(body):
        if offset + 4 > len(body):
            return False
        attr_type, attr_len = struct.unpack_from(">HH", body, offset)
        end = offset + 4 + attr_len
        if end > len(body):
            return False
        if attr_type == STUN_ATTR_FINGERPRINT:
            if attr_len != 4 or end != len(body):
                return False
            crc = binascii.crc32(message[:STUN_HEADER_LEN + offset]) ^ STUN_FINGERPRINT_XOR
            return body[offset + 4:end] == struct.pack(">I", crc)
        offset = end + (-attr_len % 4)
    return offset == len(body)


def stun_binding_response(request, addr):
    """The binding success response to request from addr, or None if it is not one."""
    if len(request) < STUN_HEADER_LEN or request[4:8] != STUN_MAGIC_COOKIE:
        return None
    msg_type, length = struct.unpack_from(">HH", request)
    if msg_type != STUN_BINDING_REQUEST or length % 4 or \
            length != len(request) - STUN_HEADER_LEN or not stun_attributes_valid(request):
        return None
    ip = ipaddress.ip_address(addr[0])
    if ip.version == 6 and ip.ipv4_mapped:         # a dual-stack socket's IPv4 peer
        ip = ip.ipv4_mapped
    family = STUN_FAMILY_IPV4 if ip.version == 4 else STUN_FAMILY_IPV6
    txid = request[8:STUN_HEADER_LEN]
    mask = STUN_MAGIC_COOKIE + txid
    xor_ip = bytes(a ^ b for a, b in zip(ip.packed, mask))
    xor_port = addr[1] ^ int.from_bytes(STUN_MAGIC_COOKIE[:2], "big")
    value = struct.pack(">BBH", 0, family, xor_port) + xor_ip
    attrs = struct.pack(">HH", STUN_ATTR_XOR_MAPPED_ADDRESS, len(value)) + value
    return struct.pack(">HH", STUN_BINDING_SUCCESS, len(attrs)) + STUN_MAGIC_COOKIE + txid + attrs


class StunProtocol(asyncio.DatagramProtocol):
    """A STUN server on one UDP socket: answers binding requests, ignores the rest."""

    def __init__(self):
        self.transport = None
        self.requests = 0
        self.ignored = 0

    def connection_made(self, transport):
        self.transport = transport

    def datagram_received(self, data, addr):
        try:
            response = stun_binding_response(data, addr)
        except ValueError:           # an address we cannot describe
            response = None
        if response is None:
            self.ignored += 1
            return
        self.requests += 1
        self.transport.sendto(response, addr)

    def error_received(self, exc):
        # ICMP errors from earlier replies; nothing to do for a stateless server.
        log.debug("stun: %s", exc)


# ---- Control server ----
# ts2021: after the Noise handshake the client speaks HTTP/2 with prior
# knowledge inside transport records.  h2 does the framing; this section
# moves bytes between it and the records and routes the requests.

EARLY_PAYLOAD_MAGIC = b"\xff\xff\xffTS"
DNS_HOOK_TIMEOUT = 60         # seconds the DNS hook may take to publish a challenge
LOCAL_USER = re.compile(r"[A-Za-z0-9_.][A-Za-z0-9_.-]{0,63}")    # a login name on the SSH server
MAX_STREAMS = 16             # open requests per connection; a client uses a handful
MAX_BUFFERED_BODIES = 2 * MAX_REQUEST_BODY   # request bytes one connection may hold before dispatch
CONTROL_HANDSHAKE_TIMEOUT = 30
CONTROL_IDLE_TIMEOUT = 30    # seconds a connection may serve no request (a map stream is one) before it is closed


@dataclasses.dataclass
class ControlContext:
    """What a control connection needs of the server: the tailnet, the
    settings (the DNS hook that publishes ACME challenges under the base
    domain) and the counters it adds to."""
    tailnet: object              # the Coordinator
    config: object               # the server's Config, read as it is at each request
    metrics: collections.Counter
    refusals: dict


class ControlConnection:
    """One client's Noise channel carrying HTTP/2 requests."""

    def __init__(self, context, stream, writer, noise, peer, proven):
        self.context, self.stream, self.writer = context, stream, writer
        self.noise, self.peer = noise, peer
        self.source = peer.rpartition(":")[0].strip("[]")     # the client's address, without its port
        self.proven = proven     # called once the connection registered a node or opened its map
        self.idle_timer = None
        self.machine_key = noise.peer_static
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding="utf-8"))
        self.h2.local_settings.max_concurrent_streams = MAX_STREAMS
        self.h2.local_settings.max_header_list_size = 16 << 10
        self.requests = {}       # stream id -> [headers, body]
        self.tasks = {}             # stream id -> the task answering it
        self.window_open = Signal()

    def flush(self):
        data = self.h2.data_to_send()
        if data:
            self.writer.write(seal_records(self.noise.send, data))

    def watch_idle(self):
        """Close the connection CONTROL_IDLE_TIMEOUT after its last request ends:
        one that registers nothing and opens no map does not sit forever."""
        if self.idle_timer is not None:
            self.idle_timer.cancel()
        self.idle_timer = None if self.tasks else \
            asyncio.get_running_loop().call_later(CONTROL_IDLE_TIMEOUT, self.close_idle)

    def close_idle(self):
        log.info("control %s: no request for %d s, closed", self.peer, CONTROL_IDLE_TIMEOUT)
        self.h2.close_connection()      # GOAWAY: the client opens a new connection for its next request
        self.flush()
        self.writer.close()

    def request_done(self, stream_id):
        self.tasks.pop(stream_id, None)
        self.watch_idle()

    async def run(self, early_payload):
        self.writer.write(seal_records(self.noise.send, early_payload))
        self.h2.initiate_connection()
        self.flush()
        self.watch_idle()
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
                await drain_within(self.writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        except NoiseError as e:
            log.info("control %s: %s", self.peer, e)
        finally:
            if self.idle_timer is not None:
                self.idle_timer.cancel()
            for task in list(self.tasks.values()):
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
            if len(request[1]) > MAX_REQUEST_BODY or \
                    sum(len(r[1]) for r in self.requests.values()) > MAX_BUFFERED_BODIES:
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
            task = self.tasks.get(event.stream_id)
            if task is not None:      # e.g. `tailscale down` cancels its map poll: the node is offline now
                task.cancel()
            self.window_open.set()

    def dispatch(self, stream_id):
        headers, body = self.requests.pop(stream_id)
        task = asyncio.ensure_future(self.handle(stream_id, headers, bytes(body)))
        self.tasks[stream_id] = task
        task.add_done_callback(lambda _: self.request_done(stream_id))
        self.watch_idle()

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
            await drain_within(self.writer)
        if end and not data:
            self.h2.end_stream(stream_id)
            self.flush()
        await drain_within(self.writer)

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
                request = parse_json(body) if body else {}
                if not isinstance(request, dict):
                    raise InvalidInput("expected a JSON object")
            except ValueError as e:
                raise HttpError(400, f"malformed JSON body: {e}") from None
            if path.startswith("/machine/ssh/action/") and method == "GET":
                await self.reply(stream_id, 200, await self.ssh_action(path, headers.get(":path", "")))
                return
            if method != "POST":
                raise HttpError(405, "control requests must be POST")
            if path == "/machine/register":
                await self.reply(stream_id, 200, await self.register(request))
            elif path == "/machine/map":
                await self.serve_map(stream_id, request)
            elif path == "/machine/set-dns":
                await self.reply(stream_id, 200, await self.set_dns(request))
            elif path == "/machine/update-health":
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

    async def set_dns(self, request):
        """tailcfg.SetDNSRequest: publish the TXT record of an ACME dns-01
        challenge for the node's own name, through the configured DNS hook."""
        hook = self.context.config.dns_hook
        if not hook:
            raise HttpError(501, "meshbox has no DNS provider for certificates: set dns_hook to a command that "
                                 "publishes TXT records under the base domain")
        node = self.context.tailnet.node_by_machine(self.machine_key)
        if node is None or key_text("nodekey", node.node_key) != request.get("NodeKey"):
            raise HttpError(403, "set-dns: the node key is not this machine's")
        name, kind, value = request.get("Name"), request.get("Type"), request.get("Value")
        own = f"_acme-challenge.{node.given_name}.{self.context.config.base_domain}"
        if not isinstance(name, str) or name.rstrip(".") != own:
            raise HttpError(403, f"set-dns: a node may only set {own}")
        if kind != "TXT" or not isinstance(value, str) or not re.fullmatch(r"[A-Za-z0-9_-]{1,255}", value):
            raise HttpError(400, "set-dns: only TXT records of an ACME challenge (base64url, at most 255) are set")
        try:
            hook_proc = await asyncio.create_subprocess_exec(hook, own, kind, value, stdin=asyncio.subprocess.DEVNULL,
                                                             stdout=asyncio.subprocess.DEVNULL,
                                                             stderr=asyncio.subprocess.PIPE)
            _, err = await asyncio.wait_for(hook_proc.communicate(), DNS_HOOK_TIMEOUT)
        except asyncio.TimeoutError:
            hook_proc.kill()
            raise HttpError(504, f"set-dns: the DNS hook took over {DNS_HOOK_TIMEOUT} s") from None
        except OSError as e:
            raise HttpError(500, f"set-dns: cannot run the DNS hook {hook}: {e}") from None
        if hook_proc.returncode != 0:
            why = err.decode(errors="replace").strip()[-300:]
            log.warning("DNS hook %s for %s exited with %d: %s", hook, own, hook_proc.returncode, why)
            raise HttpError(502, f"set-dns: the DNS hook failed ({hook_proc.returncode}): {why}")
        log.info("DNS hook set TXT %s for node %d", own, node.id)
        return {}

    async def ssh_action(self, path, full_path):
        """GET /machine/ssh/action/SRC/to/DST?local_user=U[&auth_id=ID]: a
        check rule's verdict, held until an admin decides (SSH_CHECK_HOLD at a time)."""
        found = re.fullmatch(r"/machine/ssh/action/(\d{1,18})/to/(\d{1,18})", path)
        if not found:
            raise HttpError(404, "expected /machine/ssh/action/SRC_NODE_ID/to/DST_NODE_ID")
        coordinator = self.context.tailnet
        src_id, dst_id = int(found.group(1)), int(found.group(2))
        dst = coordinator.nodes.get(dst_id)
        if dst is None or dst.machine_key != self.machine_key:
            raise HttpError(403, "only the destination node may ask about an SSH session to it")
        if src_id not in coordinator.nodes:
            raise HttpError(404, f"no node {src_id}")
        query = parse_query(full_path.partition("?")[2][:1024])
        if not LOCAL_USER.fullmatch(query.get("local_user", "")):     # shown in the banner and the log
            raise HttpError(400, "local_user must be a login name")
        action = coordinator.ssh_checks.action(src_id, dst_id, query, now())
        if not isinstance(action, SSHCheck):
            return action
        if not await action.done.wait(SSH_CHECK_HOLD):       # still waiting: the client asks again
            return {"holdAndDelegate": coordinator.settings.control_url + full_path}
        if action.approved:
            return dict(SSH_ACCEPT)
        return {"reject": True, "message": "meshbox: an admin denied this SSH session (or nobody approved it "
                                           f"within {SSH_CHECK_TTL // 60} min)\n"}

    async def register(self, request):
        coordinator = self.context.tailnet
        try:
            result = coordinator.registrar.register(self.machine_key, request, self.source)
            if isinstance(result, AuthRequest):      # a follow-up: wait for approval
                await result.done.wait()
                result = result.result
            if result.get("MachineAuthorized"):
                self.context.metrics["registrations"] += 1
                self.proven()
            return result
        except RegistrationRefused as e:
            if e.reason != "too_many_attempts":     # the coordinator logged the lockout once
                log.warning("registration refused (%s) for %s from %s: %s", e.reason,
                            key_text("mkey", self.machine_key)[:16], self.peer, e)
            self.context.refusals[e.reason] = self.context.refusals.get(e.reason, 0) + 1
            return {"Error": str(e)}

    async def serve_map(self, stream_id, request):
        coordinator = self.context.tailnet
        try:
            node = coordinator.node_for_map(self.machine_key, request)
        except MapRefused as e:
            log.info("map refused for %s: %s", self.peer, e)
            raise HttpError(e.status, str(e)) from None
        self.proven()
        compress = request.get("Compress") == "zstd"

        def encode(message):
            frame = coordinator.fanout.frame(message, compress)
            self.context.metrics["map_messages"] += 1
            self.context.metrics["map_bytes"] += len(frame)
            return frame

        if not request.get("Stream"):
            if request.get("OmitPeers"):
                await self.reply(stream_id, 200, b"")
            else:
                message = map_response_for(node, coordinator.policy_views.view_of(node), coordinator.nodes, coordinator.users,
                                           coordinator.settings, now())
                self.respond(stream_id, 200)
                await self.send(stream_id, encode(message), end=True)
            return
        self.respond(stream_id, 200)
        session = coordinator.fanout.open_session(node)
        keepalive = request.get("KeepAlive", True)
        try:
            while not session.closed:
                session.wake.clear()
                message = coordinator.fanout.map_message(session)
                if message:
                    await self.send(stream_id, encode(message))
                    message = None       # not held while the session waits: a full map can be 600 KB
                if await session.wake.wait(KEEPALIVE_INTERVAL):
                    await asyncio.sleep(UPDATE_BATCH_DELAY)
                elif keepalive:
                    await self.send(stream_id, encode({"KeepAlive": True}))
            self.h2.end_stream(stream_id)
            self.flush()
        finally:
            coordinator.fanout.close_session(session)


# ---- Gateway plan ----
# Pure: what the box's WireGuard interface and nftables table should hold,
# computed from its compiled policy view.  The Gateway section applies it.

NFT_TABLE = "meshbox"
PERSISTENT_KEEPALIVE = 25


def gateway_peers(view, nodes, devices):
    """The box's WireGuard peers: public key -> (allowed IPs, endpoint or None)."""
    peers = {}
    for peer, seen_as in peers_in_view(view, nodes):
        endpoint = next((e for e in map(endpoint_pair, peer.endpoints) if e), None)
        peers[peer.node_key] = (tuple(sorted(seen_as["AllowedIPs"])), endpoint)
    for device in devices:
        peers[bytes(device["public_key"])] = ((f"{device['ipv4']}/32", f"{device['ipv6']}/128"), None)
    return peers


def _nft_addresses(items, version):
    """Tailscale address items (IP, CIDR, range, "*") of one family as nft set elements."""
    out = []
    for item in items:
        if item == "*":
            return ["*"]
        first = item.split("-")[0].split("/")[0]
        if ipaddress.ip_address(first).version == version:
            out.append(item)
    return out


def nft_filter_rules(filter_rules, ifname):
    """nftables rule bodies admitting, from the tailnet, what a PacketFilter allows."""
    out = []
    for rule in filter_rules or []:
        protocols = rule.get("IPProto") or TAILSCALE_DEFAULT_PROTOCOLS
        for version, family in ((4, "ip"), (6, "ip6")):
            sources = _nft_addresses(rule.get("SrcIPs", []), version)
            if not sources:
                continue
            for dst in rule.get("DstPorts") or []:
                dests = _nft_addresses([dst["IP"]], version)
                if not dests:
                    continue
                ports = dst.get("Ports") or {"First": 0, "Last": 65535}
                parts = [f'iifname "{ifname}"', f"meta nfproto ipv{version}"]
                if sources != ["*"]:
                    parts.append(f"{family} saddr {{ {', '.join(sources)} }}")
                if dests != ["*"]:
                    parts.append(f"{family} daddr {{ {', '.join(dests)} }}")
                parts.append(f"meta l4proto {{ {', '.join(str(p) for p in protocols)} }}")
                if (ports["First"], ports["Last"]) != (0, 65535):
                    port_text = str(ports["First"]) if ports["First"] == ports["Last"] else f"{ports['First']}-{ports['Last']}"
                    # Ports only mean something for TCP, UDP and SCTP.
                    parts[-1] = f"meta l4proto {{ {', '.join(str(p) for p in protocols if p in (6, 17, 132))} }}"
                    if parts[-1].endswith("{  }"):
                        continue
                    parts.append(f"th dport {port_text}")
                out.append(" ".join(parts) + " accept")
    return out


def nft_table(ifname, masquerade, acl_rules):
    """meshbox's whole nftables table: ACL on what enters from the tailnet,
    and masquerade of tailnet traffic leaving by another interface."""
    lines = [f"table inet {NFT_TABLE} {{",
             "  chain tailnet_in {",
             *[f"    {rule}" for rule in acl_rules],
             "    counter drop",
             "  }",
             "  chain input {",
             "    type filter hook input priority filter; policy accept;",
             f'    iifname "{ifname}" ct state established,related accept',
             f'    iifname "{ifname}" jump tailnet_in',
             "  }",
             "  chain forward {",
             "    type filter hook forward priority filter; policy accept;",
             f'    iifname "{ifname}" ct state established,related accept',
             f'    iifname "{ifname}" jump tailnet_in',
             "  }",
             "  chain postrouting {",
             "    type nat hook postrouting priority srcnat; policy accept;"]
    if masquerade:
        lines.append(f'    iifname "{ifname}" oifname != "{ifname}" masquerade')
    lines += ["  }", "}"]
    return "\n".join(lines) + "\n"


def wg_quick_config(private_key, address4, address6, box_public, endpoint, allowed_ips):
    """A plain WireGuard device's configuration, in wg-quick's format."""
    return "\n".join([
        "[Interface]",
        f"PrivateKey = {base64.b64encode(private_key).decode()}",
        f"Address = {address4}/32, {address6}/128",
        "",
        "[Peer]",
        f"PublicKey = {base64.b64encode(box_public).decode()}",
        f"AllowedIPs = {', '.join(allowed_ips)}",
        f"Endpoint = {endpoint}",
        f"PersistentKeepalive = {PERSISTENT_KEEPALIVE}",
        ""])


# ---- Gateway ----
# The box as a WireGuard peer of its own tailnet: one interface (kernel
# WireGuard through netlink, or a userspace implementation through its UAPI
# socket), its addresses and routes, forwarding, and the nftables table.
# Changes are applied as differences; nothing else on the system is touched.

UAPI_DIR = "/var/run/wireguard"
USERSPACE_WIREGUARD = ("wireguard-go", "boringtun-cli", "boringtun")


class GatewayError(MeshboxError):
    """The gateway cannot be set up; the message says what to install or fix."""


def _import_pyroute2():
    try:
        import pyroute2
    except ImportError:
        return None
    return pyroute2


def run_command(argv, what, input=None):
    """Run a system tool; GatewayError with its message on failure."""
    import subprocess
    try:
        result = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        raise GatewayError(f"{argv[0]} not found: install it ({what})") from None
    if result.returncode != 0:
        raise GatewayError(f"{' '.join(argv[:4])}: {result.stderr.strip() or 'failed'}")
    return result.stdout


class NetlinkLinks:
    """Links, addresses and routes over netlink (pyroute2)."""

    def __init__(self, pyroute2):
        self.ipr = pyroute2.IPRoute()

    def exists(self, ifname):
        return bool(self.ipr.link_lookup(ifname=ifname))

    def add_wireguard(self, ifname):
        try:
            self.ipr.link("add", ifname=ifname, kind="wireguard")
        except Exception as e:    # NetlinkError: no wireguard module
            raise GatewayError(f"cannot create a kernel WireGuard interface: {e}") from None

    def delete(self, ifname):
        index = self.ipr.link_lookup(ifname=ifname)
        if index:
            self.ipr.link("del", index=index[0])

    def add_address(self, ifname, address, prefixlen):
        """Add an address; False when the system refuses it (IPv6 disabled)."""
        try:
            self.ipr.addr("add", index=self.ipr.link_lookup(ifname=ifname)[0], address=address, prefixlen=prefixlen)
        except Exception as e:
            if "exists" not in str(e).lower():
                log.warning("gateway: cannot add %s to %s: %s", address, ifname, e)
                return False
        return True

    def up(self, ifname):
        self.ipr.link("set", index=self.ipr.link_lookup(ifname=ifname)[0], state="up")

    def route(self, prefix, ifname):
        net = ipaddress.ip_network(prefix)
        try:
            self.ipr.route("replace", dst=str(net.network_address), dst_len=net.prefixlen,
                           oif=self.ipr.link_lookup(ifname=ifname)[0],
                           family=socket.AF_INET if net.version == 4 else socket.AF_INET6)
        except Exception as e:
            raise GatewayError(f"cannot route {prefix} to {ifname}: {e}") from None

    def addresses(self):
        return [msg.get_attr("IFA_ADDRESS") for msg in self.ipr.get_addr()]

    def close(self):
        self.ipr.close()


class IpCommandLinks:
    """Links, addresses and routes through the ip command (routers without pyroute2)."""

    def exists(self, ifname):
        try:
            run_command(["ip", "link", "show", "dev", ifname], "iproute2")
            return True
        except GatewayError:
            return False

    def add_wireguard(self, ifname):
        try:
            run_command(["ip", "link", "add", "dev", ifname, "type", "wireguard"], "ip-full or iproute2")
        except GatewayError as e:
            raise GatewayError(f"cannot create a kernel WireGuard interface: {e}") from None

    def delete(self, ifname):
        if self.exists(ifname):
            run_command(["ip", "link", "del", "dev", ifname], "iproute2")

    def add_address(self, ifname, address, prefixlen):
        try:
            run_command(["ip", "addr", "add", f"{address}/{prefixlen}", "dev", ifname], "iproute2")
        except GatewayError as e:
            if "exists" not in str(e).lower():
                log.warning("gateway: cannot add %s to %s: %s", address, ifname, e)
                return False
        return True

    def up(self, ifname):
        run_command(["ip", "link", "set", "dev", ifname, "up"], "iproute2")

    def route(self, prefix, ifname):
        run_command(["ip", "route", "replace", prefix, "dev", ifname], "iproute2")

    def addresses(self):
        out = run_command(["ip", "-o", "addr", "show"], "iproute2")
        return [line.split()[3].split("/")[0] for line in out.splitlines() if len(line.split()) > 3]

    def close(self):
        pass


class NetlinkWireGuard:
    """Kernel WireGuard configured over netlink (pyroute2)."""

    name = "kernel"

    def __init__(self, ifname, links, pyroute2):
        self.ifname, self.links = ifname, links
        self.wg = pyroute2.WireGuard()

    def create(self):
        if not self.links.exists(self.ifname):
            self.links.add_wireguard(self.ifname)

    def configure(self, private_key, port):
        self.wg.set(self.ifname, private_key=base64.b64encode(private_key).decode(), listen_port=port)

    def set_peer(self, public_key, allowed_ips, endpoint):
        peer = {"public_key": base64.b64encode(public_key).decode(), "allowed_ips": list(allowed_ips),
                "replace_allowed_ips": True, "persistent_keepalive": PERSISTENT_KEEPALIVE}
        if endpoint:
            peer["endpoint_addr"], peer["endpoint_port"] = endpoint
        self.wg.set(self.ifname, peer=peer)

    def remove_peer(self, public_key):
        self.wg.set(self.ifname, peer={"public_key": base64.b64encode(public_key).decode(), "remove": True})

    def peer_stats(self):
        out = {}
        for msg in self.wg.info(self.ifname):
            for peer in msg.get_attr("WGDEVICE_A_PEERS") or []:
                key = base64.b64decode(peer.get_attr("WGPEER_A_PUBLIC_KEY"))
                handshake = peer.get_attr("WGPEER_A_LAST_HANDSHAKE_TIME") or {}
                endpoint = peer.get_attr("WGPEER_A_ENDPOINT") or {}
                out[key] = {"last_handshake": handshake.get("tv_sec") or None,
                            "rx_bytes": peer.get_attr("WGPEER_A_RX_BYTES") or 0,
                            "tx_bytes": peer.get_attr("WGPEER_A_TX_BYTES") or 0,
                            "endpoint": f"{endpoint['addr']}:{endpoint['port']}" if endpoint.get("addr") else None}
        return out

    def destroy(self):
        self.links.delete(self.ifname)
        self.wg.close()
        self.links.close()


class WgCommandWireGuard:
    """Kernel WireGuard configured with the wg command (routers without pyroute2)."""

    name = "kernel"

    def __init__(self, ifname, links):
        self.ifname, self.links = ifname, links

    def wg(self, *args, input=None):
        return run_command(["wg", *args], "wireguard-tools", input=input)

    def create(self):
        if not self.links.exists(self.ifname):
            self.links.add_wireguard(self.ifname)

    def configure(self, private_key, port):
        # The key goes through a pipe, never the command line.
        self.wg("set", self.ifname, "listen-port", str(port), "private-key", "/proc/self/fd/0",
                input=base64.b64encode(private_key).decode() + "\n")

    def set_peer(self, public_key, allowed_ips, endpoint):
        args = ["set", self.ifname, "peer", base64.b64encode(public_key).decode(),
                "persistent-keepalive", str(PERSISTENT_KEEPALIVE), "allowed-ips", ",".join(allowed_ips)]
        if endpoint:
            host, port = endpoint
            args += ["endpoint", f"{'[' + host + ']' if ':' in host else host}:{port}"]
        self.wg(*args)

    def remove_peer(self, public_key):
        self.wg("set", self.ifname, "peer", base64.b64encode(public_key).decode(), "remove")

    def peer_stats(self):
        out = {}
        for line in self.wg("show", self.ifname, "dump").splitlines()[1:]:
            fields = line.split("\t")
            if len(fields) >= 7:
                out[base64.b64decode(fields[0])] = {
                    "last_handshake": int(fields[4]) or None, "rx_bytes": int(fields[5]), "tx_bytes": int(fields[6]),
                    "endpoint": None if fields[2] == "(none)" else fields[2]}
        return out

    def destroy(self):
        self.links.delete(self.ifname)
        self.links.close()


class UserspaceWireGuard:
    """A userspace WireGuard (wireguard-go, boringtun) driven over its UAPI socket."""

    name = "userspace"

    def __init__(self, ifname, links, program):
        self.ifname, self.links, self.program = ifname, links, program
        self.process = None
        self.socket_path = os.path.join(UAPI_DIR, ifname + ".sock")

    def create(self):
        import subprocess
        if os.path.exists(self.socket_path):
            try:
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                    s.connect(self.socket_path)
            except OSError:
                os.unlink(self.socket_path)          # left by a process that died
            else:
                raise GatewayError(f"{self.ifname} is already run by another {self.program} ({self.socket_path})")
        env = dict(os.environ, WG_PROCESS_FOREGROUND="1")
        self.process = subprocess.Popen([self.program, "-f", self.ifname], env=env,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while not os.path.exists(self.socket_path):
            if self.process.poll() is not None or time.monotonic() > deadline:
                err = self.process.stderr.read().decode(errors="replace") if self.process.poll() is not None else ""
                raise GatewayError(f"{self.program} did not start: {err.strip() or 'no UAPI socket'}")
            time.sleep(0.05)

    def uapi(self, request):
        """One UAPI exchange; returns the response's key/value lines."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect(self.socket_path)
            s.sendall(request.encode() + b"\n")
            data = b""
            while not data.endswith(b"\n\n"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        lines = [line.split("=", 1) for line in data.decode().splitlines() if "=" in line]
        errno = next((v for k, v in lines if k == "errno"), "0")
        if errno != "0":
            raise GatewayError(f"{self.program} refused a setting (errno {errno})")
        return lines

    def configure(self, private_key, port):
        self.uapi(f"set=1\nprivate_key={private_key.hex()}\nlisten_port={port}\n")

    def set_peer(self, public_key, allowed_ips, endpoint):
        lines = ["set=1", f"public_key={public_key.hex()}", "replace_allowed_ips=true",
                 f"persistent_keepalive_interval={PERSISTENT_KEEPALIVE}"]
        lines += [f"allowed_ip={ip}" for ip in allowed_ips]
        if endpoint:
            host, port = endpoint
            lines.append(f"endpoint={'[' + host + ']' if ':' in host else host}:{port}")
        self.uapi("\n".join(lines) + "\n")

    def remove_peer(self, public_key):
        self.uapi(f"set=1\npublic_key={public_key.hex()}\nremove=true\n")

    def peer_stats(self):
        out, current = {}, None
        for key, value in self.uapi("get=1\n"):
            if key == "public_key":
                current = out[bytes.fromhex(value)] = {"last_handshake": None, "rx_bytes": 0, "tx_bytes": 0,
                                                       "endpoint": None}
            elif current is not None and key == "last_handshake_time_sec":
                current["last_handshake"] = int(value) or None
            elif current is not None and key in ("rx_bytes", "tx_bytes"):
                current[key] = int(value)
            elif current is not None and key == "endpoint":
                current["endpoint"] = value
        return out

    def destroy(self):
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except Exception:
                self.process.kill()
        self.links.delete(self.ifname)
        self.links.close()


def find_userspace_wireguard():
    import shutil
    return next((shutil.which(p) for p in USERSPACE_WIREGUARD if shutil.which(p)), None)


def kernel_has_wireguard():
    """Whether the running kernel has (or can load) WireGuard."""
    if os.path.exists("/sys/module/wireguard"):
        return True
    release = os.uname().release
    for root in ("/lib/modules", "/usr/lib/modules"):
        try:
            with open(os.path.join(root, release, "modules.dep")) as f:
                if "wireguard.ko" in f.read():
                    return True
        except OSError:
            pass
    return False


def open_links(tools="auto"):
    """Netlink through pyroute2 when it is there (or asked for), else the ip command."""
    pyroute2 = _import_pyroute2() if tools != "commands" else None
    if tools == "pyroute2" and pyroute2 is None:
        raise GatewayError("pyroute2 is not installed: pip install pyroute2, or use the ip and wg commands")
    return NetlinkLinks(pyroute2) if pyroute2 else IpCommandLinks()


def open_wireguard(ifname, backend="auto", tools="auto"):
    """The WireGuard backend to use, or GatewayError saying what to install."""
    links = open_links(tools)
    if backend in ("auto", "kernel") and (backend == "kernel" or kernel_has_wireguard()):
        if isinstance(links, NetlinkLinks):
            return NetlinkWireGuard(ifname, links, _import_pyroute2())
        return WgCommandWireGuard(ifname, links)
    program = find_userspace_wireguard()
    if backend in ("auto", "userspace") and program:
        return UserspaceWireGuard(ifname, links, program)
    links.close()
    raise GatewayError("no WireGuard here: the kernel has no wireguard module and no userspace WireGuard "
                       "is installed (OpenWrt: opkg install kmod-wireguard; Debian: apt install wireguard-go)")


def run_nft(script):
    """Feed a script to nft; it applies it atomically, or refuses it whole."""
    try:
        run_command(["nft", "-f", "-"], "nftables", input=script)
    except GatewayError as e:
        raise GatewayError(f"nft refused the rules: {e}") from None


def write_sysctl(name, value):
    with open("/proc/sys/" + name.replace(".", "/"), "w") as f:
        f.write(value)


class Gateway:
    """The box's WireGuard interface, routes and nftables table, kept in step with the tailnet.

    Its methods block (netlink, nft); the server runs them on one worker
    thread, since pyroute2's blocking API cannot run inside the event loop."""

    def __init__(self, config, private_key):
        self.config = config
        self.private_key = private_key
        self.public_key = x25519_public(private_key)
        self.wg = None
        self.applied_peers = {}
        self.applied_table = None

    @classmethod
    def remove_left_behind(cls, config):
        """Remove the interface and nftables table a server left (it was
        killed), as its stop would have: ``meshbox gateway down``."""
        gateway = cls(config, bytes(32))
        gateway.applied_table = ""        # whatever table is there goes
        try:
            gateway.wg = open_wireguard(config.wg_interface, config.wg_backend, config.netlink_tools)
        except GatewayError:
            links = open_links(config.netlink_tools)       # no WireGuard left to drive: remove the link alone
            links.delete(config.wg_interface)
            links.close()
        gateway.down()

    def local_endpoints(self, routes):
        """The box's own addresses inside the LAN routes it advertises, with the WireGuard port."""
        out = []
        nets = [ipaddress.ip_network(r) for r in routes]
        for text in self.wg.links.addresses():
            addr = ipaddress.ip_address(text)
            if any(addr in net for net in nets):
                out.append(f"{addr}:{self.config.wg_port}" if addr.version == 4 else f"[{addr}]:{self.config.wg_port}")
        return out

    def up(self, node):
        """Create and address the interface and install routes and the table."""
        config, ifname = self.config, self.config.wg_interface
        self.wg = open_wireguard(ifname, config.wg_backend, config.netlink_tools)
        try:
            self.wg.create()
            self.wg.configure(self.private_key, config.wg_port)
            links = self.wg.links
            ipv6 = os.path.exists("/proc/sys/net/ipv6/conf/all/forwarding")
            if ipv6:   # new links inherit disable_ipv6 from "default"; ours needs IPv6
                try:
                    write_sysctl(f"net.ipv6.conf.{ifname}.disable_ipv6", "0")
                except OSError:
                    pass
            if not links.add_address(ifname, node.ipv4, 32):
                raise GatewayError(f"cannot address {ifname} with {node.ipv4}")
            if ipv6 and not links.add_address(ifname, node.ipv6, 128):
                log.warning("gateway: no IPv6 on %s; serving IPv4 only", ifname)
                ipv6 = False
            links.up(ifname)
            for prefix in (config.prefix_v4, config.prefix_v6):
                if ipaddress.ip_network(prefix).version == 4 or ipv6:
                    links.route(prefix, ifname)
            write_sysctl("net.ipv4.ip_forward", "1")
            if ipv6:
                write_sysctl("net.ipv6.conf.all.forwarding", "1")
            self.apply_table([])
        except Exception:
            self.down()
            raise
        log.info("gateway up: %s (%s WireGuard, %s) port %d, %s %s", ifname, self.wg.name,
                 "netlink" if isinstance(self.wg.links, NetlinkLinks) else "ip/wg commands",
                 config.wg_port, node.ipv4, node.ipv6)

    def apply_table(self, acl_rules):
        """Replace meshbox's table in one nft transaction when its content changed."""
        table = nft_table(self.config.wg_interface, self.config.snat_subnet_routes, acl_rules)
        if table == self.applied_table:
            return
        # 'add' then 'delete' makes the delete safe when the table is absent;
        # nft applies the whole script atomically.
        run_nft(f"add table inet {NFT_TABLE}\ndelete table inet {NFT_TABLE}\n{table}")
        self.applied_table = table

    def apply(self, wanted, acl_rules):
        """Bring the peer list and the ACL to the plan, as differences."""
        if self.wg is None:        # already torn down
            return
        for key in [k for k in self.applied_peers if k not in wanted]:
            self.wg.remove_peer(key)
            del self.applied_peers[key]
        for key, (allowed_ips, endpoint) in wanted.items():
            old = self.applied_peers.get(key)
            if old is None or old[0] != allowed_ips or (endpoint and old[1] != endpoint):
                self.wg.set_peer(key, allowed_ips, endpoint if old is None or old[1] != endpoint else None)
                self.applied_peers[key] = (allowed_ips, endpoint)
        self.apply_table(acl_rules)

    def down(self):
        """Remove the interface (with its addresses and routes) and the table."""
        if self.applied_table is not None or self.wg is not None:
            try:
                run_nft(f"add table inet {NFT_TABLE}\ndelete table inet {NFT_TABLE}\n")
            except GatewayError as e:
                log.error("%s", e)
        if self.wg is not None:
            self.wg.destroy()
            self.wg = None
        self.applied_peers.clear()
        self.applied_table = None
        log.info("gateway down: %s removed", self.config.wg_interface)

class TailnetFollower:
    """What follows the tailnet outside the maps: the hosts file, DERP's
    refusal of clients that left, and the gateway's WireGuard peers and
    nftables rules.  One follow-up runs per burst of changes."""

    def __init__(self, config, store, coordinator, derp):
        self.config, self.store, self.coordinator, self.derp = config, store, coordinator, derp
        self.gateway = None          # the box's Gateway, once up
        self.gateway_routes = []     # the routes its configuration advertises
        self.gateway_thread = None   # the one worker thread the gateway's blocking calls run on
        self.pending = False         # a follow-up is scheduled
        self.tasks = []
        self.hosts_written = None

    async def in_gateway_thread(self, function, *args):
        return await asyncio.get_running_loop().run_in_executor(self.gateway_thread, function, *args)

    async def start_gateway(self):
        """Bring up the box's WireGuard node; on failure the coordinator runs on without it."""
        import concurrent.futures
        config, coordinator = self.config, self.coordinator
        self.gateway_thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="gateway")
        private_key = self.store.secret("wg_private", new_private_key)
        routes = config.gateway_routes()
        gateway = Gateway(config, private_key)
        hostname = socket.gethostname()
        try:
            node = coordinator.ensure_gateway_node(gateway.public_key, hostname, routes, list(config.public_endpoint))
            await self.in_gateway_thread(gateway.up, node)
            endpoints = list(config.public_endpoint) + await self.in_gateway_thread(gateway.local_endpoints, routes)
            coordinator.ensure_gateway_node(gateway.public_key, hostname, routes, endpoints)
        except (GatewayError, OSError, ValueError) as e:
            log.error("gateway not started: %s; the coordinator runs without it", e)
            await self.in_gateway_thread(gateway.down)
            return
        self.gateway = gateway
        self.gateway_routes = routes
        self.changed()

    async def wireguard_stats(self):
        """The gateway's handshake and byte counters by peer key ({} without a gateway)."""
        if self.gateway is None:
            return {}
        return await self.in_gateway_thread(self.gateway.wg.peer_stats)

    def changed(self):
        """Schedule one follow-up for a burst of changes."""
        if not self.pending:
            self.pending = True
            asyncio.get_running_loop().call_later(UPDATE_BATCH_DELAY,
                                                  lambda: self.tasks.append(asyncio.ensure_future(self.follow())))

    async def follow(self):
        self.tasks = [t for t in self.tasks if not t.done()]
        self.pending = False
        devices = self.store.devices()
        self.write_hosts_file(devices)
        if self.derp is not None:
            self.derp.close_refused()
        if self.gateway is not None:
            await self.sync_gateway(devices)

    def write_hosts_file(self, devices):
        """The tailnet's names for dnsmasq (addn-hosts/hostsdir) or any resolver; replaced atomically.
        A --hosts-file is 0644: the resolver runs as its own user (dnsmasq on OpenWrt)."""
        text = hosts_file_text(self.coordinator.nodes.values(), devices, self.config.base_domain)
        if text == self.hosts_written:
            return
        path = self.config.hosts_file or os.path.join(self.config.state_dir, "hosts")
        try:
            write_file_atomically(path, text.encode(), 0o644 if self.config.hosts_file else 0o600)
            self.hosts_written = text
        except OSError as e:
            log.error("cannot write hosts file %s: %s", path, e.strerror)

    async def sync_gateway(self, devices):
        coordinator = self.coordinator
        node = coordinator.gateway_node()
        if node is None:
            return
        # Devices are addresses behind the box: its routes carry them.
        routes = self.gateway_routes + [a for d in devices for a in (f"{d['ipv4']}/32", f"{d['ipv6']}/128")]
        if routes != node.approved_routes:
            coordinator.ensure_gateway_node(node.node_key, node.hostname, routes, node.endpoints)
        view = coordinator.policy_views.view_of(node)
        wanted = gateway_peers(view, coordinator.nodes, devices)
        acl = nft_filter_rules(view.packet_filter_rules, self.config.wg_interface)
        try:
            await self.in_gateway_thread(self.gateway.apply, wanted, acl)
        except (GatewayError, OSError) as e:
            log.error("gateway update failed: %s (will retry on the next change)", e)

    async def stop(self):
        """Cancel what is pending, then take the gateway down: no sync may
        follow the teardown (it would put the table back)."""
        for task in self.tasks:
            task.cancel()
        gateway, self.gateway = self.gateway, None
        if gateway is not None:
            await self.in_gateway_thread(gateway.down)


# ---- OIDC ----
# Interactive login through an OpenID provider (OpenID Connect Core 1.0,
# authorization code flow, with PKCE, RFC 7636).  A client's AuthURL sends
# the person to the provider; the provider sends them back to
# /oidc/callback with a code, which meshbox trades for an ID token at the
# token endpoint.  That token comes straight from the provider over TLS
# (certificate and host name checked), so its claims are read without
# checking its signature (Core 3.1.3.7, step 6): no RSA code is needed.
# Issuer, audience, authorized party, expiry and nonce are still checked.

OIDC_SCOPES = "openid email profile"
OIDC_CLOCK_SKEW = 120          # seconds the provider's clock may be ahead or behind
OIDC_HTTP_TIMEOUT = 10         # seconds for one request to the provider
OIDC_MAX_RESPONSE = 1 << 20    # bytes of one answer from the provider
OIDC_MAX_PENDING = 1000        # sign-ins in flight; the oldest give way
OIDC_PENDING_PER_LOGIN = 3     # sign-ins in flight for one login request: reloading its page
                               # pushes out its own oldest, never another's (3 x 256 < 1000)
OIDC_METADATA_TTL = 3600       # seconds the discovery document is kept


class OidcError(MeshboxError):
    """A sign-in that failed; the message says why, for the person signing in."""


def form_encode(fields):
    """A dict as ``a=1&b=2``, for a URL's query or a form body."""
    return "&".join(f"{percent_encode(k)}={percent_encode(v)}" for k, v in fields.items())


def base64url(raw):
    """Unpadded base64url text, as JWTs and PKCE use."""
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def pkce_pair():
    """A PKCE code verifier and its S256 code challenge."""
    verifier = secrets.token_urlsafe(48)
    return verifier, base64url(hashlib.sha256(verifier.encode()).digest())


def split_https_url(url):
    """``https://host[:port]/path?query`` into (host, port, Host header, request target)."""
    match = re.fullmatch(r"https://([^/?#@]+)([^#]*)(#.*)?", url) if isinstance(url, str) else None
    if not match:
        raise OidcError(f"the identity provider gave a URL that is not https://: {str(url)[:100]!r}")
    if not match[1].isascii():
        raise OidcError(f"write the identity provider's host name in its ASCII (xn--) form: {match[1]!r}")
    try:
        host, port = parse_host_port(match[1], 443)
    except ValueError as e:
        raise OidcError(f"the identity provider gave a bad URL: {e}") from None
    target = match[2] if match[2].startswith("/") else "/" + match[2]
    return host, port, match[1], target


async def _https_exchange(context, host, port, request):
    # The name as bytes: ssl would encode a str with the idna codec, which
    # needs unicodedata, a package OpenWrt's python3-light leaves out.
    reader, writer = await asyncio.open_connection(host, port, ssl=context, server_hostname=host.encode())
    try:
        writer.write(request)
        data = b""
        while len(data) <= OIDC_MAX_RESPONSE:
            chunk = await reader.read(65536)
            if not chunk:
                return data
            data += chunk
        raise OidcError(f"the identity provider's answer is larger than {OIDC_MAX_RESPONSE} bytes")
    finally:
        writer.close()


async def https_json(context, url, form=None, headers=()):
    """GET an https:// URL, or POST `form` to it; (status, the JSON object answered)."""
    host, port, host_header, target = split_https_url(url)
    body = form_encode(form).encode() if form is not None else b""
    headers = [("Accept", "application/json"), *headers]
    if form is not None:
        headers.append(("Content-Type", "application/x-www-form-urlencoded"))
    request = http_request_bytes("GET" if form is None else "POST", target, host_header, headers, body)
    try:
        data = await asyncio.wait_for(_https_exchange(context, host, port, request), OIDC_HTTP_TIMEOUT)
    except ssl.SSLCertVerificationError as e:
        raise OidcError(f"the identity provider at {host_header} has a certificate meshbox does not trust "
                        f"({e.verify_message}); set oidc_ca_file to its CA") from None
    except (OSError, asyncio.TimeoutError) as e:
        raise OidcError(f"cannot reach the identity provider at {host_header}: {e or 'timed out'}") from None
    try:
        status, payload = parse_http_answer(data)
        answer = parse_json(payload)
    except ValueError:
        raise OidcError(f"the identity provider at {host_header} answered {url} with something that is not JSON") \
            from None
    if not isinstance(answer, dict):
        raise OidcError(f"the identity provider at {host_header} answered {url} with JSON that is not an object")
    return status, answer


def id_token_claims(token):
    """The claims of a JWT (its middle part, base64url JSON), unverified."""
    parts = token.split(".") if isinstance(token, str) else ()
    try:
        if len(parts) != 3:
            raise InvalidInput("not three parts")
        claims = parse_json(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (ValueError, binascii.Error):
        raise OidcError("the identity provider sent an ID token that is not a JWT") from None
    if not isinstance(claims, dict):
        raise OidcError("the identity provider sent an ID token whose claims are not a JSON object")
    return claims


def check_id_token(claims, issuer, client_id, nonce, at):
    """Refuse an ID token that is not for this sign-in (Core 3.1.3.7)."""
    if claims.get("iss") != issuer:
        raise OidcError(f"the ID token was issued by {claims.get('iss')!r}, not by the configured issuer {issuer}")
    audience = claims.get("aud")
    audience = [audience] if isinstance(audience, str) else audience if isinstance(audience, list) else []
    if client_id not in audience:
        raise OidcError(f"the ID token is meant for another client ({', '.join(map(str, audience)) or 'none'}), "
                        f"not for this meshbox ({client_id})")
    if (len(audience) > 1 or "azp" in claims) and claims.get("azp") != client_id:
        raise OidcError(f"the ID token was handed to another client ({claims.get('azp')!r}), not to {client_id}")
    expiry = claims.get("exp")
    if not isinstance(expiry, (int, float)) or isinstance(expiry, bool) or expiry + OIDC_CLOCK_SKEW < at:
        raise OidcError("the ID token has expired (are the clocks of meshbox and the identity provider right?)")
    if not isinstance(claims.get("nonce"), str) or not hmac.compare_digest(claims["nonce"].encode(), nonce.encode()):
        raise OidcError("the ID token belongs to another sign-in (its nonce does not match): start again")
    if not isinstance(claims.get("sub"), str) or not claims["sub"]:
        raise OidcError("the ID token names no subject")


def oidc_subject_name(sub, issuer):
    """A user name for a subject: ``sub@issuer-host``.  The subject is the
    one claim the provider keeps unique and stable (Core 2); one that cannot
    be a user name (too long, a space, a control character or an @) is
    replaced by a hash of it."""
    host = split_https_url(issuer)[2][:42]
    if len(sub) + 1 + len(host) > 63 or "@" in sub or " " in sub or not sub.isprintable():
        sub = hashlib.sha256(sub.encode()).hexdigest()[:20]
    return f"{sub}@{host}"


def oidc_identity(claims, issuer):
    """The person the provider vouches for: meshbox user name, display name, email and groups.
    The user name is the email address when the provider says it verified
    it, else the subject at the issuer: never preferred_username, which
    people choose themselves and which need not be unique."""
    email = claims.get("email") if claims.get("email_verified") is True else None
    email = email if isinstance(email, str) and "@" in email else ""
    groups = claims.get("groups")
    groups = [groups] if isinstance(groups, str) else groups if isinstance(groups, list) else []
    name = email or oidc_subject_name(claims["sub"], issuer)
    display = claims.get("name") if isinstance(claims.get("name"), str) and claims.get("name") else name
    return {"name": name, "display_name": display, "email": email, "groups": [g for g in groups if isinstance(g, str)]}


def check_allowed(identity, domains, users, groups):
    """Apply the allowed domains, users and groups.  A person passes the first
    two when either lists them (or both are empty); when groups are set,
    they must also be in one of them."""
    name = identity["name"]
    domain = identity["email"].rpartition("@")[2].lower()
    in_domain = bool(domain) and domain in {d.lower().lstrip("@") for d in domains}
    if (domains or users) and not in_domain and name.lower() not in {u.lower() for u in users}:
        raise OidcError(f"{name} may not sign in to this meshbox: neither the user nor the email domain "
                        f"is allowed (ask an administrator)")
    if groups and not set(groups) & set(identity["groups"]):
        raise OidcError(f"{name} may not sign in to this meshbox: not in any allowed group ({', '.join(groups)})")


class OidcLogin:
    """Sign-ins through one OpenID provider: the way there and the way back."""

    def __init__(self, config):
        if ssl is None:
            raise InvalidInput("OIDC needs TLS but this Python has no ssl module (OpenWrt: opkg install python3-openssl)")
        self.issuer = config.oidc_issuer
        self.client_id = config.oidc_client_id
        self.client_secret = config.oidc_client_secret
        self.allowed = (list(config.oidc_allowed_domains), list(config.oidc_allowed_users),
                        list(config.oidc_allowed_groups))
        self.redirect_uri = config.public_url() + "/oidc/callback"
        try:
            self.context = ssl.create_default_context(cafile=config.oidc_ca_file or None)
        except OSError as e:
            raise InvalidInput(f"cannot load oidc_ca_file {config.oidc_ca_file}: {e}") from None
        self.metadata, self.metadata_at = None, 0
        self.pending = {}   # state -> (login request id, nonce, PKCE verifier, created)

    async def provider_metadata(self):
        """The provider's discovery document, fetched again after an hour."""
        if self.metadata and self.metadata_at + OIDC_METADATA_TTL > now():
            return self.metadata
        url = self.issuer.rstrip("/") + "/.well-known/openid-configuration"
        status, metadata = await https_json(self.context, url)
        if status != 200:
            raise OidcError(f"the identity provider's discovery document {url} is unavailable (HTTP {status})")
        if str(metadata.get("issuer", "")).rstrip("/") != self.issuer.rstrip("/"):
            raise OidcError(f"the identity provider calls itself {metadata.get('issuer')!r}, "
                            f"not the configured issuer {self.issuer}")
        for name in ("authorization_endpoint", "token_endpoint"):
            split_https_url(metadata.get(name))
        self.metadata, self.metadata_at = metadata, now()
        return metadata

    async def authorization_url(self, request_id):
        """Where to send the person who opened login request `request_id`."""
        metadata = await self.provider_metadata()
        at = now()
        for state in [s for s, p in self.pending.items() if p[3] + AUTH_REQUEST_TTL <= at]:
            del self.pending[state]
        same_login = [s for s, p in self.pending.items() if p[0] == request_id]
        for state in same_login[:len(same_login) - OIDC_PENDING_PER_LOGIN + 1]:
            del self.pending[state]
        while len(self.pending) >= OIDC_MAX_PENDING:
            del self.pending[next(iter(self.pending))]
        state, nonce = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
        verifier, challenge = pkce_pair()
        self.pending[state] = (request_id, nonce, verifier, at)
        scope = OIDC_SCOPES + (" groups" if self.allowed[2] else "")
        query = form_encode({"response_type": "code", "client_id": self.client_id, "redirect_uri": self.redirect_uri,
                             "scope": scope, "state": state, "nonce": nonce, "code_challenge": challenge,
                             "code_challenge_method": "S256"})
        endpoint = metadata["authorization_endpoint"]
        return endpoint + ("&" if "?" in endpoint else "?") + query

    async def finish(self, query):
        """The provider's answer at /oidc/callback: (login request id, identity), or OidcError."""
        pending = self.pending.pop(str(query.get("state", "")), None)
        if pending is None or pending[3] + AUTH_REQUEST_TTL <= now():
            raise OidcError("this sign-in is unknown, was already used or has expired: start again from the device")
        request_id, nonce, verifier, _ = pending
        if "error" in query:
            raise OidcError(f"the identity provider refused the sign-in: {query['error']} "
                            f"{query.get('error_description', '')}".strip())
        metadata = await self.provider_metadata()
        if "iss" in query and query["iss"] != metadata["issuer"]:   # RFC 9207: a mix-up of providers
            raise OidcError(f"the answer came from {query['iss']!r}, not from the configured issuer {self.issuer}")
        if not query.get("code"):
            raise OidcError("the identity provider sent no authorization code")
        tokens = await self.redeem(metadata, query["code"], verifier)
        claims = id_token_claims(tokens["id_token"])
        check_id_token(claims, metadata["issuer"], self.client_id, nonce, now())
        if metadata.get("userinfo_endpoint") and isinstance(tokens.get("access_token"), str):
            # Many providers put email, name and groups only here.
            status, info = await https_json(self.context, metadata["userinfo_endpoint"],
                                            headers=[("Authorization", "Bearer " + tokens["access_token"])])
            if status != 200 or info.get("sub") != claims["sub"]:
                raise OidcError(f"the identity provider's user info does not match the ID token (HTTP {status})")
            claims = {**info, **claims}
        identity = oidc_identity(claims, metadata["issuer"])
        check_allowed(identity, *self.allowed)
        return request_id, identity

    async def redeem(self, metadata, code, verifier):
        """Trade the authorization code for tokens, authenticating as the client."""
        form = {"grant_type": "authorization_code", "code": code, "redirect_uri": self.redirect_uri,
                "code_verifier": verifier}
        headers = []
        methods = metadata.get("token_endpoint_auth_methods_supported") or ["client_secret_basic"]
        if self.client_secret and "client_secret_basic" in methods:
            credentials = f"{percent_encode(self.client_id)}:{percent_encode(self.client_secret)}"
            headers.append(("Authorization", "Basic " + base64.b64encode(credentials.encode()).decode()))
        else:
            form["client_id"] = self.client_id
            if self.client_secret:
                form["client_secret"] = self.client_secret
        status, tokens = await https_json(self.context, metadata["token_endpoint"], form, headers)
        if status != 200 or not isinstance(tokens.get("id_token"), str):
            reason = " ".join(str(tokens.get(k, "")) for k in ("error", "error_description")).strip() or "no ID token"
            raise OidcError(f"the identity provider did not accept the sign-in (HTTP {status}: {reason})")
        return tokens


# ---- Admin ----
# The administrative verbs, one method each, data in and data out.  The CLI
# runs them on the state folder (or, while serve runs, inside the server over
# its local socket, so that live fields, netmaps and logs are at hand); the
# HTTP API runs them inside the server for remote callers.

API_KEY_PREFIX = "msapi-"
OAUTH_SECRET_PREFIX = "msoauth-"
# API v2's OAuth scopes that map onto meshbox; ":read" ones allow GET only.
OAUTH_SCOPES = tuple(f"{area}{mode}" for area in ("all", "devices:core", "devices:routes", "auth_keys", "policy_file",
                                                  "dns", "users", "feature_settings") for mode in ("", ":read"))
ADMIN_NOUNS = ("users", "preauthkeys", "nodes", "routes", "devices", "policy", "dns", "apikeys", "oauthclients",
               "status", "netmap", "logs", "ssh", "paths")


def parse_tag_list(text):
    """'tag:a, tag:b' as a list, each checked."""
    tags = [t.strip() for t in (text or "").split(",") if t.strip()]
    for tag in tags:
        if not TAG_NAME.match(tag):
            raise InvalidInput(f"bad tag {tag!r}: tags look like tag:name")
    return tags


def checked_params(method, params, command):
    """params, if method takes them as keywords: a caller's misspelt or missing
    argument is their error, while a TypeError inside the verb stays a bug."""
    code = method.__code__
    names = code.co_varnames[1:code.co_argcount]          # after self
    required = names[:len(names) - len(method.__defaults__ or ())]
    unknown = sorted(set(params) - set(names))
    missing = [n for n in required if n not in params]
    if unknown or missing:
        raise InvalidInput(f"bad arguments for {command}: " + "; ".join(
            ([f"unknown {', '.join(unknown)}"] if unknown else []) + ([f"missing {', '.join(missing)}"] if missing else [])))
    return params


class Admin:
    """The verbs of the CLI and the API over one store (and, in serve, the live server)."""

    def __init__(self, store, config, server=None):
        self.store, self.config, self.server = store, config, server
        self._offline_tailnet = None

    @property
    def tailnet(self):
        """The Coordinator every change goes through: the running server's, or
        (the offline CLI) one over the store, without sessions."""
        if self.server is not None:
            return self.server.coordinator
        if self._offline_tailnet is None:
            tailnet = Coordinator(self.store, MapSettings(self.config.base_domain, {"Regions": {}}, {}),
                                  self.config.prefix_v4, self.config.prefix_v6)
            if tailnet.policy_views.refused:
                log.warning("the stored policy is refused: %s; serve will not start until policy set or "
                            "policy clear replaces it", tailnet.policy_views.refused)
            if self.config.policy_file:            # as serve would: the file's policy is in force
                try:
                    tailnet.policy_views.set_policy(read_text_file(self.config.policy_file, "policy file"))
                except InvalidInput as e:          # serve keeps the stored policy then, and says so
                    log.warning("policy file %s refused, the stored policy stays in force: %s",
                                self.config.policy_file, e)
            self._offline_tailnet = tailnet
        return self._offline_tailnet

    def call(self, noun, verb, params):
        """Run `noun verb` with keyword params; InvalidInput for anything unknown or wrong."""
        method = getattr(self, f"{noun}_{verb}" if verb else noun, None)
        if noun not in ADMIN_NOUNS or method is None:
            raise InvalidInput(f"unknown command {noun} {verb or ''}".strip())
        return method(**checked_params(method, params, f"{noun} {verb or ''}".strip()))

    def _nodes(self):
        """The nodes as the running server holds them, with the fields it
        writes to disk only once a minute (host info, routes a client
        advertises, disco key, endpoints) current; else as stored."""
        if self.server is None:
            return self.store.nodes()
        self.tailnet.reload_if_changed()     # edits another process just committed
        return sorted(self.tailnet.nodes.values(), key=lambda n: n.id)

    def _node(self, ident):
        for n in self._nodes():
            if str(n.id) == str(ident) or n.given_name == ident:
                return n
        raise InvalidInput(f"no node {ident!r} (see: nodes list)")

    # users
    def users_list(self):
        return [{"id": u.id, "name": u.name, "created": rfc3339(u.created)} for u in self.store.users()]

    def users_create(self, name):
        user = self.tailnet.apply(UserAddition(name))
        return {"id": user.id, "name": user.name, "message": f"created user {user.name} (id {user.id})"}

    def users_delete(self, name):
        self.tailnet.apply(UserRemoval(name))
        return {"message": f"deleted user {name}"}

    # pre-auth keys
    def preauthkeys_list(self):
        at = now()
        return [{"id": k["id"], "key": k["prefix"] + "…", "user": k["user"], "reusable": bool(k["reusable"]),
                 "ephemeral": bool(k["ephemeral"]), "used": k["used"], "tags": json.loads(k["tags"]),
                 "created": rfc3339(k["created"]), "expiration": rfc3339(k["expiration"]),
                 "valid": key_in_force(k, at) and bool(k["reusable"] or not k["used"])} for k in self.store.preauth_keys()]

    def preauthkeys_create(self, user, reusable=False, ephemeral=False, expiration="1h", tags=""):
        owner = self.store.user_named(user)
        tag_list = parse_tag_list(tags)
        expires = now() + parse_duration(expiration)
        secret = self.store.create_preauth_key(owner.id, reusable, ephemeral, expires, tag_list)
        return {"key": secret, "user": owner.name, "reusable": reusable, "ephemeral": ephemeral,
                "expiration": rfc3339(expires), "tags": tag_list}

    def preauthkeys_expire(self, key):
        self.store.expire_preauth_key(key)
        return {"message": "pre-auth key expired"}

    # nodes
    def nodes_list(self):
        users = {u.id: u.name for u in self.store.users()}
        stats = self.server.wireguard_stats if self.server else {}
        at = now()
        return [{"id": n.id, "name": n.given_name, "hostname": n.hostname, "user": users.get(n.user_id),
                 "ipv4": n.ipv4, "ipv6": n.ipv6, "online": n.online, "last_seen": rfc3339(n.last_seen),
                 "endpoints": n.endpoints, "derp_home": home_derp(n), "tags": n.tags,
                 "ephemeral": n.ephemeral, "expiry": rfc3339(n.expiry), "created": rfc3339(n.created),
                 "expired": is_expired(n, at), "kind": n.kind, "approved_routes": n.approved_routes,
                 "advertised_routes": list(n.hostinfo.get("RoutableIPs") or []),
                 "os": n.hostinfo.get("OS", ""), "wireguard": stats.get(n.node_key), "network": network_fields(n)}
                for n in self._nodes()]

    def nodes_show(self, id):
        node = self._node(id)
        row = next(r for r in self.nodes_list() if r["id"] == node.id)
        live = self.server.coordinator.nodes.get(node.id) if self.server else None
        row.update(machine_key=key_text("mkey", node.machine_key), node_key=key_text("nodekey", node.node_key),
                   disco_key=key_text("discokey", node.disco_key) if node.disco_key else None,
                   hostinfo=(live or node).hostinfo)
        return row

    def _update_node(self, node, message, **fields):
        self.tailnet.apply(NodeEdit(node.id, fields))
        return {"message": message}

    def nodes_delete(self, id):
        node = self._node(id)
        self.tailnet.apply(NodeRemoval(node.id))
        return {"message": f"deleted node {node.id} {node.given_name}"}

    def nodes_expire(self, id):
        node = self._node(id)
        return self._update_node(node, f"expired node {node.id} {node.given_name}: it must log in again", expiry=now())

    def nodes_expiry(self, switch, id):
        node = self._node(id)
        if switch != "disable":
            raise InvalidInput("use: nodes expiry disable ID")
        return self._update_node(node, f"node {node.id} {node.given_name}'s key no longer expires", expiry=None)

    def nodes_tag(self, id, tags):
        node = self._node(id)
        tag_list = parse_tag_list(tags)
        return self._update_node(node, f"node {node.id} {node.given_name} tags: {', '.join(tag_list) or 'none'}",
                                 tags=tag_list)

    def nodes_rename(self, id, name):
        node = self._node(id)
        clean = sanitize_hostname(name)
        if clean != name:
            raise InvalidInput(f"bad name {name!r}: use a DNS label such as {clean!r}")
        if any(n.given_name == name and n.id != node.id for n in self._nodes()):
            raise InvalidInput(f"name {name!r} is taken by another node")
        return self._update_node(node, f"renamed node {node.id} to {name}", given_name=name)

    def nodes_pending(self):
        """The login requests waiting for an admin (they live in the running server's memory)."""
        if self.server is None:
            return []
        return [{"key": r.id, "hostname": r.hostname, "requested_tags": r.requested_tags, "created": rfc3339(r.created)}
                for r in self.server.coordinator.registrar.auth_requests.values() if not r.done.flag]

    def nodes_register(self, user, key):
        owner = self.store.user_named(user)
        if self.server is None:          # login requests wait in the server's memory
            raise InvalidInput(f"no login request {key!r} is waiting: meshbox serve is not running")
        result = self.server.coordinator.registrar.approve(key, owner.id)
        if "Error" in result:
            raise InvalidInput(result["Error"])
        return {"message": f"approved: the device joins as {owner.name}"}

    # SSH check mode
    def _ssh_decide(self, check_id, approve):
        if self.server is None:          # held sessions wait in the server's memory
            raise InvalidInput(f"no SSH check {check_id!r} is waiting: meshbox serve is not running")
        check = self.server.coordinator.ssh_checks.decide(check_id, approve)
        nodes = self.server.coordinator.nodes
        return {"message": f"{'approved' if approve else 'denied'}: SSH from {nodes[check.src_id].given_name} to "
                           f"{nodes[check.dst_id].given_name} as {check.local_user or '?'}"}

    def ssh_checks(self):
        if self.server is None:
            return []
        nodes = self.server.coordinator.nodes
        return [{"id": c.id, "from": nodes[c.src_id].given_name, "to": nodes[c.dst_id].given_name,
                 "user": c.local_user, "since": rfc3339(c.created)}
                for c in self.server.coordinator.ssh_checks.waiting.values() if c.src_id in nodes and c.dst_id in nodes]

    def ssh_approve(self, id):
        return self._ssh_decide(id, True)

    def ssh_deny(self, id):
        return self._ssh_decide(id, False)

    # routes
    def routes_list(self):
        """Each advertised or approved route, from the compiled views the maps are made of."""
        tailnet = self.tailnet
        nodes = self._nodes()
        topology, primary = tailnet.policy_views.topology(), tailnet.policy_views.primary_routes()
        rows = []
        for n in nodes:
            advertised = list(n.hostinfo.get("RoutableIPs") or [])
            auto = set(auto_approved_routes(tailnet.policy_views.policy, topology, n.id)) - set(n.approved_routes)
            for prefix in sorted(set(advertised) | set(n.approved_routes)):
                rows.append({"node_id": n.id, "node": n.given_name, "prefix": prefix,
                             "advertised": prefix in advertised, "approved": prefix in n.approved_routes or
                             prefix in auto, "auto_approved": prefix in auto,
                             "primary": prefix in primary.get(n.id, ())})
        return rows

    def _route_change(self, node, prefix, approve):
        node = self._node(node)
        try:
            prefix = str(ipaddress.ip_network(prefix, strict=True))
        except ValueError as e:
            raise InvalidInput(f"bad prefix {prefix!r}: {e}") from None
        if node.kind == NODE_GATEWAY:
            raise InvalidInput("the gateway's routes come from its configuration (--advertise-routes)")
        approved = [r for r in node.approved_routes if r != prefix]
        if approve:
            if prefix not in (node.hostinfo.get("RoutableIPs") or []):
                raise InvalidInput(f"node {node.given_name} does not advertise {prefix}")
            approved.append(prefix)
        elif prefix not in node.approved_routes:
            raise InvalidInput(f"{prefix} is not approved for {node.given_name}")
        return self._update_node(node, f"{'approved' if approve else 'unapproved'} {prefix} for {node.given_name}",
                                 approved_routes=approved)

    def routes_approve(self, node, prefix):
        return self._route_change(node, prefix, True)

    def routes_unapprove(self, node, prefix):
        return self._route_change(node, prefix, False)

    # plain WireGuard devices
    def devices_list(self):
        return [{"id": d["id"], "name": d["name"], "user": d["user"], "ipv4": d["ipv4"], "ipv6": d["ipv6"],
                 "full_tunnel": bool(d["full_tunnel"]), "public_key": base64.b64encode(d["public_key"]).decode(),
                 "created": rfc3339(d["created"])} for d in self.store.devices()]

    def devices_add(self, name, user=GATEWAY_USER, full_tunnel=False):
        box = next((n for n in self.store.nodes() if n.kind == NODE_GATEWAY), None)
        if box is None:
            raise InvalidInput("no gateway yet: run 'meshbox serve --gateway ...' once first")
        if not box.endpoints:
            raise InvalidInput("the gateway has no endpoint devices can reach: set --public-endpoint IP:PORT")
        clean = sanitize_hostname(name)
        if clean != name:
            raise InvalidInput(f"bad device name {name!r}: use a DNS label such as {clean!r}")
        owner = self.store.user_named(user)       # the gateway's owner exists with the gateway
        private = new_private_key()
        tailnet = [self.config.prefix_v4, self.config.prefix_v6]
        ipv4, ipv6 = self.tailnet.apply(DeviceAddition(name, owner.id, x25519_public(private), bool(full_tunnel)))
        if full_tunnel:
            allowed = list(EXIT_ROUTES)
        else:
            nets = [ipaddress.ip_network(p) for p in tailnet]
            lan = [r for r in box.approved_routes if r not in EXIT_ROUTES and not any(
                ipaddress.ip_network(r).version == n.version and ipaddress.ip_network(r).subnet_of(n) for n in nets)]
            allowed = tailnet + lan
        return {"name": name, "ipv4": ipv4, "ipv6": ipv6,
                "config": wg_quick_config(private, ipv4, ipv6, box.node_key, box.endpoints[0], allowed)}

    def devices_remove(self, name):
        self.tailnet.apply(DeviceRemoval(name))
        return {"message": f"removed device {name}"}

    # policy
    def _topology(self):
        return self.tailnet.policy_views.topology()

    def _checked(self, policy, topology):
        try:
            parsed = parse_policy(policy)
            check_policy_tests(parsed, topology)
        except PolicyError as e:
            raise InvalidInput(f"policy refused: {e}") from None
        return parsed

    def policy_get(self):
        return {"policy": self.store.setting("policy")}

    def policy_check(self, policy):
        self._checked(policy, self._topology())
        return {"message": "policy is valid"}

    def policy_set(self, policy):
        self.tailnet.apply(PolicyChange(policy, self._checked(policy, self._topology())))
        return {"message": "policy set; a running server applies it within a second"}

    def policy_clear(self):
        self.tailnet.apply(PolicyChange(None, None))
        return {"message": "policy cleared: every node may reach every other"}

    def policy_compile(self, policy, topology):
        compiled = compile_policy(self._checked(policy, topology), topology)
        return {name: {"packet_filter_rules": view.packet_filter_rules, "peers": peers_dict(view.peers),
                       "ssh_rules": view.ssh_rules} for name, view in compiled.items()}

    # DNS
    def dns_get(self):
        return dns_settings(self.store, self.config)

    def dns_set(self, nameservers=None, search_domains=None, split_dns=None, magic_dns=None):
        """Change the tailnet's DNS settings (None: leave as is); a running server sends them at once."""
        settings = self.dns_get()
        if nameservers is not None:
            settings["nameservers"] = checked_nameservers(nameservers, "nameservers")
        if search_domains is not None:
            settings["search_domains"] = [checked_domain(d) for d in bounded_list(search_domains, "search domains")]
        if split_dns is not None:
            if not isinstance(split_dns, dict) or len(split_dns) > MAX_DNS_ENTRIES:
                raise InvalidInput(f"split DNS must map at most {MAX_DNS_ENTRIES} domains to lists of resolvers")
            settings["split_dns"] = {checked_domain(d): checked_nameservers(ns, f"resolvers of {d}")
                                     for d, ns in split_dns.items()}
        if magic_dns is not None:
            if not isinstance(magic_dns, bool):
                raise InvalidInput("magic_dns is true or false")
            settings["magic_dns"] = magic_dns
        self.tailnet.apply(DnsChange(settings, tailnet_dns_config(self.config, settings)))
        return dict(settings, message="DNS settings saved")

    # API keys
    def apikeys_list(self):
        at = now()
        return [{"id": r["id"], "prefix": r["prefix"] + "…", "created": rfc3339(r["created"]),
                 "expiration": rfc3339(r["expiration"]), "valid": key_in_force(r, at)} for r in self.store.api_keys()]

    def apikeys_create(self, expiration="90d"):
        secret = API_KEY_PREFIX + secrets.token_hex(24)
        expires = now() + parse_duration(expiration)
        self.store.create_api_key(secret, expires)
        return {"key": secret, "expiration": rfc3339(expires)}

    def apikeys_expire(self, prefix):
        if not self.store.revoke_api_key(prefix):
            raise InvalidInput(f"no single API key matches {prefix!r}")
        return {"message": "API key expired"}

    # OAuth clients: API v2's client credentials, each with its scopes
    def oauthclients_list(self):
        at = now()
        return [{"id": r["id"], "client_id": r["client_id"], "scopes": r["scopes"], "created": rfc3339(r["created"]),
                 "expiration": rfc3339(r["expiration"]), "valid": key_in_force(r, at)}
                for r in self.store.oauth_clients()]

    def oauthclients_create(self, scopes="all", expiration="365d"):
        scope_list = sorted(set(scopes.replace(",", " ").split()))
        unknown = [s for s in scope_list if s not in OAUTH_SCOPES]
        if unknown or not scope_list:
            raise InvalidInput(f"unknown scope {' '.join(unknown)[:64]!r}: use {', '.join(OAUTH_SCOPES)}")
        client_id, secret = "msoc" + secrets.token_hex(8), OAUTH_SECRET_PREFIX + secrets.token_hex(24)
        expires = now() + parse_duration(expiration)
        self.store.create_oauth_client(client_id, secret, scope_list, expires)
        return {"client_id": client_id, "client_secret": secret, "scopes": scope_list, "expiration": rfc3339(expires)}

    def oauthclients_expire(self, client_id):
        if not self.store.revoke_oauth_client(client_id):
            raise InvalidInput(f"no OAuth client {client_id!r}")
        return {"message": f"OAuth client {client_id} revoked; its access tokens stop working"}

    # the running server's view
    def status(self):
        server = self.server
        return {"server_running": server is not None, "nodes": self.nodes_list(),
                "derp": server.derp.stats() if server and server.derp else {},
                "refusals": dict(server.refusals) if server else {}}

    def netmap(self, id):
        if self.server is None:
            raise InvalidInput("netmap needs the running server (meshbox serve)")
        coordinator = self.server.coordinator
        node = coordinator.nodes.get(self._node(id).id)
        return map_response_for(node, coordinator.policy_views.view_of(node), coordinator.nodes, coordinator.users,
                                coordinator.settings, now())

    def paths(self):
        """The pairs of nodes whose packets meshbox's DERP carried lately, and why those still relayed are."""
        if self.server is None or self.server.derp is None:
            raise InvalidInput("paths needs the running server (meshbox serve) with DERP on")
        return derp_pair_rows(self.server.derp, self.server.derp_node, time.monotonic())

    def logs(self, lines=100):
        if self.server is None:
            raise InvalidInput("logs needs the running server (meshbox serve)")
        if isinstance(lines, bool) or not isinstance(lines, int) or not 0 < lines <= 1000:
            raise InvalidInput(f"bad line count {str(lines)[:32]!r}: give 1 to 1000")
        return list(self.server.recent_logs.lines)[-lines:]


def api_key_valid(store, secret):
    """Whether a presented API key is known, unexpired and not revoked."""
    return api_key_hash_valid(store, hash_secret(secret))


def oauth_client_scopes(store, client_id, secret=None):
    """The scopes of a valid OAuth client (whose secret, when given, matches), else None."""
    row = store.oauth_client(client_id)
    if not row or not key_in_force(row, now()):
        return None
    if secret is not None and not hmac.compare_digest(row["hash"].encode(), hash_secret(secret).encode()):
        return None
    return row["scopes"]


def api_key_hash_valid(store, key_hash):
    """Whether the API key of this hash is known, unexpired and not revoked."""
    row = store.api_key(key_hash)
    return bool(row) and key_in_force(row, now())


def dns_settings(store, config):
    """{"nameservers", "search_domains", "split_dns", "magic_dns"}: stored, else from the configuration."""
    stored = store.setting("dns")
    if stored:
        return json.loads(stored)
    return {"nameservers": list(config.nameservers), "search_domains": list(config.search_domains),
            "split_dns": dict(config.split_dns), "magic_dns": bool(config.magic_dns)}


def tailnet_dns_config(config, dns):
    """The DNSConfig every node gets, from the admin's DNS settings and the configuration."""
    return dns_config(config.base_domain, dns["nameservers"], dns["split_dns"], dns["search_domains"],
                      config.extra_records, dns["magic_dns"])


ENDPOINT_SOURCES = {1: "local", 2: "stun", 3: "portmap", 4: "stun4localport", 5: "explicitconf"}
PORT_MAPPINGS = (("UPnP", "UPnP"), ("PMP", "NAT-PMP"), ("PCP", "PCP"))
MAX_DERP_LATENCIES = 16
TOP_PAIRS_METRICS = 10


def nat_class(node):
    """One word for a node's network: udp-blocked, hard, port-mapped, easy or unknown."""
    info = netinfo(node.hostinfo)
    if info.get("WorkingUDP") is False:
        return "udp-blocked"
    if info.get("MappingVariesByDestIP"):
        return "hard"
    if any(info.get(field) for field, _ in PORT_MAPPINGS):
        return "port-mapped"
    return "easy" if info.get("MappingVariesByDestIP") is False else "unknown"


def nat_words(node):
    """What a node's NetInfo says about its NAT, as phrases."""
    info, words = netinfo(node.hostinfo), []
    if info.get("WorkingUDP") is False:
        words.append("UDP blocked")
    varies = info.get("MappingVariesByDestIP")
    if varies:
        words.append("hard NAT: mapping varies by destination")
    elif varies is False:
        words.append("easy NAT (or none): one mapping for every destination")
    if info.get("HairPinning"):
        words.append("hairpinning")
    words += [f"port mapping: {name}" for field, name in PORT_MAPPINGS if info.get(field)]
    return words or ["not reported"]


def network_fields(node):
    """A node's network as its client reports it: NAT, endpoints and where
    each came from, DERP home and latencies, client version and capability."""
    types = node.endpoint_types if len(node.endpoint_types) == len(node.endpoints) else []
    latency = netinfo(node.hostinfo).get("DERPLatency") or {}
    return {"nat": nat_words(node), "nat_kind": nat_class(node),
            "endpoints_from": [{"endpoint": e, "from": ENDPOINT_SOURCES.get(t, "unknown") if types else "unknown"}
                               for e, t in zip(node.endpoints, types or [0] * len(node.endpoints))],
            "derp_home": home_derp(node),
            "derp_latency_ms": {k[:32]: round(v * 1000, 1) for k, v in list(latency.items())[:MAX_DERP_LATENCIES]},
            "client_version": node.hostinfo.get("IPNVersion") or "", "capability": node.cap}


def why_relayed(a, b):
    """Why two nodes' packets may not go direct, from both ends' NetInfo, in words."""
    reasons = [f"{n.given_name}: UDP blocked, so only DERP over TCP reaches it"
               for n in (a, b) if nat_class(n) == "udp-blocked"]
    hard = [n for n in (a, b) if nat_class(n) == "hard"]
    if len(hard) == 2:
        reasons.append("both are behind hard NATs (mapping varies by destination): hole punching cannot meet; "
                       "forward UDP 41641 to one of them, or enable UPnP/NAT-PMP on its router")
    elif hard:
        other = b if hard[0] is a else a
        if nat_class(other) != "port-mapped":
            reasons.append(f"{hard[0].given_name} is behind a hard NAT (mapping varies by destination) and "
                           f"{other.given_name}'s router lets in only replies: forward UDP 41641 to "
                           f"{other.given_name}, or enable UPnP/NAT-PMP on its router")
    return reasons or ["nothing in their NetInfo: a firewall between them may drop UDP, "
                       "or the direct path is still being tried"]


def derp_pair_rows(derp, node_of, at):
    """The pairs DERP carried packets for, most relayed first: nodes, bytes, and why relayed."""
    rows = []
    for pair in sorted(derp.pairs.values(), key=lambda p: p.data_bytes, reverse=True):
        nodes = [node_of(key) for key in pair.keys]
        relayed = pair.relayed(at)
        rows.append({"nodes": [n.given_name if n else short_key(k) for n, k in zip(nodes, pair.keys)],
                     "node_ids": [n.id if n else None for n in nodes], "relayed": relayed,
                     "relayed_bytes": pair.data_bytes, "relayed_packets": pair.data_packets,
                     "disco_packets": pair.disco_packets,
                     "last_relayed_s_ago": round(at - pair.last_data, 1) if pair.last_data is not None else None,
                     "why": why_relayed(*nodes) if relayed and all(nodes) else []})
    return rows


# ---- QR code ----
# A QR code encoder (ISO/IEC 18004: byte mode, error correction level M,
# versions 1-20, up to 666 bytes) for the admin page to show a pre-auth
# key's `tailscale up` command or a WireGuard configuration to a phone's
# camera, without sending the secret anywhere but the admin's own screen.

# Per version at level M: EC codewords per block, then (blocks, data codewords per block) for each group.
QR_M_BLOCKS = ((10, 1, 16), (16, 1, 28), (26, 1, 44), (18, 2, 32), (24, 2, 43), (16, 4, 27), (18, 4, 31),
               (22, 2, 38, 2, 39), (22, 3, 36, 2, 37), (26, 4, 43, 1, 44), (30, 1, 50, 4, 51), (22, 6, 36, 2, 37),
               (22, 8, 37, 1, 38), (24, 4, 40, 5, 41), (24, 5, 41, 5, 42), (28, 7, 45, 3, 46), (28, 10, 46, 1, 47),
               (26, 9, 43, 4, 44), (26, 3, 44, 11, 45), (26, 3, 41, 13, 42))
QR_MASKS = (lambda x, y: (x + y) % 2 == 0, lambda x, y: y % 2 == 0, lambda x, y: x % 3 == 0,
            lambda x, y: (x + y) % 3 == 0, lambda x, y: (x // 3 + y // 2) % 2 == 0,
            lambda x, y: x * y % 2 + x * y % 3 == 0, lambda x, y: (x * y % 2 + x * y % 3) % 2 == 0,
            lambda x, y: ((x + y) % 2 + x * y % 3) % 2 == 0)


def _gf256_multiply(x, y):
    """Multiplication in GF(2^8) modulo x^8 + x^4 + x^3 + x^2 + 1, QR's field."""
    z = 0
    for i in range(7, -1, -1):
        z = (z << 1) ^ ((z >> 7) * 0x11D)
        z ^= ((y >> i) & 1) * x
    return z


def reed_solomon_remainder(data, degree):
    """The `degree` error correction codewords of a block."""
    divisor, root = [0] * (degree - 1) + [1], 1
    for _ in range(degree):
        for j in range(degree):
            divisor[j] = _gf256_multiply(divisor[j], root)
            if j + 1 < degree:
                divisor[j] ^= divisor[j + 1]
        root = _gf256_multiply(root, 2)
    result = [0] * degree
    for byte in data:
        factor = byte ^ result.pop(0)
        result.append(0)
        for i, coefficient in enumerate(divisor):
            result[i] ^= _gf256_multiply(coefficient, factor)
    return result


def _qr_codewords(data):
    """(version, the interleaved data and EC codewords) of the smallest version that holds data."""
    for version, (ec, *groups) in enumerate(QR_M_BLOCKS, 1):
        blocks = [(groups[i], groups[i + 1]) for i in range(0, len(groups), 2)]
        capacity = sum(count * size for count, size in blocks)
        count_bits = 8 if version < 10 else 16
        if 4 + count_bits + 8 * len(data) <= capacity * 8:
            break
    else:
        raise InvalidInput(f"too long for a QR code: {len(data)} bytes (at most 666)")
    bits = "0100" + format(len(data), f"0{count_bits}b") + "".join(format(b, "08b") for b in data)
    bits += "0" * min(4, capacity * 8 - len(bits))
    bits += "0" * (-len(bits) % 8)
    words = [int(bits[i:i + 8], 2) for i in range(0, len(bits), 8)]
    words += [(0xEC, 0x11)[i % 2] for i in range(capacity - len(words))]
    data_blocks, at = [], 0
    for count, size in blocks:
        for _ in range(count):
            data_blocks.append(words[at:at + size])
            at += size
    ec_blocks = [reed_solomon_remainder(block, ec) for block in data_blocks]
    out = [b[i] for i in range(max(map(len, data_blocks))) for b in data_blocks if i < len(b)]
    return version, out + [b[i] for i in range(ec) for b in ec_blocks]


def _qr_penalty(modules):
    """Rules 1, 2 and 4 of the mask penalty: long runs, 2x2 blocks, imbalance of dark and light."""
    size, score = len(modules), 0
    for lines in (modules, list(zip(*modules))):
        for line in lines:
            run, previous = 0, None
            for dark in line:
                run = run + 1 if dark == previous else 1
                previous = dark
                score += 3 if run == 5 else 1 if run > 5 else 0
    for y in range(size - 1):
        for x in range(size - 1):
            if modules[y][x] == modules[y][x + 1] == modules[y + 1][x] == modules[y + 1][x + 1]:
                score += 3
    dark = sum(map(sum, modules))
    return score + abs(dark * 20 - size * size * 10) // (size * size) * 10


def qr_matrix(text):
    """The QR code of text (UTF-8) as rows of booleans (True: dark)."""
    version, codewords = _qr_codewords(text.encode())
    size = version * 4 + 17
    modules = [[False] * size for _ in range(size)]
    function = [[False] * size for _ in range(size)]

    def put(x, y, dark):
        modules[y][x], function[y][x] = bool(dark), True

    def format_bits(mask):          # level M is 00
        rem = mask
        for _ in range(10):
            rem = (rem << 1) ^ ((rem >> 9) * 0x537)
        bits = (mask << 10 | rem) ^ 0x5412
        for i in range(15):
            bit = (bits >> i) & 1
            put(8, i if i < 6 else i + 1 if i < 8 else size - 15 + i, bit)
            put(size - 1 - i if i < 8 else 15 - i - (1 if i >= 9 else 0), 8, bit)
        put(8, size - 8, True)

    for i in range(size):
        put(6, i, i % 2 == 0)
        put(i, 6, i % 2 == 0)
    for cx, cy in ((3, 3), (size - 4, 3), (3, size - 4)):
        for dy in range(-4, 5):
            for dx in range(-4, 5):
                if 0 <= cx + dx < size and 0 <= cy + dy < size:
                    put(cx + dx, cy + dy, max(abs(dx), abs(dy)) not in (2, 4))
    if version > 1:
        count = version // 7 + 2
        step = (version * 8 + count * 3 + 5) // (count * 4 - 4) * 2
        centres = [6] + [size - 7 - i * step for i in range(count - 1)][::-1]
        for cy in centres:
            for cx in centres:
                if (cx, cy) not in ((6, 6), (6, centres[-1]), (centres[-1], 6)):
                    for dy in range(-2, 3):
                        for dx in range(-2, 3):
                            put(cx + dx, cy + dy, max(abs(dx), abs(dy)) != 1)
    format_bits(0)                  # reserves the format areas; drawn for real below
    if version >= 7:
        rem = version
        for _ in range(12):
            rem = (rem << 1) ^ ((rem >> 11) * 0x1F25)
        bits = version << 12 | rem
        for i in range(18):
            put(size - 11 + i % 3, i // 3, (bits >> i) & 1)
            put(i // 3, size - 11 + i % 3, (bits >> i) & 1)
    at, total = 0, len(codewords) * 8
    for right in range(size - 1, 0, -2):
        right = right - 1 if right <= 6 else right
        for vertical in range(size):
            for x in (right, right - 1):
                y = size - 1 - vertical if ((right + 1) & 2) == 0 else vertical
                if not function[y][x] and at < total:
                    modules[y][x] = (codewords[at >> 3] >> (7 - (at & 7))) & 1 == 1
                    at += 1
    plain = [row[:] for row in modules]
    best = None
    for mask, rule in enumerate(QR_MASKS):
        for y in range(size):
            for x in range(size):
                modules[y][x] = plain[y][x] ^ (not function[y][x] and rule(x, y))
        format_bits(mask)
        score = _qr_penalty(modules)
        if best is None or score < best[0]:
            best = (score, [row[:] for row in modules])
    return best[1]


def qr_terminal_text(text):
    """The QR code of text drawn with block characters, two rows a line, dark on a light quiet zone."""
    matrix = qr_matrix(text)
    size = len(matrix)
    light = [[True] * (size + 8) for _ in range(4)]
    rows = light + [[True] * 4 + [not dark for dark in row] + [True] * 4 for row in matrix] + light
    rows.append([False] * (size + 8))        # an even number of rows
    glyphs = {(True, True): "\u2588", (True, False): "\u2580", (False, True): "\u2584", (False, False): " "}
    return "\n".join("".join(glyphs[top, bottom] for top, bottom in zip(rows[y], rows[y + 1]))
                     for y in range(0, len(rows) - 1, 2))


def qr_svg(text):
    """The QR code of text as an SVG image with its quiet zone."""
    matrix = qr_matrix(text)
    size = len(matrix) + 8
    path = "".join(f"M{x + 4} {y + 4}h1v1h-1z" for y, row in enumerate(matrix) for x, dark in enumerate(row) if dark)
    return (f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {size} {size}" shape-rendering="crispEdges">'
            f'<rect width="{size}" height="{size}" fill="#fff"/><path d="{path}" fill="#000"/></svg>')


# ---- API v2 ----
# Tailscale's public API (api.tailscale.com/api/v2/), the parts a
# self-hosted tailnet has, in Tailscale's JSON shapes and status codes, so
# the tools written for it (the Go client, the Terraform provider, the PyPI
# package Home Assistant uses) drive meshbox.  The tailnet is "-" (or its
# base domain).  Callers bring an API key or an OAuth access token, whose
# client's scopes say which endpoints it may use.  Reads come from the Admin verbs' answers; every change is an
# Admin verb run inside the server, the one path the CLI and /api/v1 take.
# A few meshbox endpoints that Tailscale has no counterpart for (pending
# logins, plain WireGuard devices, logs, QR codes) live beside them.

API_V2_PREFIX = "/api/v2/"
DEVICE_ALL_FIELDS = ("advertisedRoutes", "enabledRoutes", "clientConnectivity")   # only with fields=all
MAX_KEY_SECONDS = 90 * 86400          # Tailscale's longest auth key
MAX_API_ITEMS = 256                   # tags or routes in one request
ZERO_TIME = "0001-01-01T00:00:00Z"    # Go's zero time.Time, Tailscale's "never"
DEFAULT_POLICY = """// No policy is set: every node may reach every other.
{
  "acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}],
}
"""


@dataclasses.dataclass
class ApiRequest:
    method: str
    query: dict
    headers: dict
    body: bytes
    scopes: frozenset = frozenset()     # what the caller may do (see ApiV2.answer)

    def json(self):
        """The body as a JSON object (or list); HttpError 400 when it is not one."""
        try:
            value = parse_json(self.body or b"{}")
        except ValueError as e:
            raise HttpError(400, f"malformed JSON body: {e}") from None
        if not isinstance(value, (dict, list)):
            raise HttpError(400, "the body must be a JSON object")
        return value

    def field(self, name, kind, default=None):
        """One field of a JSON object body, of the given type."""
        body = self.json()
        value = body.get(name, default) if isinstance(body, dict) else default
        if value is None and default is None:
            raise HttpError(400, f"the body needs {name!r}")
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise HttpError(400, f"{name!r} has the wrong type")
        return value

    def text(self):
        try:
            return self.body.decode()
        except UnicodeDecodeError:
            raise HttpError(400, "the body is not UTF-8 text") from None


def client_connectivity(row, hostinfo):
    """The device's clientConnectivity from what its client last reported (NetInfo)."""
    info = netinfo(hostinfo)
    latency = {region: {"latencyMs": seconds * 1000, "preferred": region.startswith(f"{info.get('PreferredDERP')}-")}
               for region, seconds in (info.get("DERPLatency") or {}).items()}
    network = row.get("network") or {}       # the NAT diagnostics' view, where nodes list has it
    return {"endpoints": list(row["endpoints"] or []), "derp": "meshbox" if row["derp_home"] else "",
            "nat": network.get("nat_kind") or "",
            "mappingVariesByDestIP": info.get("MappingVariesByDestIP"), "latency": latency,
            "clientSupports": {"hairPinning": info.get("HairPinning"), "ipv6": info.get("WorkingIPv6"),
                               "pcp": info.get("PCP"), "pmp": info.get("PMP"), "udp": info.get("WorkingUDP"),
                               "upnp": info.get("UPnP")}}


def device_json(row, node, base_domain, fields):
    """One row of `nodes list` (and its node) as Tailscale's Device; fields "all" adds routes and connectivity."""
    hostinfo = node.hostinfo
    out = {"id": str(node.id), "nodeId": f"n{node.id}", "name": f"{node.given_name}.{base_domain}",
           "hostname": node.hostname, "user": row["user"] or "", "addresses": [node.ipv4, node.ipv6],
           "os": row["os"], "clientVersion": str(hostinfo.get("IPNVersion") or ""), "updateAvailable": False,
           "created": row["created"] or ZERO_TIME, "lastSeen": rfc3339(now()) if row["online"] else row["last_seen"],
           "connectedToControl": row["online"], "keyExpiryDisabled": node.expiry is None,
           "expires": rfc3339(node.expiry) or ZERO_TIME, "authorized": True, "isExternal": False,
           "isEphemeral": node.ephemeral, "machineKey": key_text("mkey", node.machine_key),
           "nodeKey": key_text("nodekey", node.node_key),
           "blocksIncomingConnections": bool(hostinfo.get("ShieldsUp")), "tags": list(node.tags),
           "tailnetLockKey": "", "tailnetLockError": "", "multipleConnections": False}
    if fields == "all":
        out.update(advertisedRoutes=row["advertised_routes"], enabledRoutes=row["approved_routes"],
                   clientConnectivity=client_connectivity(row, hostinfo))
        if row.get("kind") == NODE_GATEWAY:
            out["meshboxGateway"] = True
    return out


def device_fields(query):
    fields = query.get("fields", "default") or "default"
    if fields not in ("default", "all"):
        raise HttpError(400, f"fields is default or all, not {fields[:32]!r}")
    return fields


def key_json(row):
    """A row of `preauthkeys list` as Tailscale's Key (without its secret)."""
    return {"id": f"k{row['id']}", "keyType": "auth", "description": "", "created": row["created"],
            "expires": row["expiration"], "invalid": not row["valid"], "userId": row["user"],
            "capabilities": {"devices": {"create": {"reusable": row["reusable"], "ephemeral": row["ephemeral"],
                                                    "preauthorized": True, "tags": row["tags"]}}}}


def client_key_json(row):
    """A row of `oauthclients list` as Tailscale's Key of type client (without its secret)."""
    return {"id": row["client_id"], "keyType": "client", "description": "", "created": row["created"],
            "expires": row["expiration"], "invalid": not row["valid"], "scopes": row["scopes"]}


def policy_etag(text):
    return '"' + hashlib.sha256(text.encode()).hexdigest() + '"'


def checked_strings(value, what, limit=MAX_API_ITEMS):
    if not isinstance(value, list) or len(value) > limit or not all(isinstance(v, str) and len(v) <= 255
                                                                    for v in value):
        raise HttpError(400, f"{what} must be a list of at most {limit} strings")
    return value


def _api_route(pattern):
    """A route pattern ("device/{id}/routes") as a regular expression; {t} is the tailnet."""
    return re.compile("^" + re.sub(r"\{\w+\}", "([^/]+)", pattern) + "$")


def with_expiring_entry(table, key, entry, limit):
    """table (hash -> (expires, ...)) without its expired entries, with entry added: at most limit
    entries, the soonest to expire dropped first."""
    at = now()
    table = {k: v for k, v in table.items() if v[0] > at}
    while len(table) >= limit:
        del table[min(table, key=lambda k: table[k][0])]
    table[key] = entry
    return table


OAUTH_TOKEN_TTL = 3600        # seconds an access token lasts, as Tailscale's
MAX_OAUTH_TOKENS = 256


class OAuthTokens:
    """Access tokens handed out at /api/v2/oauth/token, kept by their hash:
    each with its expiry, scopes and client (revoking the client ends them)."""

    def __init__(self):
        self.tokens = {}         # hash of the token -> (expires, scopes, client ID)

    def issue(self, client_id, scopes):
        token = OAUTH_SECRET_PREFIX + "token-" + secrets.token_hex(24)
        self.tokens = with_expiring_entry(self.tokens, hash_secret(token),
                                          (now() + OAUTH_TOKEN_TTL, frozenset(scopes), client_id), MAX_OAUTH_TOKENS)
        return token

    def scopes(self, store, token):
        """The scopes of a live token whose client is still valid, else None."""
        entry = self.tokens.get(hash_secret(token))
        if entry is None or entry[0] <= now() or oauth_client_scopes(store, entry[2]) is None:
            return None
        return entry[1]

    def answer(self, store, request, body):
        """The token endpoint (RFC 6749 client credentials, form-encoded, the client in the form or in
        HTTP Basic): (status, JSON answer)."""
        form = parse_query(body.decode(errors="replace")) if body else {}
        client_id, secret = form.get("client_id", ""), form.get("client_secret", "")
        scheme, _, value = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "basic" and not client_id:
            try:
                client_id, _, secret = base64.b64decode(value.strip(), validate=True).decode().partition(":")
            except (binascii.Error, UnicodeDecodeError):
                pass
        if form.get("grant_type", "client_credentials") != "client_credentials":
            return 400, {"error": "unsupported_grant_type", "message": "only client_credentials is supported"}
        allowed = oauth_client_scopes(store, client_id, secret) if client_id and secret else None
        if allowed is None:
            return 401, {"error": "invalid_client", "message": "unknown or revoked OAuth client, or a wrong secret"}
        wanted = form.get("scope", "").split() or allowed
        if not set(wanted) <= set(allowed):
            return 400, {"error": "invalid_scope", "message": f"the client may ask for {' '.join(allowed)} only"}
        return 200, {"access_token": self.issue(client_id, wanted), "token_type": "Bearer",
                     "expires_in": OAUTH_TOKEN_TTL, "scope": " ".join(wanted)}


class ApiV2:
    """One running server's /api/v2: routes requests to handlers, which call Admin verbs."""

    # (method, path, handler, the OAuth scope it needs; its ":read" form is enough for a GET)
    ROUTES = [(method, _api_route(pattern), handler, scope) for method, pattern, handler, scope in (
        ("GET", "tailnet/{t}/devices", "list_devices", "devices:core"),
        ("GET", "device/{id}", "get_device", "devices:core"),
        ("DELETE", "device/{id}", "delete_device", "devices:core"),
        ("POST", "device/{id}/authorized", "authorize_device", "devices:core"),
        ("POST", "device/{id}/expire", "expire_device", "devices:core"),
        ("POST", "device/{id}/key", "device_key", "devices:core"),
        ("POST", "device/{id}/name", "rename_device", "devices:core"),
        ("POST", "device/{id}/tags", "tag_device", "devices:core"),
        ("GET", "device/{id}/routes", "device_routes", "devices:routes"),
        ("POST", "device/{id}/routes", "set_device_routes", "devices:routes"),
        ("GET", "tailnet/{t}/keys", "list_keys", "auth_keys"),
        ("POST", "tailnet/{t}/keys", "create_key", "auth_keys"),
        ("GET", "tailnet/{t}/keys/{id}", "get_key", "auth_keys"),
        ("DELETE", "tailnet/{t}/keys/{id}", "delete_key", "auth_keys"),
        ("GET", "tailnet/{t}/acl", "get_policy", "policy_file"),
        ("POST", "tailnet/{t}/acl", "set_policy", "policy_file"),
        ("POST", "tailnet/{t}/acl/validate", "validate_policy", "policy_file"),
        ("GET", "tailnet/{t}/dns/nameservers", "get_nameservers", "dns"),
        ("POST", "tailnet/{t}/dns/nameservers", "set_nameservers", "dns"),
        ("GET", "tailnet/{t}/dns/preferences", "get_dns_preferences", "dns"),
        ("POST", "tailnet/{t}/dns/preferences", "set_dns_preferences", "dns"),
        ("GET", "tailnet/{t}/dns/searchpaths", "get_search_paths", "dns"),
        ("POST", "tailnet/{t}/dns/searchpaths", "set_search_paths", "dns"),
        ("GET", "tailnet/{t}/dns/split-dns", "get_split_dns", "dns"),
        ("PUT", "tailnet/{t}/dns/split-dns", "replace_split_dns", "dns"),
        ("PATCH", "tailnet/{t}/dns/split-dns", "update_split_dns", "dns"),
        ("GET", "tailnet/{t}/dns/configuration", "get_dns_configuration", "dns"),
        ("POST", "tailnet/{t}/dns/configuration", "set_dns_configuration", "dns"),
        ("GET", "tailnet/{t}/users", "list_users", "users"),
        ("GET", "users/{id}", "get_user", "users"),
        ("POST", "users/{id}/delete", "delete_user", "users"),
        ("GET", "tailnet/{t}/settings", "get_settings", "feature_settings"),
        ("PATCH", "tailnet/{t}/settings", "update_settings", "feature_settings"),
        # meshbox's own, for what Tailscale's API has no endpoint for
        ("POST", "tailnet/{t}/users", "create_user", "all"),
        ("GET", "tailnet/{t}/logins", "list_logins", "all"),
        ("POST", "tailnet/{t}/logins/{id}/approve", "approve_login", "all"),
        ("GET", "tailnet/{t}/wireguard-devices", "list_wireguard_devices", "all"),
        ("POST", "tailnet/{t}/wireguard-devices", "add_wireguard_device", "all"),
        ("DELETE", "tailnet/{t}/wireguard-devices/{id}", "remove_wireguard_device", "all"),
        ("GET", "tailnet/{t}/logs", "recent_logs", "all"),
        ("POST", "tailnet/{t}/qr", "qr_code", "all"),
    )]

    def __init__(self, server):
        self.server = server
        self.config = server.config

    async def answer(self, method, path, request, scopes):
        """(status, content type, body bytes, extra headers) for one request by a caller with these scopes."""
        segments = path[len(API_V2_PREFIX):].strip("/")
        allowed = False
        for route_method, pattern, handler, scope in self.ROUTES:
            match = pattern.match(segments)
            if not match:
                continue
            allowed = True
            if route_method != method:
                continue
            if not {"all", scope} & scopes and not (method == "GET" and {"all:read", f"{scope}:read"} & scopes):
                raise HttpError(403, f"this token lacks the scope {scope}{':read' if method == 'GET' else ''}")
            request.scopes = scopes
            args = [_percent_decode(a) for a in match.groups()]
            if pattern.pattern.startswith("^tailnet/"):
                tailnet = args.pop(0)
                if tailnet not in ("-", self.config.base_domain):
                    raise HttpError(404, f"tailnet {tailnet[:64]!r} not found (this one is '-')")
            result = await getattr(self, handler)(request, *args)
            if isinstance(result, tuple):
                return result
            return 200, "application/json", json_bytes(result), []
        if allowed:
            raise HttpError(405, f"method {method} not allowed on {path[:128]}")
        raise HttpError(404, f"{path[:128]} is not part of meshbox's API v2 (see its README for the endpoints)")

    def read(self, noun, verb, **params):
        """A verb that only reads, without the reload from the store that follows a change."""
        admin = Admin(self.server.store, self.config, self.server)
        try:
            return getattr(admin, f"{noun}_{verb}" if verb else noun)(**params)
        except MeshboxError as e:
            raise HttpError(400, str(e)) from None

    async def verb(self, noun, verb, **params):
        answer = await self.server.run_admin(noun, verb, params)
        if "error" in answer:
            raise HttpError(400, answer["error"])
        return answer["result"]

    # devices
    def node(self, ident):
        """The node a device ID (or Tailscale's stable nodeId, nN) names; 404 when none."""
        digits = ident[1:] if ident[:1] == "n" else ident
        node = self.server.coordinator.nodes.get(int(digits)) if digits.isdigit() and len(digits) < 19 else None
        if node is None:
            raise HttpError(404, f"device {ident[:64]!r} not found")
        return node

    async def device(self, node, fields):
        rows = self.read("nodes", "list")
        row = next((r for r in rows if r["id"] == node.id), None)
        if row is None:
            raise HttpError(404, f"device {node.id} not found")
        return device_json(row, node, self.config.base_domain, fields)

    async def list_devices(self, request):
        fields = device_fields(request.query)
        nodes = self.server.coordinator.nodes
        return {"devices": [device_json(row, nodes[row["id"]], self.config.base_domain, fields)
                            for row in self.read("nodes", "list") if row["id"] in nodes]}

    async def get_device(self, request, ident):
        return await self.device(self.node(ident), device_fields(request.query))

    async def delete_device(self, request, ident):
        await self.verb("nodes", "delete", id=str(self.node(ident).id))
        return {}

    async def authorize_device(self, request, ident):
        self.node(ident)
        if not request.field("authorized", bool):
            raise HttpError(400, "meshbox has no deauthorized devices: expire the device's key or delete it")
        return {}          # a registered node is authorized; pending logins are approved at .../logins

    async def expire_device(self, request, ident):
        await self.verb("nodes", "expire", id=str(self.node(ident).id))
        return {}

    async def device_key(self, request, ident):
        node = self.node(ident)
        if request.field("keyExpiryDisabled", bool):
            await self.verb("nodes", "expiry", switch="disable", id=str(node.id))
        elif node.expiry is None:
            raise HttpError(400, "meshbox cannot turn key expiry back on: the key expires again at the next login")
        return {}

    async def rename_device(self, request, ident):
        node = self.node(ident)
        name = request.field("name", str).strip()
        suffix = "." + self.config.base_domain
        name = name.rstrip(".")[:-len(suffix)] if name.rstrip(".").endswith(suffix) else name
        await self.verb("nodes", "rename", id=str(node.id), name=name or sanitize_hostname(node.hostname))
        return {}

    async def tag_device(self, request, ident):
        tags = checked_strings(request.field("tags", list), "tags")
        await self.verb("nodes", "tag", id=str(self.node(ident).id), tags=",".join(tags))
        return {}

    async def device_routes(self, request, ident):
        device = await self.device(self.node(ident), "all")
        return {"advertisedRoutes": device["advertisedRoutes"], "enabledRoutes": device["enabledRoutes"]}

    async def set_device_routes(self, request, ident):
        node = self.node(ident)
        wanted = []
        for text in checked_strings(request.field("routes", list), "routes"):
            try:
                wanted.append(str(ipaddress.ip_network(text, strict=True)))
            except ValueError as e:
                raise HttpError(400, f"bad route {text[:64]!r}: {e}") from None
        advertised = node.hostinfo.get("RoutableIPs") or []
        missing = [r for r in wanted if r not in advertised and r not in node.approved_routes]
        if missing:     # checked before any change, so a refusal changes nothing
            raise HttpError(400, f"device {node.given_name} does not advertise {', '.join(missing)} "
                                "(meshbox enables only advertised routes)")
        for prefix in [r for r in node.approved_routes if r not in wanted]:
            await self.verb("routes", "unapprove", node=str(node.id), prefix=prefix)
        for prefix in [r for r in dict.fromkeys(wanted) if r not in node.approved_routes]:
            await self.verb("routes", "approve", node=str(node.id), prefix=prefix)
        return await self.device_routes(request, ident)

    # auth keys
    async def key_row(self, ident):
        for row in self.read("preauthkeys", "list"):
            if f"k{row['id']}" == ident:
                return row
        raise HttpError(404, f"key {ident[:64]!r} not found")

    def client_row(self, ident):
        for row in self.read("oauthclients", "list"):
            if row["client_id"] == ident:
                return row
        raise HttpError(404, f"key {ident[:64]!r} not found")

    async def list_keys(self, request):
        return {"keys": [key_json(row) for row in self.read("preauthkeys", "list")]
                + [client_key_json(row) for row in self.read("oauthclients", "list")]}

    async def get_key(self, request, ident):
        if ident.startswith("msoc"):
            return client_key_json(self.client_row(ident))
        return key_json(await self.key_row(ident))

    async def create_oauth_client(self, body, request):
        """keyType "client": an OAuth client, which only a caller who may do everything may make (a client
        with more scopes than its maker's would widen them)."""
        if "all" not in request.scopes:
            raise HttpError(403, "making an OAuth client needs the scope all")
        scopes = checked_strings(body.get("scopes") or [], "scopes", len(OAUTH_SCOPES))
        created = await self.verb("oauthclients", "create", scopes=" ".join(scopes))
        return dict(client_key_json(self.client_row(created["client_id"])), key=created["client_secret"])

    async def create_key(self, request):
        body = request.json()
        if not isinstance(body, dict):
            raise HttpError(400, "the body must be a JSON object")
        if body.get("keyType") == "client":
            return await self.create_oauth_client(body, request)
        if body.get("keyType", "auth") != "auth":
            raise HttpError(400, "meshbox makes auth keys and OAuth clients (API keys: meshbox apikeys create)")
        create = ((body.get("capabilities") or {}).get("devices") or {}).get("create") or {}
        if not isinstance(create, dict):
            raise HttpError(400, "capabilities.devices.create must be an object")
        flags = {name: create.get(name, False) for name in ("reusable", "ephemeral", "preauthorized")}
        if not all(isinstance(v, bool) for v in flags.values()):
            raise HttpError(400, "reusable, ephemeral and preauthorized are true or false")
        tags = checked_strings(create.get("tags") or [], "tags")
        seconds = body.get("expirySeconds") or MAX_KEY_SECONDS
        if not isinstance(seconds, int) or isinstance(seconds, bool) or not 0 < seconds <= MAX_KEY_SECONDS:
            raise HttpError(400, f"expirySeconds must be 1 to {MAX_KEY_SECONDS} (90 days)")
        user = body.get("user")      # meshbox's: an API key belongs to no user
        if user is None:
            users = self.read("users", "list")
            if len(users) != 1:
                raise HttpError(400, 'say which user owns the devices: add "user": NAME to the body '
                                    f"(the tailnet has {len(users)} users)")
            user = users[0]["name"]
        if not isinstance(user, str):
            raise HttpError(400, "'user' has the wrong type")
        created = await self.verb("preauthkeys", "create", user=user, reusable=flags["reusable"],
                                  ephemeral=flags["ephemeral"], expiration=f"{seconds}s", tags=",".join(tags))
        row = self.server.store.preauth_key(created["key"])
        return dict(key_json(await self.key_row(f"k{row['id']}")), key=created["key"], expirySeconds=seconds)

    async def delete_key(self, request, ident):
        if ident.startswith("msoc"):
            await self.verb("oauthclients", "expire", client_id=self.client_row(ident)["client_id"])
            return {}
        row = await self.key_row(ident)
        await self.verb("preauthkeys", "expire", key=row["key"])
        return {}

    # policy file
    async def policy_text(self):
        return (self.read("policy", "get"))["policy"] or DEFAULT_POLICY

    def policy_answer(self, request, text):
        headers = [("ETag", policy_etag(text))]
        if "application/hujson" in request.headers.get("accept", ""):
            return 200, "application/hujson", text.encode(), headers
        try:
            value = parse_hujson(text)
        except PolicyError as e:
            raise HttpError(500, f"the stored policy does not parse: {e}") from None
        return 200, "application/json", json_bytes(value), headers

    async def get_policy(self, request):
        return self.policy_answer(request, await self.policy_text())

    async def set_policy(self, request):
        if self.config.policy_file:
            raise HttpError(403, f"the policy comes from the file {self.config.policy_file} (policy_file): "
                                "edit it there")
        match = request.headers.get("if-match")
        if match and match != "ts-default" and match != policy_etag(await self.policy_text()):
            raise HttpError(412, "precondition failed, invalid old hash: the policy changed since you read it")
        text = request.text()
        await self.verb("policy", "set", policy=text)
        return self.policy_answer(request, text)

    async def validate_policy(self, request):
        """A policy to check, or (a JSON list) tests to run against the policy in force."""
        text = request.text()
        try:
            tests = parse_json(text.encode())
        except ValueError:
            tests = None
        if isinstance(tests, list):
            try:
                current = parse_hujson(await self.policy_text())
            except PolicyError as e:
                raise HttpError(500, f"the stored policy does not parse: {e}") from None
            text = json.dumps(dict(current, tests=tests))
        answer = await self.server.run_admin("policy", "check", {"policy": text})
        if "error" in answer:
            return {"message": answer["error"], "data": [{"user": "", "errors": [answer["error"]], "warnings": []}]}
        return {}

    # DNS
    async def dns(self):
        return self.read("dns", "get")

    async def set_dns(self, **changes):
        return await self.verb("dns", "set", **changes)

    async def get_nameservers(self, request):
        dns = await self.dns()
        return {"dns": dns["nameservers"], "magicDNS": dns["magic_dns"]}

    async def set_nameservers(self, request):
        dns = await self.set_dns(nameservers=request.field("dns", list))
        return {"dns": dns["nameservers"], "magicDNS": dns["magic_dns"]}

    async def get_dns_preferences(self, request):
        return {"magicDNS": (await self.dns())["magic_dns"]}

    async def set_dns_preferences(self, request):
        return {"magicDNS": (await self.set_dns(magic_dns=request.field("magicDNS", bool)))["magic_dns"]}

    async def get_search_paths(self, request):
        return {"searchPaths": (await self.dns())["search_domains"]}

    async def set_search_paths(self, request):
        dns = await self.set_dns(search_domains=request.field("searchPaths", list))
        return {"searchPaths": dns["search_domains"]}

    async def get_split_dns(self, request):
        return (await self.dns())["split_dns"]

    def split_body(self, request):
        body = request.json()
        if not isinstance(body, dict):
            raise HttpError(400, "the body maps domains to lists of resolvers")
        return body

    async def replace_split_dns(self, request):
        body = {d: ns for d, ns in self.split_body(request).items() if ns is not None}
        return (await self.set_dns(split_dns=body))["split_dns"]

    async def update_split_dns(self, request):
        merged = dict((await self.dns())["split_dns"])
        for domain, servers in self.split_body(request).items():
            if servers is None:
                merged.pop(domain.rstrip(".").lower(), None)
            else:
                merged[domain] = servers
        return (await self.set_dns(split_dns=merged))["split_dns"]

    @staticmethod
    def dns_configuration(dns):
        return {"nameservers": [{"address": a} for a in dns["nameservers"]], "searchPaths": dns["search_domains"],
                "splitDNS": {d: [{"address": a} for a in ns] for d, ns in dns["split_dns"].items()},
                "preferences": {"magicDNS": dns["magic_dns"], "overrideLocalDNS": bool(dns["nameservers"])}}

    async def get_dns_configuration(self, request):
        return self.dns_configuration(await self.dns())

    async def set_dns_configuration(self, request):
        body = request.json()
        if not isinstance(body, dict):
            raise HttpError(400, "the body must be a JSON object")

        def addresses(resolvers, what):
            if not isinstance(resolvers, list) or not all(isinstance(r, dict) for r in resolvers):
                raise HttpError(400, f"{what} must be a list of {{\"address\": ...}} objects")
            return [r.get("address") for r in resolvers]

        split = body.get("splitDNS") or {}
        if not isinstance(split, dict):
            raise HttpError(400, "splitDNS maps domains to lists of resolvers")
        preferences = body.get("preferences") or {}
        magic = preferences.get("magicDNS", True) if isinstance(preferences, dict) else None
        dns = await self.set_dns(nameservers=addresses(body.get("nameservers") or [], "nameservers"),
                                 search_domains=body.get("searchPaths") or [],
                                 split_dns={d: addresses(ns or [], f"splitDNS {d}") for d, ns in split.items()},
                                 magic_dns=magic)
        return self.dns_configuration(dns)

    # users
    async def user_rows(self):
        nodes = list(self.server.coordinator.nodes.values())
        out = []
        for user in self.read("users", "list"):
            owned = [n for n in nodes if n.user_id == user["id"]]
            seen = max((n.last_seen or 0 for n in owned), default=0)
            out.append({"id": str(user["id"]), "displayName": user["name"], "loginName": user["name"],
                        "profilePicUrl": "", "tailnetId": self.config.base_domain, "created": user["created"],
                        "type": "member", "role": "member", "status": "active", "deviceCount": len(owned),
                        "currentlyConnected": any(n.online for n in owned),
                        "lastSeen": rfc3339(seen) or ZERO_TIME})
        return out

    async def user_row(self, ident):
        row = next((u for u in await self.user_rows() if u["id"] == ident), None)
        if row is None:
            raise HttpError(404, f"user {ident[:64]!r} not found")
        return row

    async def list_users(self, request):
        return {"users": await self.user_rows()}

    async def get_user(self, request, ident):
        return await self.user_row(ident)

    async def delete_user(self, request, ident):
        await self.verb("users", "delete", name=(await self.user_row(ident))["loginName"])
        return {}

    async def create_user(self, request):
        created = await self.verb("users", "create", name=request.field("name", str))
        return await self.user_row(str(created["id"]))

    # tailnet settings: what meshbox's configuration says, read-only
    def settings(self):
        expiry = 0 if str(self.config.node_expiry) == "0" else parse_duration(self.config.node_expiry)
        return {"devicesApprovalOn": False, "devicesAutoUpdatesOn": False,
                "devicesKeyDurationDays": expiry // 86400, "usersApprovalOn": not self.config.oidc_issuer,
                "usersRoleAllowedToJoinExternalTailnets": "none", "networkFlowLoggingOn": False,
                "regionalRoutingOn": False, "postureIdentityCollectionOn": False, "httpsEnabled": False,
                "aclsExternallyManagedOn": bool(self.config.policy_file), "aclsExternalLink": ""}

    async def get_settings(self, request):
        return self.settings()

    async def update_settings(self, request):
        body, current = request.json(), self.settings()
        if not isinstance(body, dict):
            raise HttpError(400, "the body must be a JSON object")
        changed = sorted(k for k, v in body.items() if current.get(k, object()) != v)
        if changed:
            raise HttpError(400, f"meshbox takes {', '.join(changed)[:200]} from its configuration "
                                "(node_expiry, oidc_*, policy_file): change it there")
        return {}

    # meshbox's own
    async def list_logins(self, request):
        return {"logins": self.read("nodes", "pending")}

    async def approve_login(self, request, ident):
        await self.verb("nodes", "register", user=request.field("user", str), key=ident)
        return {}

    async def list_wireguard_devices(self, request):
        return {"devices": self.read("devices", "list")}

    async def add_wireguard_device(self, request):
        return await self.verb("devices", "add", name=request.field("name", str),
                               user=request.field("user", str, GATEWAY_USER),
                               full_tunnel=request.field("fullTunnel", bool, False))

    async def remove_wireguard_device(self, request, name):
        await self.verb("devices", "remove", name=name)
        return {}

    async def recent_logs(self, request):
        lines = request.query.get("lines", "200")
        if not lines.isdigit() or not 0 < int(lines) <= 1000:
            raise HttpError(400, "lines is 1 to 1000")
        return {"logs": self.read("logs", None, lines=int(lines))}

    async def qr_code(self, request):
        """The QR code of a text (a `tailscale up` command, a WireGuard config) as SVG; the
        text travels in the body, never in a URL, as it holds a secret."""
        text = request.field("text", str)
        try:
            return 200, "image/svg+xml", qr_svg(text).encode(), []
        except ValueError as e:
            raise HttpError(400, str(e)) from None


# ---- Admin page ----
# /admin: one HTML page, its style sheet and its script (served as their own
# paths, so the Content-Security-Policy allows no inline script at all).  It
# signs in with an API key for a cookie session and then does everything
# through /api/v2 with that cookie and a per-session CSRF token in a header.

SESSION_COOKIE = "meshbox_session"
CSRF_HEADER = "x-csrf-token"
SESSION_TTL = 8 * 3600       # seconds a sign-in lasts
MAX_SESSIONS = 32            # signed-in pages at once; the oldest goes first
ADMIN_PAGE_HEADERS = [
    ("Content-Security-Policy", "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                                "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"),
    ("X-Content-Type-Options", "nosniff"), ("Referrer-Policy", "no-referrer"), ("Cache-Control", "no-store")]


ADMIN_SIGN_IN = "admin-page:"   # what an admin's sign-in at the identity provider is for (not a device's login)


def admin_cookie(token, secure, max_age=SESSION_TTL):
    """The Set-Cookie value of an admin session: never readable by script nor sent from another site."""
    return (f"{SESSION_COOKIE}={token}; Path=/; HttpOnly; SameSite=Strict; Max-Age={max_age}"
            + ("; Secure" if secure else ""))


class AdminSessions:
    """Signed-in admin pages, by the hash of their cookie: each with its CSRF
    token, its expiry and the hash of the API key it signed in with (revoking
    or expiring that key ends the session too; None: an admin signed in
    through the identity provider)."""

    def __init__(self):
        self.sessions = {}       # hash of the cookie -> (expires, CSRF token, hash of the API key)

    def create(self, key_hash):
        token, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
        self.sessions = with_expiring_entry(self.sessions, hash_secret(token), (now() + SESSION_TTL, csrf, key_hash),
                                            MAX_SESSIONS)
        return token, csrf

    def session(self, store, token):
        """(expires, CSRF token, key hash) of a live session, or None."""
        entry = self.sessions.get(hash_secret(token)) if token else None
        if entry is None or entry[0] <= now() or (entry[2] is not None and not api_key_hash_valid(store, entry[2])):
            return None
        return entry

    def valid(self, store, token, csrf):
        entry = self.session(store, token)
        return entry is not None and hmac.compare_digest(entry[1].encode(), csrf.encode())

    def answer(self, store, request, body, secure):
        """/admin/session: POST signs in ({"key": API key}), GET tells a signed-in page its CSRF token, DELETE
        signs out: (status, JSON answer, headers)."""
        token = request_cookie(request, SESSION_COOKIE)
        if request.method == "POST":
            try:
                key = parse_json(body or b"{}").get("key")
            except (ValueError, AttributeError):
                key = None
            if not isinstance(key, str) or not api_key_valid(store, key):
                return 401, {"message": "that API key is not valid (create one with: meshbox apikeys create)"}, []
            token, csrf = self.create(hash_secret(key))
            return 200, {"csrf": csrf}, [("Set-Cookie", admin_cookie(token, secure))]
        if request.method == "DELETE":
            if self.valid(store, token, request.headers.get(CSRF_HEADER, "")):
                self.sessions.pop(hash_secret(token), None)
            return 200, {}, [("Set-Cookie", admin_cookie("gone", secure, 0))]
        entry = self.session(store, token)
        if entry is None:
            return 401, {"message": "not signed in"}, []
        return 200, {"csrf": entry[1]}, []


ADMIN_HTML = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>meshbox admin</title><link rel="stylesheet" href="/admin/admin.css"></head>
<body data-login-server="{login_server}" data-gateway-user="{gateway_user}">
<header><h1>meshbox</h1><nav><a href="#nodes-section">Nodes</a> <a href="#keys-section">Keys</a>
<a href="#wg-section">WireGuard</a> <a href="#users-section">Users</a> <a href="#policy-section">Policy</a>
<a href="#logs-section">Logs</a></nav></header>
<main>
<form id="signin"><h2>Sign in</h2><p>With an API key (<code>meshbox apikeys create</code>).</p>
<input id="apikey" type="password" autocomplete="off" placeholder="msapi-..." aria-label="API key">
<button type="submit">Sign in</button>{oidc_link}<p id="signin-error"></p></form>
<div id="app" hidden>
<p class="bar"><button type="button" id="refresh">Refresh</button> <button type="button" id="signout">Sign out</button></p>
<section id="graph-section"><h2>Tailnet</h2><div id="graph"></div>
<p class="legend"><span class="key direct"></span>direct <span class="key relayed"></span>relayed (DERP)
<span class="key offline"></span>offline</p></section>
<section id="logins-section"><h2>Waiting logins</h2><p id="logins-error"></p><div id="logins" class="cards"></div></section>
<section id="nodes-section"><h2>Nodes</h2><p id="nodes-error"></p><div id="nodes" class="cards"></div></section>
<section id="keys-section"><h2>Pre-auth keys</h2><p id="keys-error"></p>
<div class="row"><select id="key-user" aria-label="user"></select>
<label><input type="checkbox" id="key-reusable"> reusable</label>
<label><input type="checkbox" id="key-ephemeral"> ephemeral</label>
<input id="key-tags" placeholder="tag:phone" aria-label="tags" size="14">
<label>days <input id="key-days" type="number" value="1" min="1" max="90" aria-label="days"></label>
<button type="button" id="key-create">Create key</button></div>
<div id="new-key"></div><ul id="keys"></ul></section>
<section id="wg-section"><h2>Plain WireGuard devices</h2><p id="wg-error"></p>
<div class="row"><input id="wg-name" placeholder="phone" aria-label="device name">
<label><input type="checkbox" id="wg-full"> all traffic through the box</label>
<button type="button" id="wg-add">Add device</button></div><div id="new-wg"></div><ul id="wg"></ul></section>
<section id="users-section"><h2>Users</h2><p id="users-error"></p>
<div class="row"><input id="user-name" placeholder="alice@example.com" aria-label="user name">
<button type="button" id="user-create">Add user</button></div><ul id="users"></ul></section>
<section id="policy-section"><h2>Policy</h2>
<textarea id="policy" rows="18" spellcheck="false" aria-label="policy"></textarea>
<div class="row"><button type="button" id="policy-check">Check</button>
<button type="button" id="policy-save">Save</button></div><p id="policy-error"></p></section>
<section id="logs-section"><h2>Recent logs</h2><p id="logs-error"></p><pre id="logs"></pre></section>
</div></main>
<script src="/admin/admin.js"></script></body></html>
"""

ADMIN_CSS = """
* { box-sizing: border-box; }
body { margin: 0; font: 15px/1.4 system-ui, sans-serif; color: #1d2330; background: #f3f4f7; }
header { background: #1d2330; color: #fff; padding: .5em 1em; display: flex; flex-wrap: wrap; gap: .2em 1.5em;
         align-items: baseline; }
header h1 { margin: 0; font-size: 1.3em; }
header a { color: #cfe0ff; margin-right: .6em; }
main { max-width: 1100px; margin: 0 auto; padding: .5em; }
section, form#signin { background: #fff; border-radius: 8px; padding: .6em 1em; margin: .8em 0;
                       box-shadow: 0 1px 3px #0002; }
h2 { font-size: 1.1em; margin: .3em 0 .5em; }
h3 { font-size: 1em; margin: 0 0 .3em; word-break: break-all; }
.cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(300px, 1fr)); gap: .6em; }
.card { border: 1px solid #d8dbe3; border-radius: 6px; padding: .5em .7em; }
.meta { margin: .1em 0; color: #535b6b; font-size: .9em; word-break: break-word; }
.row { display: flex; flex-wrap: wrap; gap: .4em; align-items: center; margin: .35em 0; }
input, select, button, textarea { font: inherit; padding: .35em .5em; border: 1px solid #b9bfcc; border-radius: 5px; }
input, select { min-width: 0; max-width: 100%; }
button { background: #2456c7; color: #fff; border-color: #2456c7; cursor: pointer; min-height: 2.2em; }
button.danger { background: #b3261e; border-color: #b3261e; }
button:disabled { opacity: .6; }
textarea { width: 100%; font-family: ui-monospace, monospace; font-size: 13px; }
pre { white-space: pre-wrap; word-break: break-all; background: #f3f4f7; padding: .5em; border-radius: 5px;
      max-height: 24em; overflow: auto; font-size: 12px; }
ul { padding-left: 1.2em; } li { margin: .3em 0; } li.invalid { color: #8a8f99; }
.error { color: #b3261e; font-weight: 600; white-space: pre-wrap; } .ok { color: #1e7b34; }
.dot { display: inline-block; width: .7em; height: .7em; border-radius: 50%; margin-right: .4em; }
.dot.on { background: #1e9e4a; } .dot.off { background: #9aa0ab; }
.route { display: inline-block; margin-right: .8em; }
.qr { width: min(300px, 80vw); margin: .5em 0; } .qr svg { width: 100%; height: auto; display: block; }
#graph svg { width: 100%; max-width: 600px; height: auto; display: block; margin: 0 auto; }
#graph text { font-size: 15px; fill: #1d2330; }
.edge { stroke-width: 3; } .edge.direct { stroke: #1e9e4a; } .edge.relayed { stroke: #e08a00; }
.edge.offline { stroke: #b0b5bf; stroke-dasharray: 6 5; }
circle.node.on { fill: #2456c7; } circle.node.off { fill: #b0b5bf; } circle.box { fill: #1d2330; }
.legend .key { display: inline-block; width: 1.6em; height: .3em; margin: 0 .3em .2em 1em; vertical-align: middle; }
.key.direct { background: #1e9e4a; } .key.relayed { background: #e08a00; } .key.offline { background: #b0b5bf; }
.bar { text-align: right; margin: 0; }
@media (max-width: 600px) { main { padding: .2em; } section { padding: .5em .6em; } .cards { grid-template-columns: 1fr; } }
"""

ADMIN_JS = r""""use strict";
// meshbox admin page: every action is a call to /api/v2 with the session
// cookie and the CSRF token the sign-in returned.
let csrf = "", policyEtag = null, users = [];
const loginServer = document.body.dataset.loginServer, gatewayUser = document.body.dataset.gatewayUser;
const $ = (selector) => document.querySelector(selector);

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (v !== false && v !== null && v !== undefined) node.setAttribute(k, v === true ? "" : v);
  }
  for (const child of children.flat()) node.append(child instanceof Node ? child : String(child ?? ""));
  return node;
}

async function api(method, path, body, hujson) {
  const headers = {"X-CSRF-Token": csrf, "Accept": hujson !== undefined ? "application/hujson" : "application/json"};
  let data;
  if (hujson !== undefined && method !== "GET") { headers["Content-Type"] = "application/hujson"; data = hujson; }
  else if (body !== undefined) { headers["Content-Type"] = "application/json"; data = JSON.stringify(body); }
  const response = await fetch("/api/v2/" + path, {method, headers, body: data, credentials: "same-origin"});
  const text = await response.text();
  if (!response.ok) {
    let message = response.status + " " + response.statusText;
    try { message = JSON.parse(text).message || message; } catch (e) { /* not JSON */ }
    throw new Error(message);
  }
  return {text, etag: response.headers.get("ETag"), json: () => (text ? JSON.parse(text) : {})};
}

async function apiJSON(method, path, body) {
  return (await api(method, path, body)).json();
}

function report(where, error) {
  const box = $(where);
  box.textContent = error ? error.message || String(error) : "";
  box.className = error ? "error" : "";
}

// An action button: runs fn, reports its error beside the section, reloads.
function action(label, fn, where, cls) {
  return el("button", {type: "button", class: cls || "", onclick: async (event) => {
    event.target.disabled = true;
    try { await fn(event); report(where, null); await refresh(); }
    catch (e) { report(where, e); }
    finally { event.target.disabled = false; }
  }}, label);
}

function confirmFirst(label, fn, where) {
  const button = action(label, async (event) => {
    if (!button.dataset.armed) { button.dataset.armed = "1"; button.textContent = "Sure? " + label; throw null; }
    await fn(event);
  }, where, "danger");
  return button;
}

async function qrInto(box, text) {
  const svg = (await api("POST", "tailnet/-/qr", {text})).text;
  const image = new DOMParser().parseFromString(svg, "image/svg+xml").documentElement;
  box.replaceChildren(document.importNode(image, true));
}

function copyButton(text) {
  return el("button", {type: "button", onclick: async (e) => {
    try { await navigator.clipboard.writeText(text); e.target.textContent = "Copied"; }
    catch (err) { e.target.textContent = "Select and copy by hand"; }
  }}, "Copy");
}

function ago(time) {
  if (!time || time.startsWith("0001")) return "never";
  const seconds = Math.max(0, (Date.now() - Date.parse(time)) / 1000);
  if (seconds < 90) return "just now";
  if (seconds < 5400) return Math.round(seconds / 60) + " min ago";
  if (seconds < 129600) return Math.round(seconds / 3600) + " h ago";
  return Math.round(seconds / 86400) + " days ago";
}

// How a node reaches the others, as far as the control server knows.
function pathKind(d) {
  if (!d.connectedToControl) return "offline";
  const c = d.clientConnectivity || {};
  const udp = (c.clientSupports || {}).udp;
  return udp !== false && (c.endpoints || []).length ? "direct" : "relayed";
}

function nodeCard(d) {
  const where = "#nodes-error";
  const kind = pathKind(d);
  const name = el("input", {value: d.name.split(".")[0], "aria-label": "name", size: 16});
  const tags = el("input", {value: d.tags.join(","), placeholder: "tag:server,tag:web", "aria-label": "tags", size: 20});
  const routes = d.advertisedRoutes.map((route) => {
    const on = d.enabledRoutes.includes(route);
    return el("label", {class: "route"}, el("input", {type: "checkbox", checked: on, onchange: async (e) => {
      const wanted = e.target.checked ? [...d.enabledRoutes, route] : d.enabledRoutes.filter((r) => r !== route);
      try { await api("POST", `device/${d.id}/routes`, {routes: wanted}); report(where, null); }
      catch (err) { report(where, err); }
      await refresh();
    }}), route === "0.0.0.0/0" || route === "::/0" ? route + " (exit node)" : route);
  });
  const c = d.clientConnectivity || {};
  return el("article", {class: "card node", "data-id": d.id},
    el("h3", {}, el("span", {class: "dot " + (d.connectedToControl ? "on" : "off"),
                              title: d.connectedToControl ? "online" : "offline"}), d.name),
    el("p", {class: "meta"}, d.addresses.join(" · ")),
    el("p", {class: "meta"}, `${d.os || "?"} ${d.clientVersion || ""} · ${d.user} · last seen ${ago(d.lastSeen)}`),
    el("p", {class: "meta"}, `path: ${kind}` + (c.nat ? ` · NAT ${c.nat}` : "") +
       ((c.endpoints || []).length ? ` · endpoints ${c.endpoints.join(", ")}` : "") +
       (d.keyExpiryDisabled ? " · key never expires" : ` · key expires ${d.expires.slice(0, 10)}`)),
    routes.length ? el("div", {class: "routes"}, "Routes: ", routes) : "",
    el("div", {class: "row"}, name, action("Rename", () => api("POST", `device/${d.id}/name`, {name: name.value}), where)),
    el("div", {class: "row"}, tags, action("Set tags", () => api("POST", `device/${d.id}/tags`,
      {tags: tags.value.split(",").map((t) => t.trim()).filter(Boolean)}), where)),
    el("div", {class: "row"},
      action("Expire key", () => api("POST", `device/${d.id}/expire`), where),
      d.keyExpiryDisabled ? "" : action("Key never expires", () => api("POST", `device/${d.id}/key`, {keyExpiryDisabled: true}), where),
      confirmFirst("Delete", () => api("DELETE", `device/${d.id}`), where)));
}

// The users a device may join as, people first (the box's own user owns its WireGuard devices).
function userOptions() {
  const people = users.filter((u) => u.loginName !== gatewayUser), box = users.filter((u) => u.loginName === gatewayUser);
  return [...people, ...box].map((u) => el("option", {value: u.loginName}, u.loginName));
}

function userSelect() {
  return el("select", {"aria-label": "user"}, userOptions());
}

function drawGraph(all) {
  const devices = all.filter((d) => !d.meshboxGateway);   // the box's own WireGuard node is the centre
  const ns = "http://www.w3.org/2000/svg";
  const svg = (tag, attrs, text) => {
    const node = document.createElementNS(ns, tag);
    for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
    if (text !== undefined) node.textContent = text;
    return node;
  };
  const size = 600, centre = size / 2, radius = devices.length > 1 ? 220 : 160;
  const picture = svg("svg", {viewBox: `0 0 ${size} ${size}`, role: "img", "aria-label": "the tailnet"});
  devices.forEach((d, i) => {
    const angle = 2 * Math.PI * i / Math.max(devices.length, 1) - Math.PI / 2;
    const x = centre + radius * Math.cos(angle), y = centre + radius * Math.sin(angle);
    const kind = pathKind(d);
    picture.append(svg("line", {x1: centre, y1: centre, x2: x, y2: y, class: "edge " + kind}));
    picture.append(svg("circle", {cx: x, cy: y, r: 14, class: "node " + (d.connectedToControl ? "on" : "off")}));
    picture.append(svg("text", {x, y: y + 30, "text-anchor": "middle"}, d.name.split(".")[0]));
  });
  picture.append(svg("circle", {cx: centre, cy: centre, r: 24, class: "box"}));
  picture.append(svg("text", {x: centre, y: centre + 44, "text-anchor": "middle", class: "boxlabel"}, "meshbox"));
  $("#graph").replaceChildren(picture);
}

async function loadNodes() {
  const devices = (await apiJSON("GET", "tailnet/-/devices?fields=all")).devices;
  $("#nodes").replaceChildren(...(devices.length ? devices.map(nodeCard) : [el("p", {}, "No nodes yet.")]));
  drawGraph(devices);
}

async function loadLogins() {
  const logins = (await apiJSON("GET", "tailnet/-/logins")).logins;
  $("#logins").replaceChildren(...(logins.length ? logins.map((l) => {
    const who = userSelect();
    return el("article", {class: "card login"}, el("h3", {}, l.hostname),
      el("p", {class: "meta"}, `asked ${ago(l.created)}` + (l.requested_tags.length ? ` · tags ${l.requested_tags.join(",")}` : "")),
      el("div", {class: "row"}, "as user ", who,
         action("Approve", () => api("POST", `tailnet/-/logins/${encodeURIComponent(l.key)}/approve`, {user: who.value}), "#logins-error")));
  }) : [el("p", {}, "No login is waiting.")]));
}

async function loadKeys() {
  const keys = (await apiJSON("GET", "tailnet/-/keys")).keys;
  $("#keys").replaceChildren(...keys.map((k) => {
    const caps = k.keyType === "auth" ? k.capabilities.devices.create : null;
    const what = caps ? `${k.userId} · ${caps.reusable ? "reusable" : "one use"}${caps.ephemeral ? " · ephemeral" : ""}` +
      (caps.tags.length ? " · " + caps.tags.join(",") : "") : `OAuth client · ${k.scopes.join(" ")}`;
    return el("li", {class: k.invalid ? "invalid" : ""}, `${k.id} · ${what} · expires ${(k.expires || "").slice(0, 16)}` +
      (k.invalid ? " · invalid" : " "), k.invalid ? "" : action("Expire", () => api("DELETE", `tailnet/-/keys/${k.id}`), "#keys-error"));
  }));
  const chosen = $("#key-user").value;
  $("#key-user").replaceChildren(...userOptions());
  if (users.some((u) => u.loginName === chosen)) $("#key-user").value = chosen;
}

async function createKey() {
  const days = Number($("#key-days").value) || 1;
  const tags = $("#key-tags").value.split(",").map((t) => t.trim()).filter(Boolean);
  const key = (await api("POST", "tailnet/-/keys", {user: $("#key-user").value, expirySeconds: Math.round(days * 86400),
    capabilities: {devices: {create: {reusable: $("#key-reusable").checked, ephemeral: $("#key-ephemeral").checked,
                                      preauthorized: true, tags}}}})).json();
  const command = `tailscale up --login-server ${loginServer} --auth-key ${key.key}`;
  const qr = el("div", {class: "qr", id: "key-qr"});
  $("#new-key").replaceChildren(el("p", {}, "Shown only now:"), el("pre", {id: "key-command"}, command), copyButton(command), qr);
  await qrInto(qr, command);
}

async function loadWireguard() {
  const devices = (await apiJSON("GET", "tailnet/-/wireguard-devices")).devices;
  $("#wg").replaceChildren(...devices.map((d) => el("li", {}, `${d.name} · ${d.ipv4} · ${d.ipv6} · ${d.user}` +
    (d.full_tunnel ? " · all traffic" : ""), confirmFirst("Remove", () => api("DELETE", `tailnet/-/wireguard-devices/${encodeURIComponent(d.name)}`), "#wg-error"))));
}

async function addWireguard() {
  const added = (await api("POST", "tailnet/-/wireguard-devices", {name: $("#wg-name").value, fullTunnel: $("#wg-full").checked})).json();
  const qr = el("div", {class: "qr", id: "wg-qr"});
  $("#new-wg").replaceChildren(el("p", {}, "Scan with the WireGuard app; the key is not kept:"), el("pre", {}, added.config), qr);
  await qrInto(qr, added.config);
}

async function loadUsers() {
  users = (await apiJSON("GET", "tailnet/-/users")).users;
  $("#users").replaceChildren(...users.map((u) => el("li", {}, `${u.loginName} · ${u.deviceCount} device(s)` +
    (u.currentlyConnected ? " · online" : ""), confirmFirst("Delete", () => api("POST", `users/${u.id}/delete`), "#users-error"))));
}

async function loadPolicy() {
  const policy = await api("GET", "tailnet/-/acl", undefined, "");
  if (document.activeElement !== $("#policy")) $("#policy").value = policy.text;
  policyEtag = policy.etag;
}

function showPolicyError(message) {
  const box = $("#policy-error");
  box.textContent = message;
  box.className = message ? "error" : "ok";
  const line = /line (\d+)/.exec(message || "");
  if (line) {   // put the cursor on the line the error names
    const lines = $("#policy").value.split("\n"), n = Math.min(Number(line[1]), lines.length) - 1;
    const start = lines.slice(0, n).reduce((sum, l) => sum + l.length + 1, 0);
    $("#policy").focus();
    $("#policy").setSelectionRange(start, start + lines[n].length);
  }
}

async function checkPolicy() {
  const answer = (await api("POST", "tailnet/-/acl/validate", undefined, $("#policy").value)).json();
  showPolicyError(answer.message || "");
  if (!answer.message) $("#policy-error").textContent = "The policy is valid.";
}

async function savePolicy() {
  const response = await fetch("/api/v2/tailnet/-/acl", {method: "POST", credentials: "same-origin", body: $("#policy").value,
    headers: {"X-CSRF-Token": csrf, "Content-Type": "application/hujson", "Accept": "application/hujson", "If-Match": policyEtag || ""}});
  const text = await response.text();
  if (!response.ok) { showPolicyError(JSON.parse(text).message); return; }
  policyEtag = response.headers.get("ETag");
  showPolicyError("");
  $("#policy-error").textContent = "Saved; the nodes have the new policy.";
}

async function loadLogs() {
  $("#logs").textContent = (await apiJSON("GET", "tailnet/-/logs?lines=200")).logs.join("\n");
}

async function refresh() {
  await loadUsers();
  for (const [load, where] of [[loadNodes, "#nodes-error"], [loadLogins, "#logins-error"], [loadKeys, "#keys-error"],
                               [loadWireguard, "#wg-error"], [loadLogs, "#logs-error"]]) {
    try { await load(); } catch (e) { report(where, e); }
  }
}

async function enter(answer) {
  csrf = answer.csrf;
  $("#signin").hidden = true;
  $("#app").hidden = false;
  await refresh();
  await loadPolicy();
}

async function signIn(event) {
  event.preventDefault();
  const response = await fetch("/admin/session", {method: "POST", credentials: "same-origin",
    headers: {"Content-Type": "application/json"}, body: JSON.stringify({key: $("#apikey").value})});
  const answer = await response.json();
  $("#apikey").value = "";
  if (!response.ok) { report("#signin-error", new Error(answer.message)); return; }
  await enter(answer);
}

async function signOut() {
  await fetch("/admin/session", {method: "DELETE", credentials: "same-origin", headers: {"X-CSRF-Token": csrf}});
  location.reload();
}

function wire(id, fn, where) {
  $(id).addEventListener("click", async (e) => {
    e.preventDefault();
    try { await fn(); report(where, null); await refresh(); } catch (err) { report(where, err); }
  });
}

$("#signin").addEventListener("submit", signIn);
$("#signout").addEventListener("click", signOut);
wire("#key-create", createKey, "#keys-error");
wire("#wg-add", addWireguard, "#wg-error");
wire("#user-create", () => api("POST", "tailnet/-/users", {name: $("#user-name").value}), "#users-error");
$("#policy-check").addEventListener("click", () => checkPolicy().catch((e) => showPolicyError(e.message)));
$("#policy-save").addEventListener("click", () => savePolicy().catch((e) => showPolicyError(e.message)));
$("#refresh").addEventListener("click", refresh);
fetch("/admin/session", {credentials: "same-origin"}).then(async (r) => { if (r.ok) await enter(await r.json()); });
setInterval(() => { if (csrf && document.visibilityState === "visible") loadNodes().catch(() => {}); }, 15000);
"""

ADMIN_PAGE_FILES = {("GET", "/admin/admin.css"): ("text/css; charset=utf-8", ADMIN_CSS),
                    ("GET", "/admin/admin.js"): ("text/javascript; charset=utf-8", ADMIN_JS)}


def admin_page(login_server, oidc=False):
    """The admin page's HTML, which tells its script the URL devices log in at (and, with oidc, offers
    the sign-in at the identity provider)."""
    link = ' <a href="/admin/oidc" id="oidc-signin">or sign in with your identity provider</a>' if oidc else ""
    return ADMIN_HTML.replace("{login_server}", html_text(login_server)).replace(
        "{gateway_user}", GATEWAY_USER).replace("{oidc_link}", link)


# ---- Web front ----
# What people and their tools reach over HTTP: the login request pages, the
# OIDC callback, the admin page and its sign-in, and the two APIs, with the
# lockout of addresses whose credentials keep being refused.

def register_page(request_id):
    """What a person sees at a client's AuthURL: the command that approves it."""
    safe = "".join(c for c in request_id if c.isalnum() or c in "-_")[:64]
    return f"""<!doctype html><title>meshbox: approve this device</title>
<h1>Approve this device</h1>
<p>An administrator of this meshbox approves the device with:</p>
<pre>meshbox nodes register --user USER --key {safe}</pre>
<p>The device joins as soon as the command runs; the request expires in {AUTH_REQUEST_TTL // 60} minutes.</p>"""


def message_page(title, message):
    """A small HTML page: a heading and one message."""
    return f"""<!doctype html><title>meshbox: {html_text(title)}</title>
<h1>{html_text(title)}</h1>
<p>{html_text(message)}</p>"""


def landing_page(url):
    return f"""<!doctype html><title>meshbox</title>
<h1>meshbox is running</h1>
<p>Join a device to this tailnet:</p>
<pre>meshbox preauthkeys create --user NAME
tailscale up --login-server {url} --auth-key KEY</pre>"""


class WebFront:
    """The HTTP routes for people and their tools, with what they keep:
    admin page sessions, OAuth access tokens, refused-credential counts."""

    def __init__(self, server):
        self.server = server
        self.admin_sessions = AdminSessions()
        # API keys, OAuth secrets and sign-ins that fail are limited per
        # address as refused registrations are (192-bit secrets cannot be
        # guessed; this keeps a stranger from spending the box's CPU on tries).
        self.failed_credentials = AttemptLimiter(REGISTER_ATTEMPT_BURST, REGISTER_ATTEMPT_INTERVAL,
                                                 REGISTER_ATTEMPT_KEYS)
        self.oauth_tokens = OAuthTokens()

    # interactive login: the AuthURL shows the approve command, or sends the
    # person to the identity provider, who sends them back to /oidc/callback
    async def show_login_request(self, request_id, writer):
        if self.server.oidc is None:
            writer.write(http_response(200, register_page(request_id), "text/html; charset=utf-8"))
            return
        if request_id not in self.server.coordinator.registrar.auth_requests:
            raise HttpError(404, "this login request is unknown or has expired: log in again on the device")
        try:
            url = await self.server.oidc.authorization_url(request_id)
        except OidcError as e:
            log.error("OIDC sign-in unavailable: %s", e)
            writer.write(http_response(503, message_page("Sign-in is unavailable", str(e)), "text/html; charset=utf-8"))
            return
        writer.write(http_response(302, b"", headers=[("Location", url)]))

    async def finish_oidc_login(self, query, writer, peer):
        try:
            request_id, identity = await self.server.oidc.finish(query)
            if request_id.startswith(ADMIN_SIGN_IN):
                self.finish_admin_sign_in(identity, writer, peer)
                return
            if request_id not in self.server.coordinator.registrar.auth_requests:
                raise OidcError("the device's login request has expired: log in again on the device")
            user = self.server.coordinator.registrar.user_signing_in(identity["name"])
            result = self.server.coordinator.registrar.approve(request_id, user.id)
            if "Error" in result:
                raise OidcError(result["Error"])
        except (OidcError, ValueError) as e:
            log.warning("OIDC sign-in from %s refused: %s", peer, e)
            writer.write(http_response(403, message_page("Sign-in refused", str(e)), "text/html; charset=utf-8"))
            return
        log.info("OIDC: %s (%s) signed in and approved login request %s", user.name, identity["display_name"],
                 request_id)
        writer.write(http_response(200, message_page("Signed in", f"Signed in as {user.name}; the device is joining."),
                                   "text/html; charset=utf-8"))

    def finish_admin_sign_in(self, identity, writer, peer):
        """An admin back from the identity provider: a session cookie, and on to the page."""
        if identity["name"] not in self.server.config.oidc_admins:
            log.warning("OIDC: %s signed in at %s but is not one of oidc_admins", identity["name"], peer)
            writer.write(http_response(403, message_page("Not an admin", f"{identity['name']} is not one of this "
                                                         "meshbox's oidc_admins."), "text/html; charset=utf-8"))
            return
        token, _ = self.admin_sessions.create(None)
        log.info("OIDC: %s signed in to the admin page", identity["name"])
        secure = self.server.config.public_url().startswith("https://")
        writer.write(http_response(302, b"", headers=[("Location", "/admin"), ("Cache-Control", "no-store"),
                                                      ("Set-Cookie", admin_cookie(token, secure))]))

    def credentials_locked_out(self, peer):
        """Why an address whose credentials kept being refused is turned away (429), or ""."""
        wait = self.failed_credentials.wait(address_block(peer.rpartition(":")[0]), now())
        return f"too many refused API keys or sign-ins from this address, try again in {math.ceil(wait)} s" \
            if wait else ""

    def credentials_refused(self, peer):
        """Count a refused API key, token or sign-in against its address; log the one that locks it out."""
        self.server.metrics["api_refused"] += 1
        block = address_block(peer.rpartition(":")[0])
        if self.failed_credentials.failed(block, now()):
            log.warning("too many refused API keys or sign-ins from address %s: refused for %d s",
                        block, math.ceil(self.failed_credentials.wait(block, now())))

    async def handle_api(self, request, reader, writer, peer):
        """/api/v1/NOUN[/VERB]: the CLI's verbs for remote callers with an API key."""
        locked_out = self.credentials_locked_out(peer)
        if locked_out:
            writer.write(http_response(429, json_bytes({"error": locked_out}), "application/json"))
            return
        token = request.headers.get("authorization", "")
        if not token.startswith("Bearer ") or not api_key_valid(self.server.store, token[7:].strip()):
            self.credentials_refused(peer)
            writer.write(http_response(401, json_bytes({"error": "missing or invalid API key"}), "application/json"))
            return
        body = await read_request_body(request, reader)
        try:
            params = parse_json(body) if body else {}
            if not isinstance(params, dict):
                raise InvalidInput("the body must be a JSON object")
        except ValueError as e:
            writer.write(http_response(400, json_bytes({"error": f"malformed JSON body: {e}"}), "application/json"))
            return
        parts = request.path[len("/api/v1/"):].strip("/").split("/")
        noun, verb = parts[0], (parts[1] if len(parts) > 1 else ("list" if request.method == "GET" else None))
        if noun in ("status", "netmap", "logs", "paths"):
            verb = None
        answer = await self.server.run_admin(noun, verb, params)
        writer.write(http_response(400 if "error" in answer else 200, json_bytes(answer), "application/json"))

    def api_caller_scopes(self, request):
        """The API v2 scopes of a request's caller, None when unknown: an API key (HTTP Bearer, or Basic
        with the key as the user, as Tailscale's clients send it) or the admin page's session cookie with
        its CSRF token may do everything; an OAuth access token (Bearer) what its client's scopes say."""
        everything = frozenset({"all"})
        scheme, _, value = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer":
            if value.strip().startswith(OAUTH_SECRET_PREFIX):
                return self.oauth_tokens.scopes(self.server.store, value.strip())
            return everything if api_key_valid(self.server.store, value.strip()) else None
        if scheme.lower() == "basic":
            try:
                user = base64.b64decode(value.strip(), validate=True).decode().partition(":")[0]
            except (binascii.Error, UnicodeDecodeError):
                return None
            return everything if api_key_valid(self.server.store, user) else None
        valid = self.admin_sessions.valid(self.server.store, request_cookie(request, SESSION_COOKIE),
                                          request.headers.get(CSRF_HEADER, ""))
        return everything if valid else None

    async def handle_api_v2(self, request, reader, writer, peer):
        """Tailscale's API v2 (see ApiV2): errors answer as Tailscale's do, {"message": ...}."""
        headers = [("Cache-Control", "no-store")]
        try:
            locked_out = self.credentials_locked_out(peer)
            if locked_out:
                raise HttpError(429, locked_out)
            body = await read_request_body(request, reader)
            if request.path.rstrip("/") == API_V2_PREFIX + "oauth/token" and request.method == "POST":
                status, token = self.oauth_tokens.answer(self.server.store, request, body)
                if status == 401:
                    self.credentials_refused(peer)
                writer.write(http_response(status, json_bytes(token), "application/json", headers))
                return
            scopes = self.api_caller_scopes(request)
            if scopes is None:
                self.credentials_refused(peer)
                raise HttpError(401, "API token invalid")
            status, content_type, answer, extra = await ApiV2(self.server).answer(
                request.method, request.path, ApiRequest(request.method, request.query, request.headers, body), scopes)
            headers += extra
        except HttpError as e:
            status, content_type, answer = e.status, "application/json", json_bytes({"message": str(e)})
        writer.write(http_response(status, answer, content_type, headers))

    async def handle_admin_page(self, request, reader, writer, peer):
        """The admin page, its script and style, and its sign-in (a cookie session for an API key)."""
        path, method = request.path.rstrip("/") or "/admin", request.method
        secure = writer.get_extra_info("sslcontext") is not None or self.server.config.public_url().startswith("https://")
        if path == "/admin/session":
            body = await read_request_body(request, reader)
            locked_out = self.credentials_locked_out(peer) if method == "POST" else ""
            if locked_out:
                status, answer, headers = 429, {"message": locked_out}, []
            else:
                status, answer, headers = self.admin_sessions.answer(self.server.store, request, body, secure)
            if method == "POST" and status == 401:
                self.credentials_refused(peer)
            writer.write(http_response(status, json_bytes(answer), "application/json",
                                       headers + [("Cache-Control", "no-store")]))
        elif (method, path) == ("GET", "/admin"):
            oidc = bool(self.server.oidc and self.server.config.oidc_admins)
            writer.write(http_response(200, admin_page(self.server.config.public_url(), oidc), "text/html; charset=utf-8",
                                       ADMIN_PAGE_HEADERS))
        elif (method, path) == ("GET", "/admin/oidc") and self.server.oidc and self.server.config.oidc_admins:
            try:     # a sign-in of its own each time: one person's reloads push out no other's
                url = await self.server.oidc.authorization_url(ADMIN_SIGN_IN + secrets.token_urlsafe(12))
            except OidcError as e:
                raise HttpError(503, f"sign-in is unavailable: {e}") from None
            writer.write(http_response(302, b"", headers=[("Location", url), ("Cache-Control", "no-store")]))
        elif (method, path) in ADMIN_PAGE_FILES:
            content_type, content = ADMIN_PAGE_FILES[(method, path)]
            writer.write(http_response(200, content, content_type, ADMIN_PAGE_HEADERS))
        else:
            raise HttpError(404, f"{path} is not served here")


# ---- Server ----
# ``serve``: the listeners (control HTTP, DERP over TLS, STUN, the local
# admin socket), the background upkeep, and a clean stop.

CONTROL_UPGRADE = "tailscale-control-protocol"
HANDSHAKE_HEADER = "x-tailscale-handshake"
TRIM_AFTER_MAP_BYTES = 4 << 20    # hand freed heap back after this much map traffic


def release_free_memory():
    """Hand freed heap back to the system (glibc keeps it otherwise): compiling
    this file at start and compiling policies leave megabytes behind."""
    if ctypes is None:
        return
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):      # not glibc (musl has no malloc_trim)
        pass


# Connection budgets.  max_connections counts every connection from its
# accept (TLS ones before their handshake); once the request head says what
# a connection is, it also takes a place in its kind's budget, so a flood of
# one kind cannot starve the others.  Until it proves something (a
# registered node, an admitted DERP key) it also counts against its source
# address, so one stranger cannot lock out the tailnet's nodes.
TLS_HANDSHAKE_TIMEOUT = 10   # seconds from accept to a finished TLS handshake (asyncio's default: 60)


def connection_source(address):
    """What a connection from peername address counts against (address_block of its host)."""
    return address_block(address[0]) if address else "?"


class ConnectionBudgets:
    """Open connections by kind, and unproven ones by source address."""

    def __init__(self, limits, per_source):
        self.limits, self.per_source = limits, per_source
        self.open = collections.Counter()
        self.unproven = collections.Counter()

    def admit(self, source):
        """A ConnectionTicket for a new connection, or None when source holds its share."""
        if self.unproven[source] >= self.per_source:
            return None
        self.unproven[source] += 1
        return ConnectionTicket(self, source)


class ConnectionTicket:
    """One connection's places in the budgets, given back by release()."""

    __slots__ = ("budgets", "source", "kind", "proven")

    def __init__(self, budgets, source):
        self.budgets, self.source, self.kind, self.proven = budgets, source, None, False

    def enter(self, kind):
        """Take a place in kind's budget; False when it is full."""
        if self.budgets.open[kind] >= self.budgets.limits[kind]:
            return False
        self.budgets.open[kind] += 1
        self.kind = kind
        return True

    def prove(self):
        """The connection showed a node or an admitted key: its address stops paying for it."""
        if not self.proven:
            self.proven = True
            unproven = self.budgets.unproven
            unproven[self.source] -= 1
            if not unproven[self.source]:
                del unproven[self.source]

    def release(self):
        """Give back its place in its kind's budget, and its address's while unproven."""
        if self.kind is not None:
            self.budgets.open[self.kind] -= 1
            self.kind = None
        self.prove()


class Server:
    """A running meshbox: store, coordinator, DERP, STUN and their listeners."""

    def __init__(self, config):
        self.config = config
        self.refusals = {}
        self.listeners = []
        self.tasks = []
        self.connections = {}       # handler task -> its writer, closed on stop
        self.wireguard_stats = {}   # node key -> the gateway's handshake and byte counters
        self.metrics = collections.Counter()
        self.derp_nodes = None      # node key -> node, for DERP admission; None after a change
        self.recent_logs = RecentLogs()
        self.web = WebFront(self)
        self.stopping = asyncio.Event()

    def _open_state(self):
        self.store = open_state(self.config.state_dir)
        self.noise_private = self.store.secret("noise_private", new_private_key)
        self.challenge_private = self.store.secret("challenge_private", new_private_key)
        self.noise_public = x25519_public(self.noise_private)
        challenge = json_bytes({"nodeKeyChallenge": key_text("chalpub", x25519_public(self.challenge_private))})
        self.early_payload = EARLY_PAYLOAD_MAGIC + struct.pack(">I", len(challenge)) + challenge
        admit = None if self.config.derp_serve_any else self.derp_refusal
        self.derp = DerpServer(self.store.secret("derp_private", new_private_key), admit) \
            if self.config.derp_address() else None
        if self.derp:
            self.derp.name_of = self.derp_client_name

    def derp_node(self, key):
        """The node whose key a DERP client has, or None."""
        if self.derp_nodes is None:       # rebuilt after a change: DERP asks once per client
            self.derp_nodes = {n.node_key: n for n in self.coordinator.nodes.values()}
        return self.derp_nodes.get(key)

    def derp_client_name(self, key):
        node = self.derp_node(key)
        return node.given_name if node else short_key(key)

    def derp_refusal(self, key):
        """Why a DERP client key is not served (None: it is a live node's, the box's included)."""
        node = self.derp_node(key)
        if node is None:
            return "this key is not a node of this tailnet (meshbox serves only its nodes; see derp_serve_any)"
        if is_expired(node, now()):
            return "this node's key has expired: log in again"
        return None

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
        write_file_atomically(cert_path, pem(der, "CERTIFICATE"))
        write_file_atomically(key_path, ed25519_private_key_pem(seed))
        return tls_server_context(cert_path, key_path), certificate_pin(der)

    async def start(self):
        config = self.config
        config.check()
        self.budgets = ConnectionBudgets(
            {kind: int(getattr(config, f"max_{kind}_connections")) for kind in ("control", "derp", "http")},
            int(config.max_connections_per_source))
        self.oidc = OidcLogin(config) if config.oidc_issuer else None
        if crypto_backend_problem():
            raise Unavailable(crypto_backend_problem())
        self.recent_logs.setFormatter(log_formatter(config))
        log.addHandler(self.recent_logs)
        if self.oidc and not any(self.oidc.allowed):
            log.warning("OIDC: every account of %s may sign in and join the tailnet: no oidc_allowed_domains, "
                        "oidc_allowed_users or oidc_allowed_groups is set (set one to narrow who may)",
                        config.oidc_issuer)
        self._open_state()
        loop = asyncio.get_running_loop()
        derp_port, stun_ports = 0, []
        cert_name = ""
        if config.derp_address():
            if ssl is None:
                raise Unavailable("DERP needs TLS but this Python has no ssl module "
                                  "(OpenWrt: opkg install python3-openssl), or use --derp-listen off")
            context, cert_name = self._derp_certificate()
            host, derp_port = config.derp_address()
            self.listeners.append(await asyncio.start_server(
                lambda r, w: self.handle_http(r, w, tls=context), host, derp_port))
        self.stun_transports = []
        for host, stun_port in config.stun_addresses():
            transport, _ = await loop.create_datagram_endpoint(StunProtocol, local_addr=(host, stun_port))
            self.stun_transports.append(transport)
            stun_ports.append(stun_port)
        settings = MapSettings(
            base_domain=config.base_domain,
            derp_map=derp_map(config.public_host(), derp_port, stun_ports, cert_name) if derp_port else {"Regions": {}},
            dns_config=tailnet_dns_config(config, dns_settings(self.store, config)),
            control_url=config.public_url(),
            node_caps={CAP_SSH: None, **({CAP_FILE_SHARING: None} if config.taildrop else {})},
            cert_domains=bool(config.dns_hook))
        expiry = 0 if str(config.node_expiry) == "0" else parse_duration(config.node_expiry)
        self.coordinator = Coordinator(self.store, settings, config.prefix_v4, config.prefix_v6, expiry)
        if self.coordinator.policy_views.refused:      # allowing everything instead would open the tailnet
            raise PolicyError(f"the stored policy is refused: {self.coordinator.policy_views.refused} (replace it: "
                              "meshbox policy set FILE, or meshbox policy clear)")
        self.follower = TailnetFollower(config, self.store, self.coordinator, self.derp)
        self.coordinator.fanout.on_change = self.tailnet_changed
        self.control_context = ControlContext(self.coordinator, config, self.metrics, self.refusals)
        self.tailnet_changed()
        self.policy_mtime = None
        if config.policy_file:
            self.reload_policy_file()
        host, port = config.control_address()
        self.listeners.append(await asyncio.start_server(self.handle_http, host, port))
        admin_path = os.path.join(config.state_dir, "admin.sock")
        if os.path.exists(admin_path):
            os.unlink(admin_path)
        self.listeners.append(await asyncio.start_unix_server(self.handle_admin, admin_path,
                                                              limit=MAX_REQUEST_BODY + 1))   # a large policy fits
        os.chmod(admin_path, 0o600)
        self.tasks.append(asyncio.ensure_future(self.upkeep()))
        if config.gateway:
            await self.follower.start_gateway()
        release_free_memory()
        log.info("meshbox %s serving %s (control on %s:%d, DERP %s, STUN %s), state in %s",
                 VERSION, config.public_url(), host, port,
                 f"TLS port {derp_port}" if derp_port else "off", "ports " + ",".join(map(str, stun_ports)) if stun_ports else "off",
                 os.path.abspath(config.state_dir))

    def store_healthy(self):
        try:
            self.store.data_version()
            return True
        except sqlite3.Error:
            return False

    def reload_policy_file(self):
        """Apply the policy file when it changed; a bad one is logged and ignored."""
        path = self.config.policy_file
        try:
            mtime = os.stat(path).st_mtime_ns
        except OSError as e:
            if self.policy_mtime != "missing":
                log.error("policy file %s: %s; keeping the policy in force", path, e.strerror)
                self.policy_mtime = "missing"
            return
        if mtime == self.policy_mtime:
            return
        self.policy_mtime = mtime
        try:
            self.coordinator.policy_views.set_policy(read_text_file(path, "policy file"))
        except (PolicyError, ValueError) as e:
            log.error("policy file %s refused, keeping the policy in force: %s", path, e)

    async def upkeep(self):
        """Pick up CLI edits quickly; write live fields sparingly."""
        last_flush = time.monotonic()
        bytes_at_trim = bytes_before = 0
        while True:
            await asyncio.sleep(RELOAD_INTERVAL)
            try:
                self.coordinator.reload_if_changed()
                self.coordinator.expire_due(now(), parse_duration(self.config.ephemeral_timeout))
                if self.config.policy_file:
                    self.reload_policy_file()
                if self.derp:
                    self.derp.sweep_pairs()
                if time.monotonic() - last_flush >= FLUSH_INTERVAL:
                    self.coordinator.flush_live()
                    last_flush = time.monotonic()
                # Full maps for a burst of joins leave freed heap behind:
                # hand it back during a long burst and once the burst is over.
                sent = self.metrics["map_bytes"]
                burst_over = sent == bytes_before and sent > bytes_at_trim
                if sent - bytes_at_trim > TRIM_AFTER_MAP_BYTES or burst_over:
                    release_free_memory()
                    bytes_at_trim = sent
                bytes_before = sent
            except (StoreError, sqlite3.Error) as e:
                log.error("state database: %s (will retry)", e)

    def tailnet_changed(self):
        """After any change: DERP asks again who may connect, and the follower catches up."""
        self.derp_nodes = None
        self.follower.changed()

    async def stop(self):
        for task in self.tasks:
            task.cancel()
        await self.follower.stop()
        for listener in self.listeners:
            listener.close()
        for writer in list(self.connections.values()):
            writer.close()
        if self.connections:
            _, pending = await asyncio.wait(list(self.connections), timeout=2)
            # What is left waits on a TLS peer that never answered our close: end it here.
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=1)
        for transport in getattr(self, "stun_transports", ()):
            transport.close()
        try:
            self.coordinator.flush_live()
        except StoreError as e:
            log.error("%s", e)
        log.info("meshbox stopped")
        log.removeHandler(self.recent_logs)

    # HTTP/1.1 requests
    async def handle_http(self, reader, writer, tls=None):
        """One connection from its accept; tls is the DERP port's context, its handshake bounded in time."""
        address = writer.get_extra_info("peername")
        peer = f"{address[0]}:{address[1]}" if address else "?"
        ticket = None
        if len(self.connections) >= int(self.config.max_connections):
            refusal = "too many connections, try again later"
        else:
            ticket = self.budgets.admit(connection_source(address))
            refusal = "too many connections from your address, try again later"
        if ticket is None:
            # Refused before reading a byte: a flood cannot make us buffer or parse.
            self.metrics["connections_turned_away"] += 1
            if tls is None:
                writer.write(http_response(503, refusal + "\n"))
            writer.close()
            return
        self.connections[asyncio.current_task()] = writer
        try:
            if tls is not None:
                await writer.start_tls(tls, ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT)
            request = await asyncio.wait_for(read_http_request(reader), CONTROL_HANDSHAKE_TIMEOUT)
            if request is None:
                return
            control = await self.route_http(request, reader, writer, peer, ticket)
            if control is not None:
                del request       # a control connection lasts hours: keep nothing of its HTTP request
                await control.run(self.early_payload)
        except HttpError as e:
            writer.write(http_response(e.status, e.args[0] + "\n"))
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, ConnectionError, ssl.SSLError if ssl else OSError):
            pass
        except Exception:
            log.exception("error serving %s", peer)
        except asyncio.CancelledError:
            pass    # stop() ended it: a connection task that ends cancelled is an error in 3.11's stream callback
        finally:
            self.connections.pop(asyncio.current_task(), None)
            ticket.release()
            try:
                await drain_within(writer)
                writer.close()
            except (ConnectionError, OSError):
                pass

    async def route_http(self, request, reader, writer, peer, ticket):
        """Answer one HTTP request; for an upgrade to the control protocol,
        the ControlConnection to run."""
        path, upgrade = request.path, request.headers.get("upgrade", "").lower()
        derp = path == "/derp" and upgrade in ("derp", "websocket") and self.derp
        kind = "control" if path == "/ts2021" else "derp" if derp else "http"
        if not ticket.enter(kind):
            self.metrics["connections_turned_away"] += 1
            raise HttpError(503, f"too many {kind} connections, try again later")
        if path == "/key" and request.method == "GET":
            body = {"legacyPublicKey": key_text("mkey", bytes(32)),
                    "publicKey": key_text("mkey", self.noise_public)}
            writer.write(http_response(200, json_bytes(body), "application/json"))
        elif path == "/ts2021":
            return self.upgrade_control(request, upgrade, reader, writer, peer, ticket)
        elif derp:
            await self.derp.handle_upgrade(request.headers, reader, writer, ticket.prove)
        elif path in ("/derp/probe", "/derp/latency-check"):
            writer.write(http_response(200, b""))
        elif path == "/generate_204":
            challenge = request.headers.get("x-tailscale-challenge", "")
            extra = [("X-Tailscale-Response", "response " + challenge)] if challenge.isalnum() and len(challenge) < 64 else []
            writer.write(http_response(204, b"", headers=extra))
        elif path.startswith("/register/") and request.method == "GET":
            await self.web.show_login_request(path.rsplit("/", 1)[-1], writer)
        elif path == "/oidc/callback" and request.method == "GET" and self.oidc:
            await self.web.finish_oidc_login(request.query, writer, peer)
        elif path.startswith("/api/v1/"):
            await self.web.handle_api(request, reader, writer, peer)
        elif path.startswith(API_V2_PREFIX):
            await self.web.handle_api_v2(request, reader, writer, peer)
        elif path == "/admin" or path.startswith("/admin/"):
            await self.web.handle_admin_page(request, reader, writer, peer)
        elif path == "/metrics":
            writer.write(http_response(200, self.metrics_text(), "text/plain; version=0.0.4"))
        elif path == "/health":
            healthy = self.store_healthy()
            writer.write(http_response(200 if healthy else 503, json_bytes(
                {"status": "ok" if healthy else "state database unavailable",
                 "nodes": len(self.coordinator.nodes), "gateway": self.follower.gateway is not None}),
                                   "application/json"))
        elif path == "/":
            writer.write(http_response(200, landing_page(self.config.public_url()), "text/html; charset=utf-8"))
        else:
            raise HttpError(404, f"{path} is not served here")

    def upgrade_control(self, request, upgrade, reader, writer, peer, ticket):
        """Complete the Noise handshake of a control upgrade: its ControlConnection."""
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
            response, noise = noise_respond(self.noise_private, initiation, self.noise_public)
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
        return ControlConnection(self.control_context, stream, out, noise, peer, ticket.prove)

    # local admin socket: live state for the CLI
    async def run_admin(self, noun, verb, params):
        """One administrative verb, run inside the server: {"result": ...} or {"error": ...}."""
        self.wireguard_stats = await self.follower.wireguard_stats()
        try:
            return {"result": Admin(self.store, self.config, self).call(noun, verb, params or {})}
        except MeshboxError as e:
            return {"error": str(e)}

    async def handle_admin(self, reader, writer):
        """The local admin socket: one JSON request line, one JSON answer line."""
        try:
            try:
                line = await asyncio.wait_for(reader.readline(), 10)
            except ValueError:              # longer than the reader's limit
                line = None
            try:
                if line is None:
                    raise InvalidInput(f"larger than {MAX_REQUEST_BODY >> 20} MiB")
                request = parse_json(line or b"{}")
                if not isinstance(request, dict):
                    raise InvalidInput("not a JSON object")
            except ValueError as e:
                answer = {"error": f"malformed admin request: {e}"}
            else:
                answer = await self.run_admin(str(request.get("noun")), request.get("verb"), request.get("params"))
            writer.write(json_bytes(answer) + b"\n")
            await writer.drain()
        except (asyncio.TimeoutError, ConnectionError, asyncio.CancelledError):
            pass    # a cancel is the server stopping (see handle_http)
        finally:
            writer.close()

    def metrics_text(self):
        """Prometheus text exposition of the server's counters and gauges."""
        coordinator, derp = self.coordinator, self.derp.stats() if self.derp else {}
        nodes = list(coordinator.nodes.values())
        lines = []

        def metric(name, kind, help_text, samples):
            lines.append(f"# HELP meshbox_{name} {help_text}")
            lines.append(f"# TYPE meshbox_{name} {kind}")
            for labels, value in samples:
                label_text = "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else ""
                lines.append(f"meshbox_{name}{label_text} {value}")

        metric("nodes", "gauge", "Registered nodes.", [({}, len(nodes))])
        metric("nodes_online", "gauge", "Nodes with a map session.", [({}, sum(n.online for n in nodes))])
        metric("map_sessions", "gauge", "Open streaming map sessions.",
               [({}, sum(len(v) for v in coordinator.fanout.sessions.values()))])
        metric("map_updates_sent_total", "counter", "Map messages sent to clients.",
               [({}, self.metrics["map_messages"])])
        metric("map_bytes_sent_total", "counter", "Bytes of map messages sent.", [({}, self.metrics["map_bytes"])])
        metric("registrations_total", "counter", "Successful registrations.", [({}, self.metrics["registrations"])])
        metric("registration_refusals_total", "counter", "Refused registrations by reason.",
               [({"reason": reason}, count) for reason, count in sorted(self.refusals.items())] or [({}, 0)])
        metric("connections_turned_away_total", "counter",
               "Connections refused at a limit (overall, of their kind, or of their address).",
               [({}, self.metrics["connections_turned_away"])])
        metric("api_refused_total", "counter", "API requests refused for a bad key.", [({}, self.metrics["api_refused"])])
        metric("derp_clients", "gauge", "Connected DERP clients.", [({}, derp.get("clients", 0))])
        metric("derp_packets_relayed_total", "counter", "Packets relayed by DERP.", [({}, derp.get("packets_relayed", 0))])
        metric("derp_bytes_relayed_total", "counter", "Bytes relayed by DERP.", [({}, derp.get("bytes_relayed", 0))])
        metric("derp_packets_dropped_total", "counter", "Packets DERP dropped.", [({}, derp.get("packets_dropped", 0))])
        pairs = derp_pair_rows(self.derp, self.derp_node, time.monotonic())[:TOP_PAIRS_METRICS] if self.derp else []
        metric("derp_pair_relayed_bytes", "gauge", f"Data bytes DERP relayed between two nodes (top {TOP_PAIRS_METRICS}).",
               [({"a": p["nodes"][0], "b": p["nodes"][1]}, p["relayed_bytes"]) for p in pairs] or [({}, 0)])
        kinds = collections.Counter(nat_class(n) for n in nodes if n.kind == NODE_CLIENT)
        metric("nodes_by_nat", "gauge", "Nodes by the NAT their client reports.",
               [({"kind": kind}, count) for kind, count in sorted(kinds.items())] or [({}, 0)])
        return "\n".join(lines) + "\n"


# Diagnostics: what a node's NetInfo (its client's own netcheck) and
# EndpointTypes say about its network, in words for the person at the router.


# ---- CLI ----
# Headscale's nouns and verbs, so scripts carry over.  A verb runs inside the
# running server when there is one (its admin socket), else on the state
# folder directly; with --remote it goes to a server's HTTP API.

CLI_EPILOG = """\
first steps:
  meshbox.py serve                                  # control on 127.0.0.1:8080
  meshbox.py users create alice
  meshbox.py preauthkeys create --user alice        # prints the key last
  tailscale up --login-server http://127.0.0.1:8080 --auth-key KEY

settings come from (later wins): defaults, the JSON file given by --config
(keys as in the flags, e.g. {"listen": "0.0.0.0:443", "server_url": ...}),
environment variables MESHBOX_<NAME> (e.g. MESHBOX_LISTEN), then flags.
remote administration: create a key with 'apikeys create' on the server, then
  meshbox.py --remote https://SERVER --api-key KEY nodes list
  (http:// only to loopback or a tailnet address, or with --insecure-remote)
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
        setattr(config, name, setting_value(name, value, getattr(config, name)))
    return config


def setting_value(name, value, default):
    """A setting from text (environment, file) converted to the type of its default."""
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            raise SystemExit(f"meshbox: setting {name} must be true or false, got {value!r}")
        return text in ("1", "true", "yes", "on")
    if isinstance(default, int):
        try:
            return int(value)
        except (TypeError, ValueError):
            raise SystemExit(f"meshbox: setting {name} must be a number, got {value!r}") from None
    if isinstance(default, (list, dict)) and isinstance(value, str) and value.strip()[:1] in ("[", "{"):
        try:
            value = json.loads(value)
        except ValueError as e:
            raise SystemExit(f"meshbox: setting {name} is not valid JSON: {e}") from None
    if isinstance(default, list) and isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    if type(value) is not type(default) and isinstance(default, (list, dict)):
        raise SystemExit(f"meshbox: setting {name} must be a {type(default).__name__}")
    return value


def print_table(rows, columns):
    widths = [max([len(c)] + [len(cell(r.get(c))) for r in rows]) for c in columns]
    print("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths)).rstrip())
    for r in rows:
        print("  ".join(cell(r.get(c)).ljust(w) for c, w in zip(columns, widths)).rstrip())


def cell(value):
    """A table cell: node-supplied text (hostnames, endpoints, OS) reaches the
    admin's terminal without its escape sequences."""
    if isinstance(value, list):
        return strip_control(",".join(str(v) for v in value)) or "-"
    return "-" if value is None else strip_control(str(value))


def admin_socket_call(state_dir, noun, verb, params):
    """Run a verb in the local running server; None when no server answers."""
    path = os.path.join(state_dir, "admin.sock")
    if not os.path.exists(path):
        return None
    request = json_bytes({"noun": noun, "verb": verb, "params": params})
    if len(request) > MAX_REQUEST_BODY:
        raise InvalidInput(f"this request is larger than the {MAX_REQUEST_BODY >> 20} MiB the server accepts "
                           f"({len(request) >> 10} KiB): shorten the policy, e.g. with groups and hosts")
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(30)
            s.connect(path)
            s.sendall(request + b"\n")
            with s.makefile("rb") as answer:
                data = answer.readline()
    except OSError:
        return None
    if not data:
        raise InvalidInput(f"the running server closed {path} without an answer: see its log")
    return json.loads(data)


def api_call(url, api_key, noun, verb, params):
    """Run a verb on a remote server through its HTTP API."""
    scheme, _, rest = url.partition("://")
    hostport, _, base = rest.partition("/")
    host, port = parse_host_port(hostport, 443 if scheme == "https" else 80)
    path = f"/{base.strip('/')}/api/v1/{noun}/{verb}".replace("//", "/") if base.strip("/") else \
        f"/api/v1/{noun}/{verb}"
    request = http_request_bytes("POST", path.rstrip("/"), hostport, [("Authorization", f"Bearer {api_key}"),
                                 ("Content-Type", "application/json")], json_bytes(params))
    with socket.create_connection((host, port), timeout=30) as raw:
        conn = ssl.create_default_context().wrap_socket(raw, server_hostname=host.encode()) if scheme == "https" else raw
        conn.sendall(request)
        data = b""
        while True:
            chunk = conn.recv(65536)
            if not chunk:
                break
            data += chunk
    try:
        status, payload = parse_http_answer(data)
        answer = parse_json(payload)
    except ValueError:
        status_line = data.partition(b"\r\n")[0][:80]
        raise InvalidInput(f"unexpected answer from {url}: {status_line!r}") from None
    if status == 401:
        raise InvalidInput("the server refused the API key (401)")
    return answer


def check_remote_url(url, config, insecure):
    """Refuse an http:// remote whose API key would cross a network in clear text:
    loopback (an SSH tunnel) and the tailnet (WireGuard) are private already."""
    scheme, _, rest = url.partition("://")
    if scheme not in ("http", "https"):
        raise InvalidInput(f"--remote must be an http:// or https:// URL, got {url!r}")
    if scheme == "https" or insecure:
        return
    host = parse_host_port(rest.partition("/")[0], 80)[0]
    try:
        address = ipaddress.ip_address(host)
        private = address.is_loopback or any(address in ipaddress.ip_network(p)
                                             for p in (config.prefix_v4, config.prefix_v6))
    except ValueError:
        private = host == "localhost"
    if not private:
        raise InvalidInput(f"--remote {url} would send the API key in clear text: use an https:// URL (a TLS proxy "
                           "in front of meshbox), the server's tailnet address, an SSH tunnel to its 127.0.0.1, "
                           "or add --insecure-remote on a network you trust")


def run_verb(args, config, noun, verb, params):
    """Run a verb remotely, in the running server, or on the state folder."""
    if args.remote:
        if not args.api_key:
            raise InvalidInput("--remote needs --api-key (create one on the server: meshbox apikeys create)")
        check_remote_url(args.remote, config, args.insecure_remote)
        answer = api_call(args.remote, args.api_key, noun, verb, params)
    else:
        answer = admin_socket_call(config.state_dir, noun, verb, params)
        if answer is None:
            return Admin(open_state(config.state_dir), config).call(noun, verb, params)
    if "error" in answer:
        raise InvalidInput(answer["error"])
    return answer["result"]


# How each verb's result is shown: table columns for lists, or a printer.
TABLES = {
    ("users", "list"): ["id", "name", "created"],
    ("preauthkeys", "list"): ["id", "key", "user", "reusable", "ephemeral", "used", "expiration", "valid"],
    ("nodes", "list"): ["id", "name", "user", "ipv4", "ipv6", "online", "last_seen", "tags"],
    ("routes", "list"): ["node_id", "node", "prefix", "advertised", "approved", "auto_approved", "primary"],
    ("devices", "list"): ["id", "name", "user", "ipv4", "full_tunnel", "public_key"],
    ("apikeys", "list"): ["id", "prefix", "created", "expiration", "valid"],
    ("oauthclients", "list"): ["id", "client_id", "scopes", "created", "expiration", "valid"],
    ("ssh", "checks"): ["id", "from", "to", "user", "since"],
}


def show_result(args, noun, verb, result):
    if getattr(args, "output", "table") == "json":
        print(json.dumps(result, indent=2))
    elif (noun, verb) in TABLES:
        print_table(result, TABLES[(noun, verb)])
    elif (noun, verb) in (("preauthkeys", "create"), ("apikeys", "create")):
        print(f"{noun[:-1]} expires {result['expiration']}; it is shown only now:", file=sys.stderr)
        print(result["key"])
    elif (noun, verb) == ("devices", "add"):
        print(f"device {result['name']}: {result['ipv4']} {result['ipv6']}; keep this config secret, "
              "its key is not stored", file=sys.stderr)
        if args.qr:         # on the terminal, so that `> phone.conf` keeps the config alone
            print(qr_terminal_text(result["config"]), file=sys.stderr)
        sys.stdout.write(result["config"])
    elif (noun, verb) == ("policy", "get"):
        if result["policy"] is None:
            print("no policy set: every node may reach every other", file=sys.stderr)
        else:
            print(result["policy"])
    elif noun == "status":
        show_status(result)
    elif noun == "logs":
        print("\n".join(result))
    elif noun == "paths":
        show_paths(result)
    elif isinstance(result, dict) and set(result) == {"message"}:
        print(result["message"])
    else:
        print(json.dumps(result, indent=2))


def show_status(result):
    rows = result["nodes"]
    print(f"server: {'running' if result['server_running'] else 'not running'}; {len(rows)} node(s), "
          f"{sum(1 for r in rows if r['online'])} online")
    for r in rows:
        r["state"] = "expired" if r["expired"] else ("online" if r["online"] else "offline")
        handshake = (r.get("wireguard") or {}).get("last_handshake")
        r["box_handshake"] = rfc3339(handshake) if handshake else None
        r["nat"] = r["network"]["nat_kind"]
    print_table(rows, ["id", "name", "user", "ipv4", "state", "nat", "derp_home", "endpoints", "box_handshake",
                       "last_seen"])


def show_paths(rows):
    if not rows:
        print("DERP carried no packets lately: every pair that talked went direct, or none talked")
    for r in rows:
        state = "relayed" if r["relayed"] else "not relayed now (direct, or idle)"
        print(f"{r['nodes'][0]} <-> {r['nodes'][1]}: {state}; {r['relayed_bytes']} data bytes relayed, "
              f"{r['disco_packets']} disco packets")
        for reason in r["why"]:
            print(f"    why: {reason}")


def verb_params(args, noun, verb):
    """The keyword arguments a verb takes, from the parsed command line."""
    skip = {"command", "verb", "state", "config", "remote", "api_key", "insecure_remote", "output", "qr", "file",
            "topology"}
    params = {k: v for k, v in vars(args).items() if k not in skip and v is not None}
    if noun == "policy" and verb in ("set", "check", "compile"):
        params["policy"] = read_text_file(args.file, "policy file")
    if noun == "policy" and verb == "compile":
        try:
            params["topology"] = json.loads(read_text_file(args.topology, "topology"))
        except ValueError as e:
            raise InvalidInput(f"topology {args.topology} is not JSON: {e}") from None
    return params


def setup_logging(config, serving):
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(log_formatter(config) if serving else TextLogFormatter("%(levelname)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, str(config.log_level).upper(), logging.INFO) if serving else logging.WARNING)


def cmd_serve(config):
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


def cmd_gateway_down(config):
    """Remove meshbox's interface and table, as a stopped server would."""
    Gateway.remove_left_behind(config)
    print(f"removed {config.wg_interface} and the {NFT_TABLE} nftables table")


def build_parser():
    parser = argparse.ArgumentParser(
        prog="meshbox.py", description="meshbox: a self-hosted Tailscale control server, DERP relay and gateway.",
        epilog=CLI_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--state", default=None, help="state folder (default ./meshbox-state; env MESHBOX_STATE_DIR)")
    parser.add_argument("--config", help="JSON settings file")
    parser.add_argument("--remote", default=os.environ.get("MESHBOX_REMOTE"),
                        help="administer the server at this URL through its API (env MESHBOX_REMOTE)")
    parser.add_argument("--api-key", dest="api_key", default=os.environ.get("MESHBOX_API_KEY"),
                        help="API key for --remote (env MESHBOX_API_KEY)")
    parser.add_argument("--insecure-remote", dest="insecure_remote", action="store_true",
                        help="allow an http:// --remote beyond loopback and the tailnet (the key travels in clear text)")
    parser.add_argument("--version", action="version", version=f"meshbox {VERSION}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the control server, DERP relay and STUN")
    serve.add_argument("--listen", help="control HTTP address (default 127.0.0.1:8080)")
    serve.add_argument("--server-url", dest="server_url", help="URL clients use as --login-server (default http://LISTEN)")
    serve.add_argument("--derp-listen", dest="derp_listen", help="DERP-over-TLS address (default LISTEN's host:8443, or off)")
    serve.add_argument("--stun-listen", dest="stun_listen", help="STUN UDP addresses, HOST:PORT[,HOST:PORT] (default LISTEN's host:3478,3479, or off)")
    serve.add_argument("--derp-host", dest="derp_host", help="host clients dial for DERP/STUN (default SERVER_URL's host)")
    serve.add_argument("--base-domain", dest="base_domain", help="MagicDNS domain (default mesh.internal)")
    serve.add_argument("--nameservers", help="DNS resolvers clients use for other names, e.g. 192.0.2.53")
    serve.add_argument("--hosts-file", dest="hosts_file",
                       help="write the tailnet's names here for dnsmasq (default STATE_DIR/hosts)")
    serve.add_argument("--policy-file", dest="policy_file",
                       help="HuJSON ACL policy file, reloaded when it changes (default: the one set with 'policy set')")
    serve.add_argument("--max-connections", dest="max_connections", type=int,
                       help="open connections of every kind before new ones are refused (default 2048)")
    for kind, what, default in (("control", "control (ts2021)", 1024), ("derp", "DERP", 1024),
                                ("http", "plain HTTP (login pages, API, metrics)", 64)):
        serve.add_argument(f"--max-{kind}-connections", dest=f"max_{kind}_connections", type=int,
                           help=f"of them, {what} connections (default {default})")
    serve.add_argument("--max-connections-per-source", dest="max_connections_per_source", type=int,
                       help="connections from one address (IPv6: one /64) that have not yet shown a node "
                            "or DERP key (default 128)")
    serve.add_argument("--derp-serve-any", dest="derp_serve_any", action="store_true", default=None,
                       help="relay for any DERP client, not only the tailnet's nodes (default: nodes only)")
    serve.add_argument("--log-level", dest="log_level", choices=["debug", "info", "warning", "error"])
    serve.add_argument("--log-format", dest="log_format", choices=["text", "json"], help="log lines as text or JSON")
    gw = serve.add_argument_group("gateway (the box as a WireGuard peer, subnet router and exit node)")
    gw.add_argument("--gateway", action="store_true", default=None, help="be a kernel-WireGuard node of the tailnet")
    gw.add_argument("--wg-interface", dest="wg_interface", help="WireGuard interface (default meshbox0)")
    gw.add_argument("--wg-port", dest="wg_port", type=int, help="WireGuard UDP port (default 41641)")
    gw.add_argument("--wg-backend", dest="wg_backend", choices=["auto", "kernel", "userspace"],
                    help="kernel WireGuard, or wireguard-go/boringtun (default auto)")
    gw.add_argument("--public-endpoint", dest="public_endpoint",
                    help="IP:PORT[,...] where devices reach the box's WireGuard port from outside")
    gw.add_argument("--advertise-routes", dest="advertise_routes", help="LAN prefixes behind the box, e.g. 192.168.1.0/24")
    gw.add_argument("--advertise-exit-node", dest="advertise_exit_node", action="store_true", default=None,
                    help="offer the box as an exit node to the internet")
    gw.add_argument("--snat-subnet-routes", dest="snat_subnet_routes", choices=["true", "false"],
                    help="masquerade tailnet traffic into the LAN (default true)")
    gw.add_argument("--netlink-tools", dest="netlink_tools", choices=["auto", "pyroute2", "commands"],
                    help="configure links with pyroute2 or the ip and wg commands (default auto)")

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

    ssh = sub.add_parser("ssh", help="SSH sessions that check rules hold").add_subparsers(dest="verb", required=True)
    with_output(ssh.add_parser("checks", help="list sessions waiting for approval"))
    ssh.add_parser("approve", help="let a held SSH session in").add_argument("id", help="the check's ID")
    ssh.add_parser("deny", help="refuse a held SSH session").add_argument("id", help="the check's ID")

    nodes = sub.add_parser("nodes", help="manage nodes").add_subparsers(dest="verb", required=True)
    with_output(nodes.add_parser("list", help="list nodes"))
    nodes.add_parser("show", help="everything about one node").add_argument("id", help="node ID or name")
    nodes.add_parser("delete", help="remove a node").add_argument("id", help="node ID or name")
    nodes.add_parser("expire", help="force a node to log in again").add_argument("id", help="node ID or name")
    register = nodes.add_parser("register", help="approve a device waiting at its login URL")
    register.add_argument("--user", required=True)
    register.add_argument("--key", required=True, help="the ID at the end of the device's /register/ URL")
    expiry = nodes.add_parser("expiry", help="'nodes expiry disable ID': the node's key never expires")
    expiry.add_argument("switch", choices=["disable"])
    expiry.add_argument("id", help="node ID or name")
    tag = nodes.add_parser("tag", help="set a node's tags (replacing them; '' removes all)")
    tag.add_argument("id", help="node ID or name")
    tag.add_argument("tags", help="e.g. tag:server,tag:web")
    rename = nodes.add_parser("rename", help="change a node's MagicDNS name")
    rename.add_argument("id", help="node ID or name")
    rename.add_argument("name")

    routes = sub.add_parser("routes", help="subnet and exit routes nodes advertise").add_subparsers(
        dest="verb", required=True)
    with_output(routes.add_parser("list", help="advertised, approved and primary routes"))
    for verb, text in (("approve", "let a node route a prefix"), ("unapprove", "withdraw a route's approval")):
        p = routes.add_parser(verb, help=text)
        p.add_argument("node", help="node ID or name")
        p.add_argument("prefix", help="e.g. 192.168.1.0/24, or 0.0.0.0/0 and ::/0 for an exit node")

    devices = sub.add_parser("devices", help="plain WireGuard devices behind the gateway").add_subparsers(
        dest="verb", required=True)
    add = devices.add_parser("add", help="make a key and address for a device; prints its wg-quick config last")
    add.add_argument("name")
    add.add_argument("--user", default=GATEWAY_USER, help=f"owner (default {GATEWAY_USER})")
    add.add_argument("--full-tunnel", action="store_true", help="send all traffic through the box (0.0.0.0/0)")
    add.add_argument("--qr", action="store_true", help="also show the config as a QR code on the terminal")
    with_output(devices.add_parser("list", help="list devices"))
    devices.add_parser("remove", help="remove a device").add_argument("name")

    gateway = sub.add_parser("gateway", help="the box's WireGuard interface").add_subparsers(dest="verb", required=True)
    gateway.add_parser("down", help="remove the interface and meshbox's nftables table (after a crash)")

    policy = sub.add_parser("policy", help="the ACL policy (Tailscale's HuJSON format)").add_subparsers(
        dest="verb", required=True)
    policy.add_parser("set", help="check a policy file and apply it").add_argument("file")
    policy.add_parser("check", help="check a policy file against this tailnet").add_argument("file")
    policy.add_parser("get", help="print the policy in force")
    policy.add_parser("clear", help="remove the policy: every node may reach every other")
    compile_ = policy.add_parser("compile", help="show what a policy gives each node of a topology")
    compile_.add_argument("file")
    compile_.add_argument("--topology", required=True, help='JSON {"users": [...], "nodes": {...}}')

    apikeys = sub.add_parser("apikeys", help="keys for the HTTP API (--remote)").add_subparsers(
        dest="verb", required=True)
    apikeys.add_parser("create", help="make an API key (shown once)").add_argument(
        "--expiration", default="90d", help="how long it is valid (default 90d)")
    with_output(apikeys.add_parser("list", help="list API keys"))
    apikeys.add_parser("expire", help="revoke an API key").add_argument("prefix", help="the key or its listed prefix")

    oauth = sub.add_parser("oauthclients", help="OAuth clients for Tailscale's API v2 (client credentials)"
                           ).add_subparsers(dest="verb", required=True)
    oauth_create = oauth.add_parser("create", help="make an OAuth client (its secret is shown once)")
    oauth_create.add_argument("--scopes", default="all", help=f"comma-separated, of: {', '.join(OAUTH_SCOPES)}")
    oauth_create.add_argument("--expiration", default="365d", help="how long it is valid (default 365d)")
    with_output(oauth.add_parser("list", help="list OAuth clients"))
    oauth.add_parser("expire", help="revoke an OAuth client and its tokens").add_argument("client_id")

    with_output(sub.add_parser("status", help="the tailnet as the server sees it"))
    sub.add_parser("netmap", help="the exact MapResponse a node receives now").add_argument(
        "id", help="node ID or name")
    with_output(sub.add_parser("paths", help="pairs of nodes relayed by meshbox's DERP, how much, and why"))
    sub.add_parser("logs", help="recent events of the running server").add_argument(
        "--lines", type=int, default=100, help="how many (default 100)")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.state is not None:
        os.environ["MESHBOX_STATE_DIR"] = args.state
    config = load_config(args)
    setup_logging(config, serving=args.command == "serve")
    try:
        if args.command == "serve":
            return cmd_serve(config)
        if args.command == "gateway":
            return cmd_gateway_down(config)
        noun, verb = args.command, getattr(args, "verb", None)
        show_result(args, noun, verb, run_verb(args, config, noun, verb, verb_params(args, noun, verb)))
    except (MeshboxError, OSError) as e:
        print(f"meshbox: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
