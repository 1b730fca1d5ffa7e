"""Hostile input: malformed, truncated, oversized and replayed, at every parser.

Short runs for CI (the whole file stays well under 90 s); tests/fuzz_long.py
drives the same targets with millions of inputs.  The pure parsers must
raise only their own errors; the live server must close just the offending
connection, keep serving the others and store nothing from the attempt.
"""

import asyncio
import base64
import contextlib
import json
import os
import random
import struct

import h2.connection
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import meshbox
import meshproc
import tsclient
from derpclient import DerpClient, FakeWriter, fake_connection, serve_derp_http, split_frames
from meshproc import new_key, running_server
from test_coordinator import snapshot
from test_hostinfo import GOOD, HOSTINFO_TYPES, Tailnet, go_type_problems, map_problems

FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SERVER_ROUNDS = 40            # hostile connections per live-server test


# ---- inputs ----

def valid_initiation(server_public, version=130):
    return meshbox.noise_initiate(meshbox.new_private_key(), server_public, version)


def mutations(rng, data, count):
    """Bit flips, truncations, extensions, splices and repeats of data."""
    for _ in range(count):
        b = bytearray(data)
        kind = rng.randrange(6)
        if kind == 0 and b:
            for _ in range(rng.randint(1, 4)):
                b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        elif kind == 1:
            b = b[:rng.randrange(len(b) + 1)]
        elif kind == 2:
            b += rng.randbytes(rng.randint(1, 64))
        elif kind == 3 and b:
            i = rng.randrange(len(b))
            b[i:i + rng.randint(1, 8)] = rng.randbytes(rng.randint(0, 8))
        elif kind == 4:
            b = b * rng.randint(2, 3)
        else:
            b = bytearray(rng.randbytes(rng.randint(0, 2 * len(data) + 8)))
        yield bytes(b)


LOOP = asyncio.new_event_loop()      # one loop for the pure parsers: asyncio.run per input is slow


def stream_reader(data):
    reader = asyncio.StreamReader(limit=64 << 10, loop=LOOP)
    reader.feed_data(data)
    reader.feed_eof()
    return reader


def run(coro):
    return LOOP.run_until_complete(coro)


# ---- Noise ----

SERVER_PRIVATE = meshbox.new_private_key()
SERVER_PUBLIC = meshbox.x25519_public(SERVER_PRIVATE)


def respond_or_refuse(message):
    """noise_respond, which may only refuse with NoiseError (or CryptoError for a bad point)."""
    try:
        return meshbox.noise_respond(SERVER_PRIVATE, message)
    except (meshbox.NoiseError, meshbox.CryptoError):
        return None


@FAST
@given(st.binary(max_size=300))
def test_noise_initiation_random_bytes(message):
    assert respond_or_refuse(message) is None or len(message) == meshbox.INITIATION_LEN


def test_noise_initiation_mutations_never_handshake():
    rng = random.Random(1)
    message, _ = valid_initiation(SERVER_PUBLIC)
    assert respond_or_refuse(message) is not None
    for bad in mutations(rng, message, 3000):
        if bad != message:
            assert respond_or_refuse(bad) is None


def test_replayed_initiation_gives_the_replayer_nothing():
    """An initiation replayed by an eavesdropper gets a fresh response whose keys
    only the machine key's owner can derive; the captured records do not decrypt."""
    machine = meshbox.new_private_key()
    message, finish = meshbox.noise_initiate(machine, SERVER_PUBLIC, 130)
    response, server_session = meshbox.noise_respond(SERVER_PRIVATE, message)
    client = finish(response)
    captured = meshbox.seal_records(client.send, b"PRI * HTTP/2.0")
    _, replayed = meshbox.noise_respond(SERVER_PRIVATE, message)
    with pytest.raises(meshbox.NoiseError):
        run(meshbox.read_record(stream_reader(captured), replayed.recv))
    # And a record replayed on its own session fails: the counter has moved on.
    assert run(meshbox.read_record(stream_reader(captured), server_session.recv)) == b"PRI * HTTP/2.0"
    with pytest.raises(meshbox.NoiseError):
        run(meshbox.read_record(stream_reader(captured), server_session.recv))


@FAST
@given(st.binary(max_size=5000))
def test_transport_records_random_bytes(data):
    cipher = meshbox.NoiseCipher(bytes(32))
    try:
        run(meshbox.read_record(stream_reader(data), cipher))
    except (meshbox.NoiseError, asyncio.IncompleteReadError):
        pass


