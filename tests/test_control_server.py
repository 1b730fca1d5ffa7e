"""The Control server section of meshbox.py: ts2021's HTTP/2 endpoints (ControlConnection).

Driven by tests/tsclient.py, an in-process Tailscale-protocol client, against
an in-process meshbox.Server on loopback.  Its contract: the early payload
carries the node-key challenge; /machine/register answers a RegisterResponse
(or one with an Error, still 200, as clients expect); /machine/map answers a
length-prefixed message, zstd-compressed when asked, or nothing for an
OmitPeers update; a body that is not a JSON object is a 400 that says so, a
wrong method a 405, an unknown path a 404, a bad MapRequest a 400 or 401
naming the field; errors are plain text and the connection keeps serving.
"""

import asyncio
import json
import struct

import meshbox
import tsclient
from meshproc import new_key, running_server


def run(scenario, tmp_path, **settings):
    async def main():
        async with running_server(tmp_path, **settings) as (server, port):
            client = tsclient.ControlClient("127.0.0.1", port, "laptop")
            await client.connect()
            try:
                await scenario(server, port, client)
            finally:
                await client.close()
    asyncio.run(asyncio.wait_for(main(), 30))


def map_body(body):
    """The single message of a non-streaming map answer: (compressed?, message)."""
    (size,) = struct.unpack("<I", body[:4])
    assert size == len(body) - 4
    payload = body[4:]
    if payload[:4] == meshbox.ZSTD_MAGIC:
        return True, tsclient.decode_map_frame(payload)
    return False, json.loads(payload)


def test_the_early_payload_carries_the_node_key_challenge(tmp_path):
    async def scenario(server, port, client):
        await client.request("/machine/update-health", {})      # the payload has arrived by now
        assert client.early_payload["nodeKeyChallenge"].startswith("chalpub:")
        assert client.early_payload["nodeKeyChallenge"] == meshbox.key_text(
            "chalpub", meshbox.x25519_public(server.challenge_private))
    run(scenario, tmp_path)


def test_register_with_a_key_authorizes_the_machine(tmp_path):
    async def scenario(server, port, client):
        response = await client.register(new_key(server))
        assert response["MachineAuthorized"] is True
        assert response["User"]["LoginName"] == "alice" and response["Login"]["LoginName"] == "alice"
        assert not response.get("Error") and not response.get("AuthURL")
        (node,) = server.coordinator.nodes.values()
        assert node.hostname == "laptop" and meshbox.key_text("nodekey", node.node_key) == client.node_key
        assert node.machine_key == meshbox.x25519_public(client.machine_private)
        assert server.metrics["registrations"] == 1
    run(scenario, tmp_path)


def test_a_refused_registration_is_a_200_with_an_error_and_counted(tmp_path):
    async def scenario(server, port, client):
        response = await client.register("mskey-" + "1" * 48)
        assert "no such pre-auth key" in response["Error"] and not response.get("MachineAuthorized")
        assert server.coordinator.nodes == {} and sum(server.refusals.values()) == 1
        assert server.metrics["registrations"] == 0
    run(scenario, tmp_path)


def test_a_map_poll_answers_one_message_compressed_or_not(tmp_path):
    async def scenario(server, port, client):
        key = new_key(server)
        other = tsclient.ControlClient("127.0.0.1", port, "phone")
        await other.join(key)
        assert (await client.register(key))["MachineAuthorized"]
        status, body = await client.request("/machine/map", client.map_request(stream=False))
        assert status == 200
        compressed, message = map_body(body)
        assert compressed
        assert message["Node"]["Name"] == "laptop.mesh.internal."
        assert [p["Name"] for p in message["Peers"]] == ["phone.mesh.internal."]
        assert {"DERPMap", "DNSConfig", "PacketFilter", "UserProfiles"} <= set(message)
        status, body = await client.request("/machine/map", client.map_request(stream=False, Compress=""))
        assert status == 200 and map_body(body) == (False, dict(message, ControlTime=map_body(body)[1]["ControlTime"]))
        assert server.metrics["map_messages"] >= 2
        await other.close()
    run(scenario, tmp_path)


def test_an_omit_peers_update_answers_nothing_and_records_the_endpoints(tmp_path):
    async def scenario(server, port, client):
        assert (await client.register(new_key(server)))["MachineAuthorized"]
        status, body = await client.request("/machine/map", client.map_request(
            stream=False, OmitPeers=True, endpoints=["198.51.100.4:41641"]))
        assert (status, body) == (200, b"")
        (node,) = server.coordinator.nodes.values()
        assert node.endpoints == ["198.51.100.4:41641"]
    run(scenario, tmp_path)


