"""Policy engine: parsing, validation, compilation, and the Tailscale conformance corpus."""

import json
import os
import subprocess
import sys

import pytest

import conformance
import meshbox

# What the engine reaches today; a drop below any floor is a regression.  Routes
# needs the order the capture registered its nodes in (conformance.REGISTRATION_ORDERS):
# it decides which of two HA routers is primary.
CONFORMANCE_FLOORS = {"acl": 164, "routes": 100, "policytest": 47, "ssh": 93, "sshtest": 31,
                      "nodeattrs": 45, "grant": 222}
# The same for the slice in tests/conformance_slice, which ships with the tests.
SLICE_FLOORS = {"acl": 10, "routes": 10, "policytest": 10, "ssh": 10, "sshtest": 10, "nodeattrs": 10, "grant": 10}


@pytest.fixture(scope="module")
def slice_results():
    return conformance.run_corpus(conformance.SLICE_CORPUS)


@pytest.fixture(scope="module")
def corpus_results(slice_results):
    """The full corpus's results and floors, or the slice's when the full corpus is absent."""
    if conformance.corpus_dir() == conformance.SLICE_CORPUS:
        return slice_results, SLICE_FLOORS
    return conformance.run_corpus(conformance.corpus_dir()), CONFORMANCE_FLOORS


def assert_floor(results, floors, category):
    passed, total = conformance.summary(results)[category]
    print("%s: %d/%d" % (category, passed, total))
    failing = [r["id"] for r in results[category] if not r["passed"]]
    assert passed >= floors[category], failing


@pytest.mark.parametrize("category", sorted(CONFORMANCE_FLOORS))
def test_conformance_floor(corpus_results, category):
    """The full corpus when it is there; the slice (so never a skip) when it is not."""
    assert_floor(*corpus_results, category)


@pytest.mark.parametrize("category", sorted(SLICE_FLOORS))
def test_conformance_slice_floor(slice_results, category):
    """The slice whether or not the full corpus is there, so CI runs the fallback too."""
    assert_floor(slice_results, SLICE_FLOORS, category)


def test_conformance_falls_back_to_the_slice(monkeypatch, tmp_path, capsys):
    """Without the full corpus the measure reads the slice, says so, and reports every category."""
    monkeypatch.setenv("MESHBOX_CONFORMANCE_CORPUS", str(tmp_path / "absent"))
    assert conformance.corpus_dir() == conformance.SLICE_CORPUS
    assert conformance.main([]) == 0
    out, err = capsys.readouterr()
    assert "measuring the slice" in err
    lines = out.splitlines()
    assert [line.split()[0] for line in lines[:-1]] == list(conformance.CATEGORIES)
    sizes = {category: len(cases) for category, cases in conformance.load_corpus(conformance.SLICE_CORPUS).items()}
    assert {category: total for category, (_, total) in json.loads(lines[-1]).items()} == sizes


def test_conformance_slice_is_what_make_slice_makes(tmp_path):
    """The slice's files are make_slice.py's output for the full corpus (checked where that corpus is)."""
    full = conformance.full_corpus()
    if not os.path.isdir(full):
        pytest.skip("full conformance corpus not present at %s" % full)
    subprocess.run([sys.executable, os.path.join(conformance.SLICE_CORPUS, "make_slice.py"), full, str(tmp_path)],
                   check=True, timeout=60)
    made = sorted(os.listdir(tmp_path))
    assert made == sorted(n for n in os.listdir(conformance.SLICE_CORPUS) if n.endswith(".json"))
    for name in made:
        with open(tmp_path / name) as new, open(os.path.join(conformance.SLICE_CORPUS, name)) as shipped:
            assert new.read() == shipped.read(), name


TOPOLOGY = {
    "users": [{"id": 1, "name": "alice", "email": "alice@example.com"},
              {"id": 2, "name": "bob", "email": "bob@example.com"}],
    "nodes": {
        "laptop": {"hostname": "laptop", "tags": [], "user": "alice",
                   "ipv4": "100.64.0.1", "ipv6": "fd7a:115c:a1e0::1",
                   "routable_ips": [], "approved_routes": []},
        "phone": {"hostname": "phone", "tags": [], "user": "bob",
                  "ipv4": "100.64.0.2", "ipv6": "fd7a:115c:a1e0::2",
                  "routable_ips": [], "approved_routes": []},
        "server": {"hostname": "server", "tags": ["tag:server"],
                   "ipv4": "100.64.0.3", "ipv6": "fd7a:115c:a1e0::3",
                   "routable_ips": ["10.1.0.0/16", "0.0.0.0/0", "::/0"], "approved_routes": []},
    },
}

