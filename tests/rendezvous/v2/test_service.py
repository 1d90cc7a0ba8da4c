"""The v2 service through the dispatcher, with real cryptography on both sides."""

from __future__ import annotations

import os
import random

import pytest

from rendezvous.service import Config, Service
from rendezvous.v2.crypto import ClientCrypto, ServerCrypto
from rendezvous.v2.keys import generate_private_key
from rendezvous.v2.service import Notification
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

WALL = 1_700_000_000 * 10**9  # the server's wall clock at now = 0
SERVER_PRIV = generate_private_key()


def v4(last: int, port: int) -> bytes:
    return bytes([198, 51, 100, last]) + port.to_bytes(2, "big")


def v6(last: int, port: int) -> bytes:
    return bytes.fromhex("20010db8000000000000000000000000")[:15] + bytes([last]) + port.to_bytes(2, "big")


class Client:
    """A v2 client as far as the server can tell: a key pair and a clock."""

    def __init__(self, server_public: bytes, private: bytes | None = None) -> None:
        self.private = private or generate_private_key()
        self.crypto = ClientCrypto(self.private, server_public)
        self.pub = self.crypto.client_public
        self.ts = WALL
        self.rid = 0

    def request(self, peer: bytes, ts: int | None = None, nat: int = 0) -> bytes:
        self.ts = self.ts + 1 if ts is None else ts
        self.rid += 1
        return self.crypto.seal_request(RequestBody(self.ts, self.rid, peer, nat))

    def open(self, datagram: bytes) -> ReplyBody | NotifyBody:
        return self.crypto.open(datagram)


class Harness:
    def __init__(self, **config) -> None:
        self.crypto = ServerCrypto(SERVER_PRIV)
        self.svc = Service(Config(**{"rate": 0, **config}), self.crypto)
        self.notes: list[Notification] = []

    def client(self) -> Client:
        return Client(self.crypto.server_public)

    def send(self, data: bytes, src: bytes, now: float = 0.0, wall: int | None = None,
             local: bytes | None = None) -> bytes | None:
        """One datagram through Service.handle; asserts that nothing it causes is longer."""
        wall = WALL + int(now * 1e9) if wall is None else wall
        reply = self.svc.handle(data, src, now, local, wall)
        notes = self.svc.drain_notifications()
        assert reply is None or len(reply) <= len(data)
        assert all(len(n.datagram) <= len(data) for n in notes)
        self.notes += notes
        return reply

    def ask(self, c: Client, peer: Client, src: bytes, now: float = 0.0, **kw) -> ReplyBody:
        data = c.request(peer.pub, **{k: kw.pop(k) for k in ("ts", "nat") if k in kw})
        reply = self.send(data, src, now, **kw)
        assert reply is not None
        body = c.open(reply)
        assert isinstance(body, ReplyBody) and body.request_id == c.rid
        assert body.observed == Endpoint.from_source(src)
        return body

    def take(self) -> list[Notification]:
        out, self.notes = self.notes, []
        return out

    @property
    def stats(self) -> dict[str, int]:
        return self.svc.snapshot()


@pytest.fixture
def h() -> Harness:
    return Harness()


def ep(src: bytes) -> Endpoint:
    return Endpoint.from_source(src)


def test_coordinated_punch(h):
    a, b = h.client(), h.client()
    r = h.ask(a, b, v4(1, 4000))
    assert r.status is Status.PENDING and r.endpoints == () and h.take() == []
    r = h.ask(b, a, v4(2, 5000), now=0.5, nat=3)
    assert r.status is Status.FOUND and r.endpoints == (ep(v4(1, 4000)),)
    notes = h.take()
    assert len(notes) == 1 and notes[0].destination == v4(1, 4000)
    n = a.open(notes[0].datagram)
    assert isinstance(n, NotifyBody)
    assert n.peer == b.pub and n.endpoints == (ep(v4(2, 5000)),) and n.peer_nat == 3
    assert n.server_time >= WALL + 500_000_000
    # neither B asking again nor A asking (it already knows) notifies anyone
    assert h.ask(b, a, v4(2, 5000), now=1.0, nat=3).status is Status.FOUND
    r = h.ask(a, b, v4(1, 4000), now=1.5)
    assert r.status is Status.FOUND and r.endpoints == (ep(v4(2, 5000)),) and r.peer_nat == 3
    assert h.take() == []
    s = h.stats
    assert (s["v2_requests"], s["v2_found"], s["v2_pending"], s["v2_notifications"]) == (4, 3, 1, 1)


