"""Connections and HTTP heads facing strangers: sizes, timeouts, budgets, slow readers (loopback only)."""

import asyncio
import base64
import json
import socket
import ssl
import time

import h2.config
import h2.connection
import pytest

import meshbox
import meshproc
import tsclient
from derpclient import DerpClient, FakeTransport, FakeWriter
from meshproc import MeshboxProcess, free_port, new_key, serving


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


async def parse_head(data):
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    return await meshbox.read_http_request(reader)


def status_of(data):
    with pytest.raises(meshbox.HttpError) as refused:
        run(parse_head(data))
    return refused.value.status


# ---- request heads ----

def test_header_line_over_the_limit_is_refused():
    line = b"X-Big: " + b"a" * meshbox.MAX_HEADER_LINE + b"\r\n"
    assert status_of(b"GET / HTTP/1.1\r\n" + line + b"\r\n") == 431
    fits = b"X-Big: " + b"a" * (meshbox.MAX_HEADER_LINE - 20) + b"\r\n"
    assert run(parse_head(b"GET / HTTP/1.1\r\n" + fits + b"\r\n")).headers["x-big"].startswith("aaa")


def test_request_line_over_the_limit_is_refused():
    assert status_of(b"GET /" + b"a" * meshbox.MAX_HEADER_LINE + b" HTTP/1.1\r\n\r\n") == 431


def test_request_head_total_is_limited():
    # Each line fits, but together they pass the head's limit.
    lines = b"".join(b"X-%d: %s\r\n" % (i, b"a" * (meshbox.MAX_HEADER_LINE - 16))
                     for i in range(meshbox.MAX_HEADERS))
    assert len(lines) > meshbox.MAX_REQUEST_HEAD
    assert status_of(b"GET / HTTP/1.1\r\n" + lines + b"\r\n") == 431


# ---- WebSocket ----

def client_frame(opcode, payload, mask=b"\x11\x22\x33\x44", fin=True):
    """A frame as a client sends it: masked unless mask is empty."""
    n = len(payload)
    head = bytes([(0x80 if fin else 0) | opcode])
    bit = 0x80 if mask else 0
    if n < 126:
        head += bytes([bit | n])
    elif n < 65536:
        head += bytes([bit | 126]) + n.to_bytes(2, "big")
    else:
        head += bytes([bit | 127]) + n.to_bytes(8, "big")
    masked = bytes(b ^ mask[i & 3] for i, b in enumerate(payload)) if mask else payload
    return head + mask + masked


def websocket_read(data, n, buffered=0):
    """readexactly(n) from a server-side WebSocketStream fed data: (the bytes, what it wrote back)."""
    async def main():
        reader = asyncio.StreamReader()
        reader.feed_data(data)
        reader.feed_eof()
        writer = FakeWriter(FakeTransport(buffered))
        try:
            return await meshbox.WebSocketStream(reader, writer).readexactly(n), b"".join(writer.frames)
        except ConnectionError as e:
            return e, b"".join(writer.frames)
    return run(main())


