"""The coordinator over real ts2021 connections (tests/tsclient.py), in-process."""

import asyncio
import base64
import contextlib
import json
import os
import tempfile
import time

import pytest
from hypothesis import given, settings, strategies as st
import zstandard

import meshbox
import meshproc
import tsclient
from meshproc import joined, new_key, running_server, until


def snapshot(state_dir):
    """Everything durable, to show a refused request changed nothing."""
    db = meshbox.Store(os.path.join(str(state_dir), "meshbox.db"))
    return ([(n.id, n.node_key, n.ipv4) for n in db.nodes()], [dict(k) for k in db.preauth_keys()])


def test_two_nodes_see_each_other_and_deltas(tmp_path):
    async def main():
        async with running_server(tmp_path) as (server, port):
            key = new_key(server)
            a, first_a = await joined(port, key, "laptop")
            assert first_a["Node"]["Addresses"] == ["100.64.0.1/32", "fd7a:115c:a1e0::1/128"]
            assert first_a["Peers"] == []
            assert first_a["PacketFilter"][0]["SrcIPs"] == ["*"]
            assert first_a["DNSConfig"]["Domains"] == ["mesh.internal"]
            b, first_b = await joined(port, key, "phone")
            assert [p["Name"] for p in first_b["Peers"]] == ["laptop.mesh.internal."]
            peer = first_b["Peers"][0]
            assert peer["Online"] is True and peer["Endpoints"] == ["192.0.2.10:41641"]
            assert peer["DiscoKey"].startswith("discokey:")
            delta = await a.next_map_message()
            assert [p["Name"] for p in delta["PeersChanged"]] == ["phone.mesh.internal."]
            # An endpoint update from b reaches a within a second.
            status, _ = await b.request("/machine/map", b.map_request(stream=False, OmitPeers=True,
                                                                       endpoints=["198.51.100.7:1234"]))
            assert status == 200
            delta = await a.next_map_message(timeout=1)
            assert delta["PeersChanged"][0]["Endpoints"] == ["198.51.100.7:1234"]
            # b goes away: a sees it offline.
            await b.close()
            delta = await a.next_map_message(timeout=2)
            assert delta["PeersChanged"][0]["Online"] is False
            await a.close()
    asyncio.run(main())


@pytest.mark.parametrize("problem", ["unknown", "expired", "spent", "revoked"])
def test_bad_auth_keys_are_refused_and_change_nothing(tmp_path, problem):
    async def main():
        async with running_server(tmp_path) as (server, port):
            if problem == "unknown":
                key, expect = "mskey-" + "0" * 48, "no such pre-auth key"
            elif problem == "expired":
                key, expect = new_key(server, expiration=meshbox.now() - 5), "expired"
            elif problem == "revoked":
                key, expect = new_key(server), "revoked"
                server.store.expire_preauth_key(key)
            else:
                key, expect = new_key(server, reusable=False), "already used"
                await joined(port, key, "first")
            before = snapshot(tmp_path)
            client = tsclient.ControlClient("127.0.0.1", port, "intruder")
            await client.connect()
            response = await client.register(key)
            assert expect in response["Error"]
            assert not response.get("MachineAuthorized")
            assert snapshot(tmp_path) == before
            # It cannot get a map either.
            status, _ = await client.request("/machine/map", client.map_request(stream=False))
            assert status == 401
            await client.close()
    asyncio.run(main())


def test_restart_keeps_identity_and_addresses(tmp_path):
    async def main():
        async with running_server(tmp_path) as (server, port):
            key = new_key(server)
            a, first = await joined(port, key, "keeper")
            server_key = await tsclient.http_get("127.0.0.1", port, "/key?v=130")
            await a.close()
        async with running_server(tmp_path) as (server, port):
            assert await tsclient.http_get("127.0.0.1", port, "/key?v=130") == server_key
            again = tsclient.ControlClient("127.0.0.1", port, "keeper")
            again.machine_private, again.node_private = a.machine_private, a.node_private
            await again.connect()
            response = await again.register("")       # known machine, no key needed
            assert response["MachineAuthorized"]
            again.open_map()
            message = await again.next_map_message()
            assert message["Node"]["Addresses"] == first["Node"]["Addresses"]
            assert message["Node"]["ID"] == first["Node"]["ID"]
            await again.close()
    asyncio.run(main())