def test_rebinding_notifies_again_also_when_asking_for_someone_else(h):
    a, b, c = h.client(), h.client(), h.client()
    h.ask(a, b, v4(1, 4000))
    h.ask(b, a, v4(2, 5000), now=1.0)
    assert len(h.take()) == 1
    h.ask(b, a, v4(2, 5001), now=2.0)  # B's NAT rebound to a new port
    [n] = h.take()
    assert a.open(n.datagram).endpoints == (ep(v4(2, 5001)),)
    h.ask(b, c, v4(2, 5002), now=3.0)  # rebinds again, while asking for C
    [n] = h.take()
    assert n.destination == v4(1, 4000) and a.open(n.datagram).endpoints == (ep(v4(2, 5002)),)
    h.ask(b, b, v4(2, 5002), now=4.0)  # unchanged: nothing
    assert h.take() == []


def test_notify_times_increase_within_one_clock_reading(h):
    a, b = h.client(), h.client()
    h.ask(a, b, v4(1, 4000))
    for port in (5000, 5001, 5002):
        h.ask(b, a, v4(2, port), wall=WALL)  # the same wall reading every time
    times = [a.open(n.datagram).server_time for n in h.take()]
    assert len(times) == 3 and times == sorted(set(times))


def test_both_families_ipv6_first_and_notify_to_each_with_its_local_address(h):
    a, b = h.client(), h.client()
    l4, l6 = bytes([192, 0, 2, 1]), bytes(15) + b"\x01"
    h.ask(a, b, v4(1, 4000), local=l4)
    h.ask(a, b, v6(1, 4000), local=l6)
    h.ask(b, a, v4(2, 5000))
    notes = h.take()
    assert [(n.destination, n.local) for n in notes] == [(v6(1, 4000), l6), (v4(1, 4000), l4)]
    assert notes[0].datagram == notes[1].datagram
    r = h.ask(b, a, v6(2, 5000))
    assert r.endpoints == (ep(v6(1, 4000)), ep(v4(1, 4000)))
    notes = h.take()
    assert len(notes) == 2
    assert a.open(notes[0].datagram).endpoints == (ep(v6(2, 5000)), ep(v4(2, 5000)))
    assert len(notes[0].datagram) == REQUEST_LEN  # two endpoints: exactly the request's size


def test_lookup_without_consent_is_pending_and_reveals_nothing(h):
    a, b, c = h.client(), h.client(), h.client()
    h.ask(b, c, v4(2, 5000))  # B is registered but asks for C, not A
    known = h.ask(a, b, v4(1, 4000), now=1.0)
    unknown = h.ask(a, h.client(), v4(1, 4000), now=2.0)
    assert known.status is unknown.status is Status.PENDING
    assert known.endpoints == unknown.endpoints == () and known.peer_nat == unknown.peer_nat == 0
    assert h.take() == []
    assert h.stats["v2_pending"] == 3 and h.stats["v2_found"] == 0


def test_self_lookup_is_found_with_own_endpoint(h):
    a = h.client()
    r = h.ask(a, a, v6(1, 4000))
    assert r.status is Status.FOUND and r.endpoints == (ep(v6(1, 4000)),)
    assert h.take() == []


