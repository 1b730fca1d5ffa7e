"""Tailscale's own client against meshbox: names, policy, SSH, Taildrop, cert.

One meshbox and three stock tailscaled (1.96.4, userspace networking, so
no TUN device and no resolver of the host is touched) share the module,
with a fourth in TUN mode that manages its namespace's own resolv.conf:
stock-a and stock-b are alice's, stock-c is alice's too but tagged
tag:server (by `--advertise-tags`, which tagOwners allow).  The policy lets
alice reach everything, SSH into her own machines as any user (accept) and
into tag:server as root only after an admin approves (check); tag:server
reaches nobody.  The hub serves the lab's only DNS zone, corp.example, for
split DNS.
"""

import asyncio
import json
import subprocess
import sys

import pytest

import meshbox
import netlab
import realclients
from meshproc import joined, new_key, running_server
from realclients import CONTROL_URL, HUB, StockTailnet, meshbox_cli

pytestmark = pytest.mark.skipif(netlab.have_netns() is not None, reason=str(netlab.have_netns()))

BASE_DOMAIN = "mesh.internal"
SPLIT_DOMAIN = "corp.example"
SPLIT_ANSWER = "203.0.113.7"                 # what the hub's DNS server answers for any corp.example name
EXTRA_RECORD = {"name": f"db.{BASE_DOMAIN}", "type": "A", "value": "100.64.9.9"}
PEER_TIMEOUT = 30

POLICY = """{
  "tagOwners": {"tag:server": ["alice@"]},
  "grants": [{"src": ["alice@"], "dst": ["*"], "ip": ["*"]}],
  "ssh": [
    {"action": "accept", "src": ["alice@"], "dst": ["autogroup:self"], "users": ["root", "autogroup:nonroot"]},
    {"action": "check", "src": ["alice@"], "dst": ["tag:server"], "users": ["root"], "checkPeriod": "always"},
  ],
}"""

# A DNS server for the split domain, in the hub: every A question gets SPLIT_ANSWER.
SPLIT_DNS_SERVER = f"""
import socket, struct, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("{HUB}", 53))
s.settimeout(600)
print("ready", flush=True)
for _ in range(200):
    try:
        query, peer = s.recvfrom(512)
    except socket.timeout:
        break
    end = query.index(b"\\0", 12) + 5           # the question: name, type, class
    answer = b"\\xc0\\x0c" + struct.pack(">HHIH", 1, 1, 60, 4) + socket.inet_aton("{SPLIT_ANSWER}")
    s.sendto(query[:2] + b"\\x81\\x80" + query[4:6] + b"\\0\\x01\\0\\0\\0\\0" + query[12:end] + answer, peer)
"""


@pytest.fixture(scope="module")
def net(tmp_path_factory, stock_binaries):
    settings = {"base_domain": BASE_DOMAIN, "split_dns": {SPLIT_DOMAIN: [HUB]}, "extra_records": [EXTRA_RECORD]}
    folder = tmp_path_factory.mktemp("features")
    with StockTailnet(folder, stock_binaries, names=("a", "b", "c"), settings=settings, policy=POLICY,
                      up_flags={"c": ["--advertise-tags=tag:server"]}) as tailnet:
        dns = tailnet.lab.hub.spawn([sys.executable, "-c", SPLIT_DNS_SERVER], folder / "dns.log",
                                    env=netlab.clean_env(), pipes=True)
        assert netlab.read_line(dns.popen.stdout, 10).strip() == b"ready"
        for name in ("a", "b", "c"):
            tailnet.clients[name].cli("set", "--ssh", "--accept-dns=true")
        try:
            with realclients.namespace_resolver(tailnet.lab["a"]) as resolv_conf:
                # a fourth, TUN-mode client that manages its namespace's resolver
                tun = realclients.StockClient(tailnet.lab["a"], folder / "t", stock_binaries, port=41643,
                                              ca_file=tailnet.state / "derp-cert.pem", tun="ts-t")
                tailnet.tun, tailnet.resolv_conf = tun, resolv_conf
                try:
                    tun.start().up(CONTROL_URL, tailnet.key, "stock-t")
                    tun.cli("set", "--accept-dns=true")
                    yield tailnet
                finally:
                    tun.stop()
                    print(f"---- tailscaled stock-t:\n{tun.log_text()[-3000:]}")
        finally:
            dns.stop()


def online_peer(client, hostname):
    peer = client.wait_peer(hostname, PEER_TIMEOUT, online=True)
    assert peer, f"{hostname} never reached the netmap online"
    return peer


def dns_answers(client, name, kind="A"):
    """The record bodies `tailscale dns query` gets from the client's own resolver (100.100.100.100)."""
    out = client.cli("dns", "query", name, kind).stdout
    return [line.split()[-1] for line in out.splitlines() if f"Type{kind}" in line]


