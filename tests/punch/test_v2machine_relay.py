"""The v2 machine's relay fallback: when it asks for a relay, what a relay message makes
it do (bind, then apply), and the bounded tries of the direct path while relayed."""

from __future__ import annotations

import random

import pytest

from punch.policy import DeviceView, PeerView, Timing
from punch.v2machine import Apply, Bind, PunchV2, RelayTiming, Send, Spray, SprayConfig
from rendezvous.v2.wire import FLAG_RELAY, Endpoint, RelayBody, ReplyBody
from rendezvous.v2.wire import Status as S

ME = b"M" * 32
P1 = b"1" * 32
B4 = Endpoint("203.0.113.9", 51820)  # the peer's direct endpoint (as the server saw it)
R = Endpoint("198.51.100.2", 49919)  # the relay
ME4 = Endpoint("192.0.2.1", 51820)
T = Timing(request_timeout=1.0, poll=1.0, first_poll=0.25, backoff_max=8.0, interval=20.0,
           keepalive=25)
RT = RelayTiming(after=10.0, rebind=2.0, keep_bound=20.0, upgrade_every=30.0,
                 upgrade_max=100.0, upgrade_window=5.0)
WALL = 1_700_000_000_000_000_000


def view(ep: Endpoint | None = None, hs_at: float | None = None, now: float = 0.0,
         rx: int = 0) -> PeerView:
    return PeerView(P1, None if ep is None else (ep.ip, ep.port),
                    None if hs_at is None else now - hs_at, rx, 25)


def machine(daemon: bool = True, relay: RelayTiming | None = RT, **kw) -> PunchV2:
    m = PunchV2(T, daemon=daemon, families=(4,), randbits=random.Random(3).getrandbits,
                relay=relay, **kw)
    m.update_device(0.0, DeviceView(ME, (view(),)))
    return m


def punched(m: PunchV2) -> None:
    """The peer's direct endpoint found and applied at t=0.1."""
    [s] = m.poll(0.0, WALL)
    assert isinstance(s, Send) and s.body.flags == 0
    [a] = m.on_reply(0.1, ReplyBody(s.body.request_id, S.FOUND, WALL, ME4, (B4,)), 4)
    assert isinstance(a, Apply) and a.endpoint == B4


def device(m: PunchV2, now: float, **kw) -> None:
    m.update_device(now, DeviceView(ME, (view(now=now, **kw),)))


def relay_request(m: PunchV2, now: float) -> Send:
    out = [a for a in m.poll(now, WALL) if isinstance(a, Send)]
    [s] = out
    assert s.body.flags & FLAG_RELAY
    return s


def relayed(m: PunchV2, at: float = 10.2) -> None:
    """Punched, no handshake, the relay asked for at AT and offered."""
    punched(m)
    device(m, 5.0, ep=B4)
    assert not [a for a in m.poll(5.0, WALL) if isinstance(a, Send) and a.body.flags]
    assert m.next_wakeup() <= 10.1
    s = relay_request(m, at)
    assert m.counters.relay_asked == 1
    # the server answers (found) and sends the relay message right after
    assert m.on_reply(at + 0.05, ReplyBody(s.body.request_id, S.FOUND, WALL, ME4, (B4,)), 4) \
        == []  # the endpoint applied already
    out = m.on_relay(at + 0.05, RelayBody(WALL + 10, 7, P1, R))
    assert out[0] == Bind(P1, R)
    assert isinstance(out[1], Apply) and out[1].endpoint == R
    assert "no handshake over the direct endpoint within 10s" in out[1].reason
    assert m.peers[P1].path == "relay"


def test_a_handshake_before_the_deadline_means_no_relay() -> None:
    m = machine()
    punched(m)
    device(m, 3.0, ep=B4, hs_at=2.0)
    for t in (3.0, 10.5, 20.0):
        assert not [a for a in m.poll(t, WALL) if isinstance(a, Send) and a.body.flags]
    assert m.counters.relay_asked == 0 and m.peers[P1].path == "direct"


