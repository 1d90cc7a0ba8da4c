"""The lab demo with kernel WireGuard, for the kernel VM (not collected on the host:
the file name does not start with ``test_``).

tests/test_kernel_vm.py boots one VM with the wireguard module and runs the kernel tests
inside it; wire this in from there (import the test function into a module under
tests/kernel, or pass this file to pytest explicitly). Everything runs 20-40x slower in
the VM, hence the long timeouts.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.lab.lablib import SCRIPT, leftovers, new_prefix, script_env
from tests.nstools import is_root

__all__ = ["test_lab_demo_with_kernel_wireguard"]


@pytest.mark.lab
@pytest.mark.parametrize("protocol", ["classic", "v2"])
def test_lab_demo_with_kernel_wireguard(protocol: str) -> None:
    if not is_root():
        pytest.skip("needs root")
    if not Path("/sys/module/wireguard").exists():
        pytest.skip("no kernel WireGuard here (run inside the kernel VM)")
    prefix = new_prefix()
    # v2 also proves the netlink backend hands the client the interface's private key
    # (v2 seals its requests with it) and that a kernel wg0 takes the notified endpoint.
    args = ["demo"] + (["--v2"] if protocol == "v2" else [])
    r = subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True,
                       timeout=900, env=script_env(prefix, LAB_WG="kernel", LAB_TIMEOUT="300"))
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-6000:]
    assert "WireGuard: kernel" in r.stderr, out[-6000:]
    assert "ping through the tunnel works both ways" in r.stdout, out[-6000:]
    assert " wg=kernel ok=1 " in r.stdout, out[-6000:]
    assert leftovers(prefix) == []
