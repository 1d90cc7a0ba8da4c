"""The real wg-rendezvous process with a key, on loopback (127.0.0.1 and ::1), spoken to
from plain UDP sockets with datagrams built by ClientCrypto."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from rendezvous.v2.crypto import ClientCrypto
from rendezvous.v2.keys import decode_key, encode_key, generate_private_key
from rendezvous.v2.wire import (
    REQUEST_LEN,
    Endpoint,
    MsgType,
    NotifyBody,
    ReplyBody,
    RequestBody,
    Status,
    header,
)
from tests.nstools import have, is_root, py_env, slow_server

_ADDR = re.compile(r"(?:\[([0-9a-f:]+)\]|([\d.]+)):(\d+)")


class V2Server:
    def __init__(self, tmp_path, *args: str, key: bool = True) -> None:
        self.private = generate_private_key()
        cmd = [sys.executable, "-m", "rendezvous", "--port", "0", "--stats-interval", "0",
               "--rate", "0", *args]
        if key:
            path = tmp_path / "server.key"
            path.write_text(encode_key(self.private) + "\n")
            path.chmod(0o600)
            cmd += ["--key", str(path)]
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                     env=py_env(), text=True)
        self.lines: list[str] = []
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)
            if "listening on " in line:
                head = line.split("listening on ", 1)[1].split(" (", 1)[0]
                self.addrs = [(a6 or a4, int(p)) for a6, a4, p in _ADDR.findall(head)]
                m = re.search(r"server public key ([A-Za-z0-9+/=]{44})", line)
                self.public = decode_key(m.group(1)) if m else None
                break
        else:
            raise AssertionError("server did not start: " + "".join(self.lines))
        self.port = self.addrs[0][1]

    def finish(self) -> tuple[int, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        _, err = self.proc.communicate(timeout=10)
        return self.proc.returncode, "".join(self.lines) + err


def udp(host: str) -> socket.socket:
    s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((host, 0))
    s.settimeout(2)
    return s


def endpoint(sock: socket.socket) -> Endpoint:
    host, port = sock.getsockname()[:2]
    return Endpoint(host, port)


class Peer:
    def __init__(self, server: V2Server) -> None:
        self.crypto = ClientCrypto(generate_private_key(), server.public)
        self.pub = self.crypto.client_public
        self.server = server
        self.ts = time.time_ns()
        self.rid = 0

    def request(self, peer: bytes) -> bytes:
        self.ts = max(self.ts + 1, time.time_ns())
        self.rid += 1
        return self.crypto.seal_request(RequestBody(self.ts, self.rid, peer))

    def ask(self, sock: socket.socket, peer: Peer, dest: str) -> ReplyBody:
        data = self.request(peer.pub)
        sock.sendto(data, (dest, self.server.port))
        while True:
            reply, src = sock.recvfrom(2048)
            assert src[:2] == (dest, self.server.port) and len(reply) <= len(data)
            body = self.crypto.open(reply)
            if isinstance(body, ReplyBody):
                assert body.request_id == self.rid and body.observed == endpoint(sock)
                return body

    def notify(self, sock: socket.socket, timeout: float = 2.0) -> NotifyBody:
        sock.settimeout(timeout)
        data, _ = sock.recvfrom(2048)
        sock.settimeout(2)
        body = self.crypto.open(data)
        assert isinstance(body, NotifyBody) and len(data) <= 116
        return body


def quiet(sock: socket.socket, wait: float = 0.3) -> bool:
    """Nothing arrives on SOCK within WAIT seconds."""
    sock.settimeout(wait)
    try:
        sock.recvfrom(2048)
    except TimeoutError:
        return True
    finally:
        sock.settimeout(2)
    return False


@pytest.fixture(params=["mmsg", "plain"])
def server(request, tmp_path):
    s = V2Server(tmp_path, "--listen", "127.0.0.1", "--listen", "::1", "--io", request.param)
    yield s
    s.finish()


def test_start_line_names_addresses_protocols_and_public_key(server):
    assert server.addrs == [("127.0.0.1", server.port), ("::1", server.port)]
    assert server.public == X25519PrivateKey.from_private_bytes(
        server.private).public_key().public_bytes_raw()
    assert "classic + v2 (max skew 300s" in server.lines[-1]


def test_consent_and_coordinated_punch_over_ipv4(server):
    a, b = Peer(server), Peer(server)
    a4, b4 = udp("127.0.0.1"), udp("127.0.0.1")
    r = a.ask(a4, b, "127.0.0.1")
    assert r.status is Status.PENDING and r.endpoints == ()
    r = b.ask(b4, a, "127.0.0.1")
    assert r.status is Status.FOUND and r.endpoints == (endpoint(a4),)
    n = a.notify(a4)
    assert n.peer == b.pub and n.endpoints == (endpoint(b4),)
    assert quiet(a4)  # exactly one
    # B's NAT rebinds: A is told at once
    b4_new = udp("127.0.0.1")
    assert b.ask(b4_new, a, "127.0.0.1").status is Status.FOUND
    n2 = a.notify(a4)
    assert n2.endpoints == (endpoint(b4_new),) and n2.server_time > n.server_time
    rc, log = server.finish()
    assert rc == 0
    assert "v2_found=2" in log and "v2_pending=1" in log and "notify_sent=2" in log


def test_ipv6_and_both_families(server):
    a, b = Peer(server), Peer(server)
    a4, a6, b6 = udp("127.0.0.1"), udp("::1"), udp("::1")
    assert a.ask(a6, a, "::1").endpoints == (endpoint(a6),)  # where am I, over IPv6
    a.ask(a4, b, "127.0.0.1")
    a.ask(a6, b, "::1")
    r = b.ask(b6, a, "::1")
    assert r.status is Status.FOUND and r.endpoints == (endpoint(a6), endpoint(a4))
    for sock in (a6, a4):  # one notify to each of A's registrations
        n = a.notify(sock)
        assert n.peer == b.pub and n.endpoints == (endpoint(b6),)


def test_bad_requests_get_nothing_and_are_counted(server):
    a, b, mallory = Peer(server), Peer(server), Peer(server)
    a4, m4 = udp("127.0.0.1"), udp("127.0.0.1")
    b.ask(udp("127.0.0.1"), a, "127.0.0.1")
    forged = bytearray(mallory.request(b.pub))
    forged[8:40] = a.pub  # Mallory claims A's key
    m4.sendto(bytes(forged), ("127.0.0.1", server.port))
    tampered = bytearray(a.request(b.pub))
    tampered[70] ^= 1
    m4.sendto(bytes(tampered), ("127.0.0.1", server.port))
    m4.sendto(a.request(b.pub)[:100], ("127.0.0.1", server.port))
    assert quiet(m4)
    data = a.request(b.pub)
    a4.sendto(data, ("127.0.0.1", server.port))
    assert a.crypto.open(a4.recvfrom(2048)[0]).status is Status.FOUND
    m4.sendto(data, ("127.0.0.1", server.port))  # replay: a stale reply only A can read
    stale = a.crypto.open(m4.recvfrom(2048)[0])
    assert stale.status is Status.STALE and stale.server_time > a.ts
    rc, log = server.finish()
    assert rc == 0
    for counter in ("v2_auth_failed=2", "v2_malformed=1", "v2_stale_replay=1", "v2_found=1"):
        assert counter in log, counter


@pytest.mark.parametrize("io", ["mmsg", "plain"])
def test_require_auth_refuses_classic(tmp_path, io):
    s = V2Server(tmp_path, "--listen", "127.0.0.1", "--require-auth", "--io", io)
    try:
        assert "; v2 (" in s.lines[-1] and "classic" not in s.lines[-1]
        c = udp("127.0.0.1")
        c.sendto(b"A" * 64, ("127.0.0.1", s.port))
        assert quiet(c)
        a = Peer(s)
        assert a.ask(c, a, "127.0.0.1").status is Status.FOUND
    finally:
        rc, log = s.finish()
    assert rc == 0 and "dropped_classic_off=1" in log


def test_classic_still_works_next_to_v2(server):
    c = udp("127.0.0.1")
    c.sendto(b"A" * 32 + b"C" * 32, ("127.0.0.1", server.port))
    assert c.recvfrom(64)[0] == b""
    c.sendto(b"B" * 32 + b"A" * 32, ("127.0.0.1", server.port))
    assert c.recvfrom(64)[0] == socket.inet_aton("127.0.0.1") + c.getsockname()[1].to_bytes(2, "big")
    c6 = udp("::1")  # classic over IPv6 is not served
    c6.sendto(b"A" * 64, ("::1", server.port))
    assert quiet(c6)


def test_default_listens_on_both_families_and_notifies_from_the_address_used(tmp_path):
    """Wildcard sockets: A talks to 127.0.0.2 and B to 127.0.0.3 over connected sockets,
    which accept datagrams only from that address; the notify must come from 127.0.0.2.
    The per-datagram reader knows each request's local address."""
    s = V2Server(tmp_path, "--io", "plain")
    try:
        assert s.addrs == [("0.0.0.0", s.port), ("::", s.port)]
        a, b = Peer(s), Peer(s)
        a4, b4, a6 = udp("127.0.0.1"), udp("127.0.0.1"), udp("::1")
        a4.connect(("127.0.0.2", s.port))
        b4.connect(("127.0.0.3", s.port))
        a.ask(a4, b, "127.0.0.2")
        a.ask(a6, b, "::1")
        assert b.ask(b4, a, "127.0.0.3").status is Status.FOUND
        assert a.notify(a4).peer == b.pub
        assert a.notify(a6).peer == b.pub
    finally:
        assert s.finish()[0] == 0