def test_no_handshake_within_the_deadline_asks_for_a_relay_and_uses_it() -> None:
    m = machine()
    relayed(m)
    st = m.peers[P1]
    # the bind is repeated every 2 s until a handshake over the relay, then every 20 s
    assert Bind(P1, R) in m.poll(12.3, WALL)
    device(m, 13.0, ep=R, hs_at=12.9)
    assert Bind(P1, R) in m.poll(14.3, WALL)
    assert Bind(P1, R) not in m.poll(20.0, WALL)
    # the server's answers no longer move a relayed peer, and every request keeps the flag
    s = relay_request(m, 20.3)
    assert m.on_reply(20.4, ReplyBody(s.body.request_id, S.FOUND, WALL, ME4, (B4,)), 4) == []
    assert st.applied == R
    assert Bind(P1, R) in m.poll(34.4, WALL)


def test_an_old_or_replayed_relay_message_is_refused() -> None:
    m = machine()
    relayed(m)
    assert m.on_relay(11.0, RelayBody(WALL + 10, 7, P1, R)) == []
    assert m.on_relay(11.0, RelayBody(WALL + 5, 7, P1, Endpoint("192.0.2.66", 1))) == []
    assert m.counters.relay_old == 2 and m.peers[P1].relay == R
    # a newer message for the same relay (a new allocation): bind again, nothing else
    assert m.on_relay(11.0, RelayBody(WALL + 11, 0, P1, R)) == [Bind(P1, R)]
    assert m.on_relay(11.0, RelayBody(WALL + 12, 0, b"9" * 32, R)) == []  # not our peer


def test_a_relay_the_peer_asked_for_is_used_at_once() -> None:
    m = machine()
    punched(m)
    out = m.on_relay(1.0, RelayBody(WALL + 1, 0, P1, R))
    assert out[0] == Bind(P1, R) and isinstance(out[1], Apply)
    assert "asked for by the peer" in out[1].reason


def test_relay_off_never_asks_and_ignores_offers() -> None:
    m = machine(relay=None)
    punched(m)
    device(m, 15.0, ep=B4)
    assert all(not a.body.flags for a in m.poll(15.0, WALL) if isinstance(a, Send))
    assert m.on_relay(15.0, RelayBody(WALL + 1, 0, P1, R)) == []
    assert m.peers[P1].applied == B4


def test_both_nats_hard_ask_at_once() -> None:
    m = machine(relay=RelayTiming(at_once=lambda mine, theirs: mine == theirs == 9), nat=9)
    [s] = m.poll(0.0, WALL)
    # no direct endpoint first: its doomed handshake would make WireGuard wait 5 s
    # (REKEY_TIMEOUT) before it tried the relay
    assert m.on_reply(0.1, ReplyBody(s.body.request_id, S.FOUND, WALL, ME4, (B4,),
                                     peer_nat=9), 4) == []
    assert m.peers[P1].applied is None and not m.done()
    assert relay_request(m, 0.2).peer == P1
    out = m.on_relay(0.3, RelayBody(WALL + 1, 1, P1, R))
    assert "both NATs need it" in out[1].reason


def test_one_shot_keeps_asking_until_the_relay_is_in() -> None:
    m = machine(daemon=False)
    punched(m)
    assert m.next_wakeup() <= 10.1  # the relay deadline, though the one-shot is done asking
    s = relay_request(m, 10.2)
    # the request is lost: retried at once, not dropped as for a settled one-shot peer
    again = relay_request(m, 11.3)
    assert again.body.request_id != s.body.request_id
    out = m.on_relay(11.4, RelayBody(WALL + 1, again.body.request_id, P1, R))
    assert isinstance(out[1], Apply)


