"""Prometheus metrics for wg-punch (``--metrics ADDR:PORT``, mostly for ``--daemon``).

A collector that reads the client at scrape time, on the HTTP server's thread: the
machine's counters, the device as the loop last read it (an immutable
:class:`punch.wg.Device`), and the time of the server's last reply. The loop is never
locked or slowed down; reads of ints and of an immutable object are atomic under the
GIL.

Metrics (``wgpunch_punch_*``): ``requests_total``, ``replies_total``, ``lost_total``,
``late_total``, ``malformed_total``, ``endpoints_applied_total``,
``ignored_packets_total``, ``peers``, ``handshake_age_seconds{peer}`` (peers with a
handshake only), ``server_last_reply_age_seconds`` (once the server has answered),
``nat_verdict{peer,verdict}`` (1 for the peer's current verdict, as the v2 server
forwarded it; "unknown" until then, and always with the classic protocol),
``local_nat_verdict{verdict}`` (this host's, measured with ``--probe-port``; "unknown"
otherwise), ``nat_checks_total`` and ``nat_changes_total`` (the daemon's NAT checks after
the one at start, and those that found another verdict: a rising second one means this
host's network keeps changing under it). Verdicts are the tokens of :mod:`rendezvous.nat`. ``peer`` is the short key,
as in the logs.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from rendezvous.classic import short_key
from rendezvous.metrics import Exporter, start_exporter
from rendezvous.nat import nat_name

from .observe import Observer

if TYPE_CHECKING:
    from .client import Client

__all__ = ["ClientCollector", "MetricsObserver", "PREFIX", "start"]

PREFIX = "wgpunch_punch_"

_COUNTERS = (  # (machine counter, metric, help)
    ("sent", "requests", "Requests sent to the rendezvous server."),
    ("replies", "replies", "Replies from the server matched to a request."),
    ("lost", "lost", "Requests that got no reply in time."),
    ("late", "late", "Replies that came after their request had timed out."),
    ("malformed", "malformed", "Datagrams from the server that were not a valid reply."),
    ("applied", "endpoints_applied", "Endpoints set on the interface from server answers."),
)


class ClientCollector:
    """Collect from the client the observer last saw (nothing before it is open)."""

    def __init__(self) -> None:
        self.client: Client | None = None

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        client = self.client
        if client is None:
            return
        machine = client.machine
        counters = machine.counters
        for attr, name, doc in _COUNTERS:
            yield CounterMetricFamily(PREFIX + name, doc, value=getattr(counters, attr, 0))  # v2 has no "malformed"
        channel = client.channels[0] if client.channels else None
        yield CounterMetricFamily(PREFIX + "ignored_packets",
                                  "Packets the raw socket saw that were not server replies.",
                                  value=channel.ignored if channel is not None else 0)
        device = client.device
        peers = device.peers if device is not None else ()
        if machine.only is not None:
            peers = tuple(p for p in peers if p.public_key in machine.only)
        yield GaugeMetricFamily(PREFIX + "peers", "Peers of the interface wg-punch handles.",
                                value=len(peers))
        age = GaugeMetricFamily(PREFIX + "handshake_age_seconds",
                                "Seconds since the latest handshake with each peer.",
                                labels=["peer"])
        nat = GaugeMetricFamily(PREFIX + "nat_verdict",
                                "The NAT verdict per peer (1 for the current one).",
                                labels=["peer", "verdict"])
        wall = time.time()
        for p in peers:
            if p.last_handshake:
                age.add_metric([short_key(p.public_key)], max(0.0, wall - p.last_handshake))
            st = machine.peers.get(p.public_key)
            nat.add_metric([short_key(p.public_key),
                            nat_name(getattr(st, "peer_nat", 0)) if st is not None
                            else "unknown"], 1)
        yield age
        yield nat
        own = getattr(client, "nat_verdict", None)
        local = GaugeMetricFamily(PREFIX + "local_nat_verdict",
                                  "This host's NAT verdict (1 for the current one).",
                                  labels=["verdict"])
        local.add_metric([own.nat.token if own is not None else "unknown"], 1)
        yield local
        yield CounterMetricFamily(PREFIX + "nat_checks",
                                  "NAT checks after the one at start (daemon, --probe-port).",
                                  value=getattr(client, "nat_checks", 0))
        yield CounterMetricFamily(PREFIX + "nat_changes",
                                  "NAT checks that found another verdict than before.",
                                  value=getattr(client, "nat_changes", 0))
        last = getattr(client, "last_reply", None)
        if machine.replied and last is not None:
            yield GaugeMetricFamily(PREFIX + "server_last_reply_age_seconds",
                                    "Seconds since the server's last reply.",
                                    value=max(0.0, time.monotonic() - last))

    def describe(self) -> Iterable[Any]:
        return []


class MetricsObserver(Observer):
    """Hands the open client to the collector; the exporter itself runs on a thread."""

    def __init__(self, collector: ClientCollector, exporter: Exporter) -> None:
        self.collector = collector
        self.exporter = exporter

    def opened(self, client: Client) -> None:
        self.collector.client = client

    def closed(self, client: Client) -> None:
        self.exporter.close()


def start(address: tuple[str, int]) -> MetricsObserver:
    """Serve wg-punch's metrics at ADDRESS; the observer goes into the client's options
    and stops the listener when the client ends."""
    collector = ClientCollector()
    return MetricsObserver(collector, start_exporter(address, [collector]))
