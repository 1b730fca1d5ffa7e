"""Registration facing strangers: pre-auth keys, refused attempts, pending logins (issue 11)."""

import asyncio
import dataclasses

import pytest

import meshbox
import meshproc
import tsclient
from meshproc import new_key, running_server


def test_a_key_displayed_prefix_does_not_register(tmp_path):
    async def main():
        async with running_server(tmp_path) as (server, port):
            key = new_key(server)
            shown = meshbox.Admin(server.store, server.config, server).call("preauthkeys", "list", {})[0]["key"]
            prefix = shown.rstrip("…")
            assert key.startswith(prefix) and len(prefix) == len("mskey-") + 8
            client = tsclient.ControlClient("127.0.0.1", port, "guesser")
            await client.connect()
            response = await client.register(prefix)
            assert "no such pre-auth key" in response["Error"] and not response.get("MachineAuthorized")
            assert server.coordinator.nodes == {}
            await client.close()
            # The admin verb still takes the prefix it shows.
            meshbox.Admin(server.store, server.config, server).call("preauthkeys", "expire", {"key": prefix})
            assert server.store.preauth_key(key)["revoked"]
    asyncio.run(main())


def test_only_the_machine_that_asked_may_follow_its_login(tmp_path):
    async def main():
        async with running_server(tmp_path) as (server, port):
            user = server.store.create_user("carol")
            owner = tsclient.ControlClient("127.0.0.1", port, "tablet")
            thief = tsclient.ControlClient("127.0.0.1", port, "thief")
            await owner.connect()
            await thief.connect()
            url = (await owner.register(""))["AuthURL"]
            stolen = asyncio.ensure_future(thief.register("", timeout=30, Followup=url))
            # Same machine, another node key: not the login it started either.
            other_key = asyncio.ensure_future(owner.register("", timeout=30, Followup=url,
                                                             NodeKey=meshbox.key_text("nodekey", bytes([7]) * 32)))
            follow = asyncio.ensure_future(owner.register("", timeout=30, Followup=url))
            await asyncio.sleep(0.3)
            server.coordinator.registrar.approve(url.rsplit("/", 1)[1], user.id)
            response = await asyncio.wait_for(follow, 10)
            assert response["MachineAuthorized"] and response["User"]["LoginName"] == "carol"
            for attempt in (stolen, other_key):
                response = await asyncio.wait_for(attempt, 10)
                assert "login request expired or is unknown" in response["Error"]
                assert not response.get("MachineAuthorized") and "User" not in response
            assert [n.hostname for n in server.coordinator.nodes.values()] == ["tablet"]
            await owner.close()
            await thief.close()
    asyncio.run(main())


def logged(server, text):
    return [line for line in server.recent_logs.lines if text in line]


def test_a_burst_of_refusals_locks_the_source_out_even_with_a_valid_key(tmp_path):
    async def main():
        async with running_server(tmp_path) as (server, port):
            key = new_key(server)
            guesser = tsclient.ControlClient("127.0.0.1", port, "guesser")
            await guesser.connect()
            for i in range(meshbox.REGISTER_ATTEMPT_BURST):
                response = await guesser.register(f"mskey-{i:048x}")
                assert "no such pre-auth key" in response["Error"]
            for _ in range(3):           # the key is not even looked at during the lockout
                response = await guesser.register(key)
                assert response["Error"].startswith("too many attempts, try again in ")
                assert not response.get("MachineAuthorized")
            # A new machine from the same address is locked out too; so are keyless logins.
            newcomer = tsclient.ControlClient("127.0.0.1", port, "newcomer")
            await newcomer.connect()
            assert "too many attempts" in (await newcomer.register(key))["Error"]
            assert "too many attempts" in (await newcomer.register(""))["Error"]
            assert server.coordinator.nodes == {} and server.coordinator.registrar.auth_requests == {}
            assert len(logged(server, "too many failed registrations")) == 1     # once per burst
            assert len(logged(server, "registration refused")) == meshbox.REGISTER_ATTEMPT_BURST
            await guesser.close()
            await newcomer.close()
    asyncio.run(main())