def test_genkey_pubkey_round_trip():
    def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "rendezvous", *args], input=stdin,
                              capture_output=True, text=True, env=py_env(), timeout=10)

    gen = run("genkey")
    assert gen.returncode == 0 and gen.stderr == ""
    private = decode_key(gen.stdout)
    assert private[0] & 7 == 0 and private[31] & 0xC0 == 0x40  # clamped
    pub = run("pubkey", stdin=gen.stdout)
    assert pub.returncode == 0
    expected = X25519PrivateKey.from_private_bytes(private).public_key().public_bytes_raw()
    assert decode_key(pub.stdout) == expected
    bad = run("pubkey", stdin="not a key\n")
    assert bad.returncode == 1 and len(bad.stderr.strip().splitlines()) == 1
    assert bad.stderr.startswith("wg-rendezvous: pubkey: ")


@pytest.mark.parametrize("args,code,msg", [
    (["--require-auth"], 2, "--require-auth needs --key FILE"),
    (["--no-classic"], 2, "--no-classic without --key leaves no protocol"),
    (["--key", "/nonexistent/server.key"], 2, "--key: cannot read /nonexistent/server.key"),
    (["--listen", "2001:db8::55"], 1, "cannot listen on [2001:db8::55]:"),
    (["--new-key-rate", "5", "--new-key-burst", "0.5"], 2,
     "--new-key-burst must be at least 1 when --new-key-rate is on"),
])
def test_configuration_errors_are_one_line(args, code, msg):
    r = subprocess.run([sys.executable, "-m", "rendezvous", "--port", "0", *args],
                       capture_output=True, text=True, env=py_env(), timeout=10)
    assert r.returncode == code
    assert len(r.stderr.strip().splitlines()) == 1 and msg in r.stderr, r.stderr


