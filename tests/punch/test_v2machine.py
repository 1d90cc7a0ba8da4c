"""The v2 punch state machine, driven with a fake clock, a seeded random source and
opened message bodies (the codec is rendezvous.v2.wire; no cryptography here)."""

from __future__ import annotations

import dataclasses
import random

import pytest

from punch.machine import Keepalive
from punch.policy import DeviceView, PeerView, Status, Timing
from punch.v2machine import Apply, PunchV2, Send, Spray, SprayConfig
from rendezvous.v2.wire import Endpoint, NotifyBody, ReplyBody
from rendezvous.v2.wire import Status as S

ME = b"M" * 32
P1, P2, P3 = b"1" * 32, b"2" * 32, b"3" * 32
A4 = Endpoint("198.51.100.7", 40001)
A4B = Endpoint("198.51.100.7", 40999)
A6 = Endpoint("2001:db8:1::7", 40001)
A6B = Endpoint("2001:db8:1::7", 40002)
B4 = Endpoint("203.0.113.9", 51820)
ME4 = Endpoint("192.0.2.1", 51820)
ME6 = Endpoint("2001:db8:9::1", 51820)
T = Timing(request_timeout=1.0, poll=1.0, first_poll=0.25, backoff_max=8.0, interval=20.0,
           keepalive=25, dead_margin=5.0, v6_fallback=4.0, family_gap=0.0)
WALL = 1_700_000_000_000_000_000  # ns


def dev(*peers: PeerView) -> DeviceView:
    return DeviceView(ME, peers)


def machine(*peers: PeerView, families=(4,), seed: int = 1, **kw) -> PunchV2:
    m = PunchV2(T, families=families, randbits=random.Random(seed).getrandbits, **kw)
    m.update_device(0.0, dev(*(peers or (PeerView(P1),))))
    return m


def sends(actions) -> list[Send]:
    assert all(isinstance(a, Send) for a in actions), actions
    return list(actions)


def only_send(actions) -> Send:
    [s] = sends(actions)
    return s


def found(s: Send, *endpoints: Endpoint, observed: Endpoint | None = None,
          server_time: int = WALL) -> ReplyBody:
    if observed is None:
        observed = ME6 if s.family == 6 else ME4
    return ReplyBody(s.body.request_id, S.FOUND, server_time, observed, endpoints)


def pending(s: Send) -> ReplyBody:
    return ReplyBody(s.body.request_id, S.PENDING, WALL, ME6 if s.family == 6 else ME4)


def stale(s: Send, server_time: int) -> ReplyBody:
    return ReplyBody(s.body.request_id, S.STALE, server_time, ME6 if s.family == 6 else ME4)


# -- requests and matching ------------------------------------------------------------

def test_request_ids_come_from_the_injected_random_source():
    m = machine(PeerView(P1), PeerView(P2), PeerView(P3))
    out = sends(m.poll(0.0, WALL))
    rng = random.Random(1)
    want = [rng.getrandbits(32) for _ in range(3)]
    assert [s.body.request_id for s in out] == want and 0 not in want
    assert {s.peer for s in out} == {P1, P2, P3}
    assert all(s.body.peer == s.peer and s.family == 4 for s in out)


def test_a_zero_random_id_is_never_used():
    values = iter([0, 0, 7])
    m = PunchV2(T, families=(4,), randbits=lambda _bits: next(values))
    m.update_device(0.0, dev(PeerView(P1)))
    assert only_send(m.poll(0.0, WALL)).body.request_id == 7


def test_many_in_flight_each_reply_matched_by_id_in_any_order():
    m = machine(PeerView(P1), PeerView(P2), PeerView(P3))
    out = {s.peer: s for s in sends(m.poll(0.0, WALL))}
    assert m.inflight() == 3
    # Replies come back in reverse order, each with its own peer's endpoint.
    eps = {P1: A4, P2: B4, P3: A4B}
    for key in (P3, P1, P2):
        [a] = m.on_reply(0.1, found(out[key], eps[key]), 4)
        assert isinstance(a, Apply) and a.peer == key and a.endpoint == eps[key]
    assert m.done() and m.inflight() == 0 and m.counters.replies == 3
    assert m.next_wakeup() == float("inf")


def test_every_family_is_asked_with_its_own_id():
    m = machine(families=(4, 6))
    out = sends(m.poll(0.0, WALL))
    assert sorted(s.family for s in out) == [4, 6]
    assert out[0].body.request_id != out[1].body.request_id
    assert out[0].body.timestamp < out[1].body.timestamp


def test_in_flight_requests_are_capped():
    peers = [PeerView(bytes([i]) * 32) for i in range(10)]
    m = PunchV2(Timing(max_inflight=4), families=(4,), randbits=random.Random(2).getrandbits)
    m.update_device(0.0, dev(*peers))
    first = sends(m.poll(0.0, WALL))
    assert len(first) == 4 and m.poll(0.0, WALL) == []
    m.on_reply(0.1, found(first[0], A4), 4)
    assert len(sends(m.poll(0.1, WALL))) == 1


