"""Hardening of the local edges: the state folder's permissions, the admin
socket's size bound, JSON nested too deep, --remote in clear text, and the
names the hosts file publishes to the LAN's resolver."""

import asyncio
import json
import os
import socket
import stat
import subprocess
import sys
import time
import types

import pytest

import meshbox
import tsclient
from meshproc import MeshboxProcess, auth_key, free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEEP = 100_000          # far past Python's recursion limit, well under a request body's bound


def cli(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "meshbox.py"), *args], capture_output=True, text=True,
                          timeout=60)


def mode_of(path):
    return stat.S_IMODE(os.lstat(path).st_mode)


def wait_for(predicate, seconds=10):
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline
        time.sleep(0.05)


def deep_array(depth=DEEP):
    return "[" * depth + "]" * depth


# -- the hosts file --

def test_hosts_file_publishes_only_full_names():
    nodes = [types.SimpleNamespace(id=i, given_name=name, ipv4=f"100.64.0.{i}", ipv6=f"fd7a:115c:a1e0::{i}")
             for i, name in enumerate(("wpad", "router", "localhost"), 1)]
    devices = [{"name": "printer", "ipv4": "100.64.0.9", "ipv6": "fd7a:115c:a1e0::9"}]
    lines = meshbox.hosts_file_text(nodes, devices, "mesh.internal").splitlines()
    assert lines[0].startswith("#")
    entries = [line.split("\t") for line in lines[1:]]
    assert entries == [[address, f"{name}.mesh.internal"]
                       for name, n in (("wpad", 1), ("router", 2), ("localhost", 3), ("printer", 9))
                       for address in (f"100.64.0.{n}", f"fd7a:115c:a1e0::{n}")]


# -- --remote --

def test_remote_in_clear_text_is_refused_off_loopback(monkeypatch, capsys):
    dialled = []

    def create_connection(address, *args, **kwargs):
        dialled.append(address)
        raise ConnectionRefusedError(111, "Connection refused")
    monkeypatch.setattr(meshbox.socket, "create_connection", create_connection)
    monkeypatch.delenv("MESHBOX_REMOTE", raising=False)

    def run(*args):
        return meshbox.main(["--api-key", "msapi-" + "0" * 48, *args, "users", "list"])

    for url in ("http://192.0.2.1:8080", "http://router.example:8080", "http://[2001:db8::1]:8080"):
        assert run("--remote", url) == 1
        refusal = capsys.readouterr().err
        assert "in clear text" in refusal and "https://" in refusal and "--insecure-remote" in refusal, refusal
    assert run("--remote", "ftp://192.0.2.1") == 1 and "http:// or https://" in capsys.readouterr().err
    assert dialled == []           # the key never left the machine

    # Loopback and the tailnet (WireGuard encrypts it) are fine, and so is an explicit choice.
    for args in (["--remote", "http://127.0.0.1:9"], ["--remote", "http://localhost:9"],
                 ["--remote", "http://[::1]:9"], ["--remote", "http://100.64.0.1:9"],
                 ["--remote", "http://192.0.2.1:9", "--insecure-remote"]):
        assert run(*args) == 1 and "Connection refused" in capsys.readouterr().err
    assert [port for _, port in dialled] == [9] * 5
