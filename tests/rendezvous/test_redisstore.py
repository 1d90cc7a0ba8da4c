"""The store's I/O against a real redis-server: pipelines, fire-and-forget, pub/sub, and
outages (stopped, restarted, paused) that never raise and recover by themselves."""

from __future__ import annotations

import logging
import time

from rendezvous.redisstore import RedisStore
from rendezvous.store import parse_store_url
from tests.rendezvous.redislib import RedisServer, redis  # noqa: F401 (fixture)


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def store(r: RedisServer, sid: str = "s1", clock=None, **kw) -> RedisStore:
    s = RedisStore(parse_store_url(r.url), sid, clock=clock or time.monotonic, **kw)
    assert s.connect()
    return s


def test_pipeline_replies_in_order(redis):
    s = store(redis)
    got = s.execute([["SET", b"k\x00", b"v", "PX", 5000], ["GET", b"k\x00"], ["GET", "none"],
                     ["INCR", "k\x00"], ["PTTL", b"k\x00"]])
    assert got[:3] == ["OK", b"v", None]
    assert str(got[3]).startswith("ERR")  # an error reply is a value, not an exception
    assert 0 < got[4] <= 5000
    assert s.up and s.stats.roundtrips == 1


def test_send_does_not_wait_and_its_replies_are_dropped(redis):
    s = store(redis)
    assert s.send([["SET", "a", "1"], ["SET", "b", "2"]])
    assert s.execute([["MGET", "a", "b"]]) == [[b"1", b"2"]]  # not the SETs' "OK"s
    for _ in range(5000):  # more than the unread bound: drained on the way
        s.send([["INCR", "n"]])
    assert s.execute([["GET", "n"]]) == [b"5000"]


def test_publish_reaches_the_named_server_only(redis):
    a, b, c = store(redis, "a"), store(redis, "b"), store(redis, "c")
    assert a.fileno() is not None
    c.publish("a", b"for a")
    c.publish("b", b"for b")
    c.execute([["PING"]])  # the publishes have been processed
    deadline = time.monotonic() + 2
    got_a: list[bytes] = []
    while not got_a and time.monotonic() < deadline:
        got_a = a.notices()
    assert got_a == [b"for a"]
    time.sleep(0.05)
    assert b.notices() == [b"for b"] and c.notices() == []


def test_outage_returns_none_at_once_logs_once_and_recovers(redis, caplog):
    clock = Clock()
    s = store(redis, clock=clock, retry=1.0, retry_max=4.0)
    caplog.set_level(logging.DEBUG, logger="rendezvous.redisstore")
    redis.stop()
    assert s.execute([["PING"]]) is None and not s.up
    t0 = time.monotonic()
    for _ in range(100):  # during the outage: no connect attempts until the retry is due
        assert s.execute([["PING"]]) is None
    assert time.monotonic() - t0 < 0.5 and s.stats.skipped == 100
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "unavailable" in warnings[0].getMessage()
    assert "answering from this server's own tables" in warnings[0].getMessage()
    clock.t += 1.0
    assert s.execute([["PING"]]) is None  # retried, still down: backoff doubles
    clock.t += 1.5
    assert s.execute([["PING"]]) is None and s.stats.skipped == 101
    redis.start()
    clock.t += 1.0
    assert s.execute([["PING"]]) == ["PONG"] and s.up
    assert any("is back after" in r.getMessage() for r in caplog.records)
    assert s.stats.outages == 1
    # the subscription comes back too, through tick()
    assert s.fileno() is None or s.notices() == []
    clock.t += 10
    s.tick(clock.t)
    assert s.fileno() is not None
    other = store(redis, "other")
    other.publish("s1", b"after")
    other.execute([["PING"]])
    deadline = time.monotonic() + 2
    got: list[bytes] = []
    while not got and time.monotonic() < deadline:
        got = s.notices()
    assert got == [b"after"]


def test_a_paused_redis_times_out_within_the_deadline(redis):
    s = store(redis, timeout=0.2)
    redis.pause()
    try:
        t0 = time.monotonic()
        assert s.execute([["PING"]]) is None
        assert time.monotonic() - t0 < 1.0 and not s.up
    finally:
        redis.resume()


def test_no_redis_at_start_is_not_fatal(tmp_path):
    r = RedisServer(tmp_path)  # never started: nothing listens on its port
    s = RedisStore(parse_store_url(r.url), "s1")
    assert not s.connect() and s.execute([["PING"]]) is None and s.fileno() is None
