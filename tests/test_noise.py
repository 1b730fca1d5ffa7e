"""Noise IK as ts2021 uses it: message shapes, keys, the big-endian nonce."""

import hashlib
import hmac

import pytest

import meshbox


def handshake(version=130):
    server = meshbox.new_private_key()
    machine = meshbox.new_private_key()
    initiation, finish = meshbox.noise_initiate(machine, meshbox.x25519_public(server), version)
    response, server_side = meshbox.noise_respond(server, initiation)
    return machine, initiation, response, finish(response), server_side


def test_message_shapes_and_identity():
    machine, initiation, response, client, server = handshake(131)
    assert len(initiation) == 101 and initiation[:5] == bytes([0, 131, 1, 0, 96])
    assert len(response) == 51 and response[:3] == bytes([2, 0, 48])
    assert server.peer_static == meshbox.x25519_public(machine)
    assert server.version == 131


def test_transport_both_ways_with_big_endian_counter():
    _, _, _, client, server = handshake()
    for i in range(3):
        msg = f"hello {i}".encode()
        assert server.recv.open(client.send.seal(msg)) == msg
        assert client.recv.open(server.send.seal(msg[::-1])) == msg[::-1]
    # The 4th record from the client carries counter 3 in the last nonce byte,
    # big-endian: only that nonce opens it.
    sealed = client.send.seal(b"x")
    big = bytes(4) + (3).to_bytes(8, "big")
    little = bytes(4) + (3).to_bytes(8, "little")
    assert meshbox.aead_open(client.send.key, big, sealed) == b"x"
    with pytest.raises(meshbox.CryptoError):
        meshbox.aead_open(client.send.key, little, sealed)


def test_split_keys_follow_the_noise_spec():
    # Recompute the chaining key's HKDF independently (RFC 5869 with
    # HMAC-BLAKE2s, as the Noise spec defines it) for one step.
    ck, ikm = bytes(range(32)), bytes(range(32, 64))
    prk = hmac.new(ck, ikm, hashlib.blake2s).digest()
    t1 = hmac.new(prk, b"\x01", hashlib.blake2s).digest()
    t2 = hmac.new(prk, t1 + b"\x02", hashlib.blake2s).digest()
    assert meshbox.noise_hkdf(ck, ikm, 2) == [t1, t2]
    # The initial hash is BLAKE2s of the 33-byte protocol name (longer than 32).
    state = meshbox.SymmetricState(1)
    name_hash = hashlib.blake2s(b"Noise_IK_25519_ChaChaPoly_BLAKE2s").digest()
    assert state.ck == name_hash
    assert state.h == hashlib.blake2s(name_hash + b"Tailscale Control Protocol v1").digest()


def test_tampering_and_wrong_keys_fail():
    server = meshbox.new_private_key()
    machine = meshbox.new_private_key()
    initiation, _ = meshbox.noise_initiate(machine, meshbox.x25519_public(server), 130)
    for i in (10, 50, 95):
        bad = bytearray(initiation)
        bad[i] ^= 1
        with pytest.raises(meshbox.NoiseError):
            meshbox.noise_respond(server, bytes(bad))
    with pytest.raises(meshbox.NoiseError):
        meshbox.noise_respond(meshbox.new_private_key(), initiation)     # not the server it was made for
    with pytest.raises(meshbox.NoiseError):
        meshbox.noise_respond(server, initiation[:100])
    # A different protocol version in the header changes the prologue.
    with pytest.raises(meshbox.NoiseError):
        meshbox.noise_respond(server, bytes([0, 99]) + initiation[2:])
    _, _, _, client, server_side = handshake()
    sealed = bytearray(client.send.seal(b"record"))
    sealed[0] ^= 1
    with pytest.raises(meshbox.NoiseError):
        server_side.recv.open(bytes(sealed))


def test_records_split_at_the_limit():
    _, _, _, client, server = handshake()
    data = bytes(range(256)) * 40                      # 10240 bytes
    wire = meshbox.seal_records(client.send, data)
    out, i = b"", 0
    while i < len(wire):
        assert wire[i] == meshbox.MSG_RECORD
        n = int.from_bytes(wire[i + 1:i + 3], "big")
        assert 3 + n <= meshbox.MAX_RECORD_LEN
        out += server.recv.open(wire[i + 3:i + 3 + n])
        i += 3 + n
    assert out == data
