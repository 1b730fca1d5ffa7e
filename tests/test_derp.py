"""DERP relay and its self-signed TLS certificate, over loopback only."""

import asyncio
import os
import secrets
import shutil
import ssl
import subprocess
import time

import pytest

import meshbox
from derpclient import DerpClient, fake_connection, serve_derp_http, write_self_signed
from meshbox import (FRAME_PEER_GONE, FRAME_PONG, FRAME_RECV_PACKET, FRAME_SEND_PACKET,
                     PEER_GONE_DISCONNECTED, PEER_GONE_NOT_HERE, DerpError, frame, read_frame)

DISCO_LIKE = meshbox.DISCO_MAGIC + bytes(32 + 24 + 10)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


async def with_relay(test, ssl_context=None, admit=None):
    """Run test(derp, port) against a DerpServer behind a loopback HTTP server."""
    derp = meshbox.DerpServer(meshbox.new_private_key(), admit)
    server = await serve_derp_http(derp, ssl_context=ssl_context)
    port = server.sockets[0].getsockname()[1]
    try:
        return await test(derp, port)
    finally:
        server.close()
        derp.close()
        await server.wait_closed()


async def reader_of(data):
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    return reader


async def closed_by_server(reader):
    """True once the server has closed the connection (FIN or reset)."""
    try:
        return await asyncio.wait_for(reader.read(), 5) == b""
    except ConnectionResetError:
        return True


async def no_frame_within(client, seconds=0.3):
    with pytest.raises(TimeoutError):
        await client.recv_frame(timeout=seconds)


# ---- frames ----

def test_frame_layout_and_round_trip():
    async def main():
        assert frame(FRAME_SEND_PACKET, b"ab") == b"\x04\x00\x00\x00\x02ab"
        assert frame(meshbox.FRAME_KEEP_ALIVE) == b"\x06\x00\x00\x00\x00"
        frames = [(0x12, b"12345678"), (0x06, b""), (0x04, os.urandom(1000))]
        reader = await reader_of(b"".join(frame(t, b) for t, b in frames))
        got = [await read_frame(reader, 2000) for _ in frames]
        assert got == frames
        with pytest.raises(EOFError):
            await read_frame(reader, 2000)
    run(main())


def test_truncated_frames_refused():
    async def main():
        whole = frame(FRAME_SEND_PACKET, bytes(40))
        for cut in (1, 4, 5, len(whole) - 1):
            with pytest.raises(DerpError):
                await read_frame(await reader_of(whole[:cut]), 100)
        with pytest.raises(EOFError):
            await read_frame(await reader_of(b""), 100)
    run(main())


def test_oversized_frame_refused_before_its_body():
    async def main():
        reader = asyncio.StreamReader()
        reader.feed_data(b"\x04" + (meshbox.DERP_MAX_FRAME + 1).to_bytes(4, "big"))
        # No body and no EOF: refusing must not wait for the body.
        with pytest.raises(DerpError):
            await asyncio.wait_for(read_frame(reader, meshbox.DERP_MAX_FRAME), 2)
        ok = frame(FRAME_SEND_PACKET, bytes(meshbox.DERP_MAX_FRAME))
        assert len((await read_frame(await reader_of(ok), meshbox.DERP_MAX_FRAME))[1]) == \
            meshbox.DERP_MAX_FRAME
    run(main())


# ---- handshake and upgrade ----

def test_upgrade_reply_and_server_info():
    async def test(derp, port):
        c = await DerpClient.connect("127.0.0.1", port)
        head = c.http_response.decode()
        assert head.startswith("HTTP/1.1 101 ")
        assert "Upgrade: DERP\r\n" in head and "Derp-Version: 2\r\n" in head
        assert f"Derp-Public-Key: {derp.public_key.hex()}\r\n" in head
        assert c.server_key == derp.public_key
        assert c.server_info == {"version": 2}
        await c.close()
    run(with_relay(test))


