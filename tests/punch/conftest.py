"""Every wg-punch the punch tests start writes its state file under the test's own
temporary directory, never into the host's /run/wg-punch."""

from __future__ import annotations

import pytest

from punch.statefile import ENV_DIR


@pytest.fixture(autouse=True)
def state_dir(tmp_path, monkeypatch):
    """The state directory of this test (child processes inherit it through the env)."""
    d = tmp_path / "state"
    monkeypatch.setenv(ENV_DIR, str(d))
    return d
