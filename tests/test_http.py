"""Connections and HTTP heads facing strangers: sizes, timeouts, budgets, slow readers (loopback only)."""

import asyncio

import pytest

import meshbox
from derpclient import FakeTransport, FakeWriter


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
