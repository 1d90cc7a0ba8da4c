"""The reply filters on real raw sockets agree with the interpreter, packet by packet.

For every case of tests/bpf/packets.py the frames go over a veth pair into a
namespace holding an unfiltered and a filtered raw UDP socket. What the unfiltered
socket receives is exactly what the filter ran on; so for each packet:

- the kernel delivers to raw sockets what the case says (broken headers and lone
  fragments never arrive; fragments arrive reassembled; junk after the IP total
  length is trimmed);
- the filtered socket receives the packet iff the interpreter, run on what the
  unfiltered socket received, accepts it; and the lengths agree (truncation);
- looks_like_* agrees with both.
"""

from __future__ import annotations

import errno
import ipaddress
import secrets
import socket
from collections.abc import Iterator

import pytest

from bpf import (
    SKF_NET_OFF,
    BpfAttachError,
    detach_filter,
    get_filter,
    ipv4_reply_filter,
    ipv6_reply_filter,
    looks_like_ipv4_reply,
    looks_like_ipv6_reply,
    run,
)
from bpf.insn import ld_abs_b, ld_abs_w, ld_len, ret_a, ret_k, sub_k
from tests.bpf import packets as P
from tests.bpf.rawlab import RawLab, until

pytestmark = pytest.mark.root

MAX_PAYLOADS = (256, 0)
CASES4 = {c.name: c for c in P.ipv4_cases()}
CASES6 = {c.name: c for c in P.ipv6_cases()}


@pytest.fixture(scope="module")
def lab() -> Iterator[RawLab]:
    lab = RawLab((P.SERVER4, P.CLIENT4), (P.SERVER6, P.CLIENT6))
    try:
        yield lab
    finally:
        lab.close()


def _sentinel4() -> bytes:
    return bytes(P._ip(id=secrets.randbits(16)) / P._udp()
                 / P.Raw(b"SENTINEL" + secrets.token_bytes(8)))


def _sentinel6() -> bytes:
    return bytes(P._ip6() / P._udp() / P.Raw(b"SENTINEL" + secrets.token_bytes(8)))


@pytest.mark.parametrize("max_payload", MAX_PAYLOADS)
@pytest.mark.parametrize("name", list(CASES4))
def test_ipv4_kernel_agrees_with_interpreter(lab: RawLab, name: str, max_payload: int) -> None:
    case = CASES4[name]
    program = ipv4_reply_filter(P.SERVER4, P.SERVER_PORT, P.WG_PORT, max_payload)
    with lab.sockets(socket.AF_INET, None, program) as (plain, filtered):
        obs = lab.exchange(case.frames, _sentinel4(), plain, filtered)

    assert len(obs.unfiltered) == (1 if case.delivered else 0), obs.unfiltered
    if not case.delivered:
        assert obs.filtered == []
        return
    seen, _ = obs.unfiltered[0]
    if name.startswith("options-rr"):
        # Local delivery fills in the record-route option: compare all but the option.
        assert seen[:20] == case.model[:20] and seen[60:] == case.model[60:]
    elif name.startswith("fragments"):
        # Reassembly rebuilds the header (total length, flags, checksum): header
        # fields apart from those, and the whole payload, are as sent.
        assert seen[20:] == case.model[20:] and seen[12:20] == case.model[12:20]
        assert seen[6:8] == b"\x00\x00"
    else:
        assert seen == case.model
    want = run(program, seen)
    assert bool(want) == case.accept
    assert looks_like_ipv4_reply(seen, P.SERVER4, P.SERVER_PORT, P.WG_PORT) == case.accept
    if want:
        assert len(obs.filtered) == 1, obs.filtered
        got, _ = obs.filtered[0]
        assert len(got) == want
        assert got == seen[:want]
        assert looks_like_ipv4_reply(got, P.SERVER4, P.SERVER_PORT, P.WG_PORT)
    else:
        assert obs.filtered == []


@pytest.mark.parametrize("max_payload", MAX_PAYLOADS)
@pytest.mark.parametrize("name", list(CASES6))
def test_ipv6_kernel_agrees_with_interpreter(lab: RawLab, name: str, max_payload: int) -> None:
    case = CASES6[name]
    program = ipv6_reply_filter(P.SERVER6, P.SERVER_PORT, P.WG_PORT, max_payload)
    with lab.sockets(socket.AF_INET6, None, program) as (plain, filtered):
        obs = lab.exchange(case.frames, _sentinel6(), plain, filtered)

    assert len(obs.unfiltered) == (1 if case.delivered else 0), obs.unfiltered
    if not case.delivered:
        assert obs.filtered == []
        return
    seen, source = obs.unfiltered[0]
    prefix, udp, _ = P.split_ipv6(case.model)
    # An AF_INET6 raw socket's data starts at the UDP header, after any extension
    # headers; the source address is that of the IPv6 header.
    assert seen == udp
    assert ipaddress.IPv6Address(source) == ipaddress.IPv6Address(case.model[8:24])
    want = run(program, seen, net_prefix=prefix)
    assert bool(want) == case.accept
    assert looks_like_ipv6_reply(seen, source, P.SERVER6, P.SERVER_PORT, P.WG_PORT) \
        == case.accept
    if want:
        assert len(obs.filtered) == 1, obs.filtered
        got, got_source = obs.filtered[0]
        assert got == seen[:want] and got_source == source
    else:
        assert obs.filtered == []


# --- facts the filters rely on, measured directly -----------------------------------------

def test_ipv6_raw_filter_reads_network_header_through_skf_net_off(lab: RawLab) -> None:
    """On AF_INET6 raw sockets the data starts at the UDP header, SKF_NET_OFF+n reads
    the IPv6 header in front of it, up to the end of the packet and no further."""
    probes = {
        "version": (ld_abs_b(SKF_NET_OFF + 0), ret_a()),      # keep byte-0 bytes
        "nexthdr": (ld_abs_b(SKF_NET_OFF + 6), ret_a()),
        "pktlen-40": (ld_len(), sub_k(40), ret_a()),           # 108 - 40 if from UDP
        "last-word": (ld_abs_w(SKF_NET_OFF + 40 + 108 - 4), ret_k(0xFFFF)),
        "past-end": (ld_abs_w(SKF_NET_OFF + 40 + 108 - 3), ret_k(0xFFFF)),
    }
    pkt = bytes(P._ip6() / P._udp() / P.Raw(b"p" * 100))
    sentinel = bytes(P._ip6() / P._udp(sport=40000) / P.Raw(b"s" * 200))
    with lab.sockets(socket.AF_INET6, *probes.values()) as socks:
        with lab.pinned():
            lab.send(pkt)
            lab.send(sentinel)
        got = {name: [d for d, _ in until(s, lambda d: d[:2] == sentinel[40:42])]
               for name, s in zip(probes, socks, strict=True)}
    assert got == {
        "version": [pkt[40:40 + 0x60]],
        "nexthdr": [pkt[40:40 + 17]],
        "pktlen-40": [pkt[40:40 + 68]],
        "last-word": [pkt[40:]],
        "past-end": [],
    }


def test_attached_filter_reads_back_identical(lab: RawLab) -> None:
    prog = ipv4_reply_filter(P.SERVER4, P.SERVER_PORT, P.WG_PORT)
    with lab.sockets(socket.AF_INET, prog) as (s,):
        assert get_filter(s) == prog
        detach_filter(s)
        assert get_filter(s) == ()
        with pytest.raises(BpfAttachError) as e:
            detach_filter(s)
        assert e.value.errno == errno.ENOENT and "no filter is attached" in str(e.value)