def test_a_failed_try_of_the_direct_path_goes_back_to_the_relay_and_backs_off() -> None:
    m = machine()
    relayed(m)
    device(m, 12.0, ep=R, hs_at=11.0, rx=1000)
    [t] = [a for a in m.poll(40.3, WALL) if isinstance(a, Apply)]
    assert t.endpoint == B4 and "trying the direct path for 5s" in t.reason
    assert m.peers[P1].path == "trying direct" and m.counters.upgrade_tries == 1
    # the relay offered again meanwhile (the peer's daemon re-asked): the try goes on
    assert m.on_relay(41.0, RelayBody(WALL + 20, 0, P1, R)) == [Bind(P1, R)]
    assert m.peers[P1].path == "trying direct"
    device(m, 43.0, ep=B4, hs_at=11.0, rx=1000)  # nothing from the peer since
    assert not [a for a in m.poll(44.0, WALL) if isinstance(a, Apply)]
    [back] = [a for a in m.poll(45.4, WALL) if isinstance(a, Apply)]
    assert back.endpoint == R and "back to the relay" in back.reason
    assert "next try in 60s" in back.reason and m.peers[P1].path == "relay"
    # the next try is 60 s later, then 100 (the cap)
    assert not [a for a in m.poll(100.0, WALL) if isinstance(a, Apply)]
    [t2] = [a for a in m.poll(105.5, WALL) if isinstance(a, Apply)]
    assert t2.endpoint == B4
    [b2] = [a for a in m.poll(110.6, WALL) if isinstance(a, Apply)]
    assert "next try in 100s" in b2.reason


def test_wireguard_roaming_back_to_the_relay_ends_the_try_early() -> None:
    m = machine()
    relayed(m)
    device(m, 12.0, ep=R, hs_at=11.0)
    m.poll(40.3, WALL)
    device(m, 41.0, ep=R, hs_at=11.0, rx=50)  # a packet came through the relay
    [back] = [a for a in m.poll(41.0, WALL) if isinstance(a, Apply)]
    assert back.endpoint == R and "WireGuard went back to the relay" in back.reason


def test_a_proven_try_moves_off_the_relay() -> None:
    m = machine()
    relayed(m)
    device(m, 12.0, ep=R, hs_at=11.0, rx=1000)
    m.poll(40.3, WALL)
    device(m, 43.0, ep=B4, hs_at=11.0, rx=1200)  # the peer's packets came from B4
    [up] = [a for a in m.poll(45.4, WALL) if isinstance(a, Apply)]
    assert up.endpoint == B4 and "off the relay" in up.reason
    st = m.peers[P1]
    assert st.path == "direct" and st.relay is None and m.counters.upgrades == 1
    later = [a for t in range(46, 90) for a in m.poll(float(t), WALL)]
    sent = [a for a in later if isinstance(a, Send)]
    assert sent and not any(a.body.flags & FLAG_RELAY for a in sent)  # the relay is let go
    assert not [a for a in later if isinstance(a, (Bind, Apply))]


def test_wireguard_roaming_to_a_direct_endpoint_is_an_upgrade() -> None:
    m = machine()
    relayed(m)
    other = Endpoint("203.0.113.9", 40404)  # the peer's try reached us from there
    device(m, 15.0, ep=other, hs_at=14.0)
    [up] = [a for a in m.poll(15.0, WALL) if isinstance(a, Apply)]
    assert up.endpoint == other and "roamed" in up.reason
    assert m.peers[P1].path == "direct"


def test_at_once_false_waits_for_the_deadline() -> None:
    m = machine(relay=RelayTiming(at_once=lambda mine, theirs: mine == theirs == 9), nat=1)
    [s] = m.poll(0.0, WALL)
    m.on_reply(0.1, ReplyBody(s.body.request_id, S.FOUND, WALL, ME4, (B4,), peer_nat=9), 4)
    assert not [a for a in m.poll(0.2, WALL) if isinstance(a, Send) and a.body.flags]
    assert m.counters.relay_asked == 0


