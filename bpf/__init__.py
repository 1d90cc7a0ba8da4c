"""Classic BPF for the punch client's raw socket: an instruction model, a
``tcpdump -d`` style disassembler, the kernel's checker, an interpreter with socket
filter semantics, the reply filters, and attach/detach through cffi.

The client needs only::

    from bpf import ipv4_reply_filter, attach_filter, drain, looks_like_ipv4_reply

``python -m bpf --help`` prints the filters it would attach.
"""

from .attach import (
    SO_ATTACH_FILTER,
    SO_DETACH_FILTER,
    SO_LOCK_FILTER,
    attach_filter,
    detach_filter,
    drain,
    get_filter,
    lock_filter,
)
from .disasm import disassemble, format_c, format_decimal, format_insn
from .errors import (
    BpfAttachError,
    BpfEncodingError,
    BpfError,
    BpfUnsupportedError,
    BpfValidationError,
)
from .insn import SKF_NET_OFF, Insn, Program, decode, encode
from .interp import run
from .programs import (
    DEFAULT_MAX_PAYLOAD,
    ipv4_reply_filter,
    ipv6_reply_filter,
    looks_like_ipv4_reply,
    looks_like_ipv6_reply,
)
from .validate import is_valid, validate

__all__ = [
    "DEFAULT_MAX_PAYLOAD",
    "SKF_NET_OFF",
    "SO_ATTACH_FILTER",
    "SO_DETACH_FILTER",
    "SO_LOCK_FILTER",
    "BpfAttachError",
    "BpfEncodingError",
    "BpfError",
    "BpfUnsupportedError",
    "BpfValidationError",
    "Insn",
    "Program",
    "attach_filter",
    "decode",
    "detach_filter",
    "disassemble",
    "drain",
    "encode",
    "format_c",
    "format_decimal",
    "format_insn",
    "get_filter",
    "ipv4_reply_filter",
    "ipv6_reply_filter",
    "is_valid",
    "lock_filter",
    "looks_like_ipv4_reply",
    "looks_like_ipv6_reply",
    "run",
    "validate",
]
