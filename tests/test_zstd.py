"""The Zstd framing section of meshbox.py: zstd_raw_frame, zstd_compress, map_frame.

Its contract: zstd_raw_frame is a valid zstd frame (magic, a single-segment
header with the content size, raw blocks of at most ZSTD_MAX_BLOCK, the last
one marked) that any decoder reads back; zstd_compress makes a frame any
decoder reads; map_frame is a little-endian length and one frame, so a map
stream splits into messages whatever the reads' boundaries; without a zstd
library meshbox still sends frames a client decodes.
"""

import json
import os
import struct
import subprocess
import sys

import pytest
import zstandard

import meshbox
import tsclient

DECODER = zstandard.ZstdDecompressor()


def raw_blocks(frame):
    """(last, type, size) of each block of a frame zstd_raw_frame made, checking its header."""
    assert frame[:4] == meshbox.ZSTD_MAGIC
    assert frame[4] == 0xA0                         # single segment, 4-byte content size, no checksum
    content_size = struct.unpack("<I", frame[5:9])[0]
    blocks, offset = [], 9
    while True:
        header = int.from_bytes(frame[offset:offset + 3], "little")
        last, kind, size = header & 1, (header >> 1) & 3, header >> 3
        blocks.append((last, kind, size))
        offset += 3 + size
        if last:
            break
    assert offset == len(frame), "bytes after the last block"
    assert sum(size for _, _, size in blocks) == content_size
    return blocks


@pytest.mark.parametrize("size, expected", [
    (0, [(1, 0, 0)]),
    (1, [(1, 0, 1)]),
    (meshbox.ZSTD_MAX_BLOCK, [(1, 0, meshbox.ZSTD_MAX_BLOCK)]),
    (meshbox.ZSTD_MAX_BLOCK + 1, [(0, 0, meshbox.ZSTD_MAX_BLOCK), (1, 0, 1)]),
    (2 * meshbox.ZSTD_MAX_BLOCK, [(0, 0, meshbox.ZSTD_MAX_BLOCK), (1, 0, meshbox.ZSTD_MAX_BLOCK)]),
])
def test_raw_frames_split_into_marked_blocks_of_at_most_128_kib(size, expected):
    data = os.urandom(size)
    frame = meshbox.zstd_raw_frame(data)
    assert raw_blocks(frame) == expected
    assert len(frame) == 9 + 3 * len(expected) + size
    assert DECODER.decompress(frame) == data


def test_a_raw_frame_states_its_content_size_for_a_streaming_decoder():
    data = b"meshbox " * 5000
    frame = meshbox.zstd_raw_frame(data)
    params = zstandard.get_frame_parameters(frame)
    assert params.content_size == len(data) and not params.has_checksum
    # Read in small pieces, as a client reading off a socket would.
    reader = DECODER.stream_reader(frame)
    assert b"".join(iter(lambda: reader.read(777), b"")) == data


def test_compressed_frames_decode_and_are_smaller_for_map_json():
    message = {"Peers": [{"ID": i, "Name": f"node{i}.mesh.internal.", "Addresses": [f"100.64.0.{i}/32"],
                          "Endpoints": ["192.0.2.1:41641"], "Online": True} for i in range(200)]}
    data = meshbox.json_bytes(message)
    frame = meshbox.zstd_compress(data)
    assert frame[:4] == meshbox.ZSTD_MAGIC
    assert DECODER.decompress(frame, max_output_size=1 << 24) == data
    if meshbox.zstd_compress is not meshbox.zstd_raw_frame:
        assert len(frame) < len(data) / 4


@pytest.mark.parametrize("message", [{"KeepAlive": True}, {}, {"Peers": [], "Domain": "mesh.internal"}])
def test_map_frame_is_a_little_endian_length_and_one_frame(message):
    frame = meshbox.map_frame(message)
    (size,) = struct.unpack("<I", frame[:4])
    assert size == len(frame) - 4
    assert json.loads(DECODER.decompress(frame[4:])) == message


def test_map_frame_takes_json_already_encoded_as_it_is():
    encoded = b'{"KeepAlive":true,"Extra":"as sent"}'
    assert DECODER.decompress(meshbox.map_frame(encoded)[4:]) == encoded
    assert meshbox.map_frame({"a": 1}) == meshbox.map_frame(meshbox.json_bytes({"a": 1}))


def test_a_map_stream_splits_into_messages_whatever_the_read_boundaries():
    messages = [{"KeepAlive": True}, {"Peers": [{"ID": i} for i in range(50)]}, {}, {"Node": {"Name": "x" * 3000}}]
    stream = b"".join(meshbox.map_frame(m) for m in messages)
    for chunk in (1, 3, 4, 5, 64, len(stream)):
        buffer, got = b"", []
        for i in range(0, len(stream), chunk):
            buffer += stream[i:i + chunk]
            frames, buffer = tsclient.split_map_frames(buffer)
            got += [tsclient.decode_map_frame(f) for f in frames]
        assert got == messages and buffer == b"", chunk


def test_a_truncated_frame_does_not_decode():
    frame = meshbox.zstd_raw_frame(b"x" * 1000)
    with pytest.raises(zstandard.ZstdError):
        DECODER.decompress(frame[:-10])


def test_without_a_zstd_library_map_frames_are_raw_and_still_decode():
    code = ("import sys, json; sys.modules['zstandard'] = None; sys.modules['compression'] = None\n"
            f"sys.path.insert(0, {os.path.dirname(meshbox.__file__)!r}); import meshbox\n"
            "assert meshbox.zstd_compress is meshbox.zstd_raw_frame\n"
            "sys.stdout.buffer.write(meshbox.map_frame({'Peers': [1, 2, 3], 'KeepAlive': False}))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    assert result.returncode == 0, result.stderr.decode()
    frame = result.stdout
    assert struct.unpack("<I", frame[:4])[0] == len(frame) - 4
    assert raw_blocks(frame[4:])[-1][0] == 1
    assert json.loads(DECODER.decompress(frame[4:])) == {"Peers": [1, 2, 3], "KeepAlive": False}
