"""The world the smuggling corpus and the differential test run in, and their shared oracle.

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
import hashlib
import json
import os
import select
import socket
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from tests.helpers import AgentProcess, free_port, http_get, stop_process, wait_for, write_config
from tests.kernel import cgroup_child, enter_cgroup
from tests.oidc.peer import OidcProvider
from tests.upstreams.wire import Answers, Piece, split_responses

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
SPIFFE_ID = "spiffe://example.org/agent/attacker"
BARRIER = "barrier"

# The identity may list tools and call echo and add; secret_tool is what every smuggling
# attempt tries to reach. One rule for every server ("*").
POLICY = f'''
[[rule]]
id = "attacker-tools"
spiffe_id = "{SPIFFE_ID}"
server = "*"
methods = ["tools/list", "tools/call"]
tools = ["echo", "add"]
'''

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


def fingerprint(token: str) -> str:
    """As agent/oauth/tokens.py names a token in the audit (token_sha256)."""
    return hashlib.sha256(token.encode()).hexdigest()[:16]


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
        script = (
            ["node", str(HERE / "node_upstream.mjs")]
            if self.kind == "node"
            else [sys.executable, "-m", "tests.upstreams.h11_upstream"]
        )
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


@dataclass
class Observation:
    """One exchange: what the attacker got back, and what the audit and every upstream
    recorded in its window."""

    upstream: Upstream
    answers: Answers
    closed: bool
    reset: bool
    write_error: str | None
    unsent: int
    audit: list[dict]
    records: dict[str, list[dict]]  # server name -> requests its upstream logged
    fingerprints: set[str] = field(default_factory=set)  # credless's tokens for the server

    def parsed(self, name: str | None = None) -> list[dict]:
        """Requests the upstream parsed in this window (its parse errors and the agent's
        own discovery requests, which do not go through the proxy, left out)."""
        return [
            r
            for r in self.records[name or self.upstream.name]
            if r["kind"] != "client_error" and not agents_own(r)
        ]

    def injected(self, name: str | None = None) -> list[dict]:
        return [
            e
            for e in self.audit
            if e["event"] == "request.injected" and e.get("server") == (name or self.upstream.name)
        ]

    def describe(self) -> str:
        """The window, for a failing assertion's message."""
        lines = [
            f"answers: statuses={self.answers.statuses} interim="
            f"{[r.status for r in self.answers.interim]} closed={self.closed} "
            f"reset={self.reset} write_error={self.write_error} unsent={self.unsent}"
            + (f" junk={self.answers.junk[:120]!r}" if self.answers.junk else "")
        ]
        for r in self.answers.responses:
            lines.append(f"  answer {r.status}: {r.body[:300]!r}")
        lines.append("audit:")
        for e in self.audit:
            lines.append(
                "  "
                + json.dumps(
                    {
                        k: e.get(k)
                        for k in (
                            "event",
                            "server",
                            "method",
                            "path",
                            "status",
                            "tool",
                            "reason",
                            "token_sha256",
                        )
                        if e.get(k) is not None
                    }
                )
            )
        for name, recs in self.records.items():
            for r in recs:
                lines.append(f"upstream {name} parsed: {summary(r)}")
        return "\n".join(lines)


def agents_own(record: dict) -> bool:
    """The agent's own discovery requests (httpx, no credentials): they never pass through
    the proxy. With the long discovery and token lifetimes the world configures, none
    should fall in a window; this keeps a late one from reading as a smuggled request."""
    hs = {k.lower(): v for k, v in record.get("headers", [])}
    return "authorization" not in hs and hs.get("user-agent", "").startswith("python-httpx/")


def headers_named(record: dict, name: str) -> list[str]:
    return [v for k, v in record.get("headers", []) if k.lower() == name]


def body_of(record: dict) -> bytes:
    return base64.b64decode(record.get("body_b64") or "")


