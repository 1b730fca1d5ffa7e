"""Long fuzz run: at least a million inputs per parser (not a CI test).

    python3 tests/fuzz_long.py [--count 1000000] [--target NAME ...] [--seed N]

Each target takes bytes made by mutating valid seeds (bit flips, cuts,
extensions, splices, repeats, random bytes; see test_fuzz.mutations) and
feeds them to one meshbox parser.  Only the parser's own errors are allowed;
anything else is printed with its input and counted as a failure.  Prints a
line per target, then a JSON summary (inputs and failures per target) as the
last line.  The short CI run of the same targets is tests/test_fuzz.py.
"""

import argparse
import asyncio
import json
import logging
import os
import pathlib
import random
import struct
import sys
import tempfile
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import meshbox  # noqa: E402
import meshproc  # noqa: E402
from test_fuzz import (HOSTINFO_FIELDS, LOOP, MAP_FIELDS, ODD_VALUES, SERVER_PRIVATE, SERVER_PUBLIC,  # noqa: E402
                       WEBSOCKET_SEED, hostinfo_case, maprequest_case, mutations, relayed_stream, stream_reader,
                       websocket_stream, with_field)
from test_hostinfo import GOOD, Tailnet  # noqa: E402


def run(coro):
    return LOOP.run_until_complete(coro)


# ---- targets: (seeds, feed(data), allowed exceptions) ----

def noise_initiation():
    seeds = [meshbox.noise_initiate(meshbox.new_private_key(), SERVER_PUBLIC, v)[0] for v in (1, 130)]
    return seeds, lambda data: meshbox.noise_respond(SERVER_PRIVATE, data), (meshbox.NoiseError, meshbox.CryptoError)