def test_node_key_rotation_and_logout(tmp_path):
    """A new node key is a login (as with Tailscale's control and Headscale):
    without an auth key it gets a login URL, with one the same node keeps its
    addresses. A logout (an expiry in the past, even with the auth key sent
    along) expires the node, whose map then shows it expired and no peers."""
    async def main():
        async with running_server(tmp_path) as (server, port):
            key = new_key(server)
            peer, _ = await joined(port, key, "peer")
            a, first = await joined(port, key, "rotor")
            node = server.coordinator.nodes[first["Node"]["ID"]]
            old = a.node_key
            a.node_private = meshbox.new_private_key()
            response = await a.register("", OldNodeKey=old)
            assert not response.get("MachineAuthorized") and "/register/" in response["AuthURL"]
            assert meshbox.key_text("nodekey", node.node_key) == old     # not rotated by asking
            response = await a.register(key, OldNodeKey=old)
            assert response["MachineAuthorized"]
            assert meshbox.key_text("nodekey", node.node_key) == a.node_key and node.ipv4 == first["Node"]["Addresses"][0][:-3]
            # The old node key no longer gets a map.
            status, _ = await a.request("/machine/map", {**a.map_request(stream=False), "NodeKey": old})
            assert status == 401
            # Logout: an expiry in the past, with the auth key the client still holds.
            response = await a.register(key, Expiry="1970-01-01T00:02:03Z")
            assert response["NodeKeyExpired"] is True and meshbox.is_expired(node, meshbox.now())
            status, body = await a.request("/machine/map", a.map_request(stream=False))
            message = tsclient.decode_map_frame(body[4:])
            assert status == 200 and message["Node"]["Expired"] and message["Peers"] == []
            assert message["PacketFilter"] == []
            # Logging in again with a key restores the same addresses.
            response = await a.register(key)
            assert response["MachineAuthorized"]
            status, body = await a.request("/machine/map", a.map_request(stream=False))
            message = tsclient.decode_map_frame(body[4:])
            assert status == 200 and node.ipv4 == first["Node"]["Addresses"][0][:-3]
            assert [p["Name"].split(".")[0] for p in message["Peers"]] == ["peer"]
            await a.close(), await peer.close()
    asyncio.run(main())


def test_home_derp_survives_a_hostinfo_without_netinfo(tmp_path):
    """A client sends NetInfo only when it changes: a re-login (a fresh
    control client) and its map requests carry Hostinfo without it, and
    the node must keep the home DERP its peers reach it by."""
    async def main():
        async with running_server(tmp_path) as (server, port):
            key = new_key(server)
            a = tsclient.ControlClient("127.0.0.1", port, "homed")
            a.hostinfo_extra = {"NetInfo": {"PreferredDERP": 900}}
            await a.connect()
            assert (await a.register(key))["MachineAuthorized"]
            status, _ = await a.request("/machine/map", a.map_request(stream=False, OmitPeers=True))
            node = server.coordinator.node_by_machine(meshbox.x25519_public(a.machine_private))
            assert status == 200 and meshbox.home_derp(node) == 900
            a.hostinfo_extra = {"OSVersion": "6.1"}
            status, _ = await a.request("/machine/map", a.map_request(stream=False, OmitPeers=True))
            assert status == 200 and node.hostinfo["OSVersion"] == "6.1" and meshbox.home_derp(node) == 900
            a.node_private = meshbox.new_private_key()          # a re-login with a new key
            assert (await a.register(key))["MachineAuthorized"]
            assert meshbox.home_derp(server.coordinator.nodes[node.id]) == 900
            await a.close()
    asyncio.run(main())


