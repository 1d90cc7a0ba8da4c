"""CPU cost of one v2 request in the server's own code, without system calls.

Run from the repository root::

    python3 bench/v2_cost.py [--clients 1000 100000] [--requests 20000]

For each client count N, a fresh ``rendezvous.service.Service`` with a server key
(rate limits off, ``--max-peers`` large enough) first registers N clients: each sends
one request asking for the next client, so that every pair of neighbours consents and
a later request is answered ``found``. Then ``--requests`` more requests, sealed
beforehand, each from a client drawn at random, go through ``Service.handle`` (and the
notifications it queues are drained, as the server does after each datagram), timed
with the process's CPU clock. Three cases:

- **known clients**: the server's key cache as the server sets it up (``--max-peers``
  clients). At N up to 4,096 every client keeps ready AEAD objects; at 100,000 almost
  every request comes from a client whose objects are rebuilt from its cached keys.
- **key derived**: the same requests to a server whose cache holds one client: each
  request's key is derived (an X25519 + HKDF) to open it, and its reply reuses it. That
  is what nearly every request cost, before the cache had two levels, on a server with
  more than 65,536 active clients.

It prints microseconds per request and the requests per second one core could answer
at that cost. Figures only; never fails because something was slow.
"""

from __future__ import annotations

import argparse
import gc
import random
import struct
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rendezvous.service import Config, Service
from rendezvous.v2.crypto import ClientCrypto, ServerCrypto
from rendezvous.v2.keys import generate_private_key
from rendezvous.v2.wire import RequestBody

WALL = 1_700_000_000 * 10**9  # the server's wall clock at now = 0


def source(i: int) -> bytes:
    """Client I's packed IPv4 source: a distinct address and port per client."""
    return struct.pack(">IH", 0x0A000000 + i, 1024 + i % 60000)


def prepare(n: int, requests: int, server_public: bytes,
            rng: random.Random) -> tuple[list[bytes], list[bytes], list[tuple[bytes, int]]]:
    """The N clients' public keys, their first requests (client i asks for client i+1)
    and REQUESTS more, each from a random client, with the index of its sender. Each
    client's datagrams are sealed, then its crypto object dropped (it holds two AEAD
    objects, ~4.4 KB: 100,000 of them would not fit comfortably)."""
    order = [rng.randrange(n) for _ in range(requests)]
    per_client: list[list[int]] = [[] for _ in range(n)]
    for pos, i in enumerate(order):
        per_client[i].append(pos)
    privs = [generate_private_key() for _ in range(n)]
    pubs = [ClientCrypto(p, server_public).client_public for p in privs]
    firsts: list[bytes] = []
    timed: list[tuple[bytes, int]] = [(b"", 0)] * requests
    for i, priv in enumerate(privs):
        c = ClientCrypto(priv, server_public)
        peer = pubs[(i + 1) % n]
        firsts.append(c.seal_request(RequestBody(WALL, 1, peer)))
        for k, pos in enumerate(per_client[i], start=1):
            timed[pos] = (c.seal_request(RequestBody(WALL + k, 1 + k, peer)), i)
    return pubs, firsts, timed


def measure(server_private: bytes, n: int, firsts: list[bytes],
            timed: list[tuple[bytes, int]], cache: bool) -> float:
    """CPU microseconds per timed request."""
    crypto = ServerCrypto(server_private, cache_size=max(n, 1_000_000) if cache else 1)
    svc = Service(Config(rate=0, max_peers=max(2 * n, 1_000_000), new_key_rate=0), crypto)
    for i, data in enumerate(firsts):
        svc.handle(data, source(i), 0.0, None, WALL)
        svc.drain_notifications()
    handle, drain = svc.handle, svc.drain_notifications
    wall = WALL + 10**9
    gc.collect()  # else the collections the setup's objects call for land in the timing
    t0 = time.process_time_ns()
    for data, i in timed:
        handle(data, source(i), 1.0, None, wall)
        drain()
    cpu = time.process_time_ns() - t0
    answered = svc.snapshot()["v2_requests"] - n
    if answered != len(timed):
        raise SystemExit(f"v2_cost: {len(timed) - answered} of {len(timed)} requests were "
                         "not answered (a bug in this benchmark)")
    return cpu / 1000 / len(timed)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, nargs="+", default=[1000, 100_000],
                   help="client counts to measure (default 1000 100000)")
    p.add_argument("--requests", type=int, default=20_000,
                   help="timed requests per case (default 20000)")
    args = p.parse_args(argv)
    if min(args.clients) < 2 or args.requests < 1:
        p.error("--clients must be at least 2 and --requests at least 1")
    rng = random.Random(1)
    server_private = generate_private_key()
    server_public = ServerCrypto(server_private, cache_size=0).server_public
    print(f"v2 request, CPU per request in Service.handle (Python {sys.version.split()[0]})")
    print(f"{'clients':>9}  {'case':<14}  {'us/request':>10}  {'req/s per core':>14}")
    for n in args.clients:
        _, firsts, timed = prepare(n, args.requests, server_public, rng)
        for case, cache in (("known clients", True), ("key derived", False)):
            us = measure(server_private, n, firsts, timed, cache)
            print(f"{n:>9,}  {case:<14}  {us:>10.1f}  {1e6 / us:>14,.0f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
