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
