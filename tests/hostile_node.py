"""A hostile simulated node: every wrong Hostinfo shape it can think of, for
tests that run it where the test process cannot reach (inside a network
namespace).

    python3 tests/hostile_node.py HOST PORT AUTH_KEY

One node per shape registers with that Hostinfo and opens its streaming map
with it; one more node, joined with a good Hostinfo, then sends each shape in
turn as the "lite" endpoint update, then each wrong MapRequest field
(MAP_SHAPES).  Every request is bounded in time.  It prints what the server
made of each, as JSON: {"register": {shape: "ok" or the error}, "update":
{shape: HTTP status or the error}, "map_request": {shape: the same}}; what
it asserts is the caller's business (the server may refuse a shape or drop
its bad parts).
"""

import argparse
import asyncio
import json

import tsclient

REQUEST_TIMEOUT = 5.0
DEEP = 500              # far past any tailcfg shape, within what json.dumps nests


def nested(depth, leaf):
    """[[...[leaf]...]], `depth` lists deep."""
    for _ in range(depth):
        leaf = [leaf]
    return leaf


# Each shape replaces or adds these fields on an otherwise well-formed
# Hostinfo; a shape that is not a dict is sent as the whole Hostinfo.
SHAPES = {
    "hostinfo-list": [1],
    "hostinfo-string": "x",
    "hostinfo-number": 7,
    "netinfo-list": {"NetInfo": [1]},
    "netinfo-string": {"NetInfo": "x"},
    "netinfo-number": {"NetInfo": 1},
    "preferred-derp-string": {"NetInfo": {"PreferredDERP": "x"}},
    "preferred-derp-float": {"NetInfo": {"PreferredDERP": 900.5}},
    "preferred-derp-huge": {"NetInfo": {"PreferredDERP": 2 ** 80}},
    "preferred-derp-negative": {"NetInfo": {"PreferredDERP": -1}},
    "preferred-derp-bool": {"NetInfo": {"PreferredDERP": True}},
    "derp-latency-list": {"NetInfo": {"DERPLatency": []}},
    "derp-latency-values": {"NetInfo": {"DERPLatency": {"900-v4": "x", "1-v6": [1]}}},
    "netinfo-fields": {"NetInfo": {"WorkingUDP": "yes", "HavePortMap": [], "LinkType": 5, "MappingVariesByDestIP": {},
                                   "UPnP": "x", "FirewallMode": [1]}},
    "services-object": {"Services": {}},
    "services-numbers": {"Services": [1]},
    "services-fields": {"Services": [{"Proto": 1, "Port": "x", "Description": []}, None, "tcp"]},
    "services-many": {"Services": [{"Proto": "tcp", "Port": i, "Description": "s"} for i in range(15000)]},
    "routable-string": {"RoutableIPs": "x"},
    "routable-mixed": {"RoutableIPs": [1, None, {}, "10.0.0.0/33", "::/129"]},
    "request-tags-string": {"RequestTags": "tag:x"},
    "request-tags-mixed": {"RequestTags": [1, None, ["tag:x"]]},
    "hostname-list": {"Hostname": ["x"]},
    "hostname-null": {"Hostname": None},
    "hostname-object": {"Hostname": {"a": 1}},
    "hostname-control": {"Hostname": "evil\nINFO forged line\x1b[31m\x00"},
    "hostname-huge": {"Hostname": "h" * 500_000},
    "os-number": {"OS": 5, "OSVersion": [], "GoVersion": {}, "IPNVersion": 1.5},
    "flags-strings": {"ShieldsUp": "x", "Userspace": [], "NoLogsNoSupport": {}, "WireIngress": 1},
    "ssh-host-keys": {"sshHostKeys": "x"},
    "ssh-host-keys-mixed": {"sshHostKeys": [1, {}, "k" * 100_000]},
    "ssh-host-keys-many": {"sshHostKeys": ["ssh-ed25519 " + "A" * 68] * 5000},
    "ssh-host-keys-go-name": {"SSH_HostKeys": [1]},
    "derp-latency-nan": {"NetInfo": {"DERPLatency": {"900-v4": float("nan"), "1-v4": float("inf")}}},
    "derp-latency-huge": {"NetInfo": {"DERPLatency": {f"{i}-v4": 0.1 for i in range(20000)}}},
    "opt-bool-strings": {"NetInfo": {"MappingVariesByDestIP": "true", "UPnP": "false", "PMP": 1},
                         "Container": "true", "AppConnector": 0},
    "location-fields": {"Location": {"Latitude": "north", "Longitude": float("nan"), "Priority": 1.5,
                                     "City": ["x"]}},
    "tpm-fields": {"TPM": {"FirmwareVersion": -1, "Model": 2 ** 64, "Vendor": 7}, "WoLMACs": "aa:bb"},
    "services-peerapi-bad": {"Services": [{"Proto": "peerapi4", "Port": -1}, {"Proto": "peerapi6", "Port": 2 ** 40},
                                          {"Proto": "peerapi-dns-proxy", "Port": 1, "Description": 5}]},
    "strings-long": {name: "s" * 4000 for name in ("OS", "OSVersion", "IPNVersion", "BackendLogID", "GoVersion")},
    "unicode-escapes": {"Hostname": "\U0001f600" * 256, "OS": "\ud800" * 200, "Distro": "\x1b]0;t\x07"},
    "location": {"Location": [1, 2]},
    "app-connector": {"AppConnector": "x"},
    "nulls": {"NetInfo": None, "Services": None, "RoutableIPs": None, "RequestTags": None},
    "deep-nesting": {"NetInfo": {"DERPLatency": nested(DEEP, 1)}, "Services": nested(DEEP, {})},
    "many-keys": {f"K{i}": i for i in range(30000)},
    "huge-hostinfo": {"Services": [{"Proto": "tcp", "Port": i, "Description": "d" * 850} for i in range(1000)]},
}