def test_a_cancelled_map_poll_ends_its_session_at_once(tmp_path):
    """`tailscale down` resets its map stream (RST_STREAM): the node is
    offline at once, not at the next keepalive 50 s later."""
    async def main():
        async with running_server(tmp_path) as (server, port):
            key = new_key(server)
            a, first = await joined(port, key, "downer")
            node = server.coordinator.nodes[first["Node"]["ID"]]
            assert node.online
            a.h2.reset_stream(a.map_stream.stream_id)
            a.flush()
            for _ in range(50):
                if not node.online:
                    break
                await asyncio.sleep(0.02)
            assert not node.online and node.id not in server.coordinator.fanout.sessions
            await a.close()
    asyncio.run(main())


def test_cli_edits_reach_connected_clients(tmp_path):
    async def main():
        async with running_server(tmp_path) as (server, port):
            key = new_key(server)
            a, _ = await joined(port, key, "stay")
            b, first_b = await joined(port, key, "leave")
            await a.next_map_message()            # b joined
            result = await asyncio.to_thread(meshproc.cli, "nodes", "rename", "stay", "desk", state=tmp_path)
            assert result.returncode == 0, result.stderr
            message = await until(b, "PeersChanged")
            assert message["PeersChanged"][0]["Name"] == "desk.mesh.internal."
            result = await asyncio.to_thread(meshproc.cli, "nodes", "delete", str(first_b["Node"]["ID"]),
                                             state=tmp_path)
            assert result.returncode == 0, result.stderr
            message = await until(a, "PeersRemoved")
            assert message["PeersRemoved"] == [first_b["Node"]["ID"]]
            listing = await asyncio.to_thread(meshproc.cli, "nodes", "list", "--output", "json", state=tmp_path)
            rows = json.loads(listing.stdout)
            assert [(r["name"], r["online"], r["ipv4"]) for r in rows] == [("desk", True, "100.64.0.1")]
            assert {"id", "name", "user", "ipv4", "ipv6", "online", "last_seen", "tags"} <= set(rows[0])
            await a.close(), await b.close()
    asyncio.run(main())