def test_forged_registration_is_dropped_and_counted(h):
    a, b, mallory = h.client(), h.client(), h.client()
    h.ask(b, a, v4(2, 5000))
    # Mallory seals with her own private key but claims A's public key
    forged = bytearray(mallory.request(b.pub))
    forged[8:40] = a.pub
    assert h.send(bytes(forged), v4(66, 6666)) is None
    assert h.stats["v2_auth_failed"] == 1 and h.stats["v2_requests"] == 1
    assert a.pub not in h.svc.v2.registry and h.take() == []


def test_wrong_server_key_is_dropped(h):
    a, b = h.client(), h.client()
    lost = Client(ServerCrypto(generate_private_key()).server_public, a.private)
    assert h.send(lost.request(b.pub), v4(1, 4000)) is None
    assert h.stats["v2_auth_failed"] == 1 and len(h.svc.v2.registry) == 0


def test_replay_is_stale_and_registers_nothing(h):
    a, b = h.client(), h.client()
    h.ask(b, a, v4(2, 5000))
    data = a.request(b.pub)
    assert h.send(data, v4(1, 4000)) is not None
    h.take()
    reply = h.send(data, v4(66, 6666), now=1.0)  # the attacker replays from elsewhere
    assert reply is not None
    body = a.open(reply)
    assert body.status is Status.STALE and body.endpoints == ()
    assert body.server_time > a.ts
    assert h.svc.v2.registry.endpoints(a.pub, 1.0) == (v4(1, 4000),)
    assert h.take() == []  # B is not told about the replayer's address
    assert h.stats["v2_stale_replay"] == 1 and h.stats["v2_stale"] == 1
    # the client moves on to the suggested time and is accepted
    assert h.ask(a, b, v4(1, 4000), now=2.0, ts=body.server_time).status is Status.FOUND


def test_requests_reordered_across_families_both_register(h):
    """A client sends over IPv6 and then IPv4; the IPv4 one arrives first. Both count
    (they are within the reorder window), and replaying either is still refused."""
    a, b = h.client(), h.client()
    first = a.request(b.pub)   # sent first, over IPv6
    second = a.request(b.pub)  # sent 0 s later, over IPv4: arrives first
    assert a.open(h.send(second, v4(1, 4000))).status is Status.PENDING
    assert a.open(h.send(first, v6(1, 4000))).status is Status.PENDING
    assert set(h.svc.v2.registry.endpoints(a.pub, 0.0)) == {v4(1, 4000), v6(1, 4000)}
    assert h.stats["v2_stale_replay"] == 0
    for data in (first, second):
        assert a.open(h.send(data, v4(66, 6666), now=0.5)).status is Status.STALE
    assert h.stats["v2_stale_replay"] == 2
    assert set(h.svc.v2.registry.endpoints(a.pub, 0.5)) == {v4(1, 4000), v6(1, 4000)}


@pytest.mark.parametrize("offset_s", [-301, 301])
def test_timestamp_outside_the_window_is_stale(h, offset_s):
    a, b = h.client(), h.client()
    r = h.ask(a, b, v4(1, 4000), ts=WALL + offset_s * 10**9)
    assert r.status is Status.STALE and r.server_time >= WALL
    assert len(h.svc.v2.registry) == 0 and h.stats["v2_stale_skew"] == 1
    assert h.ask(a, b, v4(1, 4000), now=0.1, ts=r.server_time).status is Status.PENDING


def test_no_window_with_max_skew_zero():
    h = Harness(max_skew=0)
    a, b = h.client(), h.client()
    assert h.ask(a, b, v4(1, 4000), ts=1).status is Status.PENDING
    r = h.ask(a, b, v4(1, 4000), ts=1)
    assert r.status is Status.STALE and r.server_time == 2


def test_tampered_bytes_are_never_answered(h):
    a, b = h.client(), h.client()
    data = a.request(b.pub)
    for i in range(len(data)):
        for bit in (0x01, 0x80):
            bad = bytearray(data)
            bad[i] ^= bit
            assert h.send(bytes(bad), v4(1, 4000)) is None, i
    s = h.stats
    assert s["v2_requests"] == 0 and len(h.svc.v2.registry) == 0
    # header bytes 0-3 no longer look like v2; 4-7 fail the strict header; the rest
    # (key, nonce, ciphertext, tag) fail authentication
    assert s["dropped_length"] == 8 and s["v2_malformed"] == 8
    assert s["v2_auth_failed"] == 2 * (len(data) - 8)


