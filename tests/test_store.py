"""The Store section of meshbox.py: the SQLite state folder.

Its contract: every method commits before it returns (a second Store on the
same file sees the change at once); users, pre-auth keys, nodes and devices
round-trip; a pre-auth key is found by its full secret's hash only, never by
the prefix it is displayed with; address allocation reuses what a deletion
freed; a failed transaction leaves nothing behind; the folder is 0700 and
the database 0600; user errors are ValueErrors that say what to do and disk
errors are StoreErrors.
"""

import json
import os
import sqlite3
import stat

import pytest

import meshbox

V4, V6 = "100.64.0.0/10", "fd7a:115c:a1e0::/48"


@pytest.fixture
def db_path(tmp_path):
    return str(tmp_path / "meshbox.db")


@pytest.fixture
def store(db_path):
    s = meshbox.Store(db_path)
    yield s
    s.db.close()


def reopened(path):
    """A second Store on the same file: what another process (the CLI) would see."""
    return meshbox.Store(path)


def new_node(store, user_id, i, **fields):
    """Insert a node with addresses from the allocator, in its own transaction."""
    with store.transaction():
        ipv4, ipv6 = store.allocate_addresses(V4, V6)
        values = dict(id=0, machine_key=bytes([i, 1]) * 16, node_key=bytes([i, 2]) * 16, disco_key=bytes([i, 3]) * 16,
                      user_id=user_id, hostname=f"host{i}", given_name=f"host{i}", ipv4=ipv4, ipv6=ipv6, tags=[],
                      ephemeral=False, auth_key_id=None, expiry=None, created=1000.0 + i, last_seen=2000.0 + i,
                      hostinfo={"Hostname": f"host{i}", "OS": "linux"}, endpoints=["192.0.2.1:41641"],
                      approved_routes=[], cap=130)
        values.update(fields)
        node = meshbox.Node(**values)
        store.insert_node(node)
    return node


def new_device(store, user_id, name, key_byte):
    with store.transaction():
        ipv4, ipv6 = store.allocate_addresses(V4, V6)
        store.db.execute("INSERT INTO devices(name, user_id, public_key, ipv4, ipv6, full_tunnel, created)"
                         " VALUES(?,?,?,?,?,?,?)", (name, user_id, bytes([key_byte]) * 32, ipv4, ipv6, 0, 1.0))
    return ipv4, ipv6


# ---- every method commits ----

def test_every_write_is_visible_to_a_second_store_at_once(store, db_path):
    other = reopened(db_path)
    try:
        alice = store.create_user("alice")
        assert [u.name for u in other.users()] == ["alice"]
        secret = store.create_preauth_key(alice.id, True, False, None, ["tag:web"])
        assert other.preauth_key(secret)["user_id"] == alice.id
        store.expire_preauth_key(secret)
        assert other.preauth_key(secret)["revoked"] == 1
        store.set_setting("policy", "{}")
        assert other.setting("policy") == "{}"
        store.set_setting("policy", None)
        assert other.setting("policy") is None
        node = new_node(store, alice.id, 1)
        assert [n.id for n in other.nodes()] == [node.id]
        # update_node and delete_node commit even outside a transaction.
        store.update_node(node.id, given_name="renamed", tags=["tag:x"])
        assert (other.nodes()[0].given_name, other.nodes()[0].tags) == ("renamed", ["tag:x"])
        store.delete_node(node.id)
        assert other.nodes() == []
        new_device(store, alice.id, "phone", 9)
        assert [d["name"] for d in other.devices()] == ["phone"]
        assert store.delete_device("phone") is True
        assert other.devices() == []
        store.delete_user("alice")
        assert other.users() == []
    finally:
        other.db.close()


def test_data_version_changes_when_another_connection_commits(store, db_path):
    before = store.data_version()
    other = reopened(db_path)
    try:
        other.create_user("bob")
    finally:
        other.db.close()
    assert store.data_version() != before


def test_a_secret_is_made_once_and_kept(store, db_path):
    made = []

    def make():
        made.append(os.urandom(32))
        return made[-1]

    first = store.secret("noise", make)
    assert store.secret("noise", make) == first and len(made) == 1
    other = reopened(db_path)
    try:
        assert other.secret("noise", lambda: b"never used") == first
    finally:
        other.db.close()
    assert store.secret("another", lambda: b"x" * 32) == b"x" * 32


