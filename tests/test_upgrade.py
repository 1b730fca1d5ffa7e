"""Upgrading: a state folder today's release made opens with this meshbox, all of it intact.

The fixture tests/fixtures/state-release-48b398d/ is the state folder (one
SQLite file) that meshbox.py at commit 48b398d made, with
tests/fixtures/make_state_release.py; expected.json beside it is what that
release's own CLI listed for it, and the secrets it showed once.  Each test
works on a copy in tmp_path, never on the fixture.

The schema-version tests are for the migrations run at start (PRAGMA
user_version, a backup before migrating, refusing a newer state); they skip on
a meshbox without SCHEMA_VERSION.
"""

import asyncio
import importlib.util
import json
import os
import shutil
import sqlite3
import urllib.parse
import urllib.request

import pytest

import meshbox
import meshproc
import tsclient

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURE = os.path.join(HERE, "fixtures", "state-release-48b398d")
FIXTURE_DB = os.path.join(FIXTURE, "meshbox.db")
with open(os.path.join(FIXTURE, "expected.json"), encoding="utf-8") as _f:
    EXPECTED = json.load(_f)
SECRETS = EXPECTED["secrets"]
SECTIONS = ("users", "preauthkeys", "nodes", "routes", "devices", "policy", "dns", "apikeys", "oauthclients")

needs_schema_version = pytest.mark.skipif(not hasattr(meshbox, "SCHEMA_VERSION"),
                                          reason="schema versions not in this meshbox yet")


