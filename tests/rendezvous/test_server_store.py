"""Real wg-rendezvous processes sharing a real redis-server (--store, --workers): over
UDP on loopback, a key registered through one server is found through another, a
coordinated punch crosses servers (the notification leaves from the server the
notified client talks to), workers share one port, and Redis outages are survived."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from rendezvous.v2.keys import encode_key, generate_private_key
from rendezvous.v2.wire import Endpoint, NotifyBody, Status
from tests.nstools import py_env
from tests.rendezvous.redislib import RedisServer, free_port, redis  # noqa: F401 (fixture)
from tests.rendezvous.v2.test_server_v2 import Peer, endpoint, quiet, udp


class Proc:
    """A wg-rendezvous process; waits for N "listening on" lines (one per worker)."""

    def __init__(self, *args: str, listening: int = 1, port: int | None = None) -> None:
        self.port = port or free_port()
        cmd = [sys.executable, "-m", "rendezvous", "--listen", "127.0.0.1", "--port",
               str(self.port), "--stats-interval", "0", "--rate", "0", *args]
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                     env=py_env(), text=True)
        self.lines: list[str] = []
        assert self.proc.stderr is not None
        seen = 0
        for line in self.proc.stderr:
            self.lines.append(line)
            seen += "listening on " in line
            if seen == listening:
                break
        else:
            raise AssertionError("server did not start: " + "".join(self.lines))

    def finish(self) -> tuple[int, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        _, err = self.proc.communicate(timeout=15)
        return self.proc.returncode, "".join(self.lines) + err


def classic(sock: socket.socket, port: int, mine: bytes, theirs: bytes) -> bytes:
    sock.sendto(mine + theirs, ("127.0.0.1", port))
    data, src = sock.recvfrom(64)
    assert src == ("127.0.0.1", port)
    return data


def packed(sock: socket.socket) -> bytes:
    host, port = sock.getsockname()
    return socket.inet_aton(host) + port.to_bytes(2, "big")


def test_classic_key_registered_through_one_server_is_found_through_another(redis):
    s1, s2 = Proc("--store", redis.url), Proc("--store", redis.url)
    a, b = udp("127.0.0.1"), udp("127.0.0.1")
    A, B = b"\x0a" * 32, b"\x0b" * 32
    assert classic(a, s1.port, A, B) == b""
    assert classic(b, s2.port, B, A) == packed(a)
    assert classic(a, s1.port, A, B) == packed(b)
    for s in (s1, s2):
        rc, log = s.finish()
        assert rc == 0, log
        assert re.search(r"store redis://127\.0\.0\.1:\d+/0, server id \S+:\d+", log)
        assert "store_up=1" in log and "store_failures=0" in log


class SharedKey:
    def __init__(self, tmp_path) -> None:
        self.private = generate_private_key()
        self.path = tmp_path / "server.key"
        self.path.write_text(encode_key(self.private) + "\n")
        self.path.chmod(0o600)


def v2_server(key: SharedKey, redis: RedisServer, *extra: str) -> Proc:
    p = Proc("--key", str(key.path), "--store", redis.url, *extra)
    m = re.search(r"server public key ([A-Za-z0-9+/=]{44})", "".join(p.lines))
    from rendezvous.v2.keys import decode_key
    p.public = decode_key(m.group(1))
    return p


def test_coordinated_punch_crosses_servers(redis, tmp_path):
    key = SharedKey(tmp_path)
    s1, s2 = v2_server(key, redis), v2_server(key, redis)
    a, b = Peer(s1), Peer(s2)  # one fleet, one server key; A talks to s1, B to s2
    a4, b4 = udp("127.0.0.1"), udp("127.0.0.1")
    assert a.ask(a4, b, "127.0.0.1").status is Status.PENDING
    r = b.ask(b4, a, "127.0.0.1")
    assert r.status is Status.FOUND and r.endpoints == (endpoint(a4),)
    # A hears of B at once, from s1: the address and port A's NAT lets in
    a4.settimeout(3)
    data, src = a4.recvfrom(2048)
    assert src == ("127.0.0.1", s1.port)
    n = a.crypto.open(data)
    assert isinstance(n, NotifyBody) and n.peer == b.pub and n.endpoints == (endpoint(b4),)
    assert quiet(a4) and quiet(b4)
    rc1, log1 = s1.finish()
    rc2, log2 = s2.finish()
    assert rc1 == rc2 == 0
    assert "notices_received=1" in log1 and "notify_sent=1" in log1
    assert "notify_published=1" in log2 and "v2_notify_remote=1" in log2


def test_workers_share_one_port_and_one_fleet(redis):
    port = free_port()
    w = Proc("--store", redis.url, "--workers", "2", listening=2, port=port)
    assert "2 workers started" in "".join(w.lines)
    # many sources: SO_REUSEPORT spreads them over both workers; each registers, then
    # each asks for the next one's key: every answer is right whichever worker took it
    socks = [udp("127.0.0.1") for _ in range(32)]
    keys = [bytes([i + 1]) * 32 for i in range(32)]
    for s, k in zip(socks, keys):
        assert classic(s, port, k, b"\xff" * 32) == b""
    for i, (s, k) in enumerate(zip(socks, keys)):
        j = (i + 1) % 32
        assert classic(s, port, k, keys[j]) == packed(socks[j])
    rc, log = w.finish()
    assert rc == 0, log
    stats = re.findall(r"stats: requests=(\d+)", log)
    assert len(stats) == 2 and all(int(n) > 0 for n in stats), stats  # both had work
    assert sum(map(int, stats)) == 64
    assert log.count("stopped") == 2


def test_a_worker_that_cannot_start_stops_the_set(redis):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as busy:
        busy.bind(("127.0.0.1", 0))  # taken without SO_REUSEPORT: no worker can bind it
        port = busy.getsockname()[1]
        proc = subprocess.run(
            [sys.executable, "-m", "rendezvous", "--listen", "127.0.0.1", "--port", str(port),
             "--store", redis.url, "--workers", "2"],
            capture_output=True, text=True, timeout=30, env=py_env())
    assert proc.returncode == 1
    assert "address already in use" in proc.stderr
    assert "exited with status 1: stopping the others" in proc.stderr


def test_redis_outage_servers_keep_answering_and_recover(redis):
    s1, s2 = Proc("--store", redis.url), Proc("--store", redis.url)
    a, b, c = udp("127.0.0.1"), udp("127.0.0.1"), udp("127.0.0.1")
    A, B, C = b"\x0a" * 32, b"\x0b" * 32, b"\x0c" * 32
    classic(a, s1.port, A, A)
    classic(b, s2.port, B, B)
    redis.stop()
    assert classic(c, s2.port, C, B) == packed(b)  # s2's own table
    assert classic(c, s2.port, C, A) == b""         # A only ever reached s1
    redis.start()  # empty (no persistence)
    time.sleep(0.6)  # past the first retry
    classic(a, s1.port, A, A)  # A refreshes through s1
    deadline = time.monotonic() + 10
    while classic(c, s2.port, C, A) != packed(a):
        assert time.monotonic() < deadline, "s2 never found A again"
        time.sleep(0.2)
        classic(a, s1.port, A, A)
    for s in (s1, s2):
        rc, log = s.finish()
        assert rc == 0
    assert "unavailable (" in log and "answering from this server's own tables" in log
    assert re.search(r"store redis://\S+ (is back after|: reconnected)", log)


@pytest.mark.parametrize("args, msg", [
    (["--workers", "2"], "--workers 2 needs --store redis://"),
    (["--store", "redis://h", "--workers", "2", "--port", "0"], "--workers needs a fixed --port"),
    (["--store", "http://h"], "only redis://HOST:PORT/DB"),
    (["--store", "redis://h", "--server-id", "a b"], "--server-id 'a b'"),
    (["--store", "redis://h", "--workers", "0"], "--workers must be at least 1"),
])
def test_store_configuration_errors_are_one_line(args, msg):
    proc = subprocess.run([sys.executable, "-m", "rendezvous", *args], capture_output=True,
                          text=True, timeout=30, env=py_env())
    assert proc.returncode == 2 and msg in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_unreachable_redis_at_start_is_a_warning_not_a_failure(tmp_path):
    url = RedisServer(tmp_path).url  # nothing listens there
    s = Proc("--store", url)
    a = udp("127.0.0.1")
    assert classic(a, s.port, b"\x01" * 32, b"\x01" * 32) == packed(a)
    rc, log = s.finish()
    assert rc == 0 and "unavailable (cannot connect" in log and "store_up=0" in log


def test_workers_split_the_relay_ports(redis, tmp_path):
    key = SharedKey(tmp_path)
    low = free_port()
    port = free_port()
    w = Proc("--key", str(key.path), "--store", redis.url, "--workers", "2",
             "--relay-port", f"{low}-{low + 1}", "--relay-address", "127.0.0.1",
             listening=2, port=port)
    deadline = time.monotonic() + 5
    while "".join(w.lines).count("relay on UDP") < 2 and time.monotonic() < deadline:
        w.lines.append(w.proc.stderr.readline())
    rc, log = w.finish()
    assert rc == 0, log
    ports = sorted(re.findall(r"relay on UDP (\d+) ", log))
    assert ports == sorted([str(low), str(low + 1)]), log  # one each, none shared


def test_workers_need_a_relay_port_each(redis, tmp_path):
    key = SharedKey(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "rendezvous", "--key", str(key.path), "--store", redis.url,
         "--workers", "2", "--relay-port", "50000", "--relay-address", "127.0.0.1"],
        capture_output=True, text=True, timeout=30, env=py_env())
    assert proc.returncode == 2 and "needs at least one relay port per worker" in proc.stderr