def test_bad_key_file_is_one_line(tmp_path):
    path = tmp_path / "server.key"
    path.write_text("hello\n")
    r = subprocess.run([sys.executable, "-m", "rendezvous", "--key", str(path)],
                       capture_output=True, text=True, env=py_env(), timeout=10)
    assert r.returncode == 2 and r.stderr.startswith("wg-rendezvous: --key: key file ")
    assert len(r.stderr.strip().splitlines()) == 1


def test_require_auth_with_classic_is_refused(tmp_path):
    path = tmp_path / "server.key"
    path.write_text(encode_key(generate_private_key()))
    r = subprocess.run([sys.executable, "-m", "rendezvous", "--key", str(path), "--require-auth",
                        "--classic"], capture_output=True, text=True, env=py_env(), timeout=10)
    assert r.returncode == 2 and "refuses classic" in r.stderr


def test_notifications_without_a_route_are_counted_not_fatal():
    """In process, real sockets: a notify for an IPv6 registration on a server without
    an IPv6 socket is a counted failure, and the server carries on."""
    from rendezvous.server import Server, ServerOptions
    from rendezvous.service import Config, Service
    from rendezvous.v2.crypto import ServerCrypto

    crypto = ServerCrypto(generate_private_key())
    service = Service(Config(rate=0), crypto)
    server = Server(service, ServerOptions(listen=[("127.0.0.1", 0)]))
    server.open()
    try:
        a, b = (ClientCrypto(generate_private_key(), crypto.server_public) for _ in range(2))
        wall = time.time_ns()
        src_a6 = socket.inet_pton(socket.AF_INET6, "2001:db8::1") + (4000).to_bytes(2, "big")
        src_b4 = socket.inet_aton("127.0.0.1") + (5000).to_bytes(2, "big")
        service.handle(a.seal_request(RequestBody(wall, 1, b.client_public)), src_a6, 0.0, None, wall)
        service.handle(b.seal_request(RequestBody(wall, 1, a.client_public)), src_b4, 0.0, None, wall)
        assert server.send_notifications() == 0 and server.notify_failed == 1
        assert server.send_notifications() == 0 and server.notify_failed == 1  # drained
    finally:
        server.close()


