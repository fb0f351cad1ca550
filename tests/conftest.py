"""Suite-wide rules.

Kernel tests are never skipped: on a machine where they cannot run (not root, no BPF), they
fail and say why, so a green suite always means the kernel paths were exercised.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TESTDATA = Path(__file__).resolve().parent / "testdata"


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("kernel") and os.geteuid() != 0:
        pytest.fail(
            "kernel test needs root (CAP_BPF, CAP_NET_ADMIN, cgroup writes): run "
            "`sudo make test`; kernel tests are never skipped",
            pytrace=False,
        )


@pytest.fixture
def credless_cmd() -> list[str]:
    """The installed console script, run with this interpreter's venv."""
    return [sys.executable, "-m", "agent"]