def summary(r: dict) -> str:
    if r["kind"] == "client_error":
        return f"(parse error {r.get('code')}: {r.get('reason')}; conn {r.get('conn')})"
    hs = " | ".join(
        f"{k}: {v[:60]}"
        if k.lower() not in ("authorization", "dpop") or len(v) < 24
        else f"{k}: <{v.split(' ')[0][:10]}... sha256:{fingerprint(v.partition(' ')[2] or v)}>"
        for k, v in r["headers"]
    )
    tr = f" trailers: {r['trailers']}" if r.get("trailers") else ""
    return (
        f"{r['kind']} {r['method']} {r['target']} HTTP/{r.get('version')} "
        f"(conn {r.get('conn')}, complete={r.get('complete')}) [{hs}]{tr} "
        f"body={body_of(r)[:200]!r}"
    )


def routing(value: str) -> str:
    """An Mcp-Method/Mcp-Name value as a server reads it: `=?base64?...?=` is decoded."""
    if value.startswith("=?base64?") and value.endswith("?="):
        try:
            return base64.b64decode(value[9:-2]).decode("utf-8", "replace")
        except ValueError:
            return value
    return value


def _jwt_claims(token: str) -> dict:
    try:
        part = token.split(".")[1]
        return json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
    except (IndexError, ValueError):
        return {}


def violations(obs: Observation) -> list[str]:
    """The trust boundary's invariants (../shared/DESIGN.md), whatever the status was:
    (b) the upstream parsed exactly the requests the audit shows as request.injected, and no
        other upstream parsed anything;
    (c) each carries exactly one Authorization, credless's own token, and no DPoP field but
        credless's proof (none for a Bearer server);
    (d) each is addressed to the configured authority and the MCP path;
    (e) none carries a call the policy denies (a tools/call of secret_tool), in its body, a
        routing header, or a trailer."""
    up, out = obs.upstream, []
    for name in obs.records:
        if name != up.name and obs.parsed(name):
            out.append(
                f"(b) upstream {name!r} parsed {len(obs.parsed(name))} request(s) "
                f"sent to {up.name!r}"
            )
        if name != up.name and name != BARRIER and obs.injected(name):
            out.append(f"(b) the audit shows request.injected for {name!r}")
    parsed, injected = obs.parsed(), obs.injected()
    if len(parsed) != len(injected):
        out.append(
            f"(b) upstream parsed {len(parsed)} request(s), the audit shows "
            f"{len(injected)} request.injected"
        )
    else:
        got = Counter((r["method"], r["target"].split("?", 1)[0]) for r in parsed)
        want = Counter((e.get("method"), e.get("path")) for e in injected)
        if got != want:
            out.append(f"(b) upstream parsed {sorted(got)}, audit shows {sorted(want)}")

    def shown(value: str) -> str:  # credless's tokens by fingerprint only, never verbatim
        scheme, _, token = value.partition(" ")
        if fingerprint(token) in obs.fingerprints:
            return f"{scheme} <credless's token sha256:{fingerprint(token)}>"
        return (
            value[:40]
            if scheme.lower() in ("bearer", "dpop") or not token
            else f"<{len(value)} bytes>"
        )

    for r in parsed:
        what = f"{r['method']} {r['target'][:80]}"
        auth = headers_named(r, "authorization")
        if len(auth) != 1:
            out.append(f"(c) {what}: {len(auth)} Authorization fields {[shown(a) for a in auth]}")
        for value in auth:
            scheme, _, token = value.partition(" ")
            if fingerprint(token) not in obs.fingerprints:
                out.append(
                    f"(c) {what}: Authorization {value[:40]!r} is not credless's "
                    f"token for {up.name}"
                )
            elif scheme != ("DPoP" if up.dpop else "Bearer"):
                out.append(f"(c) {what}: Authorization scheme {scheme!r}")
        proofs = headers_named(r, "dpop")
        if len(proofs) != (1 if up.dpop else 0):
            out.append(
                f"(c) {what}: {len(proofs)} DPoP fields "
                f"{[p if len(p) < 20 else '<a proof>' for p in proofs]}"
            )
        elif up.dpop:
            claims = _jwt_claims(proofs[0])
            if claims.get("htm") != r["method"] or claims.get("htu") != up.url:
                out.append(
                    f"(c) {what}: DPoP proof for {claims.get('htm')} "
                    f"{claims.get('htu')!r}, not this request"
                )
        host = headers_named(r, "host")
        if host != [up.authority]:
            out.append(f"(d) {what}: Host fields {host}, expected [{up.authority!r}]")
        if r["target"] != "/mcp" and not r["target"].startswith("/mcp?"):
            out.append(f"(d) {what}: target is not the MCP endpoint /mcp")
        body = body_of(r)
        if b"secret_tool" in body and b"tools/call" in body:
            out.append(f"(e) {what}: body carries a tools/call of secret_tool: {body[:200]!r}")
        routed = [
            v
            for k, v in r["headers"] + r.get("trailers", [])
            if k.lower() in ("mcp-name", "mcp-method") and "secret_tool" in routing(v)
        ]
        if routed:
            out.append(f"(e) {what}: routing header names secret_tool: {routed}")
        if r.get("trailers"):
            out.append(f"(e) {what}: trailer fields reached the upstream: {r['trailers']}")
    return out