def test_unknown_and_late_ids_are_counted_and_ignored():
    m = machine()
    s = only_send(m.poll(0.0, WALL))
    bogus = ReplyBody((s.body.request_id + 1) & 0xFFFFFFFF or 1, S.FOUND, WALL, ME4, (A4,))
    assert m.on_reply(0.1, bogus, 4) == []
    assert m.counters.unknown == 1 and not m.done()
    # the right id over the wrong family is not a match either
    assert m.on_reply(0.1, found(s, A4), 6) == [] and m.counters.unknown == 2
    s2 = only_send(m.poll(1.0, WALL))  # s timed out: asked again at once, with a new id
    assert s2.body.request_id != s.body.request_id and m.counters.lost == 1
    assert m.on_reply(1.1, found(s, A4), 4) == []  # the answer to s comes late
    assert m.counters.late == 1 and not m.done()
    [a] = m.on_reply(1.2, found(s2, A4), 4)
    assert a.endpoint == A4 and m.done()


def test_a_reply_after_the_deadline_but_before_poll_is_late():
    m = machine()
    s = only_send(m.poll(0.0, WALL))
    assert m.on_reply(1.01, found(s, A4), 4) == []
    assert m.counters.late == 1 and m.counters.lost == 1
    assert only_send(m.poll(1.01, WALL)).body.request_id != s.body.request_id


def test_lost_requests_back_off_per_family():
    m = machine(families=(4, 6), daemon=True)
    times: dict[int, list[float]] = {4: [], 6: []}
    now = 0.0
    while len(times[4]) < 6:
        for s in sends(m.poll(now, WALL)):
            times[s.family].append(now)
            if s.family == 6:  # IPv6 works: found at once
                m.on_reply(now, found(s, A4), 6)
        now = m.next_wakeup()
    assert times[6][:2] == [0.0, 10.0]  # IPv6 re-asked every interval / 2
    assert [b - a for a, b in zip(times[4], times[4][1:])] == [1.0, 2.0, 3.0, 5.0, 9.0]


def test_pending_is_asked_again_soon_at_first():
    m = machine()
    asked, now = [], 0.0
    for _ in range(5):
        s = only_send(m.poll(now, WALL))
        asked.append(now)
        assert m.on_reply(now, pending(s), 4) == []
        now = m.next_wakeup()
    assert [round(b - a, 3) for a, b in zip(asked, asked[1:])] == [0.25, 0.5, 1.0, 1.0]
    assert m.peers[P1].status is Status.NOT_FOUND and m.replied and not m.done()


# -- timestamps -------------------------------------------------------------------------

def test_timestamps_strictly_increase_even_when_the_wall_clock_steps_back():
    m = machine(PeerView(P1), PeerView(P2), families=(4, 6))
    out = sends(m.poll(0.0, WALL))
    assert [s.body.timestamp for s in out] == [WALL, WALL + 1, WALL + 2, WALL + 3]
    for s in out:
        m.on_reply(0.1, pending(s), s.family)
    later = sends(m.poll(0.35, WALL - 10**9))  # the wall clock was set back a second
    assert min(s.body.timestamp for s in later) == WALL + 4


def test_stale_moves_the_offset_and_asks_again_with_a_newer_timestamp():
    m = machine()
    s = only_send(m.poll(0.0, WALL))
    server_floor = WALL + 30 * 10**9  # our clock is 30 s behind the server
    assert m.on_reply(0.05, stale(s, server_floor), 4) == []
    assert m.counters.stale == 1 and m.offset == 30 * 10**9 and not m.done()
    assert m.next_wakeup() == 0.05
    again = only_send(m.poll(0.05, WALL + 5 * 10**7))
    assert again.body.timestamp >= server_floor
    assert again.body.timestamp == WALL + 5 * 10**7 + 30 * 10**9
    assert again.body.request_id != s.body.request_id
    [a] = m.on_reply(0.1, found(again, A4), 4)
    assert a.endpoint == A4
    assert m.next_wakeup() == float("inf")  # one-shot: nothing more to ask


def test_stale_from_a_server_behind_us_moves_the_clock_back():
    m = machine()
    s = only_send(m.poll(0.0, WALL))
    floor = WALL - 600 * 10**9  # our clock is 10 minutes ahead of the server's window
    m.on_reply(0.05, stale(s, floor), 4)
    again = only_send(m.poll(0.05, WALL))
    assert again.body.timestamp == floor


def test_stale_again_and_again_backs_off():
    m = machine()
    now, asked = 0.0, []
    for _ in range(6):
        s = only_send(m.poll(now, WALL))
        asked.append(now)
        m.on_reply(now, stale(s, s.body.timestamp), 4)  # never accepted
        now = m.next_wakeup()
    assert [b - a for a, b in zip(asked, asked[1:])] == [0.0, 0.0, 0.0, 1.0, 2.0]


def test_ipv6_goes_first_and_a_reordered_request_gets_stale_and_is_retried():
    """Requests go out IPv6 first; here the IPv4 one (sent second) got there first, so
    the IPv6 one is stale, and only it is asked again, with a newer timestamp."""
    m = machine(families=(4, 6))
    s6, s4 = sends(m.poll(0.0, WALL))
    assert (s6.family, s4.family) == (6, 4) and s6.body.timestamp < s4.body.timestamp
    assert m.on_reply(0.01, pending(s4), 4) == []
    m.on_reply(0.02, stale(s6, s4.body.timestamp + 1), 6)
    again = only_send(m.poll(0.02, WALL))
    assert again.family == 6 and again.body.timestamp > s4.body.timestamp


# -- notify -------------------------------------------------------------------------------