# ---- users ----

def test_users_round_trip_in_creation_order(store):
    created = [store.create_user(name) for name in ("zed", "alice@example.com", "bob")]
    assert [(u.id, u.name) for u in store.users()] == [(u.id, u.name) for u in created]
    assert store.user_named("bob").id == created[2].id
    assert all(u.created > 0 for u in store.users())


@pytest.mark.parametrize("name", ["", "two words", "tab\there", "x" * 64])
def test_bad_user_names_are_refused(store, name):
    with pytest.raises(ValueError, match="bad user name"):
        store.create_user(name)
    assert store.users() == []


def test_a_user_name_is_unique(store):
    store.create_user("alice")
    with pytest.raises(ValueError, match="user 'alice' already exists"):
        store.create_user("alice")
    assert len(store.users()) == 1


def test_an_unknown_user_names_the_command_that_creates_it(store):
    with pytest.raises(ValueError, match=r"no user named 'ghost' \(create it with: users create ghost\)"):
        store.user_named("ghost")
    with pytest.raises(ValueError, match="no user named 'ghost'"):
        store.delete_user("ghost")


def test_delete_user_is_refused_while_it_owns_nodes(store):
    alice = store.create_user("alice")
    secret = store.create_preauth_key(alice.id, False, False, None, [])
    node = new_node(store, alice.id, 1)
    with pytest.raises(ValueError, match="still owns nodes"):
        store.delete_user("alice")
    assert store.user_named("alice").id == alice.id and store.preauth_key(secret) is not None
    store.delete_node(node.id)
    store.delete_user("alice")
    assert store.users() == []
    assert store.preauth_key(secret) is None         # its keys went with it
    assert store.preauth_keys() == []


# ---- pre-auth keys ----

def test_preauth_keys_round_trip_and_are_stored_hashed(store, db_path):
    alice = store.create_user("alice")
    secret = store.create_preauth_key(alice.id, True, True, 12345.0, ["tag:a", "tag:b"])
    assert secret.startswith(meshbox.PREAUTH_KEY_PREFIX) and len(secret) == len("mskey-") + 48
    row = store.preauth_key(secret)
    assert (row["reusable"], row["ephemeral"], row["expiration"], json.loads(row["tags"])) == \
        (1, 1, 12345.0, ["tag:a", "tag:b"])
    assert row["prefix"] == secret[:14] and row["hash"] == meshbox.hash_secret(secret) != secret
    (listed,) = store.preauth_keys()
    assert listed["user"] == "alice" and listed["id"] == row["id"]
    # The secret itself is nowhere in the file.
    store.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    with open(db_path, "rb") as f:
        assert secret.encode() not in f.read()
    assert store.create_preauth_key(alice.id, False, False, None, []) != secret


def test_a_key_is_found_by_its_secret_never_by_its_prefix(store):
    alice = store.create_user("alice")
    secret = store.create_preauth_key(alice.id, True, False, None, [])
    assert store.preauth_key(secret)["prefix"] == secret[:14]
    for guess in (secret[:14], secret[:14] + "…", secret[:-1], secret + "0", "", secret.upper()):
        assert store.preauth_key(guess) is None, guess


def test_expire_by_secret_or_by_the_displayed_prefix(store):
    alice = store.create_user("alice")
    by_secret, by_prefix, by_shown = (store.create_preauth_key(alice.id, True, False, None, []) for _ in range(3))
    store.expire_preauth_key(by_secret)
    store.expire_preauth_key(by_prefix[:14])
    store.expire_preauth_key(by_shown[:14] + "…")        # as `preauthkeys list` shows it
    assert [store.preauth_key(s)["revoked"] for s in (by_secret, by_prefix, by_shown)] == [1, 1, 1]


def test_expire_refuses_short_prefixes_and_unknown_keys(store):
    alice = store.create_user("alice")
    secret = store.create_preauth_key(alice.id, True, False, None, [])
    for bad in (secret[:9], "mskey-", "mskey-" + "0" * 48, ""):
        with pytest.raises(ValueError, match="no such pre-auth key"):
            store.expire_preauth_key(bad)
    assert store.preauth_key(secret)["revoked"] == 0


