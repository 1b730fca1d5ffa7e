"""meshbox on OpenWrt's module diet: serve, register and map with imports limited.

meshbox runs in a child Python whose import system refuses every top-level
module that an OpenWrt router with the meshbox package would not have:
the modules OpenWrt splits out of python3-light into packages meshbox does
not depend on, and every third-party package except the pure-Python ones
the meshbox package carries (build/openwrt.py, CARRIED_WHEELS).

Assumption (OpenWrt's openwrt/packages feed, lang/python/python3/files/
python3-package-*.mk, as of Python 3.14): python3-light is the standard
library minus the modules in SPLIT_OUT below.  The builtin hash modules
(_md5, _sha1, _sha2, _sha3, _blake2) stay in python3-light.  The package
depends on python3-light plus the five packages in DEPENDED_ON, so the
allowed top-level modules are: sys.stdlib_module_names, minus SPLIT_OUT's
modules of packages not in DEPENDED_ON, plus CARRIED_WHEELS' modules.
"""

import asyncio
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time

import pytest
from nacl.signing import VerifyKey

import meshbox
import tsclient
from derpclient import DerpClient
from meshproc import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "build"))
import openwrt  # noqa: E402  (build/openwrt.py: what the package carries)

# OpenWrt package -> the top-level modules it takes out of python3-light.
SPLIT_OUT = {
    "python3-asyncio": {"asyncio"},
    "python3-codecs": {"_codecs_cn", "_codecs_hk", "_codecs_iso2022", "_codecs_jp", "_codecs_kr",
                       "_codecs_tw", "_multibytecodec"},
    "python3-ctypes": {"ctypes", "_ctypes"},
    "python3-dbm": {"dbm", "_dbm"},
    "python3-decimal": {"decimal", "_decimal", "_pydecimal"},
    "python3-email": {"email"},
    "python3-gdbm": {"_gdbm"},
    "python3-logging": {"logging"},
    "python3-lzma": {"lzma", "_lzma"},
    "python3-multiprocessing": {"multiprocessing", "_multiprocessing", "_posixshmem"},
    "python3-ncurses": {"curses", "_curses", "_curses_panel"},
    "python3-openssl": {"ssl", "_ssl", "_hashlib"},
    "python3-pydoc": {"pydoc", "pydoc_data"},
    "python3-readline": {"readline"},
    "python3-sqlite3": {"sqlite3", "_sqlite3"},
    "python3-unicodedata": {"unicodedata"},
    "python3-unittest": {"unittest"},
    "python3-urllib": {"urllib"},
    "python3-uuid": {"uuid", "_uuid"},
    "python3-venv": {"venv", "ensurepip"},
    "python3-xml": {"xml", "xmlrpc", "pyexpat", "_elementtree"},
    # in no package at all
    "(not built)": {"tkinter", "_tkinter", "idlelib", "turtle", "turtledemo", "test", "lib2to3",
                    "distutils", "cgi", "cgitb"},
}
DEPENDED_ON = openwrt.PYTHON_DEPENDS[1:]          # python3-light, then these five
assert DEPENDED_ON == ("python3-asyncio", "python3-sqlite3", "python3-openssl", "python3-ctypes",
                       "python3-logging")
DENIED = set().union(*(mods for pkg, mods in SPLIT_OUT.items() if pkg not in DEPENDED_ON))
ALLOWED = (set(sys.stdlib_module_names) - DENIED) | set(openwrt.CARRIED_MODULES) | {"__main__"}
# What meshbox may try and do without: pynacl (the helper serves), zstandard
# and compression (raw zstd frames; compression.zstd is stdlib from 3.14),
# pyroute2 (the gateway only).
OPTIONAL = {"nacl", "zstandard", "compression", "pyroute2"}