# ---- HTTP/1.1 front ----

@FAST
@given(st.binary(max_size=2000))
def test_http_request_head_random_bytes(data):
    try:
        run(meshbox.read_http_request(stream_reader(data)))
    except meshbox.HttpError as e:
        assert e.status in (400, 431)


def test_http_request_head_mutations():
    rng = random.Random(2)
    head = (b"POST /ts2021 HTTP/1.1\r\nHost: x\r\nUpgrade: tailscale-control-protocol\r\n"
            b"X-Tailscale-Handshake: AAAA\r\n\r\n")
    for bad in mutations(rng, head, 2000):
        try:
            run(meshbox.read_http_request(stream_reader(bad)))
        except meshbox.HttpError as e:
            assert e.status in (400, 431)


# ---- WebSocket ----

def masked_frame(opcode, payload, mask=b"\x5a\x01\xc3\x7e"):
    """A client's frame (FIN set, masked)."""
    n = len(payload)
    size = bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + struct.pack(">H", n)
    return bytes([0x80 | opcode]) + size + mask + meshbox.websocket_mask(mask, payload)


WEBSOCKET_SEED = (masked_frame(meshbox.WS_OP_BINARY, b"x" * 300) + masked_frame(meshbox.WS_OP_PING, b"p" * 20) +
                  masked_frame(meshbox.WS_OP_CONT, b"y" * 10) + masked_frame(meshbox.WS_OP_PONG, b"") +
                  masked_frame(meshbox.WS_OP_CLOSE, b"\x03\xe8"))


def websocket_stream(data):
    """Read a server-side WebSocketStream fed data to its end; only whole
    pongs of at most 125 bytes may be written back, and the bytes read are at
    most the payload bytes given."""
    writer = FakeWriter()
    stream = meshbox.WebSocketStream(stream_reader(data), writer)
    got = b""
    try:
        while chunk := run(stream.read(1 << 16)):
            got += chunk
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    assert len(got) <= len(data)
    for pong in writer.frames:
        assert pong[0] == 0x80 | meshbox.WS_OP_PONG and pong[1] == len(pong) - 2 <= meshbox.WS_MAX_CONTROL


@FAST
@given(st.binary(max_size=3000))
def test_websocket_frames_random_bytes(data):
    websocket_stream(data)


def test_websocket_frames_mutations():
    for bad in mutations(random.Random(11), WEBSOCKET_SEED, 2000):
        websocket_stream(bad)


# ---- JSON bodies: register and map ----

JSON_LEAF = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=False),
                      st.text(max_size=80))
JSON_VALUE = st.recursive(JSON_LEAF, lambda inner: st.lists(inner, max_size=4) |
                          st.dictionaries(st.text(max_size=12), inner, max_size=4), max_leaves=12)
NODE_KEYS = st.sampled_from([meshbox.key_text("nodekey", bytes([i]) * 32) for i in (1, 2, 3)])
KEYISH = st.one_of(NODE_KEYS, JSON_VALUE, st.just("nodekey:" + "zz" * 32), st.just("nodekey:00"))
FIELDS = {
    "NodeKey": KEYISH, "OldNodeKey": KEYISH, "DiscoKey": st.one_of(JSON_VALUE, st.just("discokey:" + "11" * 32)),
    "Auth": st.one_of(JSON_VALUE, st.fixed_dictionaries({"AuthKey": st.one_of(JSON_VALUE, st.just("KEY"))})),
    "Expiry": st.one_of(JSON_VALUE, st.just("1970-01-01T00:02:03Z"), st.just("2999-01-01T00:00:00.5Z")),
    "Hostinfo": st.one_of(JSON_VALUE, st.fixed_dictionaries({
        "Hostname": JSON_VALUE, "RoutableIPs": st.one_of(JSON_VALUE, st.lists(st.sampled_from(
            ["198.51.100.0/24", "0.0.0.0/0", "::/0", "bogus", "10.0.0.1/33"]), max_size=3)),
        "OS": JSON_VALUE})),
    "Endpoints": st.one_of(JSON_VALUE, st.lists(JSON_VALUE, max_size=80)),
    "Version": JSON_VALUE, "Stream": JSON_VALUE, "OmitPeers": JSON_VALUE, "ReadOnly": JSON_VALUE,
}
REQUESTS = st.fixed_dictionaries({}, optional=FIELDS)


