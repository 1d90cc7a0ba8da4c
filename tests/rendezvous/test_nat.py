"""The NAT verdict byte (rendezvous/nat.py): every value round-trips, unknown and
reserved bits are read laxly, and the tokens are the ones docs/PROTOCOL.md lists."""

from __future__ import annotations

import pytest

from rendezvous.nat import PORT_PRESERVED, UNKNOWN, Mapping, NatVerdict, nat_name

# (byte, token) as docs/PROTOCOL.md, "NAT verdicts", defines them
TABLE = [
    (0x00, "unknown"),
    (0x01, "none"),
    (0x11, "none"),  # no NAT keeps the port by definition: the bit adds nothing to the token
    (0x02, "endpoint-independent"),
    (0x12, "endpoint-independent+port-preserved"),
    (0x03, "address-dependent"),
    (0x13, "address-dependent+port-preserved"),
    (0x04, "address-and-port-dependent"),
    (0x14, "address-and-port-dependent+port-preserved"),
]


@pytest.mark.parametrize(("byte", "token"), TABLE)
def test_tokens(byte: int, token: str) -> None:
    assert nat_name(byte) == token
    assert NatVerdict.from_byte(byte).to_byte() == byte


def test_every_mapping_and_bit_round_trips() -> None:
    for m in Mapping:
        if m is Mapping.UNKNOWN:
            continue
        for kept in (False, True):
            v = NatVerdict(m, kept)
            assert NatVerdict.from_byte(v.to_byte()) == v
            assert v.to_byte() & 0x0F == int(m) and bool(v.to_byte() & PORT_PRESERVED) == kept


def test_reserved_bits_and_unknown_mappings_read_laxly() -> None:
    assert NatVerdict.from_byte(0xE2) == NatVerdict(Mapping.ENDPOINT_INDEPENDENT, False)
    for value in (0x05, 0x0F, 0x15, 0x10, 0xF0):  # a newer sender's mapping, or none at all
        assert NatVerdict.from_byte(value) is UNKNOWN
    with pytest.raises(ValueError, match="nat byte must be 0..255, got 256"):
        NatVerdict.from_byte(256)


def test_easy_and_hard() -> None:
    assert Mapping.NONE.easy and Mapping.ENDPOINT_INDEPENDENT.easy
    assert Mapping.ADDRESS_DEPENDENT.easy is False
    assert Mapping.ADDRESS_AND_PORT_DEPENDENT.easy is False
    assert Mapping.UNKNOWN.easy is None


def test_text() -> None:
    assert str(NatVerdict(Mapping.ENDPOINT_INDEPENDENT, True)) == (
        "endpoint-independent mapping, port preserved")
    assert str(NatVerdict(Mapping.ADDRESS_AND_PORT_DEPENDENT, False)) == (
        "address-and-port-dependent mapping (symmetric), port not preserved")
    assert str(NatVerdict(Mapping.NONE, True)) == "no NAT"
    assert str(UNKNOWN) == "unknown"
