"""Tailscale's API v2 driven by the PyPI package `tailscale` (the client Home
Assistant uses), against meshbox on loopback.  The package's base URL is
fixed to https://api.tailscale.com; its aiohttp session here resolves that
host to meshbox's TLS port on 127.0.0.1 (and nothing else) and trusts
meshbox's own certificate, so no request can leave the machine."""

import asyncio
import base64
import contextlib
import http.client
import json
import logging
import os
import socket
import ssl

import aiohttp
import aiohttp.abc
import pytest
import tailscale
from tailscale.exceptions import (TailscaleNotFoundError, TailscalePermissionError, TailscaleResponseError,
                                  TailscaleUnauthorizedError)

import meshbox
import tsclient
from meshproc import serving

API_HOST = "api.tailscale.com"


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


class LoopbackResolver(aiohttp.abc.AbstractResolver):
    """Tailscale's API host is meshbox on 127.0.0.1:port; every other name fails."""

    def __init__(self, port):
        self.port = port

    async def resolve(self, host, port=0, family=socket.AF_INET):
        if host != API_HOST:
            raise OSError(f"test resolver: {host} is not resolved (loopback only)")
        return [{"hostname": host, "host": "127.0.0.1", "port": self.port, "family": socket.AF_INET,
                 "proto": 0, "flags": socket.AI_NUMERICHOST}]

    async def close(self):
        pass


def loopback_session(server, tls_port):
    """An aiohttp session that reaches API_HOST at meshbox, trusting meshbox's certificate only."""
    context = ssl.create_default_context(cafile=os.path.join(server.config.state_dir, "derp-cert.pem"))
    context.check_hostname = False      # the certificate names 127.0.0.1, the package asks for API_HOST
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(resolver=LoopbackResolver(tls_port), ssl=context))


@contextlib.asynccontextmanager
async def api_client(tmp_path, users=("alice",)):
    """(server, meshbox control port, the package's client with a fresh API key, its session, the key)."""
    async with serving(tmp_path / "state", derp=True) as (server, port, derp_port):
        admin = meshbox.Admin(server.store, server.config, server)
        for name in users:
            admin.users_create(name)
        key = admin.apikeys_create()["key"]
        async with loopback_session(server, derp_port) as session:
            yield server, port, tailscale.Tailscale(api_key=key, session=session), session, key


async def joined(port, key, hostname, **hostinfo):
    client = tsclient.ControlClient("127.0.0.1", port, hostname=hostname)
    client.hostinfo_extra = hostinfo
    first = await client.join(key)
    return client, first


