"""Throughput of the native helper against pynacl (a benchmark, not a test).

    python3 tests/bench/crypto.py [--seconds 1.0]

Builds the helper for this machine with build/native when gcc is there, then
times ChaCha20-Poly1305 seal and open of 1400-byte (a WireGuard-sized packet)
and 64 KiB messages, and X25519, through each code path the library has.
Prints one line per measurement, then a JSON summary as the last line.
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import time

from nacl import bindings as sodium

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.append(ROOT)

import meshbox  # noqa: E402


def rate(fn, seconds):
    """Calls fn repeatedly for about `seconds`; calls per second."""
    calls, start = 0, time.perf_counter()
    deadline = start + seconds
    while True:
        for _ in range(16):
            fn()
        calls += 16
        now = time.perf_counter()
        if now >= deadline:
            return calls / (now - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=1.0,
                        help="time per measurement (default 1)")
    args = parser.parse_args()

    arch = meshbox.native_arch()
    so = os.path.join(ROOT, "dist", "native", arch or "?", meshbox.NATIVE_LIBRARY)
    if arch and not os.path.isfile(so):
        subprocess.run([os.path.join(ROOT, "build", "native"), arch], check=True)
    native = meshbox.load_native_crypto(so)

    key, nonce, ad = bytes(range(32)), bytes(12), b"header"
    paths = [("pynacl", None)] + [("native-portable", False)]
    if native.has_neon:
        paths.append(("native-neon", True))
    results = {"arch": arch, "machine": platform.machine(), "mb_per_s": {},
               "x25519_per_s": {}}
    for label, neon in paths:
        if neon is not None:
            native.use_neon(neon)
            seal, opener = native.aead_seal, native.aead_open
        else:
            def seal(k, n, p, a):
                return sodium.crypto_aead_chacha20poly1305_ietf_encrypt(p, a, n, k)

            def opener(k, n, c, a):
                return sodium.crypto_aead_chacha20poly1305_ietf_decrypt(c, a, n, k)
        for size in (1400, 65536):
            plain = os.urandom(size)
            sealed = seal(key, nonce, plain, ad)
            for op, fn in (("seal", lambda: seal(key, nonce, plain, ad)),
                           ("open", lambda: opener(key, nonce, sealed, ad))):
                mbps = rate(fn, args.seconds) * size / 1e6
                results["mb_per_s"][f"{label}/{op}/{size}"] = round(mbps, 1)
                print(f"{label:16} {op} {size:6} bytes: {mbps:8.1f} MB/s")
        if neon:
            continue  # X25519 has no NEON path
        scalar, point = os.urandom(32), sodium.crypto_scalarmult_base(os.urandom(32))
        if neon is None:
            fn = lambda: sodium.crypto_scalarmult(scalar, point)  # noqa: E731
        else:
            fn = lambda: native.x25519(scalar, point)  # noqa: E731
        per_s = rate(fn, args.seconds)
        results["x25519_per_s"][label.replace("-portable", "")] = round(per_s)
        print(f"{label:16} x25519: {per_s:8.0f} per second")
    native.use_neon(meshbox.cpu_has_neon())
    print(json.dumps(results, sort_keys=True))


if __name__ == "__main__":
    main()
