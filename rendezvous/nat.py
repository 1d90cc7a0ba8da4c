"""The NAT verdict byte of protocol v2 (docs/PROTOCOL.md, "NAT verdicts"): what a client
measured about its own NAT (``wg-punch netcheck``), carried in the request's ``nat``
byte and forwarded to its peers as ``peer_nat``.

Pure, shared by the server (which only stores and forwards the byte) and the client
(which measures it and explains it). Layout::

    bits 0-3  mapping: 0 unknown, 1 none (no NAT), 2 endpoint-independent,
              3 address-dependent, 4 address-and-port-dependent ("symmetric")
    bit  4    port preserved: the public port is WireGuard's own port
    bits 5-7  reserved: zero when sent, ignored when read

A mapping value this code does not know (a newer sender's) reads as unknown.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

__all__ = ["PORT_PRESERVED", "UNKNOWN", "Mapping", "NatVerdict", "nat_name"]

PORT_PRESERVED = 0x10
_MAPPING_MASK = 0x0F


class Mapping(IntEnum):
    """How the NAT maps one local address:port to public ones (RFC 4787, section 4.1)."""

    UNKNOWN = 0
    NONE = 1                        # no NAT: the server saw our own address and port
    ENDPOINT_INDEPENDENT = 2        # one public mapping for every destination
    ADDRESS_DEPENDENT = 3           # a new mapping per destination address
    ADDRESS_AND_PORT_DEPENDENT = 4  # a new mapping per destination address and port

    @property
    def token(self) -> str:
        """A short stable name (state file, JSON, metrics labels)."""
        return self.name.lower().replace("_", "-")

    @property
    def easy(self) -> bool | None:
        """Does a peer see one predictable endpoint of ours? None: not known."""
        if self is Mapping.UNKNOWN:
            return None
        return self in (Mapping.NONE, Mapping.ENDPOINT_INDEPENDENT)


@dataclass(frozen=True)
class NatVerdict:
    mapping: Mapping = Mapping.UNKNOWN
    port_preserved: bool = False

    def to_byte(self) -> int:
        return int(self.mapping) | (PORT_PRESERVED if self.port_preserved else 0)

    @classmethod
    def from_byte(cls, value: int) -> NatVerdict:
        if not 0 <= value <= 0xFF:
            raise ValueError(f"nat byte must be 0..255, got {value!r}")
        try:
            mapping = Mapping(value & _MAPPING_MASK)
        except ValueError:
            mapping = Mapping.UNKNOWN
        if mapping is Mapping.UNKNOWN:
            return UNKNOWN
        return cls(mapping, bool(value & PORT_PRESERVED))

    @property
    def token(self) -> str:
        """e.g. ``endpoint-independent+port-preserved``, ``none``, ``unknown``."""
        keep = self.port_preserved and self.mapping not in (Mapping.NONE, Mapping.UNKNOWN)
        return self.mapping.token + ("+port-preserved" if keep else "")

    def __str__(self) -> str:
        m = self.mapping
        text = {Mapping.UNKNOWN: "unknown",
                Mapping.NONE: "no NAT",
                Mapping.ENDPOINT_INDEPENDENT: "endpoint-independent mapping",
                Mapping.ADDRESS_DEPENDENT: "address-dependent mapping",
                Mapping.ADDRESS_AND_PORT_DEPENDENT:
                    "address-and-port-dependent mapping (symmetric)"}[m]
        if m not in (Mapping.NONE, Mapping.UNKNOWN):
            text += ", port preserved" if self.port_preserved else ", port not preserved"
        return text


UNKNOWN = NatVerdict()


def nat_name(value: int) -> str:
    """The token of a nat byte as received (any value 0..255)."""
    return NatVerdict.from_byte(value & 0xFF).token