def test_websocket_upgrade_and_garbage_handshake(tmp_path):
    async def main():
        async with running_server(tmp_path) as (server, port):
            _, body = await tsclient.http_get("127.0.0.1", port, "/key?v=130")
            server_public = meshbox.key_bytes(json.loads(body)["publicKey"], "mkey")
            machine = meshbox.new_private_key()
            initiation, finish = meshbox.noise_initiate(machine, server_public, 130)
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            handshake = base64.b64encode(initiation).decode().replace("+", "%2B").replace("/", "%2F").replace("=", "%3D")
            writer.write((f"GET /ts2021?X-Tailscale-Handshake={handshake} HTTP/1.1\r\nHost: x\r\n"
                          "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                          "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: tailscale-control-protocol\r\n\r\n").encode())
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 101") and b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo=" in head
            b0, b1 = await reader.readexactly(2)
            assert b0 == 0x82 and b1 == meshbox.RESPONSE_LEN
            noise = finish(await reader.readexactly(meshbox.RESPONSE_LEN))
            assert noise.peer_static == server_public
            writer.close()
            # Garbage handshakes get a 400 and the server keeps serving.
            for bad in (b"short", bytes(meshbox.INITIATION_LEN)):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write((f"POST /ts2021 HTTP/1.1\r\nUpgrade: tailscale-control-protocol\r\n"
                              f"X-Tailscale-Handshake: {base64.b64encode(bad).decode()}\r\n\r\n").encode())
                assert (await reader.read()).startswith(b"HTTP/1.1 400")
            assert (await tsclient.http_get("127.0.0.1", port, "/health"))[0] == 200
    asyncio.run(main())


def test_garbage_records_close_only_that_connection(tmp_path):
    async def main():
        async with running_server(tmp_path) as (server, port):
            key = new_key(server)
            a, _ = await joined(port, key, "steady")
            bad = tsclient.ControlClient("127.0.0.1", port, "bad")
            await bad.connect()
            bad.writer.write(bytes([meshbox.MSG_RECORD, 0, 40]) + os.urandom(40))
            await asyncio.sleep(0.2)
            assert bad.reader.at_eof() or bad.reader_task.done()
            b, _ = await joined(port, key, "after")
            message = await a.next_map_message()
            assert message["PeersChanged"][0]["Name"] == "after.mesh.internal."
            await a.close(), await b.close(), await bad.close()
    asyncio.run(main())


def test_zstd_raw_frames_decode():
    decoder = zstandard.ZstdDecompressor()
    for size in (0, 1, 1000, meshbox.ZSTD_MAX_BLOCK, 3 * meshbox.ZSTD_MAX_BLOCK + 7):
        data = os.urandom(size)
        assert decoder.decompress(meshbox.zstd_raw_frame(data)) == data
    frame = meshbox.map_frame({"KeepAlive": True})
    assert int.from_bytes(frame[:4], "little") == len(frame) - 4
    assert json.loads(decoder.decompress(frame[4:])) == {"KeepAlive": True}


def test_address_allocation():
    def taken_in(addresses):
        return lambda ipv4, ipv6: ipv4 in addresses or ipv6 in addresses

    assert meshbox.allocate_addresses("100.64.0.0/10", "fd7a:115c:a1e0::/48", taken_in(set())) == \
        ("100.64.0.1", "fd7a:115c:a1e0::1", 1)
    taken = {"100.64.0.1", "100.64.0.2", "fd7a:115c:a1e0::3"}
    assert meshbox.allocate_addresses("100.64.0.0/10", "fd7a:115c:a1e0::/48", taken_in(taken))[:2] == \
        ("100.64.0.4", "fd7a:115c:a1e0::4")
    # A search from a later offset wraps around to what was freed below it.
    assert meshbox.allocate_addresses("192.0.2.0/29", "fd00::/64", taken_in({"192.0.2.1"}), start=6)[0] == \
        "192.0.2.6"
    assert meshbox.allocate_addresses("192.0.2.0/29", "fd00::/64", taken_in({"192.0.2.1", "192.0.2.6"}), start=6)[0] == \
        "192.0.2.2"
    # The service range 100.100.100.0/24 is skipped.
    assert meshbox.allocate_addresses("100.100.100.0/23", "fd00::/64", taken_in(set()))[0] == "100.100.101.0"
    with pytest.raises(ValueError, match="exhausted"):
        meshbox.allocate_addresses("192.0.2.0/30", "fd00::/64", taken_in({"192.0.2.1", "192.0.2.2"}))


def test_store_reuses_freed_addresses(tmp_path):
    store = meshbox.Store(str(tmp_path / "state.db"))
    user = store.create_user("alice")
    nodes = []
    for i in range(3):
        with store.transaction():
            ipv4, ipv6 = store.allocate_addresses("100.64.0.0/10", "fd7a:115c:a1e0::/48")
            node = meshbox.Node(id=0, machine_key=bytes([i]) * 32, node_key=bytes([i + 10]) * 32, disco_key=b"",
                                user_id=user.id, hostname=f"n{i}", given_name=f"n{i}", ipv4=ipv4, ipv6=ipv6,
                                tags=[], ephemeral=False, auth_key_id=None, expiry=None, created=0, last_seen=0,
                                hostinfo={}, endpoints=[], approved_routes=[], cap=0)
            store.insert_node(node)
        nodes.append(node)
    assert [n.ipv4 for n in nodes] == ["100.64.0.1", "100.64.0.2", "100.64.0.3"]
    with store.transaction():
        store.delete_node(nodes[1].id)
    with store.transaction():
        assert store.allocate_addresses("100.64.0.0/10", "fd7a:115c:a1e0::/48") == \
            ("100.64.0.2", "fd7a:115c:a1e0::2")


def test_cli_preauthkeys_and_errors(tmp_path):
    assert meshproc.cli("users", "create", "bob", state=tmp_path).returncode == 0
    result = meshproc.cli("preauthkeys", "create", "--user", "bob", "--reusable", "--expiration", "2d",
                          "--tags", "tag:web", state=tmp_path)
    assert result.returncode == 0
    secret = result.stdout.strip().splitlines()[-1]
    assert secret.startswith("mskey-")
    rows = json.loads(meshproc.cli("preauthkeys", "list", "-o", "json", state=tmp_path).stdout)
    assert rows[0]["user"] == "bob" and rows[0]["tags"] == ["tag:web"] and rows[0]["valid"]
    assert secret not in json.dumps(rows)               # stored hashed, never shown again
    assert meshproc.cli("preauthkeys", "expire", secret, state=tmp_path).returncode == 0
    assert not json.loads(meshproc.cli("preauthkeys", "list", "-o", "json", state=tmp_path).stdout)[0]["valid"]
    bad = meshproc.cli("preauthkeys", "create", "--user", "nobody", state=tmp_path)
    assert bad.returncode == 1 and "no user named 'nobody'" in bad.stderr
    bad = meshproc.cli("preauthkeys", "create", "--user", "bob", "--expiration", "soon", state=tmp_path)
    assert bad.returncode == 1 and "bad duration" in bad.stderr


def test_interactive_login_waits_for_approval(tmp_path):
    async def main():
        async with running_server(tmp_path) as (server, port):
            server.store.create_user("carol")
            client = tsclient.ControlClient("127.0.0.1", port, "tablet")
            await client.connect()
            first = await client.register("")
            url = first["AuthURL"]
            assert url.startswith(f"http://127.0.0.1:{port}/register/") and not first["MachineAuthorized"]
            status, page = await tsclient.http_get("127.0.0.1", port, url.split(str(port), 1)[1])
            request_id = url.rsplit("/", 1)[1]
            assert status == 200 and f"nodes register --user USER --key {request_id}".encode() in page
            # The follow-up is held open until an admin approves.
            # (generous timeouts: under qemu-user each CLI call takes seconds)
            follow = asyncio.ensure_future(client.register("", timeout=120, Followup=url))
            await asyncio.sleep(0.3)
            assert not follow.done() and server.coordinator.nodes == {}
            wrong = await asyncio.to_thread(meshproc.cli, "nodes", "register", "--user", "carol",
                                            "--key", "nonexistent", state=tmp_path)
            assert wrong.returncode == 1 and "no login request" in wrong.stderr
            ok = await asyncio.to_thread(meshproc.cli, "nodes", "register", "--user", "carol", "--key", request_id,
                                         state=tmp_path)
            assert ok.returncode == 0, ok.stderr
            response = await asyncio.wait_for(follow, 60)
            assert response["MachineAuthorized"] and response["User"]["LoginName"] == "carol"
            client.open_map()
            message = await client.next_map_message()
            assert message["Node"]["Name"] == "tablet.mesh.internal."
            await client.close()
    asyncio.run(main())


def test_expiry_ephemeral_and_requested_tags(tmp_path):
    async def main():
        async with running_server(tmp_path) as (server, port):
            coordinator = server.coordinator
            key = new_key(server)
            a, first = await joined(port, key, "watcher")
            node_a = coordinator.nodes[first["Node"]["ID"]]
            assert 179 * 86400 < node_a.expiry - meshbox.now() <= 180 * 86400     # default key expiry
            b, first_b = await joined(port, key, "short")
            node_b = coordinator.nodes[first_b["Node"]["ID"]]
            await until(a, "PeersChanged")
            # b's key runs out: a sees it expired, and b's map session is
            # kept (its client waits quietly) and tells it so once, then
            # stays silent however much changes.
            node_b.expiry = meshbox.now() - 1
            coordinator.expire_due(meshbox.now(), 1800)
            message = await until(a, "PeersChanged")
            assert message["PeersChanged"][0]["Expired"] is True
            _, message = await b.map_message_where(lambda m: m.get("Node", {}).get("Expired"))
            assert not message.get("PeersChanged")
            coordinator.fanout.notify(changed=[node_a.id, node_b.id])
            with pytest.raises(TimeoutError):
                await b.next_map_message(timeout=1)
            # Ephemeral nodes go once offline for longer than the timeout.
            eph_key = new_key(server, ephemeral=True)
            c, first_c = await joined(port, eph_key, "ephemeral")
            await c.close()
            await asyncio.sleep(0.2)
            node_c = coordinator.nodes[first_c["Node"]["ID"]]
            assert not node_c.online and node_c.expiry is not None
            coordinator.expire_due(meshbox.now() + 10, 5)
            assert node_c.id not in coordinator.nodes
            # A tag the policy does not let the user own is refused.
            d = tsclient.ControlClient("127.0.0.1", port, "tagger")
            await d.connect()
            d.hostinfo = lambda: {"Hostname": "tagger", "RequestTags": ["tag:prod"]}
            refused = await d.register(key)
            assert "tag:prod is not permitted" in refused["Error"]
            coordinator.policy_views.set_policy('{"tagOwners": {"tag:prod": ["alice@"]}, "acls": []}')
            accepted = await d.register(key)
            assert accepted["MachineAuthorized"]
            tagged = coordinator.node_by_machine(meshbox.x25519_public(d.machine_private))
            assert tagged.tags == ["tag:prod"] and tagged.expiry is None      # tagged keys do not expire
            await a.close(), await b.close(), await d.close()
    asyncio.run(main())


ROUTES = ["10.1.0.0/24", "10.2.0.0/16", "192.0.2.0/24", "0.0.0.0/0", "::/0"]


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.lists(st.sampled_from(ROUTES), unique=True),
                          st.lists(st.sampled_from(ROUTES), unique=True)), min_size=1, max_size=8))
