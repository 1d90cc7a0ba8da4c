"""Prometheus metrics for wg-rendezvous (``--metrics ADDR:PORT``), and the listener
that wg-punch shares.

Nothing is counted twice: the collector reads the service's own counters
(:meth:`rendezvous.service.Service.snapshot`) and the server's at scrape time, on the
HTTP server's thread. The event loop stays single-threaded and lock-free; a scrape
only reads ints (atomic under the GIL).

Snapshot keys become metrics by rule, so a counter added to ``snapshot()`` later (v2
notifications, relays, ...) is exported without touching this module:

- ``found``, ``not_found``: ``requests_total{type="classic",result=...}``;
  ``<type>_found``, ``<type>_not_found``: ``requests_total{type="<type>",result=...}``
- ``dropped_<reason>``: ``dropped_total{reason="<reason>"}``
- ``notify_<result>``: ``notifications_total{result="<result>"}``
- ``rate_limited``, ``evicted``, ``expired``, ``send_failed``: ``rate_limited_total``,
  ``evictions_total``, ``expiries_total``, ``send_failures_total``
- ``peers`` (the table size), any key in :data:`GAUGES` or ending in ``_active``: a
  gauge named after the key
- ``requests``: left out (it is the sum of the ``requests_total`` series)
- any other key: a counter ``<key>_total``

Every name starts with ``wgpunch_rendezvous_``.

prometheus-client is optional: it is imported only once metrics are started, and a
missing one is reported clearly (:class:`MetricsUnavailable`, exit status 2).
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .server import Server

__all__ = [
    "GAUGES",
    "PREFIX",
    "Exporter",
    "MetricsError",
    "MetricsUnavailable",
    "Sample",
    "ServiceCollector",
    "add_argument",
    "metric_for",
    "parse_address",
    "server_stats",
    "start",
    "start_exporter",
]

log = logging.getLogger(__name__)

PREFIX = "wgpunch_rendezvous_"
GAUGES = frozenset({"peers", "rate_buckets", "relays", "consents", "store_up",
                    "v2_peers", "v2_asks", "v2_keys_cached", "v2_keys_ready"})
SKIP = frozenset({"requests"})

_RENAMED = {
    "rate_limited": "rate_limited",
    "evicted": "evictions",
    "expired": "expiries",
    "send_failed": "send_failures",
}
_REQUEST = re.compile(r"^(?P<type>[a-z0-9]+_)??(?P<result>found|not_found)$")
_LABELLED = {  # prefix -> (metric, label)
    "dropped_": ("dropped", "reason"),
    "notify_": ("notifications", "result"),
}
_HELP = {
    "requests": "Well-formed requests answered, by protocol type and result.",
    "dropped": "Datagrams dropped without a reply, by reason.",
    "notifications": "Notifications to clients, by result.",
    "peers": "Keys in the registry (table size).",
    "v2_peers": "v2 clients registered (table size).",
    "v2_asks": "v2 asks held (a client asking for a peer not registered yet).",
    "v2_keys_cached": "v2 clients whose derived keys are cached (both levels).",
    "v2_keys_ready": "v2 clients whose ready AEAD objects are cached (the first level).",
    "rate_limited": "Datagrams dropped because their source was over its rate limit.",
    "evictions": "Keys evicted because the table was full (least recently refreshed).",
    "expiries": "Keys forgotten because they were not refreshed within --ttl.",
    "send_failures": "Replies the kernel refused to send.",
    "store_up": "1 while the shared store (--store) answers, 0 during an outage.",
    "store_unavailable": "Requests answered from this server's own tables: store down.",
    "notices_received": "Notifications other servers handed to this one to send.",
}


class MetricsError(Exception):
    """--metrics cannot be served; the message is one line."""

    exit_code = 1


class MetricsUnavailable(MetricsError):
    """prometheus-client is not installed."""

    exit_code = 2


@dataclass(frozen=True)
class Sample:
    """Where one snapshot key goes: metric name (without the prefix), kind, labels."""

    name: str
    kind: str  # "counter" | "gauge"
    labels: tuple[tuple[str, str], ...] = ()


def metric_for(key: str) -> Sample | None:
    """The metric a snapshot KEY is exported as (see the module's table); None: left out."""
    if key in SKIP:
        return None
    for prefix, (name, label) in _LABELLED.items():
        if key.startswith(prefix) and len(key) > len(prefix):
            return Sample(name, "counter", ((label, key[len(prefix):]),))
    m = _REQUEST.match(key)
    if m:
        kind = m.group("type")
        return Sample("requests", "counter",
                      (("type", kind[:-1] if kind else "classic"), ("result", m.group("result"))))
    if key in GAUGES or key.endswith("_active"):
        return Sample(key, "gauge")
    return Sample(_RENAMED.get(key, key), "counter")


def server_stats(server: Server) -> dict[str, int]:
    """The service's snapshot plus the server's own counters (what the stats log shows)."""
    stats = server.service.snapshot()
    stats["send_failed"] = server.send_failed
    if server.service.store is not None:
        stats["notify_published"] = server.notify_published
        stats["notices_received"] = server.notices_received
    return stats


class ServiceCollector:
    """A prometheus-client collector over a ``() -> {key: int}`` source, read per scrape."""

    def __init__(self, source: Callable[[], Mapping[str, int]], prefix: str = PREFIX) -> None:
        self.source = source
        self.prefix = prefix
        self._help = dict(_HELP)

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        families: dict[tuple[str, str, tuple[str, ...]], Any] = {}
        for key, value in self.source().items():
            sample = metric_for(key)
            if sample is None:
                continue
            names = tuple(n for n, _ in sample.labels)
            fam = families.get((sample.name, sample.kind, names))
            if fam is None:
                cls = CounterMetricFamily if sample.kind == "counter" else GaugeMetricFamily
                doc = self._help.get(sample.name, f"{sample.name.replace('_', ' ')} "
                                     f"(from the service's counters)")
                fam = cls(self.prefix + sample.name, doc, labels=list(names))
                families[(sample.name, sample.kind, names)] = fam
            fam.add_metric([v for _, v in sample.labels], value)
        yield from families.values()

    def describe(self) -> Iterable[Any]:
        return []  # the set of metrics follows the snapshot: nothing to pre-register


def parse_address(text: str) -> tuple[str, int]:
    """``ADDR:PORT`` or ``[IPV6]:PORT`` to (address, port); port 0 picks a free one."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f"metrics address must be ADDR:PORT, got {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"metrics address {host!r} is not an IP address") from None
    try:
        port = int(port_text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise ValueError(f"metrics port must be 0..65535, got {port_text!r}")
    return str(addr), port


def _address(text: str) -> tuple[str, int]:
    try:
        return parse_address(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_argument(parser: argparse.ArgumentParser, default_port: int = 9477) -> None:
    """``--metrics ADDR:PORT`` on PARSER (off by default)."""
    parser.add_argument("--metrics", type=_address, metavar="ADDR:PORT",
                        help=f"serve Prometheus metrics over HTTP at ADDR:PORT/metrics, e.g. "
                             f"127.0.0.1:{default_port} (port 0 picks a free one; needs "
                             f"prometheus-client; default off)")


@dataclass
class Exporter:
    """A running metrics listener; :meth:`close` stops it."""

    address: tuple[str, int]
    _httpd: Any

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://[{host}]:{port}/metrics" if ":" in host else f"http://{host}:{port}/metrics"

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


def start_exporter(address: tuple[str, int], collectors: Iterable[Any],
                   process: bool = True) -> Exporter:
    """Serve COLLECTORS (and the process's own metrics) on ADDRESS from a thread."""
    try:
        from prometheus_client import CollectorRegistry, ProcessCollector, start_http_server
    except ImportError:
        raise MetricsUnavailable("--metrics needs the prometheus-client package "
                                 "(pip install prometheus-client)") from None
    registry = CollectorRegistry(auto_describe=False)
    if process:
        ProcessCollector(registry=registry)
    for c in collectors:
        registry.register(c)
    host, port = address
    try:
        httpd, _thread = start_http_server(port, host, registry=registry)
    except OSError as e:
        raise MetricsError(f"cannot serve metrics on {host}:{port}: {e.strerror}") from None
    bound = httpd.server_address
    exporter = Exporter((host, int(bound[1])), httpd)
    log.info("metrics on %s", exporter.url, extra={"addr": f"{host}:{bound[1]}"})
    return exporter


def start(address: tuple[str, int] | None, server: Server) -> Exporter | None:
    """wg-rendezvous: serve SERVER's metrics at ADDRESS (None: metrics are off)."""
    if address is None:
        return None
    return start_exporter(address, [ServiceCollector(lambda: server_stats(server))])