def test_notify_is_applied_at_once_and_an_older_one_is_refused():
    m = machine()
    s = only_send(m.poll(0.0, WALL))
    m.on_reply(0.05, pending(s), 4)  # the peer has not asked for us yet
    [a] = m.on_notify(0.3, NotifyBody(WALL + 100, P1, (A4,)), 4)
    assert isinstance(a, Apply) and a.endpoint == A4 and a.reason == "no endpoint"
    assert m.done() and m.counters.notifies == 1
    assert m.next_wakeup() == float("inf")  # one-shot: nothing more to ask
    # the same notify again (a replay, or the copy sent to our other address)
    assert m.on_notify(0.31, NotifyBody(WALL + 100, P1, (A4,)), 6) == []
    # an older one with a different endpoint
    assert m.on_notify(0.32, NotifyBody(WALL + 50, P1, (A4B,)), 4) == []
    assert m.counters.old_notifies == 2 and m.peers[P1].applied == A4
    # a newer one that moves the peer is applied
    m.update_device(1.0, dev(PeerView(P1, (A4.ip, A4.port), handshake_age=0.5, rx_bytes=9)))
    [b] = m.on_notify(1.1, NotifyBody(WALL + 200, P1, (A4B,)), 4)
    assert b.endpoint == A4B and b.reason == "peer moved from 198.51.100.7:40001"


def test_notify_about_a_stranger_is_counted_and_ignored():
    m = machine()
    assert m.on_notify(0.1, NotifyBody(WALL, P2, (A4,)), 4) == []
    assert m.counters.unwanted == 1 and not m.done()


def test_notify_keeps_a_working_endpoint_and_turns_keepalive_on():
    m = machine(PeerView(P1, (A4.ip, A4.port), handshake_age=2.0, rx_bytes=5))
    assert m.on_notify(0.1, NotifyBody(WALL, P1, (A4,)), 4) == [Keepalive(P1, 25)]
    assert m.peers[P1].status is Status.KEPT


# -- families ----------------------------------------------------------------------------

def test_ipv6_is_preferred_when_both_sides_have_it():
    m = machine(families=(4, 6))
    s6 = next(s for s in sends(m.poll(0.0, WALL)) if s.family == 6)
    [a] = m.on_reply(0.1, found(s6, A6, A4), 6)
    assert a.endpoint == A6 and m.observed[6] == ME6


def test_ipv4_when_we_have_no_ipv6():
    m = machine(families=(4,))
    s = only_send(m.poll(0.0, WALL))
    [a] = m.on_reply(0.1, found(s, A6, A4), 4)  # the peer has both; we only IPv4
    assert a.endpoint == A4


def test_an_ipv4_answer_waits_for_the_ipv6_one_in_flight():
    """Until we know we have IPv6, a found over IPv4 waits (briefly) for the IPv6
    answer, instead of applying IPv4 and flipping to IPv6 a moment later."""
    m = machine(families=(4, 6))
    s4, s6 = sorted(sends(m.poll(0.0, WALL)), key=lambda s: s.family)
    assert m.on_reply(0.05, found(s4, A6, A4), 4) == []
    assert m.next_wakeup() == pytest.approx(0.55)  # v6_grace
    [a] = m.on_reply(0.06, found(s6, A6, A4), 6)
    assert a.endpoint == A6 and a.reason == "no endpoint" and m.counters.applied == 1
    assert m.next_wakeup() > 0.55


def test_a_pending_ipv6_answer_ends_the_wait_with_ipv6():
    m = machine(families=(4, 6))
    s4, s6 = sorted(sends(m.poll(0.0, WALL)), key=lambda s: s.family)
    m.on_reply(0.05, found(s4, A6, A4), 4)
    [a] = m.on_reply(0.06, pending(s6), 6)  # the server has our IPv6 now
    assert a.endpoint == A6


def test_without_an_ipv6_answer_ipv4_is_applied_after_the_grace_then_upgraded():
    m = machine(families=(4, 6))
    s4, s6 = sorted(sends(m.poll(0.0, WALL)), key=lambda s: s.family)
    m.on_reply(0.05, found(s4, A6, A4), 4)
    assert m.poll(0.5, WALL) == []
    [a] = m.poll(0.55, WALL)
    assert isinstance(a, Apply) and a.endpoint == A4 and m.done()
    [b] = m.on_reply(0.9, found(s6, A6, A4), 6)  # slow, but in time: IPv6 works
    assert b.endpoint == A6 and b.reason == "IPv6 preferred to 198.51.100.7:40001"


def test_no_wait_once_we_know_we_have_no_ipv6_channel():
    m = machine(families=(4,))
    s = only_send(m.poll(0.0, WALL))
    [a] = m.on_reply(0.05, found(s, A6, A4), 4)
    assert a.endpoint == A4


