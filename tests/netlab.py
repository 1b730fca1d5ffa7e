"""Network namespaces for tests: a hub where meshbox runs, clients linked to it;
and a NAT lab: an "internet" with sites behind home-router NATs."""

# Layout (all addresses TEST-NET-1, nothing routes outside the lab):
#
#   client "a" 192.0.2.10 --veth-- hub 192.0.2.1 --veth-- client "b" 192.0.2.11
#
# Every client has a /32 on its veth, a link route to the hub and a route for
# 192.0.2.0/24 via the hub. Whether the hub forwards decides if clients reach
# each other directly: with forwarding off (the default, `direct=False`) their
# packets to each other are silently dropped at the hub, like a strict NAT, so
# peer traffic must be relayed by the DERP server running in the hub. There is
# no default route anywhere, so nothing in the lab can reach the outside.

import atexit
import ipaddress
import os
import re
import selectors
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

# ---- Constants ----

NS_PREFIX = "mbt"
HUB_ADDR = "192.0.2.1"
LAB_NET = "192.0.2.0/24"
FIRST_CLIENT_HOST = 10
CMD_TIMEOUT = 30.0
STOP_GRACE = 5.0

_STALE_NS = re.compile(r"^mbt(\d+)-")
_live = []  # Netns and Proc objects not yet closed, for the atexit sweep
_lab_seq = 0


# ---- Helpers ----

def have_netns():
    """Why namespaces cannot be used here, or None when they can."""
    if os.geteuid() != 0:
        return "needs root for ip netns"
    if shutil.which("ip") is None:
        return "no ip command (iproute2)"
    probe = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    if probe.returncode != 0:
        return "ip netns unusable: " + probe.stderr.strip()
    return None


def ip(*args, timeout=CMD_TIMEOUT):
    """Run `ip ARGS` in the current namespace; raise with stderr on failure."""
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