# ---- names ----

def test_status_shows_users_os_online_and_tags(net):
    a = net.clients["a"]
    status = a.status()
    b, c = online_peer(a, "stock-b"), online_peer(a, "stock-c")
    users = {str(uid): u["LoginName"] for uid, u in status["User"].items()}
    assert users[str(b["UserID"])] == "alice" and b["OS"] == "linux" and b["Online"] and not b.get("Tags")
    assert c["Tags"] == ["tag:server"] and c["Online"]
    assert users[str(c["UserID"])] == "tagged-devices"     # a tagged node is nobody's own, as in Tailscale
    assert b["DNSName"] == f"stock-b.{BASE_DOMAIN}."
    text = a.cli("status").stdout
    assert "stock-b" in text and "alice" in text and "linux" in text


def test_whois_names_the_machine_and_its_user(net):
    a = net.clients["a"]
    whois = json.loads(a.cli("whois", "--json", net.address("b")).stdout)
    assert whois["Node"]["Name"] == f"stock-b.{BASE_DOMAIN}."
    assert whois["UserProfile"]["LoginName"] == "alice"
    tagged = json.loads(a.cli("whois", "--json", net.address("c")).stdout)
    assert tagged["Node"]["Tags"] == ["tag:server"] and tagged["UserProfile"]["LoginName"] == "tagged-devices"


def test_magicdns_peers_split_dns_and_extra_records(net):
    """Through the client's own resolver: a peer's FQDN, a name of the split
    domain (forwarded to the hub's DNS server), an extra record; the search
    domain that makes short names work."""
    with open("/etc/resolv.conf", "rb") as f:
        host_resolv = f.read()
    a = net.clients["a"]
    assert dns_answers(a, f"stock-b.{BASE_DOMAIN}") == [net.address("b")]
    assert dns_answers(a, f"stock-c.{BASE_DOMAIN}.") == [net.address("c")]
    assert dns_answers(a, f"www.{SPLIT_DOMAIN}") == [SPLIT_ANSWER]
    assert dns_answers(a, EXTRA_RECORD["name"]) == [EXTRA_RECORD["value"]]
    status = a.cli("dns", "status").stdout
    assert f"MagicDNS: enabled tailnet-wide (suffix = {BASE_DOMAIN})" in status
    assert f"{SPLIT_DOMAIN}" in status and f"  - {BASE_DOMAIN}" in status
    with open("/etc/resolv.conf", "rb") as f:
        assert f.read() == host_resolv           # userspace mode: the host's DNS is untouched


def test_magicdns_short_names_through_the_namespace_resolver(net):
    """A TUN-mode client points its namespace's resolv.conf at 100.100.100.100
    with the tailnet's search domain: the system's resolver (getent) finds
    peers by short name and by FQDN."""
    def resolves(name):
        done = net.lab["a"].run(["getent", "hosts", name], check=False, timeout=15)
        return done.stdout.split()[:1]
    assert netlab.wait_until(lambda: "search mesh.internal" in net.resolv_conf.read_text(), PEER_TIMEOUT)
    assert "nameserver 100.100.100.100" in net.resolv_conf.read_text()
    assert netlab.wait_until(lambda: resolves("stock-b") == [net.address("b")], PEER_TIMEOUT), resolves("stock-b")
    assert resolves(f"stock-c.{BASE_DOMAIN}") == [net.address("c")]


def test_netcheck_uses_meshbox_derp_and_stun(net):
    out = net.clients["a"].cli("netcheck", timeout=60).stdout
    assert "UDP: true" in out and "IPv4: yes, 192.0.2." in out       # STUN answered from the hub
    assert "Nearest DERP: meshbox" in out


def test_ping_disco_and_tsmp(net):
    a = net.clients["a"]
    pongs = netlab.wait_until(lambda: a.ping("stock-b"), PEER_TIMEOUT)
    assert pongs and "via DERP(meshbox)" in pongs[0], pongs
    done = a.cli("ping", "--tsmp", "--c=1", "--timeout=5s", "stock-b", check=False)
    assert "via TSMP" in done.stdout, done.stdout + done.stderr


# ---- policy ----

def test_denied_peer_is_unreachable(net):
    """tag:server reaches nobody: stock-c cannot open stock-a's SSH port, stock-b can."""
    def banner(source, target):
        """What `tailscale nc TARGET 22` reads within 10 s (it waits for more until killed)."""
        try:
            return net.clients[source].cli("nc", target, "22", timeout=10, check=False).stdout
        except subprocess.TimeoutExpired as waited:
            return (waited.stdout or b"").decode(errors="replace") if isinstance(waited.stdout, bytes) \
                else waited.stdout or ""
    # stock-a's tailscaled takes its time to serve SSH after `set --ssh` (11 s
    # in one passing run, over 30 s once): the first banner gets twice the wait.
    assert netlab.wait_until(lambda: "SSH-2.0-Tailscale" in banner("b", "stock-a"), 2 * PEER_TIMEOUT)
    assert "SSH-2.0" not in banner("c", "stock-a")


