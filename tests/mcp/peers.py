"""Run the MCP server peer (tests/mcp/server.py) for a test, always stopping it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.helpers import stop_process

REPO = Path(__file__).resolve().parents[2]


class McpServer:
    def __init__(self, tmp_path: Path, port: int, issuer: str, dpop: bool = False):
        self.port = port
        self.url = f"http://127.0.0.1:{port}/mcp"
        self.stats_path = tmp_path / f"mcp-stats-{port}.json"
        self.args = [
            sys.executable,
            "-m",
            "tests.mcp.server",
            "--port",
            str(port),
            "--issuer",
            issuer,
            "--resource",
            self.url,
            "--stats",
            str(self.stats_path),
        ]
        if dpop:
            self.args.append("--dpop")
        self.log = tmp_path / f"mcp-{port}.log"
        self.proc = None

    def __enter__(self):
        self.proc = subprocess.Popen(
            self.args, cwd=REPO, stdout=subprocess.PIPE, stderr=open(self.log, "wb"), text=True
        )
        line = self.proc.stdout.readline()
        if not line.startswith("READY"):
            self.__exit__()
            raise RuntimeError(f"MCP server did not start: {self.log.read_text()[-2000:]}")
        import time
        import urllib.request

        for _ in range(100):  # READY is printed before uvicorn binds
            try:
                urllib.request.urlopen(
                    self.url.replace("/mcp", "/.well-known/oauth-protected-resource/mcp"), timeout=1
                )
                break
            except OSError:
                time.sleep(0.05)
        return self

    def stats(self) -> dict:
        return json.loads(self.stats_path.read_text())

    def __exit__(self, *exc):
        stop_process(self.proc)


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
