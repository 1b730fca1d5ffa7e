"""openwrt/files: the procd init script with stand-ins for OpenWrt's shell
functions, and the uci-defaults script with a stand-in uci.

The stand-ins read the real /etc/config/meshbox: UCI's file format is shell
whose words `config`, `option` and `list` the stand-ins define, the way
OpenWrt's config_load evaluates `uci export`.
"""

import os
import shlex
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILES = os.path.join(ROOT, "openwrt", "files")
INIT = os.path.join(FILES, "meshbox.init")
CONFIG = os.path.join(FILES, "meshbox.config")
UCI_DEFAULTS = os.path.join(FILES, "meshbox.uci-defaults")

# Stand-ins for /lib/functions.sh and procd.sh (network.sh's is written to
# $IPKG_INSTROOT, where the script looks for it):
# each procd call prints one line the test reads back.
PROCD_STANDINS = r"""
config() { section=$2; }
option() { eval "CONFIG_${section}_$1=\$2"; }
list() { eval "CONFIG_${section}_$1=\"\${CONFIG_${section}_$1:+\$CONFIG_${section}_$1 }\$2\""; }
config_load() { . "$CONFIG_FILE"; }
config_get() { eval "$1=\${CONFIG_$2_$3-\$4}"; }
config_get_bool() {
	config_get "$@"
	eval "case \$$1 in 1|on|true|yes|enabled) $1=1 ;; *) $1=0 ;; esac"
}
config_list_foreach() {
	local item
	eval "items=\$CONFIG_$1_$2"
	for item in $items; do $3 "$item"; done
}
mkdir() { echo "mkdir $*"; }
chmod() { echo "chmod $*"; }
procd_open_instance() { echo "open_instance"; }
procd_set_param() { printf 'set %s' "$1"; shift; printf ' %s' "$@"; echo; }
procd_append_param() { printf 'append %s' "$1"; shift; printf ' %s' "$@"; echo; }
procd_close_instance() { echo "close_instance"; }
procd_add_reload_trigger() { echo "reload_trigger $*"; }
"""


