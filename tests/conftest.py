"""Shared fixtures: root-only tests skip cleanly elsewhere."""

from __future__ import annotations

import pytest

from punch.statefile import ENV_DIR
from tests.nstools import Netns, have, is_root


def pytest_collection_finish(session: pytest.Session) -> None:
    if session.config.option.collectonly:
        return
    from tests import test_kernel_vm

    test_kernel_vm.start_early(session.items)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    from tests import test_kernel_vm

    test_kernel_vm.stop_early()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if is_root():
        return
    skip = pytest.mark.skip(reason="needs root (network namespaces, raw sockets)")
    for item in items:
        if "root" in item.keywords or "lab" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def netns():
    """A fresh network namespace, removed afterwards (also on failure)."""
    with Netns("fx") as ns:
        yield ns


@pytest.fixture
def needs_wireguard_go() -> None:
    if not have("wireguard-go"):
        pytest.skip("wireguard-go is not installed")


@pytest.fixture(autouse=True)
def state_dir(tmp_path, monkeypatch):
    """Every wg-punch a test starts writes its state file (punch.statefile) under the
    test's own temporary directory, never into the host's /run/wg-punch: child
    processes inherit the variable through tests.nstools.py_env()."""
    d = tmp_path / "wg-punch-state"
    monkeypatch.setenv(ENV_DIR, str(d))
    return d
