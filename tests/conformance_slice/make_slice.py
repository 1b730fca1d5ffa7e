#!/usr/bin/env python3
"""Write the conformance slice: 10 cases per category of the full corpus.

Usage: python3 tests/conformance_slice/make_slice.py FULL_CORPUS_DIR [OUT_DIR]

OUT_DIR defaults to this folder.  For every CATEGORY.json of the full corpus it
writes CATEGORY.json here, in the same format, holding the cases a greedy
cover picks: each pick is the case with the most features no earlier pick has
(the earliest such case on a tie), where a case's features are its series (the
letters of an id like acl-mr13), whether Tailscale refused it, the keys and the
kinds of value (autogroup:member, tag:, group:, user, *, IPv4/IPv6 host or
prefix, host alias, port shape, literal actions and attributes) in its acls,
grants, ssh, sshTests, tests, nodeAttrs and autoApprovers, and whether its
nodes advertise routes or carry tags.  The same corpus always gives the same
slice; cases keep the corpus's order.
"""

import ipaddress
import json
import os
import re
import sys

PER_CATEGORY = 10
RULE_SECTIONS = ("acls", "grants", "ssh", "sshTests", "tests", "nodeAttrs", "autoApprovers")
LITERAL_KEYS = {"action", "attr", "users", "proto", "accept", "deny", "checkPeriod", "acceptEnv"}


def address_kind(text):
    try:
        network = ipaddress.ip_network(text, strict=False)
    except ValueError:
        return None
    return "ipv%d-%s" % (network.version, "prefix" if "/" in text else "host")


def kind(text):
    """What sort of name or address a policy string is."""
    if text.startswith("autogroup:"):
        return ":".join(text.split(":")[:2])
    for prefix in ("tag:", "group:"):
        if text.startswith(prefix):
            return prefix + ("port" if ":" in text[len(prefix):] else "")
    if text == "*":
        return "*"
    address = address_kind(text)
    if address:
        return address
    if "@" in text:
        return "user"
    host, colon, ports = text.rpartition(":")
    if colon and re.fullmatch(r"[\d*,-]+", ports):
        shape = "*" if ports == "*" else "range" if "-" in ports else "list" if "," in ports else "port"
        return "%s:%s" % (kind(host) if host else "", shape)
    if re.fullmatch(r"[\d,-]+", text):
        return "port"
    return "name"


def walk(section, key, value, out):
    """Add to OUT the keys and the kinds of value found under one policy section."""
    if isinstance(value, dict):
        for name, item in value.items():
            name = kind(name) if re.match(r"[\d:]|tag:|group:|[\w.-]+/", name) else name
            out.add((section, "key", name))
            walk(section, name, item, out)
    elif isinstance(value, list):
        for item in value:
            walk(section, key, item, out)
    elif isinstance(value, str):
        out.add((section, key, value if key in LITERAL_KEYS else kind(value)))
    else:
        out.add((section, key, type(value).__name__))


def series(case):
    """The letters of the first LETTERS+DIGITS word of the id (mr for acl-mr13), else its first word."""
    words = case["id"].removeprefix(case["category"] + "-").split("-")
    return next((m.group(1) for m in map(re.compile(r"([a-z]+)\d+").fullmatch, words) if m), words[0])


def features(case):
    """What a case exercises, as a set of tuples."""
    out = {("series", series(case)), ("refused", bool(case.get("expect_error")))}
    for section in RULE_SECTIONS:
        if section in case["policy"]:
            walk(section, section, case["policy"][section], out)
    for node in (case.get("nodes") or {}).values():
        if node.get("routable_ips"):
            out.add(("node", "routes"))
        if node.get("tags"):
            out.add(("node", "tagged"))
    return out


def pick(cases, count=PER_CATEGORY):
    """Indices of the cases a greedy feature cover picks, in corpus order."""
    seen, chosen = set(), []
    each = [features(c) for c in cases]
    for _ in range(min(count, len(cases))):
        best = max((i for i in range(len(cases)) if i not in chosen), key=lambda i: (len(each[i] - seen), -i))
        chosen.append(best)
        seen |= each[best]
    return sorted(chosen)


def main(argv):
    if not 1 <= len(argv) <= 2:
        sys.exit(__doc__.split("\n\n")[1])
    full, out = argv[0], argv[1] if len(argv) > 1 else os.path.dirname(os.path.abspath(__file__))
    for name in sorted(n for n in os.listdir(full) if n.endswith(".json")):
        with open(os.path.join(full, name)) as f:
            cases = json.load(f)
        with open(os.path.join(out, name), "w") as f:
            f.write(json.dumps([cases[i] for i in pick(cases)], sort_keys=True, separators=(",", ":")))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
