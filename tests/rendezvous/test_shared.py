"""Services sharing one real Redis (--store): what one learns, the others answer;
notifications go to the server that holds the client's mapping; an outage falls back to
each server's own tables and recovers."""

from __future__ import annotations

import random
import time

import pytest

from rendezvous.batch import ClassicBatch
from rendezvous.redisstore import RedisStore
from rendezvous.service import Config, Service
from rendezvous.sharedbatch import SharedBatch
from rendezvous.store import parse_store_url
from rendezvous.v2.crypto import ServerCrypto
from rendezvous.v2.keys import generate_private_key
from rendezvous.v2.wire import Endpoint, NotifyBody, Status
from tests.rendezvous.redislib import redis  # noqa: F401 (fixture)
from tests.rendezvous.v2.test_service import WALL, Client, v4

SERVER_PRIV = generate_private_key()
A, B, C = b"A" * 32, b"B" * 32, b"C" * 32
SA, SB = bytes([198, 51, 100, 1, 0, 1]), bytes([203, 0, 113, 2, 0, 2])


def service(redis, sid: str, crypto: bool = False, **config) -> Service:
    store = RedisStore(parse_store_url(redis.url), sid, retry=0.0)
    assert store.connect()
    return Service(Config(**{"rate": 0, **config}),
                   ServerCrypto(SERVER_PRIV) if crypto else None, store)


def test_classic_registered_through_one_is_found_through_the_other(redis):
    s1, s2 = service(redis, "s1"), service(redis, "s2")
    assert s1.handle(A + B, SA, 0.0) == b""  # B unknown anywhere
    assert s2.handle(B + A, SB, 0.0) == SA  # A registered through s1
    assert s1.handle(A + B, SA, 0.1) == SB
    assert s2.counters.found == 1 and s1.counters.found == 1
    # the store has the ttl: the key goes away everywhere when not refreshed
    assert 0 < int(redis.command("PTTL", "wgpunch:c:" + "A" * 32).strip(b":\r\n")) <= 180000


def test_the_script_is_loaded_again_when_redis_forgot_it(redis):
    s1, s2 = service(redis, "s1"), service(redis, "s2")
    s1.handle(A + A, SA, 0.0)
    assert redis.command("SCRIPT", "FLUSH") == b"+OK\r\n"
    assert s2.handle(B + A, SB, 0.1) == SA  # only the store knows A here
    assert s2.counters.store_errors == 0 and s2.counters.store_unavailable == 0


def test_the_newest_registration_wins_whichever_server_took_it(redis):
    s1, s2 = service(redis, "s1"), service(redis, "s2")
    s1.handle(A + A, SA, 0.0)
    s2.handle(A + A, SB, 0.0)  # A moved (its NAT rebound, or DNS sent it elsewhere)
    assert s1.handle(B + A, SB, 0.1) == SB  # not s1's own, older entry


def test_outage_answers_from_the_own_table_and_recovers(redis):
    s1, s2 = service(redis, "s1"), service(redis, "s2")
    s1.handle(A + A, SA, 0.0)
    s2.handle(B + B, SB, 0.0)
    redis.stop()
    assert s2.handle(C + A, SB, 1.0) == b""  # only s1 has seen A, and Redis is down
    assert s2.handle(C + B, SB, 1.0) == SB  # s2's own table still answers
    assert s2.counters.store_unavailable == 2
    redis.start()  # empty: no persistence
    assert s2.handle(C + B, SB, 2.0) == SB  # the store has nothing: the own table
    s1.handle(A + A, SA, 3.0)  # A refreshes through s1
    assert s2.handle(C + A, SB, 3.0) == SA
    assert s2.store.stats.outages == 1 and s2.store.up


