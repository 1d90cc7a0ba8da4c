"""The punch state machine, driven with a fake clock and fake device views."""

from __future__ import annotations

from rendezvous.classic import Endpoint
from punch.machine import Apply, DeviceView, Keepalive, PeerView, Punch, Send, Status, Timing

ME = b"M" * 32
P1, P2 = b"1" * 32, b"2" * 32
E1 = Endpoint("198.51.100.7", 40001)
E1B = Endpoint("198.51.100.7", 40999)
E2 = Endpoint("203.0.113.9", 51820)
T = Timing(request_timeout=1.0, poll=1.0, backoff_max=8.0, interval=20.0, keepalive=25,
           dead_margin=5.0, first_poll=1.0)


def dev(*peers: PeerView) -> DeviceView:
    return DeviceView(ME, peers)


def only_send(actions) -> Send:
    assert len(actions) == 1 and isinstance(actions[0], Send), actions
    return actions[0]


def test_asks_for_each_peer_one_at_a_time():
    m = Punch(T)
    m.update_device(0.0, dev(PeerView(P1), PeerView(P2)))
    s = only_send(m.poll(0.0))
    assert s.payload == ME + s.peer
    assert m.poll(0.1) == []  # one request in flight at a time
    first = s.peer
    [a] = m.on_reply(0.2, E1.packed())
    assert isinstance(a, Apply) and a.peer == first and a.endpoint == E1 and a.keepalive == 25
    s2 = only_send(m.poll(0.2))
    assert s2.peer != first
    m.on_reply(0.3, E2.packed())
    assert m.done() and m.next_wakeup() == float("inf")


def test_lost_request_times_out_and_backs_off_exponentially():
    m = Punch(T)
    m.update_device(0.0, dev(PeerView(P1)))
    sends = []
    now = 0.0
    while len(sends) < 7:  # every request is lost
        out = m.poll(now)
        if out:
            only_send(out)
            sends.append(now)
        now = m.next_wakeup()
    # 1 s timeout each; the first retry at once, then 1, 2, 4, 8, 8 s of backoff
    assert [b - a for a, b in zip(sends, sends[1:])] == [1.0, 2.0, 3.0, 5.0, 9.0, 9.0]
    assert m.counters.lost == 6 and m.peers[P1].lost == 6


def test_late_reply_is_discarded():
    m = Punch(T)
    m.update_device(0.0, dev(PeerView(P1)))
    only_send(m.poll(0.0))
    only_send(m.poll(1.0))  # lost: asked again at once
    assert m.poll(2.0) == []  # lost again: now it backs off, nothing in flight
    assert m.on_reply(2.5, E1.packed()) == []
    assert m.counters.late == 1 and not m.done()


def test_no_other_peer_is_asked_while_a_late_reply_may_come():
    """Classic replies do not name the peer: after a timeout for P1, a reply to P1 may
    still arrive. Asking for P2 then would take that answer for P2's."""
    m = Punch(T)
    m.update_device(0.0, dev(PeerView(P1), PeerView(P2)))
    first = only_send(m.poll(0.0)).peer
    other = P2 if first == P1 else P1
    again = only_send(m.poll(1.0))  # timeout: the same question goes out again at once
    assert again.peer == first
    m.poll(2.0)  # lost again; backoff 1 s for FIRST, quiet until 2.5 for others
    assert m.next_wakeup() == 2.5
    assert m.poll(2.4) == []
    assert only_send(m.poll(2.5)).peer == other


def test_reply_after_deadline_but_before_poll_is_late():
    m = Punch(T)
    m.update_device(0.0, dev(PeerView(P1)))
    only_send(m.poll(0.0))
    assert m.on_reply(1.01, E1.packed()) == []
    assert m.counters.late == 1


def test_not_found_is_retried_at_poll_interval():
    m = Punch(T)
    m.update_device(0.0, dev(PeerView(P1)))
    only_send(m.poll(0.0))
    assert m.on_reply(0.1, b"") == []
    assert m.peers[P1].status is Status.NOT_FOUND and m.replied
    assert m.poll(1.0) == []
    only_send(m.poll(1.1))
    [a] = m.on_reply(1.2, E1.packed())
    assert a.reason == "no endpoint" and m.done()


def test_not_found_is_asked_again_soon_at_first():
    m = Punch(Timing(poll=1.0, first_poll=0.25))
    m.update_device(0.0, dev(PeerView(P1)))
    asked = []
    now = 0.0
    for _ in range(5):
        only_send(m.poll(now))
        asked.append(now)
        m.on_reply(now, b"")
        now = m.next_wakeup()
    gaps = [round(b - a, 3) for a, b in zip(asked, asked[1:])]
    assert gaps == [0.25, 0.5, 1.0, 1.0]
    [a] = m.on_reply(now, b"") or [None]  # (a late reply: nothing in flight)
    assert a is None
    only_send(m.poll(now))
    m.on_reply(now, E1.packed())
    assert m.peers[P1].misses == 0


def test_malformed_reply_is_counted_and_ignored():
    m = Punch(T)
    m.update_device(0.0, dev(PeerView(P1)))
    only_send(m.poll(0.0))
    assert m.on_reply(0.1, b"\x01\x02\x03") == []
    assert m.counters.malformed == 1
    assert m.on_reply(0.2, E1.packed())  # the real reply still counts


def test_working_roamed_endpoint_is_kept():
    """WireGuard has a live session on another endpoint: keep it (it may have roamed)."""
    m = Punch(T)
    m.update_device(0.0, dev(PeerView(P1, ("10.0.0.5", 51820), handshake_age=3.0, rx_bytes=10)))
    only_send(m.poll(0.0))
    assert m.on_reply(0.1, E1.packed()) == [Keepalive(P1, 25)]  # kept, but keepalive was off
    assert m.peers[P1].status is Status.KEPT and m.done()