def test_ipv6_without_a_handshake_falls_back_to_ipv4():
    m = machine(families=(4, 6))
    s6 = next(s for s in sends(m.poll(0.0, WALL)) if s.family == 6)
    [a] = m.on_reply(0.1, found(s6, A6, A4), 6)
    assert a.endpoint == A6
    m.update_device(2.0, dev(PeerView(P1, (A6.ip, A6.port), keepalive=25)))
    # settled, but the IPv4 request still goes out once: it registers us over IPv4,
    # which the peer needs if IPv6 between us fails
    s4 = only_send(m.poll(2.0, WALL))
    assert s4.family == 4
    assert m.on_reply(2.05, found(s4, A6, A4), 4) == []  # IPv6 stays, for now
    assert m.next_wakeup() == pytest.approx(4.1)
    out = m.poll(4.1, WALL)
    [b] = [x for x in out if isinstance(x, Apply)]
    assert b.endpoint == A4 and b.reason == "no handshake over IPv6 within 4s"
    assert m.counters.fallbacks == 1 and m.peers[P1].v6_failed == A6
    assert m.next_wakeup() > 4.1  # the fallback fires once, no busy loop
    # later answers with the same IPv6 endpoint keep IPv4 ...
    m.update_device(5.0, dev(PeerView(P1, (A4.ip, A4.port), handshake_age=0.2, rx_bytes=3,
                                      keepalive=25)))
    assert m.on_notify(5.1, NotifyBody(WALL + 1, P1, (A6, A4)), 6) == []
    # ... but a new IPv6 endpoint is tried
    [n] = m.on_notify(5.2, NotifyBody(WALL + 2, P1, (A6B, A4)), 6)
    assert n.endpoint == A6B and n.reason == "IPv6 preferred to 198.51.100.7:40001"


def test_one_shot_settled_by_a_notify_still_registers_over_ipv4():
    """A notify can settle a peer before our own IPv4 request has left (it waits a
    moment behind the IPv6 one). One-shot, that request must still go out, and once it
    brings the peer's IPv4 endpoint, a silent IPv6 endpoint falls back to it."""
    m = PunchV2(dataclasses.replace(T, family_gap=0.05), families=(4, 6),
                randbits=random.Random(1).getrandbits)
    m.update_device(0.0, dev(PeerView(P1)))
    s6 = only_send(m.poll(0.0, WALL))  # IPv4 waits 50 ms behind IPv6
    assert s6.family == 6
    [a] = m.on_notify(0.01, NotifyBody(WALL + 1, P1, (A6,)), 6)  # only IPv6 known yet
    assert a.endpoint == A6 and m.done()
    assert m.on_reply(0.02, found(s6, A6), 6) == []
    s4 = only_send(m.poll(0.1, WALL))
    assert s4.family == 4
    assert m.on_reply(0.15, pending(s4), 4) == []
    assert not [x for x in m.poll(1.0, WALL) if isinstance(x, Send)]  # answered: done
    # no handshake over IPv6; the peer's IPv4 endpoint is not known at the deadline...
    assert [x for x in m.poll(4.1, WALL) if isinstance(x, Apply)] == []
    # ... it comes with the next notify (the peer registered over IPv4), and IPv6 is
    # given up for it at the next check
    m.on_notify(4.5, NotifyBody(WALL + 2, P1, (A6, A4)), 6)
    [b] = [x for x in m.poll(5.2, WALL) if isinstance(x, Apply)]
    assert b.endpoint == A4 and m.counters.fallbacks == 1


def test_ipv6_with_a_handshake_stays():
    m = machine(families=(4, 6))
    s6 = next(s for s in sends(m.poll(0.0, WALL)) if s.family == 6)
    m.on_reply(0.1, found(s6, A6, A4), 6)
    m.update_device(1.0, dev(PeerView(P1, (A6.ip, A6.port), handshake_age=0.5, rx_bytes=92)))
    assert [x for x in m.poll(4.1, WALL) if isinstance(x, Apply)] == []
    assert m.counters.fallbacks == 0 and m.without_handshake(4.1) == []


def test_ipv6_only_peer_without_ipv4_stays_on_ipv6():
    m = machine(families=(4, 6))
    s6 = next(s for s in sends(m.poll(0.0, WALL)) if s.family == 6)
    m.on_reply(0.1, found(s6, A6), 6)
    assert [x for x in m.poll(5.0, WALL) if isinstance(x, Apply)] == []


# -- the device ---------------------------------------------------------------------------

def test_peers_added_and_removed():
    m = machine(PeerView(P1), daemon=True)
    s = only_send(m.poll(0.0, WALL))
    m.update_device(0.5, dev(PeerView(P2)))  # P1 removed while its request is in flight
    assert set(m.peers) == {P2} and m.inflight() == 0
    assert m.on_reply(0.6, found(s, A4), 4) == []
    assert m.counters.late == 1
    s2 = only_send(m.poll(0.6, WALL))
    assert s2.peer == P2


def test_only_restricts_the_peer_set():
    m = machine(PeerView(P1), PeerView(P2), only=frozenset({P2}))
    assert only_send(m.poll(0.0, WALL)).peer == P2 and set(m.peers) == {P2}


def test_daemon_reasks_every_half_interval_and_follows_a_move():
    m = machine(daemon=True)
    s = only_send(m.poll(0.0, WALL))
    m.on_reply(0.1, found(s, A4), 4)
    m.update_device(1.0, dev(PeerView(P1, (A4.ip, A4.port), handshake_age=0.5, rx_bytes=100,
                                      keepalive=25)))
    assert m.next_wakeup() == pytest.approx(10.1)
    s2 = only_send(m.poll(10.1, WALL + 10**10))
    assert s2.body.timestamp > s.body.timestamp
    assert m.on_reply(10.2, found(s2, A4), 4) == []
    s3 = only_send(m.poll(20.2, WALL + 2 * 10**10))
    [a] = m.on_reply(20.3, found(s3, A4B), 4)
    assert a.endpoint == A4B and a.reason.startswith("peer moved from")


