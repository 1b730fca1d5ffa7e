"""Issue 11: Hostinfo and MapRequest are checked against tailcfg's shapes.

What a node sends is kept only where it has its Go type and a bounded size
(the Go client refuses a whole map when one peer's Hostinfo is mistyped);
peers get only the Hostinfo fields a peer needs; a bad value stored by an
older meshbox is cleaned as it loads; logs and CLI tables do not pass
node-supplied control characters through.  The stock-client side is
tests/test_realclients.py::test_stock_clients_survive_a_node_sending_malformed_hostinfo.
"""

import functools
import ipaddress
import json
import logging
import math

import pytest

import hostile_node
import meshbox
import meshproc

# ---- tailcfg's Go types, written out independently of meshbox's checker ----

GO_INT = (-2 ** 63, 2 ** 63 - 1)
STRINGS = ("IPNVersion", "FrontendLogID", "BackendLogID", "OS", "OSVersion", "Env", "Distro", "DistroVersion",
           "DistroCodeName", "App", "Package", "DeviceModel", "PushDeviceToken", "Hostname", "Machine", "GoArch",
           "GoArchVar", "GoVersion", "Cloud", "ServicesHash", "ExitNodeID")
BOOLS = ("Container", "Desktop", "ShieldsUp", "ShareeNode", "NoLogsNoSupport", "RemoteConfig", "WireIngress",
         "IngressEnabled", "AllowsUpdate", "Userspace", "UserspaceRouter", "AppConnector", "PeerRelay",
         "StateEncrypted")
NETINFO = {**{name: "bool" for name in ("MappingVariesByDestIP", "WorkingIPv6", "OSHasIPv6", "WorkingUDP",
                                        "WorkingICMPv4", "HavePortMap", "UPnP", "PMP", "PCP")},
           "PreferredDERP": "int", "LinkType": "string", "FirewallMode": "string", "DERPLatency": ("map", "float")}
HOSTINFO_TYPES = {
    **{name: "string" for name in STRINGS}, **{name: "bool" for name in BOOLS},
    "RoutableIPs": ("list", "prefix"), "RequestTags": ("list", "string"), "WoLMACs": ("list", "string"),
    "Services": ("list", {"Proto": "string", "Port": "port", "Description": "string"}),
    "sshHostKeys": ("list", "string"), "NetInfo": NETINFO,
    "Location": {"Country": "string", "CountryCode": "string", "City": "string", "CityCode": "string",
                 "Latitude": "float", "Longitude": "float", "Priority": "int"},
    "TPM": {"Manufacturer": "string", "Vendor": "string", "Model": "int", "FirmwareVersion": "uint64",
            "SpecRevision": "int", "FamilyIndicator": "string"},
}


@functools.lru_cache(maxsize=4096)         # the fuzz targets check the same few millions of times
def is_canonical_prefix(text):
    try:
        return str(ipaddress.ip_network(text)) == text
    except ValueError:
        return False


@functools.lru_cache(maxsize=4096)
def is_addr_port(text):
    """netip.ParseAddrPort's text: a.b.c.d:port or [v6]:port."""
    host, _, port = text.rpartition(":")
    try:
        address = ipaddress.ip_address(host[1:-1] if host.startswith("[") else host)
    except ValueError:
        return False
    return port.isdigit() and 0 < int(port) < 65536 and (address.version == 6) == host.startswith("[")


def go_type_problems(value, kind, path="Hostinfo"):
    """What encoding/json in a Go client would refuse in value, as kind
    ("string", "int", ..., ("list", kind), ("map", kind), {field: kind})."""
    if value is None:
        return []
    if isinstance(kind, dict):
        if not isinstance(value, dict):
            return [f"{path}: not an object"]
        return [p for name, v in value.items() for p in
                (go_type_problems(v, kind[name], f"{path}.{name}") if name in kind else [f"{path}.{name}: unknown"])]
    if isinstance(kind, tuple):
        container, item = kind
        if container == "list" and isinstance(value, list):
            return [p for i, v in enumerate(value) for p in go_type_problems(v, item, f"{path}[{i}]")]
        if container == "map" and isinstance(value, dict):
            return [p for k, v in value.items() for p in go_type_problems(v, item, f"{path}[{k!r}]")]
        return [f"{path}: not a {container}"]
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = {"string": isinstance(value, str), "bool": isinstance(value, bool),
          "int": number and isinstance(value, int) and GO_INT[0] <= value <= GO_INT[1],
          "uint64": number and isinstance(value, int) and 0 <= value < 2 ** 64,
          "port": number and isinstance(value, int) and 0 <= value <= 65535,
          "float": number and abs(value) <= 1.7976931348623157e308 and math.isfinite(value),
          "prefix": isinstance(value, str) and is_canonical_prefix(value)}[kind]
    return [] if ok else [f"{path}: {value!r:.60} is not a Go {kind}"]