def test_devices_keys_routes_and_tags_through_the_package(tmp_path):
    async def main():
        async with api_client(tmp_path) as (server, port, api, session, _):
            key = await api.create_key(reusable=True, preauthorized=True, expiry_seconds=3600)
            assert key.key.startswith(meshbox.PREAUTH_KEY_PREFIX) and key.capabilities.devices.create.reusable
            router, _ = await joined(port, key.key, "router", RoutableIPs=["192.0.2.0/24", "0.0.0.0/0", "::/0"])
            laptop, _ = await joined(port, key.key, "laptop")
            try:
                devices = await api.devices()
                assert sorted(d.hostname for d in devices.values()) == ["laptop", "router"]
                routers = [d for d in devices.values() if d.hostname == "router"]
                device = routers[0]
                assert device.name == "router.mesh.internal" and device.os == "linux"
                assert device.client_version == "1.90.9-sim" and device.user == "alice"
                assert device.connected_to_control and device.authorized
                assert device.addresses == [server.coordinator.nodes[int(device.device_id)].ipv4,
                                            server.coordinator.nodes[int(device.device_id)].ipv6]
                assert device.advertised_routes == ["192.0.2.0/24", "0.0.0.0/0", "::/0"]
                assert device.enabled_routes == [] and device.client_connectivity is not None
                assert device.client_connectivity.endpoints == ["192.0.2.10:41641"]

                one = await api.device(device.device_id)
                assert one.node_id == device.node_id and one.machine_key == device.machine_key

                await api.authorize_device(device.device_id, authorized=True)
                with pytest.raises(TailscaleResponseError) as refused:
                    await api.authorize_device(device.device_id, authorized=False)
                assert refused.value.status == 400 and "deauthorized" in str(refused.value)

                await api.set_device_tags(device.device_id, tags=["tag:router"])
                assert (await api.device(device.device_id)).tags == ["tag:router"]
                with pytest.raises(TailscaleResponseError, match="bad tag"):
                    await api.set_device_tags(device.device_id, tags=["router"])

                routes = await api.set_device_routes(device.device_id, routes=["192.0.2.0/24", "0.0.0.0/0", "::/0"])
                assert sorted(routes.enabled_routes) == ["0.0.0.0/0", "192.0.2.0/24", "::/0"]
                _, message = await laptop.map_message_where(lambda m: any(
                    "192.0.2.0/24" in p.get("AllowedIPs", []) for p in m.get("Peers", []) + m.get("PeersChanged", [])))
                routes = await api.set_device_routes(device.device_id, routes=["192.0.2.0/24"])
                assert routes.enabled_routes == ["192.0.2.0/24"]
                assert (await api.device_routes(device.device_id)).enabled_routes == ["192.0.2.0/24"]
                with pytest.raises(TailscaleResponseError, match="does not advertise 198.51.100.0/24"):
                    await api.set_device_routes(device.device_id, routes=["198.51.100.0/24"])
                assert server.coordinator.nodes[int(device.device_id)].approved_routes == ["192.0.2.0/24"]

                await api.rename_device(device.device_id, name="gateway-1")
                assert (await api.device(device.device_id)).name == "gateway-1.mesh.internal"
                await api.set_device_key_expiry(device.device_id, key_expiry_disabled=True)
                assert (await api.device(device.device_id)).key_expiry_disabled

                keys = await api.keys()
                assert [k.key_id for k in keys] == [key.key_id] and keys[0].key == ""
                await api.delete_key(key.key_id)
                assert (await api.key(key.key_id)).invalid
                with pytest.raises(ConnectionError, match="registration refused"):
                    await joined(port, key.key, "late")

                laptop_id = next(d.device_id for d in devices.values() if d.hostname == "laptop")
                await api.expire_device_key(laptop_id)
                assert meshbox.is_expired(server.coordinator.nodes[int(laptop_id)], meshbox.now())
                await api.delete_device(laptop_id)
                assert sorted(d.hostname for d in (await api.devices()).values()) == ["router"]
                with pytest.raises(TailscaleNotFoundError):
                    await api.device(laptop_id)
            finally:
                await router.close()
                await laptop.close()
    run(main())


def test_an_ephemeral_tagged_key_registers_a_tagged_ephemeral_node(tmp_path):
    async def main():
        async with api_client(tmp_path) as (server, port, api, session, _):
            key = await api.create_key(ephemeral=True, tags=["tag:phone"], expiry_seconds=600)
            caps = key.capabilities.devices.create
            assert caps.ephemeral and not caps.reusable and caps.tags == ["tag:phone"]
            phone, _ = await joined(port, key.key, "phone")
            try:
                (device,) = (await api.devices()).values()
                assert device.tags == ["tag:phone"] and device.is_ephemeral
                assert (await api.key(key.key_id)).invalid       # one use, used
            finally:
                await phone.close()
            with pytest.raises(TailscaleResponseError, match="expirySeconds"):
                await api.create_key(expiry_seconds=91 * 86400)
    run(main())


GOOD_POLICY = """// the admins' policy
{
  "tagOwners": {"tag:router": ["alice@example.com"]},
  "acls": [{"action": "accept", "src": ["alice@example.com"], "dst": ["*:22"]}],
}
"""