@pytest.fixture(scope="module")
def coordinator(tmp_path_factory):
    store = meshbox.Store(str(tmp_path_factory.mktemp("fuzz") / "meshbox.db"))
    secret = meshproc.store_key(store)
    settings_ = meshbox.MapSettings(base_domain="mesh.internal", derp_map={"Regions": {}},
                                    dns_config=meshbox.dns_config("mesh.internal", []), control_url="http://x")
    coord = meshbox.Coordinator(store, settings_)
    coord.registrar.failed_registrations.burst = 1 << 62   # past the rate limit (test_registration covers it)
    coord.fuzz_secret = secret
    return coord


def durable_matches_memory(coord):
    stored = {n.id: n.durable_fields() for n in coord.store.nodes()}
    assert stored == {i: n.durable_fields() for i, n in coord.nodes.items()}


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(st.sampled_from([b"\x01" * 32, b"\x02" * 32, b"\x03" * 32]), REQUESTS, st.booleans())
def test_register_and_map_bodies(coordinator, machine, request, with_key):
    if with_key and isinstance(request.get("Auth"), dict) and request["Auth"].get("AuthKey") == "KEY":
        request["Auth"] = {"AuthKey": coordinator.fuzz_secret}
    try:
        response = coordinator.registrar.register(machine, request)
        assert isinstance(response, dict)
        json.dumps(response)
    except meshbox.RegistrationRefused:
        pass
    try:
        node = coordinator.node_for_map(machine, request)
        message = meshbox.map_response_for(node, coordinator.policy_views.view_of(node), coordinator.nodes, coordinator.users,
                                           coordinator.settings, meshbox.now())
        meshbox.json_bytes(message)
    except meshbox.MapRefused as e:
        assert e.status in (400, 401)
    coordinator.flush_live()
    durable_matches_memory(coordinator)
    node_keys = [n.node_key for n in coordinator.nodes.values()]
    assert len(node_keys) == len(set(node_keys))          # no key held by two machines


# ---- Hostinfo and MapRequest shapes ----
# Whatever a node sends, the Hostinfo kept has tailcfg's Go types within the
# caps, and every viewer's map still builds, encodes and has them too.

ODD_VALUES = [None, 0, -1, 2 ** 63, -2 ** 63 - 1, 2 ** 70, 10 ** 400, 1.5, 1e308, float("nan"), float("inf"), True, False,
              "", "x", "true", "s" * 300, "\x1b[31m\n", "\ud800", [], [None], [1, "a"], ["10.0.0.0/8"], {},
              {"a": 1}, {"Proto": "tcp", "Port": 1}, [[[[[1]]]]], {"PreferredDERP": 900}]
HOSTINFO_FIELDS = sorted(HOSTINFO_TYPES) + ["NetInfo.PreferredDERP", "NetInfo.DERPLatency", "NetInfo.WorkingUDP",
                                            "NetInfo.MappingVariesByDestIP", "Location.Latitude", "TPM.Model",
                                            "Services[]", "sshHostKeys[]", "Unknown"]
MAP_FIELDS = ["Version", "Compress", "KeepAlive", "Stream", "ReadOnly", "OmitPeers", "NodeKey", "DiscoKey",
              "Endpoints", "Endpoints[]", "EndpointTypes", "DebugFlags", "MapSessionSeq", "Hostinfo"]


def with_field(value, path, new):
    """A copy of a JSON object with `path` ("A", "A.B" or "A[]": append) set to new."""
    out = dict(value) if isinstance(value, dict) else {}
    name, _, rest = path.partition(".")
    if name.endswith("[]"):
        name = name[:-2]
        out[name] = (list(out[name]) if isinstance(out.get(name), list) else []) + [new]
    elif rest:
        out[name] = with_field(out.get(name), rest, new)
    else:
        out[name] = new
    return out


def hostinfo_case(net, viewer, hostile, hostinfo):
    """hostinfo through checked_hostinfo onto the hostile node; the kept value
    and the viewer's map have tailcfg's types."""
    kept = meshbox.checked_hostinfo(hostinfo, "fuzz")
    assert kept is None or (go_type_problems(kept, HOSTINFO_TYPES) == [] and
                            len(meshbox.json_bytes(kept)) <= meshbox.HOSTINFO_MAX_BYTES), kept
    net.coordinator.node_by_machine(hostile).hostinfo = kept or {}
    net.coordinator.fanout.notify(changed=[net.coordinator.node_by_machine(hostile).id])
    assert map_problems(net.map_for(viewer)) == []