def map_problems(message):
    """Go type problems of every Hostinfo and endpoint a MapResponse carries."""
    problems = []
    for i, node in enumerate([message["Node"]] + message["Peers"]):
        problems += go_type_problems(node.get("Hostinfo"), HOSTINFO_TYPES, f"node {i} Hostinfo")
        problems += [f"node {i} endpoint {e!r:.60}" for e in node.get("Endpoints") or () if not is_addr_port(e)]
    return problems


# ---- a tailnet in process ----

class Tailnet:
    def __init__(self, tmp_path):
        self.path = str(tmp_path / "meshbox.db")
        self.store = meshbox.Store(self.path)
        self.secret = meshproc.store_key(self.store)
        self.coordinator = self.fresh_coordinator()

    def fresh_coordinator(self):
        settings = meshbox.MapSettings(base_domain="mesh.internal", derp_map={"Regions": {}},
                                       dns_config=meshbox.dns_config("mesh.internal", []), control_url="http://x")
        return meshbox.Coordinator(self.store, settings)

    def join(self, i, hostinfo):
        machine, node_key = bytes([i]) * 32, meshbox.key_text("nodekey", bytes([i + 100]) * 32)
        response = self.coordinator.registrar.register(machine, {"NodeKey": node_key, "Auth": {"AuthKey": self.secret},
                                                       "Hostinfo": hostinfo})
        assert response.get("MachineAuthorized"), response
        return machine, node_key

    def map_for(self, machine):
        coordinator = self.coordinator
        node = coordinator.node_by_machine(machine)
        message = meshbox.map_response_for(node, coordinator.policy_views.view_of(node), coordinator.nodes, coordinator.users,
                                           coordinator.settings, meshbox.now())
        json.dumps(message, allow_nan=False)        # valid JSON, as Go reads it (no NaN)
        return message

    def restart(self):
        self.coordinator.flush_live()
        self.store = meshbox.Store(self.path)
        self.coordinator = self.fresh_coordinator()


GOOD = {"Hostname": "laptop", "OS": "linux", "OSVersion": "6.1", "IPNVersion": "1.96.4", "BackendLogID": "b" * 64,
        "GoVersion": "go1.24", "NetInfo": {"PreferredDERP": 900, "WorkingUDP": True, "DERPLatency": {"900-v4": 0.01}},
        "Services": [{"Proto": "peerapi4", "Port": 41000}, {"Proto": "tcp", "Port": 22, "Description": "sshd"}],
        "sshHostKeys": ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIK"], "RequestTags": [], "RoutableIPs": ["10.9.0.0/16"],
        "Location": {"City": "Squamish", "Latitude": 49.7, "Longitude": -123.1}, "ShareeNode": False}


def shaped(shape):
    return {**GOOD, **shape} if isinstance(shape, dict) else shape


# ---- the checks ----

@pytest.mark.parametrize("name", sorted(hostile_node.SHAPES))
def test_each_wrong_shape_leaves_a_go_shaped_hostinfo_and_a_working_map(tmp_path, name):
    net = Tailnet(tmp_path)
    viewer, _ = net.join(1, GOOD)
    hostile, hostile_key = net.join(2, shaped(hostile_node.SHAPES[name]))
    for machine in (viewer, hostile):
        assert map_problems(net.map_for(machine)) == []
    node = net.coordinator.node_by_machine(hostile)
    assert go_type_problems(node.hostinfo, HOSTINFO_TYPES) == []
    assert len(meshbox.json_bytes(node.hostinfo)) <= meshbox.HOSTINFO_MAX_BYTES