def test_policy_file_with_etag_validate_and_test(tmp_path):
    async def main():
        async with api_client(tmp_path, users=("alice@example.com",)) as (server, port, api, session, _):
            default = await api.policy_file()
            assert default.etag and '"acls"' in default.policy
            saved = await api.set_policy_file(GOOD_POLICY, etag=default.etag)
            assert saved.policy == GOOD_POLICY and saved.etag != default.etag
            assert server.coordinator.policy_views.text == GOOD_POLICY
            assert (await api.policy_file()).policy == GOOD_POLICY      # comments kept
            with pytest.raises(TailscaleResponseError) as stale:
                await api.set_policy_file(GOOD_POLICY.replace("22", "80"), etag=default.etag)
            assert stale.value.status == 412
            with pytest.raises(TailscaleResponseError) as bad:
                await api.set_policy_file('{"acls": [{"action": "accept", "src": ["group:nobody"], "dst": ["*:*"]}]}')
            assert bad.value.status == 400 and "policy refused" in str(bad.value)
            assert server.coordinator.policy_views.text == GOOD_POLICY

            assert (await api.validate_policy_file(GOOD_POLICY)).valid
            broken = await api.validate_policy_file('{"acls": [}')
            assert not broken.valid and "line 1" in broken.message
            key = meshbox.Admin(server.store, server.config, server).preauthkeys_create("alice@example.com")["key"]
            node, first = await joined(port, key, "node")
            await node.close()
            address = first["Node"]["Addresses"][0].split("/")[0]
            passing = await api.test_policy_file([{"src": "alice@example.com", "accept": [f"{address}:22"]}])
            failing = await api.test_policy_file([{"src": "alice@example.com", "accept": [f"{address}:80"]}])
            assert passing.valid and not failing.valid and "test(s) failed" in failing.message

            async with session.get(f"https://{API_HOST}/api/v2/tailnet/-/acl",
                                   headers={"Authorization": f"Bearer {api.api_key}"}) as answer:
                assert answer.headers["Content-Type"] == "application/json"
                assert (await answer.json())["tagOwners"] == {"tag:router": ["alice@example.com"]}
    run(main())


def test_dns_settings_reach_the_nodes(tmp_path):
    async def main():
        async with api_client(tmp_path) as (server, port, api, session, _):
            key = meshbox.Admin(server.store, server.config, server).preauthkeys_create("alice")["key"]
            node, first = await joined(port, key, "node")
            try:
                assert "Resolvers" not in first["DNSConfig"]
                answer = await api.set_dns_nameservers(dns=["192.0.2.53", "2001:db8::53"])
                assert answer.dns == ["192.0.2.53", "2001:db8::53"]
                _, message = await node.map_message_where(lambda m: "DNSConfig" in m)
                assert message["DNSConfig"]["Resolvers"] == [{"Addr": "192.0.2.53"}, {"Addr": "2001:db8::53"}]
                assert (await api.dns_nameservers()).dns == ["192.0.2.53", "2001:db8::53"]

                await api.set_dns_search_paths(search_paths=["corp.example"])
                assert (await api.dns_search_paths()).search_paths == ["corp.example"]
                assert await api.set_split_dns(split_dns={"lan.example": ["192.0.2.1"]}) == {"lan.example": ["192.0.2.1"]}
                assert await api.update_split_dns(split_dns={"lab.example": ["198.51.100.1"], "lan.example": None}) \
                    == {"lab.example": ["198.51.100.1"]}
                assert (await api.set_dns_preferences(magic_dns=False)).magic_dns is False
                config = await api.dns_configuration()
                assert [r.address for r in config.nameservers] == ["192.0.2.53", "2001:db8::53"]
                assert config.search_paths == ["corp.example"] and not config.preferences.magic_dns
                assert [r.address for r in config.split_dns["lab.example"]] == ["198.51.100.1"]
                _, message = await node.map_message_where(
                    lambda m: "DNSConfig" in m and m["DNSConfig"].get("Proxied") is False)
                assert message["DNSConfig"]["Routes"] == {"lab.example.": [{"Addr": "198.51.100.1"}]}
                assert message["DNSConfig"]["Domains"] == ["mesh.internal", "corp.example"]

                with pytest.raises(TailscaleResponseError, match="bad resolver address"):
                    await api.set_dns_nameservers(dns=["resolver.example"])
            finally:
                await node.close()
        async with serving(tmp_path / "state") as (server, port, _):     # kept across a restart
            assert server.coordinator.settings.dns_config["Resolvers"] == [{"Addr": "192.0.2.53"},
                                                                          {"Addr": "2001:db8::53"}]
    run(main())


