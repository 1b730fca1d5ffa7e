"""build/openwrt.py: meshbox's OpenWrt package, built directly (no OpenWrt SDK).

    python3 build/openwrt.py OUTDIR              (build/package calls it)

Writes OUTDIR/meshbox_<version>_<arch>.ipk for every OpenWrt package
architecture whose helper build/native has made (see ARCHES), and the .apk
twin when apk-tools 3 (`apk mkpkg`) is on PATH.  The package holds
meshbox.py, the native helper, the pure-Python dependencies OpenWrt's feed
lacks (CARRIED_MODULES, copied from this Python's installed copies), the
procd init script, the UCI config and the uci-defaults script from openwrt/.
openwrt/Makefile is the same package for an OpenWrt build tree or SDK.

Reproducible: every file is owned by root, dated SOURCE_DATE_EPOCH (default:
the last commit's date), and archived in a fixed order.
"""

import gzip
import hashlib
import importlib.metadata
import io
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ---- What the package is ----

# OpenWrt's python3 is split; meshbox needs these (tests/test_restricted_imports.py
# checks that it needs nothing more).  python3-openssl gives TLS for DERP,
# python3-ctypes loads the native helper, python3-logging is needed by hpack.
PYTHON_DEPENDS = ("python3-light", "python3-asyncio", "python3-sqlite3", "python3-openssl",
                  "python3-ctypes", "python3-logging")
# kmod-wireguard for the gateway; nftables is OpenWrt's firewall4 already.
DEPENDS = PYTHON_DEPENDS + ("kmod-wireguard",)
# Pure-Python packages the OpenWrt feed lacks: (distribution, its top-level modules).
CARRIED = (("h2", ("h2",)), ("hpack", ("hpack",)), ("hyperframe", ("hyperframe",)))
CARRIED_MODULES = tuple(m for _, mods in CARRIED for m in mods)

# build/native's architecture -> the OpenWrt package architectures its
# helper runs on.  The armv7 helper is VFP-only outside its NEON file and
# turns NEON on when AT_HWCAP says so; the aarch64 one runs on every ARMv8-A.
ARCHES = {
    "x86_64": ("x86_64",),
    "aarch64": ("aarch64_cortex-a53", "aarch64_cortex-a72", "aarch64_cortex-a76", "aarch64_generic"),
    "armv7": ("arm_cortex-a7_neon-vfpv4", "arm_cortex-a9_vfpv3-d16", "arm_cortex-a15_neon-vfpv4",
              "arm_cortex-a7_vfpv4", "arm_cortex-a9_neon"),
}

LIB_DIR = "usr/lib/meshbox"
CONFFILES = ("/etc/config/meshbox",)
MAINTAINER = "meshbox developers"
LICENSE = "MIT"
DESCRIPTION = ("meshbox: a self-hosted Tailscale control server, DERP relay and WireGuard gateway\n"
               " in one Python file.  Stock Tailscale clients join with --login-server.")


# OpenWrt's own helpers in /lib/functions.sh run the uci-defaults script and
# enable the service after install, and stop it before removal.
POSTINST = """#!/bin/sh
[ "${IPKG_NO_SCRIPT}" = "1" ] && exit 0
[ -s ${IPKG_INSTROOT}/lib/functions.sh ] || exit 0
. ${IPKG_INSTROOT}/lib/functions.sh
default_postinst $0 $@
"""
PRERM = """#!/bin/sh
[ -s ${IPKG_INSTROOT}/lib/functions.sh ] || exit 0
. ${IPKG_INSTROOT}/lib/functions.sh
default_prerm $0 $@
"""
# Bytecode caches written at run time are no file of the package.
POSTRM = """#!/bin/sh
rm -rf "${IPKG_INSTROOT}/usr/lib/meshbox"
exit 0
"""


def meshbox_version():
    with open(os.path.join(ROOT, "meshbox.py")) as f:
        return re.search(r'^VERSION = "([^"]+)"', f.read(), re.M).group(1)


