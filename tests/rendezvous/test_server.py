"""The real wg-rendezvous process on loopback."""

from __future__ import annotations

import contextlib
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from rendezvous.server import Server, ServerOptions, buffer_shortfall
from rendezvous.service import Config, Service
from tests.nstools import Netns, have, is_root, py_env, shaped_pair, slow_server

A, B, C = b"A" * 32, b"B" * 32, b"C" * 32
IP_MTU_DISCOVER, IP_PMTUDISC_PROBE = 10, 3  # Linux; socket has them from Python 3.12


class RunningServer:
    def __init__(self, *args: str, netns: Netns | None = None) -> None:
        argv = [sys.executable, "-m", "rendezvous", "--port", "0", "--stats-interval", "0",
                *args]
        self.proc = subprocess.Popen(
            netns.argv(argv) if netns else argv,
            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, env=py_env(), text=True)
        self.lines: list[str] = []
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)
            m = re.search(r"listening on ([\d.]+):(\d+)", line)
            if m:
                self.addr = (m.group(1), int(m.group(2)))
                break
        else:
            raise AssertionError("server did not start: " + "".join(self.lines))

    def finish(self) -> tuple[int, str]:
        self.proc.send_signal(signal.SIGTERM)
        _, err = self.proc.communicate(timeout=10)
        return self.proc.returncode, "".join(self.lines) + err


@pytest.fixture(params=["mmsg", "plain"])
def server(request):
    s = RunningServer("--listen", "127.0.0.1", "--rate", "0", "--io", request.param)
    yield s
    if s.proc.poll() is None:
        s.finish()


def client(port: int = 0, addr: str = "127.0.0.1") -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((addr, port))
    s.settimeout(2)
    return s


def ask(sock: socket.socket, server_addr, mine: bytes, theirs: bytes) -> bytes:
    sock.sendto(mine + theirs, server_addr)
    data, src = sock.recvfrom(2048)
    assert src == server_addr
    return data


def packed(sock: socket.socket) -> bytes:
    ip, port = sock.getsockname()
    return socket.inet_aton(ip) + port.to_bytes(2, "big")


def test_register_and_lookup_from_several_ports(server):
    a, b = client(), client()
    assert ask(a, server.addr, A, B) == b""
    assert ask(b, server.addr, B, A) == packed(a)
    assert ask(a, server.addr, A, B) == packed(b)
    assert ask(a, server.addr, A, A) == packed(a)  # what is my public endpoint?
    assert ask(a, server.addr, A, C) == b""  # unknown key: empty datagram


def test_reregistration_from_new_port_moves_entry(server):
    a1, b = client(), client()
    ask(a1, server.addr, A, B)
    assert ask(b, server.addr, B, A) == packed(a1)
    a2 = client()
    ask(a2, server.addr, A, B)
    assert ask(b, server.addr, B, A) == packed(a2)


def test_bad_datagrams_get_no_reply_and_server_carries_on(server):
    a = client()
    a.settimeout(0.3)
    for n in (0, 1, 63, 65, 1400):
        a.sendto(b"x" * n, server.addr)
    a.sendto(bytes(32) + B, server.addr)  # zero my_pubkey
    with pytest.raises(TimeoutError):
        a.recvfrom(2048)
    a.settimeout(2)
    assert ask(a, server.addr, A, A) == packed(a)
    rc, log = server.finish()
    assert rc == 0
    assert "dropped_length=5" in log and "dropped_zero_key=1" in log


def test_sigterm_exits_zero_with_final_stats(server):
    ask(client(), server.addr, A, B)
    rc, log = server.finish()
    assert rc == 0
    assert "requests=1" in log and "not_found=1" in log and "stopped" in log


def test_port_in_use_is_one_clear_line():
    busy = client()
    r = subprocess.run([sys.executable, "-m", "rendezvous", "--listen", "127.0.0.1",
                        "--port", str(busy.getsockname()[1])],
                       capture_output=True, text=True, env=py_env(), timeout=10)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [
        f"wg-rendezvous: cannot listen on 127.0.0.1:{busy.getsockname()[1]}: address already in use"]


@pytest.mark.parametrize("args,msg", [
    (["--listen", "1.2.3"], "not an IPv4 address"),
    (["--port", "70000"], "not a UDP port"),
    (["--ttl", "-5"], "must not be negative"),
])
def test_bad_arguments(args, msg):
    r = subprocess.run([sys.executable, "-m", "rendezvous", *args],
                       capture_output=True, text=True, env=py_env(), timeout=10)
    assert r.returncode == 2 and msg in r.stderr


def test_address_not_local_is_clear():
    r = subprocess.run([sys.executable, "-m", "rendezvous", "--listen", "192.0.2.55", "--port", "0"],
                       capture_output=True, text=True, env=py_env(), timeout=10)
    assert r.returncode == 1 and "no such local address" in r.stderr


