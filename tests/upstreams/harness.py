"""The world the smuggling corpus and the differential test run in (their oracle:
tests/upstreams/oracle.py).

One world per test module (starting it costs seconds; a case costs a tenth of one):
oidc-provider; logging upstreams on two parsers (Node's llhttp, uvicorn's h11), each as a
Bearer and a DPoP server; a "barrier" upstream; the agent, with all of them as [[servers]]
in broker mode under one policy; and one attacker process in the managed cgroup
(tests/upstreams/attacker.py), whose identity holds a token for every server.

Each exchange is one fresh connection from the attacker. Its window, what the audit and
the upstream logs gained because of it, is closed by a barrier rather than a sleep: once the
agent reports no open proxy connection (so everything the exchange's connection emitted
has been queued), a valid request to the barrier server goes through, and its
`request.injected` event, being later in the audit stream, proves everything before it has
been written. The upstream logs are written before each answer, so they are complete by
then too. Requests an upstream parses on a pooled connection after the window closed (a
request hidden in an earlier body completing later) land in a later window: still caught,
in the exchange that set them off.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import select
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from tests.helpers import AgentProcess, free_port, http_get, stop_process, wait_for
from tests.kernel import enter_cgroup
from tests.upstreams.oracle import BARRIER, Observation
from tests.upstreams.wire import Piece, split_responses
from tests.world import build_world, server_table, table, tools_rule

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
SPIFFE_ID = "spiffe://example.org/agent/attacker"

# The identity may list tools and call echo and add; secret_tool is what every smuggling
# attempt tries to reach. One rule for every server ("*").
POLICY = tools_rule("attacker-tools", SPIFFE_ID, "*", ["echo", "add"])

ECHO = (
    b'{"jsonrpc":"2.0","id":1,"method":"tools/call",'
    b'"params":{"name":"echo","arguments":{"text":"hi"}}}'
)
LIST = b'{"jsonrpc":"2.0","id":7,"method":"tools/list"}'


def post(authority: bytes, body: bytes, extra: bytes = b"") -> bytes:
    """A valid MCP POST (the warm-up and barrier requests)."""
    return (
        b"POST /mcp HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
        b"Accept: application/json, text/event-stream\r\n%sContent-Length: %d\r\n\r\n%s"
        % (authority, extra, len(body), body)
    )


class JsonLines:
    """A JSON-lines file read incrementally, complete lines only (a writer may be midway)."""

    def __init__(self, path: Path):
        self.path = path

    def read(self, start: int) -> tuple[list[dict], int]:
        """Records from byte offset start to the last complete line, and the offset after
        it."""
        pairs = self.read_lines(start)
        return [r for r, _ in pairs], (pairs[-1][1] if pairs else start)

    def read_lines(self, start: int) -> list[tuple[dict, int]]:
        """(record, offset after its line) for each complete line from byte offset start."""
        with open(self.path, "rb") as f:
            f.seek(start)
            data = f.read()
        out, pos = [], 0
        while (nl := data.find(b"\n", pos)) >= 0:
            if data[pos:nl].strip():
                out.append((json.loads(data[pos:nl]), start + nl + 1))
            pos = nl + 1
        return out


@dataclass
class Upstream:
    """One [[servers]] entry and the logging upstream behind it."""

    name: str  # the server's name in the config, the audit and the policy
    kind: str  # "node" (llhttp) or "h11"
    dpop: bool  # credless is configured to use DPoP-bound tokens for it
    sock: socket.socket
    log: JsonLines
    proc: subprocess.Popen | None = None

    @property
    def port(self) -> int:
        return self.sock.getsockname()[1]

    @property
    def authority(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.authority}/mcp"

    def start(self, issuer: str, tmp: Path) -> None:
        fd = self.sock.fileno()
        script = {
            "node": ["node", str(HERE / "node_upstream.mjs")],
            "h11": [sys.executable, "-m", "tests.upstreams.h11_upstream"],
            "sdk": ["node", str(HERE / "sdk_upstream.mjs")],
        }[self.kind]
        self.proc = subprocess.Popen(
            [*script, str(fd), str(self.log.path), issuer, self.url],
            cwd=REPO,
            pass_fds=(fd,),
            stdout=subprocess.PIPE,
            text=True,
            stderr=open(tmp / f"upstream-{self.name}.stderr", "wb"),
        )
        ready, _, _ = select.select([self.proc.stdout], [], [], 30)
        line = self.proc.stdout.readline() if ready else ""
        if not line.startswith("READY"):
            raise RuntimeError(
                f"upstream {self.name} did not start: {line!r} "
                f"{(tmp / f'upstream-{self.name}.stderr').read_text()[-2000:]}"
            )

    def stop(self) -> None:
        stop_process(self.proc)
        self.sock.close()


def bind_upstream(name: str, kind: str, dpop: bool, tmp: Path) -> Upstream:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    log = tmp / f"upstream-{name}.jsonl"
    log.touch()
    return Upstream(name, kind, dpop, sock, JsonLines(log))


class Attacker:
    """tests/upstreams/attacker.py in the managed cgroup, one command at a time."""

    def __init__(self, cg: Path, tmp: Path):
        self.stderr = tmp / "attacker.stderr"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.upstreams.attacker"],
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=open(self.stderr, "wb"),
            preexec_fn=enter_cgroup(cg),
        )
        self._line(30)

    def _line(self, timeout: float) -> dict:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else b""
        if not line:
            raise RuntimeError(
                f"the attacker process did not answer within {timeout} s: "
                f"{self.stderr.read_text()[-2000:]}"
            )
        out = json.loads(line)
        if "error" in out:
            raise RuntimeError(f"attacker: {out['error']}")
        return out

    def run(
        self,
        port: int,
        pieces: list[Piece],
        expect: int | None,
        close: bool,
        idle: float,
        linger: float,
        gap: float,
    ) -> dict:
        cmd = {
            "port": port,
            "expect": expect,
            "close": close,
            "idle": idle,
            "linger": linger,
            "gap": gap,
            "pieces": [
                {"b64": base64.b64encode(p.data).decode(), "wait": p.wait_response} for p in pieces
            ],
        }
        self.proc.stdin.write(json.dumps(cmd).encode() + b"\n")
        self.proc.stdin.flush()
        return self._line(120)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.proc.stdin.close()
        stop_process(self.proc, 5)


class Exchanges:
    """The running world, as the tests drive it: one exchange at a time, each in its own
    audit and upstream-log window."""

    def __init__(
        self,
        tmp: Path,
        upstreams: dict[str, Upstream],
        agent: AgentProcess,
        attacker: Attacker,
        metrics: str,
    ):
        self.tmp, self.upstreams, self.agent, self.attacker = tmp, upstreams, agent, attacker
        self.metrics = metrics
        self.audit_log = JsonLines(agent.stdout_path)
        self.audit_offset = 0
        self.marks = {name: 0 for name in upstreams}
        self._fingerprints: dict[str, set[str]] = {name: set() for name in upstreams}

    def active_connections(self) -> float:
        _status, text = http_get(f"http://{self.metrics}/metrics")
        for line in text.splitlines():
            if line.startswith("credless_proxy_active_connections "):
                return float(line.split()[1])
        raise ValueError("no credless_proxy_active_connections series")

    def _note_tokens(self, events: list[dict]) -> None:
        for e in events:
            if e.get("token_sha256") and e.get("server") in self._fingerprints:
                self._fingerprints[e["server"]].add(e["token_sha256"])

    def _barrier(self) -> list[dict]:
        """Close the current window (see the module docstring); returns its audit events."""
        wait_for(
            lambda: self.active_connections() == 0,
            timeout=30,
            what="the proxy to close the exchange's connection",
        )
        barrier = self.upstreams[BARRIER]
        got = self.attacker.run(
            barrier.port,
            [Piece(post(barrier.authority.encode(), LIST))],
            expect=1,
            close=False,
            idle=30,
            linger=0,
            gap=0,
        )
        answers = split_responses(base64.b64decode(got["received_b64"]))
        if answers.statuses != [200]:
            raise RuntimeError(
                f"the barrier request was answered {answers.statuses}: {answers.responses[:1]}"
            )

        def barrier_seen():
            lines = self.audit_log.read_lines(self.audit_offset)
            for i, (e, end) in enumerate(lines):
                if e["event"] == "request.injected" and e.get("server") == BARRIER:
                    return [r for r, _ in lines[: i + 1]], end
            return None

        through, self.audit_offset = wait_for(
            barrier_seen, timeout=10, what="the barrier's audit event"
        )
        self._note_tokens(through)
        return [e for e in through if e.get("server") != BARRIER]

    def exchange(
        self,
        up: Upstream,
        pieces: list[Piece],
        *,
        expect: int | None,
        close: bool = False,
        idle: float = 1.5,
        linger: float = 0.1,
        gap: float = 0.005,
    ) -> Observation:
        got = self.attacker.run(up.port, pieces, expect, close, idle, linger, gap)
        audit = self._barrier()
        records = {}
        for name, u in self.upstreams.items():
            records[name], self.marks[name] = u.log.read(self.marks[name])
        records.pop(BARRIER)
        received = base64.b64decode(got["received_b64"])
        return Observation(
            up,
            split_responses(received, eof=got["closed"]),
            got["closed"],
            got["reset"],
            got["write_error"],
            got["unsent"],
            audit,
            records,
            set(self._fingerprints[up.name]),
        )

    def warm(self) -> None:
        """One valid call per server: each identity-server pair gets its token (and the
        agent its discovery, whose unauthenticated probe falls in this window, not a
        case's)."""
        self._barrier()  # the barrier's own token; the window of the agent's start
        for up in self.upstreams.values():
            if up.name == BARRIER:
                continue
            obs = self.exchange(up, [Piece(post(up.authority.encode(), ECHO))], expect=1, idle=30)
            if obs.answers.statuses != [200] or not obs.fingerprints:
                raise RuntimeError(
                    f"warm-up of {up.name} failed:\n{obs.describe()}\nagent: "
                    f"{self.agent.stderr_path.read_text()[-3000:]}"
                )


# name -> (kind, DPoP): both parsers, with each kind of token
UPSTREAMS = {
    "node": ("node", False),
    "h11": ("h11", False),
    "node-dpop": ("node", True),
    "h11-dpop": ("h11", True),
}
# the official TypeScript SDK's server (sdk_upstream.mjs): it logs what it ran, not the raw
# request, and answers as an MCP server does (GET and DELETE 405 when stateless), so it is
# asked only by the tests that name it, not by the corpus
SDK_UPSTREAMS = {"sdk": ("sdk", False)}


@contextlib.contextmanager
def start_world(tmp: Path, names=tuple(UPSTREAMS)):
    """Everything above, always torn down (processes, cgroup, listeners, BPF pins)."""
    with build_world(tmp, SPIFFE_ID, "credless-smuggling") as w:
        kinds = UPSTREAMS | SDK_UPSTREAMS
        ups = {n: bind_upstream(n, *kinds[n], tmp) for n in names}
        ups[BARRIER] = bind_upstream(BARRIER, "node", False, tmp)
        for u in ups.values():
            w.stack.callback(u.stop)
        oidc = w.authorization_server(
            [u.url for u in ups.values()],
            access_token_ttl=3600,  # no refresh within a run
        )
        for u in ups.values():
            u.start(oidc.issuer, tmp)
        metrics_port = free_port()
        agent = w.start_agent(
            "".join(
                server_table(u.name, u.url, dpop="always" if u.dpop else "never")
                for u in ups.values()
            ),
            policy=POLICY,
            settings=table("[oauth]", discovery_ttl_seconds=86400),
            metrics_port=metrics_port,
        )
        attacker = Attacker(w.cg, tmp)
        w.stack.callback(attacker.close)
        harness = Exchanges(tmp, ups, agent, attacker, f"127.0.0.1:{metrics_port}")
        harness.warm()
        yield harness


def fuzz_examples(default: int) -> int:
    """`make fuzz` sets CREDLESS_FUZZ_EXAMPLES for a longer run."""
    return int(os.environ.get("CREDLESS_FUZZ_EXAMPLES") or default)
