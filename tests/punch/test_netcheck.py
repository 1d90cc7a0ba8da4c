"""The pure NAT verdict (punch/netcheck.py) on crafted observations: every class, lost
probes, IPv6 and IPv4-mapped forms, what each verdict means for peers, and when a
daemon checks again."""

from __future__ import annotations

import pytest

from punch.netcheck import (
    Observations,
    Recheck,
    advice,
    decide,
    pair_advice,
    relay_at_once,
    replacing,
)
from rendezvous.nat import Mapping, NatVerdict

LOCAL = ("192.168.1.2", 51820)
PUB = "203.0.113.2"


def obs(primary, port=None, address=None, probed=False, local=LOCAL) -> Observations:
    return Observations(local, primary, port, address, address_probed=probed)


CASES = [
    # (observations, mapping, port preserved, public)
    (obs(LOCAL, LOCAL), Mapping.NONE, True, LOCAL),
    (obs(LOCAL, None), Mapping.NONE, True, LOCAL),  # no NAT is known from the primary alone
    (obs((PUB, 51820), (PUB, 51820)), Mapping.ENDPOINT_INDEPENDENT, True, (PUB, 51820)),
    (obs((PUB, 40001), (PUB, 40001)), Mapping.ENDPOINT_INDEPENDENT, False, (PUB, 40001)),
    (obs((PUB, 51820), (PUB, 51820), (PUB, 51820), probed=True),
     Mapping.ENDPOINT_INDEPENDENT, True, (PUB, 51820)),
    (obs((PUB, 51820), (PUB, 51820), (PUB, 40002), probed=True),
     Mapping.ADDRESS_DEPENDENT, True, (PUB, 51820)),
    (obs((PUB, 51820), (PUB, 51820), ("203.0.113.9", 51820), probed=True),  # paired pooling
     Mapping.ADDRESS_DEPENDENT, True, (PUB, 51820)),
    (obs((PUB, 51820), (PUB, 33333)), Mapping.ADDRESS_AND_PORT_DEPENDENT, True, (PUB, 51820)),
    (obs((PUB, 2000), (PUB, 2001), (PUB, 2002), probed=True),
     Mapping.ADDRESS_AND_PORT_DEPENDENT, False, (PUB, 2000)),
    (obs((PUB, 2000), ("203.0.113.3", 2000)), Mapping.ADDRESS_AND_PORT_DEPENDENT, False,
     (PUB, 2000)),
    (obs(None, (PUB, 51820)), Mapping.UNKNOWN, False, None),
    (obs((PUB, 51820), None), Mapping.UNKNOWN, False, (PUB, 51820)),
    # IPv6 without NAT66; the server writes IPv4 as ::ffff:a.b.c.d in v2
    (obs(("2001:db8:a::2", 51820), ("2001:db8:a:0::2", 51820), local=("2001:db8:a::2", 51820)),
     Mapping.NONE, True, ("2001:db8:a::2", 51820)),
    (obs(("::ffff:203.0.113.2", 51820), (PUB, 51820)), Mapping.ENDPOINT_INDEPENDENT, True,
     (PUB, 51820)),
]


@pytest.mark.parametrize(("o", "mapping", "kept", "public"), CASES)
def test_verdicts(o: Observations, mapping: Mapping, kept: bool, public) -> None:
    v = decide(o)
    assert v.nat.mapping is mapping, v.reason
    assert v.public == public
    if mapping is not Mapping.UNKNOWN:
        assert v.nat.port_preserved is kept
        assert v.code == int(mapping) | (0x10 if kept else 0)
    else:
        assert v.code == 0


def test_reasons_name_what_was_seen() -> None:
    assert decide(obs(None)).reason == "no reply from the server's port to the probe"
    assert "--probe-port" in decide(obs((PUB, 51820))).reason
    v = decide(obs((PUB, 51820), (PUB, 33333)))
    assert "203.0.113.2:51820" in v.reason and "203.0.113.2:33333" in v.reason
    # Without a second address, the verdict says it compared ports only.
    assert decide(obs((PUB, 1), (PUB, 1))).reason.endswith("at two ports")
    assert not decide(obs((PUB, 1), (PUB, 1))).addresses_compared
    lost = decide(obs((PUB, 1), (PUB, 1), None, probed=True))
    assert "second address did not answer" in lost.reason and not lost.addresses_compared
    both = decide(obs((PUB, 1), (PUB, 1), (PUB, 1), probed=True))
    assert both.addresses_compared and "two ports and two addresses" in both.reason


