"""Drive scripts/netns_lab.sh from tests: one ``Lab`` per test, torn down even on failure.

Each lab gets its own ``LAB_PREFIX`` (``wgplt<pid>-<hex>``), so its namespaces and state
directory never collide with another test's or a user's lab. Processes a test starts on a
lab host go through ``netns_lab.sh exec``, which replaces itself with the command, so the
``Popen`` PID is the program itself; ``down()`` stops them by PID and then lets the script
remove everything else.
"""

from __future__ import annotations

import os
import re
import secrets
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from tests.nstools import REPO, py_env, stop

__all__ = [
    "Lab", "LabError", "SCRIPT", "STATE_ROOT", "RUN_PREFIX", "PROBE",
    "leftovers", "new_prefix", "script_env",
]

SCRIPT = REPO / "scripts" / "netns_lab.sh"
PROBE = str(Path(__file__).with_name("udp_probe.py"))
STATE_ROOT = Path(os.environ.get("LAB_STATE_ROOT", "/run/wgpunch-lab"))
RUN_PREFIX = f"wgplt{os.getpid()}-"  # every lab of this test run starts with this


class LabError(AssertionError):
    """The lab script failed; the message carries its output."""


def new_prefix() -> str:
    return RUN_PREFIX + secrets.token_hex(2)


def script_env(prefix: str, **extra: str) -> dict[str, str]:
    env = py_env()
    env.update(LAB_PREFIX=prefix, PYTHON=sys.executable, **extra)
    return env


def leftovers(prefix: str) -> list[str]:
    """Namespaces and state directories whose name starts with PREFIX."""
    found = []
    netns = Path("/run/netns")
    if netns.is_dir():
        found += [f"netns {p.name}" for p in netns.iterdir() if p.name.startswith(prefix)]
    if STATE_ROOT.is_dir():
        found += [f"state {p}" for p in STATE_ROOT.iterdir() if p.name.startswith(prefix)]
    return sorted(found)


