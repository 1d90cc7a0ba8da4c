"""rendezvous.v2.replay: newer always passes; reordered within the window passes once."""

from __future__ import annotations

import random

from rendezvous.v2.replay import EMPTY, RECENT_MAX, REORDER_WINDOW_NS, accepts, record

T = 1_700_000_000 * 10**9
MS = 1_000_000


def accept_all(stamps):
    w, out = EMPTY, []
    for ts in stamps:
        ok = accepts(w, ts)
        out.append(ok)
        if ok:
            w = record(w, ts)
    return w, out


def test_newer_is_accepted_and_the_same_twice_is_not():
    w, ok = accept_all([T, T + 1, T + 1, T])
    assert ok == [True, True, False, False]
    assert w[0] == T + 1


def test_a_reordered_pair_is_accepted_once_each():
    # the IPv4 request (sent second) overtakes the IPv6 one (sent first)
    w, ok = accept_all([T + 2 * MS, T + 1 * MS, T + 1 * MS, T + 2 * MS])
    assert ok == [True, True, False, False]


def test_older_than_the_window_is_refused():
    _, ok = accept_all([T, T - REORDER_WINDOW_NS, T - REORDER_WINDOW_NS + 1])
    assert ok == [True, False, True]


def test_forgotten_timestamps_raise_the_floor():
    # the newest, then RECENT_MAX + 1 older ones inside the window, newest first
    stamps = [T + (RECENT_MAX + 1 - i) * MS for i in range(RECENT_MAX + 2)]
    w, ok = accept_all(stamps)
    assert all(ok)
    newest, recent, floor = w
    assert newest == stamps[0] and len(recent) == RECENT_MAX
    assert floor == stamps[-1] == min(recent) - MS  # the one forgotten
    # every timestamp ever accepted is refused from now on, the forgotten one included,
    # and so is anything under the floor: the price of bounded memory
    assert not any(accepts(w, ts) for ts in stamps)
    assert not accepts(w, floor - 1)
    assert accepts(w, newest + 1)


def test_random_orders_never_accept_a_duplicate():
    rng = random.Random(7)
    for _ in range(300):
        base = [T + rng.randrange(0, 3 * REORDER_WINDOW_NS // MS) * MS for _ in range(30)]
        stream = base + rng.choices(base, k=30)  # replays mixed in
        rng.shuffle(stream)
        w, seen = EMPTY, set()
        for ts in stream:
            if accepts(w, ts):
                assert ts not in seen, "a timestamp was accepted twice"
                seen.add(ts)
                w = record(w, ts)
            else:
                # refused: a duplicate, too old for the window, or under the floor
                assert ts in seen or ts <= w[0] - REORDER_WINDOW_NS or ts <= w[2]
