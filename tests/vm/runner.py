#!/usr/bin/env python3
"""Run a command inside a throwaway QEMU VM booted with Debian's kernel.

This machine's kernel has no WireGuard, so kernel-WireGuard tests run in a
guest: Debian's stock kernel, booted under QEMU with the host's root shared
read-only over 9p under a tmpfs overlay, so the guest runs the host's
python3 and packages and every change it makes is thrown away.

    python3 tests/vm/runner.py [--timeout S] -- CMD ARGS...

streams CMD's output (stdout and stderr, merged) and exits with CMD's exit
code, or after a message and the kernel console on stderr with 124 (timed
out), 125 (setup failed: host tools, kernel, or the guest's /init) or 126
(the guest died first). From Python: ``vm_available()`` and
``run_in_vm(argv, timeout)``, which raises VMTimeout, VMSetupError, VMDied.

The kernel (package download, ``dpkg-deb -x``, ``depmod``; never installed
system-wide), its uncompressed ELF for a PVH boot and the busybox initramfs
are cached per kernel package version under ``$MESHBOX_VM_CACHE`` (default
/var/tmp/meshbox-vm). The guest has no network card: only ``lo`` and the
namespaces the command makes.
"""

import argparse
import fcntl
import functools
import lzma
import os
import re
import selectors
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# ---- Constants ----

EXIT_TIMEOUT = 124     # as coreutils timeout(1)
EXIT_SETUP = 125       # the VM could not be prepared or its init failed
EXIT_GUEST_DIED = 126  # the guest stopped before the command finished

KERNEL_META_PACKAGE = "linux-image-amd64"
# Debian package that provides each host command the runner calls.
HOST_PACKAGES = {
    "qemu-system-x86_64": "qemu-system-x86",
    "busybox": "busybox-static",
    "modprobe": "kmod",
    "depmod": "kmod",
}
# Loaded by /init before the root can be mounted, in dependency order.
BOOT_MODULES = ("virtio_pci", "9pnet_virtio", "9p", "overlay")
# Mounted fresh in the guest, so host paths below them are not visible.
FRESH_GUEST_DIRS = ("/proc", "/sys", "/dev", "/run", "/tmp")

INIT_TEMPLATE = Path(__file__).with_name("init.sh")
MODPROBE_WRAPPER = b'#!/bin/sh\nexec chroot /newroot /sbin/modprobe "$@"\n'
SETUP_FAILED_MARK = "meshbox-vm: setup failed:"
CONSOLE_TAIL_LINES = 60
XZ_MAGIC = b"\xfd7zXZ\x00"
ELF_MAGIC = b"\x7fELF"
DYNAMIC_LOADER_MARK = b"/ld-linux"
GUEST_MEMORY_MB = 1024
GUEST_CPUS = 2
IN_VM_VARIABLE = "MESHBOX_IN_VM"  # set to 1 for the guest's command
KERNEL_CMDLINE = "console=ttyS0 quiet panic=-1 rdinit=/init"


# ---- Errors ----

class VMError(Exception):
    """The VM did not run the command to completion; `exit_code` says why."""

    exit_code = EXIT_SETUP

    def __init__(self, message, output=b"", console=""):
        if console:
            tail = "\n".join(console.splitlines()[-CONSOLE_TAIL_LINES:])
            message += f"\n---- kernel console (last {CONSOLE_TAIL_LINES} lines) ----\n{tail}"
        super().__init__(message)
        self.output = output
        self.console = console


class VMSetupError(VMError):
    """The kernel, initramfs or host tools could not be prepared, or /init failed."""

    exit_code = EXIT_SETUP


class VMTimeout(VMError):
    """The command did not finish before the deadline; the VM was killed."""

    exit_code = EXIT_TIMEOUT


class VMDied(VMError):
    """The guest stopped (panic, crash, QEMU error) before reporting an exit code."""

    exit_code = EXIT_GUEST_DIED


# ---- Helpers ----

