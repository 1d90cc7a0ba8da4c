"""``wg-rendezvous --workers N``: N server processes on one host, one port.

Each worker is a whole server (its own sockets, opened with SO_REUSEPORT, so the kernel
spreads client sources over the workers and keeps each source on one worker) and its
own id in the shared store, which is what lets a request handled by one worker find a
key registered through another and notify a client whose mapping another worker holds.
The parent only supervises:

- SIGTERM / SIGINT are passed to every worker, and the parent exits 0 once all have
  stopped cleanly;
- a worker that exits on its own (e.g. it cannot open its port, exit 1) or dies from
  a signal stops the others, and the parent exits with that worker's status (a service
  manager then restarts the whole set).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import Callable

__all__ = ["run_workers"]

log = logging.getLogger("wg-rendezvous")


def _status(code: int) -> int:
    if os.WIFEXITED(code):
        return os.WEXITSTATUS(code)
    return 128 + os.WTERMSIG(code) if os.WIFSIGNALED(code) else 1


def run_workers(n: int, run: Callable[[int], int]) -> int:
    """Fork N workers, each running RUN(index) and exiting with its result; supervise."""
    pids: dict[int, int] = {}
    stopping = False

    def stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for pid in list(pids):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    old = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        for i in range(n):
            pid = os.fork()
            if pid == 0:  # the worker
                for s in (signal.SIGTERM, signal.SIGINT):
                    signal.signal(s, signal.SIG_DFL)
                code = 1
                try:
                    code = run(i)
                finally:
                    sys.stdout.flush()
                    sys.stderr.flush()
                    os._exit(code)
            pids[pid] = i
        log.info("%d workers started (pids %s)", n, " ".join(map(str, pids)))
        result = 0
        while pids:
            try:
                pid, code = os.wait()
            except ChildProcessError:
                break
            except InterruptedError:
                continue
            i = pids.pop(pid, None)
            if i is None:
                continue
            status = _status(code)
            if not stopping:
                log.error("worker %d (pid %d) exited with status %d: stopping the others",
                          i, pid, status)
                result = status or 1
                stop(signal.SIGTERM, None)
            elif status not in (0, 128 + signal.SIGTERM) and not result:
                result = status
        return result
    finally:
        for s, h in old.items():
            signal.signal(s, h)
