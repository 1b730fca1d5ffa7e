"""Hardening of the local edges: the state folder's permissions, the admin
socket's size bound, JSON nested too deep, --remote in clear text, and the
names the hosts file publishes to the LAN's resolver."""

import asyncio
import json
import os
import socket
import stat
import time
import types

import pytest

import meshbox
import meshproc
import tsclient
from meshproc import MeshboxProcess, auth_key, free_port

DEEP = 100_000          # far past Python's recursion limit, well under a request body's bound


def mode_of(path):
    return stat.S_IMODE(os.lstat(path).st_mode)


def wait_for(predicate, seconds=10):
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline
        time.sleep(0.05)


def deep_array(depth=DEEP):
    return "[" * depth + "]" * depth


# -- the hosts file --

def test_hosts_file_publishes_only_full_names():
    nodes = [types.SimpleNamespace(id=i, given_name=name, ipv4=f"100.64.0.{i}", ipv6=f"fd7a:115c:a1e0::{i}")
             for i, name in enumerate(("wpad", "router", "localhost"), 1)]
    devices = [{"name": "printer", "ipv4": "100.64.0.9", "ipv6": "fd7a:115c:a1e0::9"}]
    lines = meshbox.hosts_file_text(nodes, devices, "mesh.internal").splitlines()
    assert lines[0].startswith("#")
    entries = [line.split("\t") for line in lines[1:]]
    assert entries == [[address, f"{name}.mesh.internal"]
                       for name, n in (("wpad", 1), ("router", 2), ("localhost", 3), ("printer", 9))
                       for address in (f"100.64.0.{n}", f"fd7a:115c:a1e0::{n}")]


# -- --remote --

def test_remote_in_clear_text_is_refused_off_loopback(monkeypatch, capsys):
    dialled = []

    def create_connection(address, *args, **kwargs):
        dialled.append(address)
        raise ConnectionRefusedError(111, "Connection refused")
    monkeypatch.setattr(meshbox.socket, "create_connection", create_connection)
    monkeypatch.setattr(meshbox, "setup_logging", lambda config, serving: None)   # pytest's logging stays
    monkeypatch.delenv("MESHBOX_REMOTE", raising=False)

    def run(*args):
        return meshbox.main(["--api-key", "msapi-" + "0" * 48, *args, "users", "list"])

    for url in ("http://192.0.2.1:8080", "http://router.example:8080", "http://[2001:db8::1]:8080"):
        assert run("--remote", url) == 1
        refusal = capsys.readouterr().err
        assert "in clear text" in refusal and "https://" in refusal and "--insecure-remote" in refusal, refusal
    assert run("--remote", "ftp://192.0.2.1") == 1 and "http:// or https://" in capsys.readouterr().err
    assert dialled == []           # the key never left the machine

    # Loopback and the tailnet (WireGuard encrypts it) are fine, and so is an explicit choice.
    for args in (["--remote", "http://127.0.0.1:9"], ["--remote", "http://localhost:9"],
                 ["--remote", "http://[::1]:9"], ["--remote", "http://100.64.0.1:9"],
                 ["--remote", "http://192.0.2.1:9", "--insecure-remote"]):
        assert run(*args) == 1 and "Connection refused" in capsys.readouterr().err
    assert [port for _, port in dialled] == [9] * 5


# -- JSON nested too deep --

def test_json_nesting_is_bounded():
    deepest = deep_array(meshbox.MAX_JSON_DEPTH)
    assert meshbox.parse_json(deepest) == json.loads(deepest)
    assert meshbox.parse_json(deepest.encode()) == json.loads(deepest)
    assert meshbox.parse_json(b'{"a": "' + b"[" * 100 + b'", "b": [1, {"c": null}]}') == \
        {"a": "[" * 100, "b": [1, {"c": None}]}
    for text in (deep_array(meshbox.MAX_JSON_DEPTH + 1), deep_array(), '{"a":' * DEEP + "1" + "}" * DEEP,
                 ('{"a": [1, "x", {"b": ' * 40 + "null" + "}]}" * 40).encode()):
        with pytest.raises(ValueError, match="nested deeper than"):
            meshbox.parse_json(text)
    with pytest.raises(ValueError):
        meshbox.parse_json(b"{not json")