def run_tool(argv, cwd=None):
    """Run a host command; its stdout, or VMSetupError with its stderr."""
    try:
        done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True)
    except OSError as exc:
        raise VMSetupError(f"cannot run {argv[0]}: {exc}") from None
    if done.returncode != 0:
        raise VMSetupError(f"{shlex.join(argv)} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


def cache_root():
    """Folder holding one prepared guest image per kernel package version."""
    return Path(os.environ.get("MESHBOX_VM_CACHE", "/var/tmp/meshbox-vm"))


def qemu_option_value(text):
    """Escape a value for a QEMU `key=value,...` option list."""
    return text.replace(",", ",,")


def path_is_under(path, folder):
    """Whether `path` is `folder` or inside it."""
    return path == folder or path.startswith(folder.rstrip("/") + "/")


# ---- Host packages ----

def missing_host_packages():
    """Debian packages whose commands the runner needs but cannot find."""
    return sorted({pkg for cmd, pkg in HOST_PACKAGES.items() if shutil.which(cmd) is None})


def install_host_packages():
    """Install the runner's Debian packages if any are missing."""
    missing = missing_host_packages()
    if not missing:
        return
    if shutil.which("apt-get") is None:
        raise VMSetupError(f"no apt-get to install {' '.join(missing)}")
    if os.geteuid() != 0:
        raise VMSetupError(f"not root: cannot install {' '.join(missing)}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing]
    if subprocess.run(install, capture_output=True, env=env).returncode != 0:
        run_tool(["apt-get", "update", "-q"])
        run_tool(install)
    if missing_host_packages():
        raise VMSetupError(f"still missing after apt-get install: {' '.join(missing_host_packages())}")


# ---- Kernel ----

def kernel_package():
    """(package, version) of the kernel Debian's linux-image-amd64 points at, or None."""
    if shutil.which("apt-cache") is None:
        return None
    for attempt in range(2):
        show = subprocess.run(["apt-cache", "show", "--no-all-versions", KERNEL_META_PACKAGE],
                              capture_output=True, text=True).stdout
        # The meta package pins its kernel exactly: "Depends: linux-image-X (= V)".
        found = re.search(r"^Depends:.*?\b(linux-image-\S+) \(= ([^)\s]+)\)", show, re.M)
        if found:
            return found.group(1), found.group(2)
        if attempt == 0 and os.geteuid() == 0:
            run_tool(["apt-get", "update", "-q"])  # package lists never fetched
    return None


def download_kernel(package, version, folder):
    """Fetch the kernel .deb into `folder` (apt-get download, nothing installed)."""
    download = ["apt-get", "download", "-q", "-o", "APT::Sandbox::User=root", f"{package}={version}"]
    if subprocess.run(download, cwd=folder, capture_output=True).returncode != 0:
        run_tool(["apt-get", "update", "-q"])  # stale lists point at removed files
        run_tool(download, cwd=folder)
    return next(Path(folder).glob("*.deb"))


def elf_vmlinux_of(bzimage):
    """The uncompressed ELF kernel inside an xz-packed bzImage, or None."""
    data = bzimage.read_bytes()
    start = data.find(XZ_MAGIC)
    if start < 0:
        return None
    try:
        elf = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(data[start:])
    except lzma.LZMAError:
        return None
    return elf if elf.startswith(ELF_MAGIC) else None


def boot_modules(root, kver):
    """Module files /init must insmod, dependencies first, each once."""
    order = []
    for module in BOOT_MODULES:
        shown = run_tool(["modprobe", "-d", str(root), "-S", kver, "--show-depends", module])
        for line in shown.splitlines():
            words = line.split()
            if words and words[0] == "insmod" and Path(words[1]) not in order:
                order.append(Path(words[1]))
    return order


def module_bytes(path):
    """A module file's contents, decompressed: busybox insmod takes plain .ko only."""
    if path.suffix == ".xz":
        return lzma.decompress(path.read_bytes())
    if path.suffix == ".ko":
        return path.read_bytes()
    raise VMSetupError(f"cannot decompress module {path}")


# ---- Initramfs ----

def cpio_entry(name, mode, data=b"", rdev=(0, 0)):
    """One member of a `newc` cpio archive, padded to 4 bytes."""
    fields = (0, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(name) + 1, 0)
    head = b"070701" + b"".join(b"%08x" % f for f in fields) + name.encode() + b"\0"
    head += b"\0" * (-len(head) % 4)
    return head + data + b"\0" * (-len(data) % 4)


def initramfs_members(kver, modules_dir, modules):
    """(name, mode, data, rdev) for every file of the guest's initramfs."""
    dirs = ["bin", "dev", "etc", "proc", "sys", "lower", "rw", "newroot", "ctl", "modules"]
    members = [(d, 0o40755, b"", (0, 0)) for d in dirs]
    members.append(("dev/console", 0o20600, b"", (5, 1)))  # the kernel opens it for /init
    members.append(("init", 0o100755, INIT_TEMPLATE.read_bytes(), (0, 0)))
    conf = f"KVER={shlex.quote(kver)}\nMODULES_DIR={shlex.quote(str(modules_dir))}\n"
    members.append(("etc/meshbox-vm.conf", 0o100644, conf.encode(), (0, 0)))
    busybox = Path(shutil.which("busybox")).read_bytes()
    if DYNAMIC_LOADER_MARK in busybox[:4096]:  # the .interp path sits near the start
        raise VMSetupError("busybox on PATH is dynamically linked; the initramfs needs busybox-static")
    members.append(("bin/busybox", 0o100755, busybox, (0, 0)))
    for applet in sorted(set(run_tool(["busybox", "--list"]).split()) - {"busybox"}):
        members.append((f"bin/{applet}", 0o120777, b"busybox", (0, 0)))
    members.append(("bin/modprobe-newroot", 0o100755, MODPROBE_WRAPPER, (0, 0)))
    names = []
    for path in modules:
        name = path.name.removesuffix(".xz")
        names.append(name)
        members.append((f"modules/{name}", 0o100644, module_bytes(path), (0, 0)))
    members.append(("modules/order", 0o100644, "".join(n + "\n" for n in names).encode(), (0, 0)))
    return members


def write_initramfs(path, members):
    """Write an uncompressed cpio (no unpacking cost at boot)."""
    with open(path, "wb") as out:
        for name, mode, data, rdev in members:
            out.write(cpio_entry(name, mode, data, rdev))
        out.write(cpio_entry("TRAILER!!!", 0))


# ---- Guest image ----

class GuestImage:
    """A prepared kernel, its module tree and initramfs, in one cache folder."""

    def __init__(self, folder):
        self.folder = folder
        self.kver = (folder / "kver").read_text().strip()
        vmlinux = folder / "vmlinux"
        self.kernel = vmlinux if vmlinux.exists() else folder / "root" / "boot" / f"vmlinuz-{self.kver}"
        self.initramfs = folder / "initramfs.cpio"


def build_image(package, folder):
    """Fill `folder` with the kernel package's tree, depmod data, ELF kernel, initramfs."""
    folder.mkdir(parents=True)
    deb = download_kernel(*package, folder)
    root = folder / "root"
    run_tool(["dpkg-deb", "-x", str(deb), str(root)])
    deb.unlink()
    kver = package[0].removeprefix("linux-image-")
    run_tool(["depmod", "-b", str(root), kver])
    config = (root / "boot" / f"config-{kver}").read_text()
    if "\nCONFIG_PVH=y\n" in config:
        # An ELF booted at its PVH entry skips ~3.5 s of self-unpacking under TCG.
        elf = elf_vmlinux_of(root / "boot" / f"vmlinuz-{kver}")
        if elf:
            (folder / "vmlinux").write_bytes(elf)
    final_modules = cache_root() / folder.name.removesuffix(".partial") / "root" / "lib" / "modules" / kver
    members = initramfs_members(kver, final_modules, boot_modules(root, kver))
    write_initramfs(folder / "initramfs.cpio", members)
    (folder / "kver").write_text(kver + "\n")


@functools.cache
def prepare_image():
    """The cached guest image for the current Debian kernel, built if needed."""
    install_host_packages()
    if not INIT_TEMPLATE.exists():
        raise VMSetupError(f"missing {INIT_TEMPLATE}")
    base = cache_root()
    if any(path_is_under(str(base.resolve()), d) for d in FRESH_GUEST_DIRS):
        raise VMSetupError(f"cache {base} would be hidden in the guest (fresh {', '.join(FRESH_GUEST_DIRS)})")
    base.mkdir(parents=True, exist_ok=True)
    with open(base / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one builder at a time; others wait, then reuse
        package = kernel_package()
        if package is None:
            ready = sorted(p for p in base.glob("linux-image-*") if (p / "kver").exists())
            if not ready:
                raise VMSetupError(f"apt-cache cannot resolve {KERNEL_META_PACKAGE}; nothing cached in {base}")
            return GuestImage(ready[-1])
        folder = base / f"{package[0]}_{package[1]}"
        if not (folder / "kver").exists():
            partial = folder.with_name(folder.name + ".partial")
            shutil.rmtree(partial, ignore_errors=True)
            build_image(package, partial)
            partial.rename(folder)
            for stale in base.glob("linux-image-*"):  # older kernels are never booted again
                if stale != folder:
                    shutil.rmtree(stale, ignore_errors=True)
        return GuestImage(folder)


# ---- Boot ----

def accelerator_args():
    """KVM when it is a plain kvm_intel/kvm_amd, else multi-threaded TCG."""
    # kvm_pvm (this machine's /dev/kvm) only runs PVM-enabled guests.
    plain_kvm = any(Path(f"/sys/module/{m}").exists() for m in ("kvm_intel", "kvm_amd"))
    if plain_kvm and not Path("/sys/module/kvm_pvm").exists() and os.access("/dev/kvm", os.W_OK):
        return ["-accel", "kvm", "-cpu", "host"]
    return ["-accel", "tcg,thread=multi", "-cpu", "max"]


def hidden_workdir(cwd):
    """True when cwd lies in a folder the guest mounts fresh (e.g. a CI clone under /tmp)."""
    return any(path_is_under(cwd, d) for d in FRESH_GUEST_DIRS)


def qemu_argv(image, ctl, cwd):
    """The QEMU command line: no NIC, console to a file, ttyS1 on stdout."""
    ctl_value = qemu_option_value(str(ctl))
    # A working folder under a fresh guest folder is shared on its own.
    workdir = ["-virtfs", f"local,path={qemu_option_value(cwd)},mount_tag=workdir,security_model=none,readonly=on"] \
        if hidden_workdir(cwd) else []
    return [
        "qemu-system-x86_64", "-nodefaults", "-display", "none", "-no-reboot", "-monitor", "none",
        *accelerator_args(), "-smp", str(GUEST_CPUS), "-m", str(GUEST_MEMORY_MB),
        "-nic", "none",
        "-kernel", str(image.kernel), "-initrd", str(image.initramfs), "-append", KERNEL_CMDLINE,
        "-serial", f"file:{ctl_value}/console.log",
        "-chardev", "stdio,id=out,signal=off", "-serial", "chardev:out",
        # multidevs=remap: / spans several host filesystems, keep inode numbers unique.
        "-virtfs", "local,path=/,mount_tag=hostroot,security_model=passthrough,readonly=on,multidevs=remap",
        "-virtfs", f"local,path={ctl_value},mount_tag=ctl,security_model=none",
        *workdir,
    ]


def command_script(argv, cwd, env):
    """The shell script the guest runs in the new root: environment, cwd, exec."""
    lines = [f"export {shlex.quote(f'{k}={v}')}" for k, v in env.items() if k.isidentifier()]
    if hidden_workdir(cwd):
        lines.append(f"mkdir -p {shlex.quote(cwd)} && mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000,"
                     f"cache=loose,ro workdir {shlex.quote(cwd)} || exit {EXIT_SETUP}")
    lines.append(f"cd {shlex.quote(cwd)} || exit {EXIT_SETUP}")
    lines.append("exec " + shlex.join(argv))
    return "\n".join(lines) + "\n"


def guest_environment(env):
    """The environment for the command: the host's, minus what the guest lacks."""
    env = dict(os.environ if env is None else env)
    env.pop("TMPDIR", None)  # the guest's /tmp is empty
    env[IN_VM_VARIABLE] = "1"  # tests can tell they run in the guest (and not nest VMs)
    env.setdefault("PYTHONUNBUFFERED", "1")  # stream output as it happens
    env.setdefault("PYTHONDONTWRITEBYTECODE", "1")  # writes would land in the discarded overlay
    return env


def pump_output(proc, deadline, echo):
    """Copy QEMU's stdout (guest ttyS1) until EOF or deadline; (bytes, timed_out)."""
    chunks = []
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return b"".join(chunks), True
            if not sel.select(timeout=left):
                continue
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                return b"".join(chunks), False
            chunks.append(chunk)
            if echo is not None:
                echo.write(chunk)
                echo.flush()


def boot_and_run(image, argv, timeout, cwd, env, echo):
    """Boot the guest once to run argv; (exit code, output) or a VMError."""
    with tempfile.TemporaryDirectory(prefix="meshbox-vm-") as ctl:
        ctl = Path(ctl)
        (ctl / "run.sh").write_text(command_script(argv, cwd, guest_environment(env)))
        deadline = time.monotonic() + timeout
        with open(ctl / "qemu.err", "wb") as qemu_err:
            proc = subprocess.Popen(qemu_argv(image, ctl, cwd), stdin=subprocess.DEVNULL,
                                    stdout=subprocess.PIPE, stderr=qemu_err)
        timed_out = True  # until the output ends in time; also kills QEMU on ^C
        try:
            output, timed_out = pump_output(proc, deadline, echo)
        finally:
            if timed_out:
                proc.kill()
            proc.wait()
            proc.stdout.close()
        console_log = ctl / "console.log"
        console = console_log.read_text(errors="replace") if console_log.exists() else ""
        if timed_out:
            raise VMTimeout(f"timed out after {timeout:g} s; VM killed", output, console)
        rc_file = ctl / "rc"
        if rc_file.exists() and rc_file.read_text().strip().isdigit():
            return int(rc_file.read_text()), output
        qemu_err = (ctl / "qemu.err").read_text(errors="replace").strip()
        qemu_note = f" (qemu exit {proc.returncode}: {qemu_err})" if proc.returncode or qemu_err else ""
        if SETUP_FAILED_MARK in console:
            raise VMSetupError(f"guest init failed{qemu_note}", output, console)
        raise VMDied(f"guest stopped before the command finished{qemu_note}", output, console)


# ---- API ----

@functools.cache
def vm_available():
    """(True, "") when a guest can boot here, else (False, why); prepares the cache."""
    if os.environ.get(IN_VM_VARIABLE):
        return False, "already inside the test VM"
    try:
        prepare_image()
    except VMSetupError as exc:
        return False, str(exc)
    return True, ""


def run_in_vm(argv, timeout, cwd=None, env=None, echo=None):
    """Run argv in a fresh VM; (exit code, stdout+stderr bytes). Raises VMError subclasses.

    `cwd` (default: the current directory) and `env` (default: os.environ)
    are the host's; `echo`, a binary stream, gets the output as it arrives.
    """
    cwd = os.path.abspath(cwd or os.getcwd())
    return boot_and_run(prepare_image(), list(argv), timeout, cwd, env, echo)


# ---- CLI ----

def main(args=None):
    """`runner.py [--timeout S] -- CMD ARGS...`: exit with CMD's exit code."""
    parser = argparse.ArgumentParser(description="Run a command in a throwaway QEMU VM (Debian kernel).")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds for boot plus command (600)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD ARGS...")
    opts = parser.parse_args(args)
    command = opts.command[1:] if opts.command[:1] == ["--"] else opts.command
    if not command:
        parser.error("no command given (use: -- CMD ARGS...)")
    try:
        rc, _ = run_in_vm(command, opts.timeout, echo=sys.stdout.buffer)
    except VMError as exc:
        sys.stdout.flush()
        print(f"meshbox-vm: {exc}", file=sys.stderr)
        return exc.exit_code
    return rc


if __name__ == "__main__":
    sys.exit(main())
