"""The Admin section of meshbox.py: every administrative verb, in process.

Most verbs run on a state folder alone (meshbox.Admin(store, config)), the
way the CLI runs them when no server is up; those that need the running
server (pending logins, SSH checks, netmap, paths, logs, a live status) run
with an in-process meshbox.Server and tests/tsclient.py nodes.  Each verb is
called through Admin.call(noun, verb, params), as the CLI, the admin socket
and the API call it, and its result is checked; user errors are ValueErrors
that say what is wrong.

Coverage: test_every_admin_verb_is_exercised_here reads this file for the
Admin.call(NOUN, VERB, ...) calls it makes (quoted names) and compares them with the Admin methods
named ``<noun>_<verb>`` (or ``<noun>``) for each noun in meshbox.ADMIN_NOUNS,
so a new verb without a test here fails.

    users         list create delete
    preauthkeys   list create expire
    nodes         list show delete expire expiry tag rename pending register
    ssh           checks approve deny
    routes        list approve unapprove
    devices       list add remove
    policy        get check set clear compile
    dns           get set
    apikeys       list create expire
    oauthclients  list create expire
    status netmap paths logs
"""

import asyncio
import base64
import inspect
import json
import re

import pytest

import meshbox
import tsclient
from meshproc import new_key, serving

V4, V6 = meshbox.DEFAULT_PREFIX_V4, meshbox.DEFAULT_PREFIX_V6


@pytest.fixture
def admin(tmp_path):
    """An Admin over a fresh state folder, no server: the CLI's offline case."""
    config = meshbox.Config(state_dir=str(tmp_path / "state"))
    store = meshbox.open_state(config.state_dir)
    yield meshbox.Admin(store, config)
    store.db.close()


def add_node(admin, name, user="alice", **fields):
    """A node written straight into the store (as a registration would)."""
    store = admin.store
    try:
        user_id = store.user_named(user).id
    except ValueError:
        user_id = store.create_user(user).id
    i = len(store.nodes()) + 1
    with store.transaction():
        ipv4, ipv6 = store.allocate_addresses(V4, V6)
        values = dict(id=0, machine_key=bytes([i, 1]) * 16, node_key=bytes([i, 2]) * 16, disco_key=b"",
                      user_id=user_id, hostname=name, given_name=name, ipv4=ipv4, ipv6=ipv6, tags=[],
                      ephemeral=False, auth_key_id=None, expiry=meshbox.now() + 3600, created=meshbox.now(),
                      last_seen=meshbox.now(), hostinfo={"Hostname": name, "OS": "linux"}, endpoints=[],
                      approved_routes=[], cap=130)
        values.update(fields)
        node = meshbox.Node(**values)
        store.insert_node(node)
    return node


def add_gateway(admin, endpoints=("203.0.113.1:41641",), routes=("192.168.1.0/24",)):
    coordinator = meshbox.Coordinator(admin.store, meshbox.MapSettings("mesh.internal", {"Regions": {}}, {}))
    public = meshbox.x25519_public(meshbox.new_private_key())
    coordinator.ensure_gateway_node(public, "box", list(routes), list(endpoints))
    return public


# ---- the table: every verb is called in this file ----

def admin_verbs():
    """(noun, verb) of every public Admin verb; verb None for a noun that is a verb itself."""
    verbs = set()
    for name, member in inspect.getmembers(meshbox.Admin, inspect.isfunction):
        if name.startswith("_") or name == "call":
            continue
        noun = next((n for n in meshbox.ADMIN_NOUNS if name == n or name.startswith(n + "_")), None)
        assert noun is not None, f"Admin.{name} is under no noun of ADMIN_NOUNS: Admin.call cannot reach it"
        verbs.add((noun, name[len(noun) + 1:] or None))
    return verbs


def called_here():
    with open(__file__) as f:
        source = f.read()
    return {(noun, verb or None) for noun, verb in re.findall(r'\.call\("(\w+)", (?:"(\w+)"|None)', source)}


def test_every_admin_verb_is_exercised_here():
    verbs = admin_verbs()
    assert len(verbs) >= 38 and ("nodes", "register") in verbs and ("logs", None) in verbs
    missing = sorted(verbs - called_here(), key=str)
    assert not missing, f"Admin verbs without a test in test_admin.py: {missing}"
    assert not called_here() - verbs, "this file calls verbs Admin does not have"
    assert {noun for noun, _ in verbs} == set(meshbox.ADMIN_NOUNS)