# Runs in the child: refuse imports outside ALLOWED, forget modules the
# interpreter loaded before (so they too come through the hook), run the
# script, and report what was refused and loaded at exit.
BOOT = r"""
import atexit, importlib.machinery, json, sys
allowed, report, path = set(json.loads(sys.argv[1])), sys.argv[2], sys.argv[3]
refused = set()

class RefuseOutsideOpenWrt:
    def find_spec(self, name, path=None, target=None):
        top = name.partition(".")[0]
        if top in allowed:
            return None
        if top not in sys.builtin_module_names and importlib.machinery.PathFinder.find_spec(top) is None:
            return None        # absent here too (copy.py's org.python.core, say): not a refusal
        refused.add(top)
        raise ModuleNotFoundError(f"No module named {name!r} (not on the OpenWrt router)", name=name)

for name in [n for n in sys.modules if n.partition(".")[0] not in allowed]:
    del sys.modules[name]
sys.meta_path.insert(0, RefuseOutsideOpenWrt())

@atexit.register
def write_report():
    with open(report, "w") as f:
        json.dump({"refused": sorted(refused), "loaded": sorted({n.partition(".")[0] for n in sys.modules})}, f)

sys.argv = sys.argv[3:]
with open(path) as f:
    code = compile(f.read(), path, "exec")
exec(code, {"__name__": "__main__", "__file__": path})
"""


@pytest.fixture(scope="module")
def native_helper():
    """The host's native helper (built if missing): without pynacl, it serves."""
    arch = meshbox.native_arch()
    if arch is None:
        pytest.skip(f"no native helper for {os.uname().machine}")
    path = os.path.join(ROOT, "dist", "native", arch, meshbox.NATIVE_LIBRARY)
    if not os.path.exists(path):
        result = subprocess.run([os.path.join(ROOT, "build", "native"), arch],
                                capture_output=True, text=True, timeout=300)
        if result.returncode != 0:
            pytest.skip(f"cannot build the native helper: {result.stderr.strip()[-300:]}")
    return path


class Restricted:
    """Starts scripts in a child Python limited to the OpenWrt module set."""

    def __init__(self, tmp_path, native):
        self.tmp_path, self.count = tmp_path, 0
        self.env = dict(os.environ, MESHBOX_NATIVE=native, PYTHONDONTWRITEBYTECODE="1")

    def argv(self, script, *args):
        self.count += 1
        report = self.tmp_path / f"imports-{self.count}.json"
        return [sys.executable, "-I", "-c", BOOT, json.dumps(sorted(ALLOWED)), str(report), script,
                *map(str, args)], report

    def run(self, script, *args, **env):
        argv, report = self.argv(script, *args)
        result = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=dict(self.env, **env))
        return result, json.loads(report.read_text())

    def meshbox(self, *args):
        result, imports = self.run(os.path.join(ROOT, "meshbox.py"), *args)
        assert result.returncode == 0, result.stderr
        assert set(imports["refused"]) <= OPTIONAL, imports["refused"]
        return result.stdout


@pytest.fixture
def restricted(tmp_path, native_helper):
    return Restricted(tmp_path, native_helper)


def test_the_hook_refuses_what_openwrt_lacks(restricted, tmp_path):
    script = tmp_path / "probe.py"
    script.write_text("import asyncio, sqlite3, ssl, ctypes, logging, hashlib, h2.connection, hpack\n"
                      "for name in ('unicodedata', 'email', 'uuid', 'decimal', 'nacl', 'zstandard'):\n"
                      "    try:\n"
                      "        __import__(name)\n"
                      "    except ImportError:\n"
                      "        print('refused', name)\n"
                      "assert hashlib.blake2s(b'').digest()\n")
    result, imports = restricted.run(str(script))
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:-1] == [f"refused {n}" for n in
                                              ("unicodedata", "email", "uuid", "decimal", "nacl", "zstandard")]
    assert {"asyncio", "sqlite3", "ssl", "ctypes", "logging", "h2", "hpack"} <= set(imports["loaded"])
    assert not set(imports["loaded"]) & (DENIED | OPTIONAL)