def test_truncated_datagrams_are_never_answered():
    h = Harness(classic=False)
    a, b = h.client(), h.client()
    data = a.request(b.pub)
    for n in range(len(data)):
        assert h.send(data[:n], v4(1, 4000)) is None
    s = h.stats
    assert s["v2_requests"] == 0 and len(h.svc.v2.registry) == 0
    assert s["v2_malformed"] == len(data) - 65 and s["dropped_classic_off"] == 1
    assert s["dropped_length"] == 64


def test_longer_plaintext_from_a_newer_client_is_accepted(h):
    a, b = h.client(), h.client()
    body = RequestBody(WALL + 1, 7, b.pub)
    data = a.crypto.seal_request_bytes(body.to_bytes() + b"future fields")
    reply = h.send(data, v4(1, 4000))
    assert reply is not None and a.open(reply).status is Status.PENDING


def test_authentic_but_malformed_plaintext_is_dropped(h):
    a, b = h.client(), h.client()
    zero_id = RequestBody(WALL + 1, 1, b.pub).to_bytes()
    zero_id = zero_id[:8] + bytes(4) + zero_id[12:]
    for plain in (zero_id, zero_id[:47]):
        assert h.send(a.crypto.seal_request_bytes(plain), v4(1, 4000)) is None
    assert h.stats["v2_malformed"] == 2 and len(h.svc.v2.registry) == 0


def test_notifications_are_rate_limited_per_notified_key():
    h = Harness(notify_rate=1, notify_burst=2)
    a, b = h.client(), h.client()
    h.ask(a, b, v4(1, 4000))
    for i in range(5):
        h.ask(b, a, v4(2, 5000 + i), now=0.1 * i)
    assert len(h.take()) == 2 and h.stats["v2_notify_limited"] == 3
    h.ask(a, b, v4(1, 4000), now=0.5)  # A still learns B's endpoint when it asks
    h.ask(b, a, v4(2, 6000), now=3.0)  # tokens again
    [n] = h.take()
    assert a.open(n.datagram).endpoints == (ep(v4(2, 6000)),)


def test_a_limited_notification_is_retried_on_the_next_request():
    h = Harness(notify_rate=1, notify_burst=1)
    a, b = h.client(), h.client()
    h.ask(a, b, v4(1, 4000))
    h.ask(b, a, v4(2, 5000), now=0.0)
    h.ask(b, a, v4(2, 5001), now=0.1)  # limited
    assert len(h.take()) == 1
    h.ask(b, a, v4(2, 5001), now=2.0)  # same endpoint, but A was never told it
    [n] = h.take()
    assert a.open(n.datagram).endpoints == (ep(v4(2, 5001)),)


def test_require_auth_refuses_classic_and_v2_runs_alone():
    h = Harness(classic=False)
    assert h.send(b"A" * 32 + b"B" * 32, v4(1, 4000)) is None
    assert h.stats["dropped_classic_off"] == 1 and len(h.svc.registry) == 0
    a = h.client()
    assert h.ask(a, a, v4(1, 4000)).status is Status.FOUND


def test_classic_keeps_working_alongside_v2(h):
    A, B = b"A" * 32, b"B" * 32
    assert h.send(A + B, v4(1, 4000)) == b""
    a = h.client()
    h.ask(a, a, v4(3, 3000))
    assert h.send(B + A, v4(2, 5000)) == v4(1, 4000)
    s = h.stats
    assert s["requests"] == 2 and s["found"] == 1 and s["v2_requests"] == 1


