"""The CLI section of meshbox.py: argument parsing, settings, output, errors.

Its contract: ``--help`` teaches (the top level shows first steps and every
command, each noun lists its verbs with what they do); a wrong command line
exits 2 with argparse's usage on stderr, a refused verb exits 1 with
``meshbox: <why>`` on stderr, neither with a traceback; ``-o json`` prints
JSON that parses; verbs run end to end on a --state folder when no server is
up; settings come from file < environment < flags and bad ones are named;
--remote refuses to send an API key in clear text beyond loopback and the
tailnet.  Most of it runs in process (meshbox.main with capsys); a few
subprocess runs (tests/meshproc.cli) check what a shell sees.
"""

import argparse
import json
import logging
import os

import pytest

import meshbox
import meshproc


@pytest.fixture(autouse=True)
def isolated(monkeypatch):
    """main() sets MESHBOX_STATE_DIR and replaces the root logger's handlers: undo both."""
    for name in ("MESHBOX_STATE_DIR", "MESHBOX_REMOTE", "MESHBOX_API_KEY", "MESHBOX_LISTEN", "MESHBOX_MAGIC_DNS"):
        monkeypatch.delenv(name, raising=False)
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture
def state(tmp_path):
    return str(tmp_path / "state")


def run(capsys, *argv):
    """meshbox.main(argv) in process: (exit code, stdout, stderr)."""
    try:
        code = meshbox.main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def subcommands(parser):
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return action


# ---- help ----

def test_top_level_help_shows_first_steps_and_every_command(capsys):
    code, out, err = run(capsys, "--help")
    assert code == 0 and err == ""
    assert "first steps:" in out and "meshbox.py users create alice" in out and "tailscale up --login-server" in out
    assert "MESHBOX_<NAME>" in out and "--remote https://SERVER --api-key KEY nodes list" in out
    for noun in list(meshbox.ADMIN_NOUNS) + ["serve", "gateway"]:
        if noun == "dns":
            continue          # see test_every_admin_verb_has_a_cli_verb
        assert f"\n    {noun} " in out or f"\n    {noun}\n" in out, noun


def test_each_noun_lists_its_verbs_with_what_they_do(capsys):
    nouns = subcommands(meshbox.build_parser()).choices
    for noun, sub in nouns.items():
        code, out, err = run(capsys, noun, "--help")
        assert code == 0 and out.startswith(f"usage: meshbox.py {noun}"), noun
        verbs = [a for a in sub._actions if isinstance(a, argparse._SubParsersAction)]
        for verb_action in verbs:
            for choice in verb_action._choices_actions:
                assert choice.dest in out and choice.help and choice.help.split("(")[0].strip()[:20] in out, \
                    (noun, choice.dest)
    code, out, _ = run(capsys, "preauthkeys", "create", "--help")
    assert "--reusable" in out and "e.g. 90d" in out and "tag:server,tag:web" in out


def test_every_admin_verb_has_a_cli_verb():
    """What the CLI offers of Admin; the exceptions are the known gaps (reached through the API and admin page)."""
    not_in_cli = {("nodes", "pending"), ("dns", "get"), ("dns", "set")}
    offered = set()
    for noun, sub in subcommands(meshbox.build_parser()).choices.items():
        verbs = [a for a in sub._actions if isinstance(a, argparse._SubParsersAction)]
        offered |= {(noun, verb) for a in verbs for verb in a.choices} or {(noun, None)}
    admin = set()
    for noun in meshbox.ADMIN_NOUNS:
        admin |= {(noun, name[len(noun) + 1:] or None) for name in vars(meshbox.Admin)
                  if name == noun or name.startswith(noun + "_")}
    assert admin - offered == not_in_cli
    assert offered - admin == {("serve", None), ("gateway", "down")}


def test_version(capsys):
    code, out, _ = run(capsys, "--version")
    assert code == 0 and out.strip() == f"meshbox {meshbox.VERSION}"


# ---- command-line errors ----

@pytest.mark.parametrize("argv, message", [
    ([], "the following arguments are required: COMMAND"),
    (["users"], "the following arguments are required: verb"),
    (["users", "frobnicate"], "invalid choice: 'frobnicate'"),
    (["widgets", "list"], "invalid choice: 'widgets'"),
    (["preauthkeys", "create"], "the following arguments are required: --user"),
    (["nodes", "expiry", "enable", "1"], "invalid choice: 'enable'"),
    (["logs", "--lines", "many"], "invalid int value: 'many'"),
    (["users", "list", "-o", "xml"], "invalid choice: 'xml'"),
])
def test_a_wrong_command_line_exits_2_with_usage(capsys, argv, message):
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == ""
    assert err.startswith("usage: meshbox.py") and message in err and "Traceback" not in err