def test_users_and_settings(tmp_path):
    async def main():
        async with api_client(tmp_path, users=("alice", "bob")) as (server, port, api, session, _):
            users = await api.users()
            assert [u.login_name for u in users] == ["alice", "bob"]
            bob = await api.user(users[1].user_id)
            assert bob.device_count == 0 and not bob.currently_connected
            await api.delete_user(bob.user_id)
            assert [u.login_name for u in await api.users()] == ["alice"]
            settings = await api.tailnet_settings()
            assert settings.devices_key_duration_days == 180 and settings.users_approval_on
            await api.update_tailnet_settings(devices_key_duration_days=180)       # unchanged: fine
            with pytest.raises(TailscaleResponseError, match="devicesKeyDurationDays"):
                await api.update_tailnet_settings(devices_key_duration_days=30)
            assert (await api.create_key()).key          # the one user owns its devices
            await api.delete_user(users[0].user_id)
            with pytest.raises(TailscaleResponseError, match="say which user"):
                await api.create_key()
    run(main())


def test_credentials_as_tailscale_clients_send_them(tmp_path):
    async def main():
        async with api_client(tmp_path) as (server, port, api, session, key):
            url = f"https://{API_HOST}/api/v2/tailnet/-/devices"
            basic = "Basic " + base64.b64encode(f"{key}:".encode()).decode()            # the Go client's way
            async with session.get(url, headers={"Authorization": basic}) as answer:
                assert answer.status == 200 and await answer.json() == {"devices": []}
            for headers in ({}, {"Authorization": "Bearer msapi-" + "0" * 48},
                            {"Authorization": "Basic " + base64.b64encode(b"msapi-x:").decode()}):
                async with session.get(url, headers=headers) as answer:
                    assert answer.status == 401 and (await answer.json())["message"] == "API token invalid"
            with pytest.raises(TailscaleUnauthorizedError):
                await tailscale.Tailscale(api_key="msapi-wrong", session=session).devices()
            headers = {"Authorization": f"Bearer {key}"}
            async with session.get(f"https://{API_HOST}/api/v2/tailnet/other.example/devices", headers=headers) as a:
                assert a.status == 404 and "tailnet" in (await a.json())["message"]
            async with session.get(f"https://{API_HOST}/api/v2/tailnet/-/webhooks", headers=headers) as a:
                assert a.status == 404 and "not part of meshbox's API v2" in (await a.json())["message"]
            async with session.post(f"https://{API_HOST}/api/v2/tailnet/-/keys", headers=headers,
                                    data=b"x" * (meshbox.MAX_REQUEST_BODY + 1)) as a:
                assert a.status == 413 and "too large" in (await a.json())["message"]
            async with session.post(f"https://{API_HOST}/api/v2/tailnet/-/keys", headers=headers, data=b"[1,") as a:
                assert a.status == 400 and "malformed JSON" in (await a.json())["message"]
            meshbox.Admin(server.store, server.config, server).apikeys_expire(key)
            async with session.get(url, headers=headers) as answer:
                assert answer.status == 401
    run(main())