@pytest.mark.parametrize("shape, field", [
    ({"NetInfo": [1]}, "NetInfo"),
    ({"NetInfo": {"PreferredDERP": "900", "WorkingUDP": True}}, "NetInfo.PreferredDERP"),
    ({"NetInfo": {"PreferredDERP": 2 ** 70}}, "NetInfo.PreferredDERP"),
    ({"NetInfo": {"MappingVariesByDestIP": "true"}}, "NetInfo.MappingVariesByDestIP"),
    ({"NetInfo": {"DERPLatency": {"900-v4": float("nan"), "1-v4": 0.5}}}, "NetInfo.DERPLatency"),
    ({"NetInfo": {"DERPLatency": {"900-v4": "fast"}}}, "NetInfo.DERPLatency"),
    ({"Services": [{"Proto": "tcp", "Port": 70000}, {"Proto": "tcp", "Port": 22}]}, "Services"),
    ({"Hostname": ["x"]}, "Hostname"),
    ({"Hostname": "h" * 257}, "Hostname"),
    ({"ShieldsUp": "yes"}, "ShieldsUp"),
    ({"sshHostKeys": "key"}, "sshHostKeys"),
    ({"Location": {"Latitude": "north"}}, "Location.Latitude"),
    ({"Location": {"Longitude": 10 ** 400}}, "Location.Longitude"),
    ({"TPM": {"FirmwareVersion": -1}}, "TPM.FirmwareVersion"),
    ({"RoutableIPs": ["10.0.0.0/33", "10.1.0.0/16"]}, "RoutableIPs"),
])
def test_a_bad_part_is_dropped_with_a_log_line_naming_it(caplog, shape, field):
    with caplog.at_level(logging.WARNING, logger="meshbox"):
        out = meshbox.checked_hostinfo({**GOOD, **shape}, "node 7 hostile")
    lines = [r.getMessage() for r in caplog.records]
    assert any("node 7 hostile" in line and f", {field}:" in line for line in lines), lines
    assert go_type_problems(out, HOSTINFO_TYPES) == []
    assert out["OS"] == GOOD["OS"] and (field == "Hostname" or out["Hostname"] == GOOD["Hostname"])  # the rest kept
    if field == "NetInfo.DERPLatency" and "1-v4" in shape["NetInfo"]["DERPLatency"]:
        assert out["NetInfo"]["DERPLatency"] == {"1-v4": 0.5}
    if field == "Services":
        assert out["Services"] == [{"Proto": "tcp", "Port": 22}]
    if field == "RoutableIPs":
        assert out["RoutableIPs"] == ["10.1.0.0/16"]


def test_a_node_repeating_bad_hostinfo_cannot_flood_the_log(tmp_path, caplog, monkeypatch):
    """A node that sends a bad Hostinfo in every map request (hundreds a
    second) has its problems logged for a few requests, then one line saying
    the rest are not, until the quota refills; another node's are still logged."""
    clock = [1000.0]
    monkeypatch.setattr(meshbox, "now", lambda: clock[0])
    net = Tailnet(tmp_path)
    bad, bad_key = net.join(1, GOOD)
    other, other_key = net.join(2, GOOD)
    bad_hostinfo = {**GOOD, "OSVersion": ["x"], "ShieldsUp": "yes"}      # two problems each time

    def lines_after(machine, node_key, hostinfo, times):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="meshbox"):
            for _ in range(times):
                net.coordinator.node_for_map(machine, {"NodeKey": node_key, "Hostinfo": hostinfo})
        return [r.getMessage() for r in caplog.records]

    burst = meshbox.HOSTINFO_LOG_BURST
    first = lines_after(bad, bad_key, bad_hostinfo, 200)
    assert len(first) == 2 * burst + 1 and all("node 1 laptop" in line for line in first), first
    assert "not logged for" in first[-1]
    assert any("node 2 " in line and ", ShieldsUp:" in line for line in lines_after(other, other_key, bad_hostinfo, 1))
    clock[0] += meshbox.HOSTINFO_LOG_INTERVAL
    assert len(lines_after(bad, bad_key, bad_hostinfo, 200)) in (2, 3)     # one more Hostinfo's worth


