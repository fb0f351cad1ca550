"""tests/zygote.py: the processes the suite forks (MCP servers, agents) run, stop, say how
they ended, and never outlive it."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests import zygote
from tests.helpers import stop_process
from tests.mcp.peers import REPO, McpServer


def gone(pid: int) -> bool:
    """Whether the process has exited (a pidfd of a process gone is readable, or cannot be
    opened any more)."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        return bool(select.select([pidfd], [], [], 10)[0])
    finally:
        os.close(pidfd)


def test_a_forked_server_serves_on_the_socket_given_and_stops(tmp_path: Path):
    with McpServer(tmp_path) as server:
        server.start("http://127.0.0.1:9/")  # nothing is asked of the issuer below
        assert server.proc is not None and server.proc.poll() is None
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(urllib.request.Request(server.url, data=b"{}"), timeout=30)
        assert refused.value.code == 401  # the SDK's server, demanding a token
        pid = server.proc.pid
        stop_process(server.proc)
        # the SDK's server leaves SIGTERM to its default action: ended by it, as Popen says
        assert server.proc.poll() == -signal.SIGTERM and gone(pid)


def test_a_server_that_cannot_start_says_why_in_its_log(tmp_path: Path):
    log = tmp_path / "server.log"
    with open(log, "wb") as err:
        proc = zygote.spawn(["--issuer", "http://127.0.0.1:9/"], REPO, err.fileno(), [])
    try:
        assert proc.stdout.readline() == ""  # no READY: it ended
        assert proc.wait(30) == 2 and gone(proc.pid)  # argparse's status, as the zygote saw it
        assert "the following arguments are required: --fd" in log.read_text()
    finally:
        stop_process(proc)


def test_the_servers_end_with_their_zygote(tmp_path: Path):
    own = zygote.Zygote("mcp-server")  # not the worker's shared one: this test ends it
    log = tmp_path / "server.log"
    server = McpServer(tmp_path)
    with open(log, "wb") as err:
        proc = own.spawn(
            [
                "--issuer",
                "http://127.0.0.1:9/",
                "--resource",
                server.url,
                "--stats",
                str(tmp_path / "stats.json"),
            ],
            REPO,
            err.fileno(),
            [s.fileno() for s in server.socks],
        )
    try:
        assert proc.stdout.readline().startswith("READY")
        own.close()  # the worker's end closes: the zygote exits, its servers get SIGTERM
        assert own.proc.returncode is not None
        assert gone(proc.pid)
    finally:
        stop_process(proc)
        server.stop()


def test_a_forked_process_a_signal_ended_says_so_as_popen_would(tmp_path: Path):
    with McpServer(tmp_path) as server:
        server.start("http://127.0.0.1:9/")
        assert server.proc is not None
        server.proc.kill()
        assert server.proc.wait(30) == -signal.SIGKILL
        server.proc.kill()  # ended: nothing to signal, no error


def test_a_forked_agent_runs_the_cli_and_exits_with_its_status(tmp_path: Path):
    """The agent's own command line, in a fork of the agent zygote: a configuration error
    is its exit status 2 and its message on stderr, as `python -m agent` gives them."""
    bad = tmp_path / "credless.toml"
    bad.write_text("[agent]\nno_such_setting = 1\n")
    out, err = tmp_path / "out", tmp_path / "err"
    with open(out, "wb") as o, open(err, "wb") as e:
        proc = zygote.spawn_agent(
            ["check-config", str(bad)], REPO, o.fileno(), e.fileno(), dict(os.environ)
        )
    assert proc.wait(60) == 2
    exec_d = subprocess.run(
        [sys.executable, "-m", "agent", "check-config", str(bad)],
        capture_output=True,
        cwd=REPO,
        check=False,
    )
    assert exec_d.returncode == 2
    assert err.read_bytes() == exec_d.stderr and b"no_such_setting" in exec_d.stderr


def test_an_unknown_kind_of_zygote_is_refused():
    with pytest.raises(ValueError, match="no zygote of kind 'nginx'"):
        zygote.Zygote("nginx")
