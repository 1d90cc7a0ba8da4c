"""Throwaway network namespaces for tests, and the processes started in them.

Every namespace is named ``wgpt<pid>-<label>-<random>`` so that parallel runs never
collide and a leak is easy to attribute. Nothing here links a namespace to the root
namespace. ``close()`` ends only the processes it started (by PID) and deletes the
namespace, also when the test failed.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

PREFIX = "wgpt"
WG_ENV = {"WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD": "1"}
UAPI_DIR = Path("/var/run/wireguard")
REPO = Path(__file__).resolve().parent.parent


def is_root() -> bool:
    return os.geteuid() == 0


def have(tool: str) -> bool:
    return shutil.which(tool) is not None


def unique_ifname(stem: str = "wgt") -> str:
    """An interface name unique enough to give wireguard-go its own UAPI socket path."""
    name = f"{stem}{secrets.token_hex(3)}"
    assert len(name) <= 15, name
    return name


def py_env() -> dict[str, str]:
    """Environment for child Python processes: the repo importable, no banner."""
    env = dict(os.environ, **WG_ENV)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


class Netns:
    """One network namespace with loopback up; a context manager."""

    def __init__(self, label: str = "t") -> None:
        self.name = f"{PREFIX}{os.getpid()}-{label}-{secrets.token_hex(2)}"
        self.procs: list[subprocess.Popen[bytes]] = []
        subprocess.run(["ip", "netns", "add", self.name], check=True)
        try:
            self.run(["ip", "link", "set", "lo", "up"])
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> Netns:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def argv(self, cmd: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *cmd]

    def run(self, cmd: Sequence[str], check: bool = True, timeout: float = 30,
            **kw: object) -> subprocess.CompletedProcess[str]:
        kw.setdefault("capture_output", True)
        r = subprocess.run(self.argv(cmd), text=True, timeout=timeout, env=py_env(), **kw)  # type: ignore[call-overload]
        if check and r.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} in {self.name} failed ({r.returncode}): "
                                 f"{r.stdout}{r.stderr}")
        return r  # type: ignore[no-any-return]

    def popen(self, cmd: Sequence[str], **kw: object) -> subprocess.Popen[bytes]:
        kw.setdefault("stdout", subprocess.PIPE)
        kw.setdefault("stderr", subprocess.PIPE)
        p = subprocess.Popen(self.argv(cmd), env=py_env(), **kw)  # type: ignore[call-overload]
        self.procs.append(p)
        return p  # type: ignore[no-any-return]

    def python(self, args: Sequence[str], **kw: object) -> subprocess.Popen[bytes]:
        """Start ``sys.executable ARGS`` inside the namespace."""
        return self.popen([sys.executable, *args], **kw)

    @contextlib.contextmanager
    def entered(self) -> Iterator[None]:
        """Run the block with this thread inside the namespace (sockets made here stay in it)."""
        from pyroute2 import netns

        netns.pushns(self.name)
        try:
            yield
        finally:
            netns.popns()

    def start_wireguard_go(self, ifname: str, timeout: float = 10) -> subprocess.Popen[bytes]:
        """Run wireguard-go in the foreground for IFNAME; wait for its UAPI socket."""
        p = self.popen(["wireguard-go", "-f", ifname])
        sock = UAPI_DIR / f"{ifname}.sock"
        deadline = time.monotonic() + timeout
        while not sock.exists():
            if p.poll() is not None or time.monotonic() > deadline:
                out = p.stderr.read().decode() if p.stderr and p.poll() is not None else ""
                raise AssertionError(f"wireguard-go {ifname} did not start: {out}")
            time.sleep(0.02)
        return p

    def close(self) -> None:
        for p in self.procs:
            stop(p)
        self.procs.clear()
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)


def stop(p: subprocess.Popen[bytes], timeout: float = 5) -> None:
    """End one process we started, by PID: TERM, then KILL."""
    if p.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    for f in (p.stdout, p.stderr, p.stdin):
        if f:
            f.close()


def veth(a: Netns, a_if: str, a_addr: str, b: Netns, b_if: str, b_addr: str) -> None:
    """Join two namespaces with a veth pair and address both ends (CIDR strings)."""
    tmp = f"v{secrets.token_hex(4)}"
    subprocess.run(["ip", "link", "add", tmp, "netns", a.name, "type", "veth", "peer", "name",
                    a_if + "p", "netns", b.name], check=True)
    a.run(["ip", "link", "set", tmp, "name", a_if])
    b.run(["ip", "link", "set", a_if + "p", "name", b_if])
    for ns, ifn, addr in ((a, a_if, a_addr), (b, b_if, b_addr)):
        ns.run(["ip", "addr", "add", addr, "dev", ifn])
        ns.run(["ip", "link", "set", ifn, "up"])


@contextlib.contextmanager
def shaped_pair(label: str, rate: str) -> Iterator[tuple[Netns, Netns]]:
    """Two throwaway namespaces, A (10.78.0.1, veth ``ws``) and B (10.78.0.2, ``wc``),
    whose A-to-B direction is shaped to RATE by a token bucket with a long queue: what A
    sends faster waits in that queue (still charged to the sending socket), nothing is
    dropped. B-to-A is not shaped."""
    with Netns(f"{label}-a") as a, Netns(f"{label}-b") as b:
        veth(a, "ws", "10.78.0.1/24", b, "wc", "10.78.0.2/24")
        a.run(["tc", "qdisc", "add", "dev", "ws", "root", "tbf", "rate", rate,
               "burst", "1600", "limit", "16mb"])
        yield a, b


@contextlib.contextmanager
def slow_server(label: str, rate: str, server: object) -> Iterator[socket.socket]:
    """SERVER (an unopened rendezvous.server.Server listening on 10.78.0.1) opened in A
    of a :func:`shaped_pair`, its first socket's send buffer cut to the kernel's
    minimum (a few datagrams), and a UDP socket of B's (10.78.0.2, any port) to talk to
    it: what the server sends waits behind RATE. Both are closed at the end."""
    with shaped_pair(label, rate) as (srv, cli):
        with srv.entered():
            server.open()  # type: ignore[attr-defined]
        sock = server.sockets[0]  # type: ignore[attr-defined]
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1)  # the minimum
        with cli.entered():
            c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            c.bind(("10.78.0.2", 0))
        try:
            yield c
        finally:
            c.close()
            server.close()  # type: ignore[attr-defined]