def test_unknown_fields_are_dropped_quietly(caplog):
    with caplog.at_level(logging.WARNING, logger="meshbox"):
        out = meshbox.checked_hostinfo({**GOOD, "FutureField": {"x": 1}, "hostname": "other"})
    assert "FutureField" not in out and "hostname" not in out and out["Hostname"] == "laptop"
    assert not caplog.records


def test_caps_on_lists_and_on_the_whole():
    out = meshbox.checked_hostinfo({
        "Hostname": "n", "Services": [{"Proto": "tcp", "Port": i} for i in range(meshbox.HOSTINFO_MAX_SERVICES + 5)],
        "sshHostKeys": ["k"] * (meshbox.HOSTINFO_MAX_HOST_KEYS + 1),
        "RequestTags": ["tag:x"] * (meshbox.HOSTINFO_MAX_ITEMS + 1)})
    assert len(out["Services"]) == meshbox.HOSTINFO_MAX_SERVICES
    assert len(out["sshHostKeys"]) == meshbox.HOSTINFO_MAX_HOST_KEYS
    assert len(out["RequestTags"]) == meshbox.HOSTINFO_MAX_ITEMS
    big = meshbox.checked_hostinfo({**GOOD, "Services": [{"Proto": "tcp", "Port": i, "Description": "d" * 250}
                                                         for i in range(meshbox.HOSTINFO_MAX_SERVICES)]})
    assert len(meshbox.json_bytes(big)) <= meshbox.HOSTINFO_MAX_BYTES
    assert "Services" not in big and big["Hostname"] == "laptop" and big["OS"] == "linux"
    escaped = {name: "\U0001f600" * 256 for name in STRINGS}     # 12 bytes a character once encoded
    worst = meshbox.checked_hostinfo(escaped)
    assert 0 < len(meshbox.json_bytes(worst)) <= meshbox.HOSTINFO_MAX_BYTES and "Hostname" in worst


def test_peers_get_only_the_fields_a_peer_needs_and_the_node_all(tmp_path):
    net = Tailnet(tmp_path)
    a, _ = net.join(1, GOOD)
    b, _ = net.join(2, {"Hostname": "phone", "OS": "android"})
    seen_by_b = net.map_for(b)["Peers"][0]["Hostinfo"]
    assert seen_by_b == {"Hostname": "laptop", "OS": "linux", "OSVersion": "6.1", "ShareeNode": False,
                         "sshHostKeys": GOOD["sshHostKeys"], "Location": GOOD["Location"],
                         "Services": [{"Proto": "peerapi4", "Port": 41000}]}
    assert net.map_for(a)["Node"]["Hostinfo"] == GOOD


def test_peers_hear_of_a_hostinfo_change_only_when_their_part_changes(tmp_path):
    net = Tailnet(tmp_path)
    machine, node_key = net.join(1, GOOD)
    net.join(2, {"Hostname": "phone", "OS": "android"})
    coordinator = net.coordinator

    def report(hostinfo):
        before = coordinator.fanout.generation
        coordinator.node_for_map(machine, {"NodeKey": node_key, "Hostinfo": hostinfo})
        assert coordinator.node_by_machine(machine).hostinfo == hostinfo     # kept for the node and the admin
        return coordinator.fanout.generation != before

    assert not report({**GOOD, "BackendLogID": "c" * 64, "IPNVersion": "1.96.5"})   # control's fields only
    assert not report({**GOOD, "BackendLogID": "d" * 64, "NetInfo": {**GOOD["NetInfo"], "WorkingUDP": False}})
    assert report({**GOOD, "Hostname": "laptop-2"})
    assert report({**GOOD, "Hostname": "laptop-2", "NetInfo": {**GOOD["NetInfo"], "PreferredDERP": 901}})
    assert net.map_for(net.join(3, {"Hostname": "tablet"})[0])["Peers"][0]["HomeDERP"] == 901