def test_classic_over_ipv6_and_v2_without_key_are_dropped():
    svc = Service(Config(rate=0))
    assert svc.handle(b"A" * 64, v6(1, 4000), 0.0) is None
    data = Client(ServerCrypto(SERVER_PRIV).server_public).request(b"B" * 32)
    assert svc.handle(data, v4(1, 4000), 0.0) is None
    s = svc.snapshot()
    assert s["dropped_classic_ipv6"] == 1 and s["dropped_v2_off"] == 1
    assert not any(k.startswith("v2_") for k in s)


def test_v2_is_rate_limited_per_source_before_cryptography():
    h = Harness(rate=1, burst=2)
    a, b = h.client(), h.client()
    for i in range(3):
        h.send(a.request(b.pub), v6(1, 4000 + i))  # same /64, other ports and hosts
    h.send(header(MsgType.REQUEST) + os.urandom(108), v6(9, 1))
    s = h.stats
    assert s["v2_requests"] == 2 and s["rate_limited"] == 2 and s["v2_auth_failed"] == 0
    assert h.send(a.request(b.pub), v6(1, 4000)[:7] + b"\x01" + v6(1, 4000)[8:]) is not None


def test_wall_clock_offset_is_used_when_the_shell_passes_none(h):
    a, b = h.client(), h.client()
    h.svc.set_wall_clock(100.0, WALL)
    reply = h.svc.handle(a.request(b.pub, ts=WALL + 10**9), v4(1, 4000), 101.0)
    assert reply is not None and a.open(reply).status is Status.PENDING
    reply = h.svc.handle(a.request(b.pub, ts=WALL + 400 * 10**9), v4(1, 4000), 101.0)
    assert reply is not None and a.open(reply).status is Status.STALE


def test_bad_sources_are_dropped(h):
    a = h.client()
    # port 0, 0.0.0.0, ::, and ::ffff:0.0.0.0 (an IPv4-mapped unspecified address,
    # which would otherwise be registered and break every reply that carries it)
    mapped_unspec = bytes(10) + b"\xff\xff" + bytes(4) + (4000).to_bytes(2, "big")
    for src in (v4(1, 0), bytes(6), bytes(18), mapped_unspec):
        assert h.send(a.request(a.pub), src) is None
    assert h.stats["v2_bad_source"] == 4


def test_a_flood_of_forged_keys_leaves_no_state(h):
    a = h.client()
    h.ask(a, a, v4(1, 4000))
    for i in range(3000):
        forged = header(MsgType.REQUEST) + os.urandom(108)
        assert h.send(forged, v4(2, 1 + i)) is None
    s = h.stats
    assert s["v2_auth_failed"] == 3000 and s["v2_keys_cached"] == 1 and s["v2_peers"] == 1
    assert h.ask(a, a, v4(1, 4000), now=1.0).status is Status.FOUND


@pytest.mark.fuzz
def test_fuzz_never_raises_never_amplifies(h):
    rng = random.Random(20261201)
    a, b = h.client(), h.client()
    h.ask(b, a, v4(2, 5000))
    valid = [a.request(b.pub) for _ in range(16)]
    hdr = header(MsgType.REQUEST)
    answered = h.stats["v2_requests"]
    for i in range(100_000):
        kind = i % 4
        if kind == 0:  # a valid header, random rest of random length
            data = hdr + rng.randbytes(rng.randrange(57, 300))
        elif kind == 1:  # a valid request, a few bytes mutated, maybe cut or extended
            d = bytearray(rng.choice(valid))
            for _ in range(rng.randrange(1, 4)):
                d[rng.randrange(len(d))] ^= 1 << rng.randrange(8)
            if rng.random() < 0.3:
                d = d[:rng.randrange(65, len(d) + 1)] + rng.randbytes(rng.randrange(3))
            data = bytes(d)
        elif kind == 2:  # authentic, random plaintext (also short ones)
            data = a.crypto.seal_request_bytes(rng.randbytes(rng.randrange(0, 80)))
        else:  # random header variants of the v2 prefix
            data = b"wgp\x02" + rng.randbytes(rng.randrange(61, 200))
        src = v4(rng.randrange(1, 255), rng.randrange(1, 65536)) if rng.random() < 0.5 \
            else v6(rng.randrange(256), rng.randrange(1, 65536))
        reply = h.send(data, src, now=i * 1e-4)
        answered += reply is not None
    h.take()
    s = h.stats
    assert s["v2_requests"] == answered and answered > 1000  # some plaintexts do parse
    assert s["v2_auth_failed"] > 25_000 and s["v2_malformed"] > 10_000  # every path is hit