BASE = {
    "groups": {"group:admins": ["alice@example.com"]},
    "tagOwners": {"tag:server": ["group:admins"]},
    "acls": [{"action": "accept", "src": ["group:admins"], "dst": ["tag:server:22"]}],
}


def base_policy(**sections):
    """The base policy, with extra sections, parsed."""
    return meshbox.parse_policy(json.dumps(dict(BASE, **sections)))


def test_hujson_comments_and_trailing_commas():
    policy = meshbox.parse_policy("""
        // a line comment
        {
          /* a block
             comment */
          "tagOwners": {"tag:server": ["alice@example.com",],},
          "acls": [
            {"action": "accept", "src": ["*"], "dst": ["tag:server:80,443",],}, // trailing
          ],
        }""")
    out = meshbox.compile_policy(policy, TOPOLOGY)
    ports = [dp["Ports"] for rule in out["server"].packet_filter_rules
             for dp in rule["DstPorts"]]
    assert {"First": 80, "Last": 80} in ports and {"First": 443, "Last": 443} in ports


def test_comment_markers_inside_strings_are_text():
    policy = meshbox.parse_policy('{"hosts": {"web": "100.64.0.9"}, "acls": '
                                  '[{"action": "accept", "src": ["*"], "dst": ["web:80"]}],'
                                  ' "tests": [], "groups": {"group:x//y": []}}')
    assert "group:x//y" in policy.groups


def test_syntax_error_names_line_and_column():
    with pytest.raises(meshbox.PolicyError) as err:
        meshbox.parse_policy('{\n  "acls": [\n    {"action": "accept" "src": []}\n  ]\n}')
    assert "line 3" in str(err.value) and "column 25" in str(err.value)


def test_unknown_group_is_refused():
    with pytest.raises(meshbox.PolicyError) as err:
        meshbox.parse_policy('{"acls": [{"action": "accept", "src": ["group:ghosts"], '
                             '"dst": ["*:*"]}]}')
    assert "group:ghosts" in str(err.value)


def test_undefined_tag_and_bad_port_are_refused_with_tailscale_wording():
    with pytest.raises(meshbox.PolicyError, match=r'src=tag not found: "tag:nope"'):
        meshbox.parse_policy('{"acls": [{"action": "accept", "src": ["tag:nope"], '
                             '"dst": ["*:*"]}]}')
    with pytest.raises(meshbox.PolicyError, match="port range"):
        meshbox.parse_policy('{"acls": [{"action": "accept", "src": ["*"], "dst": ["*:http"]}]}')
    with pytest.raises(meshbox.PolicyError, match="not valid on the src side"):
        meshbox.parse_policy('{"acls": [{"action": "accept", "src": ["autogroup:self"], '
                             '"dst": ["*:*"]}]}')


def test_failing_policy_test_is_refused_and_named():
    policy = base_policy(tests=[{"src": "bob@example.com", "accept": ["tag:server:22"]}])
    with pytest.raises(meshbox.PolicyError) as err:
        meshbox.check_policy_tests(policy, TOPOLOGY)
    assert "test(s) failed" in str(err.value)
    assert "bob@example.com -> tag:server:22" in str(err.value)


def test_passing_policy_tests_are_accepted():
    policy = base_policy(tests=[{"src": "alice@example.com", "accept": ["tag:server:22"],
                                 "deny": ["tag:server:80"]}])
    meshbox.check_policy_tests(policy, TOPOLOGY)


def test_allow_all_without_policy():
    out = meshbox.compile_policy(None, TOPOLOGY)
    assert set(out) == {"laptop", "phone", "server"}
    for name, node in out.items():
        assert node.packet_filter_rules == [
            {"SrcIPs": ["*"], "DstPorts": [{"IP": "*", "Ports": {"First": 0, "Last": 65535}}]}]
        assert set(node.peers) == {"laptop", "phone", "server"} - {name}
    assert out["laptop"].peers["phone"]["AllowedIPs"] == ["100.64.0.2/32",
                                                             "fd7a:115c:a1e0::2/128"]