def _load_maker():
    """tests/fixtures/make_state_release.py, for the one projection of the CLI's listings both sides use."""
    spec = importlib.util.spec_from_file_location("make_state_release",
                                                  os.path.join(HERE, "fixtures", "make_state_release.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


maker = _load_maker()


class CurrentCli:
    """This meshbox's CLI on one state folder, shaped as the fixture script's Release."""

    def __init__(self, state_dir):
        self.state_dir = str(state_dir)

    def run(self, *args, check=True):
        return meshproc.cli(*args, state=self.state_dir, check=check)

    def json(self, *args):
        return json.loads(self.run(*args, "-o", "json").stdout)


def upgraded_copy(tmp_path, name="state"):
    """A copy of the fixture folder (the database alone) to upgrade."""
    state = tmp_path / name
    state.mkdir(mode=0o700)
    shutil.copyfile(FIXTURE_DB, state / "meshbox.db")
    return state


def listings(state):
    """What this meshbox lists for the folder, in expected.json's shape (stable fields only)."""
    return maker.stable_listings(CurrentCli(state))


def assert_same_as_release(found):
    for section in SECTIONS:
        assert found[section] == EXPECTED[section], f"{section} differ after the upgrade"


def read_only(path):
    """A sqlite3 connection to the committed fixture that neither writes nor leaves
    -wal/-shm beside it (mode=ro would): immutable, which its checkpointed WAL allows."""
    return sqlite3.connect(f"file:{path}?immutable=1", uri=True)


def reader(path):
    """A plain connection to a copy: it sees what is still in a WAL and cleans up on close."""
    return sqlite3.connect(path)


def user_version(path):
    db = read_only(path) if str(path).startswith(FIXTURE) else reader(path)
    try:
        return db.execute("PRAGMA user_version").fetchone()[0]
    finally:
        db.close()


def backups(state):
    return sorted(name for name in os.listdir(state) if name.endswith(".bak"))


# ---- The fixture is what the release left ----

def test_the_fixture_is_the_release_state_folder():
    assert sorted(os.listdir(FIXTURE)) == ["expected.json", "meshbox.db"]       # no -wal/-shm: all checkpointed
    assert os.path.getsize(FIXTURE_DB) < 200_000
    assert user_version(FIXTURE_DB) == 0                                        # the release never set it
    db = read_only(FIXTURE_DB)
    try:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        counts = {t: db.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
                  for t in ("users", "preauth_keys", "nodes", "devices", "api_keys", "oauth_clients")}
    finally:
        db.close()
    assert counts == {"users": len(EXPECTED["users"]), "preauth_keys": len(EXPECTED["preauthkeys"]),
                      "nodes": len(EXPECTED["nodes"]), "devices": len(EXPECTED["devices"]),
                      "api_keys": len(EXPECTED["apikeys"]), "oauth_clients": len(EXPECTED["oauthclients"])}
    # What the fixture was made to hold (make_state_release.py's docstring).
    assert [u["name"] for u in EXPECTED["users"]] == ["alice", "bob.smith", "carol@example.com", "meshbox"]
    keys = EXPECTED["preauthkeys"]
    assert [(k["reusable"], k["ephemeral"], k["tags"], k["used"], k["valid"]) for k in keys] == [
        (True, False, [], 1, True), (False, False, [], 1, False), (False, False, [], 0, False),
        (True, False, ["tag:server"], 1, True), (True, True, [], 0, True), (False, False, [], 1, False)]
    nodes = {n["name"]: n for n in EXPECTED["nodes"]}
    assert set(nodes) == {"laptop", "router", "db-server", "carols-phone", "box"}
    assert nodes["carols-phone"]["hostname"] == "phone" and nodes["laptop"]["expiry"] is None
    assert nodes["router"]["approved_routes"] == ["192.0.2.0/24"]
    assert set(nodes["router"]["advertised_routes"]) == {"192.0.2.0/24", "0.0.0.0/0", "::/0"}
    assert nodes["db-server"]["tags"] == ["tag:server"] and nodes["box"]["kind"] == "gateway"
    assert [(d["name"], d["full_tunnel"]) for d in EXPECTED["devices"]] == [("printer", False), ("roadwarrior", True)]
    for section in ("groups", "tagOwners", "acls", "autoApprovers", "ssh"):
        assert f'"{section}"' in EXPECTED["policy"]


# ---- Everything is found, the same, with this meshbox ----

def test_this_meshbox_finds_everything_the_release_stored(tmp_path):
    state = upgraded_copy(tmp_path)
    assert_same_as_release(listings(state))
    # A second open finds the same: the first wrote nothing that loses data.
    assert_same_as_release(listings(state))


def test_serving_the_upgraded_folder_keeps_everything(tmp_path):
    state = upgraded_copy(tmp_path)
    with meshproc.MeshboxProcess(state, log_path=str(tmp_path / "serve.log")):
        pass
    assert_same_as_release(listings(state))
    with meshproc.MeshboxProcess(state, log_path=str(tmp_path / "serve.log")):        # and once more
        pass
    assert_same_as_release(listings(state))


def test_every_approved_and_advertised_route_is_kept(tmp_path):
    """Said again route by route, so a failure names the route."""
    state = upgraded_copy(tmp_path)
    rows = CurrentCli(state).json("routes", "list")
    found = {(r["node"], r["prefix"]): (r["advertised"], r["approved"], r["auto_approved"]) for r in rows}
    assert found == {("router", "192.0.2.0/24"): (True, True, False),
                     ("router", "0.0.0.0/0"): (True, False, False),
                     ("router", "::/0"): (True, False, False),
                     ("db-server", "198.51.100.0/24"): (True, True, True)}


def test_the_secrets_the_release_handed_out_still_work(tmp_path):
    state = upgraded_copy(tmp_path)
    nodes = {n["name"]: n for n in EXPECTED["nodes"]}
    with meshproc.MeshboxProcess(state, log_path=str(tmp_path / "serve.log")) as server:
        url = f"http://127.0.0.1:{server.port}"

        async def main():
            # The server's own Noise key is the one the release made.
            assert meshbox.key_text("mkey", await tsclient.fetch_server_key("127.0.0.1", server.port)) == \
                SECRETS["server_noise_public"]
            # A node comes back with its keys, without logging in again, and sees its peers as they were.
            keys = SECRETS["nodes"]["laptop"]
            laptop = tsclient.ControlClient("127.0.0.1", server.port, "laptop")
            laptop.machine_private = bytes.fromhex(keys["machine_private"])
            laptop.node_private = bytes.fromhex(keys["node_private"])
            laptop.disco_private = bytes.fromhex(keys["disco_private"])
            await laptop.connect()
            try:
                laptop.open_map()
                first = await laptop.next_map_message(timeout=20)
            finally:
                await laptop.close()
            assert first["Node"]["Key"] == nodes["laptop"]["node_key"]
            assert f'{nodes["laptop"]["ipv4"]}/32' in first["Node"]["Addresses"]
            peers = {p["Key"]: p for p in first.get("Peers", [])}
            # (Peers whose key never expires: router's and the phone's expire in 2027, and then leave maps.)
            for name in ("db-server", "box"):
                assert nodes[name]["expiry"] is None
                assert nodes[name]["node_key"] in peers, f"{name} is not the laptop's peer after the upgrade"
                assert f'{nodes[name]["ipv4"]}/32' in peers[nodes[name]["node_key"]]["Addresses"]
            # The reusable pre-auth key still lets a new device in, at an address nobody holds.
            newcomer = tsclient.ControlClient("127.0.0.1", server.port, "newcomer")
            try:
                first = await newcomer.join(SECRETS["preauth_reusable"], timeout=20)
            finally:
                await newcomer.close()
            taken = {f'{n["ipv4"]}/32' for n in EXPECTED["nodes"]} | {f'{d["ipv4"]}/32' for d in EXPECTED["devices"]}
            assert not set(first["Node"]["Addresses"]) & taken
        asyncio.run(main())

        # The API key administers the server remotely.
        remote = meshproc.cli("--remote", url, "--api-key", SECRETS["api_key"], "users", "list", "-o", "json")
        assert remote.returncode == 0, remote.stderr
        assert json.loads(remote.stdout) == EXPECTED["users"]
        wrong = meshproc.cli("--remote", url, "--api-key", SECRETS["api_key"][:-4] + "0000", "users", "list")
        assert wrong.returncode != 0

        # The OAuth client gets a token, which reads the DNS settings the release stored.
        form = urllib.parse.urlencode({"client_id": SECRETS["oauth_client_id"],
                                       "client_secret": SECRETS["oauth_client_secret"]}).encode()
        with urllib.request.urlopen(f"{url}/api/v2/oauth/token", data=form, timeout=10) as answer:
            token = json.load(answer)["access_token"]
        request = urllib.request.Request(f"{url}/api/v2/tailnet/-/dns/nameservers",
                                         headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(request, timeout=10) as answer:
            assert json.load(answer)["dns"] == EXPECTED["dns"]["nameservers"]


# ---- Schema versions and migrations ----

@needs_schema_version
def test_opening_sets_the_schema_version(tmp_path):
    version = meshbox.SCHEMA_VERSION
    assert isinstance(version, int) and not isinstance(version, bool) and version >= 1
    state = upgraded_copy(tmp_path)
    CurrentCli(state).run("users", "list")
    assert user_version(state / "meshbox.db") == version
    CurrentCli(state).run("users", "list")                   # a second open: still, and the data as it was
    assert user_version(state / "meshbox.db") == version
    assert_same_as_release(listings(state))


@needs_schema_version
def test_migrating_leaves_a_backup_of_the_original(tmp_path):
    state = upgraded_copy(tmp_path)
    CurrentCli(state).run("users", "list")
    assert backups(state) == ["meshbox.db.v0.bak"]           # today's release never set user_version
    backup = state / "meshbox.db.v0.bak"
    assert user_version(backup) == 0
    db = reader(backup)
    try:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        found = [(r[0], r[1], r[2], "nodekey:" + bytes(r[3]).hex()) for r in db.execute(
            "SELECT id, given_name, ipv4, node_key FROM nodes ORDER BY id")]
    finally:
        db.close()
    assert found == [(n["id"], n["name"], n["ipv4"], n["node_key"]) for n in EXPECTED["nodes"]]
    # Opening the migrated folder again makes no further backup.
    CurrentCli(state).run("users", "list")
    assert backups(state) == ["meshbox.db.v0.bak"]


@needs_schema_version
def test_a_state_newer_than_this_meshbox_is_refused_untouched(tmp_path):
    state = upgraded_copy(tmp_path)
    newer = meshbox.SCHEMA_VERSION + 1
    db = sqlite3.connect(state / "meshbox.db")
    db.execute(f"PRAGMA user_version={newer}")
    db.close()
    assert sorted(os.listdir(state)) == ["meshbox.db"]
    with open(state / "meshbox.db", "rb") as f:
        before = f.read()
    with pytest.raises(meshbox.StoreError) as refused:
        meshbox.open_state(str(state))
    message = str(refused.value)
    assert str(newer) in message and "older" in message.lower(), message
    result = CurrentCli(state).run("users", "list", check=False)            # the CLI says so too
    assert result.returncode != 0 and str(newer) in result.stderr and "older" in result.stderr.lower(), result.stderr
    with open(state / "meshbox.db", "rb") as f:
        assert f.read() == before
    assert backups(state) == []
    assert user_version(state / "meshbox.db") == newer


@needs_schema_version
def test_a_fresh_state_folder_starts_at_the_schema_version(tmp_path):
    state = tmp_path / "fresh"
    CurrentCli(state).run("users", "create", "alice")
    assert user_version(state / "meshbox.db") == meshbox.SCHEMA_VERSION
    assert backups(state) == []
    assert [u["name"] for u in CurrentCli(state).json("users", "list")] == ["alice"]