# MapRequest fields of the wrong type or size, sent beside a good Hostinfo:
# the server answers each with a 400 naming the field.
MAP_SHAPES = {
    "endpoints-string": {"Endpoints": "192.0.2.1:41641"},
    "endpoints-garbage": {"Endpoints": [1, None, "x", "192.0.2.1", "[::1]:99999", "300.1.1.1:1", {}]},
    "endpoints-many": {"Endpoints": [f"192.0.2.{i % 250 + 1}:{i + 1}" for i in range(5000)]},
    "endpoint-types": {"EndpointTypes": ["x", None]},
    "version-string": {"Version": "130"},
    "version-huge": {"Version": 2 ** 70},
    "stream-string": {"Stream": "yes"},
    "keepalive-number": {"KeepAlive": 1},
    "omitpeers-list": {"OmitPeers": []},
    "compress-number": {"Compress": 5},
    "debug-flags": {"DebugFlags": "x"},
    "disco-key-bad": {"DiscoKey": "discokey:zz"},
}


def hostinfo_with(client, shape):
    """A Hostinfo builder for `client` that carries `shape`."""
    good = tsclient.ControlClient.hostinfo(client)
    return (lambda: {**good, **shape}) if isinstance(shape, dict) else (lambda: shape)


async def register_with(host, port, auth_key, server_public, name, shape):
    """A fresh node that registers and opens its map with `shape`: "ok" or why not."""
    client = tsclient.ControlClient(host, port, f"hostile-{name}")
    client.hostinfo = hostinfo_with(client, shape)
    try:
        await client.join(auth_key, REQUEST_TIMEOUT, server_public)
        return "ok"
    except Exception as err:  # the report says what the server made of it
        return f"{type(err).__name__}: {err}"[:300]
    finally:
        await client.close()


async def update_with(client, shape, fields=None):
    """Send `shape` as the lite endpoint update (with MapRequest `fields`
    replaced): the HTTP status, or why none."""
    client.hostinfo = hostinfo_with(client, shape)
    try:
        status, _ = await client.request("/machine/map", {**client.map_request(stream=False, OmitPeers=True),
                                                          **(fields or {})}, REQUEST_TIMEOUT)
        return status
    except Exception as err:
        return f"{type(err).__name__}: {err}"[:300]


async def attack(host, port, auth_key):
    server_public = await tsclient.fetch_server_key(host, port, timeout=REQUEST_TIMEOUT)
    registered = await asyncio.gather(*(register_with(host, port, auth_key, server_public, name, shape)
                                        for name, shape in SHAPES.items()))
    updater = tsclient.ControlClient(host, port, "hostile-updater")
    try:
        await updater.join(auth_key, REQUEST_TIMEOUT, server_public)
        updated, requests, stalled = {}, {}, False
        for name, shape in SHAPES.items():
            if stalled:     # the server stopped answering: the rest would only add timeouts
                updated[name] = "not sent"
                continue
            updated[name] = await update_with(updater, shape)
            stalled = str(updated[name]).startswith("TimeoutError")
        for name, fields in MAP_SHAPES.items():
            requests[name] = "not sent" if stalled else await update_with(updater, {}, fields)
            stalled = stalled or str(requests[name]).startswith("TimeoutError")
    except Exception as err:
        updated = requests = {"join": f"{type(err).__name__}: {err}"[:300]}
    finally:
        await updater.close()
    return {"register": dict(zip(SHAPES, registered)), "update": updated, "map_request": requests}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("host")
    parser.add_argument("port", type=int)
    parser.add_argument("auth_key")
    args = parser.parse_args()
    print(json.dumps(asyncio.run(attack(args.host, args.port, args.auth_key))))


if __name__ == "__main__":
    main()