def test_roaming_needs_a_device_read_after_the_relay_was_set() -> None:
    m = machine()
    relayed(m)  # the relay applied at 10.25
    other = Endpoint("203.0.113.9", 40404)
    m.update_device(10.0, DeviceView(ME, (view(ep=other, now=10.0),)))  # read before: stale
    assert not [a for a in m.poll(10.3, WALL) if isinstance(a, Apply)]
    # read after, with no handshake since the relay (the direct one came before): roamed
    device(m, 11.0, ep=other, hs_at=10.1)
    [up] = [a for a in m.poll(11.0, WALL) if isinstance(a, Apply)]
    assert up.endpoint == other and "roamed" in up.reason


# -- the verdicts shape the tries of the direct path ---------------------------------------

EASY, HARD = 0x12, 0x04  # endpoint-independent + port preserved; symmetric


def _peer_verdict(m: PunchV2, now: float, nat: int) -> None:
    """The daemon's next re-ask; the answer carries the peer's NAT byte NAT."""
    [s] = [a for a in m.poll(now, WALL) if isinstance(a, Send)]
    assert m.on_reply(now + 0.05, ReplyBody(s.body.request_id, S.FOUND, WALL, ME4, (B4,),
                                            nat), 4) == []  # relayed: the answer waits
    assert m.peers[P1].peer_nat == nat


def test_the_easy_side_sprays_with_each_try_of_the_direct_path() -> None:
    m = machine(nat=EASY, spray=SprayConfig(count=100, rate=1000.0))
    relayed(m)  # the peer's verdict unknown then: no spray with the first punch
    assert m.counters.sprays == 0
    _peer_verdict(m, 20.3, HARD)  # the peer checked its NAT again: hard
    device(m, 21.0, ep=R, hs_at=20.5, rx=1000)
    out = [a for a in m.poll(40.3, WALL) if isinstance(a, (Apply, Spray))]
    assert [type(a) for a in out] == [Apply, Spray] and out[0].endpoint == B4
    assert out[1] == Spray(P1, B4.ip, range(B4.port - 50, B4.port + 50), 1000.0)
    m.poll(45.4, WALL)  # the try failed: back to the relay; the next try sprays again
    out = [a for a in m.poll(105.5, WALL) if isinstance(a, (Apply, Spray))]
    assert [type(a) for a in out] == [Apply, Spray] and m.counters.sprays == 2


def test_the_hard_side_starts_each_try_after_the_easy_peer_s_spray() -> None:
    m = machine(nat=HARD, spray_hold=0.3)
    relayed(m)
    _peer_verdict(m, 20.3, EASY)
    device(m, 21.0, ep=R, hs_at=20.5, rx=1000)
    assert not [a for a in m.poll(40.3, WALL) if isinstance(a, Apply)]  # due, held
    assert m.next_wakeup() == pytest.approx(40.6)
    [t] = [a for a in m.poll(40.6, WALL) if isinstance(a, Apply)]
    assert t.endpoint == B4 and "trying the direct path" in t.reason
    assert m.counters.sprays == 0
    m.poll(45.7, WALL)  # failed: back to the relay, the next try 60 s later, held again
    assert not [a for a in m.poll(105.8, WALL) if isinstance(a, Apply)]
    [t2] = [a for a in m.poll(106.1, WALL) if isinstance(a, Apply)]
    assert t2.endpoint == B4


def test_a_relayed_peer_waits_for_a_direct_tunnel() -> None:
    m = machine()
    relayed(m)
    assert m.stuck_since() == pytest.approx(10.25)