def test_expire_refuses_a_prefix_two_keys_share(store):
    alice = store.create_user("alice")
    a = store.create_preauth_key(alice.id, True, False, None, [])
    b = store.create_preauth_key(alice.id, True, False, None, [])
    store.db.execute("UPDATE preauth_keys SET prefix=?", (a[:14],))     # a 32-bit prefix collision
    with pytest.raises(ValueError, match="no such pre-auth key"):
        store.expire_preauth_key(a[:14])
    assert [store.preauth_key(s)["revoked"] for s in (a, b)] == [0, 0]


# ---- nodes ----

def test_a_node_round_trips_every_field(store, db_path):
    alice = store.create_user("alice")
    node = new_node(store, alice.id, 7, tags=["tag:server"], ephemeral=True, expiry=99999.5, auth_key_id=3,
                    hostinfo={"Hostname": "host7", "OS": "linux", "RoutableIPs": ["10.0.0.0/24"]},
                    endpoints=["192.0.2.7:41641", "[2001:db8::7]:41641"], approved_routes=["10.0.0.0/24"],
                    kind=meshbox.NODE_GATEWAY)
    other = reopened(db_path)
    try:
        (loaded,) = other.nodes()
    finally:
        other.db.close()
    assert loaded.id == node.id and loaded.id > 0
    for field in ("machine_key", "node_key", "disco_key", "user_id", "hostname", "given_name", "ipv4", "ipv6",
                  "tags", "ephemeral", "auth_key_id", "expiry", "created", "last_seen", "endpoints",
                  "approved_routes", "cap", "kind"):
        assert getattr(loaded, field) == getattr(node, field), field
    assert loaded.hostinfo["RoutableIPs"] == ["10.0.0.0/24"]
    assert loaded.online is False                      # live state is not stored
    assert loaded.durable_fields() == node.durable_fields()


def test_nodes_stored_by_an_older_version_load_cleaned(store):
    alice = store.create_user("alice")
    node = new_node(store, alice.id, 1)
    store.db.execute("UPDATE nodes SET hostinfo=?, endpoints=?, disco_key=NULL WHERE id=?",
                     ('{"Hostname": ' + "[" * 500 + "]" * 500 + "}", json.dumps(["not an endpoint"]), node.id))
    (loaded,) = store.nodes()
    assert loaded.hostinfo == {} and loaded.endpoints == [] and loaded.disco_key == b""


def test_machine_and_node_keys_are_unique(store):
    alice = store.create_user("alice")
    first = new_node(store, alice.id, 1)
    with pytest.raises(sqlite3.IntegrityError):
        new_node(store, alice.id, 2, machine_key=first.machine_key)
    with pytest.raises(sqlite3.IntegrityError):
        new_node(store, alice.id, 3, node_key=first.node_key)
    assert [n.id for n in store.nodes()] == [first.id]


# ---- addresses ----

def test_addresses_are_handed_out_in_order_and_reused_after_a_delete(store):
    alice = store.create_user("alice")
    nodes = [new_node(store, alice.id, i) for i in range(1, 5)]
    assert [n.ipv4 for n in nodes] == ["100.64.0.1", "100.64.0.2", "100.64.0.3", "100.64.0.4"]
    assert [n.ipv6 for n in nodes] == ["fd7a:115c:a1e0::1", "fd7a:115c:a1e0::2", "fd7a:115c:a1e0::3",
                                       "fd7a:115c:a1e0::4"]
    store.delete_node(nodes[0].id)
    assert new_node(store, alice.id, 5).ipv4 == "100.64.0.1"
    assert new_node(store, alice.id, 6).ipv4 == "100.64.0.5"     # then on from where it was


def test_nodes_and_devices_share_one_address_space(store):
    alice = store.create_user("alice")
    new_node(store, alice.id, 1)
    assert new_device(store, alice.id, "phone", 1) == ("100.64.0.2", "fd7a:115c:a1e0::2")
    assert new_node(store, alice.id, 2).ipv4 == "100.64.0.3"
    assert store.address_taken("100.64.0.2", "fd7a:115c:a1e0::99")
    assert store.address_taken("100.64.0.99", "fd7a:115c:a1e0::2")
    assert not store.address_taken("100.64.0.99", "fd7a:115c:a1e0::99")
    assert store.delete_device("phone") is True
    assert new_node(store, alice.id, 3).ipv4 == "100.64.0.2"     # a removed device's address is reused