def test_nested_policy_is_a_policy_error(tmp_path):
    for text in (deep_array(), '{"acls": [], "grants": [{"src": ["*"], "dst": ["*"], "app": {"example.com/cap": '
                 + deep_array(meshbox.MAX_JSON_DEPTH) + "}}]}"):
        with pytest.raises(meshbox.PolicyError, match="nested deeper than"):
            meshbox.parse_hujson(text)
    policy = tmp_path / "policy.hujson"
    policy.write_text(deep_array())
    result = meshproc.cli("policy", "check", str(policy), state=tmp_path / "state")
    assert result.returncode == 1 and "nested deeper than" in result.stderr and "Traceback" not in result.stderr


def test_nested_provider_answers_and_client_info_are_refused(monkeypatch):
    async def exchange(context, host, port, request):
        return b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n" + deep_array().encode()
    monkeypatch.setattr(meshbox, "_https_exchange", exchange)
    with pytest.raises(meshbox.OidcError, match="not JSON"):
        asyncio.run(meshbox.https_json(None, "https://id.example.com/.well-known/openid-configuration"))
    part = meshbox.base64.urlsafe_b64encode(deep_array().encode()).rstrip(b"=").decode()
    with pytest.raises(meshbox.OidcError, match="not a JWT"):
        meshbox.id_token_claims(f"eyJhbGciOiJSUzI1NiJ9.{part}.c2lnbmF0dXJl")
    server, client = meshbox.new_private_key(), meshbox.new_private_key()
    nonce = os.urandom(meshbox.DERP_NONCE_LEN)
    sealed = meshbox.box_seal(client, meshbox.x25519_public(server), nonce, deep_array(10_000).encode())
    with pytest.raises(meshbox.DerpError, match="not JSON"):
        meshbox.open_client_info(server, meshbox.x25519_public(client) + nonce + sealed)


@pytest.fixture
def server(tmp_path):
    with MeshboxProcess(tmp_path / "state", log_path=tmp_path / "serve.log") as proc:
        yield proc


async def http_request(port, method, path, body=b"", headers=(), timeout=10):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        head = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close",
                f"Content-Length: {len(body)}", *headers]
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + body)
        data = await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()
    head, _, payload = data.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), payload


def test_nested_bodies_get_an_error_and_the_server_serves_on(server, tmp_path):
    key = auth_key(server.state_dir)
    api_key = meshproc.cli("apikeys", "create", state=server.state_dir).stdout.strip().splitlines()[-1]
    policy = tmp_path / "policy.hujson"
    policy.write_text(deep_array())
    for verb in ("check", "set"):
        refused = meshproc.cli("policy", verb, str(policy), state=server.state_dir)      # inside the server
        assert refused.returncode == 1 and "nested deeper than" in refused.stderr, refused.stderr

    async def main():
        bearer = [f"Authorization: Bearer {api_key}", "Content-Type: application/json"]
        status, answer = await http_request(server.port, "POST", "/api/v1/users/list", deep_array().encode(), bearer)
        assert status == 400 and "nested deeper than" in json.loads(answer)["error"]
        status, answer = await http_request(server.port, "POST", "/api/v1/users/list", b"{}", bearer)
        assert status == 200 and [u["name"] for u in json.loads(answer)["result"]] == ["alice"]

        client = tsclient.ControlClient("127.0.0.1", server.port, "nested")
        await client.connect()
        try:
            for path, request in (("/machine/register", client.register_request(key)),
                                  ("/machine/map", client.map_request(stream=False))):
                body = json.dumps({**request, "Hostinfo": None}).encode().replace(b'"Hostinfo": null',
                                                                                  b'"Hostinfo": ' + deep_array().encode())
                status, answer = await client.request(path, body, timeout=5)
                assert status == 400 and b"nested deeper than" in answer, (status, answer[:200])
            assert (await client.register(key))["MachineAuthorized"]      # the same connection serves on
        finally:
            await client.close()

        # The admin socket answers a nested request with an error, too.
        reader, writer = await asyncio.open_unix_connection(os.path.join(server.state_dir, "admin.sock"))
        writer.write(deep_array(10_000).encode() + b"\n")
        answer = json.loads(await asyncio.wait_for(reader.readline(), 10))
        writer.close()
        assert "nested deeper than" in answer["error"]
    asyncio.run(main())
    assert "Traceback" not in server.log_text() and "RecursionError" not in server.log_text()


# -- the admin socket --

def large_policy(hosts):
    """A valid policy of about 25 bytes per host."""
    names = {f"host-{i}": f"100.100.{i // 250}.{i % 250 + 1}" for i in range(hosts)}
    return json.dumps({"hosts": names, "acls": [{"action": "accept", "src": ["*"], "dst": ["host-0:22"]}]},
                      indent=1)