def test_websocket_masking_is_its_own_inverse_at_every_length():
    mask = b"\x9a\x01\xff\x42"
    for n in (0, 1, 3, 4, 5, 125, 126, 4097, 1 << 16):
        data = (bytes(range(256)) * (n // 256 + 1))[:n]
        masked = meshbox.websocket_mask(mask, data)
        assert masked == bytes(b ^ mask[i & 3] for i, b in enumerate(data))
        assert meshbox.websocket_mask(mask, masked) == data


def test_websocket_messages_unmasked_whole():
    payload = bytes(range(256)) * 300
    data = client_frame(meshbox.WS_OP_BINARY, payload) + client_frame(meshbox.WS_OP_BINARY, b"x")
    assert websocket_read(data, len(payload) + 1)[0] == payload + b"x"


def test_websocket_client_frames_must_be_masked():
    refused, _ = websocket_read(client_frame(meshbox.WS_OP_BINARY, b"plain", mask=b""), 5)
    assert isinstance(refused, ConnectionError) and "masked" in str(refused)


def test_websocket_control_frames_are_short_and_whole():
    for bad in (client_frame(meshbox.WS_OP_PING, b"p" * 126), client_frame(meshbox.WS_OP_PING, b"p", fin=False)):
        refused, written = websocket_read(bad + client_frame(meshbox.WS_OP_BINARY, b"data"), 4)
        assert isinstance(refused, ConnectionError) and "control frame" in str(refused)
        assert written == b""


def test_websocket_ping_answered_with_its_payload():
    data = client_frame(meshbox.WS_OP_PING, b"p" * 125) + client_frame(meshbox.WS_OP_BINARY, b"data")
    assert websocket_read(data, 4) == (b"data", meshbox.websocket_frame(meshbox.WS_OP_PONG, b"p" * 125))


def test_websocket_no_pong_for_a_peer_that_does_not_read():
    pings = client_frame(meshbox.WS_OP_PING, b"p" * 125) * 100
    data = pings + client_frame(meshbox.WS_OP_BINARY, b"data")
    assert websocket_read(data, 4, buffered=meshbox.WS_CONTROL_BUFFER + 1) == (b"data", b"")


# ---- a live server ----

async def closed_within(reader, seconds):
    """True if the server closes the connection (FIN or reset) within seconds."""
    try:
        async with asyncio.timeout(seconds):
            while await reader.read(1 << 16):
                pass
        return True
    except ConnectionError:
        return True
    except TimeoutError:
        return False


async def connect_from(source, port):
    """A TCP connection to 127.0.0.1:port from a loopback source address (127.0.0.0/8 is all loopback)."""
    sock = socket.socket()
    sock.bind((source, 0))
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    return await asyncio.open_connection(sock=sock)


async def status_from(source, port, path):
    """The status of a GET from source; None when the connection was reset
    (a server that turns it away closes it with the request unread)."""
    reader, writer = await connect_from(source, port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    try:
        reply = await asyncio.wait_for(reader.read(), 10)
    except ConnectionResetError:
        return None
    finally:
        writer.close()
    return int(reply.split(b" ", 2)[1])


def derp_pin(server):
    return server.coordinator.settings.derp_map["Regions"][str(meshbox.DERP_REGION_ID)]["Nodes"][0]["CertName"]


def test_tls_connections_counted_before_their_handshake(tmp_path):
    async def main():
        async with serving(tmp_path, derp=True, max_connections=10) as (server, port, derp_port):
            silent = [await asyncio.open_connection("127.0.0.1", derp_port) for _ in range(20)]
            closed = await asyncio.gather(*(closed_within(reader, 3) for reader, _ in silent))
            assert sum(closed) >= 10, f"only {sum(closed)} of 20 silent TLS connections were turned away"
            assert len(server.connections) <= 10
            for _, writer in silent:
                writer.close()
            await asyncio.sleep(0.2)
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
            reader, writer = await asyncio.open_connection("127.0.0.1", derp_port, ssl=ctx)
            writer.write(b"GET /derp/probe HTTP/1.1\r\nHost: x\r\n\r\n")
            assert (await asyncio.wait_for(reader.read(), 5)).startswith(b"HTTP/1.1 200 ")
            writer.close()
    run(main())


def test_tls_handshake_is_bounded(tmp_path, monkeypatch):
    monkeypatch.setattr(meshbox, "TLS_HANDSHAKE_TIMEOUT", 0.5)
    async def main():
        async with serving(tmp_path, derp=True) as (server, port, derp_port):
            reader, writer = await asyncio.open_connection("127.0.0.1", derp_port)
            writer.write(b"\x16\x03\x01")          # the start of a ClientHello, then nothing
            assert await closed_within(reader, 5)
            assert not server.connections
            writer.close()
    run(main())


def test_idle_control_connection_is_closed_and_map_streams_are_not(tmp_path, monkeypatch):
    monkeypatch.setattr(meshbox, "CONTROL_IDLE_TIMEOUT", 0.5)
    async def main():
        async with serving(tmp_path) as (server, port, _):
            key = new_key(server)
            member = tsclient.ControlClient("127.0.0.1", port, "member")
            await member.join(key)
            idle = tsclient.ControlClient("127.0.0.1", port, "idle")
            await idle.connect()
            async with asyncio.timeout(5):
                await asyncio.gather(idle.reader_task, return_exceptions=True)
            await asyncio.sleep(1)
            assert member.connected                 # its map stream outlived the idle timeout
            newcomer = tsclient.ControlClient("127.0.0.1", port, "newcomer")
            await newcomer.join(key)
            await member.map_message_where(lambda m: any(p.get("Name", "").startswith("newcomer")
                                                         for p in m.get("PeersChanged") or m.get("Peers") or []))
            for c in (member, idle, newcomer):
                await c.close()
    run(main())


def test_each_kind_has_its_own_budget(tmp_path):
    async def main():
        async with serving(tmp_path, max_control_connections=2) as (server, port, _):
            held = [tsclient.ControlClient("127.0.0.1", port, f"c{i}") for i in range(2)]
            for c in held:
                await c.connect()
            with pytest.raises(ConnectionError, match="503"):
                await tsclient.ControlClient("127.0.0.1", port, "third").connect()
            assert (await tsclient.http_get("127.0.0.1", port, "/health"))[0] == 200
            await held[0].close()
            await asyncio.sleep(0.2)
            again = tsclient.ControlClient("127.0.0.1", port, "again")
            await again.connect()
            for c in held[1:] + [again]:
                await c.close()
    run(main())


def test_one_source_cannot_lock_out_the_others(tmp_path):
    async def main():
        async with serving(tmp_path, max_connections=8, max_connections_per_source=4) as (server, port, _):
            key = new_key(server)
            member = tsclient.ControlClient("127.0.0.1", port, "member")
            await member.join(key)            # proven: not counted against its address
            idle = [await connect_from("127.0.0.2", port) for _ in range(8)]
            turned_away = await asyncio.gather(*(closed_within(reader, 2) for reader, _ in idle))
            assert sum(turned_away) == 4
            assert await status_from("127.0.0.3", port, "/health") == 200
            assert await status_from("127.0.0.2", port, "/health") in (503, None)
            assert await status_from("127.0.0.1", port, "/health") == 200
            for _, writer in idle:
                writer.close()
            await member.close()
    run(main())


def test_derp_serves_the_tailnet_keys_only(tmp_path):
    async def main():
        async with serving(tmp_path, derp=True) as (server, port, derp_port):
            member = tsclient.ControlClient("127.0.0.1", port, "member")
            await member.join(new_key(server))
            relayed = await DerpClient.connect("127.0.0.1", derp_port, private_key=member.node_private,
                                               pin=derp_pin(server))
            assert await relayed.ping()
            with pytest.raises(ConnectionError, match="not a node of this tailnet"):
                await DerpClient.connect("127.0.0.1", derp_port, pin=derp_pin(server))
            node = next(iter(server.coordinator.nodes.values()))
            await asyncio.to_thread(meshproc.cli, "nodes", "expire", str(node.id), state=tmp_path)
            async with asyncio.timeout(5):
                while not meshbox.is_expired(next(iter(server.coordinator.nodes.values())), meshbox.now()):
                    await asyncio.sleep(0.1)
            with pytest.raises(ConnectionError, match="expired"):
                await DerpClient.connect("127.0.0.1", derp_port, private_key=member.node_private,
                                         pin=derp_pin(server))
            await relayed.close()
            await member.close()
    run(main())


def test_derp_client_of_a_deleted_node_is_told_and_dropped(tmp_path):
    async def main():
        async with serving(tmp_path, derp=True) as (server, port, derp_port):
            key = new_key(server)
            member, other = (tsclient.ControlClient("127.0.0.1", port, name) for name in ("member", "other"))
            await member.join(key)
            await other.join(key)
            relayed, stays = [await DerpClient.connect("127.0.0.1", derp_port, private_key=c.node_private,
                                                       pin=derp_pin(server)) for c in (member, other)]
            node = next(n for n in server.coordinator.nodes.values() if n.hostname == "member")
            await asyncio.to_thread(meshproc.cli, "nodes", "delete", str(node.id), state=tmp_path)
            assert await relayed.recv_frame() == (meshbox.FRAME_HEALTH,
                                                  b"this key is not a node of this tailnet "
                                                  b"(meshbox serves only its nodes; see derp_serve_any)")
            assert await closed_within(relayed.reader, 5)
            assert await stays.ping() and server.derp.clients == 1
            for c in (relayed, stays, member, other):
                await c.close()
    run(main())


def test_derp_serve_any_admits_strangers(tmp_path):
    async def main():
        async with serving(tmp_path, derp=True, derp_serve_any=True) as (server, port, derp_port):
            stranger = await DerpClient.connect("127.0.0.1", derp_port, pin=derp_pin(server))
            assert await stranger.ping()
            await stranger.close()
    run(main())


async def control_with_small_receive_buffer(port):
    """A ts2021 connection whose socket takes little before the peer must wait: (reader, writer, noise)."""
    _, body = await tsclient.http_get("127.0.0.1", port, "/key?v=130")
    server_public = meshbox.key_bytes(json.loads(body)["publicKey"], "mkey")
    initiation, finish = meshbox.noise_initiate(meshbox.new_private_key(), server_public, 130)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    reader, writer = await asyncio.open_connection(sock=sock)
    writer.write((f"POST /ts2021 HTTP/1.1\r\nHost: x\r\nUpgrade: tailscale-control-protocol\r\n"
                  f"X-Tailscale-Handshake: {base64.b64encode(initiation).decode()}\r\n\r\n").encode())
    await reader.readuntil(b"\r\n\r\n")
    return reader, writer, finish(await reader.readexactly(meshbox.RESPONSE_LEN))


def test_control_peer_that_stops_reading_is_dropped(tmp_path, monkeypatch):
    monkeypatch.setattr(meshbox, "WRITE_TIMEOUT", 0.5)
    async def main():
        async with serving(tmp_path) as (server, port, _):
            for listener in server.listeners[:1]:      # accepted sockets inherit a small send buffer
                listener.sockets[0].setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            reader, writer, noise = await control_with_small_receive_buffer(port)
            client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
            client.initiate_connection()
            writer.write(meshbox.seal_records(noise.send, client.data_to_send()))
            for i in range(400):          # 1.4 MB of pings, each answered: the answers are never read
                for j in range(200):
                    client.ping(i.to_bytes(4, "big") + j.to_bytes(4, "big"))
                writer.write(meshbox.seal_records(noise.send, client.data_to_send()))
                if writer.transport.get_write_buffer_size() > 1 << 20:
                    break                 # the server stopped reading
                await asyncio.sleep(0)
            await asyncio.sleep(1.5)
            assert await closed_within(reader, 3)
            assert not server.connections
            writer.close()
    run(main())


def test_an_ipv6_stranger_counts_as_its_slash_64():
    one = {meshbox.connection_source((f"2001:db8:1:2::{i:x}", 443, 0, 0)) for i in range(1, 50)}
    assert one == {"2001:db8:1:2::/64"}
    assert meshbox.connection_source(("2001:db8:1:3::1", 443, 0, 0)) != "2001:db8:1:2::/64"
    assert meshbox.connection_source(("::ffff:192.0.2.7", 443, 0, 0)) == "192.0.2.7"
    assert meshbox.connection_source(("192.0.2.7", 443)) == "192.0.2.7"


def test_stop_with_a_silent_tls_peer_is_quiet(tmp_path):
    """SIGTERM while a TLS client sits in a request head and never answers the
    server's close: meshbox stops within seconds, logging no traceback (3.11's
    stream callback logs a connection task that ends cancelled as an error)."""
    server = MeshboxProcess(tmp_path / "state", derp_port=free_port(), log_path=str(tmp_path / "meshbox.log"))
    server.start()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    try:
        with ctx.wrap_socket(socket.create_connection(("127.0.0.1", server.derp_port), timeout=5)) as silent:
            silent.sendall(b"GET /derp HTTP/1.1\r\nHost: x\r\n")     # half a head, then nothing read or sent
            time.sleep(0.3)     # the head is read up to its end
            server.stop(grace=10)
            assert server.proc.returncode == 0, server.log_text()[-3000:]
    finally:
        server.kill()
    log = server.log_text()
    assert "meshbox stopped" in log and "Traceback" not in log and "ERROR" not in log, log[-3000:]