def maprequest_case(net, viewer, hostile, request):
    """A MapRequest from the hostile node: refused with 400 naming a field or
    401, or applied; the viewer's map has tailcfg's types."""
    try:
        net.coordinator.node_for_map(hostile, request)
    except meshbox.MapRefused as e:
        assert e.status == 401 or (e.status == 400 and str(e).startswith("MapRequest")), e
    assert map_problems(net.map_for(viewer)) == []


@pytest.fixture(scope="module")
def shapes_tailnet(tmp_path_factory):
    net = Tailnet(tmp_path_factory.mktemp("shapes"))
    viewer, _ = net.join(1, GOOD)
    hostile, hostile_key = net.join(2, GOOD)
    net.hostile_key = hostile_key
    return net, viewer, hostile


JSON_ODD = st.one_of(st.sampled_from(ODD_VALUES), JSON_VALUE)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(HOSTINFO_FIELDS), JSON_ODD), max_size=6), st.booleans())
def test_hostinfo_json(shapes_tailnet, changes, from_good):
    net, viewer, hostile = shapes_tailnet
    hostinfo = GOOD if from_good else {}
    for path, value in changes:
        hostinfo = with_field(hostinfo, path, value)
    hostinfo_case(net, viewer, hostile, json.loads(json.dumps(hostinfo)))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(MAP_FIELDS), JSON_ODD), max_size=4))
def test_maprequest_json(shapes_tailnet, changes):
    net, viewer, hostile = shapes_tailnet
    request = {"Version": 130, "NodeKey": net.hostile_key, "Stream": False, "Endpoints": ["192.0.2.1:41641"],
               "Hostinfo": GOOD}
    for path, value in changes:
        request = with_field(request, path, value)
    maprequest_case(net, viewer, hostile, json.loads(json.dumps(request)))


# ---- DERP and STUN parsers ----

@FAST
@given(st.binary(max_size=3000), st.integers(0, 4096))
def test_derp_frame_reader(data, limit):
    try:
        frame_type, body = run(meshbox.read_frame(stream_reader(data), limit))
        assert len(body) <= limit
    except (meshbox.DerpError, EOFError):
        pass


def relayed_stream(data):
    """Feed data to a joined DERP client's receive loop; check that only
    whole RecvPacket frames from it reach the other client, and return them."""
    derp = meshbox.DerpServer(SERVER_PRIVATE)
    src, dst = fake_connection(derp), fake_connection(derp, key=bytes(32))
    try:
        run(derp._receive_loop(src, stream_reader(data)))
    except (meshbox.DerpError, EOFError):
        pass
    frames = split_frames(b"".join(dst.writer.frames))
    assert all(t == meshbox.FRAME_RECV_PACKET and body[:32] == src.key for t, body in frames)
    assert derp.packets_relayed == len(frames)
    return frames


@FAST
@given(st.lists(st.tuples(st.integers(0, 0x20), st.binary(max_size=80)), max_size=8), st.binary(max_size=40))
def test_derp_receive_loop(frames, tail):
    """Frames for the other client (key 0...) and for nobody, then garbage."""
    data = b"".join(meshbox.frame(t, (bytes(32) if i % 2 else b"") + body) for i, (t, body) in enumerate(frames))
    relayed_stream(data + tail)


@FAST
@given(st.binary(max_size=600))
def test_derp_client_info(body):
    try:
        key, info = meshbox.open_client_info(SERVER_PRIVATE, body)
        assert isinstance(info, dict)
    except meshbox.DerpError:
        pass


def valid_stun_request(rng):
    return struct.pack(">HH", meshbox.STUN_BINDING_REQUEST, 0) + meshbox.STUN_MAGIC_COOKIE + rng.randbytes(12)


def test_stun_random_and_mutated():
    rng = random.Random(3)
    request = valid_stun_request(rng)
    for addr in (("192.0.2.1", 3478), ("::ffff:192.0.2.1", 1), ("2001:db8::1", 65535)):
        assert meshbox.stun_binding_response(request, addr)[8:20] == request[8:20]
    for bad in mutations(rng, request + b"\x80\x28\x00\x04abcd", 5000):
        response = meshbox.stun_binding_response(bad, ("192.0.2.1", 3478))
        if response is not None:
            assert response[:2] == b"\x01\x01" and response[8:20] == bad[8:20]