@pytest.mark.parametrize("argv, message", [
    (["users", "delete", "ghost"], "meshbox: no user named 'ghost' (create it with: users create ghost)\n"),
    (["preauthkeys", "create", "--user", "ghost"], "meshbox: no user named 'ghost'"),
    (["nodes", "show", "7"], "meshbox: no node '7' (see: nodes list)\n"),
    (["policy", "set", "/nonexistent/policy.hujson"], "meshbox: cannot read policy file /nonexistent/policy.hujson"),
    (["netmap", "1"], "meshbox: netmap needs the running server (meshbox serve)\n"),
    (["logs"], "meshbox: logs needs the running server (meshbox serve)\n"),
    (["devices", "add", "phone"], "meshbox: no gateway yet"),
    (["apikeys", "expire", "msapi-none"], "meshbox: no single API key matches"),
])
def test_a_refused_verb_exits_1_with_the_reason_on_stderr(capsys, state, argv, message):
    code, out, err = run(capsys, "--state", state, *argv)
    assert (code, out) == (1, "")
    assert err.startswith(message) and "Traceback" not in err


def test_remote_without_an_api_key_or_over_clear_text_is_refused(capsys, state):
    code, _, err = run(capsys, "--state", state, "--remote", "https://ctl.example", "users", "list")
    assert code == 1 and "--remote needs --api-key" in err
    code, _, err = run(capsys, "--state", state, "--remote", "http://203.0.113.5:8080", "--api-key", "msapi-x",
                       "users", "list")
    assert code == 1 and "would send the API key in clear text" in err


@pytest.mark.parametrize("url, insecure, refused", [
    ("http://127.0.0.1:8080", False, None), ("http://[::1]:8080", False, None), ("http://localhost", False, None),
    ("http://100.64.0.1", False, None), ("http://[fd7a:115c:a1e0::1]:80", False, None),
    ("https://ctl.example", False, None), ("http://192.0.2.1", True, None),
    ("http://192.0.2.1", False, "clear text"), ("http://ctl.example/meshbox", False, "clear text"),
    ("ftp://ctl.example", False, "must be an http:// or https:// URL"), ("ctl.example", True, "must be an http"),
])
def test_check_remote_url(url, insecure, refused):
    config = meshbox.Config()
    if refused is None:
        meshbox.check_remote_url(url, config, insecure)
    else:
        with pytest.raises(ValueError, match=refused):
            meshbox.check_remote_url(url, config, insecure)


# ---- settings ----

def test_settings_come_from_file_then_environment_then_flags(tmp_path, monkeypatch):
    path = tmp_path / "meshbox.json"
    path.write_text(json.dumps({"listen": "0.0.0.0:443", "base-domain": "file.example", "magic_dns": False,
                                "nameservers": ["192.0.2.1"], "wg_port": 51820}))
    args = meshbox.build_parser().parse_args(["--config", str(path), "serve", "--base-domain", "flag.example"])
    monkeypatch.setenv("MESHBOX_LISTEN", "127.0.0.1:9999")
    monkeypatch.setenv("MESHBOX_MAGIC_DNS", "yes")
    config = meshbox.load_config(args)
    assert config.listen == "127.0.0.1:9999"            # environment over file
    assert config.base_domain == "flag.example"         # flag over file
    assert config.magic_dns is True and config.nameservers == ["192.0.2.1"] and config.wg_port == 51820


def test_bad_settings_are_named(tmp_path, monkeypatch):
    path = tmp_path / "meshbox.json"
    path.write_text(json.dumps({"listne": "x", "prot": 1}))
    args = meshbox.build_parser().parse_args(["--config", str(path), "status"])
    with pytest.raises(SystemExit, match=r"unknown setting\(s\) in .*meshbox.json: listne, prot"):
        meshbox.load_config(args)
    path.write_text("{broken")
    with pytest.raises(SystemExit, match="cannot read config file"):
        meshbox.load_config(args)
    args = meshbox.build_parser().parse_args(["status"])
    monkeypatch.setenv("MESHBOX_MAGIC_DNS", "maybe")
    with pytest.raises(SystemExit, match="setting magic_dns must be true or false, got 'maybe'"):
        meshbox.load_config(args)