def test_nothing_is_sent_before_the_device_is_known():
    m = PunchV2(T, randbits=random.Random(0).getrandbits)
    assert m.poll(0.0, WALL) == [] and m.next_wakeup() == float("inf")


def test_without_handshake_ignores_handshakes_older_than_our_endpoint():
    m = machine(PeerView(P1, ("10.0.0.5", 51820)))
    s = only_send(m.poll(0.0, WALL))
    [a] = m.on_reply(0.1, found(s, A4), 4)
    assert a.reason == "no handshake yet"
    m.update_device(5.0, dev(PeerView(P1, (A4.ip, A4.port), handshake_age=65.0)))
    assert [p.key for p in m.without_handshake(5.0)] == [P1]
    m.update_device(6.0, dev(PeerView(P1, (A4.ip, A4.port), handshake_age=1.0)))
    assert m.without_handshake(6.0) == []


def test_bad_families_are_refused():
    with pytest.raises(ValueError, match="families"):
        PunchV2(T, families=(5,))


def test_the_same_answer_twice_before_the_device_is_read_again_is_applied_once():
    """The notify and the reply to our own request can both carry the endpoint."""
    m = machine()
    s = only_send(m.poll(0.0, WALL))
    [a] = m.on_notify(0.1, NotifyBody(WALL, P1, (A4,)), 4)
    assert m.on_reply(0.11, found(s, A4), 4) == []
    assert m.counters.applied == 1 and m.peers[P1].status is Status.APPLIED


def test_a_handshake_just_before_the_switch_to_ipv6_does_not_count_for_it():
    """A notify with the peer's IPv4 endpoint, then one with its IPv6 endpoint a moment
    later (the peer registered IPv4 first): a handshake that completed in between was
    made over IPv4, so the IPv6 endpoint still has to prove itself."""
    m = machine(families=(4, 6))
    s6 = next(s for s in sends(m.poll(0.0, WALL)) if s.family == 6)
    m.on_reply(0.01, pending(s6), 6)  # we have IPv6
    [a] = m.on_notify(0.100, NotifyBody(WALL + 1, P1, (A4,)), 4)
    [b] = m.on_notify(0.102, NotifyBody(WALL + 2, P1, (A6, A4)), 4)
    assert (a.endpoint, b.endpoint) == (A4, A6)
    # read at 1.0: the handshake was 0.899 s ago, i.e. at 0.101, before the switch
    m.update_device(1.0, dev(PeerView(P1, (A6.ip, A6.port), handshake_age=0.899, keepalive=25)))
    assert [p.key for p in m.without_handshake(1.0)] == [P1]  # --wait keeps waiting
    [c] = [x for x in m.poll(4.102, WALL) if isinstance(x, Apply)]
    assert c.endpoint == A4 and m.counters.fallbacks == 1


def test_after_a_fallback_a_handshake_made_during_the_run_counts():
    m = machine(families=(4, 6))
    s6 = next(s for s in sends(m.poll(0.0, WALL)) if s.family == 6)
    m.on_reply(0.01, pending(s6), 6)
    m.on_notify(0.100, NotifyBody(WALL + 1, P1, (A4,)), 4)
    m.on_notify(0.102, NotifyBody(WALL + 2, P1, (A6, A4)), 4)
    m.update_device(1.0, dev(PeerView(P1, (A6.ip, A6.port), handshake_age=0.899, keepalive=25)))
    [c] = [x for x in m.poll(4.102, WALL) if isinstance(x, Apply)]
    assert c.endpoint == A4
    # the session made over IPv4 at 0.101 is the one WireGuard uses now
    m.update_device(4.5, dev(PeerView(P1, (A4.ip, A4.port), handshake_age=4.399, keepalive=25)))
    assert m.without_handshake(4.5) == []


def test_a_handshake_the_peer_made_over_ipv6_just_before_we_applied_counts():
    """The peer was notified first and its WireGuard reached us over IPv6 before our
    own answer came: WireGuard, read just before we set the endpoint, already had it,
    with a handshake. That proves the IPv6 endpoint."""
    m = machine(families=(4, 6))
    s6 = next(s for s in sends(m.poll(0.0, WALL)) if s.family == 6)
    [a] = m.on_reply(0.10, found(s6, A6, A4), 6)
    assert a.endpoint == A6
    m.before_apply(0.10, PeerView(P1, (A6.ip, A6.port), handshake_age=0.005))
    m.update_device(1.0, dev(PeerView(P1, (A6.ip, A6.port), handshake_age=0.905, keepalive=25)))
    assert m.without_handshake(1.0) == []
    assert [x for x in m.poll(4.1, WALL) if isinstance(x, Apply)] == []


def test_a_handshake_the_peer_made_over_ipv4_just_before_we_applied_ipv6_does_not():
    """The same, but the peer's WireGuard came over IPv4 (WireGuard had the peer's IPv4
    address): our IPv6 endpoint has proven nothing, and gives way after v6_fallback."""
    m = machine(families=(4, 6))
    s6 = next(s for s in sends(m.poll(0.0, WALL)) if s.family == 6)
    m.on_reply(0.10, found(s6, A6, A4), 6)
    m.before_apply(0.10, PeerView(P1, (A4.ip, A4.port), handshake_age=0.005))
    m.update_device(1.0, dev(PeerView(P1, (A6.ip, A6.port), handshake_age=0.905, keepalive=25)))
    assert [p.key for p in m.without_handshake(1.0)] == [P1]
    [c] = [x for x in m.poll(4.1, WALL) if isinstance(x, Apply)]
    assert c.endpoint == A4