@pytest.mark.skipif(not (is_root() and have("tc")), reason="needs root and tc")
def test_a_notification_behind_a_full_send_buffer_waits_for_room():
    """In process, a 300 kbit/s link and the kernel's smallest send buffer: datagrams
    queued toward A fill it (each takes ~28 ms to leave), then B's request makes the
    server notify A. The notify waits for room (within SEND_WAIT, 50 ms) instead of
    failing with EAGAIN."""
    from rendezvous.server import Server, ServerOptions
    from rendezvous.service import Config, Service
    from rendezvous.v2.crypto import ServerCrypto

    crypto = ServerCrypto(generate_private_key())
    service = Service(Config(rate=0), crypto)
    server = Server(service, ServerOptions(listen=[("10.78.0.1", 0)]))
    with slow_server("notify", "300kbit", server) as ca:
        sock = server.sockets[0]
        a, b = (ClientCrypto(generate_private_key(), crypto.server_public) for _ in range(2))
        wall = time.time_ns()
        src_a = socket.inet_aton("10.78.0.2") + ca.getsockname()[1].to_bytes(2, "big")
        src_b = socket.inet_aton("10.78.0.2") + (5000).to_bytes(2, "big")
        service.handle(a.seal_request(RequestBody(wall, 1, b.client_public)), src_a, 0.0,
                       None, wall)
        filled = 0
        while True:  # datagrams still on their way to A hold the buffer
            try:
                sock.sendto(b"x" * 1000, ca.getsockname())
            except BlockingIOError:
                break
            filled += 1
        service.handle(b.seal_request(RequestBody(wall, 1, a.client_public)), src_b, 0.0,
                       None, wall)
        assert server.send_notifications() == 1
        assert server.notify_failed == 0 and server.notify_sent == 1
        ca.settimeout(5)
        got = [ca.recv(2048) for _ in range(filled + 1)]
        assert filled >= 1 and got[:filled] == [b"x" * 1000] * filled
        assert isinstance(a.open(got[-1]), NotifyBody)