def source_date_epoch():
    if os.environ.get("SOURCE_DATE_EPOCH"):
        return int(os.environ["SOURCE_DATE_EPOCH"])
    result = subprocess.run(["git", "-C", ROOT, "log", "-1", "--format=%ct"], capture_output=True, text=True)
    return int(result.stdout.strip() or 0)


# ---- The file tree ----

def carried_files():
    """(path in the package, bytes) of the carried pure-Python packages and their licences."""
    out = []
    for dist_name, modules in CARRIED:
        dist = importlib.metadata.distribution(dist_name)
        for f in dist.files:
            top = f.parts[0]
            keep = (top in modules and f.suffix in (".py", ".typed")) or \
                (top.endswith(".dist-info") and re.match(r"(LICEN[CS]E|COPYING)", f.name))
            if keep:
                target = f"{LIB_DIR}/{dist_name}-licence/{f.name}" if top.endswith(".dist-info") \
                    else f"{LIB_DIR}/{f.as_posix()}"
                out.append((target, f.read_binary()))
    return out


def data_files(native_so):
    """(path, mode, bytes) of everything the package installs."""
    def read(*parts):
        with open(os.path.join(ROOT, *parts), "rb") as f:
            return f.read()
    files = [
        # imports meshbox as a module, so its bytecode is cached
        ("usr/bin/meshbox", 0o755, read("openwrt", "files", "meshbox.launcher")),
        (f"{LIB_DIR}/meshbox.py", 0o644, read("meshbox.py")),
        (f"{LIB_DIR}/native/libmeshbox_crypto.so", 0o644, read(native_so)),
        ("etc/init.d/meshbox", 0o755, read("openwrt", "files", "meshbox.init")),
        ("etc/config/meshbox", 0o644, read("openwrt", "files", "meshbox.config")),
        ("etc/uci-defaults/90-meshbox", 0o755, read("openwrt", "files", "meshbox.uci-defaults")),
        ("lib/upgrade/keep.d/meshbox", 0o644, read("openwrt", "files", "meshbox.keep")),
    ]
    files += [(path, 0o644, data) for path, data in carried_files()]
    return sorted(files)


def control_fields(arch, version, installed_size, epoch):
    return {
        "Package": "meshbox",
        "Version": version,
        "Depends": ", ".join(("libc",) + DEPENDS),
        "Source": "feeds/packages/net/meshbox",
        "SourceName": "meshbox",
        "License": LICENSE,
        "Section": "net",
        "SourceDateEpoch": str(epoch),
        "Maintainer": MAINTAINER,
        "Architecture": arch,
        "Installed-Size": str(installed_size),
        "Description": DESCRIPTION,
    }


# ---- .ipk ----