def test_default_policy_fast_path_matches_the_compiler(routes):
    """allow_all_entries (O(N)) gives every viewer what compile_policy(None) gives it."""
    users = {1: meshbox.User(1, "u", 0)}
    nodes = []
    for i, (advertised, approved) in enumerate(routes, start=1):
        nodes.append(meshbox.Node(
            id=i, machine_key=bytes([i]) * 32, node_key=bytes([i + 100]) * 32, disco_key=b"", user_id=1,
            hostname=f"n{i}", given_name=f"n{i}", ipv4=f"100.64.0.{i}", ipv6=f"fd7a:115c:a1e0::{i}", tags=[],
            ephemeral=False, auth_key_id=None, expiry=None, created=0, last_seen=0,
            hostinfo={"RoutableIPs": advertised}, endpoints=[], approved_routes=approved, cap=0))
    compiled = meshbox.compile_policy(None, meshbox.policy_topology(nodes, users))
    entries = meshbox.allow_all_entries(nodes)
    for node in nodes:
        fast = meshbox.allow_all_view(entries, node.id)
        assert dict(fast.peers) == compiled[node.id].peers
        assert fast.packet_filter_rules == compiled[node.id].packet_filter_rules


OPERATIONS = st.lists(st.tuples(st.sampled_from(["join", "advertise", "approve", "delete"]),
                                 st.integers(0, 5), st.lists(st.sampled_from(ROUTES), unique=True)),
                       min_size=1, max_size=14)