def test_an_ipv6_endpoint_wireguard_roamed_away_from_is_not_proven():
    m = machine(families=(4, 6))
    s6 = next(s for s in sends(m.poll(0.0, WALL)) if s.family == 6)
    m.on_reply(0.10, found(s6, A6, A4), 6)
    # a handshake after we applied IPv6, but WireGuard now uses the IPv4 address
    m.update_device(1.0, dev(PeerView(P1, (A4.ip, A4.port), handshake_age=0.5, keepalive=25)))
    [c] = [x for x in m.poll(4.1, WALL) if isinstance(x, Apply)]
    assert c.endpoint == A4


def test_no_wait_for_ipv6_once_an_ipv6_request_was_lost():
    m = machine(families=(4, 6))
    s6, s4 = sends(m.poll(0.0, WALL))
    m.on_reply(0.05, pending(s4), 4)
    s4b = only_send(m.poll(0.30, WALL))
    s6b = only_send(m.poll(1.0, WALL))  # the IPv6 request was lost: asked again at once
    assert (s4b.family, s6b.family) == (4, 6) and m.counters.lost == 1
    [a] = m.on_reply(1.05, found(s4b, A6, A4), 4)  # no wait for IPv6 this time
    assert a.endpoint == A4


def test_the_ipv4_request_follows_the_ipv6_one_after_its_answer_or_the_gap():
    t = Timing(family_gap=0.05)
    m = PunchV2(t, families=(4, 6), randbits=random.Random(3).getrandbits)
    m.update_device(0.0, dev(PeerView(P1), PeerView(P2)))
    first = sends(m.poll(0.0, WALL))
    assert [s.family for s in first] == [6, 6]  # IPv4 held back for both peers
    assert m.next_wakeup() == pytest.approx(0.05)
    by_peer = {s.peer: s for s in first}
    m.on_reply(0.01, pending(by_peer[P1]), 6)  # P1's IPv6 answer: its IPv4 may go now
    [s4] = sends(m.poll(0.01, WALL + 10))
    assert (s4.peer, s4.family) == (P1, 4) and s4.body.timestamp > by_peer[P2].body.timestamp
    assert m.poll(0.04, WALL) == []
    [s4b] = sends(m.poll(0.05, WALL + 20))  # P2's IPv6 answer is late: the gap is up
    assert (s4b.peer, s4b.family) == (P2, 4)


def test_no_gap_once_ipv6_requests_are_lost():
    t = Timing(family_gap=0.05)
    m = PunchV2(t, families=(4, 6), randbits=random.Random(4).getrandbits)
    m.update_device(0.0, dev(PeerView(P1)))
    [s6] = sends(m.poll(0.0, WALL))
    assert sends(m.poll(0.05, WALL))[0].family == 4
    [again] = sends(m.poll(1.0, WALL))  # IPv6 lost: asked again; IPv4 is in flight
    assert again.family == 6
    m.on_reply(1.01, pending(again), 6)  # (the IPv4 request of 0.05 is lost at 1.05)
    out = sends(m.poll(1.05, WALL))
    assert [s.family for s in out] == [4]


def test_a_stale_answer_is_asked_again_even_after_the_peer_is_settled():
    """One-shot: the IPv4 answer settled the peer, but the IPv6 request was stale and
    registered nothing: it goes out again, so the peer learns our IPv6 address."""
    m = machine(families=(4, 6))
    s6, s4 = sends(m.poll(0.0, WALL))
    [a] = m.on_reply(0.01, found(s4, A4), 4)
    assert m.done()
    m.on_reply(0.02, stale(s6, s4.body.timestamp + 1), 6)
    [again] = sends(m.poll(0.02, WALL))
    assert again.family == 6 and again.body.timestamp > s4.body.timestamp


# -- NAT verdicts and the spray ---------------------------------------------------------

EASY, HARD = 0x12, 0x04  # endpoint-independent + port preserved; symmetric


def found_nat(s: Send, nat: int, *endpoints: Endpoint) -> ReplyBody:
    return ReplyBody(s.body.request_id, S.FOUND, WALL, ME4, endpoints, nat)


def test_every_request_carries_our_verdict_and_the_peer_s_is_recorded():
    m = machine(nat=EASY)
    s = only_send(m.poll(0.0, WALL))
    assert s.body.nat == EASY
    m.on_reply(0.1, found_nat(s, 0x11, B4), 4)
    assert m.peers[P1].peer_nat == 0x11
    n = NotifyBody(WALL + 1, P1, (B4,), peer_nat=0x13)
    m.on_notify(0.2, n, 4)
    assert m.peers[P1].peer_nat == 0x13


