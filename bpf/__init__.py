"""Classic BPF for the punch client's raw socket: an instruction model, a
``tcpdump -d`` style disassembler, the kernel's checker, an interpreter with socket
filter semantics, the reply filters, and attach/detach through cffi.

The client needs only::

    from bpf import ipv4_reply_filter, attach_filter, drain, looks_like_ipv4_reply

``python -m bpf --help`` prints the filters it would attach.

Submodules load on first use (PEP 562): the client, which must send its first
request fast, pays only for the programs it builds, not for the disassembler,
interpreter or cffi.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_WHERE = {
    "SO_ATTACH_FILTER": "attach",
    "SO_DETACH_FILTER": "attach",
    "SO_LOCK_FILTER": "attach",
    "attach_filter": "attach",
    "detach_filter": "attach",
    "drain": "attach",
    "get_filter": "attach",
    "lock_filter": "attach",
    "disassemble": "disasm",
    "format_c": "disasm",
    "format_decimal": "disasm",
    "format_insn": "disasm",
    "BpfAttachError": "errors",
    "BpfEncodingError": "errors",
    "BpfError": "errors",
    "BpfUnsupportedError": "errors",
    "BpfValidationError": "errors",
    "SKF_NET_OFF": "insn",
    "Insn": "insn",
    "Program": "insn",
    "decode": "insn",
    "encode": "insn",
    "run": "interp",
    "DEFAULT_MAX_PAYLOAD": "programs",
    "ipv4_reply_filter": "programs",
    "ipv6_reply_filter": "programs",
    "looks_like_ipv4_reply": "programs",
    "looks_like_ipv6_reply": "programs",
}

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

# Eager: "validate" names both a submodule and its function; importing the submodule
# binds the package attribute to the module unless the function is bound here first.
from .validate import is_valid, validate  # noqa: E402

if TYPE_CHECKING:
    from .attach import SO_ATTACH_FILTER, SO_DETACH_FILTER, SO_LOCK_FILTER, attach_filter, detach_filter, drain, get_filter, lock_filter
    from .disasm import disassemble, format_c, format_decimal, format_insn
    from .errors import BpfAttachError, BpfEncodingError, BpfError, BpfUnsupportedError, BpfValidationError
    from .insn import SKF_NET_OFF, Insn, Program, decode, encode
    from .interp import run
    from .programs import DEFAULT_MAX_PAYLOAD, ipv4_reply_filter, ipv6_reply_filter, looks_like_ipv4_reply, looks_like_ipv6_reply


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
