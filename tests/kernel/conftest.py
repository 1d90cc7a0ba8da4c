"""Kernel WireGuard tests: they run only where /sys/module/wireguard exists (the VM
booted by tests/test_kernel_vm.py), and skip harmlessly everywhere else."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.kernel.wgpair import HAVE_KERNEL_WG, WgPair, make_pair
from tests.nstools import have, is_root

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = None
    if not HAVE_KERNEL_WG:
        reason = "no kernel WireGuard here (/sys/module/wireguard); run tests/test_kernel_vm.py"
    elif not is_root():
        reason = "needs root"
    elif not have("wg"):
        reason = "needs wireguard-tools (wg)"
    if reason:
        for item in items:
            if Path(item.path).resolve().is_relative_to(HERE):
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="module")
def wgpair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WgPair]:
    pair = make_pair(tmp_path_factory.mktemp("keys"))
    try:
        yield pair
    finally:
        pair.close()