def test_easy_side_sprays_once_around_the_hard_peer_s_port():
    m = machine(nat=EASY, spray=SprayConfig(count=100, rate=1000.0))
    s = only_send(m.poll(0.0, WALL))
    apply, spray = m.on_reply(0.1, found_nat(s, HARD, A4), 4)
    assert isinstance(apply, Apply) and apply.endpoint == A4
    assert spray == Spray(P1, A4.ip, range(A4.port - 50, A4.port + 50), 1000.0)
    assert m.counters.sprays == 1
    # the notify with the same endpoint: no second spray; a new endpoint: a new one
    assert not any(isinstance(a, Spray) for a in m.on_notify(0.2, NotifyBody(
        WALL + 1, P1, (A4,), peer_nat=HARD), 4))
    out = m.on_notify(0.3, NotifyBody(WALL + 2, P1, (A4B,), peer_nat=HARD), 4)
    assert [type(a) for a in out] == [Apply, Spray] and out[1].ports.start == A4B.port - 50
    assert m.peers[P1].sprayed == A4B and m.counters.sprays == 2


@pytest.mark.parametrize(("mine", "theirs"), [
    (EASY, EASY), (HARD, HARD), (HARD, EASY), (0, HARD), (EASY, 0), (0x11, 0x11)])
def test_no_spray_unless_we_are_easy_and_the_peer_hard(mine, theirs):
    m = machine(nat=mine, spray_hold=0)
    s = only_send(m.poll(0.0, WALL))
    assert [type(a) for a in m.on_reply(0.1, found_nat(s, theirs, A4), 4)] == [Apply]


def test_no_spray_when_turned_off_toward_ipv6_or_at_the_port_range_edges():
    m = machine(nat=EASY, spray=None)
    s = only_send(m.poll(0.0, WALL))
    assert [type(a) for a in m.on_reply(0.1, found_nat(s, HARD, A4), 4)] == [Apply]
    m = machine(families=(4, 6), nat=EASY)
    for s in sends(m.poll(0.0, WALL)):
        m.on_reply(0.1, found(s, A6, observed=ME6 if s.family == 6 else ME4), s.family)
    assert m.counters.sprays == 0 and m.peers[P1].applied == A6
    m = machine(nat=0x11, spray=SprayConfig(count=512))
    s = only_send(m.poll(0.0, WALL))
    _, spray = m.on_reply(0.1, found_nat(s, HARD, Endpoint("198.51.100.7", 3)), 4)
    assert spray.ports == range(1, 513)
    m = machine(nat=0x11, spray=SprayConfig(count=512))
    s = only_send(m.poll(0.0, WALL))
    _, spray = m.on_reply(0.1, found_nat(s, HARD, Endpoint("198.51.100.7", 65535)), 4)
    assert spray.ports == range(65024, 65536)


def test_spray_bounds_are_checked():
    with pytest.raises(ValueError, match="spray count must be 1..4096, got 5000"):
        SprayConfig(count=5000)
    with pytest.raises(ValueError, match="spray rate must be positive, got 0"):
        SprayConfig(rate=0)


def test_hard_side_waits_for_the_easy_peer_s_spray_before_applying():
    m = machine(nat=HARD, spray_hold=0.3)
    s = only_send(m.poll(0.0, WALL))
    assert m.on_reply(0.1, found_nat(s, EASY, B4), 4) == []
    assert m.next_wakeup() == pytest.approx(0.4)
    # the notify that follows does not cut the wait short
    assert m.on_notify(0.2, NotifyBody(WALL + 1, P1, (B4,), peer_nat=EASY), 4) == []
    assert [a for a in m.poll(0.39, WALL) if not isinstance(a, Send)] == []
    [apply] = [a for a in m.poll(0.4, WALL) if not isinstance(a, Send)]
    assert isinstance(apply, Apply) and apply.endpoint == B4
    # a peer whose NAT is hard too, or unknown: no wait
    for theirs in (HARD, 0):
        m = machine(nat=HARD)
        s = only_send(m.poll(0.0, WALL))
        assert [type(a) for a in m.on_reply(0.1, found_nat(s, theirs, B4), 4)] == [Apply]


# -- a verdict that changes under a running daemon ---------------------------------------


def test_a_new_verdict_is_asked_with_at_once_and_an_unchanged_one_is_not():
    m = machine(nat=EASY, daemon=True)
    s = only_send(m.poll(0.0, WALL))
    m.on_reply(0.1, found_nat(s, EASY, B4), 4)
    assert sends(m.poll(1.0, WALL)) == []  # the next ask is due at interval / 2
    assert not m.set_nat(EASY, 1.0)
    assert sends(m.poll(1.0, WALL)) == []
    assert m.set_nat(HARD, 1.0)
    again = only_send(m.poll(1.0, WALL))
    assert again.body.nat == HARD and again.body.timestamp > s.body.timestamp


def test_the_easy_side_sprays_for_a_kept_endpoint_once_the_peer_turns_out_hard():
    """The peer's check said easy, so we set its endpoint without a spray; it checked
    again and is hard: the next answer (same endpoint) brings the spray, once."""
    m = machine(nat=EASY, daemon=True, spray=SprayConfig(count=100, rate=1000.0))
    s = only_send(m.poll(0.0, WALL))
    assert [type(a) for a in m.on_reply(0.1, found_nat(s, EASY, A4), 4)] == [Apply]
    m.update_device(0.5, dev(PeerView(P1, ("198.51.100.7", 40001), keepalive=25)))
    s = only_send(m.poll(11.0, WALL + 1))
    out = m.on_reply(11.1, found_nat(s, HARD, A4), 4)
    assert out == [Spray(P1, A4.ip, range(A4.port - 50, A4.port + 50), 1000.0)]
    s = only_send(m.poll(22.0, WALL + 2))
    assert m.on_reply(22.1, found_nat(s, HARD, A4), 4) == []  # not twice