@pytest.mark.parametrize("name, value, default, expected", [
    ("gateway", "On", False, True), ("gateway", "0", True, False), ("wg_port", "51820", 1, 51820),
    ("nameservers", "192.0.2.1, 192.0.2.2,", [], ["192.0.2.1", "192.0.2.2"]),
    ("nameservers", '["192.0.2.1"]', [], ["192.0.2.1"]),
    ("split_dns", '{"corp.example": ["10.0.0.1"]}', {}, {"corp.example": ["10.0.0.1"]}),
    ("listen", "0.0.0.0:80", "", "0.0.0.0:80"),
])
def test_setting_values_take_the_type_of_their_default(name, value, default, expected):
    assert meshbox.setting_value(name, value, default) == expected


@pytest.mark.parametrize("name, value, default, message", [
    ("wg_port", "many", 1, "setting wg_port must be a number"),
    ("split_dns", "{nope", {}, "setting split_dns is not valid JSON"),
    ("split_dns", "corp.example", {}, "setting split_dns must be a dict"),
    ("nameservers", {"a": 1}, [], "setting nameservers must be a list"),
])
def test_bad_setting_values_are_named(name, value, default, message):
    with pytest.raises(SystemExit, match=message):
        meshbox.setting_value(name, value, default)


# ---- verbs end to end on a state folder ----

def test_offline_verbs_end_to_end(capsys, state, tmp_path):
    code, out, _ = run(capsys, "--state", state, "users", "create", "alice")
    assert code == 0 and json.loads(out) == {"id": 1, "name": "alice", "message": "created user alice (id 1)"}
    code, out, err = run(capsys, "--state", state, "preauthkeys", "create", "--user", "alice", "--reusable",
                         "--tags", "tag:web")
    key = out.strip()
    assert code == 0 and key.startswith("mskey-") and out.count("\n") == 1        # the key alone on stdout
    assert "shown only now" in err
    code, out, _ = run(capsys, "--state", state, "preauthkeys", "list", "-o", "json")
    (row,) = json.loads(out)
    assert row["user"] == "alice" and row["tags"] == ["tag:web"] and row["valid"] and key not in out
    code, out, _ = run(capsys, "--state", state, "preauthkeys", "list")
    header, line = out.splitlines()
    assert header.split() == ["ID", "KEY", "USER", "REUSABLE", "EPHEMERAL", "USED", "EXPIRATION", "VALID"]
    assert line.split()[:3] == ["1", row["key"], "alice"]
    assert run(capsys, "--state", state, "preauthkeys", "expire", row["key"])[:2] == (0, "pre-auth key expired\n")
    assert json.loads(run(capsys, "--state", state, "preauthkeys", "list", "-o", "json")[1])[0]["valid"] is False
    # Policy from a file; get prints it; clear says what it means.
    policy = tmp_path / "policy.hujson"
    policy.write_text('{"acls": [{"action": "accept", "src": ["alice@"], "dst": ["*:*"]}], // comment\n}')
    assert run(capsys, "--state", state, "policy", "check", policy)[:2] == (0, "policy is valid\n")
    assert run(capsys, "--state", state, "policy", "set", policy)[0] == 0
    assert run(capsys, "--state", state, "policy", "get")[1] == policy.read_text() + "\n"
    assert run(capsys, "--state", state, "policy", "clear")[0] == 0
    code, out, err = run(capsys, "--state", state, "policy", "get")
    assert (code, out) == (0, "") and "no policy set" in err
    # status without a server.
    code, out, _ = run(capsys, "--state", state, "status")
    assert code == 0 and out.startswith("server: not running; 0 node(s), 0 online")
    code, out, _ = run(capsys, "--state", state, "status", "-o", "json")
    assert json.loads(out)["server_running"] is False
    # API keys: the key alone on stdout, then listed by prefix.
    code, out, _ = run(capsys, "--state", state, "apikeys", "create", "--expiration", "1d")
    api_key = out.strip()
    assert code == 0 and api_key.startswith("msapi-")
    assert json.loads(run(capsys, "--state", state, "apikeys", "list", "-o", "json")[1])[0]["prefix"] == \
        api_key[:14] + "…"
    code, out, _ = run(capsys, "--state", state, "oauthclients", "create", "--scopes", "dns:read")
    assert code == 0 and json.loads(out)["scopes"] == ["dns:read"]      # not a table verb: JSON
    assert run(capsys, "--state", state, "users", "delete", "alice")[:2] == (0, "deleted user alice\n")


