"""tests/mcp/zygote.py: the MCP servers the suite forks serve, stop, and never outlive it."""

from __future__ import annotations

import os
import select
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.helpers import stop_process
from tests.mcp import zygote
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
        assert server.proc.poll() == 0 and gone(pid)


def test_a_server_that_cannot_start_says_why_in_its_log(tmp_path: Path):
    log = tmp_path / "server.log"
    with open(log, "wb") as err:
        proc = zygote.spawn(["--issuer", "http://127.0.0.1:9/"], REPO, err.fileno(), [])
    try:
        assert proc.stdout.readline() == ""  # no READY: it ended
        assert proc.wait(30) is not None and gone(proc.pid)
        assert "the following arguments are required: --fd" in log.read_text()
    finally:
        stop_process(proc)


def test_the_servers_end_with_their_zygote(tmp_path: Path):
    own = zygote.Zygote()  # not the worker's shared one: this test ends it
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
