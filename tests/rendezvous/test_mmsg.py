"""Batch I/O on real loopback sockets: the bulk path and the per-datagram path, with
datagrams of every length, answer exactly what Service.handle answers one by one."""

from __future__ import annotations

import contextlib
import random
import socket
import time
from collections.abc import Iterator

import pytest

from rendezvous import mmsg
from rendezvous.batch import ClassicBatch
from rendezvous.classic import ZERO_KEY
from rendezvous.server import open_socket
from rendezvous.service import Config, Service
from tests.nstools import have, is_root, shaped_pair

pytestmark = pytest.mark.skipif(not mmsg.MMSG_AVAILABLE, reason="no recvmmsg/sendmmsg")

BUFSIZE = 2048


def packed(sock: socket.socket) -> bytes:
    ip, port = sock.getsockname()
    return socket.inet_aton(ip) + port.to_bytes(2, "big")


class Recorder:
    """Service.handle, remembering what it was given (for the per-datagram path)."""

    def __init__(self, service: Service) -> None:
        self.service = service
        self.seen: list[tuple[bytes, bytes]] = []

    def __call__(self, data: bytes, source: bytes, now: float) -> bytes | None:
        self.seen.append((data, source))
        return self.service.handle(data, source, now)


class CountingBulk:
    def __init__(self, service: Service) -> None:
        self.batch = ClassicBatch(service)
        self.taken = self.declined = 0

    def __call__(self, heads, sources, now):
        res = self.batch.handle(heads, sources, now)
        self.taken += res is not None
        self.declined += res is None
        return res


def drain(sock: socket.socket) -> list[bytes]:
    got = []
    while True:
        try:
            got.append(sock.recv(4096))
        except BlockingIOError:
            return got


def serve_all(batch: mmsg.Batch, fd: int, handle, bulk, now: float) -> int:
    total = 0
    while True:
        n, _sent, failed = batch.exchange(fd, handle, now, bulk)
        assert failed == 0
        total += n
        if n == 0:
            return total


@pytest.mark.parametrize("seed", range(3))
def test_every_length_through_both_paths(seed: int) -> None:
    rng = random.Random(seed)
    config = Config(ttl=60, max_peers=50, rate=0, burst=0)
    server = open_socket("127.0.0.1", 0)
    addr = server.getsockname()
    clients = []
    for _ in range(6):
        c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        c.bind(("127.0.0.1", 0))
        c.setblocking(False)
        clients.append(c)
    keys = [rng.randbytes(32) for _ in range(30)]
    mine = {c: keys[i] for i, c in enumerate(clients)}
    twin = Service(config)
    recorder = Recorder(Service(config))
    bulk = CountingBulk(recorder.service)
    batch = mmsg.Batch(16, BUFSIZE)
    expected: dict[socket.socket, list[bytes]] = {c: [] for c in clients}
    long_sent = []
    try:
        now = 1.0
        for _round in range(60):
            now += 0.5
            for _ in range(rng.choice([1, 5, 16, 16, 40])):
                c = rng.choice(clients)
                x = rng.random()
                if x < 0.85:
                    data = mine[c] + rng.choice(keys[6:])
                elif x < 0.88:
                    data = ZERO_KEY + rng.choice(keys)
                elif x < 0.9:
                    data = mine[c] + mine[rng.choice(clients)]
                else:
                    data = rng.randbytes(rng.choice([0, 1, 63, 65, 100, BUFSIZE - 1, BUFSIZE,
                                                     BUFSIZE + 1, 3000]))
                    if len(data) > 64:
                        long_sent.append(data)
                c.sendto(data, addr)
                reply = twin.handle(data if len(data) <= BUFSIZE else data[:BUFSIZE] + b"\0",
                                    packed(c), now)
                if reply is not None:
                    expected[c].append(reply)
            serve_all(batch, server.fileno(), recorder, bulk, now)
            for c in clients:
                assert drain(c) == expected[c]
                expected[c].clear()
        assert recorder.service.snapshot() == twin.snapshot()
        assert list(recorder.service.registry._d.items()) == list(twin.registry._d.items())
        assert bulk.taken > 20 and bulk.declined > 5, (bulk.taken, bulk.declined)
        # datagrams longer than 64 bytes reach Service.handle whole (truncated ones: one
        # byte longer than the buffer, so never taken for a valid request)
        seen_long = [d for d, _ in recorder.seen if len(d) > 64]
        want_long = [d if len(d) <= BUFSIZE else d[:BUFSIZE] + b"\0" for d in long_sent]
        assert seen_long == want_long
    finally:
        server.close()
        for c in clients:
            c.close()