def list_netns():
    """Names of all network namespaces known to `ip netns`."""
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def pid_alive(pid):
    """Whether a process with this pid exists."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def kill_netns_processes(name):
    """SIGKILL every process still running inside namespace `name`."""
    out = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True).stdout
    for pid in out.split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass


def delete_netns(name):
    """Kill what runs in namespace `name` and delete it (quietly if gone)."""
    kill_netns_processes(name)
    subprocess.run(["ip", "netns", "del", name], capture_output=True)


def cleanup_stale():
    """Delete lab namespaces left behind by test processes that have died."""
    for name in list_netns():
        found = _STALE_NS.match(name)
        if found and int(found.group(1)) != os.getpid() and not pid_alive(int(found.group(1))):
            delete_netns(name)


def wait_until(predicate, timeout, interval=0.2):
    """Poll `predicate` until it returns a true value or `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


# ---- Processes ----

class Proc:
    """A background process in a namespace, its output going to a log file."""

    def __init__(self, popen, log_path, argv):
        self.popen = popen
        self.log_path = Path(log_path)
        self.argv = argv
        _live.append(self)

    @property
    def pid(self):
        return self.popen.pid

    def running(self):
        return self.popen.poll() is None

    def log_text(self):
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_for_log(self, pattern, timeout):
        """The first match of regex `pattern` in the log within `timeout` seconds.

        Raises TimeoutError (with the log's tail) when it does not show up, or
        when the process exits first."""
        regex = re.compile(pattern)

        def look():
            return regex.search(self.log_text()) or (not self.running() and "exited")

        found = wait_until(look, timeout)
        if isinstance(found, re.Match):
            return found
        last = regex.search(self.log_text())
        if last:
            return last
        why = f"exited with {self.popen.returncode}" if found == "exited" else f"not within {timeout}s"
        raise TimeoutError(f"{pattern!r} not in {self.log_path} ({why}); tail:\n{self.log_text()[-3000:]}")

    def stop(self, grace=STOP_GRACE):
        """SIGTERM the process group, SIGKILL it after `grace` seconds; return the exit code."""
        if self in _live:
            _live.remove(self)
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, grace)):
            if self.popen.poll() is not None:
                break
            try:
                os.killpg(self.popen.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.popen.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                pass
        for stream in (self.popen.stdin, self.popen.stdout):
            if stream:
                stream.close()
        return self.popen.returncode

    close = stop


# ---- Namespaces ----

class Netns:
    """One network namespace; close() kills its processes and deletes it."""

    def __init__(self, name):
        self.name = name
        ip("netns", "add", name)
        _live.append(self)
        self.sysctl("net.ipv6.conf.default.disable_ipv6", "1")  # veths get no link-local noise
        ip("-n", name, "link", "set", "lo", "up")

    def argv(self, cmd):
        return ["ip", "netns", "exec", self.name, *cmd]

    def run(self, cmd, timeout=CMD_TIMEOUT, check=True, input=None, env=None):
        """Run `cmd` inside the namespace and return its CompletedProcess (text)."""
        done = subprocess.run(self.argv(cmd), capture_output=True, text=True,
                              timeout=timeout, input=input, env=env)
        if check and done.returncode != 0:
            raise RuntimeError(f"[{self.name}] {' '.join(cmd)} -> {done.returncode}: "
                               f"{done.stderr.strip()[-2000:]}")
        return done

    def sysctl(self, key, value):
        path = "/proc/sys/" + key.replace(".", "/")
        self.run(["sh", "-c", f"echo {value} > {path}"])

    def spawn(self, cmd, log_path, env=None, cwd=None, pipes=False):
        """Start `cmd` in the background inside the namespace.

        stdout and stderr append to `log_path`; with `pipes` stdin and stdout
        are pipes instead (stderr still goes to the log). `env` replaces the
        environment when given."""
        log = open(log_path, "ab")
        try:
            popen = subprocess.Popen(
                self.argv(cmd), cwd=cwd, env=env, start_new_session=True,
                stdin=subprocess.PIPE if pipes else subprocess.DEVNULL,
                stdout=subprocess.PIPE if pipes else log, stderr=log)
        finally:
            log.close()
        return Proc(popen, log_path, cmd)

    def python(self, code, timeout=CMD_TIMEOUT, check=True):
        """Run a snippet of Python inside the namespace; return its CompletedProcess."""
        return self.run([sys.executable, "-c", code], timeout=timeout, check=check,
                        env=clean_env())

    def http_get(self, url, timeout=10.0, proxy=None):
        """GET `url` from inside the namespace: (status, body text); status 0 on no answer."""
        code = (
            "import sys, urllib.request, urllib.error\n"
            f"proxies = {{'http': {proxy!r}}} if {proxy!r} else {{}}\n"
            "opener = urllib.request.build_opener(urllib.request.ProxyHandler(proxies))\n"
            "try:\n"
            f"    r = opener.open({url!r}, timeout={timeout!r})\n"
            "    print(r.status); sys.stdout.write(r.read().decode(errors='replace'))\n"
            "except urllib.error.HTTPError as e:\n"
            "    print(e.code); sys.stdout.write(e.read().decode(errors='replace'))\n"
            "except Exception as e:\n"
            "    print(0); sys.stdout.write(repr(e))\n")
        out = self.python(code, timeout=timeout + 10).stdout
        status, _, body = out.partition("\n")
        return int(status), body

    def udp_reaches(self, addr, port=9, timeout=2.0, peer=None):
        """Whether a UDP datagram from here arrives at `peer` (a Netns) listening on addr:port."""
        listener = peer.spawn([sys.executable, "-c", _UDP_ECHO_LISTENER, addr, str(port), str(timeout + 2)],
                              os.devnull, env=clean_env(), pipes=True)
        try:
            if read_line(listener.popen.stdout, timeout + 10).strip() != b"ready":
                raise RuntimeError(f"UDP listener in {peer.name} failed to start")
            self.python("import socket, sys\n"
                        "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
                        f"try: s.sendto(b'probe', ({addr!r}, {port}))\n"
                        "except OSError: pass\n", timeout=timeout + 10)
            line = read_line(listener.popen.stdout, timeout + 3)
            return line.strip() == b"got"
        finally:
            listener.stop(grace=1)

    def close(self):
        if self in _live:
            _live.remove(self)
        delete_netns(self.name)


_UDP_ECHO_LISTENER = (
    "import socket, sys\n"
    "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
    "s.bind((sys.argv[1], int(sys.argv[2]))); s.settimeout(float(sys.argv[3]))\n"
    "print('ready', flush=True)\n"
    "try: s.recvfrom(2048); print('got', flush=True)\n"
    "except socket.timeout: print('timeout', flush=True)\n")


def read_line(stream, timeout):
    """One line from a pipe, or b'' when none comes within `timeout` seconds."""
    with selectors.DefaultSelector() as sel:
        sel.register(stream, selectors.EVENT_READ)
        return stream.readline() if sel.select(timeout) else b""


def clean_env(**extra):
    """A minimal environment for lab processes: no proxies, no inherited tokens."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8"}
    env.update({k: str(v) for k, v in extra.items()})
    return env


def link(left, left_if, right, right_if):
    """A veth pair between two namespaces, both ends up."""
    ip("link", "add", "name", left_if, "netns", left.name, "type", "veth",
       "peer", "name", right_if, "netns", right.name)
    ip("-n", left.name, "link", "set", left_if, "up")
    ip("-n", right.name, "link", "set", right_if, "up")


# ---- Topology ----

class Namespaces:
    """A set of lab namespaces: close() kills what runs in them and deletes
    them (in reverse order of namespaces()), then forget() drops them."""

    def close(self):
        for ns in reversed(self.namespaces()):
            ns.close()
        self.forget()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Lab(Namespaces):
    """A hub namespace and client namespaces each linked to it by a veth."""

    def __init__(self, clients=("a", "b"), direct=False):
        global _lab_seq
        if len(clients) > 200:
            raise ValueError("too many clients for one /24")
        cleanup_stale()
        _lab_seq += 1
        self.tag = f"{NS_PREFIX}{os.getpid()}-{_lab_seq}"
        self.hub_addr = HUB_ADDR
        self.clients = {}
        self.addr = {}
        self.hub = None
        try:
            self.hub = Netns(f"{self.tag}-hub")
            for i, name in enumerate(clients):
                self.add_client(name, f"192.0.2.{FIRST_CLIENT_HOST + i}")
            self.set_direct(direct)
        except BaseException:
            self.close()
            raise

    def add_client(self, name, addr):
        """A client namespace `name` at `addr`, linked to the hub."""
        ns = Netns(f"{self.tag}-{name}")
        self.clients[name] = ns
        self.addr[name] = addr
        hub_if = f"h-{name}"[:15]
        link(ns, "eth0", self.hub, hub_if)
        ip("-n", self.hub.name, "addr", "add", f"{HUB_ADDR}/32", "dev", hub_if)
        ip("-n", self.hub.name, "route", "add", f"{addr}/32", "dev", hub_if, "src", HUB_ADDR)
        ip("-n", ns.name, "addr", "add", f"{addr}/32", "dev", "eth0")
        ip("-n", ns.name, "route", "add", f"{HUB_ADDR}/32", "dev", "eth0", "src", addr)
        ip("-n", ns.name, "route", "add", LAB_NET, "via", HUB_ADDR, "dev", "eth0", "src", addr)
        return ns

    def __getitem__(self, name):
        return self.clients[name]

    def set_direct(self, allowed):
        """Let clients reach each other through the hub (True) or drop it (False)."""
        self.hub.sysctl("net.ipv4.ip_forward", "1" if allowed else "0")
        self.direct = allowed

    def namespaces(self):
        return ([self.hub] if self.hub else []) + list(self.clients.values())

    def forget(self):
        self.clients.clear()
        self.hub = None


# ---- NAT lab ----
# Layout (TEST-NET only; the "internet" has no default route, so nothing
# leaves the lab):
#
#   device 192.0.2.18 --lan-- router 203.0.113.11 --wan-- internet 203.0.113.1
#   device 192.0.2.34 --lan-- router 203.0.113.12 --wan--/   (meshbox listens here)
#
# Each site is a router namespace (a bridge "lan" for its devices, a veth
# "wan" to the internet) with nftables rules of a home router: masquerade
# out of wan, forward only what the LAN started (or a forwarded port), and
# drop new packets from wan to the router itself: without that input rule a
# peer's first probe takes the router's own mapping and hole punching fails.
# Site i has the LAN 192.0.2.16i/28 (router .16i+1) unless given another.

INTERNET_ADDR = "203.0.113.1"
FIRST_WAN_HOST = 10             # sites' WAN addresses: 203.0.113.10 on
FIRST_RENUMBERED_HOST = 100     # and after a renumbering: 203.0.113.100 on
MAX_SITES = 14                  # /28 LANs of 192.0.2.0/24 after the first
TAILSCALE_PORT = 41641
NAT_KINDS = {
    "easy": "endpoint-independent mapping (plain masquerade)",
    "hard": "mapping varies by destination (masquerade random,fully-random)",
    "udp-blocked": "only TCP leaves the site",
    "forwarded": "easy, and UDP 41641 forwarded to each device (as UPnP or a port forward)",
}


def router_ruleset(kind, forwards=()):
    """The nftables ruleset of a home router of `kind`; `forwards` are
    (proto, WAN port, LAN address, LAN port) to DNAT inward."""
    if kind not in NAT_KINDS:
        raise ValueError(f"unknown NAT kind {kind!r}")
    dnat = "".join(f"    iifname \"wan\" {proto} dport {port} dnat to {addr}:{lan_port}\n"
                   for proto, port, addr, lan_port in forwards)
    masquerade = "masquerade random,fully-random" if kind == "hard" else "masquerade"
    udp_drop = "    iifname \"lan\" meta l4proto udp drop\n" if kind == "udp-blocked" else ""
    return ("table ip nat {\n"
            "  chain prerouting_wan {\n    type nat hook prerouting priority -100;\n" + dnat + "  }\n"
            "  chain postrouting_wan {\n    type nat hook postrouting priority 100;\n"
            f"    oifname \"wan\" {masquerade}\n  }}\n"
            "}\n"
            "table ip filter {\n"
            "  chain forward_lan {\n    type filter hook forward priority 0; policy drop;\n" + udp_drop +
            "    iifname \"lan\" accept\n    ct state established,related accept\n    ct status dnat accept\n  }\n"
            "  chain input_wan {\n    type filter hook input priority 0; policy accept;\n"
            "    iifname \"wan\" ct state new drop\n  }\n"
            "}\n")


class Site:
    """A NAT router namespace of one kind and the device namespaces behind it."""

    def __init__(self, lab, name, kind, wan_addr, lan_net):
        self.lab, self.name, self.kind, self.wan_addr = lab, name, kind, wan_addr
        self.lan_net = ipaddress.ip_network(lan_net)
        hosts = self.lan_net.hosts()
        self.lan_gateway = str(next(hosts))
        self._free_hosts = [str(h) for h in hosts]
        self.devices = {}
        self.forwards = []
        self.wan_if = f"w-{name}"[:15]          # its end in the internet namespace
        self.router = Netns(f"{lab.tag}-r{name}"[:60])
        lab.routers.append(self.router)
        link(self.router, "wan", lab.internet, self.wan_if)
        ip("-n", self.router.name, "link", "add", "lan", "type", "bridge")
        ip("-n", self.router.name, "link", "set", "lan", "up")
        ip("-n", self.router.name, "addr", "add", f"{self.lan_gateway}/{self.lan_net.prefixlen}", "dev", "lan")
        ip("-n", lab.internet.name, "addr", "add", f"{INTERNET_ADDR}/32", "dev", self.wan_if)
        self._route_wan(wan_addr)
        self.router.sysctl("net.ipv4.ip_forward", "1")
        self.apply_rules()

    def _route_wan(self, addr):
        r, net = self.router.name, self.lab.internet.name
        ip("-n", r, "addr", "add", f"{addr}/32", "dev", "wan")
        ip("-n", r, "route", "replace", f"{INTERNET_ADDR}/32", "dev", "wan", "src", addr)
        ip("-n", r, "route", "replace", "default", "via", INTERNET_ADDR, "dev", "wan", "src", addr)
        ip("-n", net, "route", "replace", f"{addr}/32", "dev", self.wan_if, "src", INTERNET_ADDR)

    def apply_rules(self):
        self.router.run(["nft", "flush", "ruleset"])
        self.router.run(["nft", "-f", "-"], input=router_ruleset(self.kind, self.forwards))

    def forward(self, proto, port, addr, lan_port=None):
        """Forward WAN `proto` `port` to addr:lan_port on the LAN (DNAT)."""
        self.forwards.append((proto, port, addr, lan_port or port))
        self.apply_rules()

    def add_device(self, name):
        """A device namespace `name` on this site's LAN, its default route via the router."""
        ns = Netns(f"{self.lab.tag}-{name}"[:60])
        self.lab.devices[name] = ns
        self.attach(name, ns)
        return ns

    def attach(self, name, ns, port=None):
        """Give device `name` an address on this LAN; `port` is its veth end
        already moved into this router (a roaming device), else one is made."""
        if not self._free_hosts:
            raise ValueError(f"site {self.name}'s LAN {self.lan_net} is full")
        addr = self._free_hosts.pop(0)
        if port is None:
            port = f"l-{name}"[:15]
            link(ns, "eth0", self.router, port)
        else:
            ip("-n", self.router.name, "link", "set", port, "up")
        ip("-n", self.router.name, "link", "set", port, "master", "lan")
        ip("-n", ns.name, "addr", "add", f"{addr}/{self.lan_net.prefixlen}", "dev", "eth0")
        ip("-n", ns.name, "route", "replace", "default", "via", self.lan_gateway, "dev", "eth0")
        self.devices[name] = addr
        if self.kind == "forwarded":          # one WAN port per device, as a UPnP mapping would
            self.forward("udp", TAILSCALE_PORT + len(self.devices) - 1, addr, TAILSCALE_PORT)
        self.lab.site_of[name] = self
        return addr

    def hand_over(self, name, site):
        """Move device `name`'s link to `site`'s router without taking it down
        (as a phone roams from Wi-Fi to mobile data): the new address comes
        before the old one goes, so the device is never without one."""
        ns, port = self.lab.devices[name], f"l-{name}"[:15]
        old = self.devices.pop(name)
        ip("-n", self.router.name, "link", "set", port, "netns", site.router.name)
        new = site.attach(name, ns, port)
        ip("-n", ns.name, "addr", "del", f"{old}/{self.lan_net.prefixlen}", "dev", "eth0")
        self._free_hosts.append(old)
        self.forwards = [f for f in self.forwards if f[2] in self.devices.values()]
        self.apply_rules()
        return new

    def renumber(self):
        """Give the router a new WAN address (as an ISP does): the masquerade's
        mappings die with the old one. Returns the new address."""
        new = self.lab.next_renumbered()
        old, r, net = self.wan_addr, self.router.name, self.lab.internet.name
        ip("-n", r, "addr", "del", f"{old}/32", "dev", "wan")
        ip("-n", net, "route", "del", f"{old}/32", "dev", self.wan_if)
        self._route_wan(new)
        self.wan_addr = new
        return new


class NatLab(Namespaces):
    """An internet namespace (meshbox at INTERNET_ADDR) and NAT sites.

    add_site(name, kind) builds a router; site.add_device(name) a device
    behind it; move(device, site) takes a device to another site with its
    processes running (Wi-Fi to mobile data); site.renumber() changes a
    site's public address."""

    def __init__(self):
        global _lab_seq
        cleanup_stale()
        _lab_seq += 1
        self.tag = f"{NS_PREFIX}{os.getpid()}-{_lab_seq}"
        self.sites, self.devices, self.site_of, self.routers = {}, {}, {}, []
        self._renumbered = FIRST_RENUMBERED_HOST
        try:
            self.internet = Netns(f"{self.tag}-net")
            self.internet.sysctl("net.ipv4.ip_forward", "1")
        except BaseException:
            self.close()
            raise

    def add_site(self, name, kind, lan_net=None):
        index = len(self.sites) + 1
        if index > MAX_SITES:
            raise ValueError(f"at most {MAX_SITES} sites in one lab")
        site = Site(self, name, kind, f"203.0.113.{FIRST_WAN_HOST + index}",
                    lan_net or f"192.0.2.{16 * index}/28")
        self.sites[name] = site
        return site

    def next_renumbered(self):
        if self._renumbered > 250:
            raise ValueError("no WAN addresses left to renumber to")
        self._renumbered += 1
        return f"203.0.113.{self._renumbered}"

    def __getitem__(self, name):
        return self.devices[name]

    def move(self, name, site):
        """Take device `name` to `site`, its link staying up: a new LAN address
        and a new NAT. Its new address."""
        return self.site_of[name].hand_over(name, site)

    def namespaces(self):
        inet = getattr(self, "internet", None)
        return ([inet] if inet else []) + self.routers + list(self.devices.values())

    def forget(self):
        self.devices.clear()
        self.routers.clear()
        self.sites.clear()
        self.internet = None


# ---- Teardown ----

@atexit.register
def close_all():
    """Stop every process and delete every namespace this process still holds."""
    for thing in reversed(list(_live)):
        try:
            thing.close()
        except Exception as err:  # keep sweeping; report what could not be closed
            print(f"netlab: closing {thing!r}: {err}", file=sys.stderr)