def test_shared_peer_entries_read_as_one_viewers_dict():
    shared = {"a": {"AllowedIPs": ["100.64.0.1/32"]}, "r": None, "b": {"AllowedIPs": ["100.64.0.2/32"]}}
    router = {"AllowedIPs": ["100.64.0.3/32", "10.0.0.0/24"]}
    peers = meshbox.PeersExcept(shared, "a", {"r": router})
    assert list(peers) == ["r", "b"] and len(peers) == 2
    assert peers["r"] == router and peers.get("a") is None and "a" not in peers
    assert peers.get("zz", 5) == 5
    assert peers.as_dict() == dict(peers) == {"r": router, "b": shared["b"]}
    assert peers == {"r": router, "b": shared["b"]}
    with pytest.raises(KeyError):
        peers["a"]


def test_compiled_filter_and_peers_follow_the_acl():
    out = meshbox.compile_policy(base_policy(), TOPOLOGY)
    assert len(out["server"].packet_filter_rules) == 1
    rule = out["server"].packet_filter_rules[0]
    assert sorted(rule["SrcIPs"]) == ["100.64.0.1", "fd7a:115c:a1e0::1"]
    assert {dp["IP"] for dp in rule["DstPorts"]} == {"100.64.0.3", "fd7a:115c:a1e0::3"}
    assert out["laptop"].packet_filter_rules is None
    assert "IPProto" not in rule  # no proto: the client's default set
    assert set(out["laptop"].peers) == {"server"}
    assert set(out["server"].peers) == {"laptop"}
    assert out["phone"].peers == {}


def test_auto_approval_and_routes_in_allowed_ips():
    text = """{
      "tagOwners": {"tag:server": ["alice@example.com"]},
      "autoApprovers": {"routes": {"10.0.0.0/8": ["tag:server"]}, "exitNode": ["tag:server"]},
      "acls": [{"action": "accept", "src": ["alice@example.com"], "dst": ["10.1.2.0/24:*"]}],
    }"""
    policy = meshbox.parse_policy(text)
    assert meshbox.auto_approved_routes(policy, TOPOLOGY, "server") == [
        "10.1.0.0/16", "0.0.0.0/0", "::/0"]
    assert meshbox.auto_approved_routes(policy, TOPOLOGY, "laptop") == []
    peer = meshbox.compile_policy(policy, TOPOLOGY)["laptop"].peers["server"]
    assert "10.1.0.0/16" in peer["AllowedIPs"] and peer["PrimaryRoutes"] == ["10.1.0.0/16"]


def test_ssh_rules_shape():
    policy = base_policy(ssh=[{"action": "check", "src": ["group:admins"], "dst": ["tag:server"],
                               "users": ["root", "autogroup:nonroot"]}])
    out = meshbox.compile_policy(policy, TOPOLOGY, control_url="https://ctl.example")
    assert out["laptop"].ssh_rules == []
    (rule,) = out["server"].ssh_rules
    assert rule["principals"] == [{"nodeIP": "100.64.0.1"}, {"nodeIP": "fd7a:115c:a1e0::1"}]
    assert rule["sshUsers"] == {"*": "=", "root": "root"}
    assert rule["action"]["holdAndDelegate"].startswith("https://ctl.example/machine/ssh/action/")


@pytest.mark.parametrize("period, seconds", [(None, 12 * 3600), ("omitted", 12 * 3600), ("always", 0),
                                             ("0s", 0), ("1h", 3600), ("168h", 168 * 3600)])
def test_ssh_check_period_forms(period, seconds):
    """Captured from Tailscale: checkPeriod null is the same as leaving it out, and
    "0s" is accepted (a check every session, as "always")."""
    rule = {"action": "check", "src": ["group:admins"], "dst": ["tag:server"], "users": ["root"]}
    if period != "omitted":
        rule["checkPeriod"] = period
    (parsed,) = base_policy(ssh=[rule]).ssh
    assert parsed.check_period == seconds
    (compiled,) = meshbox.compile_policy(base_policy(ssh=[rule]), TOPOLOGY)["server"].ssh_rules
    assert "holdAndDelegate" in compiled["action"]


@pytest.mark.parametrize("period, why", [("-1h", "must be a positive duration"), ("169h", "above the max"),
                                         (5, "invalid duration"), ("soon", "invalid duration")])