def transport_record():
    cipher_key = os.urandom(32)
    seeds = [meshbox.seal_records(meshbox.NoiseCipher(cipher_key), b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" * 50)]

    def feed(data):
        run(meshbox.read_record(stream_reader(data), meshbox.NoiseCipher(cipher_key)))
    return seeds, feed, (meshbox.NoiseError, asyncio.IncompleteReadError)


def http_head():
    seeds = [b"POST /ts2021 HTTP/1.1\r\nHost: x\r\nUpgrade: tailscale-control-protocol\r\n"
             b"X-Tailscale-Handshake: AAAA\r\n\r\n", b"GET /key?v=130 HTTP/1.1\r\n\r\n"]
    return seeds, lambda data: run(meshbox.read_http_request(stream_reader(data))), (meshbox.HttpError,)


def websocket_frames():
    """Frames of a WebSocket upgrade, read to their end (see test_fuzz.websocket_stream)."""
    return [WEBSOCKET_SEED], websocket_stream, ()


def derp_frame():
    seeds = [meshbox.frame(meshbox.FRAME_SEND_PACKET, bytes(32) + b"x" * 100) + meshbox.frame(meshbox.FRAME_PING, bytes(8))]
    return seeds, lambda data: run(meshbox.read_frame(stream_reader(data), meshbox.DERP_MAX_FRAME)), \
        (meshbox.DerpError, EOFError)


def derp_stream():
    """A joined client's frames, relayed to another client (see test_fuzz.relayed_stream)."""
    seeds = [meshbox.frame(meshbox.FRAME_SEND_PACKET, bytes(32) + b"x" * 100) * 3 +
             meshbox.frame(meshbox.FRAME_PING, bytes(8)) + meshbox.frame(meshbox.FRAME_NOTE_PREFERRED, b"\x01")]
    return seeds, relayed_stream, ()


def derp_client_info():
    client = meshbox.new_private_key()
    nonce = os.urandom(meshbox.DERP_NONCE_LEN)
    seeds = [meshbox.x25519_public(client) + nonce +
             meshbox.box_seal(client, SERVER_PUBLIC, nonce, b'{"version": 2, "meshKey": ""}')]
    return seeds, lambda data: meshbox.open_client_info(SERVER_PRIVATE, data), (meshbox.DerpError,)


def stun():
    request = struct.pack(">HH", meshbox.STUN_BINDING_REQUEST, 8) + meshbox.STUN_MAGIC_COOKIE + bytes(12)
    seeds = [request + struct.pack(">HHI", meshbox.STUN_ATTR_FINGERPRINT, 4, 0), request[:2] + b"\0\0" + request[4:]]

    def feed(data):
        response = meshbox.stun_binding_response(data, ("192.0.2.1", 3478))
        assert response is None or response[8:20] == data[8:20]
    return seeds, feed, ()


def register_json():
    """RegisterRequest and MapRequest bodies, as bytes, through the coordinator."""
    tmp = tempfile.mkdtemp()
    store = meshbox.Store(os.path.join(tmp, "meshbox.db"))
    secret = meshproc.store_key(store)
    settings = meshbox.MapSettings(base_domain="mesh.internal", derp_map={"Regions": {}},
                                   dns_config=meshbox.dns_config("mesh.internal", []), control_url="http://x")
    coordinator = meshbox.Coordinator(store, settings)
    coordinator.registrar.failed_registrations.burst = 1 << 62   # past the rate limit (test_registration covers it)
    machines = [bytes([i]) * 32 for i in (1, 2, 3)]
    seeds = [json.dumps({"Version": 1, "NodeKey": meshbox.key_text("nodekey", bytes([i]) * 32),
                         "Auth": {"AuthKey": secret}, "Expiry": "2999-01-01T00:00:00Z",
                         "Hostinfo": {"Hostname": "n", "RoutableIPs": ["198.51.100.0/24"], "RequestTags": []},
                         "Endpoints": ["192.0.2.1:1"], "DiscoKey": meshbox.key_text("discokey", bytes(32))}).encode()
             for i in (1, 2)]
    counter = iter(range(1 << 62))
    rng = random.Random(7)
    odd_values = [None, 0, -1, 2**70, 1e300, True, "", "x", "nodekey:" + "zz" * 32, [], [None], [5], {}, {"a": 1},
                  ["198.51.100.0/24", 5], "0001-01-01T00:00:00Z", "1970-01-01T00:02:03Z"]
    fields = list(json.loads(seeds[0]))

    def feed(data):
        """Mutated bytes when they still parse as an object; else the seed with fields of the wrong type."""
        try:
            request = json.loads(data)
        except ValueError:
            request = None
        if not isinstance(request, dict):
            request = json.loads(seeds[0])
            for _ in range(rng.randint(1, 3)):
                if rng.random() < 0.3:
                    hostinfo = request["Hostinfo"] if isinstance(request["Hostinfo"], dict) else {}
                    request["Hostinfo"] = {**hostinfo, rng.choice(["Hostname", "RoutableIPs", "RequestTags"]):
                                           rng.choice(odd_values)}
                else:
                    request[rng.choice(fields)] = rng.choice(odd_values)
        machine = machines[next(counter) % 3]
        try:
            coordinator.registrar.register(machine, request)
        except meshbox.RegistrationRefused:
            pass
        try:
            node = coordinator.node_for_map(machine, request)
            meshbox.json_bytes(meshbox.map_response_for(node, coordinator.policy_views.view_of(node), coordinator.nodes,
                                                        coordinator.users, coordinator.settings, meshbox.now()))
        except meshbox.MapRefused:
            pass
    return seeds, feed, ()


def shapes_target(fields, seed_value, case):
    """Seeds of one JSON object; each input is the mutated bytes when they
    still parse as an object, else the seed with 1-4 fields (nested ones
    too) set to values of the wrong type, size or nesting; fed to `case`
    on a two-node tailnet (see test_fuzz.hostinfo_case)."""
    logging.getLogger("meshbox").setLevel(logging.CRITICAL)    # a line per dropped field: millions of them
    net = Tailnet(pathlib.Path(tempfile.mkdtemp()))
    viewer, _ = net.join(1, GOOD)
    hostile, hostile_key = net.join(2, GOOD)
    seed = seed_value(hostile_key)
    rng = random.Random(11)

    def feed(data):
        try:
            value = meshbox.parse_json(data)
        except ValueError:
            value = None
        if not isinstance(value, dict):
            value = seed
            for _ in range(rng.randint(1, 4)):
                value = with_field(value, rng.choice(fields), rng.choice(ODD_VALUES))
        case(net, viewer, hostile, value)
    return [json.dumps(seed).encode()], feed, ()


def hostinfo_json():
    """Hostinfo shapes, through checked_hostinfo into both nodes' maps."""
    return shapes_target(HOSTINFO_FIELDS, lambda _: GOOD, hostinfo_case)


def maprequest_json():
    """MapRequest shapes, through node_for_map into both nodes' maps."""
    return shapes_target(MAP_FIELDS, lambda key: {"Version": 130, "NodeKey": key, "Stream": False, "Hostinfo": GOOD,
                                                  "Endpoints": ["192.0.2.1:41641"]}, maprequest_case)


TARGETS = {f.__name__: f for f in (noise_initiation, transport_record, http_head, websocket_frames, derp_frame, derp_stream,
                                    derp_client_info,
                                    stun, register_json, hostinfo_json, maprequest_json)}


def fuzz(name, count, seed, show=3):
    seeds, feed, allowed = TARGETS[name]()
    rng = random.Random(seed)
    failures, shown, started = 0, 0, time.monotonic()
    per_seed = max(1, count // len(seeds))
    done = 0
    for s in seeds:
        for data in mutations(rng, s, per_seed):
            done += 1
            try:
                feed(data)
            except allowed:
                pass
            except Exception:
                failures += 1
                if shown < show:
                    shown += 1
                    print(f"{name}: unexpected error for input {data[:200]!r}:\n{traceback.format_exc()}")
    seconds = time.monotonic() - started
    print(f"{name:17s} {done:9d} inputs in {seconds:7.1f} s ({done / seconds:8.0f}/s), {failures} failures",
          flush=True)
    return {"inputs": done, "failures": failures, "seconds": round(seconds, 1)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=1_000_000)
    parser.add_argument("--target", action="append", choices=sorted(TARGETS))
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    result = {name: fuzz(name, args.count, args.seed) for name in (args.target or TARGETS)}
    print(json.dumps(result))
    return 1 if any(r["failures"] for r in result.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
