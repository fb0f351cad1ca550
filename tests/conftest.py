"""Suite-wide rules.

Kernel tests are never skipped: on a machine where they cannot run (not root, no BPF), they
fail and say why, so a green suite always means the kernel paths were exercised.

The suite runs in parallel (pytest-xdist, `--dist loadfile`): every kernel test makes its
own cgroup, ports, pin directory and network namespaces. Two kinds of test need more:
- a test that changes state the whole host shares (the next pid) runs alone: it holds the
  host-wide test lock exclusively, every other integration test holds it shared, across
  xdist workers and across suites run at once on the host (HOST_WIDE; unit tests touch
  nothing of the host's and take no lock). Every other worker waits for it, and it for
  the longest test running when it asks: its file goes first (files_in_dispatch_order),
  and a test that only *looks* at such state looks at its own part of it instead
  (tests/kernel.programs_left_behind: the BPF programs a stopped agent or doctor left,
  beside every other test's);
- a module whose tests share a module-scoped world (an agent with its peers, seconds to
  start) must run on one worker, so the world is built once, not once per worker: each file
  runs on one worker (`loadfile`). (`loadgroup` with xdist_group marks did not group with
  pytest 9.2, whose items keep their id in `_id` where pytest-xdist 3.8 rewrites `_nodeid`;
  a whole run takes as long either way, 8:15 against 8:03.)
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest
import structlog

from agent.observe import logging as obs
from tests.helpers import serving
from tests.upstreams.echo import Upstream

REPO = Path(__file__).resolve().parent.parent
TESTDATA = Path(__file__).resolve().parent / "testdata"
INTEGRATION = Path(__file__).resolve().parent / "integration"

# node id (up to its parameters) -> what it looks at that every test on the host changes
HOST_WIDE = {
    "tests/integration/test_redirect_records.py::"
    "test_a_process_given_the_stopped_agents_pid_is_still_redirected": (
        "sets the host's next pid (ns_last_pid): any other fork takes it, and the pids of "
        "processes other tests just saw exit are handed out again at once"
    ),
}
LOCK_DIR = Path(tempfile.gettempdir())


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "host_wide(reason): runs alone, holding the host-wide test lock exclusively"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        reason = None
        if item.path.is_relative_to(REPO):  # whatever the rootdir pytest was run with
            name = getattr(item, "originalname", item.name)  # without its parameters
            reason = HOST_WIDE.get(f"{item.path.relative_to(REPO).as_posix()}::{name}")
        if reason is not None:
            item.add_marker(pytest.mark.host_wide(reason))
    items[:] = files_in_dispatch_order(items)


def files_in_dispatch_order(items: list[pytest.Item]) -> list[pytest.Item]:
    """The items file by file, in the order `--dist loadfile --no-loadscope-reorder` hands
    the files to the workers: a file with a host-wide test first, its host-wide tests first
    in it; then the others by number of tests, most first (what xdist's own reordering
    does). A host-wide test waits for every test running beside it to end, and the others
    for it: at the start the other workers are on the largest files, unit tests (which
    take no lock) or the smuggling corpus's cases of a tenth of a second, so it waits for
    next to nothing. Later it waited for whatever was running, up to 20 s (a handover).
    Within a file the order is unchanged otherwise."""
    files: dict[Path, list[pytest.Item]] = {}
    for item in items:
        files.setdefault(item.path, []).append(item)

    def host_wide(item: pytest.Item) -> bool:
        return item.get_closest_marker("host_wide") is not None

    for path, tests in files.items():
        files[path] = sorted(tests, key=lambda t: not host_wide(t))
    order = sorted(files.values(), key=lambda tests: (not host_wide(tests[0]), -len(tests)))
    return [item for tests in order for item in tests]


def _open_lock(name: str) -> int:
    """A lock file every user can take (flock needs no write access); created once."""
    path = LOCK_DIR / name
    try:
        return os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return os.open(path, os.O_RDONLY | os.O_CREAT, 0o644)


@contextlib.contextmanager
def host_lock(exclusive: bool) -> Iterator[None]:
    """The host-wide test lock. flock alone lets a stream of shared holders starve an
    exclusive taker; the gate in front of it stops new shared takers while one waits."""
    gate, lock = _open_lock("credless-tests.gate"), _open_lock("credless-tests.lock")
    try:
        if exclusive:
            fcntl.flock(gate, fcntl.LOCK_EX)
            fcntl.flock(lock, fcntl.LOCK_EX)
        else:
            fcntl.flock(gate, fcntl.LOCK_SH)
            fcntl.flock(lock, fcntl.LOCK_SH)
            fcntl.flock(gate, fcntl.LOCK_UN)
        yield
    finally:
        os.close(lock)  # closing the last descriptor releases its flock
        os.close(gate)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    if INTEGRATION not in item.path.parents:  # unit tests touch nothing of the host's
        return (yield)
    # the whole protocol: a test's fixtures (agents, peers) start and stop under the lock too
    with host_lock(exclusive=item.get_closest_marker("host_wide") is not None):
        return (yield)


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("kernel") and os.geteuid() != 0:
        pytest.fail(
            "kernel test needs root (CAP_BPF, CAP_NET_ADMIN, cgroup writes): run "
            "`sudo make test`; kernel tests are never skipped",
            pytrace=False,
        )


@pytest.fixture(autouse=True)
def _diagnostics_put_back() -> Iterator[None]:
    """Each test leaves the diagnostic stream as it found it. Tests configure it (a level,
    a stream of their own) and a later test on the same worker that captures its lines
    (structlog.testing.capture_logs swaps the processors, not the level) inherited their
    level: under test_logging.py's `error`, test_components.py's info line was dropped."""
    saved, debug = structlog.get_config(), obs._debug
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level  # configure() adds its bridge there
    yield
    structlog.configure(**saved)
    obs._debug = debug
    root.handlers[:], root.level = handlers, level
    obs._generation += 1  # each Logger rebuilds on its next line, with the set-up put back


@pytest.fixture
def upstream() -> Iterator[int]:
    """The echo upstream (tests/upstreams/echo.py) on a free loopback port; its record of
    requests starts empty."""
    with serving(ThreadingHTTPServer(("127.0.0.1", 0), Upstream), "upstream") as srv:
        Upstream.seen = []
        yield srv.server_address[1]


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen]]:
    """A list for the test's processes: each is killed and waited for afterwards."""
    started: list[subprocess.Popen] = []
    yield started
    for p in started:
        if p.poll() is None:
            p.kill()
        p.wait()


@pytest.fixture
def credless_cmd() -> list[str]:
    """The installed console script, run with this interpreter's venv."""
    return [sys.executable, "-m", "agent"]