def test_policy_compile_from_files(capsys, state, tmp_path):
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"acls": [{"action": "accept", "src": ["alice@"], "dst": ["*:22"]}]}))
    topology = tmp_path / "topology.json"
    topology.write_text(json.dumps({"users": [{"id": 1, "name": "alice"}], "nodes": {
        "a": {"id": 1, "hostname": "a", "user_id": 1, "user": "alice", "tags": [], "ipv4": "100.64.0.1",
              "ipv6": "fd7a:115c:a1e0::1"},
        "b": {"id": 2, "hostname": "b", "user_id": 1, "user": "alice", "tags": [], "ipv4": "100.64.0.2",
              "ipv6": "fd7a:115c:a1e0::2"}}}))
    code, out, err = run(capsys, "--state", state, "policy", "compile", policy, "--topology", topology)
    assert code == 0, err
    compiled = json.loads(out)
    assert set(compiled) == {"a", "b"} and list(compiled["a"]["peers"]) == ["b"]
    topology.write_text("not json")
    code, _, err = run(capsys, "--state", state, "policy", "compile", policy, "--topology", topology)
    assert code == 1 and err.startswith(f"meshbox: topology {topology} is not JSON")


def test_a_stored_policy_meshbox_refuses_can_be_replaced_offline(capsys, state, tmp_path):
    """A policy this meshbox cannot use (another version stored it) stops serve
    with the way out, and the offline CLI still works to take that way."""
    assert run(capsys, "--state", state, "users", "create", "alice")[0] == 0
    store = meshbox.open_state(state)
    store.set_setting("policy", json.dumps({"acls": [{"action": "drop", "src": ["*"], "dst": ["*:*"]}]}))
    store.db.close()

    served = meshproc.cli("serve", "--listen", f"127.0.0.1:{meshproc.free_port()}", "--derp-listen", "off",
                          "--stun-listen", "off", state=state, timeout=30)
    assert served.returncode == 1 and "stored policy is refused" in served.stderr
    assert "policy clear" in served.stderr and "Traceback" not in served.stderr
    code, out, err = run(capsys, "--state", state, "users", "create", "bob")
    assert code == 0 and "stored policy is refused" in err
    code, out, err = run(capsys, "--state", state, "policy", "clear")
    assert code == 0 and "policy cleared" in out
    assert meshbox.open_state(state).setting("policy") is None


def test_tables_strip_what_a_node_put_in_its_hostname(capsys, state):
    store = meshbox.open_state(state)
    try:
        user = store.create_user("alice")
        with store.transaction():
            node = meshbox.Node(id=0, machine_key=b"m" * 32, node_key=b"n" * 32, disco_key=b"", user_id=user.id,
                                hostname="evil", given_name="evil\x1b]0;owned\x07\x1b[2J", ipv4="100.64.0.1",
                                ipv6="fd7a:115c:a1e0::1", tags=[], ephemeral=False, auth_key_id=None, expiry=None,
                                created=1.0, last_seen=None, hostinfo={}, endpoints=[], approved_routes=[], cap=0)
            store.insert_node(node)
    finally:
        store.db.close()
    code, out, _ = run(capsys, "--state", state, "nodes", "list")
    assert code == 0 and "\x1b" not in out and "\x07" not in out and "evil" in out
    assert out.splitlines()[1].split()[-1] == "-"       # no tags: a dash, not an empty cell
    code, out, _ = run(capsys, "--state", state, "nodes", "list", "-o", "json")
    assert json.loads(out)[0]["name"].startswith("evil\x1b")     # JSON keeps the value exact, escaped


# ---- what a shell sees ----

def test_from_a_shell_errors_have_no_traceback_and_json_parses(tmp_path):
    state = tmp_path / "state"
    bad = meshproc.cli("users", "frobnicate", state=state)
    assert bad.returncode == 2 and "invalid choice" in bad.stderr and "Traceback" not in bad.stderr
    refused = meshproc.cli("users", "delete", "ghost", state=state)
    assert refused.returncode == 1 and refused.stderr == \
        "meshbox: no user named 'ghost' (create it with: users create ghost)\n" and refused.stdout == ""
    meshproc.auth_key(state, user="bob")          # the user, written without a process
    listed = meshproc.cli("users", "list", "-o", "json", state=state, check=True)
    assert [u["name"] for u in json.loads(listed.stdout)] == ["bob"]
    assert oct(os.stat(state).st_mode & 0o777) == "0o700"