def test_refusals_lock_out_their_source_and_machine_only(tmp_path):
    async def main():
        async with running_server(tmp_path) as (server, port):
            coordinator, key = server.coordinator, new_key(server)

            def register(machine, auth_key, source):
                request = tsclient.ControlClient("127.0.0.1", port).register_request(auth_key)   # a fresh node key
                return coordinator.registrar.register(bytes(machine) * (32 // len(machine)), request, source)

            for _ in range(meshbox.REGISTER_ATTEMPT_BURST):
                with pytest.raises(meshbox.RegistrationRefused, match="no such pre-auth key"):
                    register([1], "mskey-wrong", "192.0.2.7")
            with pytest.raises(meshbox.RegistrationRefused, match="too many attempts, try again in 6 s"):
                register([2], key, "192.0.2.7")
            # The same machine from elsewhere is still locked out: it tried too often.
            with pytest.raises(meshbox.RegistrationRefused, match="too many attempts"):
                register([1], key, "198.51.100.9")
            # Another machine at another address is not.
            assert register([3], key, "198.51.100.9")["MachineAuthorized"]
            # A typo or two, then the right key: fine; and successes do not count.
            for _ in range(2):
                with pytest.raises(meshbox.RegistrationRefused, match="no such pre-auth key"):
                    register([4], "mskey-typo", "203.0.113.5")
            assert register([4], key, "203.0.113.5")["MachineAuthorized"]
            for i in range(30):          # many good nodes behind one NAT
                assert register([5, i], key, "203.0.113.5")["MachineAuthorized"]
            # An IPv6 party holds a /64: its addresses share one allowance.
            for i in range(meshbox.REGISTER_ATTEMPT_BURST):
                with pytest.raises(meshbox.RegistrationRefused, match="no such pre-auth key"):
                    register([6, i], "mskey-wrong", f"2001:db8::{i}")
            with pytest.raises(meshbox.RegistrationRefused, match="too many attempts"):
                register([7], key, "2001:db8::ffff")
            assert register([7], key, "2001:db8:0:1::1")["MachineAuthorized"]
    asyncio.run(main())


def test_the_table_of_refused_attempts_stays_bounded(tmp_path):
    async def main():
        async with running_server(tmp_path) as (server, port):
            coordinator = server.coordinator
            client = tsclient.ControlClient("127.0.0.1", port, "many")
            request = client.register_request("mskey-wrong")
            for i in range(3 * meshbox.REGISTER_ATTEMPT_KEYS):     # a fresh machine key and address each time
                with pytest.raises(meshbox.RegistrationRefused):
                    coordinator.registrar.register(i.to_bytes(32, "big"), request, f"2001:db8:{i >> 16:x}:{i & 0xffff:x}::1")
                assert len(coordinator.registrar.failed_registrations) <= meshbox.REGISTER_ATTEMPT_KEYS
            # The most recent ones are still remembered.
            last = 3 * meshbox.REGISTER_ATTEMPT_KEYS - 1
            assert coordinator.registrar.failed_registrations.wait(last.to_bytes(32, "big"), meshbox.now()) == 0
            assert last.to_bytes(32, "big") in coordinator.registrar.failed_registrations.forgotten_at
    asyncio.run(main())


def keyless_request(port, hostname="stranger", **hostinfo):
    client = tsclient.ControlClient("127.0.0.1", port, hostname)
    client.hostinfo_extra = hostinfo
    return meshbox.x25519_public(client.machine_private), client.register_request("")


def test_pending_logins_are_capped_per_source_and_overall(tmp_path, monkeypatch):
    monkeypatch.setattr(meshbox, "AUTH_REQUESTS_MAX", 40)

    async def main():
        async with running_server(tmp_path) as (server, port):
            coordinator = server.coordinator
            for i in range(meshbox.AUTH_REQUESTS_PER_SOURCE):
                assert "AuthURL" in coordinator.registrar.register(*keyless_request(port), "192.0.2.7")
            with pytest.raises(meshbox.RegistrationRefused, match="too many login requests from this address"):
                coordinator.registrar.register(*keyless_request(port), "192.0.2.7")
            # The same machine asking again gets its own request back, cap or not.
            machine, request = keyless_request(port)
            first = coordinator.registrar.register(machine, request, "198.51.100.1")["AuthURL"]
            assert coordinator.registrar.register(machine, request, "198.51.100.1")["AuthURL"] == first
            source = 0
            while len(coordinator.registrar.auth_requests) < meshbox.AUTH_REQUESTS_MAX:
                source += 1
                coordinator.registrar.register(*keyless_request(port), f"203.0.113.{source // 8}")
            with pytest.raises(meshbox.RegistrationRefused, match="too many login requests are waiting"):
                coordinator.registrar.register(*keyless_request(port), "198.51.100.200")
            assert len(coordinator.registrar.auth_requests) == meshbox.AUTH_REQUESTS_MAX
            # Over the wire the client reads why.
            client = tsclient.ControlClient("127.0.0.1", port, "late")
            await client.connect()
            assert "too many login requests" in (await client.register(""))["Error"]
            await client.close()
    asyncio.run(main())


def test_a_pending_login_keeps_only_what_approval_needs(tmp_path):
    async def main():
        async with running_server(tmp_path) as (server, port):
            coordinator = server.coordinator
            user = server.store.create_user("dave")
            big = {"Hostname": "h" * 2000, "RequestTags": [], "Services": [{"Description": "x" * 1000}] * 400,
                   "NetInfo": {"DERPLatency": {str(i): 0.1 for i in range(5000)}}}
            machine, request = keyless_request(port, **big)
            url = coordinator.registrar.register(machine, request, "192.0.2.7")["AuthURL"]
            pending = coordinator.registrar.auth_requests[url.rsplit("/", 1)[1]]
            held = [getattr(pending, f.name) for f in dataclasses.fields(pending) if f.name not in ("done", "base_url")]
            assert len(repr(held)) < 1000          # not the client's 0.5 MB Hostinfo
            coordinator.registrar.approve(pending.id, user.id)
            node = coordinator.node_by_machine(machine)
            assert node.hostname == "node" and node.user_id == user.id     # a Hostname past 256 is dropped
            # A login asking for many or long tags is refused outright, not kept (a tag
            # past HOSTINFO_MAX_TEXT never gets that far: checked_hostinfo drops it).
            for tags in (["tag:t%d" % i for i in range(meshbox.AUTH_REQUEST_MAX_TAGS + 1)],
                         ["tag:" + "x" * meshbox.AUTH_REQUEST_MAX_TAG_LEN]):
                with pytest.raises(meshbox.RegistrationRefused, match="tags"):
                    coordinator.registrar.register(*keyless_request(port, RequestTags=tags), "192.0.2.8")
    asyncio.run(main())


def test_starting_a_login_writes_nothing_to_the_state_file(tmp_path):
    async def main():
        async with running_server(tmp_path) as (server, port):
            coordinator = server.coordinator
            writes = []
            server.store.db.set_trace_callback(lambda sql: writes.append(sql) if not sql.startswith("SELECT") else None)
            for i in range(5):
                coordinator.registrar.register(*keyless_request(port), f"192.0.2.{i}")
            server.store.db.set_trace_callback(None)
            assert writes == [] and len(coordinator.registrar.auth_requests) == 5
    asyncio.run(main())


def test_api_keys_by_hash_unexpired_and_unrevoked_only(tmp_path):
    store = meshbox.Store(str(tmp_path / "meshbox.db"))
    admin = meshbox.Admin(store, meshbox.Config(state_dir=str(tmp_path)))
    secret = admin.call("apikeys", "create", {})["key"]
    assert meshbox.api_key_valid(store, secret)
    shown = admin.call("apikeys", "list", {})[0]["prefix"]
    for wrong in (shown, shown.rstrip("…"), secret[:-1], secret[:-1] + ("0" if secret[-1] != "0" else "1"), "", " "):
        assert not meshbox.api_key_valid(store, wrong)
    with store.transaction():
        store.db.execute("UPDATE api_keys SET expiration=?", (meshbox.now() - 1,))
    assert not meshbox.api_key_valid(store, secret)
    other = admin.call("apikeys", "create", {"expiration": "1h"})["key"]
    assert meshbox.api_key_valid(store, other)
    admin.call("apikeys", "expire", {"prefix": other[:14]})
    assert not meshbox.api_key_valid(store, other)


def test_nodes_register_needs_the_running_server(tmp_path):
    assert meshproc.cli("users", "create", "erin", state=tmp_path).returncode == 0
    result = meshproc.cli("nodes", "register", "--user", "erin", "--key", "abc", state=tmp_path)
    assert result.returncode == 1 and "meshbox serve is not running" in result.stderr