@settings(max_examples=60, deadline=None)
@given(OPERATIONS)
def test_incremental_default_policy_matches_a_full_compile(operations):
    """Joins, route changes and deletions, each applied incrementally, leave
    the same shared entries as compiling the whole tailnet again."""
    with tempfile.TemporaryDirectory() as tmp:
        store = meshbox.Store(os.path.join(tmp, "meshbox.db"))
        user = store.create_user("alice")
        settings_ = meshbox.MapSettings(base_domain="mesh.internal", derp_map={"Regions": {}},
                                        dns_config=meshbox.dns_config("mesh.internal", []), control_url="http://x")
        coordinator = meshbox.Coordinator(store, settings_)
        joined_ = []
        for i, (verb, pick, routes) in enumerate(operations):
            if verb == "join" or not joined_:
                node = coordinator.admit(bytes([i + 1]) * 32, bytes([i + 101]) * 32, {"Hostname": f"n{i}",
                                         "RoutableIPs": routes}, user.id, [], False, None)
                joined_.append(node.id)
                continue
            node_id = joined_[pick % len(joined_)]
            if verb == "delete":
                coordinator.delete_node(node_id)
                joined_.remove(node_id)
            elif verb == "advertise":
                node = coordinator.nodes[node_id]
                coordinator.node_for_map(node.machine_key, {
                    "NodeKey": meshbox.key_text("nodekey", node.node_key),
                    "Hostinfo": {"Hostname": node.hostname, "RoutableIPs": routes}})
            else:
                coordinator.apply(meshbox.NodeEdit(node_id, {"approved_routes": routes}))
            assert coordinator.policy_views.allow_all == meshbox.allow_all_entries(coordinator.nodes.values())
        store.db.close()


