#!/usr/bin/env python3
"""Measure meshbox's policy engine against the Tailscale policy conformance corpus.

Usage: python3 tests/conformance.py [-v] [CORPUS_DIR]

Each corpus case holds a policy, a topology (users, nodes) and what Tailscale's
control plane sent every node.  A case passes when meshbox refuses exactly the
policies Tailscale refused and, for accepted ones, gives every node the same
packet filter, peers (AllowedIPs, PrimaryRoutes) and SSH rules.  Order is
ignored where it carries no meaning (SrcIPs, DstPorts, filter rules, AllowedIPs,
SSH principals); SSH rule order is kept because the first matching rule wins.

This is a measure, not a test: it exits 0 unless the corpus cannot be read.
The last line printed is JSON: {"category": [passed, total], ...}.

Without CORPUS_DIR it reads the full corpus (702 cases) from
$MESHBOX_CONFORMANCE_CORPUS, or from DEFAULT_CORPUS (../shared/conformance/
tailscale-policy beside the repository) when that variable is unset; when that
folder does not exist it reads the slice in tests/conformance_slice (10 cases
a category, see its README.md) and says so on stderr.  Pointing
MESHBOX_CONFORMANCE_CORPUS at a missing folder is how to try that fallback.
"""

import json
import os
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Appended, not prepended: a meshbox already on the path (a development shim) wins.
sys.path.append(REPO_ROOT)
import meshbox  # noqa: E402

DEFAULT_CORPUS = os.path.join(REPO_ROOT, "..", "shared", "conformance", "tailscale-policy")
SLICE_CORPUS = os.path.join(REPO_ROOT, "tests", "conformance_slice")
CATEGORIES = ("acl", "routes", "policytest", "ssh", "sshtest", "nodeattrs", "grant")
FIELDS = ("packet_filter_rules", "peers", "ssh_rules")


def _key(value):
    return json.dumps(value, sort_keys=True)


def canonical_filter(rules):
    """A packet filter as a sorted list of canonical rules (empty and null are the same)."""
    out = []
    for rule in rules or ():
        canon = {"SrcIPs": sorted(set(rule.get("SrcIPs") or ()))}
        if rule.get("DstPorts"):
            canon["DstPorts"] = sorted(_key(dp) for dp in rule["DstPorts"])
        if rule.get("IPProto"):
            canon["IPProto"] = sorted(rule["IPProto"])
        if rule.get("CapGrant"):
            canon["CapGrant"] = sorted(_key({"Dsts": sorted(cg.get("Dsts") or ()),
                                             "CapMap": cg.get("CapMap")})
                                       for cg in rule["CapGrant"])
        out.append(_key(canon))
    return sorted(out)


def canonical_peers(peers):
    return {name: {"AllowedIPs": sorted(set(p.get("AllowedIPs") or ())),
                   "PrimaryRoutes": sorted(set(p.get("PrimaryRoutes") or ()))}
            for name, p in (peers or {}).items()}


def canonical_ssh(rules):
    """SSH rules keep their order; principals inside a rule do not."""
    out = []
    for rule in rules or ():
        canon = dict(rule)
        canon["principals"] = sorted(_key(p) for p in rule.get("principals") or ())
        out.append(_key(canon))
    return out


CANONICAL = {"packet_filter_rules": canonical_filter, "peers": canonical_peers,
             "ssh_rules": canonical_ssh}


# The order in which the capture registered the nodes of its topologies
# (their Created times in the source captures; the corpus does not carry
# it). It decides HA: Tailscale, like meshbox, makes the first registered
# advertiser of a subnet its primary router.
REGISTRATION_ORDERS = (
    ("caterpie", "charmander", "metapod", "butterfree", "wartortle", "squirtle", "weedle", "kakuna", "beedrill",
     "ivysaur", "venusaur", "bulbasaur"),
    ("pidgey", "pidgeotto", "charmander", "rattata", "raticate", "blastoise", "spearow", "fearow", "squirtle",
     "weedle", "kakuna", "beedrill", "ivysaur", "venusaur", "bulbasaur"),
    ("client-a", "client-b", "spearow", "fearow"),
)


def topology_of(case):
    """The case's users and nodes, numbered in registration order when it is known."""
    nodes = case.get("nodes") or {}
    order = next((o for o in REGISTRATION_ORDERS if set(nodes) <= set(o)), None)
    if order:
        nodes = {name: node if "id" in node else dict(node, id=order.index(name) + 1)
                 for name, node in nodes.items()}
    return {"users": case.get("users") or [], "nodes": nodes}


def refusal_of(case):
    """The PolicyError meshbox raises for this case's policy, or None if it accepts it."""
    try:
        policy = meshbox.parse_policy(json.dumps(case["policy"]))
        meshbox.check_policy_tests(policy, topology_of(case))
    except meshbox.PolicyError as e:
        return e
    return None