def test_no_spray_for_a_kept_endpoint_that_has_had_a_handshake():
    m = machine(nat=EASY, daemon=True)
    s = only_send(m.poll(0.0, WALL))
    m.on_reply(0.1, found_nat(s, EASY, A4), 4)
    m.update_device(5.0, dev(PeerView(P1, ("198.51.100.7", 40001), handshake_age=1.0,
                                      keepalive=25)))
    s = only_send(m.poll(11.0, WALL + 1))
    assert m.on_reply(11.1, found_nat(s, HARD, A4), 4) == []


def test_stuck_since_is_the_oldest_direct_endpoint_without_a_handshake_after_it():
    m = machine(PeerView(P1), PeerView(P2), nat=EASY, daemon=True)
    assert m.stuck_since() is None
    s1, s2 = sends(m.poll(0.0, WALL))
    m.on_reply(0.5, found_nat(s1, EASY, A4), 4)
    assert m.stuck_since() == 0.5
    m.on_reply(0.8, found_nat(s2, EASY, B4), 4)
    assert m.stuck_since() == 0.5
    # a handshake with the first peer after we set its endpoint; the second one's
    # latest handshake is older than its endpoint: it still waits
    m.update_device(4.0, dev(PeerView(s1.peer, ("198.51.100.7", 40001), handshake_age=1.0),
                             PeerView(s2.peer, ("203.0.113.9", 51820), handshake_age=3.5)))
    assert m.stuck_since() == 0.8
    m.update_device(6.0, dev(PeerView(s1.peer, ("198.51.100.7", 40001), handshake_age=3.0),
                             PeerView(s2.peer, ("203.0.113.9", 51820), handshake_age=1.0)))
    assert m.stuck_since() is None


def test_a_tunnel_whose_handshakes_stopped_is_stuck_too():
    """Our endpoint worked (a handshake after it), then handshakes stopped: with keepalive
    on, a latest handshake over 180 s old means the tunnel broke (e.g. our NAT changed);
    without keepalive, WireGuard sends nothing when idle and old handshakes are normal."""
    m = machine(nat=EASY, daemon=True)
    s = only_send(m.poll(0.0, WALL))
    m.on_reply(0.5, found_nat(s, EASY, A4), 4)
    ep = ("198.51.100.7", 40001)
    m.update_device(10.0, dev(PeerView(P1, ep, handshake_age=5.0, keepalive=25)))
    assert m.stuck_since() is None
    # the peer's keepalives keep coming (rx grows), but no new handshake
    m.update_device(190.0, dev(PeerView(P1, ep, handshake_age=180.0, rx_bytes=900,
                                        keepalive=25)))
    assert m.stuck_since() is None
    m.update_device(200.0, dev(PeerView(P1, ep, handshake_age=190.0, rx_bytes=932,
                                        keepalive=25)))
    assert m.stuck_since() == pytest.approx(190.0)  # since the handshake turned 180 s old
    m.update_device(200.0, dev(PeerView(P1, ep, handshake_age=190.0, rx_bytes=964,
                                        keepalive=0)))
    assert m.stuck_since() is None


def test_a_tunnel_that_went_silent_is_stuck_before_its_handshake_is_old():
    """Keepalive on, a recent handshake, but nothing received for two keepalive periods
    plus the dead margin (the peer's wg-punch keeps its keepalives coming over a working
    tunnel): the tunnel broke, say because our NAT changed under it."""
    m = machine(nat=EASY, daemon=True)
    s = only_send(m.poll(0.0, WALL))
    m.on_reply(0.5, found_nat(s, EASY, A4), 4)
    ep = ("198.51.100.7", 40001)
    m.update_device(10.0, dev(PeerView(P1, ep, handshake_age=5.0, rx_bytes=148,
                                        keepalive=25)))
    m.update_device(60.0, dev(PeerView(P1, ep, handshake_age=55.0, rx_bytes=212,
                                        keepalive=25)))  # the last bytes came by 60 s
    m.update_device(110.0, dev(PeerView(P1, ep, handshake_age=105.0, rx_bytes=212,
                                         keepalive=25)))
    assert m.stuck_since() is None  # 50 s of silence: not yet 2 x 25 + 5
    m.update_device(116.0, dev(PeerView(P1, ep, handshake_age=111.0, rx_bytes=212,
                                         keepalive=25)))
    assert m.stuck_since() == pytest.approx(115.0)  # silent since 60 s, + 55 s
    m.update_device(120.0, dev(PeerView(P1, ep, handshake_age=0.5, rx_bytes=304,
                                         keepalive=25)))
    assert m.stuck_since() is None  # heard again
    # without keepalive an idle tunnel is silent, and that is normal
    m.update_device(300.0, dev(PeerView(P1, ep, handshake_age=180.5, rx_bytes=304,
                                         keepalive=0)))
    assert m.stuck_since() is None


def test_timestamps_used_elsewhere_are_skipped():
    m = machine()
    m.stamped_elsewhere(WALL + 500)
    assert only_send(m.poll(0.0, WALL)).body.timestamp == WALL + 500
    m.stamped_elsewhere(WALL)  # never backwards
    assert m.stamp(WALL) == WALL + 501