def test_advertised_tag_needs_tag_owner(net, tmp_path):
    """alice may own tag:server (stock-c has it); no one owns tag:other, and
    the client is told why."""
    extra = realclients.StockClient(net.lab["c"], tmp_path / "d", net.binaries, port=41642,
                                    ca_file=net.state / "derp-cert.pem").start()
    try:
        with pytest.raises(RuntimeError) as refused:
            extra.up(CONTROL_URL, net.key, "stock-d", "--advertise-tags=tag:other", timeout=20)
        assert "requested tag tag:other is not permitted" in str(refused.value)
    finally:
        extra.stop()


def ssh(net, source, target, command, timeout=60, wait=True):
    """`tailscale ssh TARGET COMMAND` from client `source` (the system's ssh,
    through tailscaled); the CompletedProcess, or the Popen when not `wait`."""
    client = net.clients[source]
    argv = client.ns.argv([str(client.binaries["tailscale"]), f"--socket={client.socket}", "ssh", target, command])
    env = realclients.client_env(client.workdir)
    if not wait:
        return subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
    return subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)


def test_tailscale_ssh_accept_rule(net):
    done = ssh(net, "a", "root@stock-b", "echo via-tailscale-ssh $USER")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "via-tailscale-ssh root"


def test_tailscale_ssh_outside_the_policy_is_refused(net):
    """alice may SSH into tag:server as root only: as another user no rule matches."""
    done = ssh(net, "a", "nobody@stock-c", "true", timeout=60)
    assert done.returncode != 0
    assert "tailnet policy does not permit" in done.stderr or "Permission denied" in done.stderr, done.stderr


def test_tailscale_ssh_check_rule_waits_for_approval(net):
    """A check rule holds the session at /machine/ssh/action until `meshbox ssh
    approve`; with checkPeriod "always" the next session asks again, and a
    denied one is refused."""
    def held_check():
        checks = json.loads(meshbox_cli(net.state, "ssh", "checks", "-o", "json"))
        return checks[0] if checks else None

    for verdict in ("approve", "deny"):
        session = ssh(net, "a", "root@stock-c", "echo checked-in", wait=False)
        try:
            check = netlab.wait_until(held_check, 30)
            assert check and check["from"] == "stock-a" and check["to"] == "stock-c" and check["user"] == "root", \
                (check, session.poll())
            assert session.poll() is None                  # held, not refused
            meshbox_cli(net.state, "ssh", verdict, check["id"])
            out, err = session.communicate(timeout=60)
        finally:
            if session.poll() is None:
                session.kill()
                session.communicate()
        if verdict == "approve":
            assert session.returncode == 0 and out.strip() == "checked-in", err
            assert "needs an admin's approval" in err        # the banner the client shows meanwhile
        else:
            assert session.returncode != 0 and "denied" in err, err
    assert held_check() is None


# ---- files ----

def test_taildrop_between_two_nodes_of_one_user(net, tmp_path):
    a, b = net.clients["a"], net.clients["b"]
    targets = a.cli("file", "cp", "--targets").stdout
    assert "stock-b" in targets and "stock-c" not in targets       # tagged: not alice's own
    sent = tmp_path / "note.txt"
    sent.write_text("hello through Taildrop\n")
    netlab.wait_until(lambda: a.cli("file", "cp", str(sent), "stock-b:", check=False).returncode == 0, PEER_TIMEOUT)
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    b.cli("file", "get", "--wait", str(inbox), timeout=60)
    assert (inbox / "note.txt").read_text() == "hello through Taildrop\n"


# ---- cert ----

def test_cert_without_dns_provider_is_refused_at_once(net):
    """No dns_hook: meshbox offers no CertDomains, and the client refuses
    without contacting any CA."""
    done = net.clients["a"].cli("cert", f"stock-a.{BASE_DOMAIN}", timeout=30, check=False)
    assert done.returncode != 0 and "does not support getting TLS certs" in done.stderr, done.stderr


