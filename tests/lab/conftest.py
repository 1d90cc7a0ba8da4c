"""Fixtures for the netns lab tests: a lab per test, and a check that none outlives the run."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.lab.lablib import RUN_PREFIX, SCRIPT, Lab, leftovers, script_env
from tests.nstools import is_root

_tools: str | None = None


def _missing_tools() -> str:
    """'' when the lab can run here, else what `netns_lab.sh check` says is missing."""
    global _tools
    if _tools is None:
        r = subprocess.run(["bash", str(SCRIPT), "check"], capture_output=True, text=True,
                           env=script_env(RUN_PREFIX + "chk"), timeout=60)
        _tools = "" if r.returncode == 0 else (r.stderr.strip() or "lab tools missing")
    return _tools


@pytest.fixture
def make_lab() -> Iterator[Callable[..., Lab]]:
    """``make_lab(nat_a, nat_b, ipv6=.., v2=..)`` builds a running lab; all are torn down
    afterwards."""
    if not is_root():
        pytest.skip("needs root")
    missing = _missing_tools()
    if missing:
        pytest.skip(missing)
    labs: list[Lab] = []

    def factory(nat_a: str = "cone", nat_b: str = "cone", **kw: Any) -> Lab:
        lab = Lab(nat_a, nat_b, **kw)
        labs.append(lab)  # registered before up(): a half-built lab is removed too
        return lab.up()

    yield factory
    errors = []
    for lab in labs:
        try:
            lab.down()
        except Exception as e:  # keep tearing down the others
            errors.append(str(e))
    assert not errors, errors


@pytest.fixture(scope="session", autouse=True)
def no_lab_left_behind() -> Iterator[None]:
    """After the run, no namespace or state directory of this run's labs may remain."""
    yield
    left = leftovers(RUN_PREFIX)
    if left:  # clean up, then fail loudly
        for name in {x.split()[1].rsplit("/", 1)[-1] for x in left}:
            for suffix in ("-inet", "-srv", "-nat-a", "-nat-b", "-alice", "-bob", "-probe",
                           "-cgn-a", "-cgn-b"):
                if name.endswith(suffix):
                    name = name[: -len(suffix)]
            subprocess.run(["bash", str(SCRIPT), "down"], env=script_env(name),
                           capture_output=True, timeout=60)
        raise AssertionError(f"lab tests left behind: {left}")