def test_ssh_check_period_refused(period, why):
    rule = {"action": "check", "src": ["group:admins"], "dst": ["tag:server"], "users": ["root"],
            "checkPeriod": period}
    with pytest.raises(meshbox.PolicyError, match=why):
        base_policy(ssh=[rule])


def test_bare_ipv6_grant_destination_matches_no_node_but_passes_tests():
    """Captured from Tailscale: a grant to a node's bare IPv6 address gives that node
    no filter rule and its sources no peer, yet `tests` for it pass; an IPv4 literal
    or an IPv6 /128 names the node."""
    def compiled(dst):
        grant = {"src": ["alice@example.com"], "dst": [dst], "ip": ["tcp:22"]}
        policy = meshbox.parse_policy(json.dumps({"grants": [grant], "tests": [
            {"src": "alice@example.com", "accept": ["[fd7a:115c:a1e0::3]:22" if ":" in dst else "100.64.0.3:22"]}]}))
        meshbox.check_policy_tests(policy, TOPOLOGY)
        return meshbox.compile_policy(policy, TOPOLOGY)
    bare = compiled("fd7a:115c:a1e0::3")
    assert bare["server"].packet_filter_rules is None and "server" not in bare["laptop"].peers
    for named in ("fd7a:115c:a1e0::3/128", "100.64.0.3"):
        out = compiled(named)
        assert out["server"].packet_filter_rules and "server" in out["laptop"].peers


def test_ssh_test_to_a_bare_ipv6_address_fails_as_tailscale_says():
    ssh = [{"action": "accept", "src": ["group:admins"], "dst": ["tag:server"], "users": ["root"]}]
    ipv4 = base_policy(ssh=ssh, sshTests=[{"src": "alice@example.com", "dst": ["100.64.0.3"], "accept": ["root"]}])
    meshbox.check_policy_tests(ipv4, TOPOLOGY)
    ipv6 = base_policy(ssh=ssh, sshTests=[{"src": "alice@example.com", "dst": ["fd7a:115c:a1e0::3"],
                                           "accept": ["root"]}])
    with pytest.raises(meshbox.PolicyError, match="test\\(s\\) failed"):
        meshbox.check_policy_tests(ipv6, TOPOLOGY)


def test_conformance_comparison_ignores_order_only():
    rule = {"SrcIPs": ["b", "a"], "DstPorts": [{"IP": "2", "Ports": {"First": 1, "Last": 1}},
                                               {"IP": "1", "Ports": {"First": 1, "Last": 1}}]}
    swapped = {"SrcIPs": ["a", "b"], "DstPorts": list(reversed(rule["DstPorts"]))}
    assert conformance.canonical_filter([rule]) == conformance.canonical_filter([swapped])
    assert conformance.canonical_filter([rule]) != conformance.canonical_filter(
        [dict(rule, SrcIPs=["a"])])
    assert conformance.canonical_filter(None) == conformance.canonical_filter([])
    assert json.loads(json.dumps(conformance.canonical_peers({"x": {"AllowedIPs": ["b", "a"]}}))) \
        == {"x": {"AllowedIPs": ["a", "b"], "PrimaryRoutes": []}}


def test_ha_primary_is_the_first_registered_router():
    nodes = {name: {"hostname": name, "tags": ["tag:router"], "id": node_id,
                    "ipv4": "100.64.1.%d" % node_id, "ipv6": "fd7a:115c:a1e0::1:%d" % node_id,
                    "routable_ips": ["192.168.1.0/24"], "approved_routes": ["192.168.1.0/24"]}
             for name, node_id in (("alpha", 7), ("zulu", 3))}
    topology = {"users": TOPOLOGY["users"], "nodes": dict(TOPOLOGY["nodes"], **nodes)}
    policy = meshbox.parse_policy(json.dumps({
        "tagOwners": {"tag:router": ["alice@example.com"]},
        "acls": [{"action": "accept", "src": ["alice@example.com"], "dst": ["192.168.1.0/24:*"]}]}))
    peers = meshbox.compile_policy(policy, topology)["laptop"].peers
    assert peers["zulu"]["PrimaryRoutes"] == ["192.168.1.0/24"]
    assert "PrimaryRoutes" not in peers["alpha"]
    assert "192.168.1.0/24" not in peers["alpha"]["AllowedIPs"]