def test_signal_wakes_every_waiter_or_times_out():
    async def main():
        signal = meshbox.Signal()
        assert await signal.wait(0.05) is False and signal.waiters is None
        waiters = [asyncio.ensure_future(signal.wait(5)) for _ in range(3)]
        await asyncio.sleep(0.01)
        signal.set()
        assert await asyncio.gather(*waiters) == [True, True, True]
        assert signal.waiters is None and await signal.wait(0) is True
        signal.clear()
        cancelled = asyncio.ensure_future(signal.wait())
        await asyncio.sleep(0.01)
        cancelled.cancel()
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        assert signal.waiters is None
    asyncio.run(main())


def test_idle_map_stream_gets_keepalives_and_still_wakes(tmp_path, monkeypatch):
    monkeypatch.setattr(meshbox, "KEEPALIVE_INTERVAL", 0.2)

    async def main():
        async with running_server(tmp_path) as (server, port):
            key = new_key(server)
            a, _ = await joined(port, key, "idle")
            assert await a.next_map_message(timeout=3, skip_keepalive=False) == {"KeepAlive": True}
            b, _ = await joined(port, key, "newcomer")
            _, message = await a.map_message_where(lambda m: "PeersChanged" in m, timeout=3)
            assert [p["Name"].split(".")[0] for p in message["PeersChanged"]] == ["newcomer"]
            await a.close(), await b.close()
    asyncio.run(main())


def test_a_burst_of_joins_under_a_policy_shares_compiles(tmp_path, monkeypatch):
    """Each join's first map already shows the policy's view of it, yet a
    burst of joins does not compile the policy once per join."""
    compiles = []
    compile_policy = meshbox.compile_policy
    monkeypatch.setattr(meshbox, "compile_policy", lambda *a, **k: compiles.append(1) or compile_policy(*a, **k))

    async def main():
        async with running_server(tmp_path) as (server, port):
            key = new_key(server)
            server.coordinator.policy_views.set_policy('{"acls": [{"action": "accept", "src": ["*"], "dst": ["*:22"]}]}')
            first_client, _ = await joined(port, key, "first")
            compiles.clear()
            burst = await asyncio.gather(*(joined(port, key, f"burst{i}") for i in range(12)))
            for _, first in burst:
                assert first["PacketFilter"][0]["DstPorts"][0]["Ports"] == {"First": 22, "Last": 22}
                assert "first" in [p["Name"].split(".")[0] for p in first["Peers"]]
            assert 1 <= len(compiles) < 12
            # Everyone hears of everyone in the end.
            names = {f"burst{i}" for i in range(12)}
            seen = set()
            while seen != names:
                _, message = await first_client.map_message_where(lambda m: "PeersChanged" in m, timeout=5)
                seen |= {p["Name"].split(".")[0] for p in message["PeersChanged"]}
            for c in [first_client] + [c for c, _ in burst]:
                await c.close()
    asyncio.run(main())