def test_refused_credentials_lock_out_their_address_only(tmp_path, caplog):
    def get(port, path, headers, source="127.0.0.1", method="GET", body=None):
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10, source_address=(source, 0))
        try:
            connection.request(method, path, body=body, headers=headers)
            answer = connection.getresponse()
            return answer.status, json.loads(answer.read() or b"{}")
        finally:
            connection.close()

    async def main():
        async with api_client(tmp_path) as (server, port, api, session, key):
            good, wrong = {"Authorization": f"Bearer {key}"}, {"Authorization": "Bearer msapi-" + "0" * 48}
            devices = "/api/v2/tailnet/-/devices"
            for attempt in range(meshbox.REGISTER_ATTEMPT_BURST):     # the three doors share one count
                path, headers, method, body = [(devices, wrong, "GET", None), ("/api/v1/users/list", wrong, "POST", b"{}"),
                                               ("/admin/session", {"Content-Type": "application/json"}, "POST",
                                                b'{"key": "msapi-wrong"}')][attempt % 3]
                status, _ = await asyncio.to_thread(get, port, path, headers, method=method, body=body)
                assert status == 401
            status, answer = await asyncio.to_thread(get, port, devices, good)
            assert status == 429 and "too many refused API keys" in answer["message"]
            status, answer = await asyncio.to_thread(get, port, "/api/v1/users/list", good, method="POST", body=b"{}")
            assert status == 429 and "try again in" in answer["error"]
            status, answer = await asyncio.to_thread(get, port, devices, good, source="127.0.0.2")
            assert status == 200 and answer == {"devices": []}
    with caplog.at_level(logging.WARNING, logger="meshbox"):
        run(main())
    assert caplog.text.count("too many refused API keys or sign-ins from address 127.0.0.1") == 1


def test_the_cli_remote_keeps_working_beside_v2(tmp_path):
    async def main():
        async with api_client(tmp_path) as (server, port, api, session, key):
            answer = await asyncio.to_thread(meshbox.api_call, f"http://127.0.0.1:{port}", key, "users", "list", {})
            assert [u["name"] for u in answer["result"]] == ["alice"]
    run(main())


def test_qr_code_round_trips_through_a_decoder():
    zxingcpp = pytest.importorskip("zxingcpp")
    import numpy
    for text in ("x", "tailscale up --login-server http://127.0.0.1:8080 --auth-key mskey-" + "ab" * 24,
                 "é" * 150, "[Interface]\n" + "k" * 600):
        matrix = numpy.array(meshbox.qr_matrix(text), dtype=numpy.uint8)
        image = numpy.kron(numpy.pad(1 - matrix, 4, constant_values=1) * 255, numpy.ones((3, 3))).astype(numpy.uint8)
        (found,) = zxingcpp.read_barcodes(image)
        assert found.text == text and found.ec_level == "M"
    # the CLI's terminal drawing (light blocks on a dark terminal) reads back too
    halves = {"\u2588": (1, 1), "\u2580": (1, 0), "\u2584": (0, 1), " ": (0, 0)}
    config = "[Interface]\nPrivateKey = " + "A" * 43 + "=\n"
    lines = meshbox.qr_terminal_text(config).split("\n")
    pixels = numpy.array([[halves[c][half] for c in line] for line in lines for half in (0, 1)], dtype=numpy.uint8)
    (found,) = zxingcpp.read_barcodes(numpy.kron(pixels * 255, numpy.ones((3, 3))).astype(numpy.uint8))
    assert found.text == config
    with pytest.raises(ValueError, match="too long"):
        meshbox.qr_matrix("x" * 700)
    assert json.dumps(meshbox.qr_svg("x")).count("<svg") == 1