def test_fast_start_skips_http_reply():
    async def test(derp, port):
        a = await DerpClient.connect("127.0.0.1", port, fast_start_key=derp.public_key)
        b = await DerpClient.connect("127.0.0.1", port)
        assert a.http_response == b""
        await a.send_packet(b.public_key, b"fast")
        assert await b.recv_packet() == (a.public_key, b"fast")
        await a.close()
        await b.close()
    run(with_relay(test))


def test_websocket_derp_for_browser_clients():
    async def test(derp, port):
        a = await DerpClient.connect("127.0.0.1", port, websocket=True)
        b = await DerpClient.connect("127.0.0.1", port)
        assert b"Sec-WebSocket-Protocol: derp\r\n" in a.http_response
        big = os.urandom(3000)
        await a.send_packet(b.public_key, big)
        await b.send_packet(a.public_key, b"to the browser")
        assert await b.recv_packet() == (a.public_key, big)
        assert await a.recv_packet() == (b.public_key, b"to the browser")
        assert await a.ping() and derp.clients == 2
        await a.close()
        await b.close()
    run(with_relay(test))


def test_plain_get_gets_426():
    async def test(derp, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /derp HTTP/1.1\r\nHost: x\r\n\r\n")
        reply = await asyncio.wait_for(reader.read(), 5)
        assert reply.startswith(b"HTTP/1.1 426 ")
        writer.close()
    run(with_relay(test))


async def raw_upgrade(port):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /derp HTTP/1.1\r\nHost: x\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n\r\n")
    await reader.readuntil(b"\r\n\r\n")
    frame_type, body = await read_frame(reader, 1024)
    assert frame_type == meshbox.FRAME_SERVER_KEY and body.startswith(meshbox.DERP_MAGIC)
    return reader, writer


def test_bad_client_info_closes_only_that_client():
    async def test(derp, port):
        a = await DerpClient.connect("127.0.0.1", port)
        b = await DerpClient.connect("127.0.0.1", port)
        bad_inputs = [
            # a box sealed to the wrong key
            frame(meshbox.FRAME_CLIENT_INFO, os.urandom(32) + os.urandom(24) + os.urandom(40)),
            # too short to hold key and nonce
            frame(meshbox.FRAME_CLIENT_INFO, os.urandom(50)),
            # a packet before the handshake
            frame(FRAME_SEND_PACKET, a.public_key + b"sneaky"),
        ]
        for bad in bad_inputs:
            reader, writer = await raw_upgrade(port)
            writer.write(bad)
            assert await closed_by_server(reader)
            writer.close()
        assert derp.clients == 2
        await a.send_packet(b.public_key, b"still here")
        assert await b.recv_packet() == (a.public_key, b"still here")
        await no_frame_within(a, 0.2)    # the sneaky packet went nowhere
        await a.close()
        await b.close()
    run(with_relay(test))


def test_client_info_must_be_valid_json():
    async def test(derp, port):
        reader, writer = await raw_upgrade(port)
        private = meshbox.new_private_key()
        nonce = os.urandom(24)
        sealed = meshbox.box_seal(private, derp.public_key, nonce, b"not json{")
        writer.write(frame(meshbox.FRAME_CLIENT_INFO,
                           meshbox.x25519_public(private) + nonce + sealed))
        assert await closed_by_server(reader)
        writer.close()
        assert derp.clients == 0
    run(with_relay(test))


def test_client_info_is_due_within_the_handshake_timeout(monkeypatch):
    monkeypatch.setattr(meshbox, "DERP_HANDSHAKE_TIMEOUT", 0.3)
    async def test(derp, port):
        reader, writer = await raw_upgrade(port)
        assert await closed_by_server(reader)
        writer.close()
        assert derp.clients == 0
    run(with_relay(test))


def test_only_admitted_keys_join_and_the_others_hear_why():
    member_private = meshbox.new_private_key()
    member_key = meshbox.x25519_public(member_private)

    def admit(key):
        return None if key == member_key else "this key is not a node of the tailnet"

    async def test(derp, port):
        member = await DerpClient.connect("127.0.0.1", port, private_key=member_private)
        for websocket in (False, True):
            with pytest.raises(ConnectionError, match="this key is not a node of the tailnet"):
                await DerpClient.connect("127.0.0.1", port, websocket=websocket)
        assert derp.clients == 1 and derp.connections_total == 1
        assert await member.ping()
        await member.close()
    run(with_relay(test, admit=admit))


# ---- relaying ----

def test_two_clients_exchange_packets():
    async def test(derp, port):
        a = await DerpClient.connect("127.0.0.1", port)
        b = await DerpClient.connect("127.0.0.1", port)
        assert derp.clients == 2
        big = os.urandom(meshbox.DERP_MAX_PACKET)
        await a.send_packet(b.public_key, b"hello b")
        await b.send_packet(a.public_key, b"hello a")
        await a.send_packet(b.public_key, big)
        assert await b.recv_packet() == (a.public_key, b"hello b")
        assert await a.recv_packet() == (b.public_key, b"hello a")
        assert await b.recv_packet() == (a.public_key, big)
        assert derp.packets_relayed == 3
        assert derp.bytes_relayed == 14 + len(big)
        await a.close()
        await b.close()
    run(with_relay(test))


def test_packet_over_64k_closes_sender():
    async def test(derp, port):
        a = await DerpClient.connect("127.0.0.1", port)
        b = await DerpClient.connect("127.0.0.1", port)
        await a.send_packet(b.public_key, bytes(meshbox.DERP_MAX_PACKET + 1))
        assert await closed_by_server(a.reader)
        await no_frame_within(b, 0.2)
        await b.ping()
        await b.close()
    run(with_relay(test))


def test_third_client_receives_nothing_addressed_to_others():
    async def test(derp, port):
        a = await DerpClient.connect("127.0.0.1", port)
        b = await DerpClient.connect("127.0.0.1", port)
        c = await DerpClient.connect("127.0.0.1", port)
        for i in range(5):
            await a.send_packet(b.public_key, b"for b %d" % i)
        for i in range(5):
            assert await b.recv_packet() == (a.public_key, b"for b %d" % i)
        await c.ping()      # anything relayed to c would arrive before its pong
        await no_frame_within(c)
        await a.close()
        await b.close()
        await c.close()
    run(with_relay(test))


def test_ping_pong():
    async def test(derp, port):
        a = await DerpClient.connect("127.0.0.1", port)
        assert await a.ping(b"12345678") == b"12345678"
        a.writer.write(frame(meshbox.FRAME_PING, b"abcdefgh-extra"))  # extra bytes allowed
        assert await a.recv_frame() == (FRAME_PONG, b"abcdefgh")
        a.writer.write(frame(meshbox.FRAME_PING, b"short"))
        assert await closed_by_server(a.reader)
    run(with_relay(test))


def test_keep_alive_frames(monkeypatch):
    monkeypatch.setattr(meshbox, "DERP_KEEPALIVE", 0.05)

    async def test(derp, port):
        a = await DerpClient.connect("127.0.0.1", port)
        started = time.monotonic()
        for _ in range(3):
            assert await asyncio.wait_for(read_frame(a.reader, 100), 2) == \
                (meshbox.FRAME_KEEP_ALIVE, b"")
        assert time.monotonic() - started >= 0.1
        await a.close()
    run(with_relay(test))


def test_peer_gone_not_here_only_for_disco_and_rate_limited():
    async def test(derp, port):
        a = await DerpClient.connect("127.0.0.1", port)
        nobody = os.urandom(32)
        await a.send_packet(nobody, b"plain data")
        await a.ping()
        await no_frame_within(a, 0.1)
        for _ in range(5):
            await a.send_packet(nobody, DISCO_LIKE)
        gone = []
        await a.ping()
        while a._pending:
            gone.append(await a.recv_frame())
        # burst of 3, then one per second
        assert gone == [(FRAME_PEER_GONE, nobody + bytes([PEER_GONE_NOT_HERE]))] * 3
        assert derp.packets_dropped == 6
        await a.close()
    run(with_relay(test))


def test_peer_gone_disconnected_to_those_it_sent_to():
    async def test(derp, port):
        a = await DerpClient.connect("127.0.0.1", port)
        b = await DerpClient.connect("127.0.0.1", port)
        c = await DerpClient.connect("127.0.0.1", port)
        await a.send_packet(b.public_key, b"x")
        assert await b.recv_packet() == (a.public_key, b"x")
        await a.close()
        assert await b.recv_frame() == (FRAME_PEER_GONE, a.public_key + bytes([PEER_GONE_DISCONNECTED]))
        await c.ping()
        await no_frame_within(c, 0.2)   # a never sent to c
        assert derp.clients == 2
        await b.close()
        await c.close()
    run(with_relay(test))


def test_duplicate_key_last_writer_receives():
    async def test(derp, port):
        key = meshbox.new_private_key()
        a = await DerpClient.connect("127.0.0.1", port)
        b1 = await DerpClient.connect("127.0.0.1", port, private_key=key)
        b2 = await DerpClient.connect("127.0.0.1", port, private_key=key)
        await a.send_packet(b2.public_key, b"to newest")
        assert await b2.recv_packet() == (a.public_key, b"to newest")
        await b1.ping()             # b1 speaks, so it becomes the active one
        await a.send_packet(b1.public_key, b"to last writer")
        assert await b1.recv_packet() == (a.public_key, b"to last writer")
        await no_frame_within(b2, 0.2)
        await b1.close()            # the key is still here through b2: no PeerGone
        await a.send_packet(b2.public_key, b"to the one left")
        assert await b2.recv_packet() == (a.public_key, b"to the one left")
        await a.ping()
        assert not a._pending
        await a.close()
        await b2.close()
    run(with_relay(test))


async def flood_a_sleeper(derp, port, **tls):
    """A floods a client that never reads; c must still get through at once."""
    a = await DerpClient.connect("127.0.0.1", port, **tls)
    c = await DerpClient.connect("127.0.0.1", port, **tls)
    sleeper = await DerpClient.connect("127.0.0.1", port, **tls)
    chunk = bytes(meshbox.DERP_MAX_PACKET)
    for _ in range(300):                                    # ~20 MB
        await a.send_packet(sleeper.public_key, chunk)
    await a.send_packet(sleeper.public_key, DISCO_LIKE)    # finds no room either
    started = time.monotonic()
    await a.send_packet(c.public_key, b"through")
    assert await c.recv_packet() == (a.public_key, b"through")
    assert time.monotonic() - started < 1
    # What waits for the sleeper stays bounded: everything past the buffer is dropped.
    relayed = derp.packets_relayed - 1
    print("relayed to the sleeper:", relayed)
    assert relayed * len(chunk) < meshbox.DERP_DISCO_BUFFER + (16 << 20)   # + kernel buffers
    assert derp.packets_dropped == 301 - relayed
    assert derp.packets_dropped > 0
    for client in (a, c, sleeper):
        await client.close()


def test_slow_reader_loses_packets_without_stalling_others():
    run(with_relay(flood_a_sleeper))


def test_client_that_reads_nothing_for_two_keepalives_is_dropped(monkeypatch):
    monkeypatch.setattr(meshbox, "DERP_KEEPALIVE", 0.3)
    async def test(derp, port):
        a = await DerpClient.connect("127.0.0.1", port)
        sleeper = await DerpClient.connect("127.0.0.1", port)
        for _ in range(300):                                    # ~20 MB: its buffers fill up
            await a.send_packet(sleeper.public_key, DISCO_LIKE + bytes(meshbox.DERP_MAX_PACKET - 100))
        async with asyncio.timeout(5):
            while derp.clients > 1:
                await asyncio.sleep(0.1)
        assert await a.ping()                                   # the one that reads stays
        for client in (a, sleeper):
            await client.close()
    run(with_relay(test))


def test_disco_and_bulk_limits():
    async def main():
        derp = meshbox.DerpServer(meshbox.new_private_key())
        src, dst = fake_connection(derp), fake_connection(derp)
        dst.transport.size = meshbox.DERP_SEND_BUFFER + 1

        def relay(body, outgoing):       # as the receive loop hands over a SendPacket frame
            data = frame(meshbox.FRAME_SEND_PACKET, body)
            derp._relay(src, data, memoryview(data), 5, len(data), outgoing)

        outgoing = {}
        relay(dst.key + b"bulk", outgoing)          # dropped
        relay(dst.key + DISCO_LIKE, outgoing)      # still has room
        assert b"".join(outgoing[dst][0]) == frame(FRAME_RECV_PACKET, src.key + DISCO_LIKE)
        dst.transport.size = meshbox.DERP_DISCO_BUFFER + 1
        relay(dst.key + DISCO_LIKE, {})      # dropped
        assert derp.packets_dropped == 2 and derp.packets_relayed == 1
        assert not src.writer.frames
    run(main())


def test_pairs_count_data_and_disco_and_stay_bounded(caplog):
    """Per-pair counts for `meshbox paths`: data and disco apart, either
    direction one pair, a log line when a pair starts and stops being
    relayed; a client sending to ever more peers cannot grow the table."""
    async def main():
        derp = meshbox.DerpServer(meshbox.new_private_key())
        a, b = fake_connection(derp), fake_connection(derp)

        def relay(src, dst, packet):        # as the receive loop does with one read's frames
            data, outgoing = frame(meshbox.FRAME_SEND_PACKET, dst.key + packet), {}
            derp._relay(src, data, memoryview(data), 5, len(data), outgoing)
            derp._send_queued(src, outgoing)
            assert dst.writer.frames[-1] == frame(FRAME_RECV_PACKET, src.key + packet)

        with caplog.at_level("INFO", logger="meshbox"):
            relay(a, b, DISCO_LIKE)
            pair, = derp.pairs.values()
            assert (pair.data_bytes, pair.disco_packets, pair.relayed(derp.clock)) == (0, 1, False)
            relay(a, b, b"x" * 100)
            relay(b, a, b"y" * 50)
            assert list(derp.pairs.values()) == [pair]
            assert (pair.data_packets, pair.data_bytes, pair.relayed(derp.clock)) == (2, 150, True)
            derp.sweep_pairs(derp.clock + meshbox.DERP_PAIR_QUIET + 1)
            assert not pair.relayed(derp.clock + meshbox.DERP_PAIR_QUIET + 1)
        logged = [r.getMessage() for r in caplog.records if "<->" in r.getMessage()]
        assert len(logged) == 2 and logged[0].endswith("now relayed") and "no longer relayed" in logged[1], logged
        for _ in range(meshbox.DERP_PAIR_LIMIT * 3):     # a hostile client: a new peer for every packet
            relay(fake_connection(derp), b, b"z")
        assert len(derp.pairs) <= meshbox.DERP_PAIR_LIMIT
        assert pair.keys in derp.pairs                   # the pair that relayed most is kept
        derp.sweep_pairs(derp.clock + meshbox.DERP_PAIR_FORGET + 1)
        assert not derp.pairs                            # idle pairs are forgotten
    run(main())


# ---- TLS ----

def test_tls_with_pinned_self_signed_certificate(tmp_path):
    cert, key, pin = write_self_signed(tmp_path)

    async def test(derp, port):
        a = await DerpClient.connect("127.0.0.1", port, pin=pin, server_name="derp.test")
        b = await DerpClient.connect("127.0.0.1", port, pin=pin)
        await a.send_packet(b.public_key, b"over tls")
        assert await b.recv_packet() == (a.public_key, b"over tls")
        with pytest.raises(ssl.SSLError):
            await DerpClient.connect("127.0.0.1", port, pin="sha256-raw:" + "00" * 32)
        await a.close()
        await b.close()
    run(with_relay(test, meshbox.tls_server_context(cert, key)))


def test_tls_slow_reader_is_bounded_too(tmp_path):
    cert, key, pin = write_self_signed(tmp_path)

    async def test(derp, port):
        await flood_a_sleeper(derp, port, pin=pin)
    run(with_relay(test, meshbox.tls_server_context(cert, key)))


def test_certificate_names_verify_with_openssl_rules(tmp_path):
    """Trusting the certificate itself, host name checks follow its SANs."""
    cert, key, _pin = write_self_signed(tmp_path, "derp.test", ["127.0.0.1", "::1"])

    async def handshake(server_name, port):
        ctx = ssl.create_default_context(cafile=cert)
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx,
                                                       server_hostname=server_name)
        version = writer.get_extra_info("ssl_object").version()
        writer.close()
        return version

    async def test(derp, port):
        assert await handshake("derp.test", port) in ("TLSv1.2", "TLSv1.3")
        assert await handshake("127.0.0.1", port)
        for wrong in ("other.test", "127.0.0.2"):
            with pytest.raises(ssl.SSLCertVerificationError):
                await handshake(wrong, port)
    run(with_relay(test, meshbox.tls_server_context(cert, key)))


