"""Logging for the command lines of wg-rendezvous and wg-punch: text or JSON lines.

``configure()`` is called once from each program's ``main()``; modules only ever use
``logging.getLogger(__name__)``. Text is the classic ``TIME LEVEL MESSAGE`` line. JSON
is one object per line with ``time`` (UTC, RFC 3339 with milliseconds), ``level``,
``logger`` and ``message``, plus every structured field the call passed through
``extra=`` (see :func:`peer_fields`), so a log shipper can filter on ``peer`` or
``addr`` without parsing the text. The text form of a line never depends on its fields.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import IO, Any

from .classic import short_key

__all__ = [
    "FORMATS",
    "JsonFormatter",
    "add_argument",
    "configure",
    "fail",
    "peer_fields",
    "TEXT_FORMAT",
]

FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(message)s"

# Attributes every LogRecord has; anything else on a record came in through extra=.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message", "asctime", "taskName"}


def peer_fields(key: bytes | None = None, addr: object = None, **more: object) -> dict[str, Any]:
    """The ``extra=`` of a log call about a peer: its short key and its address.

    ``addr`` may be anything with a sensible ``str()`` (``ip:port`` text, an
    :class:`~rendezvous.classic.Endpoint`) or an ``(ip, port)`` tuple; None is left out.
    """
    fields: dict[str, Any] = {}
    if key is not None:
        fields["peer"] = short_key(key)
    if addr is not None:
        if isinstance(addr, tuple):
            host, port = addr
            addr = f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
        fields["addr"] = str(addr)
    for name, value in more.items():
        if value is not None:
            fields[name] = value if isinstance(value, (int, float, bool)) else str(value)
    return fields


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        import json  # not before the first JSON line: wg-punch's start-up counts

        out: dict[str, Any] = {
            "time": self._time(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name, value in vars(record).items():
            if name not in _STANDARD and not name.startswith("_"):
                out[name] = value  # dicts and lists stay JSON; anything else: str()
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, ensure_ascii=False, separators=(",", ":"), default=str)

    @staticmethod
    def _time(created: float) -> str:
        whole = int(created)
        ms = int((created - whole) * 1000)
        return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + f".{ms:03d}Z"


def add_argument(parser: argparse.ArgumentParser) -> None:
    """``--log-format text|json`` on PARSER."""
    parser.add_argument("--log-format", choices=FORMATS, default="text",
                        help="log lines as text (default) or as one JSON object per line, "
                             "with the peer's key and address as fields")


def configure(fmt: str = "text", verbose: bool = False, stream: IO[str] | None = None) -> None:
    """Send every log record to STREAM (stderr) in FMT; DEBUG and up with VERBOSE."""
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)


def fail(prog: str, message: str, fmt: str = "text") -> None:
    """Report a fatal error in one line: ``PROG: MESSAGE`` as text, a JSON record as json."""
    if fmt == "json":
        logging.getLogger(prog).error(message, extra={"fatal": True})
    else:
        print(f"{prog}: {message}", file=sys.stderr)
