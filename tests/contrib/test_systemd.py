"""contrib/systemd: the units name real console scripts with options the programs
accept, carry the sandboxing the docs promise, and pass ``systemd-analyze verify``
(and its offline security review) where systemd-analyze is installed."""

from __future__ import annotations

import configparser
import importlib
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.nstools import REPO

UNITS = REPO / "contrib" / "systemd"
SERVER_UNIT = UNITS / "wg-rendezvous.service"
CLIENT_UNIT = UNITS / "wg-punch@.service"


def parse_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """Sections -> key -> every value (systemd allows repeated keys)."""
    out: dict[str, dict[str, list[str]]] = {}
    section = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = out.setdefault(line[1:-1], {})
            continue
        assert section is not None, f"{path.name}: {line!r} before any section"
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}: not key=value: {line!r}"
        section.setdefault(key.strip(), []).append(value.strip())
    return out


def one(unit: dict, section: str, key: str) -> str:
    values = unit[section].get(key)
    assert values, f"[{section}] {key}= is missing"
    assert len(values) == 1, f"[{section}] {key}= is set {len(values)} times"
    return values[0]


def console_scripts() -> dict[str, str]:
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    lines = cfg["options.entry_points"]["console_scripts"].strip().splitlines()
    return {name.strip(): target.strip() for name, _, target in (x.partition("=") for x in lines)}


COMMON = {
    "NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes",
    "PrivateTmp": "yes", "Restart": "on-failure", "SystemCallArchitectures": "native",
    "MemoryDenyWriteExecute": "yes", "RestrictNamespaces": "yes",
}


@pytest.mark.parametrize("path", [SERVER_UNIT, CLIENT_UNIT], ids=lambda p: p.name)
def test_common_sandboxing(path):
    unit = parse_unit(path)
    for key, value in COMMON.items():
        assert one(unit, "Service", key) == value, key
    filters = unit["Service"]["SystemCallFilter"]
    assert filters[0] == "@system-service" and "~@privileged" in filters[1]
    assert one(unit, "Install", "WantedBy") == "multi-user.target"


def test_server_unit_has_no_privilege():
    unit = parse_unit(SERVER_UNIT)
    assert one(unit, "Service", "DynamicUser") == "yes"
    assert one(unit, "Service", "CapabilityBoundingSet") == ""  # port 49918: none needed
    assert one(unit, "Service", "AmbientCapabilities") == ""
    assert set(one(unit, "Service", "RestrictAddressFamilies").split()) == {
        "AF_INET", "AF_INET6", "AF_UNIX"}


def test_client_unit_has_exactly_net_raw_and_net_admin():
    unit = parse_unit(CLIENT_UNIT)
    caps = {"CAP_NET_RAW", "CAP_NET_ADMIN"}
    assert set(one(unit, "Service", "CapabilityBoundingSet").split()) == caps
    assert set(one(unit, "Service", "AmbientCapabilities").split()) == caps
    assert set(one(unit, "Service", "RestrictAddressFamilies").split()) == {
        "AF_INET", "AF_INET6", "AF_NETLINK", "AF_UNIX"}
    assert one(unit, "Service", "RuntimeDirectory") == "wg-punch"
    assert "wg-quick@%i.service" in one(unit, "Unit", "After").split()
    assert "wg-quick@%i.service" in one(unit, "Unit", "Wants").split()
    assert one(unit, "Service", "EnvironmentFile") == "/etc/wg-punch/%i.env"
    # Exit statuses that a restart cannot fix (see wg-punch --help): no restart loop.
    assert set(one(unit, "Service", "RestartPreventExitStatus").split()) == {"2", "3"}


def _exec_argv(path: Path, env: dict[str, str], instance: str = "wg0") -> list[str]:
    line = one(parse_unit(path), "Service", "ExecStart")
    for name, value in env.items():
        line = line.replace(f"${{{name}}}", value).replace(f"${name}", value)
    return shlex.split(line.replace("%i", instance))


def _env_example() -> dict[str, str]:
    env = {}
    for line in (UNITS / "wg-punch.env.example").read_text().splitlines():
        if line and not line.startswith("#"):
            k, _, v = line.partition("=")
            env[k] = v.strip('"')
    return env