def test_a_node_flapping_its_endpoints_reaches_peers_at_most_once_a_second(tmp_path):
    """A node that reports new endpoints many times a second: its peers hear
    of the first NODE_CHANGE_BURST at once, then its latest state once per
    NODE_CHANGE_INTERVAL, never a stale one; another node's change is not held."""
    async def main():
        async with running_server(tmp_path) as (server, port):
            key = new_key(server)
            flapper, first = await joined(port, key, "flapper")
            steady, _ = await joined(port, key, "steady")
            watcher, _ = await joined(port, key, "watcher")
            flapper_id = first["Node"]["ID"]
            seen = []                       # (arrival, endpoints) of the flapper, as the watcher hears them

            async def watch(seconds):
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(seconds):
                        while True:
                            arrival, message = await watcher.next_map_entry(timeout=seconds)
                            for peer in message.get("PeersChanged", ()):
                                if peer["ID"] == flapper_id:
                                    seen.append((arrival, peer["Endpoints"]))
                                elif peer["Endpoints"] == ["203.0.113.7:41641"]:
                                    seen.append((arrival, "steady"))

            watching = asyncio.ensure_future(watch(3.5))
            started = time.monotonic()
            sent = 0
            while time.monotonic() - started < 2:
                sent += 1
                await flapper.update_endpoints([f"198.51.100.{sent % 250 + 1}:{1000 + sent}"])
                await asyncio.sleep(0.01)
            last = [f"198.51.100.{sent % 250 + 1}:{1000 + sent}"]
            told = time.monotonic()
            await steady.update_endpoints(["203.0.113.7:41641"])
            await watching
            flaps = [(t, e) for t, e in seen if e != "steady"]
            assert sent > 4 * meshbox.NODE_CHANGE_BURST
            # Unheld, 50 ms batches would carry about 40 in 2 s; the burst itself may share a batch or two.
            assert 2 <= len(flaps) <= meshbox.NODE_CHANGE_BURST + 4, (sent, flaps)
            assert flaps[-1][1] == last                                  # the latest state, in the end
            assert [t for t, e in seen if e == "steady"][0] - told < 0.5     # not held with the flapper's
            await flapper.close(), await steady.close(), await watcher.close()
    asyncio.run(main())


def test_steady_state_leaves_the_state_file_alone(tmp_path):
    """Endpoint churn stays in memory: nothing is committed within the flush interval."""
    async def main():
        async with running_server(tmp_path) as (server, port):
            key = new_key(server)
            a, _ = await joined(port, key, "mover")
            b, _ = await joined(port, key, "watcher")
            observer = meshbox.Store(os.path.join(str(tmp_path), "meshbox.db"))
            version = observer.data_version()
            for i in range(20):
                status, _ = await a.request("/machine/map", a.map_request(
                    stream=False, OmitPeers=True, endpoints=[f"198.51.100.{i + 1}:4000"]))
                assert status == 200
                await asyncio.sleep(0.05)
            message = await until(b, "PeersChanged")
            assert message["PeersChanged"][0]["Endpoints"][0].startswith("198.51.100.")
            assert observer.data_version() == version          # no commit reached the file
            server.coordinator.flush_live()                      # the minute is up: one write
            assert observer.data_version() != version
            await a.close(), await b.close()
    asyncio.run(main())
