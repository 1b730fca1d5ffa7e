"""Shared by the tests: meshbox as a separate process, its CLI, ports, keys.

The server runs ``meshbox.py serve`` on loopback in its own process, so the
simulated nodes (tests/tsclient.py) and the server do not share a CPU-bound
event loop, and the server can be killed with SIGKILL and started again.
"""

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import meshbox  # noqa: E402
import tsclient  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MESHBOX = os.path.join(ROOT, "meshbox.py")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def free_port(kind=socket.SOCK_STREAM):
    """A loopback port free right now (TCP, or UDP with kind=socket.SOCK_DGRAM)."""
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accepts(port, host="127.0.0.1"):
    """Whether something accepts TCP connections on host:port right now."""
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


def cli(*args, state=None, check=False, env=None, timeout=60):
    """``meshbox.py [--state STATE] ARGS`` in a subprocess: the CompletedProcess
    (text output); with check, fail the test unless it exits 0."""
    command = [sys.executable, MESHBOX, *(["--state", str(state)] if state is not None else []), *map(str, args)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    if check:
        assert result.returncode == 0, f"meshbox {' '.join(map(str, args))} exited {result.returncode}: {result.stderr}"
    return result


def store_key(store, user="alice", reusable=True, ephemeral=False, expiration=None, tags=()):
    """A pre-auth key of USER (created if new) in an open meshbox.Store."""
    try:
        user_id = store.user_named(user).id
    except ValueError:
        user_id = store.create_user(user).id
    return store.create_preauth_key(user_id, reusable, ephemeral, expiration, list(tags))


def auth_key(state_dir, user="alice", reusable=True, ephemeral=False, tags=()):
    """A pre-auth key written straight into the store (the CLI's way, without a process)."""
    os.makedirs(state_dir, mode=0o700, exist_ok=True)
    store = meshbox.Store(os.path.join(state_dir, "meshbox.db"))
    try:
        return store_key(store, user, reusable, ephemeral, None, tags)
    finally:
        store.db.close()


def compile_bytecode(folder):
    """meshbox.py compiled to FOLDER/meshbox.pyc, which Python imports without the
    source: how OpenWrt's packages (and pip's installs) run it, with no compile at start."""
    import py_compile
    py_compile.compile(MESHBOX, cfile=os.path.join(folder, "meshbox.pyc"), doraise=True)
    return folder

# ---- meshbox in this process (for tests that look inside the server) ----

@contextlib.asynccontextmanager
async def serving(state_dir, derp=False, **settings):
    """A Server on loopback (DERP over TLS on its own port when derp): (server, control port, DERP port)."""
    port, derp_port = free_port(), free_port()
    config = meshbox.Config(state_dir=str(state_dir), listen=f"127.0.0.1:{port}", stun_listen="off",
                            derp_listen=f"127.0.0.1:{derp_port}" if derp else "off", **settings)
    server = meshbox.Server(config)
    await server.start()
    try:
        yield server, port, derp_port
    finally:
        await server.stop()


@contextlib.asynccontextmanager
async def running_server(state_dir, **settings):
    """A Server on loopback without DERP: (server, control port)."""
    async with serving(state_dir, **settings) as (server, port, _):
        yield server, port


def new_key(server, reusable=True, ephemeral=False, expiration=None, tags=(), user="alice"):
    """A pre-auth key of USER in a running server's store."""
    return store_key(server.store, user, reusable, ephemeral, expiration, tags)


async def joined(port, key, name):
    """A simulated node registered with KEY and its map open: (client, first map message)."""
    client = tsclient.ControlClient("127.0.0.1", port, name)
    await client.connect()
    response = await client.register(key)
    assert response.get("MachineAuthorized"), response
    client.open_map()
    first = await client.next_map_message()
    return client, first


async def until(client, key, timeout=2):
    """The next map message that carries `key`, skipping others."""
    async with asyncio.timeout(timeout):
        while True:
            message = await client.next_map_message(timeout=timeout)
            if key in message:
                return message



class MeshboxProcess:
    """One ``meshbox.py serve`` process on loopback; DERP and STUN off unless asked."""

    def __init__(self, state_dir, port=None, derp_port=None, log_path=None, extra_args=(), env=None,
                 bytecode_dir=None):
        self.bytecode_dir = bytecode_dir   # run meshbox.pyc from here, as installed packages do
        self.state_dir = str(state_dir)
        self.port = port or free_port()
        self.derp_port = derp_port
        self.log_path = log_path or os.path.join(os.path.dirname(self.state_dir.rstrip("/")) or ".",
                                                 "meshbox-%d.log" % self.port)
        self.extra_args = list(extra_args)
        self.env = env
        self.proc = None

    def argv(self):
        derp = f"127.0.0.1:{self.derp_port}" if self.derp_port else "off"
        program = [MESHBOX] if not self.bytecode_dir else [
            "-c", f"import sys; sys.path.insert(0, {self.bytecode_dir!r}); import meshbox; sys.exit(meshbox.main())"]
        return [sys.executable, *program, "--state", self.state_dir, "serve", "--listen", f"127.0.0.1:{self.port}",
                "--derp-listen", derp, "--stun-listen", "off", *self.extra_args]

    def start(self, timeout=20):
        """Start the process; returns seconds from spawn until it accepts connections."""
        log = open(self.log_path, "ab")
        env = dict(os.environ, **(self.env or {}))
        started = time.monotonic()
        self.proc = subprocess.Popen(self.argv(), stdout=log, stderr=subprocess.STDOUT, env=env)
        log.close()
        while time.monotonic() - started < timeout:
            if accepts(self.port):
                return time.monotonic() - started
            if self.proc.poll() is not None:
                raise RuntimeError(f"meshbox exited with {self.proc.returncode}:\n{self.log_text()[-3000:]}")
            time.sleep(0.002)
        self.kill()
        raise TimeoutError(f"meshbox did not accept connections within {timeout} s:\n{self.log_text()[-3000:]}")

    def log_text(self):
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    @property
    def pid(self):
        return self.proc.pid

    def running(self):
        return self.proc is not None and self.proc.poll() is None

    def kill(self):
        """SIGKILL, as a power cut or the OOM killer would."""
        if self.running():
            self.proc.send_signal(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(10)

    def stop(self, grace=10):
        """SIGTERM, then SIGKILL if it does not stop within grace seconds."""
        if self.running():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.kill()

    def rss_mb(self):
        """Resident memory of the process now, in MiB."""
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        raise RuntimeError("no VmRSS")

    def cpu_seconds(self):
        """User plus system CPU time the process has used so far."""
        with open(f"/proc/{self.pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()