def test_set_dns_runs_the_dns_hook_for_the_node_own_name(tmp_path):
    """/machine/set-dns (what `tailscale cert` calls for its ACME dns-01
    challenge) publishes the node's own _acme-challenge record through
    dns_hook, refuses other names, and says why when no hook is set."""
    record = tmp_path / "published"
    hook = tmp_path / "hook.sh"
    hook.write_text(f"#!/bin/sh\necho \"$@\" > {record}\n")
    hook.chmod(0o755)

    async def scenario():
        async with running_server(tmp_path / "state", dns_hook=str(hook)) as (server, port):
            client, first = await joined(port, new_key(server), "certnode")
            fqdn = f"certnode.{server.config.base_domain}"
            assert first["DNSConfig"]["CertDomains"] == [fqdn]
            request = {"Version": 133, "NodeKey": client.node_key, "Name": f"_acme-challenge.{fqdn}",
                       "Type": "TXT", "Value": "abc-DEF_123"}
            status, body = await client.request("/machine/set-dns", request)
            assert (status, record.read_text().split()) == (200, [f"_acme-challenge.{fqdn}", "TXT", "abc-DEF_123"])
            status, body = await client.request("/machine/set-dns", dict(request, Name="_acme-challenge.other."
                                                                         + server.config.base_domain))
            assert status == 403 and b"may only set" in body
            status, body = await client.request("/machine/set-dns", dict(request, Value="a b;rm"))
            assert status == 400
            server.config.dns_hook = ""
            status, body = await client.request("/machine/set-dns", request)
            assert status == 501 and b"no DNS provider" in body
            await client.close()
    asyncio.run(scenario())


def test_ssh_action_endpoint_holds_until_an_admin_decides(tmp_path):
    """GET /machine/ssh/action/SRC/to/DST: only DST may ask; a first request is
    held (holdAndDelegate with an auth_id), the follow-up answers once an
    admin approves; within checkPeriod the same source is let in at once; an
    unknown auth_id is refused."""
    policy = json.dumps({"tagOwners": {"tag:server": ["alice@"]}, "ssh": [
        {"action": "check", "src": ["alice@"], "dst": ["tag:server"], "users": ["root"], "checkPeriod": "1h"}]})

    async def scenario():
        async with running_server(tmp_path / "state") as (server, port):
            admin = meshbox.Admin(server.store, server.config, server)
            admin.call("policy", "set", {"policy": policy})
            laptop, first = await joined(port, new_key(server), "laptop")
            box, box_first = await joined(port, new_key(server, tags=["tag:server"]), "box")
            src, dst = first["Node"]["ID"], box_first["Node"]["ID"]
            path = f"/machine/ssh/action/{src}/to/{dst}?local_user=root"
            status, _ = await laptop.request(path, None, method="GET")
            assert status == 403                               # the source may not ask for itself
            status, body = await box.request(path.replace("root", "root%0A%23%20approved"), None, method="GET")
            assert status == 400 and b"login name" in body     # no lines of its own in the banner
            status, body = await box.request(path, None, method="GET")
            held = json.loads(body)
            assert status == 200 and "auth_id=" in held["holdAndDelegate"] and "ssh approve" in held["message"]
            (check,) = admin.call("ssh", "checks", {})
            assert (check["from"], check["to"], check["user"]) == ("laptop", "box", "root")
            follow_up = asyncio.ensure_future(box.request(held["holdAndDelegate"].split(str(port), 1)[1], None,
                                                          method="GET", timeout=20))
            await asyncio.sleep(0.5)
            assert not follow_up.done()                        # held while nobody decides
            admin.call("ssh", "approve", {"id": check["id"]})
            status, body = await follow_up
            assert status == 200 and json.loads(body)["accept"] is True
            status, body = await box.request(path, None, method="GET")   # within checkPeriod: no new check
            assert json.loads(body)["accept"] is True and admin.call("ssh", "checks", {}) == []
            status, body = await box.request(path + "&auth_id=0000", None, method="GET")
            assert json.loads(body)["reject"] is True
            with pytest.raises(ValueError, match="no SSH check"):
                admin.call("ssh", "approve", {"id": check["id"]})
            await laptop.close()
            await box.close()
    asyncio.run(scenario())


def test_every_node_gets_taildrop_and_ssh_capabilities_unless_taildrop_is_off(tmp_path):
    async def first_map(state, **settings):
        async with running_server(state, **settings) as (server, port):
            client, first = await joined(port, new_key(server), "capnode")
            await client.close()
            return first
    first = asyncio.run(first_map(tmp_path / "one"))
    caps = first["Node"]["CapMap"]
    assert meshbox.CAP_FILE_SHARING in caps and meshbox.CAP_SSH in caps
    assert "CertDomains" not in first["DNSConfig"]          # no dns_hook: no certificates offered
    caps = asyncio.run(first_map(tmp_path / "two", taildrop=False))["Node"]["CapMap"]
    assert meshbox.CAP_FILE_SHARING not in caps and meshbox.CAP_SSH in caps
