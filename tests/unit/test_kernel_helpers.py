"""The kernel tests' clean-up kills what a test started, and never the test run itself."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.kernel import kill_all


def test_a_child_is_killed_and_an_empty_list_is_done() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert kill_all([str(child.pid)]) is False  # there was one: not done yet
        assert child.wait(timeout=30) == -9
        assert kill_all([]) is True
    finally:
        child.kill()
        child.wait()


@pytest.mark.parametrize("who", ["self", "parent"])
def test_the_test_run_itself_is_never_killed(who: str) -> None:
    pid = os.getpid() if who == "self" else os.getppid()
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        with pytest.raises(AssertionError, match=str(pid)):
            kill_all([str(child.pid), str(pid)])
        assert child.poll() is None  # refused as a whole: nothing was killed
    finally:
        child.kill()
        child.wait()