def test_tls_1_2_client_accepted(tmp_path):
    cert, key, pin = write_self_signed(tmp_path)

    async def test(derp, port):
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx,
                                                       server_hostname="derp.test")
        tls = writer.get_extra_info("ssl_object")
        assert tls.version() == "TLSv1.2"
        assert meshbox.certificate_pin(tls.getpeercert(binary_form=True)) == pin
        writer.close()
    run(with_relay(test, meshbox.tls_server_context(cert, key)))


@pytest.mark.skipif(shutil.which("openssl") is None, reason="no openssl binary")
def test_certificate_fields_as_openssl_reads_them(tmp_path):
    cert, _key, pin = write_self_signed(tmp_path, "derp.test", ["127.0.0.1", "::1"])
    text = subprocess.run(["openssl", "x509", "-in", cert, "-noout", "-text", "-dates"],
                          capture_output=True, text=True, check=True).stdout
    assert "Version: 3 (0x2)" in text
    assert "Signature Algorithm: ED25519" in text
    assert "Subject: CN = derp.test" in text and "Issuer: CN = derp.test" in text
    assert "DNS:derp.test, IP Address:127.0.0.1, IP Address:0:0:0:0:0:0:0:1" in text
    dates = dict(line.split("=", 1) for line in text.splitlines() if line.startswith("not"))
    start = ssl.cert_time_to_seconds(dates["notBefore"])
    end = ssl.cert_time_to_seconds(dates["notAfter"])
    assert 86400 - 60 <= time.time() - start <= 86400 + 60
    assert abs(end - time.time() - 10 * 365 * 86400) < 60
    der = subprocess.run(["openssl", "x509", "-in", cert, "-outform", "DER"],
                         capture_output=True, check=True).stdout
    assert meshbox.certificate_pin(der) == pin
    verify = subprocess.run(["openssl", "verify", "-CAfile", cert, cert],
                            capture_output=True, text=True)
    assert verify.returncode == 0, verify.stdout + verify.stderr   # signature checks out


