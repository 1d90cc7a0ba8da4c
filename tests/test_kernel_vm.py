"""Run tests/kernel (kernel WireGuard through the netlink backend, and whatever else lives
there) inside ONE throwaway QEMU VM that boots the Debian kernel from /boot.

The host kernel has no WireGuard; ../shared/kernel-wg-vm.sh boots one that has. Python is 20-40x
slower in the VM (software emulation), so everything runs in one pytest process.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

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


@pytest.mark.kernelvm
@pytest.mark.skipif(_missing() is not None, reason=str(_missing()))
def test_kernel_tests_in_vm() -> None:
    start = time.monotonic()
    # One boot for everything that needs kernel WireGuard: the netlink backend's tests
    # and the lab's cone/cone demo, classic and v2 (real client, netlink backend, kernel wg0,
    # NATs).
    r = subprocess.run(["bash", str(VM), sys.executable, "-m", "pytest", "-q", "-rs",
                        "-p", "no:cacheprovider", "tests/kernel", "tests/lab/kernel_lab_case.py"],
                       cwd=REPO, capture_output=True, text=True, timeout=1200,
                       env=dict(os.environ, WGVM_TIMEOUT="1140"))
    elapsed = time.monotonic() - start
    tail = (r.stdout[-6000:] + ("\n--- stderr ---\n" + r.stderr[-3000:] if r.stderr else ""))
    print(f"kernel VM run: exit {r.returncode} after {elapsed:.0f} s\n{tail}")
    assert r.returncode == 0, f"tests/kernel in the VM exited {r.returncode}:\n{tail}"
    assert re.search(r"\b\d+ passed\b", r.stdout), f"nothing passed in the VM:\n{tail}"
    assert " skipped" not in r.stdout.splitlines()[-1], f"tests skipped in the VM:\n{tail}"
