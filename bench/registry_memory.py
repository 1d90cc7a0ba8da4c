"""Bytes per registered peer of the rendezvous registry (target: at most 160 at 1,000,000).

Run from the repository root::

    /root/.pyenv/versions/3.11.7/bin/python3 bench/registry_memory.py [--peers 100000 1000000]

Each figure comes from a fresh child process, so nothing freed by an earlier
measurement is reused:

- ``rss``: growth of the resident set while N peers are registered, divided by N. This
  is what the operating system charges: the table, the 32-byte key objects the table
  keeps, the packed values, allocator rounding and free space inside pymalloc arenas.
  It is the figure the target applies to.
- ``traced``: the same growth seen by tracemalloc (bytes Python asked for; no allocator
  overhead), and its peak while filling (the registry rebuilds its table when CPython
  would resize it, so for a moment two tables exist).
- ``peak rss``: the process's high-water mark minus the baseline, per peer.
- ``trimmed``: ``rss`` after glibc's ``malloc_trim(0)`` has given free heap pages back
  (old tables the registry dropped while growing); shows how much of ``rss`` is slack.

``--what registry`` measures ``rendezvous.registry.Registry`` alone (the brief);
``--what service`` feeds 64-byte requests from N distinct source addresses through
``rendezvous.service.Service`` with its default configuration (``max_peers`` raised to
N when N is larger), so per-source state (the rate limiter) is counted too. ``--what
v2`` measures ``rendezvous.v2.state.V2Registry``: N authenticated clients, each with
an IPv4 registration and one ask (the target does not apply: v2 keeps more per client).
``--what v2keys`` measures the v2 server's cache of derived client keys
(``rendezvous.v2.crypto.ServerCrypto`` with room for N, as ``--max-peers N`` gives
it): N clients sealed for once each, the 4,096 most recent of them with ready AEAD
objects. Keys are random 32-byte strings created inside the measured region, because
the registry keeps them.

Always exits 0 unless a measurement failed: the verdict is printed, not asserted.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import gc
import json
import os
import random
import struct
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

__all__ = ["main", "measure"]

REPO = Path(__file__).resolve().parent.parent
TARGET = 160
PAGE = os.sysconf("SC_PAGE_SIZE")
_ENDPOINT = struct.Struct("!IH")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def hwm_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def _filler(what: str, n: int):  # type: ignore[no-untyped-def]
    """A function that registers N random peers into a fresh registry or service."""
    rng = random.Random(n)
    if what == "registry":
        from rendezvous.registry import Registry

        reg = Registry(ttl=3600.0, max_peers=n)

        def fill() -> object:
            upsert, randbytes, pack = reg.upsert, rng.randbytes, _ENDPOINT.pack
            for i in range(n):
                # a public-looking IPv4 address and a high port, distinct per peer
                endpoint = pack(0x0B000000 + i * 13, 1024 + i % 60000)
                upsert(randbytes(32), endpoint, 1000.0 + i * 1e-6)
            return reg

        return fill, lambda: len(reg)

    if what == "v2":
        from rendezvous.v2.state import V2Registry

        v2 = V2Registry(ttl=3600.0, max_peers=n)

        def fill() -> object:
            accept, randbytes, pack = v2.accept, rng.randbytes, _ENDPOINT.pack
            peer = rng.randbytes(32)
            for i in range(n):
                # an authenticated client: its IPv4 registration and one ask
                accept(randbytes(32), pack(0x0B000000 + i * 13, 1024 + i % 60000),
                       1_700_000_000_000_000_000 + i, 0, peer, 1000.0 + i * 1e-6)
            return v2

        return fill, lambda: len(v2)

    if what == "v2keys":
        from rendezvous.v2.crypto import ServerCrypto
        from rendezvous.v2.wire import Endpoint, ReplyBody, Status

        crypto = ServerCrypto(rng.randbytes(32), cache_size=n)
        body = ReplyBody(1, Status.PENDING, 1, Endpoint("192.0.2.1", 1))

        def fill() -> object:
            seal, randbytes = crypto.seal_reply, rng.randbytes
            for _ in range(n):
                seal(randbytes(32), body)  # derives the client's keys and caches them
            return crypto

        return fill, lambda: len(crypto)

    from rendezvous.service import Config, Service

    # the default Config (ttl 180 s, rate limit on), with room for N peers
    svc = Service(Config(max_peers=max(n, 1_000_000)))

    def fill() -> object:
        handle, randbytes, pack = svc.handle, rng.randbytes, _ENDPOINT.pack
        their = rng.randbytes(32)
        for i in range(n):
            handle(randbytes(32) + their, pack(0x0B000000 + i * 13, 1024 + i % 60000),
                   1000.0 + i * 1e-6)
        return svc

    return fill, lambda: len(svc.registry)


def measure(what: str, n: int, traced: bool) -> dict[str, float]:
    """Register N peers in this process; report growth per peer."""
    fill, count = _filler(what, n)
    gc.collect()
    if traced:
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
    base_rss, t0 = rss_bytes(), time.perf_counter()
    keep = fill()
    elapsed = time.perf_counter() - t0
    gc.collect()
    result: dict[str, float] = {"peers": count(), "seconds": elapsed}
    if traced:
        current, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        result["traced"] = (current - base) / n
        result["traced_peak"] = (peak - base) / n
    else:
        result["rss"] = (rss_bytes() - base_rss) / n
        result["peak_rss"] = (hwm_bytes() - base_rss) / n
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
        result["trimmed"] = (rss_bytes() - base_rss) / n
    del keep
    return result


def child(what: str, n: int, traced: bool) -> dict[str, float]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", what, str(n),
           "traced" if traced else "rss"]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"measurement of {n} peers failed:\n{r.stderr}")
    return dict(json.loads(r.stdout.strip().splitlines()[-1]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--peers", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--what", choices=("registry", "service", "v2", "v2keys"),
                   default="registry")
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        what, n, mode = args.child
        print(json.dumps(measure(what, int(n), mode == "traced")))
        return 0

    classic = args.what in ("registry", "service")  # the target is the classic one's
    print(f"bytes per registered peer ({args.what}; Python {sys.version.split()[0]}); "
          + (f"target <= {TARGET} B/peer at 1,000,000 peers" if classic else "no target"))
    header = (f"{'peers':>10}  {'rss':>7}  {'trimmed':>7}  {'traced':>7}  {'peak rss':>9}  "
              f"{'peak traced':>11}  {'fill s':>6}  verdict (rss / traced)")
    print(header)
    try:
        for n in args.peers:
            rss = child(args.what, n, traced=False)
            tr = child(args.what, n, traced=True)
            if rss["peers"] != n:
                print(f"warning: {n} inserted but {rss['peers']:.0f} kept")
            verdict = ""
            if n >= 1_000_000 and classic:
                verdict = " / ".join("ok" if v <= TARGET else "OVER"
                                     for v in (rss["rss"], tr["traced"]))
            print(f"{n:>10,}  {rss['rss']:>7.1f}  {rss['trimmed']:>7.1f}  {tr['traced']:>7.1f}  "
                  f"{rss['peak_rss']:>9.1f}  {tr['traced_peak']:>11.1f}  {rss['seconds']:>6.2f}"
                  f"  {verdict}", flush=True)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
