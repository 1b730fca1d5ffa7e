"""Day-to-day operations: API with keys, metrics, health, hosts file, DNS
settings, inspection (nodes show, netmap, logs) and JSON logs."""

import asyncio
import json
import os
import subprocess
import sys
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

import meshproc
import tsclient
from meshproc import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def served(tmp_path):
    """meshbox serve in a subprocess, with JSON logs and DNS settings."""
    port = free_port()
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"split_dns": {"corp.example": ["192.0.2.53"]}, "search_domains": ["example.net"],
                                  "extra_records": [{"name": "printer.mesh.internal", "value": "100.64.9.9"}],
                                  "nameservers": ["192.0.2.1"]}))
    state = tmp_path / "state"
    log_path = tmp_path / "serve.log"
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "meshbox.py"), "--state", str(state), "--config",
                                 str(config), "serve", "--listen", f"127.0.0.1:{port}", "--derp-listen", "off",
                                 "--stun-listen", "off", "--log-format", "json"], stdout=log_file, stderr=log_file)
    deadline = time.monotonic() + 20
    while "serving" not in log_path.read_text():
        assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()
        time.sleep(0.1)
    try:
        yield state, port, log_path
    finally:
        proc.terminate()
        proc.wait(10)


async def join(port, key, name):
    client = tsclient.ControlClient("127.0.0.1", port, name)
    await client.connect()
    assert (await client.register(key))["MachineAuthorized"]
    client.open_map()
    return client, await client.next_map_message()


def test_api_metrics_hosts_and_inspection(served):
    state, port, log_path = served
    url = f"http://127.0.0.1:{port}"
    api_key = meshproc.cli("apikeys", "create", state=state, check=True).stdout.strip().splitlines()[-1]
    assert api_key.startswith("msapi-")

    def remote(*args, key=api_key):
        return meshproc.cli("--remote", url, "--api-key", key, *args)

    # Every verb works remotely with a key.
    assert remote("users", "create", "dana").returncode == 0
    key = remote("preauthkeys", "create", "--user", "dana", "--reusable").stdout.strip().splitlines()[-1]

    async def clients():
        a, first = await join(port, key, "alpha")
        b, _ = await join(port, key, "beta")
        return a, b, first
    loop = asyncio.new_event_loop()
    a, b, first = loop.run_until_complete(clients())
    try:
        dns = first["DNSConfig"]
        assert dns["Domains"] == ["mesh.internal", "example.net"] and dns["Proxied"] is True
        assert dns["Routes"] == {"corp.example.": [{"Addr": "192.0.2.53"}]}
        assert dns["Resolvers"] == [{"Addr": "192.0.2.1"}]
        assert dns["ExtraRecords"] == [{"Name": "printer.mesh.internal", "Type": "A", "Value": "100.64.9.9"}]

        nodes = json.loads(remote("nodes", "list", "-o", "json").stdout)
        assert [(n["name"], n["online"]) for n in nodes] == [("alpha", True), ("beta", True)]
        shown = json.loads(remote("nodes", "show", "alpha").stdout)
        assert shown["node_key"] == a.node_key and shown["hostinfo"]["Hostname"] == "alpha"
        netmap = json.loads(remote("netmap", "alpha").stdout)
        assert netmap["Node"]["Name"] == "alpha.mesh.internal." and [p["Name"] for p in netmap["Peers"]] == \
            ["beta.mesh.internal."]
        assert remote("routes", "list", "-o", "json").returncode == 0
        policy_file = state.parent / "policy.hujson"
        policy_file.write_text('{"acls": [{"action": "accept", "src": ["dana@"], "dst": ["*:*"]}]} // ok')
        assert "policy is valid" in remote("policy", "check", str(policy_file)).stdout
        assert remote("policy", "set", str(policy_file)).returncode == 0
        assert "dana@" in remote("policy", "get").stdout
        policy_file.write_text('{"acls": [{"action": "accept", "src": ["group:nobody"], "dst": ["*:*"]}]}')
        refused = remote("policy", "set", str(policy_file))
        assert refused.returncode == 1 and "group:nobody" in refused.stderr
        assert "dana@" in remote("policy", "get").stdout                 # the old policy stays

        # A wrong key gets 401 and changes nothing.
        before = meshproc.cli("users", "list", "-o", "json", state=state, check=True).stdout
        bad = remote("users", "create", "mallory", key="msapi-" + "0" * 48)
        assert bad.returncode == 1 and "401" in bad.stderr
        assert meshproc.cli("users", "list", "-o", "json", state=state, check=True).stdout == before
        raw = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", f"{url}/api/v1/users"],
                             capture_output=True, text=True) if os.path.exists("/usr/bin/curl") else None
        if raw is not None:
            assert raw.stdout == "401"

        # The hosts file lists every node and follows renames and deletions.
        hosts = state / "hosts"
        assert "alpha.mesh.internal" in hosts.read_text() and "beta.mesh.internal" in hosts.read_text()
        assert remote("nodes", "rename", "beta", "gamma").returncode == 0
        deadline = time.monotonic() + 2
        while "gamma.mesh.internal" not in hosts.read_text():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert "beta.mesh" not in hosts.read_text()
        assert remote("nodes", "delete", "gamma").returncode == 0
        deadline = time.monotonic() + 2
        while "gamma" in hosts.read_text():
            assert time.monotonic() < deadline
            time.sleep(0.05)

        # Metrics parse as Prometheus text and move as clients act.
        def metrics():
            _, body = loop.run_until_complete(tsclient.http_get("127.0.0.1", port, "/metrics"))
            return {s.name: s.value for f in text_string_to_metric_families(body.decode()) for s in f.samples
                    if not s.labels}
        first_metrics = metrics()
        assert first_metrics["meshbox_nodes"] == 1 and first_metrics["meshbox_registrations_total"] == 2
        updates = first_metrics["meshbox_map_updates_sent_total"]
        loop.run_until_complete(join(port, key, "delta"))
        later = metrics()
        assert later["meshbox_registrations_total"] == 3 and later["meshbox_map_updates_sent_total"] > updates
        assert later["meshbox_api_refused_total"] >= 1
        status, body = loop.run_until_complete(tsclient.http_get("127.0.0.1", port, "/health"))
        assert status == 200 and json.loads(body)["status"] == "ok"

        # Logs: the running server's recent events, as JSON lines.
        lines = remote("logs", "--lines", "50").stdout.splitlines()
        events = [json.loads(line) for line in lines]
        assert any("registered node" in e["message"] for e in events)
        assert all({"time", "level", "message"} <= set(e) for e in events)
        assert json.loads(log_path.read_text().splitlines()[0])["level"] == "info"
    finally:
        loop.run_until_complete(a.close())
        loop.run_until_complete(b.close())
        loop.close()


def test_config_errors_are_clear(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"listen": "127.0.0.1:1", "nonsense": 1}')
    result = meshproc.cli("--config", str(bad), "serve", state=tmp_path)
    assert result.returncode != 0 and "unknown setting(s)" in result.stderr and "nonsense" in result.stderr
    env = dict(os.environ, MESHBOX_SPLIT_DNS="{not json")
    result = meshproc.cli("serve", state=tmp_path, env=env)
    assert result.returncode != 0 and "split_dns is not valid JSON" in result.stderr
    result = meshproc.cli("netmap", "1", state=tmp_path)
    assert result.returncode == 1 and "needs the running server" in result.stderr
