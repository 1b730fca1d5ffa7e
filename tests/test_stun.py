"""STUN binding responses, checked with a small parser written from RFC 5389."""

import asyncio
import binascii
import ipaddress
import os
import socket
import struct

import pytest

import meshbox

COOKIE = 0x2112A442


def binding_request(txid, software=b"tailnode", fingerprint=True):
    """A binding request as Tailscale's netcheck sends it (SOFTWARE, FINGERPRINT)."""
    attrs = struct.pack(">HH", 0x8022, len(software)) + software + b"\0" * (-len(software) % 4)
    length = len(attrs) + (8 if fingerprint else 0)
    msg = struct.pack(">HHI", 0x0001, length, COOKIE) + txid + attrs
    if fingerprint:
        crc = binascii.crc32(msg) ^ 0x5354554E
        msg += struct.pack(">HHI", 0x8028, 4, crc)
    return msg


def parse_binding_success(msg):
    """(txid, ip, port) from a binding success response's XOR-MAPPED-ADDRESS."""
    msg_type, length, cookie = struct.unpack(">HHI", msg[:8])
    assert msg_type == 0x0101 and cookie == COOKIE
    assert length == len(msg) - 20
    txid, rest = msg[8:20], msg[20:]
    found = None
    while rest:
        attr_type, attr_len = struct.unpack(">HH", rest[:4])
        value, rest = rest[4:4 + attr_len], rest[4 + attr_len + (-attr_len % 4):]
        if attr_type == 0x0020:
            family, xport = value[1], struct.unpack(">H", value[2:4])[0]
            size = {1: 4, 2: 16}[family]
            key = struct.pack(">I", COOKIE) + txid
            raw = bytes(value[4 + i] ^ key[i] for i in range(size))
            found = (ipaddress.ip_address(raw), xport ^ (COOKIE >> 16))
    assert found is not None, "no XOR-MAPPED-ADDRESS"
    return txid, found[0], found[1]


@pytest.mark.parametrize("addr", [("203.0.113.7", 41641), ("127.0.0.1", 1),
                                  ("2001:db8::1", 3478), ("::1", 65535)])
def test_response_carries_the_source_address(addr):
    txid = os.urandom(12)
    reply = meshbox.stun_binding_response(binding_request(txid), addr)
    assert parse_binding_success(reply) == (txid, ipaddress.ip_address(addr[0]), addr[1])


def test_ipv4_mapped_source_answers_as_ipv4():
    txid = os.urandom(12)
    reply = meshbox.stun_binding_response(binding_request(txid), ("::ffff:198.51.100.9", 5, 0, 0))
    _, ip, port = parse_binding_success(reply)
    assert ip == ipaddress.ip_address("198.51.100.9") and port == 5
    assert len(reply) == 20 + 4 + 8


def test_plain_rfc5389_request_without_attributes():
    txid = os.urandom(12)
    request = struct.pack(">HHI", 1, 0, COOKIE) + txid
    assert parse_binding_success(meshbox.stun_binding_response(request, ("192.0.2.1", 9)))[0] == txid


def test_junk_gets_no_answer():
    good = binding_request(os.urandom(12))
    junk = [
        b"",
        b"\x00" * 19,
        os.urandom(200),
        good[:4] + b"\x00\x00\x00\x00" + good[8:],               # wrong magic cookie
        b"\x01\x01" + good[2:],                                    # a response, not a request
        b"\x00\x03" + good[2:],                                    # another method
        good[:-1],                                                 # length disagrees
        good + b"\x00\x00\x00\x00",                                # trailing bytes
        good[:2] + struct.pack(">H", 2) + good[4:20] + b"\x00\x01",  # length not a multiple of 4
        good[:-4] + bytes(4),                                      # bad fingerprint
        struct.pack(">HHI", 1, 8, COOKIE) + bytes(12) + struct.pack(">HH", 0x8022, 12) + bytes(4),
    ]
    for data in junk:
        assert meshbox.stun_binding_response(data, ("192.0.2.1", 9)) is None, data.hex()


def test_stun_protocol_over_loopback_v4_and_v6():
    async def exchange(family, host):
        loop = asyncio.get_running_loop()
        transport, proto = await loop.create_datagram_endpoint(
            meshbox.StunProtocol, local_addr=(host, 0), family=family)
        server_addr = transport.get_extra_info("sockname")
        sock = socket.socket(family, socket.SOCK_DGRAM)
        sock.bind((host, 0))
        sock.setblocking(False)
        try:
            for junk in (b"hello", os.urandom(64), b"\x00\x01" + bytes(30)):
                sock.sendto(junk, server_addr[:2])
            txid = os.urandom(12)
            sock.sendto(binding_request(txid), server_addr[:2])
            reply = await asyncio.wait_for(loop.sock_recv(sock, 2048), 5)
            got = parse_binding_success(reply)
            assert got == (txid, ipaddress.ip_address(host), sock.getsockname()[1])
            assert proto.requests == 1 and proto.ignored == 3
        finally:
            sock.close()
            transport.close()

    async def main():
        await exchange(socket.AF_INET, "127.0.0.1")
        if socket.has_ipv6:
            try:
                await exchange(socket.AF_INET6, "::1")
            except OSError as e:   # no IPv6 loopback in this sandbox
                pytest.skip(f"IPv6 loopback unavailable: {e}")

    asyncio.run(asyncio.wait_for(main(), 20))
