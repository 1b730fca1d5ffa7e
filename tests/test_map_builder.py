"""The Map builder section of meshbox.py: node records and settings in, tailcfg JSON out.

Its contract, for a small hand-built tailnet (no server, no sockets):
map_response_for gives a node the fields a client needs (Node, Peers,
DERPMap, DNSConfig, Domain, PacketFilter, SSHPolicy, UserProfiles,
ControlTime) shaped as tailcfg has them; peers are the view's, never the node
itself, and carry only the peer part of their Hostinfo; tagged nodes belong
to "Tagged Devices"; expired, offline and gateway nodes are marked so; the
default policy gives each subnet one primary router; dns_config, derp_map and
sanitize_hostname build their parts as clients read them.
"""

import dataclasses
import json

import pytest

import meshbox

AT = 1_700_000_000.0
BASE = "mesh.internal"


def node(i, user_id=1, **fields):
    values = dict(id=i, machine_key=bytes([i, 1]) * 16, node_key=bytes([i, 2]) * 16, disco_key=bytes([i, 3]) * 16,
                  user_id=user_id, hostname=f"host{i}", given_name=f"host{i}", ipv4=f"100.64.0.{i}",
                  ipv6=f"fd7a:115c:a1e0::{i:x}", tags=[], ephemeral=False, auth_key_id=None, expiry=None,
                  created=AT - 86400, last_seen=AT - 60, endpoints=[f"192.0.2.{i}:41641"], approved_routes=[],
                  cap=130, online=True,
                  hostinfo={"Hostname": f"host{i}", "OS": "linux", "BackendLogID": f"secret-log-{i}",
                            "IPNVersion": "1.90.0", "NetInfo": {"PreferredDERP": 900}})
    values.update(fields)
    return meshbox.Node(**values)


USERS = {1: meshbox.User(1, "alice", AT), 2: meshbox.User(2, "bob@example.com", AT), 3: meshbox.User(3, "carol", AT)}


def settings(**kw):
    return meshbox.MapSettings(base_domain=BASE, derp_map=meshbox.derp_map("203.0.113.1", 8443, [3478], ""),
                               dns_config=meshbox.dns_config(BASE, ["192.0.2.53"]), control_url="http://ctl", **kw)


def default_maps(nodes, **kw):
    """Every node's MapResponse under the default (allow-all) policy."""
    table = {n.id: n for n in nodes}
    entries = meshbox.allow_all_entries(nodes)
    return {n.id: meshbox.map_response_for(n, meshbox.allow_all_view(entries, n.id), table, USERS, settings(**kw), AT)
            for n in nodes}


def test_a_map_response_has_every_field_a_client_needs():
    nodes = [node(1), node(2, user_id=2), node(3, tags=["tag:server"])]
    message = default_maps(nodes)[1]
    assert set(message) == {"Node", "Peers", "DERPMap", "DNSConfig", "Domain", "PacketFilter", "SSHPolicy",
                            "UserProfiles", "ControlTime"}
    me = message["Node"]
    assert me["ID"] == 1 and me["StableID"] == "n1" and me["Name"] == "host1.mesh.internal."
    assert me["Addresses"] == ["100.64.0.1/32", "fd7a:115c:a1e0::1/128"] == me["AllowedIPs"]
    assert me["Key"] == "nodekey:" + (bytes([1, 2]) * 16).hex()
    assert me["Machine"].startswith("mkey:") and me["DiscoKey"].startswith("discokey:")
    assert (me["HomeDERP"], me["DERP"]) == (900, "127.3.3.40:900")
    assert me["MachineAuthorized"] is True and me["Online"] is True and me["Cap"] == 130
    assert me["Created"] == meshbox.rfc3339(AT - 86400)
    assert me["Hostinfo"]["BackendLogID"] == "secret-log-1"      # its own, whole
    assert [p["ID"] for p in message["Peers"]] == [2, 3]
    assert message["DERPMap"]["Regions"]["900"]["Nodes"][0]["HostName"] == "203.0.113.1"
    assert message["DNSConfig"]["Resolvers"] == [{"Addr": "192.0.2.53"}]
    assert message["Domain"] == BASE and message["ControlTime"] == meshbox.rfc3339(AT)
    assert message["PacketFilter"] == meshbox.ALLOW_ALL_RULES and message["SSHPolicy"] == {"rules": []}
    json.loads(meshbox.json_bytes(message))             # it serializes as it is