def test_a_restart_heals_a_bad_value_an_older_version_stored(tmp_path):
    net = Tailnet(tmp_path)
    viewer, _ = net.join(1, GOOD)
    hostile, _ = net.join(2, GOOD)
    node = net.coordinator.node_by_machine(hostile)
    net.store.update_node(node.id, hostinfo={**GOOD, "NetInfo": [1], "Services": {"x": 1}},
                          endpoints=["192.0.2.1:41641", "garbage"])
    net.restart()
    healed = net.coordinator.node_by_machine(hostile)
    assert "NetInfo" not in healed.hostinfo and "Services" not in healed.hostinfo
    assert healed.hostinfo["Hostname"] == "laptop" and healed.endpoints == []
    assert map_problems(net.map_for(viewer)) == []


@pytest.mark.parametrize("field, value", [
    ("Stream", "yes"), ("Version", "130"), ("Version", 2 ** 64), ("KeepAlive", 1), ("OmitPeers", []),
    ("ReadOnly", {}), ("Compress", 5), ("Endpoints", "192.0.2.1:1"), ("Endpoints", ["192.0.2.1"]),
    ("Endpoints", ["192.0.2.1:1"] * (meshbox.MAX_ENDPOINTS + 1)), ("Endpoints", ["[::1]:99999"]),
    ("EndpointTypes", ["x"]), ("DebugFlags", [1]), ("DiscoKey", "discokey:zz"), ("Hostinfo", [1]),
    ("NodeKey", 5),
])
def test_a_mistyped_map_request_field_is_refused_naming_it(tmp_path, field, value):
    net = Tailnet(tmp_path)
    machine, node_key = net.join(1, GOOD)
    before = net.coordinator.node_by_machine(machine).endpoints
    with pytest.raises(meshbox.MapRefused) as refused:
        net.coordinator.node_for_map(machine, {"NodeKey": node_key, "Stream": True, field: value})
    assert refused.value.status == 400 and f"MapRequest.{field}" in str(refused.value)
    assert net.coordinator.node_by_machine(machine).endpoints == before


def test_endpoints_are_kept_canonical(tmp_path):
    net = Tailnet(tmp_path)
    machine, node_key = net.join(1, GOOD)
    net.coordinator.node_for_map(machine, {"NodeKey": node_key, "Endpoints": ["192.0.2.1:41641", "[2001:db8::1]:7"],
                                           "EndpointTypes": [1, 2], "DebugFlags": ["x"], "Version": 130})
    node = net.coordinator.node_by_machine(machine)
    assert node.endpoints == ["192.0.2.1:41641", "[2001:db8::1]:7"] and node.cap == 130


def test_register_hostinfo_is_checked_too(tmp_path, caplog):
    net = Tailnet(tmp_path)
    with caplog.at_level(logging.WARNING, logger="meshbox"):
        machine, _ = net.join(1, {**GOOD, "NetInfo": [1], "Hostname": "x" * 1000})
    node = net.coordinator.node_by_machine(machine)
    assert "NetInfo" not in node.hostinfo and node.given_name == "node"
    assert any("registering machine mkey:" in r.getMessage() and "NetInfo" in r.getMessage()
               for r in caplog.records)


FORGED = "evil\nINFO forged line\r\x1b[31mred\x00\u2028"


def test_log_lines_escape_control_characters():
    record = logging.LogRecord("meshbox", logging.INFO, __file__, 1, "node %s joined", (FORGED,), None)
    text = meshbox.TextLogFormatter("%(levelname)s %(message)s").format(record)
    assert "\n" not in text and "\r" not in text and "\x1b" not in text and "\x00" not in text
    assert "\u2028" not in text and "evil\\nINFO forged line" in text
    line = meshbox.JsonLogFormatter().format(record)
    assert "\n" not in line and json.loads(line)["message"] == f"node {FORGED} joined"


def test_table_cells_strip_terminal_sequences():
    assert meshbox.cell(FORGED) == "evilINFO forged linered"
    assert meshbox.cell(["192.0.2.1:1\x1b]0;title\x07", "x\x1b[2J"]) == "192.0.2.1:1,x"
    assert meshbox.cell(None) == "-" and meshbox.cell([]) == "-" and meshbox.cell(5) == "5"