def run_init(tmp_path, config_text, lan_ip="192.0.2.1"):
    """start_service and service_triggers of the init script: the procd calls it made."""
    config = tmp_path / "meshbox"
    config.write_text(config_text)
    network_sh = tmp_path / "lib" / "functions" / "network.sh"
    network_sh.parent.mkdir(parents=True, exist_ok=True)
    network_sh.write_text('network_get_ipaddr() { eval "$1=\\$LAN_IP"; }\n')
    script = PROCD_STANDINS + "\n. " + shlex.quote(INIT) + "\nstart_service\nservice_triggers\n"
    result = subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=30,
                            env={"PATH": os.environ["PATH"], "LAN_IP": lan_ip, "CONFIG_FILE": str(config),
                                 "IPKG_INSTROOT": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    return result.stdout.splitlines()


def command_of(lines):
    """The instance's command line: `set command` plus every `append command`."""
    words = []
    for line in lines:
        kind, _, rest = line.partition(" ")
        param, _, value = rest.partition(" ")
        if kind in ("set", "append") and param == "command":
            words += value.split(" ")
    return words


@pytest.mark.parametrize("path", [INIT, UCI_DEFAULTS])
def test_scripts_parse_as_posix_sh(path):
    for shell in ("sh", "dash", "busybox"):
        if shutil.which(shell):
            argv = [shell, "sh", "-n", path] if shell == "busybox" else [shell, "-n", path]
            result = subprocess.run(argv, capture_output=True, text=True)
            assert result.returncode == 0, (shell, result.stderr)


def test_init_script_runs_meshbox_from_the_shipped_config(tmp_path):
    with open(CONFIG) as f:
        lines = run_init(tmp_path, f.read())
    assert lines[0] == "mkdir -p /etc/meshbox"
    assert lines[1] == "chmod 700 /etc/meshbox"
    assert lines[2] == "open_instance" and lines[-2] == "close_instance"
    assert command_of(lines) == [
        "/usr/bin/meshbox", "--state", "/etc/meshbox", "serve", "--listen", "0.0.0.0:8080",
        "--log-level", "info", "--server-url", "http://192.0.2.1:8080",
        "--gateway", "--wg-interface", "meshbox0", "--wg-port", "41641",
        "--advertise-routes", "192.168.1.0/24"]
    assert "set respawn 3600 5 5" in lines
    assert "set file /etc/config/meshbox" in lines
    assert lines[-1] == "reload_trigger meshbox"


def test_init_script_passes_every_option_through(tmp_path):
    lines = run_init(tmp_path, """
config meshbox 'main'
	option enabled '1'
	option listen '198.51.100.1:443'
	option server_url 'https://mesh.example.net'
	option derp_listen '198.51.100.1:8443'
	option stun_listen 'off'
	option state_dir '/overlay/meshbox'
	option log_level 'debug'
	option gateway '1'
	option wg_interface 'mb1'
	option wg_port '51820'
	option public_endpoint '198.51.100.1:51820'
	list advertise_routes '192.168.1.0/24'
	list advertise_routes '192.168.2.0/24'
	option advertise_exit_node '1'
	option hosts_file '/tmp/hosts/meshbox'
""")
    assert lines[0] == "mkdir -p /overlay/meshbox"
    assert command_of(lines) == [
        "/usr/bin/meshbox", "--state", "/overlay/meshbox", "serve", "--listen", "198.51.100.1:443",
        "--log-level", "debug", "--server-url", "https://mesh.example.net",
        "--derp-listen", "198.51.100.1:8443", "--stun-listen", "off",
        "--gateway", "--wg-interface", "mb1", "--wg-port", "51820",
        "--public-endpoint", "198.51.100.1:51820",
        "--advertise-routes", "192.168.1.0/24,192.168.2.0/24", "--advertise-exit-node",
        "--hosts-file", "/tmp/hosts/meshbox"]


def test_init_script_without_gateway_and_disabled(tmp_path):
    lines = run_init(tmp_path, "config meshbox 'main'\n\toption enabled '1'\n\toption gateway '0'\n"
                               "\tlist advertise_routes '192.168.1.0/24'\n", lan_ip="")
    assert command_of(lines) == ["/usr/bin/meshbox", "--state", "/etc/meshbox", "serve",
                                 "--listen", "0.0.0.0:8080", "--log-level", "info"]
    assert run_init(tmp_path, "config meshbox 'main'\n\toption enabled '0'\n") == ["reload_trigger meshbox"]


def test_uci_defaults_adds_interface_zone_and_wan_rules_once(tmp_path):
    # A stand-in uci: `get` answers from a file, `batch` appends its input to a log.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    state = tmp_path / "uci"
    state.write_text("meshbox.main.wg_port=51820\n")
    (bin_dir / "uci").write_text(f"""#!/bin/sh
[ "$1" = -q ] && shift
case $1 in
get) v=$(grep "^$2=" {state} | cut -d= -f2-); [ -n "$v" ] && echo "$v" ;;
batch) cat >>{tmp_path}/batch ;;
esac
""")
    (bin_dir / "uci").chmod(0o755)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}"}
    assert subprocess.run(["sh", UCI_DEFAULTS], env=env, timeout=30).returncode == 0
    batch = (tmp_path / "batch").read_text().splitlines()
    assert "set network.meshbox0.device='meshbox0'" in batch
    assert "add_list firewall.meshbox.network='meshbox0'" in batch
    assert {"set firewall.meshbox_lan.src='meshbox'", "set firewall.meshbox_lan.dest='lan'"} <= set(batch)
    rules = {}
    for line in batch:
        key, _, value = line.removeprefix("set firewall.").partition("=")
        name, _, field = key.partition(".")
        if name.startswith("meshbox_") and field:
            rules.setdefault(name, {})[field] = value.strip("'")
    opened = {(r["proto"], r["dest_port"]) for r in rules.values()
              if r.get("src") == "wan" and r.get("target") == "ACCEPT" and r.get("enabled") != "0"}
    assert opened == {("udp", "51820"), ("tcp", "8443"), ("udp", "3478-3479")}
    assert batch[-2:] == ["commit network", "commit firewall"]
    # Run again once the interface exists: nothing more is changed.
    state.write_text(state.read_text() + "network.meshbox0=interface\n")
    assert subprocess.run(["sh", UCI_DEFAULTS], env=env, timeout=30).returncode == 0
    assert (tmp_path / "batch").read_text().splitlines() == batch