def certificate_signature_checks(der):
    """Verify a self-signed Ed25519 certificate's signature with libsodium."""
    def tlv(data, at):
        length, start = data[at + 1], at + 2
        if length & 0x80:
            n = length & 0x7F
            length, start = int.from_bytes(data[start:start + n], "big"), start + n
        return start, start + length
    body_start, _ = tlv(der, 0)
    tbs_start, tbs_end = tlv(der, body_start)
    tbs = der[body_start:tbs_end]
    alg_start, alg_end = tlv(der, tbs_end)
    sig_start, sig_end = tlv(der, alg_end)
    signature = der[sig_start + 1:sig_end]          # after the unused-bits byte
    spki = bytes.fromhex("302a300506032b6570032100")  # Ed25519 SubjectPublicKeyInfo, up to the key
    at = tbs.index(spki) + len(spki)
    VerifyKey(tbs[at:at + 32]).verify(tbs, signature)


def test_serve_register_and_map_on_openwrt_modules(restricted, tmp_path):
    state = tmp_path / "state"
    port, derp_port, stun_port = free_port(), free_port(), free_port(socket.SOCK_DGRAM)
    restricted.meshbox("--state", state, "users", "create", "alice")
    key = restricted.meshbox("--state", state, "preauthkeys", "create", "--user", "alice",
                             "--reusable").split()[-1]
    # A host name in the server URL: the DERP certificate names it.
    argv, report = restricted.argv(os.path.join(ROOT, "meshbox.py"), "--state", state, "serve",
                                   "--listen", f"127.0.0.1:{port}", "--server-url", f"http://localhost:{port}",
                                   "--derp-listen", f"127.0.0.1:{derp_port}",
                                   "--stun-listen", f"127.0.0.1:{stun_port}")
    server = subprocess.Popen(argv, env=restricted.env, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            assert server.poll() is None, server.stderr.read()
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "meshbox did not start listening"
                time.sleep(0.2)
        asyncio.run(register_map_and_relay(port, derp_port, key))
        certificate_signature_checks(ssl.PEM_cert_to_DER_cert((state / "derp-cert.pem").read_text()))
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            _, errors = server.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            raise
    assert server.returncode == 0, errors
    imports = json.loads(report.read_text())
    assert set(imports["refused"]) <= OPTIONAL, imports["refused"]
    assert "nacl" not in imports["loaded"]


async def register_map_and_relay(port, derp_port, key):
    """Two simulated nodes join and see each other; DERP relays between them."""
    first = tsclient.ControlClient("127.0.0.1", port, "first")
    second = tsclient.ControlClient("127.0.0.1", port, "second")
    derps = []
    try:
        maps = []
        for client in (first, second):
            await client.connect()
            response = await client.register(key)
            assert response.get("MachineAuthorized"), response
            client.open_map()
            maps.append(await client.next_map_message())
        assert maps[0]["Node"]["Addresses"] and maps[1]["Node"]["Addresses"]
        assert [p["Name"] for p in maps[1]["Peers"]] == [maps[0]["Node"]["Name"]]
        (region,) = maps[1]["DERPMap"]["Regions"].values()
        node = region["Nodes"][0]
        assert (node["HostName"], node["DERPPort"]) == ("localhost", derp_port)
        for client in (first, second):
            derps.append(await DerpClient.connect("127.0.0.1", derp_port, client.node_private,
                                                  pin=node["CertName"], server_name="localhost"))
        await derps[0].send_packet(derps[1].public_key, b"through the router")
        assert await derps[1].recv_packet() == (derps[0].public_key, b"through the router")
    finally:
        for d in derps:
            await d.close()
        for client in (first, second):
            await client.close()


def test_without_pynacl_or_the_helper_serve_says_what_to_install(restricted, tmp_path):
    result, imports = restricted.run(os.path.join(ROOT, "meshbox.py"), "--state", tmp_path / "state", "serve",
                                     "--listen", f"127.0.0.1:{free_port()}",
                                     "--derp-listen", f"127.0.0.1:{free_port()}", "--stun-listen", "off",
                                     MESHBOX_NATIVE="off")
    assert result.returncode == 1
    assert "pynacl" in result.stderr and "native helper" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert "nacl" in imports["refused"]
