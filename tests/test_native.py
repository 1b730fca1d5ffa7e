"""The native crypto helper (native/) through meshbox's ctypes binding.

The module builds the helper for this machine with build/native when a C
compiler is there, and is skipped only when no library exists.  Every test
runs once per code path the library has (portable, and NEON on ARM).  Known
answers come from RFC 8439, RFC 7748 and RFC 7693; thousands of random inputs
are checked against libsodium (pynacl) and hashlib.
"""
import hashlib
import os
import random
import shutil
import struct
import subprocess
import sys

import pytest
from nacl import bindings as sodium

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.append(ROOT)  # appended: a development PYTHONPATH may shadow it

import meshbox  # noqa: E402

P = 2**255 - 19


def built_library():
    """Builds the helper for this machine if possible; its path, or None."""
    arch = meshbox.native_arch()
    if arch is None:
        return None
    so = os.path.join(ROOT, "dist", "native", arch, meshbox.NATIVE_LIBRARY)
    if shutil.which("gcc"):
        done = subprocess.run([os.path.join(ROOT, "build", "native"), arch],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
    return so if os.path.isfile(so) else None


@pytest.fixture(scope="module")
def library():
    so = built_library()
    if so is None:
        pytest.skip("native helper not built: no gcc and no "
                    "dist/native/<arch>/libmeshbox_crypto.so")
    return so


@pytest.fixture(scope="module", params=["portable", "neon"])
def native(request, library):
    crypto = meshbox.load_native_crypto(library)
    want = request.param == "neon"
    if want and not crypto.has_neon:
        pytest.skip("this architecture has no NEON path")
    assert crypto.use_neon(want) == want
    yield crypto
    crypto.use_neon(meshbox.cpu_has_neon())


def test_library_imports_nothing(library):
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("nm (binutils) not installed")
    out = subprocess.run([nm, "-D", "--undefined-only", library],
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == ""
    exported = subprocess.run([nm, "-D", "--defined-only", library],
                              capture_output=True, text=True, check=True).stdout
    names = {line.split()[-1] for line in exported.splitlines()}
    assert {"mb_aead_seal", "mb_aead_open", "mb_x25519", "mb_x25519_base",
            "mb_blake2s", "mb_version", "mb_has_neon", "mb_use_neon"} <= names
    assert all(name.startswith("mb_") for name in names), names


CROSS_TOOLS = {"x86_64": ("gcc", None),
               "aarch64": ("aarch64-linux-gnu-gcc", "qemu-aarch64-static"),
               "armv7": ("arm-linux-gnueabihf-gcc", "qemu-arm-static")}


@pytest.mark.parametrize("arch", sorted(CROSS_TOOLS))
def test_c_vectors_pass_on_each_architecture(arch):
    """native/test_vectors.c, both code paths, natively or under qemu-user."""
    compiler, emulator = CROSS_TOOLS[arch]
    if arch == meshbox.native_arch():
        compiler, emulator = "gcc", None
    missing = [tool for tool in (compiler, emulator) if tool and not shutil.which(tool)]
    if missing:
        pytest.skip(f"{' and '.join(missing)} not installed (see build/native)")
    done = subprocess.run([os.path.join(ROOT, "build", "native"), "--test", arch],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    results = [line for line in done.stdout.splitlines() if " passed, " in line]
    assert results and all(line.endswith(" passed, 0 failed") for line in results)
    if arch != "x86_64":
        assert "neon paths tested: portable, neon" in done.stdout


# ---- Known answers ----

SUNSCREEN = (b"Ladies and Gentlemen of the class of '99: If I could offer you "
             b"only one tip for the future, sunscreen would be it.")
SUNSCREEN_SEALED = bytes.fromhex(
    "d31a8d34648e60db7b86afbc53ef7ec2a4aded51296e08fea9e2b5a736ee62d6"
    "3dbea45e8ca9671282fafb69da92728b1a71de0a9e060b2905d6a5b67ecd3b36"
    "92ddbd7f2d778b8c9803aee328091b58fab324e4fad675945585808b4831d7bc"
    "3ff4def08e4b7a9de576d26586cec64b6116"
    "1ae10b594f09e26a7e902ecbd0600691")
A5_SEALED = bytes.fromhex(
    "64a0861575861af460f062c79be643bd5e805cfd345cf389f108670ac76c8cb2"
    "4c6cfc18755d43eea09ee94e382d26b0bdb7b73c321b0100d4f03b7f355894cf"
    "332f830e710b97ce98c8a84abd0b948114ad176e008d33bd60f982b1ff37c855"
    "9797a06ef4f0ef61c186324e2b3506383606907b6a7c02b0f9f6157b53c867e4"
    "b9166c767b804d46a59b5216cde7a4e99040c5a40433225ee282a1b0a06c523e"
    "af4534d7f83fa1155b0047718cbc546a0d072b04b3564eea1b422273f548271a"
    "0bb2316053fa76991955ebd63159434ecebb4e466dae5a1073a6727627097a10"
    "49e617d91d361094fa68f0ff77987130305beaba2eda04df997b714d6c6f2c29"
    "a6ad5cb4022b02709b"
    "eead9d67890cbb22392336fea1851f38")


def test_rfc8439_aead(native):
    key = bytes(range(0x80, 0xa0))
    nonce = bytes.fromhex("070000004041424344454647")
    ad = bytes.fromhex("50515253c0c1c2c3c4c5c6c7")
    assert native.aead_seal(key, nonce, SUNSCREEN, ad) == SUNSCREEN_SEALED
    assert native.aead_open(key, nonce, SUNSCREEN_SEALED, ad) == SUNSCREEN

    key = bytes.fromhex("1c9240a5eb55d38af333888604f6b5f0473917c1402b80099dca5cbc207075c0")
    nonce = bytes.fromhex("000000000102030405060708")
    ad = bytes.fromhex("f33388860000000000004e91")
    plain = native.aead_open(key, nonce, A5_SEALED, ad)
    assert plain.startswith(b"Internet-Drafts are draft documents valid for")
    assert plain.endswith(b"/\xe2\x80\x9cwork in progress./\xe2\x80\x9d")
    assert native.aead_seal(key, nonce, plain, ad) == A5_SEALED


def test_rfc7748_x25519(native):
    cases = [
        ("a546e36bf0527c9d3b16154b82465edd62144c0ac1fc5a18506a2244ba449ac4",
         "e6db6867583030db3594c1a424b15f7c726624ec26b3353b10a903a6d0ab1c4c",
         "c3da55379de9c6908e94ea4df28d084f32eccf03491c71f754b4075577a28552"),
        # u with bit 255 set, which X25519 ignores
        ("4b66e9d4d1b4673c5ad22691957d6af5c11b6421e0ea01d42ca4169e7918ba0d",
         "e5210f12786811d3f4b7959d0538ae2c31dbe7106fc03c3efc4cd549c715a493",
         "95cbde9476e8907d7aade45cb4b873f88b595a68799fa152e6f8f7647aac7957"),
    ]
    for scalar, point, out in cases:
        assert native.x25519(bytes.fromhex(scalar), bytes.fromhex(point)).hex() == out
    alice = bytes.fromhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
    bob = bytes.fromhex("5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb")
    alice_pub, bob_pub = native.x25519_base(alice), native.x25519_base(bob)
    assert alice_pub.hex() == "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"
    assert bob_pub.hex() == "de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f"
    shared = "4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742"
    assert native.x25519(alice, bob_pub).hex() == shared
    assert native.x25519(bob, alice_pub).hex() == shared
    k = u = (9).to_bytes(32, "little")
    for _ in range(100):
        k, u = native.x25519(k, u), k
    # 100 iterations of RFC 7748 5.2's loop, as libsodium computes them
    want = w = (9).to_bytes(32, "little")
    for _ in range(100):
        want, w = sodium.crypto_scalarmult(want, w), want
    assert k == want


def test_rfc7693_blake2s(native):
    assert native.blake2s(b"abc").hex() == (
        "508c5e8c327c14e2e1a72ba34eeb452f37458b209ed63a294d999b4c86675982")

    def selftest_seq(n, seed):
        a, b, out = (0xDEAD4BAD * seed) & 0xFFFFFFFF, 1, bytearray()
        for _ in range(n):
            a, b = b, (a + b) & 0xFFFFFFFF
            out.append(b >> 24)
        return bytes(out)

    outer = b""
    for outlen in (16, 20, 28, 32):
        for inlen in (0, 3, 64, 65, 255, 1024):
            data = selftest_seq(inlen, inlen)
            outer += native.blake2s(data, digest_size=outlen)
            outer += native.blake2s(data, key=selftest_seq(outlen, outlen),
                                    digest_size=outlen)
    assert native.blake2s(outer).hex() == (
        "6a411f08ce25adcdfb02aba641451cec53c598b24f4fc787fbdc88797f4c1dfe")


# ---- Cross-checks against libsodium and hashlib ----

def random_length(rng):
    """Mostly short messages, often near a block edge, sometimes long."""
    pick = rng.random()
    if pick < 0.5:
        return rng.randrange(0, 300)
    if pick < 0.8:
        return rng.choice((64, 256)) * rng.randrange(1, 20) + rng.randrange(-2, 3)
    return rng.randrange(0, 20000)


def test_aead_matches_libsodium(native):
    rng = random.Random(8439)
    for _ in range(2000):
        key, nonce = rng.randbytes(32), rng.randbytes(12)
        ad = rng.randbytes(rng.choice((0, 0, 1, 12, 16, 17, rng.randrange(0, 200))))
        plain = rng.randbytes(random_length(rng))
        sealed = native.aead_seal(key, nonce, plain, ad)
        assert sealed == sodium.crypto_aead_chacha20poly1305_ietf_encrypt(
            plain, ad, nonce, key), (len(plain), len(ad))
        assert native.aead_open(key, nonce, sealed, ad) == plain


def test_aead_open_rejects_any_change(native):
    rng = random.Random(7)
    for _ in range(500):
        key, nonce = rng.randbytes(32), rng.randbytes(12)
        ad = rng.randbytes(rng.randrange(0, 40))
        plain = rng.randbytes(rng.randrange(0, 600))
        sealed = bytearray(sodium.crypto_aead_chacha20poly1305_ietf_encrypt(
            plain, ad, nonce, key))
        what = rng.randrange(4)
        if what == 0:  # one bit anywhere in ciphertext or tag
            bit = rng.randrange(len(sealed) * 8)
            sealed[bit // 8] ^= 1 << (bit % 8)
        elif what == 1 and ad:
            ad = ad[:-1]
        elif what == 1:
            ad = b"\0"
        elif what == 2:
            nonce = bytes([nonce[0] ^ 1]) + nonce[1:]
        else:
            sealed = sealed[:-1]
        with pytest.raises(meshbox.CryptoError):
            native.aead_open(key, nonce, sealed, ad)
    key, nonce = bytes(32), bytes(12)
    for short in (b"", b"x" * 15):
        with pytest.raises(meshbox.CryptoError):
            native.aead_open(key, nonce, short)
    assert native.aead_open(key, nonce, native.aead_seal(key, nonce, b"")) == b""


def test_x25519_matches_libsodium(native):
    rng = random.Random(7748)
    for i in range(1000):
        scalar = rng.randbytes(32)
        point = rng.randbytes(32)  # any 32 bytes, top bit and twist included
        if i % 10 == 0:  # non-canonical: u + p where that fits in 255 bits
            point = (rng.randrange(0, 19) + P).to_bytes(32, "little")
        try:
            want = sodium.crypto_scalarmult(scalar, point)
        except Exception:
            with pytest.raises(meshbox.CryptoError):
                native.x25519(scalar, point)
            continue
        assert native.x25519(scalar, point) == want, (scalar.hex(), point.hex())
        assert native.x25519_base(scalar) == sodium.crypto_scalarmult_base(scalar)


ORDER_8 = (325606250916557431795983626356110631294008115727848805560023387167927233504,
           39382357235489614581723060781553021112529911719440698176882885853963445705823)


@pytest.mark.parametrize("u", [0, 1, P - 1, P, P + 1, *ORDER_8],
                         ids=["0", "1", "p-1", "p", "p+1", "order-8a", "order-8b"])
def test_x25519_low_order_points_are_refused(native, u):
    for flip_top in (0, 2**255):
        point = ((u | flip_top) % 2**256).to_bytes(32, "little")
        with pytest.raises(meshbox.CryptoError):
            native.x25519(os.urandom(32), point)


def test_blake2s_matches_hashlib(native):
    rng = random.Random(7693)
    for _ in range(3000):
        data = rng.randbytes(rng.choice((rng.randrange(0, 200),
                                         64 * rng.randrange(0, 8),
                                         rng.randrange(0, 5000))))
        key = rng.randbytes(rng.choice((0, 0, 32, rng.randrange(0, 33))))
        size = rng.choice((32, rng.randrange(1, 33)))
        assert native.blake2s(data, key=key, digest_size=size) == hashlib.blake2s(
            data, key=key, digest_size=size).digest()


def test_bad_arguments_are_refused(native):
    with pytest.raises(ValueError):
        native.aead_seal(bytes(31), bytes(12), b"x")
    with pytest.raises(ValueError):
        native.aead_open(bytes(32), bytes(8), bytes(16))
    with pytest.raises(ValueError):
        native.x25519(bytes(32), bytes(31))
    with pytest.raises(ValueError):
        native.blake2s(b"", digest_size=33)
    with pytest.raises(ValueError):
        native.blake2s(b"", key=bytes(33))


# ---- Loader ----

def test_loader_follows_meshbox_native(library, monkeypatch, tmp_path):
    monkeypatch.setenv("MESHBOX_NATIVE", library)
    assert meshbox.load_native_crypto().path == library
    monkeypatch.setenv("MESHBOX_NATIVE", os.path.dirname(library))
    assert meshbox.load_native_crypto().path == library
    monkeypatch.setenv("MESHBOX_NATIVE", "off")
    assert meshbox.load_native_crypto() is None
    monkeypatch.setenv("MESHBOX_NATIVE", str(tmp_path / "missing.so"))
    assert meshbox.load_native_crypto() is None
    broken = tmp_path / meshbox.NATIVE_LIBRARY
    broken.write_bytes(b"not an ELF file")
    monkeypatch.setenv("MESHBOX_NATIVE", str(broken))
    assert meshbox.load_native_crypto() is None  # logged, pynacl serves
    with pytest.raises(OSError):
        meshbox.load_native_crypto(str(broken))


def test_neon_choice_reads_at_hwcap():
    def auxv(pairs, fmt):
        return b"".join(struct.pack(fmt, k, v) for k, v in pairs)

    with_neon = [(6, 4096), (16, 0x1000 | 0x8), (0, 0)]
    without = [(6, 4096), (16, 0x8), (0, 0)]
    assert meshbox.auxv_hwcap(auxv(with_neon, "=II"), 4) & (1 << 12)
    assert not meshbox.auxv_hwcap(auxv(without, "=II"), 4) & (1 << 12)
    assert meshbox.auxv_hwcap(auxv(with_neon, "=QQ"), 8) == 0x1008
    assert meshbox.auxv_hwcap(auxv([(0, 0)], "=QQ"), 8) == 0