def test_devices_round_trip_and_delete_reports_a_missing_one(store):
    alice = store.create_user("alice")
    new_device(store, alice.id, "phone", 4)
    (device,) = store.devices()
    assert (device["name"], device["user"], bytes(device["public_key"]), device["ipv4"]) == \
        ("phone", "alice", bytes([4]) * 32, "100.64.0.1")
    assert store.delete_device("tablet") is False
    assert store.delete_device("phone") is True and store.devices() == []


# ---- transactions ----

def test_an_error_inside_a_transaction_rolls_everything_back(store, db_path):
    alice = store.create_user("alice")

    class Boom(Exception):
        pass

    with pytest.raises(Boom):
        with store.transaction():
            ipv4, ipv6 = store.allocate_addresses(V4, V6)
            store.db.execute("INSERT INTO users(name, created) VALUES('bob', 1)")
            store.update_node(12345, given_name="x")
            store.db.execute("INSERT INTO devices(name, user_id, public_key, ipv4, ipv6, full_tunnel, created)"
                             " VALUES('d', ?, ?, ?, ?, 0, 1)", (alice.id, b"k" * 32, ipv4, ipv6))
            raise Boom()
    assert not store.db.in_transaction
    other = reopened(db_path)
    try:
        assert [u.name for u in other.users()] == ["alice"] and other.devices() == []
    finally:
        other.db.close()
    with store.transaction():                           # the connection is usable again
        store.db.execute("INSERT INTO users(name, created) VALUES('carol', 1)")
    assert [u.name for u in store.users()] == ["alice", "carol"]


def test_a_constraint_error_rolls_back_and_propagates_as_itself(store):
    store.create_user("alice")
    with pytest.raises(sqlite3.IntegrityError):
        with store.transaction():
            store.db.execute("INSERT INTO users(name, created) VALUES('bob', 1)")
            store.db.execute("INSERT INTO users(name, created) VALUES('alice', 1)")
    assert [u.name for u in store.users()] == ["alice"]


def test_a_database_another_writer_holds_is_a_store_error(store, db_path):
    other = reopened(db_path)
    try:
        other.db.execute("BEGIN IMMEDIATE")
        store.db.execute("PRAGMA busy_timeout=0")       # do not wait the 10 s a real store waits
        with pytest.raises(meshbox.StoreError, match="state database unavailable"):
            store.create_user("alice")
        other.db.execute("ROLLBACK")
    finally:
        other.db.close()
    assert store.create_user("alice").name == "alice"


def test_an_operational_error_inside_a_transaction_becomes_a_store_error(store):
    with pytest.raises(meshbox.StoreError, match="could not save state"):
        with store.transaction():
            store.db.execute("INSERT INTO no_such_table VALUES(1)")
    assert not store.db.in_transaction


# ---- files ----

def test_open_state_makes_the_folder_0700_and_the_database_0600(tmp_path):
    state = tmp_path / "state"
    store = meshbox.open_state(str(state))
    try:
        store.create_user("alice")             # -wal and -shm exist now
        assert stat.S_IMODE(os.stat(state).st_mode) == 0o700
        for name in ("meshbox.db", "meshbox.db-wal", "meshbox.db-shm"):
            assert stat.S_IMODE(os.stat(state / name).st_mode) == 0o600, name
    finally:
        store.db.close()


def test_open_state_narrows_a_folder_and_files_left_open_to_others(tmp_path):
    state = tmp_path / "state"
    state.mkdir(mode=0o755)
    os.chmod(state, 0o755)
    (state / "meshbox.db").touch()
    os.chmod(state / "meshbox.db", 0o644)
    store = meshbox.open_state(str(state))
    try:
        assert stat.S_IMODE(os.stat(state).st_mode) == 0o700
        assert stat.S_IMODE(os.stat(state / "meshbox.db").st_mode) == 0o600
        assert store.users() == []
    finally:
        store.db.close()


def test_an_unopenable_database_is_a_store_error(tmp_path):
    with pytest.raises(meshbox.StoreError, match="cannot open state database"):
        meshbox.Store(str(tmp_path / "missing-folder" / "meshbox.db"))
    (tmp_path / "garbage.db").write_bytes(b"this is not a database" * 100)
    with pytest.raises(meshbox.StoreError, match="cannot open state database"):
        meshbox.Store(str(tmp_path / "garbage.db"))