def test_probe_port_answers_v2_self_requests_with_observed(tmp_path):
    s = V2Server(tmp_path, "--listen", "127.0.0.1", "--listen", "::1", "--probe-port", "0")
    try:
        assert s.proc.stderr is not None
        line = s.proc.stderr.readline()
        assert "probe port on 127.0.0.1:" in line and ", [::1]:" in line, line
        probe_port = int(line.split("127.0.0.1:", 1)[1].split(",", 1)[0])
        a, b = Peer(s), Peer(s)
        for host in ("127.0.0.1", "::1"):
            sock = udp(host)
            data = a.request(a.pub)
            sock.sendto(data, (host, probe_port))
            reply, src = sock.recvfrom(2048)
            assert src[:2] == (host, probe_port) and len(reply) <= len(data)
            body = a.crypto.open(reply)
            assert isinstance(body, ReplyBody) and body.request_id == a.rid
            assert body.status is Status.PENDING and body.observed == endpoint(sock)
            sock.sendto(a.request(b.pub), (host, probe_port))  # not about itself: nothing
            assert quiet(sock)
        b4 = udp("127.0.0.1")
        assert b.ask(b4, a, "127.0.0.1").status is Status.PENDING  # A only probed
    finally:
        rc, log = s.finish()
    assert rc == 0 and "probes=2" in log and "probe_refused=2" in log, log


def test_v2_table_sizes_are_gauges_in_the_metrics(tmp_path):
    """The v2 table sizes go down as well as up (expiry, eviction): a scrape shows them
    as gauges (no ``_total``), with the values of what the test registered."""
    pytest.importorskip("prometheus_client")
    from tests.rendezvous.test_metrics import scrape

    s = V2Server(tmp_path, "--listen", "127.0.0.1", "--metrics", "127.0.0.1:0")
    try:
        assert s.proc.stderr is not None
        while not any("metrics on " in line for line in s.lines):
            s.lines.append(s.proc.stderr.readline())
        url = re.search(r"metrics on (\S+)", "".join(s.lines)).group(1)
        alice, bob = Peer(s), Peer(s)
        with udp("127.0.0.1") as sa, udp("127.0.0.1") as sb:
            assert alice.ask(sa, bob, "127.0.0.1").status is Status.PENDING
            assert bob.ask(sb, alice, "127.0.0.1").status is Status.FOUND
        got = scrape(url)
    finally:
        code, err = s.finish()
    assert code == 0, err
    assert got[("wgpunch_rendezvous_v2_peers", ())] == 2, got
    assert got[("wgpunch_rendezvous_v2_keys_cached", ())] == 2
    assert got[("wgpunch_rendezvous_v2_keys_ready", ())] == 2
    assert ("wgpunch_rendezvous_v2_asks", ()) in got
    assert not [k for k in got if re.match(r"wgpunch_rendezvous_v2_(peers|asks|keys_)", k[0])
                and k[0].endswith("_total")], got


def test_a_flood_of_forged_keys_is_held_to_the_new_key_budget(tmp_path):
    """2,000 datagrams under random keys (each would cost an X25519) against
    --new-key-rate 50 --new-key-burst 50: at most the budget of them is opened (and
    fails), the rest is dropped and counted; a client known before the flood is
    answered right after it."""
    s = V2Server(tmp_path, "--listen", "127.0.0.1", "--new-key-rate", "50",
                 "--new-key-burst", "50")
    try:
        assert "new keys 50/s burst 50" in s.lines[-1]
        alice, bob = Peer(s), Peer(s)
        with udp("127.0.0.1") as sa, udp("127.0.0.1") as flood:
            assert alice.ask(sa, bob, "127.0.0.1").status is Status.PENDING
            start = time.monotonic()
            for i in range(2000):
                flood.sendto(header(MsgType.REQUEST) + os.urandom(REQUEST_LEN - 8),
                             ("127.0.0.1", s.port))
                if i % 50 == 49:  # paced, so that none is lost in a small receive buffer
                    time.sleep(0.002)
            assert alice.ask(sa, bob, "127.0.0.1").status is Status.PENDING
            elapsed = time.monotonic() - start
    finally:
        code, err = s.finish()
    assert code == 0, err
    line = [ln for ln in err.splitlines() if "stats: " in ln][-1]
    stats = dict(re.findall(r"(v2_[a-z_]+)=(\d+)", line))
    opened = int(stats["v2_auth_failed"])
    assert opened <= 50 + 50 * elapsed + 1, (opened, elapsed, stats)
    assert opened + int(stats["v2_new_key_limited"]) == 2000, stats
