"""The Addresses section of meshbox.py: allocate_addresses.

Its contract: the first free IPv4 at or after `start` (never the network or
broadcast address, never Tailscale's service range 100.100.100.0/24), paired
with the IPv6 at the same offset; a pair is skipped when either half is
taken; a search from a later `start` wraps to look below it; a full pool is a
ValueError that names it.  (test_coordinator.test_address_allocation has the
first few cases; these are the edges.)
"""

import ipaddress

import pytest

import meshbox

V4, V6 = meshbox.DEFAULT_PREFIX_V4, meshbox.DEFAULT_PREFIX_V6


def taken_in(addresses, asked=None):
    """taken() for a set of addresses; records every pair asked about in `asked`."""
    def taken(ipv4, ipv6):
        if asked is not None:
            asked.append((ipv4, ipv6))
        return ipv4 in addresses or ipv6 in addresses
    return taken


def offset_of(address, prefix=V4):
    return int(ipaddress.ip_address(address)) - int(ipaddress.ip_network(prefix).network_address)


def test_the_reserved_range_lies_inside_the_default_prefix():
    assert meshbox.RESERVED_V4.subnet_of(ipaddress.ip_network(V4))
    assert str(meshbox.RESERVED_V4) == "100.100.100.0/24"


def test_ipv6_is_paired_at_the_same_offset():
    ipv4, ipv6, offset = meshbox.allocate_addresses(V4, V6, taken_in(set()), start=300)
    assert (ipv4, ipv6, offset) == ("100.64.1.44", "fd7a:115c:a1e0::12c", 300)
    ipv4, ipv6, offset = meshbox.allocate_addresses("10.0.0.0/8", "fd00:1:2::/64", taken_in(set()), start=70000)
    assert offset_of(ipv4, "10.0.0.0/8") == offset == 70000
    assert int(ipaddress.ip_address(ipv6)) - int(ipaddress.ip_address("fd00:1:2::")) == 70000


def test_a_pair_is_skipped_when_either_half_is_taken():
    taken = {"100.64.0.1", "fd7a:115c:a1e0::2", "100.64.0.3"}
    assert meshbox.allocate_addresses(V4, V6, taken_in(taken)) == ("100.64.0.4", "fd7a:115c:a1e0::4", 4)


def test_the_service_range_is_never_offered_or_even_asked_about():
    first = offset_of("100.100.100.0")
    asked = []
    # Everything from just below the range is taken up to it: the next free pair is past it.
    ipv4, _, offset = meshbox.allocate_addresses(V4, V6, taken_in({"100.100.99.255"}, asked), start=first - 1)
    assert (ipv4, offset) == ("100.100.101.0", first + 256)
    assert not any(ipaddress.ip_address(a) in meshbox.RESERVED_V4 for a, _ in asked)
    assert asked[0][0] == "100.100.99.255" and len(asked) == 2
    # Starting inside the range jumps over the rest of it.
    assert meshbox.allocate_addresses(V4, V6, taken_in(set()), start=first + 17)[0] == "100.100.101.0"
    # Just below it is still fine.
    assert meshbox.allocate_addresses(V4, V6, taken_in(set()), start=first - 1)[0] == "100.100.99.255"


def test_a_prefix_outside_the_service_range_skips_nothing():
    ipv4, _, _ = meshbox.allocate_addresses("10.0.0.0/8", "fd00::/64", taken_in(set()),
                                            start=offset_of("10.100.100.0", "10.0.0.0/8"))
    assert ipv4 == "10.100.100.0"


def test_never_the_network_or_the_broadcast_address():
    seen = []
    for _ in range(6):
        ipv4, _, _ = meshbox.allocate_addresses("192.0.2.0/29", "fd00::/64", taken_in(set(seen)))
        seen.append(ipv4)
    assert seen == [f"192.0.2.{i}" for i in range(1, 7)]
    with pytest.raises(ValueError, match="exhausted"):
        meshbox.allocate_addresses("192.0.2.0/29", "fd00::/64", taken_in(set(seen)))
    # A start of 0 (or below) never yields the network address.
    assert meshbox.allocate_addresses("192.0.2.0/29", "fd00::/64", taken_in(set()), start=0)[0] == "192.0.2.1"
    assert meshbox.allocate_addresses("192.0.2.0/29", "fd00::/64", taken_in(set()), start=-5)[0] == "192.0.2.1"


def test_a_search_from_a_later_start_wraps_to_what_is_free_below_it():
    taken = {"100.64.0.2", "100.64.0.3"}
    # Nothing free from 2 to the end of a /30: the search goes back to offset 1.
    assert meshbox.allocate_addresses("100.64.0.0/29", V6, taken_in(taken | {"100.64.0.4", "100.64.0.5",
                                                                              "100.64.0.6"}), start=2) == \
        ("100.64.0.1", "fd7a:115c:a1e0::1", 1)
    # A start past the end of the prefix wraps too.
    assert meshbox.allocate_addresses("100.64.0.0/29", V6, taken_in(taken), start=50)[0] == "100.64.0.1"
    # With something free at or after start, what is below start is not reused first.
    assert meshbox.allocate_addresses("100.64.0.0/29", V6, taken_in(taken), start=4)[0] == "100.64.0.4"


def test_an_exhausted_pool_is_a_clear_error():
    full = taken_in({"100.64.0.1", "100.64.0.2"})
    with pytest.raises(ValueError, match=r"address pool 100\.64\.0\.0/30 is exhausted"):
        meshbox.allocate_addresses("100.64.0.0/30", V6, full)
    with pytest.raises(ValueError, match=r"address pool 100\.64\.0\.0/30 is exhausted"):
        meshbox.allocate_addresses("100.64.0.0/30", V6, full, start=2)      # after the wrap as well
    # Taken IPv6 halves exhaust it just as well.
    with pytest.raises(ValueError, match="exhausted"):
        meshbox.allocate_addresses("100.64.0.0/30", V6, taken_in({"fd7a:115c:a1e0::1", "fd7a:115c:a1e0::2"}))


@pytest.mark.parametrize("prefix", ["100.64.0.0/31", "100.64.0.7/32"])
def test_a_prefix_with_no_host_addresses_is_exhausted_at_once(prefix):
    with pytest.raises(ValueError, match="exhausted"):
        meshbox.allocate_addresses(prefix, V6, taken_in(set()))


def test_a_malformed_prefix_is_a_value_error():
    with pytest.raises(ValueError, match="host bits set"):
        meshbox.allocate_addresses("100.64.0.1/10", V6, taken_in(set()))
    with pytest.raises(ValueError, match="does not appear to be"):
        meshbox.allocate_addresses("100.64.0.0/10", "not-a-prefix", taken_in(set()))


def test_the_store_allocates_from_a_tiny_pool_until_it_is_full(tmp_path):
    store = meshbox.Store(str(tmp_path / "meshbox.db"))
    try:
        user = store.create_user("alice")
        got = []
        for i in range(2):
            with store.transaction():
                ipv4, ipv6 = store.allocate_addresses("100.64.0.0/30", V6)
                store.db.execute("INSERT INTO devices(name, user_id, public_key, ipv4, ipv6, full_tunnel, created)"
                                 " VALUES(?,?,?,?,?,0,1)", (f"d{i}", user.id, bytes([i]) * 32, ipv4, ipv6))
            got.append(ipv4)
        assert got == ["100.64.0.1", "100.64.0.2"]
        with pytest.raises(ValueError, match="exhausted"):
            with store.transaction():
                store.allocate_addresses("100.64.0.0/30", V6)
        assert not store.db.in_transaction
    finally:
        store.db.close()
