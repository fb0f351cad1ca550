"""Run the MCP server peer (tests/mcp/server.py) for a test, always stopping it."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

from tests.helpers import stop_process
from tests.tlsca import TestCA

REPO = Path(__file__).resolve().parents[2]


class McpServer:
    """The server, its listening socket bound here at once (its URL is known before the
    authorization server it trusts is started, and nothing else can take its port) and
    served by the child started by start(issuer)."""

    def __init__(self, tmp_path: Path, dpop: bool = False, tls: TestCA | None = None):
        """tls: serve https with a certificate of this CA for localhost, 127.0.0.1 and ::1
        (the URL names localhost, as users' servers name a host)."""
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        if tls is None:
            self.url = f"http://127.0.0.1:{self.port}/mcp"
            self.tls_args: list[str] = []
        else:
            self.url = f"https://localhost:{self.port}/mcp"
            cert, key = tls.issue(f"mcp-{self.port}")
            self.tls_args = ["--certfile", str(cert), "--keyfile", str(key)]
        self.stats_path = tmp_path / f"mcp-stats-{self.port}.json"
        self.log = tmp_path / f"mcp-{self.port}.log"
        self.dpop = dpop
        self.proc: subprocess.Popen | None = None

    def start(self, issuer: str) -> McpServer:
        """Serve, trusting tokens from issuer; connections made before now wait in the
        socket's backlog."""
        fd = self.sock.fileno()
        args = ["--fd", str(fd), "--issuer", issuer, "--resource", self.url]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.mcp.server", *args, "--stats", str(self.stats_path)]
            + (["--dpop"] if self.dpop else [])
            + self.tls_args,
            cwd=REPO,
            pass_fds=(fd,),
            stdout=subprocess.PIPE,
            stderr=open(self.log, "wb"),
            text=True,
        )
        if not self.proc.stdout.readline().startswith("READY"):
            self.stop()
            raise RuntimeError(f"MCP server did not start: {self.log.read_text()[-2000:]}")
        return self

    def stats(self) -> dict:
        return json.loads(self.stats_path.read_text())

    def stop(self) -> None:
        stop_process(self.proc)
        self.sock.close()

    def __enter__(self) -> McpServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def run_client(url: str, *steps: str, preexec=None, extra=(), timeout=90, prefix=()) -> list[dict]:
    """prefix: a command the client runs under (e.g. `ip netns exec NAME`)."""
    r = subprocess.run(
        [*prefix, sys.executable, "-m", "tests.mcp.client", url, *steps, *extra],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=preexec,
    )
    lines = [json.loads(ln) for ln in r.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        raise AssertionError(f"client printed nothing: {r.stderr[-3000:]}")
    return lines