# ---- the live control server ----

async def steady_pair(port, key):
    """Two joined nodes; returns a check that an update still flows between them promptly."""
    a = tsclient.ControlClient("127.0.0.1", port, "steady-a")
    await a.join(key)
    b = tsclient.ControlClient("127.0.0.1", port, "steady-b")
    await b.join(key)
    counter = iter(range(1, 10000))

    async def still_served(timeout=3):
        endpoint = [f"203.0.113.{next(counter) % 250 + 1}:41641"]
        await b.update_endpoints(endpoint, timeout)
        await a.map_message_where(lambda m: any(p["Endpoints"] == endpoint for p in m.get("PeersChanged", ())),
                                  timeout)
    return (a, b), still_served


async def noise_channel(port, server_public):
    """A fresh machine's Noise channel to the server: (reader, writer, session)."""
    initiation, finish = valid_initiation(server_public)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write((f"POST /ts2021 HTTP/1.1\r\nUpgrade: tailscale-control-protocol\r\n"
                  f"X-Tailscale-Handshake: {base64.b64encode(initiation).decode()}\r\n\r\n").encode())
    await reader.readuntil(b"\r\n\r\n")
    session = finish(await reader.readexactly(meshbox.RESPONSE_LEN))
    return reader, writer, session


async def closed_by_server(reader, timeout=5):
    """Read until the server closes; True if it did within timeout."""
    try:
        async with asyncio.timeout(timeout):
            while await reader.read(65536):
                pass
        return True
    except (TimeoutError, ConnectionError):
        return False


def h2_frame(rng):
    """One HTTP/2 frame with random type, flags, stream and payload (some lengths lie)."""
    payload = rng.randbytes(rng.choice([0, 1, 4, 8, 9, 60, 300, 17000]))
    length = len(payload) if rng.random() < 0.8 else rng.randrange(1 << 24)
    return (length.to_bytes(3, "big") + bytes([rng.randrange(12), rng.randrange(256)])
            + (rng.randrange(1 << 31) if rng.random() < 0.3 else rng.choice([0, 1, 3])).to_bytes(4, "big")
            + payload)


def hostile_h2_bytes(rng):
    """Bytes a broken or malicious HTTP/2 client might send inside the Noise channel."""
    kind = rng.randrange(5)
    if kind == 0:
        return rng.randbytes(rng.randint(1, 3000))
    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
    if kind == 1:
        return preface + b"".join(h2_frame(rng) for _ in range(rng.randint(1, 8)))
    conn = h2.connection.H2Connection()
    conn.initiate_connection()
    headers = [(":method", rng.choice(["POST", "GET", "PUT"])),
               (":path", rng.choice(["/machine/register", "/machine/map", "/x", "/machine/map?x=1"])),
               (":scheme", "http"), (":authority", "x")]
    sid = conn.get_next_available_stream_id()
    conn.send_headers(sid, headers)
    body = rng.choice([b"{", b"[]", b"null", b'{"NodeKey": 5}', json.dumps({"Stream": True}).encode(),
                       rng.randbytes(200), b'"' + b"a" * 60000 + b'"'])
    data = conn.data_to_send()
    if kind == 2:
        return data + body[:rng.randrange(len(body) + 1)]           # raw bytes where a frame belongs
    for i in range(0, len(body), 16384):
        conn.send_data(sid, body[i:i + 16384])
    conn.end_stream(sid)
    data += conn.data_to_send()
    if kind == 3:
        return data
    return bytes(next(mutations(rng, data, 1)))


def test_hostile_http2_closes_only_that_connection(tmp_path):
    async def main():
        async with running_server(tmp_path) as (server, port):
            key = new_key(server)
            steady, still_served = await steady_pair(port, key)
            before = snapshot(tmp_path)
            server_public = await tsclient.fetch_server_key("127.0.0.1", port)
            rng = random.Random(4)
            for _ in range(SERVER_ROUNDS):
                reader, writer, session = await noise_channel(port, server_public)
                writer.write(meshbox.seal_records(session.send, hostile_h2_bytes(rng)))
                writer.write_eof()
                assert await closed_by_server(reader)
                writer.close()
            await still_served()
            assert snapshot(tmp_path) == before
            assert len(server.connections) <= 3
            for c in steady:
                await c.close()
    asyncio.run(main())