@pytest.mark.parametrize("path,env", [
    (SERVER_UNIT, {"WG_RENDEZVOUS_OPTS": ""}),
    (CLIENT_UNIT, None),
], ids=["wg-rendezvous", "wg-punch"])
def test_exec_start_runs_a_real_console_script_with_options_it_accepts(path, env):
    env = _env_example() if env is None else env
    assert env.get("SERVER", "x") and "WG_PUNCH_OPTS" in env or path == SERVER_UNIT
    argv = _exec_argv(path, env)
    scripts = console_scripts()
    assert argv[0] in scripts, f"{argv[0]} is not a console script of setup.cfg"
    module, _, func = scripts[argv[0]].partition(":")
    mod = importlib.import_module(module)
    assert callable(getattr(mod, func))
    args = mod.build_parser().parse_args(argv[1:])  # exits 2 on an unknown option
    assert args.log_format == "json"
    if path == CLIENT_UNIT:
        assert args.daemon and args.interface == "wg0" and args.server == env["SERVER"]
        assert str(args.state_dir) == "/run/wg-punch"


needs_analyze = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                   reason="systemd-analyze is not installed")


def _installable_copy(tmp_path: Path, path: Path, name: str | None = None) -> Path:
    """The unit with ExecStart's command made an absolute path to a real wrapper of the
    program (verify insists on an executable; the real script is not installed here)."""
    argv0 = one(parse_unit(path), "Service", "ExecStart").split()[0]
    module = console_scripts()[argv0].partition(":")[0].split(".")[0]
    wrapper = tmp_path / argv0
    wrapper.write_text(f"#!/bin/sh\nPYTHONPATH={REPO} exec {sys.executable} -m {module} \"$@\"\n")
    wrapper.chmod(0o755)
    text = path.read_text().replace(f"ExecStart={argv0} ", f"ExecStart={wrapper} ")
    assert str(wrapper) in text
    out = tmp_path / (name or path.name)
    out.write_text(text)
    return out


@needs_analyze
@pytest.mark.parametrize("path,name", [(SERVER_UNIT, None), (CLIENT_UNIT, "wg-punch@wg0.service")],
                         ids=["wg-rendezvous", "wg-punch"])
def test_systemd_analyze_verify(tmp_path, path, name):
    unit = _installable_copy(tmp_path, path, name)
    r = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True,
                       timeout=60, cwd=tmp_path)
    assert r.returncode == 0 and r.stdout + r.stderr == "", r.stdout + r.stderr


@needs_analyze
@pytest.mark.parametrize("path,name", [(SERVER_UNIT, None), (CLIENT_UNIT, "wg-punch@wg0.service")],
                         ids=["wg-rendezvous", "wg-punch"])
def test_systemd_analyze_security_rates_it_ok(tmp_path, path, name):
    unit = _installable_copy(tmp_path, path, name)
    r = subprocess.run(["systemd-analyze", "security", "--offline=yes", "--threshold=30",
                        str(unit)], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    last = r.stdout.strip().splitlines()[-1]
    print(last)  # the figure, for the log
    assert r.returncode == 0, r.stdout
    assert "Overall exposure level" in last


@pytest.mark.root
@pytest.mark.usefixtures("needs_wireguard_go")
def test_the_client_units_two_capabilities_are_enough():
    """wg-punch with exactly the unit's capability bounding set (and no_new_privs) still
    punches: CAP_NET_RAW and CAP_NET_ADMIN are all it needs."""
    from tests.nstools import Netns
    from tests.punch.test_client import Pair, start_server

    caps = one(parse_unit(CLIENT_UNIT), "Service", "CapabilityBoundingSet").split()
    bounding = "-all," + ",".join("+" + c.removeprefix("CAP_").lower() for c in caps)
    with Netns("cap") as ns:
        pair = Pair(ns)
        port = start_server(ns)
        server = f"127.0.0.1:{port}"
        a = ns.popen(["setpriv", f"--bounding-set={bounding}", "--no-new-privs", sys.executable,
                      "-m", "punch", "--wait", "--timeout", "20", server, pair.ifs[0]])
        b = ns.run(["setpriv", f"--bounding-set={bounding}", "--no-new-privs", sys.executable,
                    "-m", "punch", "--wait", "--timeout", "20", server, pair.ifs[1]],
                   check=False, timeout=40)
        assert b.returncode == 0, b.stderr
        assert a.wait(25) == 0, a.stderr.read().decode() if a.stderr else ""
        # ... and one capability fewer is not enough (the raw socket needs CAP_NET_RAW).
        r = ns.run(["setpriv", "--bounding-set=-all,+net_admin", "--no-new-privs",
                    sys.executable, "-m", "punch", "--timeout", "2", server, pair.ifs[0]],
                   check=False)
        assert r.returncode == 3, r.stderr
