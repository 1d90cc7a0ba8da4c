"""build_state: the machine's view turned into the state file's, times made unix."""

from __future__ import annotations

from punch.machine import DeviceView, PeerView, Punch, Timing
from punch.observe import build_state
from rendezvous.classic import Endpoint

ME, P1, P2 = b"M" * 32, b"1" * 32, b"2" * 32


def test_build_state_from_a_driven_machine():
    m = Punch(Timing(), daemon=True)
    m.update_device(100.0, DeviceView(ME, (PeerView(P1), PeerView(P2))))
    [send] = m.poll(100.0)
    first = send.peer
    second = P2 if first == P1 else P1
    m.on_reply(100.1, Endpoint("198.51.100.4", 4444).packed())
    [send] = m.poll(100.2)
    assert send.peer == second
    m.on_reply(100.3, b"")  # not found
    state = build_state(m, interface="wg0", pid=7, daemon=True, server="192.0.2.1:49918",
                        started=5000.0, last_reply=100.3, mono_now=101.0, wall_now=6001.0)
    assert state.mode == "daemon" and state.ended is None and state.updated == 6001.0
    assert state.last_reply == 6000.3
    a, b = state.peers[first], state.peers[second]
    assert (a.status, a.answer, a.answer_found, a.answered_at, a.applied, a.applied_at) == (
        "applied", "198.51.100.4:4444", True, 6000.1, "198.51.100.4:4444", 6000.1)
    assert (b.status, b.answer, b.answer_found, b.answered_at, b.applied) == (
        "not found", None, False, 6000.3, None)
    ended = build_state(m, interface="wg0", pid=7, daemon=False, server="s", started=1.0,
                        last_reply=None, mono_now=101.0, wall_now=6001.0, ended=True)
    assert ended.mode == "once" and ended.ended == 6001.0 and ended.last_reply is None


def test_a_peer_never_answered_has_no_answer_fields():
    m = Punch(Timing())
    m.update_device(0.0, DeviceView(ME, (PeerView(P1),)))
    m.poll(0.0)
    state = build_state(m, interface="wg0", pid=1, daemon=False, server="s", started=0.0,
                        last_reply=None, mono_now=0.5, wall_now=10.0)
    rec = state.peers[P1]
    assert rec.status == "asking" and rec.answer_found is None and rec.answered_at is None


def test_build_state_carries_the_v2_peer_verdict_and_ours():
    from punch.v2machine import PunchV2
    from rendezvous.v2.wire import Endpoint as Ep
    from rendezvous.v2.wire import NotifyBody

    ids = iter(range(1, 100))
    m = PunchV2(Timing(), families=(4,), nat=0x04, randbits=lambda n: next(ids))
    m.update_device(0.0, DeviceView(ME, (PeerView(P1), PeerView(P2))))
    [send, _] = m.poll(0.0, 10**18)
    assert send.body.nat == 0x04  # every request carries our verdict
    m.on_notify(0.1, NotifyBody(5, P1, (Ep("198.51.100.4", 4444),), peer_nat=0x12), 4)
    assert m.peers[P1].peer_nat == 0x12
    state = build_state(m, interface="wg0", pid=1, daemon=False, server="s", started=0.0,
                        last_reply=None, mono_now=0.5, wall_now=10.0,
                        nat="address-and-port-dependent")
    assert state.nat == "address-and-port-dependent"
    assert state.peers[P1].nat == "endpoint-independent+port-preserved"
    assert state.peers[P2].nat == "unknown"


def test_build_state_carries_when_our_nat_was_checked_in_unix_time():
    m = Punch(Timing())
    m.update_device(0.0, DeviceView(ME, (PeerView(P1),)))
    state = build_state(m, interface="wg0", pid=1, daemon=True, server="s", started=0.0,
                        last_reply=None, mono_now=100.0, wall_now=5000.0,
                        nat="endpoint-independent", nat_checked=70.0, nat_checks=2,
                        nat_changes=1)
    assert (state.nat_checked, state.nat_checks, state.nat_changes) == (4970.0, 2, 1)
    never = build_state(m, interface="wg0", pid=1, daemon=True, server="s", started=0.0,
                        last_reply=None, mono_now=100.0, wall_now=5000.0)
    assert (never.nat_checked, never.nat_checks, never.nat_changes) == (None, 0, 0)