def test_a_large_policy_goes_through_the_running_server(server, tmp_path):
    policy = tmp_path / "policy.hujson"
    policy.write_text(large_policy(3500))
    assert 100_000 < policy.stat().st_size < meshbox.MAX_REQUEST_BODY
    checked = meshproc.cli("policy", "check", str(policy), state=server.state_dir)
    assert checked.returncode == 0 and "policy is valid" in checked.stdout, checked.stderr
    assert meshproc.cli("policy", "set", str(policy), state=server.state_dir).returncode == 0
    got = meshproc.cli("policy", "get", state=server.state_dir)
    assert json.loads(got.stdout) == json.loads(policy.read_text())

    # Beyond the bound: a clear error from the CLI, before anything is sent.
    policy.write_text(large_policy(50_000))
    refused = meshproc.cli("policy", "set", str(policy), state=server.state_dir)
    assert refused.returncode == 1 and "larger than" in refused.stderr and "MiB" in refused.stderr, refused.stderr
    assert json.loads(meshproc.cli("policy", "get", state=server.state_dir).stdout) == json.loads(large_policy(3500))

    # And from the server, for a client that sends more anyway.
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(os.path.join(server.state_dir, "admin.sock"))
        line = json.dumps({"noun": "policy", "verb": "check", "params": {"policy": large_policy(50_000)}})
        try:
            s.sendall(line.encode() + b"\n")
        except (BrokenPipeError, ConnectionResetError):
            pass                   # the server answered and closed before reading it all
        answer = json.loads(s.makefile("rb").readline())
    assert "larger than" in answer["error"]


# -- the state folder --

def state_modes(state):
    """Mode of the folder and of every file meshbox keeps in it (the admin socket aside: 0600 since its start)."""
    return mode_of(state), {name: mode_of(os.path.join(state, name)) for name in os.listdir(state)
                            if name != "admin.sock"}


def open_to_others(state):
    """A state folder as an older meshbox left it: everything readable by everyone."""
    os.chmod(state, 0o755)
    for name in os.listdir(state):
        os.chmod(os.path.join(state, name), 0o644)


def test_the_cli_keeps_the_state_folder_private(tmp_path):
    state = str(tmp_path / "state")
    old_umask = os.umask(0o022)
    try:
        assert meshproc.cli("users", "create", "alice", state=state).returncode == 0
        folder, files = state_modes(state)
        assert folder == 0o700 and "meshbox.db" in files and set(files.values()) == {0o600}, (oct(folder), files)

        # A folder left open by an older version is tightened, with a word in the log.
        open_to_others(state)
        result = meshproc.cli("users", "list", state=state)
        assert result.returncode == 0 and "alice" in result.stdout
        folder, files = state_modes(state)
        assert folder == 0o700 and set(files.values()) == {0o600}, (oct(folder), files)
        assert "tightened" in result.stderr and state in result.stderr
    finally:
        os.umask(old_umask)


def test_serve_keeps_the_state_folder_private(tmp_path):
    state = str(tmp_path / "state")
    auth_key(state)
    open_to_others(state)
    resolver = tmp_path / "resolver"
    resolver.mkdir()
    old_umask = os.umask(0o022)
    try:
        proc = MeshboxProcess(state, derp_port=free_port(), log_path=str(tmp_path / "serve.log"))
        proc.start()
    finally:
        os.umask(old_umask)
    try:
        key = auth_key(state)

        async def join():
            client = tsclient.ControlClient("127.0.0.1", proc.port, "alpha")
            await client.join(key)
            await client.close()
        asyncio.run(join())
        wait_for(lambda: os.path.exists(os.path.join(state, "hosts")))
        folder, files = state_modes(state)
        assert {"meshbox.db", "meshbox.db-wal", "meshbox.db-shm", "derp-cert.pem", "derp-key.pem", "hosts"} <= \
            set(files), files
        assert folder == 0o700 and set(files.values()) == {0o600}, (oct(folder), files)
        assert "tightened" in proc.log_text()
    finally:
        proc.stop()

    # A hosts file outside the state folder is for the LAN's resolver, which runs as its own user.
    with MeshboxProcess(state, log_path=str(tmp_path / "serve.log"),
                        extra_args=["--hosts-file", str(resolver / "meshbox")]):
        wait_for(lambda: (resolver / "meshbox").exists())
        assert mode_of(resolver / "meshbox") == 0o644 and os.listdir(resolver) == ["meshbox"]