# ---- call: dispatch and its errors ----

def test_unknown_commands_and_bad_arguments_are_clear_value_errors(admin):
    for noun, verb in (("users", "frobnicate"), ("widgets", "list"), ("users", None), ("_update_node", None),
                       ("call", None), ("_node", None)):
        with pytest.raises(ValueError, match="unknown command"):
            admin.call(noun, verb, {})
    with pytest.raises(ValueError, match="bad arguments for users create"):
        admin.call("users", "create", {})
    with pytest.raises(ValueError, match="bad arguments for users list"):
        admin.call("users", "list", {"name": "x"})
    with pytest.raises(ValueError, match="bad arguments for status"):
        admin.call("status", None, {"verbose": True})


# ---- users ----

def test_users_list_create_delete(admin):
    assert admin.call("users", "list", {}) == []
    created = admin.call("users", "create", {"name": "alice"})
    assert created["name"] == "alice" and "created user alice" in created["message"]
    admin.call("users", "create", {"name": "bob@example.com"})
    rows = admin.call("users", "list", {})
    assert [r["name"] for r in rows] == ["alice", "bob@example.com"] and rows[0]["id"] == created["id"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", rows[0]["created"])
    with pytest.raises(ValueError, match="already exists"):
        admin.call("users", "create", {"name": "alice"})
    with pytest.raises(ValueError, match="bad user name"):
        admin.call("users", "create", {"name": "has space"})
    add_node(admin, "laptop", user="alice")
    with pytest.raises(ValueError, match="still owns nodes"):
        admin.call("users", "delete", {"name": "alice"})
    assert admin.call("users", "delete", {"name": "bob@example.com"}) == {"message": "deleted user bob@example.com"}
    assert [r["name"] for r in admin.call("users", "list", {})] == ["alice"]
    with pytest.raises(ValueError, match="no user named 'bob@example.com'"):
        admin.call("users", "delete", {"name": "bob@example.com"})


# ---- pre-auth keys ----

def test_preauthkeys_create_list_expire(admin):
    admin.call("users", "create", {"name": "alice"})
    made = admin.call("preauthkeys", "create", {"user": "alice", "reusable": True, "expiration": "2d",
                                                "tags": "tag:web, tag:db"})
    assert made["key"].startswith("mskey-") and made["tags"] == ["tag:web", "tag:db"] and made["reusable"]
    (row,) = admin.call("preauthkeys", "list", {})
    assert row["key"] == made["key"][:14] + "…" and made["key"] not in json.dumps(row)
    assert (row["user"], row["reusable"], row["ephemeral"], row["used"], row["valid"]) == ("alice", True, False, 0,
                                                                                          True)
    assert row["expiration"] == made["expiration"]
    assert admin.call("preauthkeys", "expire", {"key": row["key"]}) == {"message": "pre-auth key expired"}
    assert admin.call("preauthkeys", "list", {})[0]["valid"] is False
    # A single-use key that was used is not valid either.
    single = admin.call("preauthkeys", "create", {"user": "alice"})["key"]
    admin.store.db.execute("UPDATE preauth_keys SET used=1 WHERE hash=?", (meshbox.hash_secret(single),))
    assert [r["valid"] for r in admin.call("preauthkeys", "list", {})] == [False, False]


@pytest.mark.parametrize("params, message", [
    ({"user": "nobody"}, "no user named 'nobody'"),
    ({"user": "alice", "tags": "web"}, "bad tag 'web': tags look like tag:name"),
    ({"user": "alice", "expiration": "soon"}, "bad duration"),
    ({"user": "alice", "expiration": "12"}, "a unit"),
])
def test_preauthkeys_create_refuses_bad_arguments(admin, params, message):
    admin.call("users", "create", {"name": "alice"})
    with pytest.raises(ValueError, match=message):
        admin.call("preauthkeys", "create", params)
    assert admin.call("preauthkeys", "list", {}) == []


def test_preauthkeys_expire_an_unknown_key(admin):
    with pytest.raises(ValueError, match="no such pre-auth key"):
        admin.call("preauthkeys", "expire", {"key": "mskey-00000000…"})


# ---- nodes (offline) ----

def test_nodes_list_and_show(admin):
    laptop = add_node(admin, "laptop", endpoints=["192.0.2.1:41641"], disco_key=bytes([9]) * 32,
                      hostinfo={"Hostname": "laptop", "OS": "macOS", "RoutableIPs": ["10.0.0.0/24"]})
    add_node(admin, "phone", user="bob", tags=["tag:phone"])
    rows = admin.call("nodes", "list", {})
    assert [(r["id"], r["name"], r["user"], r["ipv4"]) for r in rows] == [
        (laptop.id, "laptop", "alice", "100.64.0.1"), (laptop.id + 1, "phone", "bob", "100.64.0.2")]
    assert rows[0]["os"] == "macOS" and rows[0]["advertised_routes"] == ["10.0.0.0/24"] and not rows[0]["online"]
    assert rows[1]["tags"] == ["tag:phone"] and rows[0]["expired"] is False and rows[0]["kind"] == "client"
    by_id = admin.call("nodes", "show", {"id": str(laptop.id)})
    by_name = admin.call("nodes", "show", {"id": "laptop"})
    assert by_id == by_name
    assert by_id["node_key"] == meshbox.key_text("nodekey", laptop.node_key)
    assert by_id["disco_key"] == meshbox.key_text("discokey", bytes([9]) * 32)
    assert by_id["hostinfo"]["OS"] == "macOS" and by_id["network"]["endpoints_from"][0]["endpoint"] == "192.0.2.1:41641"
    assert admin.call("nodes", "show", {"id": "phone"})["disco_key"] is None
    with pytest.raises(ValueError, match=r"no node 'tablet' \(see: nodes list\)"):
        admin.call("nodes", "show", {"id": "tablet"})


def test_nodes_delete_expire_expiry_tag_rename(admin):
    laptop = add_node(admin, "laptop")
    add_node(admin, "phone")
    assert "expired node" in admin.call("nodes", "expire", {"id": "laptop"})["message"]
    assert admin.call("nodes", "show", {"id": "laptop"})["expired"] is True
    assert "no longer expires" in admin.call("nodes", "expiry", {"switch": "disable", "id": "laptop"})["message"]
    row = admin.call("nodes", "show", {"id": "laptop"})
    assert row["expiry"] is None and row["expired"] is False
    with pytest.raises(ValueError, match="use: nodes expiry disable ID"):
        admin.call("nodes", "expiry", {"switch": "enable", "id": "laptop"})
    assert admin.call("nodes", "tag", {"id": "laptop", "tags": "tag:a,tag:b"})["message"].endswith("tag:a, tag:b")
    assert admin.store.nodes()[0].tags == ["tag:a", "tag:b"]
    assert admin.call("nodes", "tag", {"id": "laptop", "tags": ""})["message"].endswith("tags: none")
    with pytest.raises(ValueError, match="bad tag 'server'"):
        admin.call("nodes", "tag", {"id": "laptop", "tags": "tag:ok,server"})
    assert admin.store.nodes()[0].tags == []
    assert admin.call("nodes", "rename", {"id": "laptop", "name": "work"}) == {
        "message": f"renamed node {laptop.id} to work"}
    with pytest.raises(ValueError, match="bad name 'Work Laptop': use a DNS label such as 'work-laptop'"):
        admin.call("nodes", "rename", {"id": "work", "name": "Work Laptop"})
    with pytest.raises(ValueError, match="name 'phone' is taken by another node"):
        admin.call("nodes", "rename", {"id": "work", "name": "phone"})
    assert admin.call("nodes", "delete", {"id": "work"})["message"] == f"deleted node {laptop.id} work"
    assert [r["name"] for r in admin.call("nodes", "list", {})] == ["phone"]
    with pytest.raises(ValueError, match="no node 'work'"):
        admin.call("nodes", "delete", {"id": "work"})


def test_server_only_verbs_say_the_server_is_not_running(admin):
    admin.call("users", "create", {"name": "alice"})
    assert admin.call("nodes", "pending", {}) == [] and admin.call("ssh", "checks", {}) == []
    with pytest.raises(ValueError, match="serve is not running"):
        admin.call("nodes", "register", {"user": "alice", "key": "abc"})
    with pytest.raises(ValueError, match="no user named 'nobody'"):
        admin.call("nodes", "register", {"user": "nobody", "key": "abc"})
    for verb in ("approve", "deny"):
        with pytest.raises(ValueError, match="serve is not running"):
            admin.call("ssh", verb, {"id": "abc"})
    add_node(admin, "laptop")
    with pytest.raises(ValueError, match="netmap needs the running server"):
        admin.call("netmap", None, {"id": "laptop"})
    with pytest.raises(ValueError, match="paths needs the running server"):
        admin.call("paths", None, {})
    with pytest.raises(ValueError, match="logs needs the running server"):
        admin.call("logs", None, {})
    status = admin.call("status", None, {})
    assert status["server_running"] is False and [r["name"] for r in status["nodes"]] == ["laptop"]
    assert status["derp"] == {} and status["refusals"] == {}


# ---- routes ----

def test_routes_list_approve_unapprove(admin):
    router = add_node(admin, "router", hostinfo={"Hostname": "router", "RoutableIPs": ["10.1.0.0/24", "0.0.0.0/0"]})
    add_node(admin, "laptop")          # primary is as peers see it: a router needs a peer to be one
    assert [(r["prefix"], r["advertised"], r["approved"], r["primary"]) for r in admin.call("routes", "list", {})] == \
        [("0.0.0.0/0", True, False, False), ("10.1.0.0/24", True, False, False)]
    assert admin.call("routes", "approve", {"node": "router", "prefix": "10.1.0.0/24"}) == {
        "message": "approved 10.1.0.0/24 for router"}
    admin.call("routes", "approve", {"node": str(router.id), "prefix": "0.0.0.0/0"})
    rows = {r["prefix"]: r for r in admin.call("routes", "list", {})}
    assert rows["10.1.0.0/24"]["approved"] and rows["10.1.0.0/24"]["primary"] and rows["0.0.0.0/0"]["approved"]
    assert admin.store.nodes()[0].approved_routes == ["10.1.0.0/24", "0.0.0.0/0"]
    assert admin.call("routes", "unapprove", {"node": "router", "prefix": "10.1.0.0/24"})["message"] == \
        "unapproved 10.1.0.0/24 for router"
    assert admin.store.nodes()[0].approved_routes == ["0.0.0.0/0"]
    with pytest.raises(ValueError, match="does not advertise 10.2.0.0/24"):
        admin.call("routes", "approve", {"node": "router", "prefix": "10.2.0.0/24"})
    with pytest.raises(ValueError, match="bad prefix '10.1.0.1/24'"):
        admin.call("routes", "approve", {"node": "router", "prefix": "10.1.0.1/24"})
    with pytest.raises(ValueError, match="10.1.0.0/24 is not approved for router"):
        admin.call("routes", "unapprove", {"node": "router", "prefix": "10.1.0.0/24"})
    with pytest.raises(ValueError, match="no node 'nope'"):
        admin.call("routes", "approve", {"node": "nope", "prefix": "10.1.0.0/24"})
    add_gateway(admin)
    with pytest.raises(ValueError, match="the gateway's routes come from its configuration"):
        admin.call("routes", "unapprove", {"node": "box", "prefix": "192.168.1.0/24"})


# ---- devices ----

def test_devices_add_list_remove(admin):
    with pytest.raises(ValueError, match="no gateway yet"):
        admin.call("devices", "add", {"name": "phone"})
    box_key = add_gateway(admin)
    added = admin.call("devices", "add", {"name": "phone"})
    assert (added["name"], added["ipv4"], added["ipv6"]) == ("phone", "100.64.0.2", "fd7a:115c:a1e0::2")
    config = added["config"]
    assert config.startswith("[Interface]\n") and "\n[Peer]\n" in config
    assert "Address = 100.64.0.2/32, fd7a:115c:a1e0::2/128\n" in config
    assert f"PublicKey = {base64.b64encode(box_key).decode()}\n" in config
    assert "Endpoint = 203.0.113.1:41641\n" in config
    assert f"AllowedIPs = {V4}, {V6}, 192.168.1.0/24\n" in config           # the tailnet and the LAN behind the box
    private = re.search(r"PrivateKey = (\S+)", config).group(1)
    full = admin.call("devices", "add", {"name": "tablet", "full_tunnel": True})
    assert "AllowedIPs = 0.0.0.0/0, ::/0\n" in full["config"]
    rows = admin.call("devices", "list", {})
    assert [(r["name"], r["user"], r["full_tunnel"]) for r in rows] == [("phone", "meshbox", False),
                                                                       ("tablet", "meshbox", True)]
    assert rows[0]["public_key"] == base64.b64encode(
        meshbox.x25519_public(base64.b64decode(private))).decode()      # the key is not stored, its public half is
    assert private not in json.dumps(rows)
    with pytest.raises(ValueError, match="a device named 'phone' exists"):
        admin.call("devices", "add", {"name": "phone"})
    with pytest.raises(ValueError, match="bad device name 'My Phone'"):
        admin.call("devices", "add", {"name": "My Phone"})
    with pytest.raises(ValueError, match="no user named 'zoe'"):
        admin.call("devices", "add", {"name": "watch", "user": "zoe"})
    assert admin.call("devices", "remove", {"name": "phone"}) == {"message": "removed device phone"}
    assert [r["name"] for r in admin.call("devices", "list", {})] == ["tablet"]
    with pytest.raises(ValueError, match="no device named 'phone'"):
        admin.call("devices", "remove", {"name": "phone"})
    # Its address is free again.
    assert admin.call("devices", "add", {"name": "watch"})["ipv4"] == "100.64.0.2"


def test_devices_add_needs_a_reachable_gateway(admin):
    add_gateway(admin, endpoints=())
    with pytest.raises(ValueError, match="no endpoint devices can reach"):
        admin.call("devices", "add", {"name": "phone"})


# ---- policy ----

POLICY = json.dumps({"tagOwners": {"tag:server": ["alice@"]},
                     "acls": [{"action": "accept", "src": ["alice@"], "dst": ["tag:server:22"]}]})


def test_policy_get_check_set_clear(admin):
    add_node(admin, "laptop")
    add_node(admin, "server", tags=["tag:server"])
    assert admin.call("policy", "get", {}) == {"policy": None}
    assert admin.call("policy", "check", {"policy": POLICY}) == {"message": "policy is valid"}
    assert admin.call("policy", "get", {}) == {"policy": None}            # check changes nothing
    assert "policy set" in admin.call("policy", "set", {"policy": POLICY})["message"]
    assert admin.call("policy", "get", {}) == {"policy": POLICY}
    assert "cleared" in admin.call("policy", "clear", {})["message"]
    assert admin.call("policy", "get", {}) == {"policy": None}


@pytest.mark.parametrize("policy, message", [
    ("{not json", "policy refused"),
    (json.dumps({"acls": [{"action": "drop", "src": ["*"], "dst": ["*:*"]}]}), "policy refused"),
    (json.dumps({"acls": [{"action": "accept", "src": ["alice@"], "dst": ["tag:server:22"]}],
                 "tagOwners": {"tag:server": ["alice@"]},
                 "tests": [{"src": "alice@", "deny": ["tag:server:22"]}]}), "policy refused"),
])
def test_policy_check_and_set_refuse_a_bad_policy_and_keep_the_old_one(admin, policy, message):
    add_node(admin, "laptop")
    add_node(admin, "server", tags=["tag:server"])
    admin.call("policy", "set", {"policy": POLICY})
    for verb in ("check", "set"):
        with pytest.raises(ValueError, match=message):
            admin.call("policy", verb, {"policy": policy})
    assert admin.call("policy", "get", {}) == {"policy": POLICY}


def test_policy_compile_shows_each_nodes_view(admin):
    laptop = add_node(admin, "laptop")
    server = add_node(admin, "server", tags=["tag:server"])
    add_node(admin, "other", user="bob")
    topology = meshbox.policy_topology(admin.store.nodes(), {u.id: u for u in admin.store.users()})
    compiled = admin.call("policy", "compile", {"policy": POLICY, "topology": topology})
    assert set(compiled) == {laptop.id, server.id, server.id + 1}
    assert list(compiled[laptop.id]["peers"]) == [server.id]
    assert compiled[server.id + 1]["peers"] == {}
    (rule,) = compiled[server.id]["packet_filter_rules"]
    assert rule["DstPorts"][0]["Ports"] == {"First": 22, "Last": 22}
    with pytest.raises(ValueError, match="policy refused"):
        admin.call("policy", "compile", {"policy": "[]", "topology": topology})


# ---- DNS ----

def test_dns_get_and_set(admin):
    assert admin.call("dns", "get", {}) == {"nameservers": [], "search_domains": [], "split_dns": {},
                                            "magic_dns": True}
    saved = admin.call("dns", "set", {"nameservers": ["192.0.2.53", "2001:db8::53"],
                                      "search_domains": ["Corp.Example."], "split_dns": {"lab.example": ["10.0.0.53"]},
                                      "magic_dns": False})
    expected = {"nameservers": ["192.0.2.53", "2001:db8::53"], "search_domains": ["corp.example"],
                "split_dns": {"lab.example": ["10.0.0.53"]}, "magic_dns": False}
    assert saved == dict(expected, message="DNS settings saved")
    assert admin.call("dns", "get", {}) == expected
    again = meshbox.Admin(meshbox.open_state(admin.config.state_dir), admin.config)     # stored, not in memory
    assert again.call("dns", "get", {}) == expected
    again.store.db.close()
    # None leaves a setting as it is.
    admin.call("dns", "set", {"magic_dns": True})
    assert admin.call("dns", "get", {}) == dict(expected, magic_dns=True)


@pytest.mark.parametrize("params, message", [
    ({"nameservers": ["dns.example"]}, "bad resolver address 'dns.example'"),
    ({"nameservers": "192.0.2.53"}, "nameservers must be a list"),
    ({"search_domains": ["bad domain"]}, "bad domain 'bad domain'"),
    ({"split_dns": ["x"]}, "split DNS must map"),
    ({"split_dns": {"corp.example": ["nope"]}}, "bad resolver address 'nope' in resolvers of corp.example"),
    ({"magic_dns": "yes"}, "magic_dns is true or false"),
])
def test_dns_set_refuses_bad_values_and_saves_nothing(admin, params, message):
    with pytest.raises(ValueError, match=message):
        admin.call("dns", "set", params)
    assert admin.store.setting("dns") is None


# ---- API keys and OAuth clients ----

def test_apikeys_create_list_expire(admin):
    made = admin.call("apikeys", "create", {"expiration": "1d"})
    assert made["key"].startswith(meshbox.API_KEY_PREFIX) and meshbox.api_key_valid(admin.store, made["key"])
    (row,) = admin.call("apikeys", "list", {})
    assert row["prefix"] == made["key"][:14] + "…" and row["valid"] and row["expiration"] == made["expiration"]
    assert made["key"] not in json.dumps(row)
    assert admin.call("apikeys", "expire", {"prefix": row["prefix"]}) == {"message": "API key expired"}
    assert not meshbox.api_key_valid(admin.store, made["key"])
    assert admin.call("apikeys", "list", {})[0]["valid"] is False
    with pytest.raises(ValueError, match="no single API key matches 'msapi-nothing'"):
        admin.call("apikeys", "expire", {"prefix": "msapi-nothing"})
    with pytest.raises(ValueError, match="bad duration"):
        admin.call("apikeys", "create", {"expiration": "forever"})


def test_oauthclients_create_list_expire(admin):
    made = admin.call("oauthclients", "create", {"scopes": "dns:read, devices:core"})
    assert made["scopes"] == ["devices:core", "dns:read"] and made["client_secret"].startswith("msoauth-")
    assert meshbox.oauth_client_scopes(admin.store, made["client_id"], made["client_secret"]) == made["scopes"]
    assert meshbox.oauth_client_scopes(admin.store, made["client_id"], "msoauth-wrong") is None
    (row,) = admin.call("oauthclients", "list", {})
    assert (row["client_id"], row["scopes"], row["valid"]) == (made["client_id"], made["scopes"], True)
    assert made["client_secret"] not in json.dumps(row)
    assert made["client_id"] in admin.call("oauthclients", "expire", {"client_id": made["client_id"]})["message"]
    assert meshbox.oauth_client_scopes(admin.store, made["client_id"]) is None
    assert admin.call("oauthclients", "list", {})[0]["valid"] is False
    with pytest.raises(ValueError, match="no OAuth client 'msoc-none'"):
        admin.call("oauthclients", "expire", {"client_id": "msoc-none"})
    for scopes in ("devices:everything", "", " , "):
        with pytest.raises(ValueError, match="unknown scope"):
            admin.call("oauthclients", "create", {"scopes": scopes})
    assert len(admin.call("oauthclients", "list", {})) == 1


# ---- with the running server ----

SSH_POLICY = json.dumps({"tagOwners": {"tag:server": ["alice@"]},
                         "acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}],
                         "ssh": [{"action": "check", "src": ["alice@"], "dst": ["tag:server"], "users": ["root"]}]})


def test_live_verbs_with_a_running_server(tmp_path):
    """nodes pending/register, ssh checks/approve/deny, netmap, paths, logs and a live status."""
    async def main():
        async with serving(tmp_path, derp=True) as (server, port, _):
            admin = meshbox.Admin(server.store, server.config, server)
            admin.call("users", "create", {"name": "alice"})
            admin.call("policy", "set", {"policy": SSH_POLICY})
            assert server.coordinator.policy_views.policy is not None          # applied at once
            # A login without a key waits; the admin approves it.
            waiting = tsclient.ControlClient("127.0.0.1", port, "waiting-phone")
            await waiting.connect()
            url = (await waiting.register(""))["AuthURL"]
            (pending,) = admin.call("nodes", "pending", {})
            assert pending["key"] == url.rsplit("/", 1)[1] and pending["hostname"] == "waiting-phone"
            follow = asyncio.ensure_future(waiting.register("", timeout=20, Followup=url))
            with pytest.raises(ValueError, match="no login request 'not-a-request'"):
                admin.call("nodes", "register", {"user": "alice", "key": "not-a-request"})
            assert admin.call("nodes", "register", {"user": "alice", "key": pending["key"]}) == {
                "message": "approved: the device joins as alice"}
            assert (await asyncio.wait_for(follow, 10))["MachineAuthorized"]
            assert admin.call("nodes", "pending", {}) == []
            # Two more nodes for SSH checks.
            laptop = tsclient.ControlClient("127.0.0.1", port, "laptop")
            box = tsclient.ControlClient("127.0.0.1", port, "box")
            first = await laptop.join(new_key(server))
            await box.join(new_key(server, tags=["tag:server"]))
            nodes = {r["name"]: r for r in admin.call("nodes", "list", {})}
            assert nodes["laptop"]["online"] and nodes["box"]["online"] and not nodes["waiting-phone"]["online"]
            src, dst = nodes["laptop"]["id"], nodes["box"]["id"]
            coordinator = server.coordinator
            held = coordinator.ssh_checks.action(src, dst, {"local_user": "root"}, meshbox.now())
            assert "ssh approve" in held["message"]
            (check,) = admin.call("ssh", "checks", {})
            assert (check["from"], check["to"], check["user"]) == ("laptop", "box", "root")
            assert admin.call("ssh", "deny", {"id": check["id"]}) == {
                "message": "denied: SSH from laptop to box as root"}
            assert admin.call("ssh", "checks", {}) == []
            coordinator.ssh_checks.action(src, dst, {"local_user": "admin"}, meshbox.now())
            (check,) = admin.call("ssh", "checks", {})
            assert admin.call("ssh", "approve", {"id": check["id"]})["message"].startswith("approved: SSH from laptop")
            assert coordinator.ssh_checks.action(src, dst, {"local_user": "root"}, meshbox.now())["accept"] is True
            with pytest.raises(ValueError, match="no SSH check"):
                admin.call("ssh", "approve", {"id": check["id"]})
            # netmap: what the laptop receives.
            netmap = admin.call("netmap", None, {"id": "laptop"})
            assert netmap["Node"]["Name"] == first["Node"]["Name"] == "laptop.mesh.internal."
            assert sorted(p["Name"] for p in netmap["Peers"]) == ["box.mesh.internal.", "waiting-phone.mesh.internal."]
            assert netmap["SSHPolicy"] == {"rules": []}                    # SSH rules go to the destination
            (rule,) = admin.call("netmap", None, {"id": str(dst)})["SSHPolicy"]["rules"]
            assert "holdAndDelegate" in json.dumps(rule["action"]) and rule["sshUsers"] == {"root": "root"}
            with pytest.raises(ValueError, match="no node 'ghost'"):
                admin.call("netmap", None, {"id": "ghost"})
            # status, paths, logs.
            status = admin.call("status", None, {})
            assert status["server_running"] is True and len(status["nodes"]) == 3
            assert isinstance(status["derp"], dict) and status["derp"]
            assert admin.call("paths", None, {}) == []              # nobody relayed anything
            for digit in "01":                                   # refusals are logged as warnings
                assert "Error" in await waiting.register("mskey-" + digit * 48)
            logs = admin.call("logs", None, {"lines": 500})
            assert sum("registration refused" in line for line in logs) == 2
            assert admin.call("logs", None, {"lines": 1}) == logs[-1:]
            # dns set reaches the running server's maps.
            admin.call("dns", "set", {"nameservers": ["192.0.2.99"]})
            assert coordinator.settings.dns_config["Resolvers"] == [{"Addr": "192.0.2.99"}]
            for client in (waiting, laptop, box):
                await client.close()
    asyncio.run(asyncio.wait_for(main(), 60))