def test_shared_batch_answers_like_one_by_one_and_from_the_store(redis):
    s1, s2 = service(redis, "s1"), service(redis, "s2")
    rnd = random.Random(3)
    keys = [bytes([i]) * 32 for i in range(1, 41)]
    srcs = {k: bytes([10, 0, i // 256, i % 256, 0x1F, i % 256]) for i, k in enumerate(keys)}
    for k in keys[:20]:  # registered through s1 only
        s1.handle(k + k, srcs[k], 0.0)
    mine = keys[20:]
    theirs = [rnd.choice(keys[:20] + [b"\x99" * 32]) for _ in mine]
    reqs = b"".join(m + t for m, t in zip(mine, theirs))
    sources = b"".join(srcs[m] for m in mine)
    res = SharedBatch(s2).handle(reqs, sources, 1.0)
    assert res is not None
    want = [srcs.get(t, b"") for t in theirs]
    assert res.replies() == want  # all from the store: s2's own table knew none of them
    assert s2.counters.found == sum(map(bool, want))
    assert s2.counters.not_found == len(want) - s2.counters.found
    # s2's own table is exactly what ClassicBatch alone leaves (ready for an outage)
    ref = Service(Config(rate=0))
    ClassicBatch(ref).handle(reqs, sources, 1.0)
    assert list(s2.registry._d.items()) == list(ref.registry._d.items())
    # and s1 now finds the batch's registrations
    assert s1.handle(keys[0] + mine[-1], srcs[keys[0]], 1.5) == srcs[mine[-1]]


def test_shared_batch_declines_like_classic_batch(redis):
    s = service(redis, "s1")
    reqs = A + B + B + A  # A asks for B while B registers: order matters
    assert SharedBatch(s).handle(reqs, SA + SB, 0.0) is None
    assert len(s.registry) == 0 and redis.command("DBSIZE") == b":0\r\n"
    with pytest.raises(ValueError):
        SharedBatch(Service(Config()))


class V2:
    def __init__(self, redis, sid: str) -> None:
        self.svc = service(redis, sid, crypto=True)
        self.sid = sid
        self.crypto = self.svc.v2.crypto
        self.svc.set_wall_clock(0.0, WALL)

    def ask(self, who: Client, peer: Client, src: bytes, now: float):
        reply = self.svc.handle(who.request(peer.pub), src, now, wall_ns=WALL + int(now * 1e9))
        return who.open(reply), self.svc.drain_notifications()


def test_v2_consent_and_a_coordinated_punch_across_servers(redis):
    s1, s2 = V2(redis, "s1"), V2(redis, "s2")
    pub = s1.crypto.server_public
    a, b = Client(pub), Client(pub)
    sa, sb = v4(1, 1000), v4(2, 2000)
    r, notes = s1.ask(a, b, sa, 0.0)
    assert r.status is Status.PENDING and notes == []
    r, notes = s2.ask(b, a, sb, 0.1)  # B at the other server: it learns A (mutual)
    assert r.status is Status.FOUND and r.endpoints == (Endpoint.from_source(sa),)
    # ... and A, whose NAT mapping is toward s1, is notified by s1 (through the store)
    assert len(notes) == 1 and notes[0].server == "s1" and notes[0].destination == sa
    n = a.open(notes[0].datagram)
    assert isinstance(n, NotifyBody) and n.peer == b.pub and n.endpoints == (Endpoint.from_source(sb),)
    assert s2.svc.v2.counters["notify_remote"] == 1
    # told state is shared: B refreshing at s2 with the same endpoint notifies nobody
    time.sleep(0.05)  # the fire-and-forget "told" writes have landed
    r, notes = s2.ask(b, a, sb, 0.2)
    assert r.status is Status.FOUND and notes == []
    # A refreshes at s1 and learns B; B (mapped toward s2) was told A already: no notify
    r, notes = s1.ask(a, b, sa, 0.3)
    assert r.status is Status.FOUND and r.endpoints == (Endpoint.from_source(sb),)
    assert notes == []
    # B rebinds: A is notified, and the notification goes out from s1
    sb2 = v4(2, 2001)
    r, notes = s2.ask(b, a, sb2, 0.4)
    assert [(x.server, x.destination) for x in notes] == [("s1", sa)]


def test_v2_no_consent_leaks_across_servers(redis):
    s1, s2 = V2(redis, "s1"), V2(redis, "s2")
    pub = s1.crypto.server_public
    a, b, c = Client(pub), Client(pub), Client(pub)
    s1.ask(a, b, v4(1, 1), 0.0)  # A asks for B, never for C
    r, notes = s2.ask(c, a, v4(3, 3), 0.1)
    assert r.status is Status.PENDING and r.endpoints == () and notes == []


def test_v2_outage_falls_back_to_the_own_registry(redis):
    s1, s2 = V2(redis, "s1"), V2(redis, "s2")
    pub = s1.crypto.server_public
    a, b = Client(pub), Client(pub)
    s1.ask(a, b, v4(1, 1), 0.0)
    redis.stop()
    r, _ = s2.ask(b, a, v4(2, 2), 0.1)
    assert r.status is Status.PENDING  # s2 has never seen A
    r, notes = s1.ask(a, b, v4(1, 1), 0.2)
    assert r.status is Status.PENDING and s1.svc.v2.counters["store_unavailable"] == 1
    redis.start()
    s2.ask(b, a, v4(2, 2), 1.0)   # both refresh through their servers
    r, _ = s1.ask(a, b, v4(1, 1), 1.1)
    assert r.status is Status.FOUND and r.endpoints == (Endpoint.from_source(v4(2, 2)),)


def test_a_pair_gets_one_relay_even_through_two_servers(redis):
    from rendezvous.relay import RelayConfig
    from rendezvous.v2.wire import FLAG_RELAY, RelayBody, RequestBody

    def relay_service(sid: str, addr: int) -> Service:
        store = RedisStore(parse_store_url(redis.url), sid, retry=0.0)
        assert store.connect()
        svc = Service(Config(rate=0, relay=RelayConfig(ports=(49919,)),
                             relay_addresses=(bytes([198, 51, 100, addr]),)),
                      ServerCrypto(SERVER_PRIV), store)
        svc.set_wall_clock(0.0, WALL)
        return svc

    s1, s2 = relay_service("s1", 201), relay_service("s2", 202)
    pub = s1.v2.crypto.server_public
    a, b = Client(pub), Client(pub)
    sa, sb = v4(1, 1000), v4(2, 2000)

    def ask(svc, who, peer, src, now, flags=0):
        who.ts += 1
        who.rid += 1
        data = who.crypto.seal_request(RequestBody(who.ts, who.rid, peer.pub, flags=flags))
        svc.handle(data, src, now, wall_ns=WALL + int(now * 1e9))
        return [(n, who.open(n.datagram) if n.destination == src else None)
                for n in svc.drain_notifications()]

    ask(s1, a, b, sa, 0.0)
    ask(s2, b, a, sb, 0.1)  # mutual now
    out = ask(s1, a, b, sa, 0.2, FLAG_RELAY)  # s1 allocates: A's offer and B's (via s2)
    offers = [body for _, body in out if isinstance(body, RelayBody)]
    assert len(offers) == 1 and offers[0].relay == Endpoint("198.51.100.201", 49919)
    assert [n.server for n, body in out if body is None] == ["s2"]  # B's copy goes to s2
    time.sleep(0.05)  # the claim (sent without waiting) has landed
    out = ask(s2, b, a, sb, 0.3, FLAG_RELAY)  # B asks s2: the same relay, not a new one
    offers = [body for _, body in out if isinstance(body, RelayBody)]
    assert len(offers) == 1 and offers[0].relay == Endpoint("198.51.100.201", 49919)
    assert s2.v2.counters["relay_remote"] == 1 and len(s2.v2.relay.table) == 0


def test_the_store_window_decides_exactly_as_the_local_one(redis):
    """The Lua replay window (strings of digits) against rendezvous/v2/replay.py (ints),
    on random streams with reordering, duplicates and old replays."""
    from rendezvous.store import V2_SCRIPT, Keys, script_load, window_args
    from rendezvous.v2.replay import EMPTY, RECENT_MAX, REORDER_WINDOW_NS, accepts, record

    store = RedisStore(parse_store_url(redis.url), "w")
    assert store.connect()
    assert store.execute([script_load(V2_SCRIPT)])[0]
    from rendezvous.store import V2_SHA
    k = Keys()
    rnd = random.Random(11)
    for stream in range(20):
        key = bytes([stream]) * 32
        window, t, seen = EMPTY, WALL + rnd.randrange(10**9), []
        for _ in range(60):
            r = rnd.random()
            if r < 0.5:
                t += rnd.randrange(1, 3 * 10**8)
                ts = t
            elif r < 0.75:
                ts = t - rnd.randrange(0, 2 * REORDER_WINDOW_NS)  # reordered, or too old
            else:
                ts = rnd.choice(seen) if seen else t  # a replay
            want = accepts(window, ts)
            (got,) = store.execute([[b"EVALSHA", V2_SHA, 3, k.window(key), k.reg(key, 4),
                                     k.ask(key, key), *window_args(ts, REORDER_WINDOW_NS),
                                     60000, RECENT_MAX, b"reg", 60000]])
            assert got == int(want), (stream, ts, window)
            if want:
                window = record(window, ts)
                seen.append(ts)


def test_a_request_replayed_to_another_server_is_refused(redis):
    s1, s2 = V2(redis, "s1"), V2(redis, "s2")
    pub = s1.crypto.server_public
    a, b = Client(pub), Client(pub)
    sa, attacker = v4(1, 1000), v4(66, 6666)
    data = a.request(b.pub)
    assert a.open(s1.svc.handle(data, sa, 0.0, wall_ns=WALL)).status is Status.PENDING
    # captured on the path, sent to the other server of the set from the attacker's address
    r = a.open(s2.svc.handle(data, attacker, 0.1, wall_ns=WALL + 10**8))
    assert r.status is Status.STALE
    assert s2.svc.v2.counters["stale_replay_shared"] == 1
    assert a.pub not in s2.svc.v2.registry  # nothing of the replay was kept
    # B, through s2, still learns A's real endpoint
    r, notes = s2.ask(b, a, v4(2, 2000), 0.2)
    assert r.status is Status.FOUND and r.endpoints == (Endpoint.from_source(sa),)
    # and A's next request (a new timestamp) is welcome at either server
    r, _ = s2.ask(a, b, sa, 0.3)
    assert r.status is Status.FOUND