def test_probe_replies_pending_with_observed_and_changes_nothing(h):
    a, b = h.client(), h.client()
    h.ask(b, a, v4(2, 5000))  # B waits for A
    probe = a.request(a.pub, nat=0x12)
    reply = h.svc.probe(probe, v4(1, 7777), 0.1, None, WALL)
    assert reply is not None and len(reply) <= len(probe)
    body = a.open(reply)
    assert isinstance(body, ReplyBody) and body.request_id == a.rid
    assert body.status is Status.PENDING and body.observed == ep(v4(1, 7777))
    assert body.endpoints == ()
    # Nothing was registered or remembered: B is not notified, A is unknown, and A's
    # next request may reuse an older timestamp than the probe's.
    assert h.svc.drain_notifications() == [] and h.svc.v2.registry.nat(a.pub) == 0
    assert h.svc.probe(probe, v4(1, 7777), 0.2, None, WALL) is not None  # a replay: same
    r = h.ask(a, b, v4(1, 4000), now=0.3, ts=WALL - 5)
    assert r.status is Status.FOUND and r.endpoints == (ep(v4(2, 5000)),)
    assert h.stats["probes"] == 2


def test_probe_refuses_others_questions_and_forgeries(h):
    a, b = h.client(), h.client()
    assert h.svc.probe(a.request(b.pub), v4(1, 1), 0.0, None, WALL) is None
    forged = bytearray(a.request(a.pub))
    forged[70] ^= 1
    assert h.svc.probe(bytes(forged), v4(1, 1), 0.0, None, WALL) is None
    s = h.stats
    assert s["probe_refused"] == 2 and s["v2_auth_failed"] == 1 and s["probes"] == 0


def test_new_keys_beyond_the_budget_are_dropped_before_any_x25519_and_known_ones_served():
    """--new-key-rate 1 --new-key-burst 2: two new clients at once are opened, a third
    (and a forgery under a random key) is dropped and counted without a derivation,
    while the two known clients are still answered; a second later one more new key
    fits."""
    h = Harness(new_key_rate=1.0, new_key_burst=2.0)
    a, b, c = h.client(), h.client(), h.client()
    assert h.ask(a, b, v4(1, 4000)).status is Status.PENDING
    assert h.ask(b, a, v4(2, 5000)).status is Status.FOUND
    misses = h.crypto.cache_misses
    assert h.send(c.request(a.pub), v4(3, 6000)) is None
    forged = header(MsgType.REQUEST) + os.urandom(REQUEST_LEN - 8)
    assert h.send(forged, v4(4, 7000)) is None
    assert h.crypto.cache_misses == misses  # neither cost an X25519
    assert (h.stats["v2_new_key_limited"], h.stats["v2_auth_failed"]) == (2, 0)
    for _ in range(3):  # the known clients are not charged
        assert h.ask(a, b, v4(1, 4000)).status is Status.FOUND
    # answered (pending: a never asked for c)
    assert h.ask(c, a, v4(3, 6000), now=1.0).status is Status.PENDING
    assert h.stats["v2_new_key_limited"] == 2


def test_the_new_key_budget_can_be_turned_off():
    h = Harness(new_key_rate=0.0, new_key_burst=0.0)
    clients = [h.client() for _ in range(20)]
    for i, cl in enumerate(clients):
        assert h.ask(cl, clients[0], v4(i + 1, 4000)) is not None
    assert h.stats["v2_new_key_limited"] == 0
