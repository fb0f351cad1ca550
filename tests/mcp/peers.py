"""Run the MCP server peer (tests/mcp/server.py) for a test, always stopping it."""

from __future__ import annotations

import errno
import json
import socket
import subprocess
import sys
from pathlib import Path

from tests import zygote
from tests.helpers import stop_process
from tests.tlsca import TestCA

REPO = Path(__file__).resolve().parents[2]


def listening(host: str) -> list[socket.socket]:
    """Listening sockets on a free port of host: one for an address, or for "localhost" one
    on [::1] (IPv6 only) and one on 127.0.0.1, the same port (tried until one is free on
    both)."""
    if host != "localhost":
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        return [socket.create_server((host, 0), family=family)]
    for _ in range(100):
        v6 = socket.create_server(("::1", 0), family=socket.AF_INET6)  # sets IPV6_V6ONLY
        try:
            v4 = socket.create_server(("127.0.0.1", v6.getsockname()[1]))
        except OSError as e:
            v6.close()
            if e.errno != errno.EADDRINUSE:
                raise
            continue
        return [v6, v4]
    raise RuntimeError("no port free on both 127.0.0.1 and [::1]")


class McpServer:
    """The server, its listening socket bound here at once (its URL is known before the
    authorization server it trusts is started, and nothing else can take its port) and
    served by the child started by start(issuer)."""

    def __init__(
        self,
        tmp_path: Path,
        dpop: bool = False,
        tls: TestCA | None = None,
        dpop_nonce: int = 0,
        dpop_nonce_forget: int = 0,
        host: str = "127.0.0.1",
        introspect: str = "",
    ):
        """tls: serve https with a certificate of this CA for localhost, 127.0.0.1 and ::1
        (the URL names localhost, as users' servers name a host). dpop: demand DPoP-bound
        tokens (and say so in the 401 challenge and the resource metadata); dpop_nonce: also
        demand DPoP nonces, a new one every dpop_nonce accepted requests (implies dpop), all
        forgotten once after the dpop_nonce_forget-th (tests/mcp/server.py). host: where it
        listens and what its URL names: "127.0.0.1", "::1" (the URL names [::1]), or
        "localhost" (both loopbacks, one port; the URL names localhost). introspect:
        "CLIENT_ID:SECRET", tokens are opaque and introspected at the issuer as that client."""
        self.introspect = introspect
        self.socks = listening(host)
        self.sock = self.socks[0]
        self.port = self.sock.getsockname()[1]
        named = f"[{host}]" if ":" in host else host
        if tls is None:
            self.url = f"http://{named}:{self.port}/mcp"
            self.tls_args: list[str] = []
        else:
            named = "localhost" if host == "127.0.0.1" else named
            self.url = f"https://{named}:{self.port}/mcp"
            cert, key = tls.issue(f"mcp-{self.port}")
            self.tls_args = ["--certfile", str(cert), "--keyfile", str(key)]
        self.stats_path = tmp_path / f"mcp-stats-{self.port}.json"
        self.log = tmp_path / f"mcp-{self.port}.log"
        self.dpop = dpop or dpop_nonce > 0
        self.dpop_nonce, self.dpop_nonce_forget = dpop_nonce, dpop_nonce_forget
        self.proc: zygote.ForkedProcess | None = None

    def start(self, issuer: str) -> McpServer:
        """Serve, trusting tokens from issuer; connections made before now wait in the
        socket's backlog."""
        fds = tuple(s.fileno() for s in self.socks)
        args = ["--issuer", issuer]
        args += ["--resource", self.url]
        args += ["--stats", str(self.stats_path)]
        args += ["--dpop"] if self.dpop else []
        args += ["--introspect", self.introspect] if self.introspect else []
        if self.dpop_nonce:
            args += ["--dpop-nonce", str(self.dpop_nonce)]
            args += ["--dpop-nonce-forget", str(self.dpop_nonce_forget)]
        with open(self.log, "wb") as log:
            self.proc = zygote.spawn(args + self.tls_args, REPO, log.fileno(), list(fds))
        if not self.proc.stdout.readline().startswith("READY"):
            self.stop()
            raise RuntimeError(f"MCP server did not start: {self.log.read_text()[-2000:]}")
        return self

    def stats(self) -> dict:
        return json.loads(self.stats_path.read_text())

    def credentialed(self) -> list[dict]:
        """The requests that carried a credential (Authorization), as the server saw them."""
        return [r for r in self.stats()["requests"] if r["auth_scheme"]]

    def relayed(self) -> list[dict]:
        """The requests that came from workloads, not the agent's own (its probes and
        metadata fetches say User-Agent credless/...): pre-warming on exec makes those at any
        moment, so "nothing of this request reached the server" counts these."""
        return [
            r
            for r in self.stats()["requests"]
            if not (r.get("user_agent") or "").startswith("credless/")
        ]

    def stop(self) -> None:
        stop_process(self.proc)
        for s in self.socks:
            s.close()

    def __enter__(self) -> McpServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def run_ts_client(url: str, *args: str, preexec=None, timeout=90) -> dict:
    """The TypeScript SDK client (tests/mcp/client.mjs): the JSON of its last line."""
    r = subprocess.run(
        ["node", str(REPO / "tests/mcp/client.mjs"), url, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=preexec,
    )
    lines = r.stdout.strip().splitlines()
    assert lines, f"the TypeScript client printed nothing: {r.stderr[-2000:]}"
    return json.loads(lines[-1])


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