def test_peers_carry_only_the_peer_part_of_their_hostinfo():
    message = default_maps([node(1), node(2, hostinfo={"Hostname": "host2", "OS": "windows", "OSVersion": "11",
                                                       "BackendLogID": "log-2", "NetInfo": {"PreferredDERP": 900},
                                                       "Services": [{"Proto": "peerapi4", "Port": 1},
                                                                    {"Proto": "tcp", "Port": 22}]})])[1]
    (peer,) = message["Peers"]
    assert peer["Hostinfo"] == {"Hostname": "host2", "OS": "windows", "OSVersion": "11",
                                "Services": [{"Proto": "peerapi4", "Port": 1}]}
    assert peer["HomeDERP"] == 900                     # the home region is told apart from the Hostinfo


def test_user_profiles_name_the_owners_and_tagged_nodes_belong_to_tagged_devices():
    nodes = [node(1), node(2, user_id=2), node(3, user_id=3, tags=["tag:server"])]
    message = default_maps(nodes)[1]
    assert message["UserProfiles"] == [{"ID": 1, "LoginName": "alice", "DisplayName": "alice"},
                                       {"ID": 2, "LoginName": "bob@example.com", "DisplayName": "bob@example.com"},
                                       meshbox.TAGGED_DEVICES]
    tagged = message["Peers"][1]
    assert tagged["User"] == meshbox.TAGGED_DEVICES["ID"] and tagged["Tags"] == ["tag:server"]
    assert message["Peers"][0]["User"] == 2
    # Carol owns only a tagged node: she is not among the profiles.
    assert all(p["ID"] != 3 for p in message["UserProfiles"])
    # A user unknown to the table is left out rather than failing.
    alone = default_maps([node(1, user_id=99)])[1]
    assert alone["UserProfiles"] == []


def test_expired_offline_and_never_expiring_nodes_are_marked():
    nodes = [node(1), node(2, expiry=AT - 1, online=False), node(3, expiry=AT + 3600), node(4, last_seen=None,
                                                                                           online=False)]
    peers = {p["ID"]: p for p in default_maps(nodes)[1]["Peers"]}
    assert peers[2]["Expired"] is True and peers[2]["KeyExpiry"] == meshbox.rfc3339(AT - 1)
    assert peers[2]["LastSeen"] == meshbox.rfc3339(AT - 60) and peers[2]["Online"] is False
    assert "Expired" not in peers[3] and peers[3]["KeyExpiry"] == meshbox.rfc3339(AT + 3600)
    assert "LastSeen" not in peers[3]                  # online: no last-seen time
    assert "KeyExpiry" not in peers[4] and "LastSeen" not in peers[4]


def test_an_expired_nodes_view_shows_no_peers_and_allows_nothing():
    nodes = [node(1, expiry=AT - 5), node(2)]
    table = {n.id: n for n in nodes}
    message = meshbox.map_response_for(nodes[0], meshbox.NO_PEERS_VIEW, table, USERS, settings(), AT)
    assert message["Peers"] == [] and message["PacketFilter"] == [] and message["SSHPolicy"] == {"rules": []}
    assert message["Node"]["Expired"] is True


