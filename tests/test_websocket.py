"""The WebSocket section of meshbox.py: the server side of a byte stream over WebSocket.

Its contract: websocket_accept_value answers RFC 6455's handshake;
websocket_frame writes unmasked server frames with the right length form;
WebSocketStream gives readexactly/read/write over binary messages whatever
the TCP read boundaries, joins fragments, answers pings, skips frames that
carry no stream bytes, ends at a close frame, and refuses unmasked frames,
long or fragmented control frames and frames over WS_MAX_MESSAGE before it
reads their payload.  (test_http.py covers masking, a plain unmasked frame,
pings and a peer that does not read its pongs; test_fuzz.py feeds garbage.)
"""

import asyncio
import struct

import pytest

import meshbox
from derpclient import FakeWriter, WebSocketClientStream

MASK = b"\x37\xfa\x21\x3d"


def client_frame(opcode, payload, fin=True, mask=MASK, length_form=None):
    """A frame as a browser sends it (masked); length_form forces 126 or 127."""
    n = len(payload)
    head = bytes([(0x80 if fin else 0) | opcode])
    bit = 0x80 if mask else 0
    form = length_form or (n if n < 126 else 126 if n < 65536 else 127)
    if form < 126:
        head += bytes([bit | n])
    elif form == 126:
        head += bytes([bit | 126]) + struct.pack(">H", n)
    else:
        head += bytes([bit | 127]) + struct.pack(">Q", n)
    return head + mask + (meshbox.websocket_mask(mask, payload) if mask else payload)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 20))


async def fed(data, chunk=None, eof=True):
    """A StreamReader fed data (in pieces of `chunk` bytes, each after the reader waited)."""
    reader = asyncio.StreamReader()
    if chunk is None:
        reader.feed_data(data)
        if eof:
            reader.feed_eof()
        return reader

    async def feed():
        for i in range(0, len(data), chunk):
            await asyncio.sleep(0)
            reader.feed_data(data[i:i + chunk])
        if eof:
            reader.feed_eof()
    asyncio.get_running_loop().create_task(feed())
    return reader