def _starttime(pid: int) -> str | None:
    """PID's start time, or None if it is gone (a zombie counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()
    return None if fields[0] == "Z" else fields[19]


class Lab:
    """One lab: ``up()``, then run things on its hosts; ``down()`` always."""

    def __init__(self, nat_a: str = "cone", nat_b: str = "cone", *,
                 prefix: str | None = None, wg: str | None = None, ipv6: bool = False,
                 v2: bool = False, probe_port: int | None = None,
                 sym_ports: str | None = None) -> None:
        self.prefix = prefix or new_prefix()
        self.nat_a, self.nat_b = nat_a, nat_b
        self.ipv6, self.v2 = ipv6, v2
        self.extra_env = {"LAB_WG": wg} if wg else {}
        if probe_port is not None:  # the server answers NAT probes; v2 clients probe
            self.extra_env["LAB_PROBE_PORT"] = str(probe_port)
        if sym_ports is not None:  # a symmetric NAT allocates from this port block only
            self.extra_env["LAB_SYM_PORTS"] = sym_ports
        self.procs: list[subprocess.Popen[bytes]] = []
        self.info: dict[str, str] = {}

    # -- the script -------------------------------------------------------------------

    def script(self, *args: str, check: bool = True, timeout: float = 60,
               env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        r = subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True,
                           timeout=timeout,
                           env=env or script_env(self.prefix, **self.extra_env))
        if check and r.returncode != 0:
            raise LabError(f"netns_lab.sh {' '.join(args)} failed ({r.returncode}):\n"
                           f"{r.stdout}{r.stderr}")
        return r

    def up(self) -> Lab:
        self.script("up", "--nat-a", self.nat_a, "--nat-b", self.nat_b,
                    *(["--ipv6"] if self.ipv6 else []), *(["--v2"] if self.v2 else []))
        self.info = dict(line.split("=", 1) for line in self.script("info").stdout.split())
        return self

    def down(self) -> None:
        for p in self.procs:
            stop(p)
        self.procs.clear()
        self.script("down")

    def pids(self) -> list[tuple[int, str]]:
        """(pid, starttime) of the long-lived processes the script started."""
        out = []
        for f in (STATE_ROOT / self.prefix / "pids").glob("*.pid"):
            pid, start = f.read_text().split()
            out.append((int(pid), start))
        return out

    @staticmethod
    def alive(pids: Sequence[tuple[int, str]]) -> list[int]:
        return [pid for pid, start in pids if _starttime(pid) == start]

    # -- lab hosts ----------------------------------------------------------------------

    @property
    def server(self) -> str:
        return self.info["SERVER"]

    @property
    def rdv(self) -> str:
        """The server's IPv4 address:port."""
        return f"{self.info['SERVER']}:{self.info['RDV_PORT']}"

    @property
    def rdv6(self) -> str:
        """The server's IPv6 [address]:port (labs with IPv6)."""
        return f"[{self.info['SRV_ADDR6']}]:{self.info['RDV_PORT']}"

    def run(self, host: str, argv: Sequence[str], check: bool = True,
            timeout: float = 30) -> subprocess.CompletedProcess[str]:
        r = self.script("exec", host, *argv, check=False, timeout=timeout)
        if check and r.returncode != 0:
            raise LabError(f"{host}: {' '.join(argv)} failed ({r.returncode}):\n"
                           f"{r.stdout}{r.stderr}")
        return r

    def popen(self, host: str, argv: Sequence[str]) -> subprocess.Popen[bytes]:
        return self.script_popen("exec", host, *argv)

    def script_popen(self, *args: str) -> subprocess.Popen[bytes]:
        """``netns_lab.sh ARGS`` for a command that replaces itself with the program
        (exec, server, punch): the Popen PID is the program, stopped by ``down()``."""
        p = subprocess.Popen(["bash", str(SCRIPT), *args],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             env=script_env(self.prefix, **self.extra_env))
        self.procs.append(p)
        return p

    def python(self, host: str, args: Sequence[str]) -> subprocess.Popen[bytes]:
        return self.popen(host, [sys.executable, *args])

    def stop(self, p: subprocess.Popen[bytes]) -> tuple[str, str]:
        """Stop P (TERM, then KILL) and return what it wrote."""
        if p.poll() is None:
            p.terminate()
        try:
            out, err = p.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate()
        return out.decode(errors="replace"), err.decode(errors="replace")

    def wait_line(self, p: subprocess.Popen[bytes], want: str = "ready") -> None:
        assert p.stdout is not None
        # Byte by byte from the pipe itself: a buffered readline() could swallow the
        # lines after this one, which communicate() (reading the fd) would then never see.
        fd, raw = p.stdout.fileno(), b""
        while not raw.endswith(b"\n") and (c := os.read(fd, 1)):
            raw += c
        line = raw.decode(errors="replace").strip()
        if line != want:
            _, err = self.stop(p)
            raise LabError(f"expected {want!r} from {p.args!r}, got {line!r}: {err}")

    def wait_listening(self, host: str, port: int, p: subprocess.Popen[bytes],
                       timeout: float = 30) -> None:
        """Wait until something on HOST listens on UDP PORT (P must still run)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.run(host, ["ss", "-Hlun", f"sport = :{port}"]).stdout.strip():
                return
            if p.poll() is not None:
                break
            time.sleep(0.05)
        _, err = self.stop(p)
        raise LabError(f"nothing listens on {host} UDP {port}: {err}")

    # -- the programs under test --------------------------------------------------------

    def start_server(self, *extra: str) -> subprocess.Popen[bytes]:
        """wg-rendezvous as the lab runs it (`netns_lab.sh server`: in a v2 lab with the
        lab's key and --require-auth), plus EXTRA."""
        p = self.script_popen("server", *extra)
        self.wait_listening("server", int(self.info["RDV_PORT"]), p)
        return p

    def punch(self, host: str, *extra: str) -> subprocess.Popen[bytes]:
        """wg-punch as the lab runs it (`netns_lab.sh punch`: in a v2 lab with
        --server-key), verbose, plus EXTRA."""
        return self.script_popen("punch", host, "-v", *extra)

    def punch_classic(self, host: str, *extra: str) -> subprocess.Popen[bytes]:
        """The classic wg-punch (no --server-key) against the server's IPv4 address."""
        return self.python(host, ["-m", "punch", self.rdv, "wg0", "-v", *extra])

    # -- WireGuard, NAT and tunnel views ------------------------------------------------

    def status(self, host: str) -> dict:
        """``wg-punch status wg0 --json`` on HOST, reading the state file the lab's
        wg-punch wrote there (netns_lab.sh gives each host its own --state-dir)."""
        import json

        state = STATE_ROOT / self.prefix / "punch-state" / host
        r = self.run(host, [sys.executable, "-m", "punch", "status", "wg0",
                            "--state-dir", str(state), "--json"])
        return json.loads(r.stdout)

    def wg_show(self, host: str, field: str) -> list[str]:
        """The value column of ``wg show wg0 FIELD`` (one line per peer)."""
        out = self.run(host, ["wg", "show", "wg0", field]).stdout
        return [line.split("\t", 1)[1] for line in out.splitlines() if "\t" in line]

    def endpoint(self, host: str) -> str:
        (ep,) = self.wg_show(host, "endpoints")
        return ep

    def handshake(self, host: str) -> int:
        (ts,) = self.wg_show(host, "latest-handshakes")
        return int(ts)

    def wait_handshake(self, host: str, timeout: float, after: int = 0) -> bool:
        """Poll until HOST's wg0 reports a handshake newer than AFTER (unix seconds)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.handshake(host) > after:
                return True
            time.sleep(0.1)
        return False

    def ping(self, host: str, addr: str, count: int = 3) -> bool:
        r = self.run(host, ["ping", "-n", "-q", "-c", str(count), "-i", "0.2", "-W", "2", addr],
                     check=False)
        return r.returncode == 0

    def ping_until(self, host: str, addr: str, timeout: float) -> bool:
        """One ping at a time until one answers or TIMEOUT passes."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.run(host, ["ping", "-n", "-q", "-c", "1", "-W", "1", addr],
                        check=False).returncode == 0:
                return True
        return False

    def drops(self, nat: str) -> int:
        """Packets the `drop` rules on NAT ('a' or 'b') have dropped so far (both families)."""
        out = self.run(f"nat-{nat}", ["nft", "list", "chain", "ip", "wgpunch_lab", "drops"]).stdout
        if self.info.get("IPV6") == "1":
            out += self.run(f"nat-{nat}", ["nft", "list", "chain", "ip6", "wgpunch_lab6",
                                           "drops"]).stdout
        return sum(int(n) for n in re.findall(r"counter packets (\d+)", out))

    def fw6_dropped(self, nat: str) -> int:
        """Unsolicited inbound IPv6 packets router NAT ('a' or 'b') has dropped so far."""
        out = self.run(f"nat-{nat}", ["nft", "list", "chain", "ip6", "wgpunch_lab6",
                                      "router_fwd"]).stdout
        (n,) = re.findall(r"counter packets (\d+) bytes \d+ drop comment \"unsolicited\"", out)
        return int(n)

    def rule_packets(self, nat: str, comment: str) -> int:
        """Packets counted so far by the one rule on NAT ('a' or 'b') with COMMENT."""
        out = self.run(f"nat-{nat}", ["nft", "list", "table", "ip", "wgpunch_lab"]).stdout
        (n,) = re.findall(rf'counter packets (\d+) bytes \d+ .*comment "{re.escape(comment)}"',
                          out)
        return int(n)

    def mappings(self) -> dict[str, str]:
        """A same-LAN router's learnt mappings: "LAN addr:port" -> "public addr:port"."""
        out = self.run("nat-a", ["nft", "list", "map", "ip", "wgpunch_lab", "mapped"]).stdout
        return {f"{a}:{p}": f"{pa}:{pp}" for a, p, pa, pp in re.findall(
            r"(\d+\.\d+\.\d+\.\d+) \. (\d+) [^:,{}]*: (\d+\.\d+\.\d+\.\d+) \. (\d+)", out)}

    def conntrack(self, nat: str, family: str = "ipv4") -> str:
        return self.run(f"nat-{nat}", ["conntrack", "-L", "-f", family, "-p", "udp"]).stdout

    def probe(self, host: str, *args: str) -> subprocess.Popen[bytes]:
        return self.python(host, [PROBE, *args])

    def ask(self, host: str, src_port: int, *dsts: str) -> list[str]:
        return self.run(host, [sys.executable, PROBE, "ask", str(src_port), *dsts]).stdout.split()