def test_the_gateway_is_a_wireguard_only_peer_without_disco_or_derp():
    gateway = node(5, kind=meshbox.NODE_GATEWAY, expiry=AT - 1, online=False)
    (peer,) = default_maps([node(1), gateway])[1]["Peers"]
    assert peer["IsWireGuardOnly"] is True and peer["Endpoints"] == ["192.0.2.5:41641"]
    for absent in ("DiscoKey", "HomeDERP", "DERP", "KeyExpiry", "Expired", "LastSeen"):
        assert absent not in peer, absent


def test_the_default_policy_gives_each_subnet_one_primary_router():
    routes = ["10.1.0.0/24", "0.0.0.0/0", "::/0"]
    hostinfo = {"Hostname": "r", "OS": "linux", "RoutableIPs": routes + ["10.9.0.0/24"]}
    first = node(2, hostinfo=hostinfo, approved_routes=routes)          # 10.9.0.0/24 advertised, not approved
    second = node(3, hostinfo=hostinfo, approved_routes=routes)
    peers = {p["ID"]: p for p in default_maps([node(1), first, second])[1]["Peers"]}
    assert peers[2]["AllowedIPs"] == ["100.64.0.2/32", "fd7a:115c:a1e0::2/128", "10.1.0.0/24", "0.0.0.0/0", "::/0"]
    assert peers[2]["PrimaryRoutes"] == ["10.1.0.0/24"]
    assert peers[3]["AllowedIPs"] == ["100.64.0.3/32", "fd7a:115c:a1e0::3/128", "0.0.0.0/0", "::/0"]
    assert "PrimaryRoutes" not in peers[3]
    assert all("10.9.0.0/24" not in p["AllowedIPs"] for p in peers.values())


def test_a_policy_view_decides_which_peers_a_node_sees():
    nodes = [node(1), node(2, user_id=2), node(3, user_id=3, tags=["tag:server"])]
    policy = meshbox.parse_policy(json.dumps({
        "tagOwners": {"tag:server": ["carol@"]},
        "acls": [{"action": "accept", "src": ["alice@"], "dst": ["tag:server:22"]}]}))
    compiled = meshbox.compile_policy(policy, meshbox.policy_topology(nodes, USERS))
    table = {n.id: n for n in nodes}
    alice = meshbox.map_response_for(nodes[0], compiled[1], table, USERS, settings(), AT)
    bob = meshbox.map_response_for(nodes[1], compiled[2], table, USERS, settings(), AT)
    server = meshbox.map_response_for(nodes[2], compiled[3], table, USERS, settings(), AT)
    assert [p["ID"] for p in alice["Peers"]] == [3]
    assert bob["Peers"] == [] and bob["PacketFilter"] == []
    assert [p["ID"] for p in server["Peers"]] == [1]
    (rule,) = server["PacketFilter"]
    assert "100.64.0.1" in json.dumps(rule["SrcIPs"]) and rule["DstPorts"][0]["Ports"] == {"First": 22, "Last": 22}


def test_policy_topology_names_nodes_by_id():
    nodes = [node(7, user_id=2, tags=["tag:x"], approved_routes=["10.0.0.0/8"],
                  hostinfo={"Hostname": "h", "RoutableIPs": ["10.0.0.0/8"]})]
    topology = meshbox.policy_topology(nodes, USERS)
    assert topology["nodes"] == {7: {"id": 7, "hostname": 7, "tags": ["tag:x"], "user_id": 2,
                                       "user": "bob@example.com", "ipv4": "100.64.0.7", "ipv6": "fd7a:115c:a1e0::7",
                                       "routable_ips": ["10.0.0.0/8"], "approved_routes": ["10.0.0.0/8"]}}
    assert {"id": 2, "name": "bob@example.com", "email": "bob@example.com"} in topology["users"]
    assert {"id": 1, "name": "alice", "email": ""} in topology["users"]