def test_hostile_records_and_handshakes_close_only_that_connection(tmp_path):
    async def main():
        async with running_server(tmp_path) as (server, port):
            key = new_key(server)
            steady, still_served = await steady_pair(port, key)
            before = snapshot(tmp_path)
            server_public = await tsclient.fetch_server_key("127.0.0.1", port)
            rng = random.Random(5)
            initiation, _ = valid_initiation(server_public)
            for i in range(SERVER_ROUNDS):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                if i % 2:
                    bad = next(mutations(rng, initiation, 1))
                    writer.write((f"POST /ts2021 HTTP/1.1\r\nUpgrade: tailscale-control-protocol\r\n"
                                  f"X-Tailscale-Handshake: {base64.b64encode(bad).decode()}\r\n\r\n").encode())
                else:
                    writer.close()
                    reader, writer, session = await noise_channel(port, server_public)
                    records = meshbox.seal_records(session.send, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" * 3)
                    writer.write(next(mutations(rng, records, 1)))
                writer.write_eof()
                assert await closed_by_server(reader)
                writer.close()
            await still_served()
            assert snapshot(tmp_path) == before
            for c in steady:
                await c.close()
    asyncio.run(main())


# ---- takeover ----

def test_node_key_cannot_be_taken_over(tmp_path):
    async def main():
        async with running_server(tmp_path) as (server, port):
            key = new_key(server)
            victim = tsclient.ControlClient("127.0.0.1", port, "victim")
            await victim.join(key)
            before = snapshot(tmp_path)
            thief = tsclient.ControlClient("127.0.0.1", port, "thief")
            thief.node_private = victim.node_private
            await thief.connect()
            # With a valid auth key, claiming the victim's node key is refused.
            assert "another machine" in (await thief.register(key))["Error"]
            # Without registering, a map for the victim's node key is refused.
            status, _ = await thief.request("/machine/map", thief.map_request(stream=False))
            assert status == 401
            # Rotating "from" the victim's key to a new one needs the victim's machine key.
            old = thief.node_key
            thief.node_private = meshbox.new_private_key()
            response = await thief.register("", OldNodeKey=old)
            assert not response.get("MachineAuthorized")
            assert snapshot(tmp_path) == before
            await victim.update_endpoints(["203.0.113.5:1"])
            await victim.close(), await thief.close()
    asyncio.run(main())


def test_derp_client_cannot_claim_another_key():
    async def main():
        derp = meshbox.DerpServer(meshbox.new_private_key())
        server = await serve_derp_http(derp)
        port = server.sockets[0].getsockname()[1]
        victim = await DerpClient.connect("127.0.0.1", port)
        sender = await DerpClient.connect("127.0.0.1", port)
        # The impostor sends ClientInfo naming the victim's key, boxed with its own key.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /derp HTTP/1.1\r\nHost: x\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n\r\n")
        await reader.readuntil(b"\r\n\r\n")
        _, body = await meshbox.read_frame(reader, 1 << 16)
        nonce = os.urandom(meshbox.DERP_NONCE_LEN)
        sealed = meshbox.box_seal(meshbox.new_private_key(), derp.public_key, nonce, b"{}")
        writer.write(meshbox.frame(meshbox.FRAME_CLIENT_INFO, victim.public_key + nonce + sealed))
        assert await closed_by_server(reader)
        sender.writer.write(meshbox.frame(meshbox.FRAME_SEND_PACKET, victim.public_key + b"for the victim"))
        frame_type, body = await asyncio.wait_for(meshbox.read_frame(victim.reader, 1 << 16), 5)
        assert (frame_type, body[32:]) == (meshbox.FRAME_RECV_PACKET, b"for the victim")
        assert derp.clients == 2
        for c in (victim, sender):
            await c.close()
        writer.close()
        server.close()
        derp.close()
    asyncio.run(main())


def test_hostile_derp_frames_close_only_that_client():
    async def main():
        derp = meshbox.DerpServer(meshbox.new_private_key())
        server = await serve_derp_http(derp)
        port = server.sockets[0].getsockname()[1]
        a = await DerpClient.connect("127.0.0.1", port)
        b = await DerpClient.connect("127.0.0.1", port)
        rng = random.Random(6)
        for _ in range(SERVER_ROUNDS):
            hostile = await DerpClient.connect("127.0.0.1", port)
            frames = b"".join(meshbox.frame(rng.randrange(0x20), rng.randbytes(rng.choice([0, 1, 8, 31, 40, 2000])))
                              for _ in range(rng.randint(1, 6)))
            hostile.writer.write(next(mutations(rng, frames, 1)) + struct.pack(">BI", 4, 1 << 30))
            hostile.writer.write_eof()
            assert await closed_by_server(hostile.reader)
            await hostile.close()
        a.writer.write(meshbox.frame(meshbox.FRAME_SEND_PACKET, b.public_key + b"still relayed"))
        while True:
            frame_type, body = await asyncio.wait_for(meshbox.read_frame(b.reader, 1 << 16), 5)
            if frame_type == meshbox.FRAME_RECV_PACKET:
                break
        assert body == a.public_key + b"still relayed"
        assert derp.clients == 2
        for c in (a, b):
            await c.close()
        server.close()
        derp.close()
    asyncio.run(main())


# ---- limits ----

@contextlib.asynccontextmanager
async def limited_server(state_dir, **limits):
    port = meshproc.free_port()
    config = meshbox.Config(state_dir=str(state_dir), listen=f"127.0.0.1:{port}", derp_listen="off",
                            stun_listen="off", **limits)
    server = meshbox.Server(config)
    await server.start()
    try:
        yield server, port
    finally:
        await server.stop()


def test_connection_count_is_limited(tmp_path):
    async def main():
        async with limited_server(tmp_path, max_connections=8) as (server, port):
            idle = [await asyncio.open_connection("127.0.0.1", port) for _ in range(8)]
            await asyncio.sleep(0.1)
            status, body = await tsclient.http_get("127.0.0.1", port, "/health")
            assert status == 503 and b"too many connections" in body
            for _, writer in idle:
                writer.close()
            await asyncio.sleep(0.1)
            assert (await tsclient.http_get("127.0.0.1", port, "/health"))[0] == 200
    asyncio.run(main())


async def open_bodies(client, streams, size, timeout=10):
    """Send size bytes on each of several requests, never ending them; returns the ids the server reset."""
    ids = []
    for _ in range(streams):
        sid = client.h2.get_next_available_stream_id()
        client.h2.send_headers(sid, [(":method", "POST"), (":path", "/machine/register"), (":scheme", "http"),
                                     (":authority", "x")])
        client.streams[sid] = tsclient.Stream()
        ids.append(sid)
    remaining = dict.fromkeys(ids, size)
    async with asyncio.timeout(timeout):
        while any(remaining.values()):
            progressed = False
            for sid in ids:
                if client.streams[sid].ended:
                    remaining[sid] = 0
                n = min(remaining[sid], client.h2.local_flow_control_window(sid), 16384)
                if n > 0:
                    client.h2.send_data(sid, b" " * n)
                    remaining[sid] -= n
                    progressed = True
            client.flush()
            await asyncio.sleep(0 if progressed else 0.01)
    await asyncio.sleep(0.2)
    return [sid for sid in ids if client.streams[sid].ended]


def test_buffered_request_bodies_are_limited_per_connection(tmp_path):
    async def main():
        async with running_server(tmp_path) as (server, port):
            key = new_key(server)
            steady, still_served = await steady_pair(port, key)
            client = tsclient.ControlClient("127.0.0.1", port, "hog")
            await client.connect()
            reset = await open_bodies(client, 12, 400 << 10)      # 4.8 MB held open, each under 1 MB
            assert len(reset) >= 6, f"only {len(reset)} of 12 half-sent requests were refused"
            await still_served()
            await client.close()
            for c in steady:
                await c.close()
    asyncio.run(main())


def test_oversized_request_body_is_refused(tmp_path):
    async def main():
        async with running_server(tmp_path) as (server, port):
            client = tsclient.ControlClient("127.0.0.1", port, "big")
            await client.connect()
            before = snapshot(tmp_path)
            stream = client.start_request("/machine/register", {"Pad": "x" * (meshbox.MAX_REQUEST_BODY + 10)})
            async with asyncio.timeout(10):
                while not stream.ended:
                    stream.event.clear()
                    await stream.event.wait()
            assert stream.status is None            # reset, never answered
            assert snapshot(tmp_path) == before
            status, _ = await client.request("/machine/map", client.map_request(stream=False))
            assert status == 401                   # the connection itself still serves
            await client.close()
    asyncio.run(main())