@pytest.mark.parametrize("io", ["mmsg", "plain"])
def test_reply_leaves_from_the_address_the_request_was_sent_to(io):
    """Wildcard bind on a host with several addresses: a client that talks to the second
    one (connected socket, so it accepts replies only from there) must get its reply."""
    s = RunningServer("--rate", "0", "--io", io)  # 0.0.0.0
    try:
        port = s.addr[1]
        for dst in ("127.0.0.1", "127.0.0.2", "127.0.0.3"):
            c = client()
            c.connect((dst, port))
            c.send(A + A)
            assert c.recv(64) == packed(c)
            c.close()
    finally:
        assert s.finish()[0] == 0


@pytest.mark.skipif(not is_root(), reason="needs root: a network namespace and a raw socket")
@pytest.mark.parametrize("io", ["mmsg", "plain"])
def test_replies_are_sent_with_df_and_ip_id_zero(io):
    """The replies go out as atomic datagrams (DF set, IP ID 0; RFC 6864), which spares
    the kernel its shared IP ID generator for each one. Seen on the wire: a raw socket
    in a throwaway namespace gets a copy of every UDP datagram its loopback carries."""
    with Netns("df") as ns:
        with ns.entered():
            raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_UDP)
            raw.settimeout(2)
            c = client()
        s = RunningServer("--listen", "127.0.0.1", "--rate", "0", "--io", io, netns=ns)
        try:
            port = s.addr[1]
            assert ask(c, s.addr, A, A) == packed(c)  # found: 6 bytes
            assert ask(c, s.addr, A, B) == b""  # not found: empty
            seen = []
            while len(seen) < 2:
                pkt = raw.recv(2048)
                ihl = (pkt[0] & 15) * 4
                if int.from_bytes(pkt[ihl:ihl + 2], "big") == port:  # from the server
                    seen.append(pkt)
            for pkt in seen:
                assert int.from_bytes(pkt[6:8], "big") == 0x4000  # DF, no fragment offset
                assert pkt[4:6] == b"\0\0"  # IP ID
        finally:
            raw.close()
            c.close()
            assert s.finish()[0] == 0


@pytest.mark.skipif(not (is_root() and have("tc")), reason="needs root and tc")
@pytest.mark.parametrize("io", ["mmsg", "plain"])
def test_a_burst_of_replies_into_a_slow_uplink_is_not_dropped(io):
    """Replies that wait in the egress queue of a slow link stay charged to the server's
    send buffer; with the kernel's default (208 KiB, ~200 small replies) a burst of
    requests made the sends fail with EAGAIN and those replies were dropped. Now the
    server asks for 4 MiB. The uplink here: a veth whose egress is shaped to 2 Mbit/s
    (tbf with a long queue). Where net.core.wmem_max grants less, the server says so
    at start instead (what a full buffer then costs: the tests of mmsg.SEND_WAIT)."""
    count = 2000
    granted = int(open("/proc/sys/net/core/wmem_max").read()) >= 4 << 20
    with shaped_pair("sndbuf", "2mbit") as (srv, cli):
        s = RunningServer("--listen", "10.78.0.1", "--rate", "0", "--io", io, netns=srv)
        with cli.entered():
            c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            c.bind(("10.78.0.2", 0))
        try:
            c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
            c.settimeout(5)
            keys = [random.randbytes(32) for _ in range(count)]
            for k in keys:  # as fast as we can: far faster than the uplink drains
                c.sendto(k + B, s.addr)
            got = 0
            with contextlib.suppress(TimeoutError):
                while got < count:
                    c.recv(64)
                    got += 1
        finally:
            c.close()
            code, log = s.finish()
        assert code == 0
        if granted:
            assert got == count, log[-800:]
            assert "send_failed=0" in log
            assert "socket buffers capped" not in log
        else:
            assert re.search(r"socket buffers capped by the kernel: .*send \d+ of 4096 KiB "
                             r"\(net.core.wmem_max\)", log), log[-800:]


def test_buffer_shortfall_names_what_the_kernel_capped():
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 14)
        assert buffer_shortfall(sock, rcvbuf=1 << 12, sndbuf=1 << 12) == []
        short = buffer_shortfall(sock, rcvbuf=1 << 12, sndbuf=1 << 30)
        assert short == ["send 16 of 1048576 KiB (net.core.wmem_max)"]
    finally:
        sock.close()


@pytest.mark.skipif(not (is_root() and have("tc")), reason="needs root and tc")
def test_the_plain_path_waits_for_a_full_send_buffer_too():
    """--io plain, in process: 100 replies into the kernel's smallest send buffer (~8
    small datagrams) behind a 2 Mbit/s link all leave; before, ~90 were dropped."""
    server = Server(Service(Config(rate=0)),
                    ServerOptions(listen=[("10.78.0.1", 0)], io="plain"))
    with slow_server("plain", "2mbit", server) as c:
        sock = server.sockets[0]
        for _ in range(100):
            c.sendto(random.randbytes(32) * 2, sock.getsockname())
        time.sleep(0.2)  # one unshaped hop: all are queued by then
        server._plain_reader(sock, pktinfo=False)()
        assert server.send_failed == 0
        c.settimeout(5)
        assert [len(c.recv(64)) for _ in range(100)] == [6] * 100