def compare_case(case):
    """One case -> {"passed": bool, "fields": {field: bool}, "error": str|None, ...}."""
    result = {"id": case["id"], "category": case["category"], "fields": {}, "error": None}
    try:
        refusal = refusal_of(case)
    except Exception as e:  # a crash is a failure of the case, not of the run
        result.update(passed=False, error="crash: %r" % e)
        return result
    if case.get("expect_error"):
        want = ((case.get("error_body") or {}).get("message") or "")
        result["passed"] = refusal is not None
        result["message_matches"] = refusal is not None and bool(want) and want in str(refusal)
        if refusal is None:
            result["error"] = "accepted a policy Tailscale refused (%s)" % want
        return result
    if refusal is not None:
        result.update(passed=False, error="refused: %s" % refusal)
        return result
    try:
        policy = meshbox.parse_policy(json.dumps(case["policy"]))
        # the corpus was captured with this placeholder as the control URL
        got = meshbox.compile_policy(policy, topology_of(case), control_url="https://unused")
    except Exception as e:
        result.update(passed=False, error="crash: %r" % e)
        return result
    mismatched = []
    for node, expected in (case.get("expected") or {}).items():
        for field in FIELDS:
            if field not in expected:
                continue
            same = CANONICAL[field](expected[field]) == CANONICAL[field](
                getattr(got.get(node), field, None))
            result["fields"][field] = result["fields"].get(field, True) and same
            if not same:
                mismatched.append("%s.%s" % (node, field))
    result["passed"] = not mismatched
    if mismatched:
        result["error"] = "mismatch: " + ", ".join(mismatched[:6]) + (
            " ..." if len(mismatched) > 6 else "")
    return result


def auto_approval_matches(case):
    """Whether auto_approved_routes gives every node the approved routes Tailscale recorded."""
    try:
        policy = meshbox.parse_policy(json.dumps(case["policy"]))
        return all(sorted(meshbox.auto_approved_routes(policy, topology_of(case), name))
                   == sorted(node.get("approved_routes") or ())
                   for name, node in case["nodes"].items())
    except Exception:
        return False


def full_corpus():
    """Where the full corpus is looked for: $MESHBOX_CONFORMANCE_CORPUS, else DEFAULT_CORPUS."""
    return os.environ.get("MESHBOX_CONFORMANCE_CORPUS") or DEFAULT_CORPUS


def corpus_dir():
    """The full corpus when it is there, else the slice that ships in tests/."""
    return full_corpus() if os.path.isdir(full_corpus()) else SLICE_CORPUS


def load_corpus(corpus_dir):
    cases = {}
    for category in CATEGORIES:
        with open(os.path.join(corpus_dir, category + ".json")) as f:
            cases[category] = json.load(f)
    return cases


def run_corpus(corpus_dir):
    """All categories -> {category: [case results]}."""
    return {category: [compare_case(c) for c in cases]
            for category, cases in load_corpus(corpus_dir).items()}


def summary(results):
    return {category: [sum(r["passed"] for r in rs), len(rs)] for category, rs in results.items()}


def main(argv):
    verbose = "-v" in argv
    args = [a for a in argv if a != "-v"]
    folder = args[0] if args else corpus_dir()
    if not args and folder == SLICE_CORPUS:
        print("no full corpus at %s: measuring the slice in %s" % (full_corpus(), SLICE_CORPUS), file=sys.stderr)
    try:
        cases = load_corpus(folder)
    except (OSError, ValueError) as e:
        print("cannot read corpus %s: %s" % (folder, e), file=sys.stderr)
        return 2
    results = {category: [compare_case(c) for c in cs] for category, cs in cases.items()}
    for category, rs in results.items():
        passed = sum(r["passed"] for r in rs)
        line = ["%-10s %3d/%-3d" % (category, passed, len(rs))]
        for field in FIELDS:
            seen = [r["fields"][field] for r in rs if field in r["fields"]]
            if seen:
                line.append("%s %d/%d" % (field, sum(seen), len(seen)))
        refused = [r for r in rs if "message_matches" in r]
        if refused:
            line.append("refused %d/%d (same message %d)" % (
                sum(r["passed"] for r in refused), len(refused),
                sum(r["message_matches"] for r in refused)))
        if category == "routes":
            approvals = [auto_approval_matches(c) for c in cases[category]]
            line.append("auto_approval %d/%d" % (sum(approvals), len(approvals)))
        print("  ".join(line))
        if verbose:
            for r in rs:
                if not r["passed"]:
                    print("    FAIL %s: %s" % (r["id"], r["error"]))
    print(json.dumps(summary(results)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