def test_kept_endpoint_with_keepalive_on_is_left_alone():
    m = Punch(T)
    m.update_device(0.0, dev(PeerView(P1, ("10.0.0.5", 51820), handshake_age=3.0, keepalive=15)))
    only_send(m.poll(0.0))
    assert m.on_reply(0.1, E1.packed()) == []


def test_stale_handshake_but_alive_is_kept_until_it_looks_dead():
    m = Punch(T, daemon=True)
    m.update_device(0.0, dev(PeerView(P1, ("10.0.0.5", 51820), handshake_age=100.0, rx_bytes=10,
                                      keepalive=25)))
    only_send(m.poll(0.0))
    assert m.on_reply(0.1, E1.packed()) == []
    # rx stays flat for longer than keepalive + margin: the peer looks dead
    m.update_device(31.0, dev(PeerView(P1, ("10.0.0.5", 51820), handshake_age=131.0, rx_bytes=10,
                                       keepalive=25)))
    only_send(m.poll(31.0))  # polled at once, not at the next recheck
    [a] = m.on_reply(31.1, E1.packed())
    assert a.reason == "peer looks dead" and a.endpoint == E1


def test_peer_with_endpoint_but_no_handshake_gets_the_server_answer():
    m = Punch(T)
    m.update_device(0.0, dev(PeerView(P1, ("10.0.0.5", 51820))))
    only_send(m.poll(0.0))
    [a] = m.on_reply(0.1, E1.packed())
    assert a.reason == "no handshake yet"


def test_daemon_follows_a_nat_rebind():
    m = Punch(T, daemon=True)
    m.update_device(0.0, dev(PeerView(P1)))
    only_send(m.poll(0.0))
    m.on_reply(0.1, E1.packed())
    m.update_device(1.0, dev(PeerView(P1, (E1.ip, E1.port), handshake_age=0.5, rx_bytes=100,
                                      keepalive=25)))
    assert m.next_wakeup() == 10.1  # re-ask (and so re-register) every interval / 2
    assert m.poll(10.0) == []
    only_send(m.poll(10.1))
    assert m.on_reply(10.2, E1.packed()) == []  # unchanged: nothing to do
    only_send(m.poll(20.2))
    [a] = m.on_reply(20.3, E1B.packed())  # the peer's NAT moved it
    assert a.endpoint == E1B and a.reason.startswith("peer moved from")


def test_daemon_picks_up_added_and_removed_peers():
    m = Punch(T, daemon=True)
    m.update_device(0.0, dev(PeerView(P1)))
    s = only_send(m.poll(0.0))
    m.update_device(0.5, dev(PeerView(P2)))  # P1 removed while its request is in flight
    assert set(m.peers) == {P2}
    assert m.on_reply(0.6, E1.packed()) == []  # the answer for P1 is no longer wanted
    s = only_send(m.poll(0.6))
    assert s.peer == P2


def test_only_restricts_the_peer_set():
    m = Punch(T, only=frozenset({P2}))
    m.update_device(0.0, dev(PeerView(P1), PeerView(P2)))
    assert only_send(m.poll(0.0)).peer == P2
    assert set(m.peers) == {P2}


def test_nothing_is_sent_before_the_device_is_known():
    m = Punch(T)
    assert m.poll(0.0) == [] and m.next_wakeup() == float("inf")


def test_without_handshake_ignores_handshakes_older_than_our_endpoint():
    m = Punch(T)
    m.update_device(0.0, dev(PeerView(P1, ("10.0.0.5", 51820))))
    only_send(m.poll(0.0))
    [a] = m.on_reply(0.1, E1.packed())  # no handshake yet: the server's endpoint is applied
    assert a.endpoint == E1
    # WireGuard shows a handshake from 65 s ago, before we applied at 0.1: it does not count
    m.update_device(5.0, dev(PeerView(P1, (E1.ip, E1.port), handshake_age=65.0)))
    assert [s.key for s in m.without_handshake(5.0)] == [P1]
    # a fresh handshake (1 s ago, after we applied at 0.1) counts
    m.update_device(6.0, dev(PeerView(P1, (E1.ip, E1.port), handshake_age=1.0)))
    assert m.without_handshake(6.0) == []


def test_without_handshake_lists_peers_never_seen():
    m = Punch(T)
    m.update_device(0.0, dev(PeerView(P1), PeerView(P2, ("10.0.0.5", 1), handshake_age=3.0)))
    assert [s.key for s in m.without_handshake(0.0)] == [P1]


def test_a_second_answer_before_the_next_device_read_is_not_applied_again():
    """The daemon re-asks faster than it reads the device (--interval 1): the answer
    after ours must not set the same endpoint again (another keepalive toggle and poke)
    because the device view it sees is the one from before our set."""
    m = Punch(T, daemon=True)
    m.update_device(0.0, dev(PeerView(P1)))
    only_send(m.poll(0.0))
    [a] = m.on_reply(0.1, E1.packed())
    assert isinstance(a, Apply) and a.endpoint == E1
    t = m.next_wakeup()
    only_send(m.poll(t))
    assert m.on_reply(t + 0.1, E1.packed()) == []
    assert m.counters.applied == 1 and m.counters.late == 0
    # the device read after it shows WireGuard never took it (the interface was gone):
    # the next answer sets it again
    t = m.next_wakeup()
    m.update_device(t, dev(PeerView(P1)))
    only_send(m.poll(t))
    [again] = m.on_reply(t + 0.1, E1.packed())
    assert isinstance(again, Apply) and again.reason == "no endpoint"