def test_wireguard_roaming_during_a_try_to_a_third_endpoint_is_an_upgrade() -> None:
    """We try the peer's reported endpoint; its symmetric NAT picked another port toward
    us, and WireGuard followed the peer's handshake there: direct, at once."""
    m = machine()
    relayed(m)
    device(m, 12.0, ep=R, hs_at=11.0, rx=1000)
    m.poll(40.3, WALL)
    other = Endpoint(B4.ip, 40177)
    device(m, 41.0, ep=other, hs_at=11.0, rx=1000)  # roamed, but nothing heard: not yet
    assert not [a for a in m.poll(41.0, WALL) if isinstance(a, Apply)]
    device(m, 41.5, ep=other, hs_at=41.2, rx=1100)
    [up] = [a for a in m.poll(41.5, WALL) if isinstance(a, Apply)]
    assert up.endpoint == other and "during the try: direct, off the relay" in up.reason
    assert m.peers[P1].path == "direct" and m.counters.upgrades == 1
    assert m.stuck_since() is None  # heard after the try began
    # the server keeps reporting B4 (where the peer's NAT maps it toward the server): a
    # re-ask keeps the endpoint WireGuard roamed to instead of moving back to B4
    device(m, 50.0, ep=other, hs_at=41.2, rx=1300)
    t = 50.0
    while not (sent := [a for a in m.poll(t, WALL) if isinstance(a, Send)]):
        t += 0.5
    assert m.on_reply(t + 0.05, ReplyBody(sent[0].body.request_id, S.FOUND, WALL, ME4, (B4,)),
                      4) == []


def test_the_relay_we_left_for_a_working_direct_path_is_declined_until_it_carries_packets():
    """After an upgrade the peer, still relayed until it hears us directly, keeps asking
    for the relay; its offers do not pull us back while WireGuard stays direct. Once the
    peer's packets come through the relay (WireGuard moved there), the offer is taken."""
    m = machine()
    relayed(m)
    device(m, 12.0, ep=R, hs_at=11.0, rx=1000)
    m.poll(40.3, WALL)
    device(m, 43.0, ep=B4, hs_at=11.0, rx=1200)
    [up] = [a for a in m.poll(45.4, WALL) if isinstance(a, Apply)]
    assert "off the relay" in up.reason
    device(m, 46.0, ep=B4, hs_at=44.0, rx=1300)
    assert m.on_relay(46.5, RelayBody(WALL + 30, 0, P1, R)) == []
    assert m.counters.relay_declined == 1 and m.peers[P1].path == "direct"
    device(m, 60.0, ep=R, hs_at=44.0, rx=1400)  # the peer's packets came via the relay
    out = m.on_relay(60.5, RelayBody(WALL + 40, 0, P1, R))
    assert [type(a) for a in out] == [Bind, Apply] and out[1].endpoint == R
    assert m.peers[P1].path == "relay"


def test_a_try_proven_by_data_alone_leaves_the_peer_not_waiting() -> None:
    """The session the relay carried goes on over the direct path: the bytes received
    prove it, and the peer does not wait for WireGuard's next handshake (up to two
    minutes away) to count as heard, so it sets off no NAT re-check."""
    m = machine()
    relayed(m)
    device(m, 12.0, ep=R, hs_at=11.0, rx=1000)
    [t] = [a for a in m.poll(40.3, WALL) if isinstance(a, Apply)]
    assert t.endpoint == B4 and "trying the direct path" in t.reason
    device(m, 43.0, ep=B4, hs_at=11.0, rx=1500)  # data over the direct path, no handshake
    [up] = [a for a in m.poll(45.4, WALL) if isinstance(a, Apply)]
    assert up.endpoint == B4 and "direct path works" in up.reason
    assert m.peers[P1].path == "direct"
    assert m.stuck_since() is None
    device(m, 70.0, ep=B4, hs_at=11.0, rx=1800)  # the peer's keepalives go on
    assert m.stuck_since() is None


def test_data_that_come_through_the_relay_we_left_are_not_heard_directly() -> None:
    m = machine()
    relayed(m)
    device(m, 12.0, ep=R, hs_at=11.0, rx=1000)
    m.poll(40.3, WALL)
    device(m, 43.0, ep=B4, hs_at=11.0, rx=1500)
    m.poll(45.4, WALL)
    assert m.peers[P1].path == "direct"
    device(m, 46.0, ep=R, hs_at=11.0, rx=2000)  # WireGuard followed a packet via the relay
    assert m.peers[P1].heard_since_applied() is False
    assert m.stuck_since() == pytest.approx(45.4)  # waiting since the upgrade set B4