def test_only_the_service_sockets_send_atomic_datagrams():
    """The service's and the probe's sockets set IP_PMTUDISC_PROBE (DF, ID 0); the
    relay's, which forward full-size WireGuard packets, keep the kernel's default."""
    opts = ServerOptions(listen=[("127.0.0.1", 0)], probe=[("127.0.0.1", 0)],
                         relay_ports=[0])
    server = Server(Service(Config()), opts)
    server.open()
    try:
        def mode(sock: socket.socket) -> int:
            return sock.getsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER)
        assert [mode(s) for s in server.sockets + server.probe_sockets] == [
            IP_PMTUDISC_PROBE] * 2
        default = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        assert [mode(s) for _, s in server.relay_sockets] == [mode(default)]
        default.close()
    finally:
        server.close()


def _probe_ports(s: RunningServer) -> list[tuple[str, int]]:
    """The probe sockets the server logs right after its start line."""
    assert s.proc.stderr is not None
    line = s.proc.stderr.readline()
    s.lines.append(line)
    assert "probe port on " in line, line
    head = line.split("probe port on ", 1)[1].split(" (", 1)[0]
    return [(a, int(p)) for a, p in (x.rsplit(":", 1) for x in head.split(", "))]


@pytest.mark.parametrize("io", ["mmsg", "plain"])
def test_probe_port_answers_self_lookups_and_registers_nothing(io):
    s = RunningServer("--listen", "127.0.0.1", "--rate", "0", "--io", io, "--probe-port", "0",
                      "--probe-address", "127.0.0.2")
    try:
        probes = _probe_ports(s)
        assert [a for a, _ in probes] == ["127.0.0.1", "127.0.0.2"]
        port = probes[0][1]
        assert port != s.addr[1] and probes[1][1] == port
        a, b = client(), client()
        for dst in probes:  # classic self-lookups: the sender's observed address
            assert ask(a, dst, A, A) == packed(a)
        a.settimeout(0.3)
        a.sendto(A + B, probes[0])  # not a self-lookup: no answer at all
        with pytest.raises(TimeoutError):
            a.recvfrom(2048)
        a.settimeout(2)
        assert ask(b, s.addr, B, A) == b""  # A only probed: not registered
        assert ask(a, s.addr, A, B) == packed(b)  # the usual port still works as ever
    finally:
        rc, log = s.finish()
    assert rc == 0 and "probes=2" in log and "probe_refused=1" in log, log


def test_probe_address_under_a_wildcard_is_served_by_the_wildcard():
    s = RunningServer("--rate", "0", "--probe-port", "0", "--probe-address", "127.0.0.2")
    try:
        probes = _probe_ports(s)
        assert probes[0][0] == "0.0.0.0"
        c = client()
        c.connect(("127.0.0.2", probes[0][1]))
        c.send(A + A)
        assert c.recv(64) == packed(c)  # answered from the address it was sent to
    finally:
        assert s.finish()[0] == 0


@pytest.mark.parametrize("args,msg", [
    (["--probe-address", "127.0.0.2"], "--probe-address needs --probe-port PORT"),
    (["--port", "4000", "--probe-port", "4000"], "--probe-port must differ from --port (4000)"),
    (["--probe-port", "x"], "not a UDP port"),
])
def test_bad_probe_arguments(args, msg):
    r = subprocess.run([sys.executable, "-m", "rendezvous", "--listen", "127.0.0.1", *args],
                       capture_output=True, text=True, env=py_env(), timeout=10)
    assert r.returncode == 2 and msg in r.stderr.strip().splitlines()[-1]


@pytest.mark.fuzz
def test_fuzz_server_survives_and_never_amplifies():
    s = RunningServer("--listen", "127.0.0.1", "--rate", "0", "--max-peers", "5000")
    rng = random.Random(1234)
    short, exact, long_, probe = client(), client(), client(), client()
    for sock in (short, exact, long_):
        sock.setblocking(False)
    valid = A + B
    sent = 0
    try:
        while sent < 100_000:
            for _ in range(500):
                kind = rng.random()
                if kind < 0.3:
                    data = os.urandom(rng.randrange(64))
                    short.sendto(data, s.addr)
                elif kind < 0.7:
                    data = bytearray(valid if rng.random() < 0.5 else os.urandom(64))
                    for _ in range(rng.randrange(1, 6)):
                        data[rng.randrange(64)] = rng.randrange(256)
                    exact.sendto(bytes(data), s.addr)
                else:
                    long_.sendto(os.urandom(rng.randrange(65, 1500)), s.addr)
                sent += 1
            for _attempt in range(5):  # the server must keep answering valid requests
                try:
                    if ask(probe, s.addr, C, C) == packed(probe):
                        break
                except TimeoutError:
                    continue
            else:
                raise AssertionError(f"server stopped answering after {sent} datagrams")
            assert s.proc.poll() is None
        time.sleep(0.2)
        for sock, limit in ((short, None), (long_, None), (exact, 6)):
            while True:
                try:
                    data = sock.recv(4096)
                except BlockingIOError:
                    break
                assert limit is not None, "a datagram of the wrong length was answered"
                assert len(data) in (0, 6)
    finally:
        rc, log = s.finish()
    assert rc == 0, log
