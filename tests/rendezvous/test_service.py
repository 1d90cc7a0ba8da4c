from rendezvous.classic import ZERO_KEY
from rendezvous.service import Config, Service

A, B = b"A" * 32, b"B" * 32
SRC_A = bytes([198, 51, 100, 1]) + (40000).to_bytes(2, "big")
SRC_B = bytes([203, 0, 113, 9]) + (51820).to_bytes(2, "big")


def svc(**kw) -> Service:
    return Service(Config(**{"rate": 0, **kw}))


def test_unknown_peer_gets_empty_reply_and_registers_sender():
    s = svc()
    assert s.handle(A + B, SRC_A, 0.0) == b""
    assert s.handle(B + A, SRC_B, 1.0) == SRC_A
    assert s.handle(A + B, SRC_A, 2.0) == SRC_B
    assert s.snapshot()["found"] == 2 and s.snapshot()["not_found"] == 1


def test_self_lookup_returns_own_endpoint():
    assert svc().handle(A + A, SRC_A, 0.0) == SRC_A


def test_zero_my_key_registers_nothing_and_gets_no_reply():
    s = svc()
    assert s.handle(ZERO_KEY + B, SRC_A, 0.0) is None
    assert s.handle(ZERO_KEY + ZERO_KEY, SRC_A, 0.0) is None
    assert len(s.registry) == 0
    assert s.snapshot()["dropped_zero_key"] == 2


def test_lookup_of_zero_key_is_not_found():
    assert svc().handle(A + ZERO_KEY, SRC_A, 0.0) == b""


def test_other_lengths_dropped_and_counted():
    s = svc()
    for n in (0, 1, 63, 65, 96, 1500):
        assert s.handle(bytes([1]) * n, SRC_A, 0.0) is None
    assert s.snapshot()["dropped_length"] == 6 and len(s.registry) == 0


def test_rate_limited_sources_get_nothing():
    s = Service(Config(rate=1, burst=2))
    assert s.handle(A + B, SRC_A, 0.0) == b""
    assert s.handle(A + B, SRC_A, 0.0) == b""
    assert s.handle(A + B, SRC_A, 0.0) is None
    assert s.handle(B + A, SRC_B, 0.0) == SRC_A  # another source is unaffected
    assert s.snapshot()["rate_limited"] == 1


def test_reply_never_longer_than_request():
    s = svc()
    s.handle(B + B, SRC_B, 0.0)
    reply = s.handle(A + B, SRC_A, 0.0)
    assert reply is not None and len(reply) <= 64


def test_probe_answers_self_lookups_with_the_source_and_registers_nothing():
    s = svc()
    assert s.probe(A + A, SRC_A, 0.0) == SRC_A
    assert len(s.registry) == 0
    assert s.handle(B + A, SRC_B, 1.0) == b""  # A probed only: unknown on the usual port
    assert s.probe(A + B, SRC_A, 2.0) is None  # not a self-lookup: no answer
    assert s.probe(ZERO_KEY + ZERO_KEY, SRC_A, 2.0) is None
    assert s.probe(b"x" * 63, SRC_A, 2.0) is None
    snap = s.snapshot()
    assert (snap["probes"], snap["probe_refused"], snap["dropped_length"]) == (1, 2, 1)


def test_probe_keeps_the_rate_limit_and_the_protocol_switches():
    s = Service(Config(rate=1, burst=1))
    assert s.probe(A + A, SRC_A, 0.0) == SRC_A
    assert s.probe(A + A, SRC_A, 0.0) is None and s.snapshot()["rate_limited"] == 1
    off = svc(classic=False)
    assert off.probe(A + A, SRC_A, 0.0) is None and off.snapshot()["dropped_classic_off"] == 1
    six = bytes(15) + b"\x01" + (5000).to_bytes(2, "big")
    assert svc().probe(A + A, six, 0.0) is None
    assert svc().probe(b"wgp\x02" + bytes(112), SRC_A, 0.0) is None  # v2 without a key