def test_certificate_serials_differ_and_key_matches():
    seed = secrets.token_bytes(32)
    one = meshbox.self_signed_certificate(seed, "derp.test")
    two = meshbox.self_signed_certificate(seed, "derp.test")
    assert one != two
    assert meshbox.ed25519_public(seed) in one
    assert meshbox.ed25519_private_key_pem(seed).startswith(b"-----BEGIN PRIVATE KEY-----\n")


def test_tls_context_without_ssl_module(monkeypatch):
    monkeypatch.setattr(meshbox, "ssl", None)
    with pytest.raises(RuntimeError, match="ssl"):
        meshbox.tls_server_context("c", "k")


# ---- what clients report about their NAT (meshbox paths, nodes show) ----

def reporting_node(name, netinfo, endpoints=(), types=()):
    """A node whose client reported Hostinfo.NetInfo `netinfo` (left out when None), as meshbox keeps it."""
    hostinfo = {"Hostname": name, "IPNVersion": "1.96.4-t8cf541dfd"}
    if netinfo is not None:
        hostinfo["NetInfo"] = netinfo
    hostinfo = meshbox.checked_hostinfo(hostinfo)
    return meshbox.Node(id=1, machine_key=bytes(32), node_key=bytes(32), disco_key=b"", user_id=1, hostname=name,
                        given_name=name, ipv4="100.64.0.1", ipv6="fd7a:115c:a1e0::1", tags=[], ephemeral=False,
                        auth_key_id=None, expiry=None, created=0, last_seen=0, hostinfo=hostinfo,
                        endpoints=list(endpoints), approved_routes=[], cap=133, endpoint_types=list(types))