def test_oauth_client_credentials_and_scopes(tmp_path):
    async def main():
        async with api_client(tmp_path) as (server, port, api, session, _):
            admin = meshbox.Admin(server.store, server.config, server)
            reader = admin.oauthclients_create(scopes="devices:core:read,dns")
            full = admin.oauthclients_create()
            assert reader["client_secret"].startswith(meshbox.OAUTH_SECRET_PREFIX)
            with pytest.raises(ValueError, match="unknown scope"):
                admin.oauthclients_create(scopes="devices:everything")
            narrow = tailscale.Tailscale(oauth_client_id=reader["client_id"],
                                         oauth_client_secret=reader["client_secret"], session=session)
            assert await narrow.devices() == {}
            assert (await narrow.set_dns_search_paths(search_paths=["corp.example"])).search_paths == ["corp.example"]
            with pytest.raises(TailscalePermissionError, match="lacks the scope auth_keys"):
                await narrow.create_key()
            with pytest.raises(TailscalePermissionError, match="devices:core"):
                await narrow.delete_device("1")
            everything = tailscale.Tailscale(oauth_client_id=full["client_id"],
                                             oauth_client_secret=full["client_secret"], session=session)
            assert (await everything.create_key()).key

            token_url = f"https://{API_HOST}/api/v2/oauth/token"
            form = {"client_id": reader["client_id"], "client_secret": reader["client_secret"] + "x"}
            async with session.post(token_url, data=form) as answer:
                assert answer.status == 401 and (await answer.json())["error"] == "invalid_client"
            form = {"client_id": reader["client_id"], "client_secret": reader["client_secret"], "scope": "all"}
            async with session.post(token_url, data=form) as answer:
                assert answer.status == 400 and (await answer.json())["error"] == "invalid_scope"
            form["scope"] = "dns"
            async with session.post(token_url, data=form) as answer:
                token = await answer.json()
            assert token["token_type"] == "Bearer" and token["expires_in"] == 3600 and token["scope"] == "dns"
            headers = {"Authorization": f"Bearer {token['access_token']}"}
            async with session.get(f"https://{API_HOST}/api/v2/tailnet/-/devices", headers=headers) as answer:
                assert answer.status == 403        # asked for dns only
            async with session.get(f"https://{API_HOST}/api/v2/tailnet/-/dns/searchpaths", headers=headers) as answer:
                assert answer.status == 200
            admin.oauthclients_expire(reader["client_id"])             # its tokens end with it
            async with session.get(f"https://{API_HOST}/api/v2/tailnet/-/dns/searchpaths", headers=headers) as answer:
                assert answer.status == 401
            assert [c["valid"] for c in admin.oauthclients_list()] == [False, True]
    run(main())


def test_a_node_reporting_odd_netinfo_still_lists(tmp_path):
    async def main():
        async with api_client(tmp_path) as (server, port, api, session, _):
            key = meshbox.Admin(server.store, server.config, server).preauthkeys_create("alice")["key"]
            odd = {"WorkingUDP": ["not", "a", "flag"], "DERPLatency": ["not", "a", "map"], "HairPinning": {"x": 1}}
            node, _ = await joined(port, key, "odd", NetInfo=odd)
            try:
                (device,) = (await api.devices()).values()
                supports = device.client_connectivity.client_supports
                assert supports.udp is None and device.client_connectivity.latency == {}
            finally:
                await node.close()
    run(main())


def test_oauth_clients_made_through_the_keys_endpoint(tmp_path):
    async def main():
        async with api_client(tmp_path) as (server, port, api, session, _):
            client = await api.create_key(key_type="client", scopes=["dns:read", "auth_keys"])
            assert client.key_type == "client" and client.scopes == ["auth_keys", "dns:read"] and client.key
            assert {k.key_id for k in await api.keys()} == {client.key_id}
            reader = tailscale.Tailscale(oauth_client_id=client.key_id, oauth_client_secret=client.key,
                                         session=session)
            assert (await reader.dns_search_paths()).search_paths == []
            with pytest.raises(TailscalePermissionError, match="scope all"):     # no wider client from a narrow one
                await reader.create_key(key_type="client", scopes=["all"])
            with pytest.raises(TailscaleResponseError, match="unknown scope"):
                await api.create_key(key_type="client", scopes=["everything"])
            await api.delete_key(client.key_id)
            assert (await api.key(client.key_id)).invalid
            with pytest.raises(TailscaleUnauthorizedError):
                await reader.dns_search_paths()
    run(main())