def test_accept_value_is_rfc_6455s_example():
    assert meshbox.websocket_accept_value("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


@pytest.mark.parametrize("n, head", [
    (0, b"\x82\x00"), (125, b"\x82\x7d"), (126, b"\x82\x7e\x00\x7e"), (65535, b"\x82\x7e\xff\xff"),
    (65536, b"\x82\x7f" + (65536).to_bytes(8, "big")),
])
def test_server_frames_are_final_unmasked_and_use_the_shortest_length_form(n, head):
    payload = bytes(range(256)) * (n // 256) + bytes(n % 256)
    frame = meshbox.websocket_frame(meshbox.WS_OP_BINARY, payload)
    assert frame == head + payload


def test_a_stream_read_one_byte_at_a_time_matches_the_messages():
    messages = [b"a" * 10, bytes(range(256)) * 2, b"z" * 70000, b"", b"end"]
    data = b"".join(client_frame(meshbox.WS_OP_BINARY, m) for m in messages)
    whole = b"".join(messages)

    async def main():
        stream = meshbox.WebSocketStream(await fed(data, chunk=1 if len(data) < 2000 else 997), FakeWriter())
        got = bytearray()
        for size in (3, 8, 300, 70000, len(whole) - 70311):
            got += await stream.readexactly(size)
        return bytes(got)
    assert run(main()) == whole


def test_read_returns_what_is_buffered_then_the_next_message_and_empty_at_close():
    data = (client_frame(meshbox.WS_OP_BINARY, b"hello world") + client_frame(meshbox.WS_OP_BINARY, b"second")
            + client_frame(meshbox.WS_OP_CLOSE, b"\x03\xe8"))

    async def main():
        stream = meshbox.WebSocketStream(await fed(data, chunk=2), FakeWriter())
        return [await stream.read(5), await stream.read(100), await stream.read(100), await stream.read(100)]
    assert run(main()) == [b"hello", b" world", b"second", b""]


def test_a_close_frame_ends_readexactly():
    data = client_frame(meshbox.WS_OP_BINARY, b"abc") + client_frame(meshbox.WS_OP_CLOSE, b"")

    async def main():
        stream = meshbox.WebSocketStream(await fed(data), FakeWriter())
        assert await stream.readexactly(2) == b"ab"
        await stream.readexactly(2)
    with pytest.raises(asyncio.IncompleteReadError):
        run(main())


def test_a_connection_cut_inside_a_frame_is_an_incomplete_read():
    frame = client_frame(meshbox.WS_OP_BINARY, b"x" * 100)

    async def main(method):
        stream = meshbox.WebSocketStream(await fed(frame[:50]), FakeWriter())
        return await getattr(stream, method)(100)
    with pytest.raises(asyncio.IncompleteReadError):
        run(main("readexactly"))
    assert run(main("read")) == b""


def test_fragments_join_and_a_ping_between_them_is_answered():
    data = (client_frame(meshbox.WS_OP_BINARY, b"frag-", fin=False) + client_frame(meshbox.WS_OP_PING, b"hi")
            + client_frame(meshbox.WS_OP_CONT, b"ment-", fin=False) + client_frame(meshbox.WS_OP_CONT, b"end"))
    writer = FakeWriter()

    async def main():
        return await meshbox.WebSocketStream(await fed(data, chunk=3), writer).readexactly(13)
    assert run(main()) == b"frag-ment-end"
    assert writer.frames == [meshbox.websocket_frame(meshbox.WS_OP_PONG, b"hi")]


@pytest.mark.parametrize("opcode", [0x1, 0x3, 0x7, meshbox.WS_OP_PONG, 0xB, 0xF])
def test_frames_that_carry_no_stream_bytes_are_skipped(opcode):
    """Text, pong and reserved opcodes add nothing to the byte stream and get no answer."""
    data = client_frame(opcode, b"IGNORED") + client_frame(meshbox.WS_OP_BINARY, b"data")
    writer = FakeWriter()

    async def main():
        stream = meshbox.WebSocketStream(await fed(data), writer)
        return await stream.readexactly(4), await stream.read(10)
    assert run(main()) == (b"data", b"")
    assert writer.frames == []


@pytest.mark.parametrize("form", [126, 127])
def test_long_length_forms_are_read(form):
    payload = bytes(range(200))
    data = client_frame(meshbox.WS_OP_BINARY, payload, length_form=form)

    async def main():
        return await meshbox.WebSocketStream(await fed(data, chunk=5), FakeWriter()).readexactly(200)
    assert run(main()) == payload


def refusal(head):
    """What reading a stream that starts with this head raises; no payload follows,
    so a refusal must come before the stream waits for one."""
    async def main():
        stream = meshbox.WebSocketStream(await fed(head, eof=False), FakeWriter())
        await stream.readexactly(1)
    with pytest.raises(ConnectionError) as refused:
        run(main())
    return str(refused.value)


def test_a_frame_over_the_message_limit_is_refused_before_its_payload():
    too_big = meshbox.WS_MAX_MESSAGE + 1
    assert "too large" in refusal(bytes([0x82, 0x80 | 127]) + struct.pack(">Q", too_big))
    assert "too large" in refusal(bytes([0x82, 0x80 | 127]) + struct.pack(">Q", 1 << 63))


def test_a_frame_of_exactly_the_limit_is_read():
    payload = b"\x01" * meshbox.WS_MAX_MESSAGE

    async def main():
        data = client_frame(meshbox.WS_OP_BINARY, payload)
        return await meshbox.WebSocketStream(await fed(data), FakeWriter()).readexactly(len(payload))
    assert run(main()) == payload


def test_unmasked_and_malformed_control_frames_are_refused():
    assert "unmasked" in refusal(bytes([0x82, 0x05]))
    assert "control frame" in refusal(bytes([0x89, 0x80 | 126]) + struct.pack(">H", 126))     # long ping
    assert "control frame" in refusal(bytes([0x08, 0x80]))                    # fragmented close
    assert "control frame" in refusal(bytes([0x8F, 0x80 | 127]))              # reserved control, long


def test_write_sends_one_binary_frame_per_call():
    writer = FakeWriter()
    stream = meshbox.WebSocketStream(None, writer)
    stream.write(b"abc")
    stream.write(b"x" * 300)
    assert writer.frames == [meshbox.websocket_frame(meshbox.WS_OP_BINARY, b"abc"),
                             meshbox.websocket_frame(meshbox.WS_OP_BINARY, b"x" * 300)]


def test_a_round_trip_over_loopback():
    """A browser-style client and the server-side stream echo messages of every length form."""
    sizes = [1, 125, 126, 65535, 65536, 200000]

    async def main():
        async def echo(reader, writer):
            stream = meshbox.WebSocketStream(reader, writer)
            try:
                while True:
                    stream.write(await stream.readexactly(int.from_bytes(await stream.readexactly(4), "big")))
                    await stream.drain()
            except asyncio.IncompleteReadError:
                pass
            finally:
                stream.close()

        server = await asyncio.start_server(echo, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        client = WebSocketClientStream(reader, writer)
        got = []
        for size in sizes:
            payload = bytes([size % 251]) * size
            client.write(size.to_bytes(4, "big") + payload)
            got.append(await client.readexactly(size) == payload)
        client.close()
        server.close()
        await server.wait_closed()
        return got
    assert run(main()) == [True] * len(sizes)