def test_bulk_replies_leave_from_the_address_each_request_was_sent_to() -> None:
    """Wildcard bind with IP_PKTINFO: clients connected to 127.0.0.2 and 127.0.0.3 (so
    they accept replies only from there) get their bulk-path replies."""
    server = open_socket("0.0.0.0", 0)
    port = server.getsockname()[1]
    service = Service(Config(rate=0))
    peer = bytes([198, 51, 100, 7, 0x9C, 0x40])
    service.handle(b"P" * 32 + b"Q" * 32, peer, 0.0)
    bulk = CountingBulk(service)
    batch = mmsg.Batch(64, BUFSIZE, pktinfo=True)
    clients = []
    try:
        for i, dst in enumerate(["127.0.0.2", "127.0.0.3", "127.0.0.1"] * 3):
            c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            c.bind(("127.0.0.1", 0))
            c.connect((dst, port))
            c.setblocking(False)
            clients.append(c)
            for _ in range(3):
                c.send(bytes([i + 1]) * 32 + b"P" * 32)
        serve_all(batch, server.fileno(), Recorder(service), bulk, 1.0)
        assert bulk.taken >= 1 and bulk.declined == 0
        for c in clients:
            assert drain(c) == [peer] * 3
        assert service.snapshot()["found"] == 27
    finally:
        server.close()
        for c in clients:
            c.close()


def test_bad_bufsize() -> None:
    with pytest.raises(ValueError, match="bufsize must be more than 64"):
        mmsg.Batch(4, 64)


def test_one_odd_datagram_does_not_cost_the_batch_its_bulk_path() -> None:
    """A short datagram, and a pair of requests whose order matters, in batches of 64:
    the runs around them still go through the bulk path, and every reply is right."""
    server = open_socket("127.0.0.1", 0)
    addr = server.getsockname()
    config = Config(rate=0)
    service, twin = Service(config), Service(config)
    bulk = CountingBulk(service)
    batch = mmsg.Batch(64, BUFSIZE)
    c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    c.bind(("127.0.0.1", 0))
    c.setblocking(False)
    me, known = b"M" * 32, b"K" * 32
    for s in (service, twin):
        s.handle(known + me, bytes([198, 51, 100, 9, 0, 80]), 0.0)
    try:
        for odd in (b"short", me + me, b"A" * 32 + b"B" * 32):
            # 64 datagrams: 30 plain, one odd, 32 plain, and B asking for A at the end
            data = [me + known] * 30 + [odd] + [me + known] * 32 + [b"B" * 32 + b"A" * 32]
            taken = bulk.taken
            want = []
            for d in data:
                c.sendto(d, addr)
                r = twin.handle(d, packed(c), 1.0)
                if r is not None:
                    want.append(r)
            serve_all(batch, server.fileno(), Recorder(service), bulk, 1.0)
            assert drain(c) == want
            assert bulk.taken - taken >= 2, odd
        assert service.snapshot() == twin.snapshot()
        assert list(service.registry._d.items()) == list(twin.registry._d.items())
    finally:
        server.close()
        c.close()


@contextlib.contextmanager
def shaped_link(rate: str) -> Iterator[tuple[socket.socket, socket.socket]]:
    """A server socket with the kernel's smallest send buffer (~8 small datagrams) whose
    replies to the client socket go through a link shaped to RATE, so they wait in its
    queue, charged to that buffer, and fill it (see tests.nstools.shaped_pair)."""
    with shaped_pair("mm", rate) as (srv, cli):
        with srv.entered():
            server = open_socket("10.78.0.1", 0)
        server.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1)  # the minimum
        with cli.entered():
            client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            client.bind(("10.78.0.2", 0))
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        try:
            yield server, client
        finally:
            server.close()
            client.close()


needs_tc = pytest.mark.skipif(not (is_root() and have("tc")), reason="needs root and tc")


def burst(server: socket.socket, client: socket.socket, n: int) -> tuple[int, int, int]:
    """N self-lookups answered in one batch; its (received, sent, failed)."""
    for _ in range(n):
        client.sendto(random.randbytes(32) * 2, server.getsockname())
    time.sleep(0.2)  # one unshaped veth hop: all N are queued at the server by then
    service = Service(Config(rate=0))
    batch = mmsg.Batch(128, BUFSIZE)
    return batch.exchange(server.fileno(), service.handle, 1.0, ClassicBatch(service).handle)


@needs_tc
def test_a_full_send_buffer_is_waited_for() -> None:
    """100 replies into a buffer that holds ~8, behind a 2 Mbit/s link (~4,000 small
    datagrams a second): the batch waits for room a few times (well within SEND_WAIT in
    all) and every reply is sent and arrives; before, ~90 of them were dropped."""
    with shaped_link("2mbit") as (server, client):
        got = burst(server, client, 100)
        assert got == (100, 100, 0)
        client.settimeout(5)
        assert [len(client.recv(64)) for _ in range(100)] == [6] * 100  # self-lookups


@needs_tc
def test_a_send_buffer_that_stays_full_costs_a_batch_at_most_send_wait() -> None:
    """Behind a link that hardly drains (8 kbit/s: a small datagram every ~50 ms), the
    batch gives up after SEND_WAIT and counts what it could not send: it never stalls
    the requests behind it for longer (the bound checked here is generous)."""
    with shaped_link("8kbit") as (server, client):
        t0 = time.monotonic()
        received, sent, failed = burst(server, client, 100)
        spent = time.monotonic() - t0
        assert received == 100 and sent + failed == 100 and 0 < sent < 50, (sent, failed)
        assert spent < 0.2 + 5 * mmsg.SEND_WAIT + 2