def test_capabilities_merge_the_tailnets_and_the_policys():
    nodes = [node(1), node(2)]
    entries = meshbox.allow_all_entries(nodes)
    view = dataclasses.replace(meshbox.allow_all_view(entries, 1), cap_map={"cap:b": [{"x": 1}], "cap:a": ["from policy"]})
    message = meshbox.map_response_for(nodes[0], view, {n.id: n for n in nodes}, USERS,
                                       settings(node_caps={"cap:a": None, "cap:c": None}), AT)
    assert message["Node"]["CapMap"] == {"cap:a": ["from policy"], "cap:b": [{"x": 1}], "cap:c": None}
    plain = default_maps(nodes)[1]["Node"]
    assert "CapMap" not in plain


def test_cert_domains_name_only_the_nodes_own_fqdn_and_leave_the_settings_alone():
    s = settings(cert_domains=True)
    nodes = [node(1), node(2)]
    table = {n.id: n for n in nodes}
    entries = meshbox.allow_all_entries(nodes)
    one = meshbox.map_response_for(nodes[0], meshbox.allow_all_view(entries, 1), table, USERS, s, AT)
    two = meshbox.map_response_for(nodes[1], meshbox.allow_all_view(entries, 2), table, USERS, s, AT)
    assert one["DNSConfig"]["CertDomains"] == ["host1.mesh.internal"]
    assert two["DNSConfig"]["CertDomains"] == ["host2.mesh.internal"]
    assert "CertDomains" not in s.dns_config
    assert "CertDomains" not in default_maps(nodes)[1]["DNSConfig"]


def test_dns_config_shapes():
    config = meshbox.dns_config(BASE, ["192.0.2.53", "2001:db8::53"], {"corp.example": ["10.0.0.53"],
                                                                      "lab.example.": ["10.1.0.53"]},
                                ["corp.example", BASE], [{"name": "wiki.mesh.internal", "value": "100.64.0.9"},
                                                         {"name": "v6", "type": "AAAA", "value": "fd00::9"}],
                                magic_dns=False)
    assert config == {
        "Domains": [BASE, "corp.example"], "Proxied": False,
        "Resolvers": [{"Addr": "192.0.2.53"}, {"Addr": "2001:db8::53"}],
        "Routes": {"corp.example.": [{"Addr": "10.0.0.53"}], "lab.example.": [{"Addr": "10.1.0.53"}]},
        "ExtraRecords": [{"Name": "wiki.mesh.internal", "Type": "A", "Value": "100.64.0.9"},
                         {"Name": "v6", "Type": "AAAA", "Value": "fd00::9"}]}
    assert meshbox.dns_config(BASE) == {"Domains": [BASE], "Proxied": True}


@pytest.mark.parametrize("host, ipv4, ipv6", [
    ("203.0.113.1", "203.0.113.1", "none"), ("2001:db8::1", "none", "2001:db8::1"), ("derp.example", "", "")])
def test_derp_map_pins_an_address_host_and_leaves_a_name_to_dns(host, ipv4, ipv6):
    derp = meshbox.derp_map(host, 8443, [], "derp.example")
    (node_entry,) = derp["Regions"]["900"]["Nodes"]
    assert (node_entry["HostName"], node_entry["IPv4"], node_entry["IPv6"]) == (host, ipv4, ipv6)
    assert node_entry["STUNPort"] == -1 and node_entry["DERPPort"] == 8443 and node_entry["CertName"] == "derp.example"
    assert derp["OmitDefaultRegions"] is True and "HomeParams" not in derp


@pytest.mark.parametrize("given, label", [
    ("Alice's MacBook Pro", "alice-s-macbook-pro"), ("--web--01--", "web-01"), ("Ünïcode", "n-code"),
    ("", "node"), (None, "node"), ("!!!", "node"), ("a" * 70, "a" * 63), ("x" * 62 + "-y", "x" * 62),
    ("ok-name", "ok-name")])
def test_sanitize_hostname_makes_a_dns_label(given, label):
    assert meshbox.sanitize_hostname(given) == label
