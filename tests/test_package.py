"""build/package: the OpenWrt .ipk's layout and the wheel, as built from this tree."""

import gzip
import io
import os
import re
import subprocess
import sys
import tarfile
import zipfile

import pytest

import meshbox

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIST = os.path.join(ROOT, "dist")
sys.path.insert(0, os.path.join(ROOT, "build"))
import openwrt  # noqa: E402

# A router with 16 MB of flash has a few MB free for packages: meshbox's
# own share must stay small (python3 and its parts come on top).
MAX_IPK = 300_000
MAX_INSTALLED = 1_200_000
OPENWRT_ARCH = {"x86_64": "x86_64", "aarch64": "aarch64_generic", "armv7": "arm_cortex-a7_neon-vfpv4"}


@pytest.fixture(scope="module")
def built():
    result = subprocess.run([os.path.join(ROOT, "build", "package")], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return result.stdout + result.stderr


def members(tar_gz_bytes):
    """{name: (TarInfo, bytes or None)} of a tar.gz, in archive order."""
    out = {}
    with tarfile.open(fileobj=io.BytesIO(tar_gz_bytes), mode="r:gz") as tar:
        for info in tar:
            out[info.name] = (info, tar.extractfile(info).read() if info.isfile() else None)
    return out


def read(*parts):
    with open(os.path.join(ROOT, *parts), "rb") as f:
        return f.read()


def unpacked_ipk(arch):
    name = os.path.join(DIST, f"meshbox_{meshbox.VERSION}_{arch}.ipk")
    with open(name, "rb") as f:
        outer_bytes = f.read()
    outer = members(outer_bytes)
    return outer_bytes, outer, members(outer["./control.tar.gz"][1]), members(outer["./data.tar.gz"][1])


def test_ipk_layout(built):
    host = meshbox.native_arch()
    if host is None:
        pytest.skip("no native helper for this machine")
    outer_bytes, outer, control, data = unpacked_ipk(OPENWRT_ARCH[host])
    # The outer archive as OpenWrt's ipkg-build writes it.
    assert list(outer) == ["./debian-binary", "./data.tar.gz", "./control.tar.gz"]
    assert outer["./debian-binary"][1] == b"2.0\n"

    fields = dict(line.split(": ", 1) for line in control["./control"][1].decode().splitlines()
                  if not line.startswith(" "))
    assert fields["Package"] == "meshbox"
    assert fields["Version"] == meshbox.VERSION
    assert fields["Architecture"] == OPENWRT_ARCH[host]
    depends = fields["Depends"].split(", ")
    assert depends == ["libc", "python3-light", "python3-asyncio", "python3-sqlite3", "python3-openssl",
                       "python3-ctypes", "python3-logging", "kmod-wireguard"]
    assert "python3" not in depends and "python3-pyroute2" not in depends   # both pull in all of python3
    files = {name[2:]: (info, body) for name, (info, body) in data.items() if info.isfile()}
    assert int(fields["Installed-Size"]) == sum(len(body) for _, body in files.values())
    assert fields["Description"]
    assert control["./conffiles"][1] == b"/etc/config/meshbox\n"
    for script in ("postinst", "prerm", "postrm"):
        info, body = control["./" + script]
        assert info.mode == 0o755 and body.startswith(b"#!/bin/sh\n")
        assert subprocess.run(["sh", "-n"], input=body).returncode == 0

    expected = {
        "usr/bin/meshbox": (0o755, None),
        "usr/lib/meshbox/meshbox.py": (0o644, read("meshbox.py")),
        "usr/lib/meshbox/native/libmeshbox_crypto.so":
            (0o644, read("dist", "native", host, "libmeshbox_crypto.so")),
        "etc/init.d/meshbox": (0o755, read("openwrt", "files", "meshbox.init")),
        "etc/config/meshbox": (0o644, read("openwrt", "files", "meshbox.config")),
        "etc/uci-defaults/90-meshbox": (0o755, read("openwrt", "files", "meshbox.uci-defaults")),
        "lib/upgrade/keep.d/meshbox": (0o644, b"/etc/meshbox/\n"),
    }
    for path, (mode, body) in expected.items():
        info, content = files[path]
        assert info.mode == mode, path
        assert body is None or content == body, path
    carried = {p for p in files if p not in expected}
    for module in openwrt.CARRIED_MODULES:
        assert f"usr/lib/meshbox/{module}/__init__.py" in carried
    assert all(re.match(r"usr/lib/meshbox/(h2|hpack|hyperframe)(/.*\.(py|typed)|-licence/LICEN[CS]E.*)$", p)
               for p in carried), sorted(carried)
    assert all(info.uid == 0 and info.gid == 0 for info, _ in data.values())
    assert len(outer_bytes) < MAX_IPK and int(fields["Installed-Size"]) < MAX_INSTALLED


def test_ipk_tree_runs_and_imports_the_carried_packages(built, tmp_path):
    host = meshbox.native_arch()
    if host is None:
        pytest.skip("no native helper for this machine")
    _, _, _, data = unpacked_ipk(OPENWRT_ARCH[host])
    for name, (info, body) in data.items():
        if info.isfile():
            path = tmp_path / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(body)
    launcher = (tmp_path / "usr/bin/meshbox").read_text().replace("/usr/lib/meshbox", str(tmp_path / "usr/lib/meshbox"))
    probe = launcher.replace("sys.exit(meshbox.main())",
                             "import h2; print(meshbox.VERSION, meshbox._native.path, h2.__file__)")
    result = subprocess.run([sys.executable, "-I", "-c", probe], capture_output=True, text=True, timeout=60,
                            env={"PATH": os.environ["PATH"]})
    assert result.returncode == 0, result.stderr
    version, native, h2_file = result.stdout.split()
    assert version == meshbox.VERSION
    assert native == str(tmp_path / "usr/lib/meshbox/native/libmeshbox_crypto.so")
    assert h2_file.startswith(str(tmp_path / "usr/lib/meshbox/h2/"))


def test_every_built_helper_has_its_packages(built):
    for native_arch, arches in openwrt.ARCHES.items():
        so = os.path.join(DIST, "native", native_arch, "libmeshbox_crypto.so")
        for arch in arches:
            ipk = os.path.join(DIST, f"meshbox_{meshbox.VERSION}_{arch}.ipk")
            if not os.path.exists(so):
                continue
            _, _, control, data = unpacked_ipk(arch)
            assert f"Architecture: {arch}\n".encode() in control["./control"][1]
            assert data["./usr/lib/meshbox/native/libmeshbox_crypto.so"][1] == read(so), ipk


def test_ipk_is_reproducible(built, tmp_path):
    env = dict(os.environ, SOURCE_DATE_EPOCH="1700000000")
    for out in ("a", "b"):
        subprocess.run([sys.executable, os.path.join(ROOT, "build", "openwrt.py"), str(tmp_path / out)],
                       check=True, capture_output=True, env=env, timeout=120)
    names = sorted(n for n in os.listdir(tmp_path / "a") if n.endswith(".ipk"))
    assert names and names == sorted(n for n in os.listdir(tmp_path / "b") if n.endswith(".ipk"))
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
        with gzip.open(tmp_path / "a" / name) as f:
            assert f.read(1)           # a valid gzip stream


def test_wheel_and_sdist(built):
    wheel = os.path.join(DIST, f"meshbox-{meshbox.VERSION}-py3-none-any.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        assert "meshbox.py" in names and z.read("meshbox.py") == read("meshbox.py")
        info = f"meshbox-{meshbox.VERSION}.dist-info/"
        assert "[console_scripts]\nmeshbox = meshbox:main" in z.read(info + "entry_points.txt").decode()
        metadata = z.read(info + "METADATA").decode()
    assert "Requires-Python: >=3.11" in metadata
    for requirement in ("pynacl", "h2", "zstandard", "pyroute2"):
        assert re.search(rf"^Requires-Dist: {requirement}\b", metadata, re.M | re.I), requirement
    with tarfile.open(os.path.join(DIST, f"meshbox-{meshbox.VERSION}.tar.gz")) as sdist:
        assert f"meshbox-{meshbox.VERSION}/meshbox.py" in sdist.getnames()