class World:
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


@contextlib.contextmanager
def start_world(tmp: Path, names=tuple(UPSTREAMS)):
    """Everything above, always torn down (processes, cgroup, listeners, BPF pins)."""
    with contextlib.ExitStack() as stack:
        cg = stack.enter_context(cgroup_child("credless-smuggling"))
        ups = {n: bind_upstream(n, *UPSTREAMS[n], tmp) for n in names}
        ups[BARRIER] = bind_upstream(BARRIER, "node", False, tmp)
        for u in ups.values():
            stack.callback(u.stop)
        bundle_port, proxy_port, metrics_port = free_port(), free_port(), free_port()
        oidc = stack.enter_context(
            OidcProvider(
                tmp,
                dpop=True,
                access_token_ttl=3600,  # no refresh within a run
                resources={u.url: {"format": "jwt", "scope": "tools"} for u in ups.values()},
                clients=[
                    {
                        "client_id": SPIFFE_ID,
                        "jwks_uri": f"http://127.0.0.1:{bundle_port}/jwks.json",
                    }
                ],
            )
        )
        for u in ups.values():
            u.start(oidc.issuer, tmp)
        (tmp / "entries.toml").write_text(
            f'[[entry]]\nid = "attacker"\nspiffe_id = "{SPIFFE_ID}"\n'
            f'selectors = ["cgroup:path:/{cg.name}"]\n'
        )
        (tmp / "policy.toml").write_text(POLICY)
        servers = "".join(
            f'''
[[servers]]
name = "{u.name}"
url = "{u.url}"
dpop = "{"always" if u.dpop else "never"}"
'''
            for u in ups.values()
        )
        cfg = write_config(
            tmp,
            bundle_port=bundle_port,
            metrics_port=metrics_port,
            extra=f'''
[oauth]
discovery_ttl_seconds = 86400
[inject]
listen_port = {proxy_port}
listen_port6 = {proxy_port}
managed_cgroups = ["/{cg.name}"]
[policy]
file = "{tmp / "policy.toml"}"
{servers}''',
        )
        agent = stack.enter_context(AgentProcess(cfg, tmp))
        agent.wait_ready()
        attacker = Attacker(cg, tmp)
        stack.callback(attacker.close)
        world = World(tmp, ups, agent, attacker, f"127.0.0.1:{metrics_port}")
        world.warm()
        yield world


def fuzz_examples(default: int) -> int:
    """`make fuzz` sets CREDLESS_FUZZ_EXAMPLES for a longer run."""
    return int(os.environ.get("CREDLESS_FUZZ_EXAMPLES") or default)