def test_advice_per_class() -> None:
    eim = NatVerdict(Mapping.ENDPOINT_INDEPENDENT, True)
    sym = NatVerdict(Mapping.ADDRESS_AND_PORT_DEPENDENT, False)
    assert "any peer that is not behind a symmetric NAT" in advice(eim)
    assert "WireGuard's own" in advice(eim)
    assert "WireGuard's own" not in advice(NatVerdict(Mapping.ENDPOINT_INDEPENDENT, False))
    assert advice(sym).startswith("symmetric:") and "relay" in advice(sym)
    assert advice(NatVerdict(Mapping.ADDRESS_DEPENDENT, True)).startswith("address-dependent")
    assert advice(NatVerdict(Mapping.NONE, True)).startswith("no NAT")
    assert advice(NatVerdict()).startswith("unknown")


def test_pair_advice() -> None:
    none, eim = NatVerdict(Mapping.NONE, True), NatVerdict(Mapping.ENDPOINT_INDEPENDENT, True)
    sym = NatVerdict(Mapping.ADDRESS_AND_PORT_DEPENDENT, False)
    adm = NatVerdict(Mapping.ADDRESS_DEPENDENT, False)
    assert pair_advice(eim, none).startswith("direct (")
    assert pair_advice(sym, eim) == pair_advice(eim, sym)
    assert "spray" in pair_advice(sym, eim)
    assert pair_advice(sym, adm).startswith("a relay")
    assert pair_advice(NatVerdict(), eim).startswith("unknown")


@pytest.mark.parametrize(("mine", "theirs", "want"), [
    (0x04, 0x04, True),    # symmetric (address and port dependent) both sides
    (0x03, 0x04, True),    # address dependent is as hard
    (0x14, 0x03, True),    # port preservation does not make a per-destination NAT easy
    (0x12, 0x04, False),   # one easy side: the spray can still work
    (0x01, 0x04, False),   # no NAT on one side
    (0x00, 0x04, False),   # unknown: wait for the direct attempt's deadline
    (0x04, 0x00, False),
])
def test_relay_at_once_only_when_both_nats_are_hard(mine, theirs, want):
    assert relay_at_once(mine, theirs) is want


# -- when a daemon checks again ----------------------------------------------------------


def test_recheck_waits_for_a_stuck_peer_then_backs_off_and_starts_over_on_a_change():
    r = Recheck(after=30, every=1800)
    assert not r.due(0, None)  # not before the check at start
    r.start(0)
    assert not r.due(100, None)  # nobody waits for a handshake
    assert not r.due(100, 71)    # stuck for 29 s
    assert r.due(100, 70)        # stuck for 30 s
    r.checked(100, changed=False)
    assert not r.due(159, 70) and r.due(160, 70)  # then 60 s apart
    r.checked(160, changed=False)
    assert not r.due(279, 70) and r.due(280, 70)  # 120
    for t in (280, 520, 1000):
        r.checked(t, changed=False)
    assert r.gap == 480  # at most 16 x after
    r.checked(1000, changed=True)
    assert r.due(1030, 70)  # a change starts the spacing over


def test_recheck_spacing_starts_over_once_no_peer_waits_and_runs_periodically():
    r = Recheck(after=30, every=1800)
    r.start(0)
    r.checked(40, changed=False)
    r.checked(100, changed=False)
    assert r.gap == 120
    assert not r.due(110, None)  # the tunnel came up meanwhile
    assert r.gap == 30
    assert r.due(130, 100)
    r.checked(130, changed=False)
    assert not r.due(1929, None) and r.due(1930, None)  # every 30 min anyway


def test_recheck_times_must_be_positive():
    with pytest.raises(ValueError, match="positive"):
        Recheck(after=0)


def test_a_check_again_replaces_the_verdict_only_with_another_known_one():
    easy = decide(Observations(LOCAL, (PUB, 51820), (PUB, 51820)))
    hard = decide(Observations(LOCAL, (PUB, 40001), (PUB, 40002)))
    silent = decide(Observations(LOCAL, None))
    assert replacing(easy, hard) is hard and replacing(None, easy) is easy
    assert replacing(easy, easy) is None and replacing(easy, None) is None
    assert replacing(easy, silent) is None and replacing(None, silent) is None