def test_a_streaming_map_starts_with_the_full_map(tmp_path):
    async def scenario(server, port, client):
        assert (await client.register(new_key(server)))["MachineAuthorized"]
        client.open_map()
        first = await client.next_map_message(timeout=5)
        assert first["Node"]["Name"] == "laptop.mesh.internal." and first["Peers"] == []
        assert client.map_stream.status == 200 and not client.map_stream.ended
    run(scenario, tmp_path)


def test_bad_bodies_methods_and_paths_get_a_clear_error_and_the_connection_serves_on(tmp_path):
    async def scenario(server, port, client):
        cases = [
            ("/machine/register", b"{not json", "POST", 400, "malformed JSON body"),
            ("/machine/register", b"[1, 2]", "POST", 400, "malformed JSON body: expected a JSON object"),
            ("/machine/map", b'"text"', "POST", 400, "expected a JSON object"),
            ("/machine/register", None, "GET", 405, "control requests must be POST"),
            ("/machine/elsewhere", {}, "POST", 404, "/machine/elsewhere is not served here"),
            ("/machine/ssh/action/x/to/y", None, "GET", 404, "expected /machine/ssh/action/SRC_NODE_ID/to/DST"),
        ]
        for path, body, method, status, text in cases:
            got_status, got_body = await client.request(path, body, method=method)
            assert (got_status, text in got_body.decode()) == (status, True), (path, got_status, got_body)
            assert client.streams[max(client.streams)].status == status
        assert server.coordinator.nodes == {}
        assert (await client.register(new_key(server)))["MachineAuthorized"]     # same connection
    run(scenario, tmp_path)


def test_update_health_is_acknowledged(tmp_path):
    async def scenario(server, port, client):
        assert await client.request("/machine/update-health", {"Warnings": {}}) == (200, b"{}")
    run(scenario, tmp_path)


def test_bad_map_requests_name_what_is_wrong(tmp_path):
    async def scenario(server, port, client):
        status, body = await client.request("/machine/map", client.map_request(stream=False))
        assert (status, body) == (401, b"machine not registered\n")
        assert (await client.register(new_key(server)))["MachineAuthorized"]
        request = client.map_request(stream=False)
        del request["NodeKey"]
        assert await client.request("/machine/map", request) == (400, b"MapRequest.NodeKey: missing\n")
        status, body = await client.request("/machine/map", client.map_request(
            stream=False, NodeKey=meshbox.key_text("nodekey", bytes(range(32)))))
        assert status == 401 and b"node key does not match" in body
        status, body = await client.request("/machine/map", client.map_request(stream=False, NodeKey="nodekey:zz"))
        assert status == 400 and body.startswith(b"MapRequest.NodeKey:")
        status, body = await client.request("/machine/map", dict(client.map_request(stream=False), Endpoints="x"))
        assert status == 400 and body.startswith(b"MapRequest.Endpoints:")
        # After all that the node still maps.
        status, body = await client.request("/machine/map", client.map_request(stream=False))
        assert status == 200 and map_body(body)[1]["Node"]["Name"] == "laptop.mesh.internal."
    run(scenario, tmp_path)


def test_set_dns_without_a_dns_hook_is_not_implemented(tmp_path):
    async def scenario(server, port, client):
        assert (await client.register(new_key(server)))["MachineAuthorized"]
        status, body = await client.request("/machine/set-dns", {"NodeKey": client.node_key, "Type": "TXT",
                                                                 "Name": "_acme-challenge.laptop.mesh.internal.",
                                                                 "Value": "abc"})
        assert status == 501 and b"no DNS provider" in body
    run(scenario, tmp_path)


def test_set_dns_refuses_another_machines_node_key(tmp_path):
    async def scenario(server, port, client):
        assert (await client.register(new_key(server)))["MachineAuthorized"]
        status, body = await client.request("/machine/set-dns", {
            "NodeKey": meshbox.key_text("nodekey", bytes(32)), "Type": "TXT",
            "Name": "_acme-challenge.laptop.mesh.internal.", "Value": "abc"})
        assert status == 403 and b"not this machine's" in body
    run(scenario, tmp_path, dns_hook="/bin/true")