def test_nat_kind_in_words_from_netinfo_of_any_shape():
    hard = reporting_node("hard", {"MappingVariesByDestIP": True, "WorkingUDP": True, "PreferredDERP": 900,
                                   "DERPLatency": {"900-v4": 0.0123, "901-v4": "x"}},
                          ["203.0.113.14:4130", "192.0.2.66:41641"], [2, 1])
    easy = reporting_node("easy", {"MappingVariesByDestIP": False, "HairPinning": True})
    blocked = reporting_node("blocked", {"WorkingUDP": False})
    upnp = reporting_node("upnp", {"MappingVariesByDestIP": True, "UPnP": True})
    assert meshbox.nat_words(hard) == ["hard NAT: mapping varies by destination"]
    assert meshbox.nat_words(easy) == ["easy NAT (or none): one mapping for every destination", "hairpinning"]
    assert meshbox.nat_words(blocked) == ["UDP blocked"] and meshbox.nat_class(blocked) == "udp-blocked"
    assert "port mapping: UPnP" in meshbox.nat_words(upnp)
    for odd in (None, [1], "NetInfo", {"MappingVariesByDestIP": 7, "PreferredDERP": True, "DERPLatency": [1]},
                {"MappingVariesByDestIP": "false", "HairPinning": "true"}):     # Go's opt.Bool JSON is true or false
        node = reporting_node("odd", odd)
        assert (meshbox.nat_words(node), meshbox.nat_class(node), meshbox.home_derp(node)) == \
            (["not reported"], "unknown", 0)
        assert meshbox.network_fields(node)["derp_latency_ms"] == {}
    fields = meshbox.network_fields(hard)
    assert fields["endpoints_from"] == [{"endpoint": "203.0.113.14:4130", "from": "stun"},
                                        {"endpoint": "192.0.2.66:41641", "from": "local"}]
    assert (fields["derp_home"], fields["derp_latency_ms"], fields["capability"]) == (900, {"900-v4": 12.3}, 133)
    assert fields["client_version"] == "1.96.4-t8cf541dfd"
    assert "both are behind hard NATs" in meshbox.why_relayed(hard, reporting_node("h2", {"MappingVariesByDestIP": True}))[0]
    assert "hard is behind a hard NAT" in meshbox.why_relayed(hard, easy)[0]
    assert meshbox.why_relayed(hard, reporting_node("pm", {"PMP": True}))[0].startswith("nothing in their NetInfo")
    assert meshbox.why_relayed(blocked, easy) == ["blocked: UDP blocked, so only DERP over TCP reaches it"]


def test_second_stun_port_is_a_stun_only_region_never_home():
    derp_map = meshbox.derp_map("203.0.113.1", 443, [3478, 3479], "")
    main, stun = derp_map["Regions"]["900"], derp_map["Regions"]["901"]
    assert main["Nodes"][0]["STUNPort"] == 3478 and not main["Nodes"][0].get("STUNOnly")
    assert stun["Nodes"] == [dict(main["Nodes"][0], Name="901a", RegionID=901, STUNPort=3479, STUNOnly=True)]
    assert derp_map["HomeParams"] == {"RegionScore": {"901": meshbox.STUN_ONLY_REGION_SCORE}}
    assert set(meshbox.derp_map("203.0.113.1", 443, [3478], "")["Regions"]) == {"900"}
    config = meshbox.Config(listen="203.0.113.1:8080")
    assert config.stun_addresses() == [("203.0.113.1", 3478), ("203.0.113.1", 3479)]
    with pytest.raises(ValueError, match="1 to 4 addresses"):
        meshbox.Config(stun_listen=",".join(["127.0.0.1:1"] * 5)).stun_addresses()
