"""Registration facing strangers: pre-auth keys, refused attempts, pending logins (issue 11)."""

import asyncio

import meshbox
import tsclient
from test_coordinator import running_server, new_key, joined


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
            server.coordinator.approve(url.rsplit("/", 1)[1], user.id)
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