def _tar_gz(entries, epoch, folders=True):
    """A gzip'd tar of (name, mode, bytes) with ./ names, parent folders first
    (and only the files, for the outer archive)."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.GNU_FORMAT) as tar:
        parents = sorted({"/".join(name.split("/")[:i]) for name, _, _ in entries
                          for i in range(1, name.count("/") + 1)})
        for name in (["."] + ["./" + d for d in parents]) if folders else []:
            info = tarfile.TarInfo(name)
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, epoch
            tar.addfile(info)
        for name, mode, data in entries:
            info = tarfile.TarInfo("./" + name)
            info.size, info.mode, info.mtime = len(data), mode, epoch
            tar.addfile(info, io.BytesIO(data))
    out = io.BytesIO()
    with gzip.GzipFile(fileobj=out, mode="wb", mtime=epoch, compresslevel=9) as gz:
        gz.write(raw.getvalue())
    return out.getvalue()


def write_ipk(path, arch, native_so, version, epoch):
    """An .ipk as OpenWrt's ipkg-build makes it: a tar.gz of debian-binary,
    data.tar.gz and control.tar.gz."""
    files = data_files(native_so)
    installed = sum(len(data) for _, _, data in files)
    control = "".join(f"{k}: {v}\n" for k, v in control_fields(arch, version, installed, epoch).items())
    data_tgz = _tar_gz(files, epoch)
    control_tgz = _tar_gz([
        ("control", 0o644, control.encode()),
        ("conffiles", 0o644, "".join(c + "\n" for c in CONFFILES).encode()),
        ("postinst", 0o755, POSTINST.encode()),
        ("prerm", 0o755, PRERM.encode()),
        ("postrm", 0o755, POSTRM.encode()),
    ], epoch)
    outer = _tar_gz([("debian-binary", 0o644, b"2.0\n"), ("data.tar.gz", 0o644, data_tgz),
                     ("control.tar.gz", 0o644, control_tgz)], epoch, folders=False)
    with open(path, "wb") as f:
        f.write(outer)
    return installed


# ---- .apk (apk-tools 3, OpenWrt 25) ----

def write_apk(path, arch, native_so, version, epoch):
    """The .apk twin, made by `apk mkpkg` (apk-tools 3's ADB format has no
    other writer); returns False when apk-tools 3 is not installed."""
    apk = shutil.which("apk")
    if apk is None or not re.match(r"apk-tools 3\.", subprocess.run(
            [apk, "--version"], capture_output=True, text=True).stdout):
        return False
    with tempfile.TemporaryDirectory() as work:
        tree = os.path.join(work, "root")
        for name, mode, data in data_files(native_so):
            target = os.path.join(tree, name)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with open(target, "wb") as f:
                f.write(data)
            os.chmod(target, mode)
        scripts = {}
        for script, body in (("post-install", POSTINST), ("pre-deinstall", PRERM), ("post-deinstall", POSTRM)):
            scripts[script] = os.path.join(work, script)
            with open(scripts[script], "w") as f:
                f.write(body.replace("default_postinst $0 $@", "default_postinst")
                        .replace("default_prerm $0 $@", "default_prerm"))
        # apk has no conffiles list: OpenWrt keeps /etc/config/* through
        # upgrades by sysupgrade's keep list, and apk itself keeps a changed
        # file as .apk-new.
        version_apk = version if re.search(r"-r\d+$", version) else version + "-r1"
        argv = [apk, "mkpkg", "--files", tree, "--output", path,
                "--info", "name:meshbox", "--info", f"version:{version_apk}",
                "--info", f"description:{DESCRIPTION.splitlines()[0]}",
                "--info", f"arch:{arch}", "--info", f"license:{LICENSE}",
                "--info", "origin:meshbox", "--info", f"maintainer:{MAINTAINER}",
                "--info", f"build-time:{epoch}",
                "--info", "depends:" + " ".join(("libc",) + DEPENDS)]
        for script, file in scripts.items():
            argv += ["--script", f"{script}:{file}"]
        subprocess.run(argv, check=True, env=dict(os.environ, SOURCE_DATE_EPOCH=str(epoch)))
    return True


def main(outdir):
    version, epoch = meshbox_version(), source_date_epoch()
    os.makedirs(outdir, exist_ok=True)
    built, apk_missing = 0, False
    for native_arch, openwrt_arches in ARCHES.items():
        so = os.path.join(ROOT, "dist", "native", native_arch, "libmeshbox_crypto.so")
        if not os.path.exists(so):
            print(f"build/openwrt.py: no {native_arch} helper (build/native {native_arch}): skipped", file=sys.stderr)
            continue
        for arch in openwrt_arches:
            ipk = os.path.join(outdir, f"meshbox_{version}_{arch}.ipk")
            installed = write_ipk(ipk, arch, so, version, epoch)
            sha = hashlib.sha256(open(ipk, "rb").read()).hexdigest()[:16]
            print(f"build/openwrt.py: {ipk} ({os.path.getsize(ipk)} bytes, installs {installed}, sha256 {sha}…)")
            apk = os.path.join(outdir, f"meshbox-{version}-r1_{arch}.apk")
            if write_apk(apk, arch, so, version, epoch):
                print(f"build/openwrt.py: {apk} ({os.path.getsize(apk)} bytes)")
            else:
                apk_missing = True
            built += 1
    if apk_missing:
        print("build/openwrt.py: no .apk: apk-tools 3 (`apk mkpkg`) is not installed; no registry this "
              "project reaches carries it (see openwrt/README.md)", file=sys.stderr)
    if not built:
        raise SystemExit("build/openwrt.py: no native helper built, no package written")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: build/openwrt.py OUTDIR")
    main(sys.argv[1])
