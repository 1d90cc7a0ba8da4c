"""Run tests/kernel (kernel WireGuard through the netlink backend, and whatever else lives
there) inside ONE throwaway QEMU VM that boots the Debian kernel from /boot.

The host kernel has no WireGuard; ../shared/kernel-wg-vm.sh boots one that has. Python is 20-40x
slower in the VM (software emulation), so everything runs in one pytest process.

The VM takes one core for about four minutes. When this test is part of a larger run
(the suite, in CI), tests/conftest.py boots it as soon as collection ends, in the
background and niced (``start_early``), so that those minutes overlap the rest of the
suite, which leaves the second core mostly idle; the test itself, which runs last, then
only waits for it and checks what it printed. ``WGPUNCH_VM_EARLY=0`` turns that off.
"""

from __future__ import annotations

import ctypes
import glob
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO

import pytest

REPO = Path(__file__).resolve().parent.parent
VM = Path(os.environ.get("WGVM_SCRIPT", REPO.parent / "shared" / "kernel-wg-vm.sh"))


def _kernel_with_wireguard() -> bool:
    for mod_dir in glob.glob("/lib/modules/*/kernel/drivers/net/wireguard"):
        version = Path(mod_dir).parts[3]
        if Path(f"/boot/vmlinuz-{version}").exists():
            return True
    return False


def _missing() -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    if not VM.is_file():
        return f"needs the VM runner {VM} (set WGVM_SCRIPT)"
    for tool in ("qemu-system-x86_64", "busybox", "cpio", "xz", "zstd", "modprobe", "wg"):
        if not shutil.which(tool):
            return f"needs {tool} (apt-get install qemu-system-x86 busybox-static cpio " \
                   "xz-utils zstd kmod wireguard-tools)"
    if not _kernel_with_wireguard():
        return "needs a /boot/vmlinuz-* with a wireguard module (apt-get install " \
               "linux-image-6.12-rt-amd64)"
    return None


_NODEID = "tests/test_kernel_vm.py::test_kernel_tests_in_vm"
_TIMEOUT = 1200  # the whole VM run, s; the script's own limit is 60 s shorter
# One boot for everything that needs kernel WireGuard: the netlink backend's tests and the
# lab's cone/cone demo, classic and v2 (real client, netlink backend, kernel wg0, NATs).
_ARGV = ["bash", str(VM), sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
         "tests/kernel", "tests/lab/kernel_lab_case.py"]


def _die_with_parent() -> None:
    """In the child: TERM (on which the script kills its VM) if pytest dies first, also
    when it is killed and cannot run its session-finish hook."""
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


_PR_SET_PDEATHSIG = 1


class _VmRun:
    """One VM run, started at once; NICED when it runs beside the suite (started when
    collection ended), so that the suite's own processes keep the CPU they need."""

    def __init__(self, niced: bool) -> None:
        # open until result(): the VM writes to them while the suite runs
        self.out: IO[str] = tempfile.TemporaryFile("w+")  # noqa: SIM115
        self.err: IO[str] = tempfile.TemporaryFile("w+")  # noqa: SIM115
        self.start = time.monotonic()
        argv = ["nice", "-n", "10", *_ARGV] if niced else _ARGV
        self.proc = subprocess.Popen(argv, cwd=REPO, stdout=self.out,
                                     stderr=self.err, stdin=subprocess.DEVNULL,
                                     env=dict(os.environ, WGVM_TIMEOUT=str(_TIMEOUT - 60)),
                                     preexec_fn=_die_with_parent)  # noqa: PLW1509 (no threads yet)

    def result(self) -> tuple[int, str, str, float]:
        """Wait for it: (exit status, stdout, stderr, seconds since it started)."""
        try:
            code = self.proc.wait(max(1.0, _TIMEOUT - (time.monotonic() - self.start)))
        except subprocess.TimeoutExpired:
            self.stop()
            code = -1
        outputs = []
        for f in (self.out, self.err):
            f.seek(0)
            outputs.append(f.read())
            f.close()
        return code, outputs[0], outputs[1], time.monotonic() - self.start

    def stop(self) -> None:
        """End it (the script kills its VM on TERM), if it still runs."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


_early: _VmRun | None = None


def start_early(items: list[pytest.Item]) -> None:
    """Boot the VM now if the run includes this test, it would not be skipped, and other
    tests run before it (alone, there is nothing to overlap)."""
    global _early
    if (_early is not None or os.environ.get("WGPUNCH_VM_EARLY", "1") == "0" or len(items) < 2
            or _NODEID not in {item.nodeid for item in items} or _missing() is not None):
        return
    _early = _VmRun(niced=True)


def stop_early() -> None:
    """At the end of the session: an early run nobody waited for (the test was
    interrupted, or failed before waiting) does not outlive pytest."""
    global _early
    if _early is not None:
        _early.stop()
        _early = None


@pytest.mark.kernelvm
@pytest.mark.skipif(_missing() is not None, reason=str(_missing()))
def test_kernel_tests_in_vm() -> None:
    global _early
    run, how = _early, "started when collection ended"
    if run is None:
        run, how = _VmRun(niced=False), "run now"
    _early = None
    code, out, err, elapsed = run.result()
    tail = (out[-6000:] + ("\n--- stderr ---\n" + err[-3000:] if err else ""))
    print(f"kernel VM run ({how}): exit {code} after {elapsed:.0f} s\n{tail}")
    assert code == 0, f"tests/kernel in the VM exited {code}:\n{tail}"
    assert re.search(r"\b\d+ passed\b", out), f"nothing passed in the VM:\n{tail}"
    assert " skipped" not in out.splitlines()[-1], f"tests skipped in the VM:\n{tail}"
