"""Property-based differential test of the data path (issue 14), on the real kernel.

Hypothesis takes valid MCP requests (a tools/call of echo, tools/list, a batch, a
notification, an SSE GET, a session DELETE; Content-Length or chunked) and mutates them the
ways smuggling and confusion attacks do: duplicated, inserted and deleted framing, routing
and credential fields; case and whitespace games; CR, LF, NUL, space and tab where they do
not belong; other methods, targets and versions; trailers; a request hidden in a body;
pipelining split across writes. Each example goes, byte for byte, through credless to two
real parsers, Node's llhttp (Bearer tokens) and uvicorn's h11 (DPoP-bound tokens), from a
workload in a managed cgroup.

What the proxy answers is not asserted (a mutation may or may not break a request); the
trust boundary's invariants are (tests/upstreams/oracle.py `violations`: the upstream
parsed exactly what the audit shows as injected, with credless's credential alone, to the
configured authority and path, never the denied tool), and both parsers must have parsed
the same requests: what the proxy forwards is re-framed, so no two parsers read it
differently.

`make test` runs a bounded, derandomized set (reproducible in CI); `make fuzz` runs many
more (CREDLESS_FUZZ_EXAMPLES) with fresh randomness and shrinks what it finds.
"""

from __future__ import annotations

import itertools
import json
import os
from dataclasses import dataclass, field, replace

import pytest
from hypothesis import HealthCheck, Phase, given, note, settings
from hypothesis import strategies as st

from tests.upstreams.harness import fuzz_examples, start_world
from tests.upstreams.oracle import violations
from tests.upstreams.wire import Piece

pytestmark = pytest.mark.kernel

# both parsers, and both kinds of token (the corpus runs every combination)
UPSTREAMS = ("node", "h11-dpop")
FUZZING = bool(os.environ.get("CREDLESS_FUZZ_EXAMPLES"))
AUTHORITY = b"${AUTHORITY}"
CL = b"${CL}"  # the body's length, filled in when the message is rendered


def rpc(method: str, id_: int | None = 1, **params) -> dict:
    msg: dict = {"jsonrpc": "2.0", "method": method}
    if id_ is not None:
        msg["id"] = id_
    if params:
        msg["params"] = params
    return msg


def call(tool: str, id_: int = 1, **args) -> dict:
    return rpc("tools/call", id_, name=tool, arguments=args)


# The valid requests mutations start from: (method, body or None).
BASES = {
    "echo": ("POST", call("echo", text="hi")),
    "add": ("POST", call("add", a=2, b=3)),
    "list": ("POST", rpc("tools/list")),
    "batch": ("POST", [call("echo", 1, text="a"), call("add", 2, a=1, b=2)]),
    "notification": ("POST", rpc("notifications/initialized", None)),
    "denied": ("POST", call("secret_tool")),  # must never reach an upstream
    "sse": ("GET", None),
    "end_session": ("DELETE", None),
}

# Values worth trying per field name: valid, subtly different, and hostile.
FIELD_VALUES = {
    b"Host": [
        AUTHORITY,
        b"other-vhost",
        b"127.0.0.1",
        b"",
        AUTHORITY + b".",
        b"localhost",
        b"elsewhere:" + AUTHORITY,
    ],
    b"Content-Length": [
        CL,
        b"0",
        b"1",
        b"-1",
        b"+" + CL,
        CL + b"0",
        b" " + CL,
        b"0x10",
        b"99999",
        CL + b", " + CL,
    ],
    b"Transfer-Encoding": [
        b"chunked",
        b"gzip",
        b"chunked, identity",
        b"identity",
        b"Chunked",
        b" chunked",
        b"chunked\t",
        b"gzip, chunked",
        b"x",
        b"chunked,",
    ],
    b"Authorization": [b"Bearer forged", b"Basic Zm9vOmJhcg==", b"DPoP forged", b""],
    b"DPoP": [b"x", b"forged.proof.jwt"],
    b"Mcp-Method": [b"tools/call", b"tools/list", b"=?base64?dG9vbHMvY2FsbA==?="],
    b"Mcp-Name": [b"echo", b"secret_tool", b"=?base64?c2VjcmV0X3Rvb2w=?="],
    b"Expect": [b"100-continue", b"nonsense"],
    b"Connection": [
        b"close",
        b"keep-alive",
        b"Upgrade",
        b"authorization",
        b"Authorization, DPoP",
        b"host",
        b"content-length",
        b"transfer-encoding",
    ],
    b"Upgrade": [b"websocket", b"h2c"],
    b"Trailer": [b"Authorization", b"Mcp-Name"],
}
NAMES = list(FIELD_VALUES)
VALUES_BY_NAME = {k.lower(): v for k, v in FIELD_VALUES.items()}
METHODS = [
    b"GET",
    b"POST",
    b"PUT",
    b"DELETE",
    b"TRACE",
    b"CONNECT",
    b"OPTIONS",
    b"HEAD",
    b"PATCH",
    b"post",
    b"POST\t",
    b"GE T",
]
TARGETS = [
    b"/mcp",
    b"/mcp?session=1",
    b"/not-mcp",
    b"http://" + AUTHORITY + b"/mcp",
    b"http://elsewhere/mcp",
    b"*",
    b"/mcp/../admin",
    b"/%6dcp",
    b"//mcp",
    b"/MCP",
    AUTHORITY,
    b"/mcp#frag",
    b"/mcp/",
]
VERSIONS = [
    b"HTTP/1.1",
    b"HTTP/1.0",
    b"HTTP/2.0",
    b"HTTP/1.10",
    b"http/1.1",
    b"HTTP/1.1 ",
    b"HTTP/0.9",
    b"",
]
STRAY = [b"\r", b"\n", b"\r\n", b"\x00", b" ", b"\t", b"\x7f", b"\xff", b"\x0b"]
TRAILERS = [
    (b"Authorization", b"Bearer OWN"),
    (b"Mcp-Name", b"secret_tool"),
    (b"DPoP", b"forged"),
    (b"X-Trailer", b"1"),
    (b"Content-Length", b"0"),
]
HIDDEN = (
    b"POST /mcp HTTP/1.1\r\nHost: " + AUTHORITY + b"\r\nContent-Type: application/json"
    b"\r\nContent-Length: %d\r\n\r\n%s"
)
SECRET = json.dumps(call("secret_tool"), separators=(",", ":")).encode()


@dataclass
class Message:
    """One request, kept as parts so mutations stay meaningful and rendering can fill in the
    upstream's authority and the lengths."""

    method: bytes
    target: bytes
    version: bytes
    fields: list[list[bytes]]  # [name, separator, value]
    body: bytes = b""
    chunked: bool = False
    chunk_size: int = 64
    trailers: list[tuple[bytes, bytes]] = field(default_factory=list)
    hidden: bytes = b""  # bytes after the body: a request in hiding
    hidden_counted: bool = False  # ... inside Content-Length, or after it
    strays: list[tuple[int, float, bytes]] = field(default_factory=list)
    line_ends: dict[int, bytes] = field(default_factory=dict)

    def render(self, authority: bytes) -> bytes:
        body = self.body
        hidden = self.hidden.replace(AUTHORITY, authority)
        length = len(body) + (len(hidden) if self.hidden_counted else 0)
        lines = [
            b"%s %s %s" % (self.method, self.target.replace(AUTHORITY, authority), self.version)
        ]
        lines += [
            n + sep + v.replace(AUTHORITY, authority).replace(CL, b"%d" % length)
            for n, sep, v in self.fields
        ]
        for line, at, stray in self.strays:
            i = line % len(lines)
            cut = int(at * len(lines[i]))
            lines[i] = lines[i][:cut] + stray + lines[i][cut:]
        head = b"".join(ln + self.line_ends.get(i, b"\r\n") for i, ln in enumerate(lines))
        if self.chunked:
            chunks = b"".join(
                b"%x\r\n%s\r\n"
                % (len(body[i : i + self.chunk_size]), body[i : i + self.chunk_size])
                for i in range(0, len(body), self.chunk_size)
            )
            trailers = b"".join(n + b": " + v + b"\r\n" for n, v in self.trailers)
            return head + b"\r\n" + chunks + b"0\r\n" + trailers + b"\r\n" + hidden
        return head + b"\r\n" + body + hidden


@dataclass
class Example:
    messages: list[Message]
    cuts: list[float]  # where the bytes are split into separate writes
    mutations: list[str]

    def __repr__(self) -> str:
        return f"Example({'; '.join(self.mutations)})"

    def _repr_pretty_(self, p, cycle) -> None:  # how Hypothesis shows a falsifying example
        p.text(repr(self))

    def pieces(self, authority: bytes) -> list[Piece]:
        data = b"".join(m.render(authority) for m in self.messages)
        at = sorted({int(c * len(data)) for c in self.cuts} - {0, len(data)})
        bounds = [0, *at, len(data)]
        return [Piece(data[a:b]) for a, b in itertools.pairwise(bounds)]


def base_message(kind: str, rid: int, chunked: bool) -> Message:
    method, doc = BASES[kind]
    if isinstance(doc, dict) and "id" in doc:
        doc = {**doc, "id": rid}
    body = b"" if doc is None else json.dumps(doc, separators=(",", ":")).encode()
    fields = [[b"Host", b": ", AUTHORITY]]
    if body:
        fields += [
            [b"Content-Type", b": ", b"application/json"],
            [b"Accept", b": ", b"application/json, text/event-stream"],
            [b"Transfer-Encoding", b": ", b"chunked"]
            if chunked
            else [b"Content-Length", b": ", CL],
        ]
    else:
        fields += [[b"Accept", b": ", b"text/event-stream"], [b"Mcp-Session-Id", b": ", b"s1"]]
    return Message(method.encode(), b"/mcp", b"HTTP/1.1", fields, body, chunked and bool(body))


@st.composite
def mutated(draw, m: Message, log: list[str]) -> Message:
    """Apply 0-4 mutations to m (a copy), recording each in log."""
    m = replace(
        m,
        fields=[list(f) for f in m.fields],
        trailers=list(m.trailers),
        strays=list(m.strays),
        line_ends=dict(m.line_ends),
    )
    for _ in range(draw(st.integers(0, 4))):
        kind = draw(
            st.sampled_from(
                [
                    "duplicate",
                    "insert",
                    "delete",
                    "case",
                    "space",
                    "stray",
                    "method",
                    "target",
                    "version",
                    "trailers",
                    "hidden",
                    "fold",
                    "line_end",
                    "rechunk",
                ]
            )
        )
        n = len(m.fields)
        if kind == "duplicate" and n:
            src = m.fields[draw(st.integers(0, n - 1))]
            values = VALUES_BY_NAME.get(src[0].lower(), [src[2]])
            value = draw(st.sampled_from([src[2], *values]))
            m.fields.insert(draw(st.integers(0, n)), [src[0], src[1], value])
            log.append(f"duplicate {src[0].decode()}: {value!r}")
        elif kind == "insert":
            name = draw(st.sampled_from(NAMES))
            value = draw(st.sampled_from(FIELD_VALUES[name]))
            m.fields.insert(draw(st.integers(0, n)), [name, b": ", value])
            log.append(f"insert {name.decode()}: {value!r}")
        elif kind == "delete" and n:
            gone = m.fields.pop(draw(st.integers(0, n - 1)))
            log.append(f"delete {gone[0].decode()}")
        elif kind == "case" and n:
            f = m.fields[draw(st.integers(0, n - 1))]
            how = draw(st.sampled_from(["lower", "upper", "swapcase"]))
            f[0] = getattr(f[0], how)()
            log.append(f"{how}case {f[0].decode()}")
        elif kind == "space" and n:
            f = m.fields[draw(st.integers(0, n - 1))]
            where = draw(
                st.sampled_from(
                    ["before value", "after value", "tab before value", "before colon", "no space"]
                )
            )
            if where == "before value":
                f[2] = b" " + f[2]
            elif where == "after value":
                f[2] = f[2] + b" "
            elif where == "tab before value":
                f[2] = b"\t" + f[2]
            elif where == "before colon":
                f[1] = b" " + f[1]
            else:
                f[1] = b":"
            log.append(f"whitespace {where} in {f[0].decode()}")
        elif kind == "stray":
            stray = draw(st.sampled_from(STRAY))
            at = (draw(st.integers(0, 20)), draw(st.floats(0, 1)), stray)
            m.strays.append(at)
            log.append(f"stray {stray!r} in head line {at[0]} at {at[1]:.2f}")
        elif kind == "method":
            m.method = draw(st.sampled_from(METHODS))
            log.append(f"method {m.method!r}")
        elif kind == "target":
            m.target = draw(st.sampled_from(TARGETS))
            log.append(f"target {m.target!r}")
        elif kind == "version":
            m.version = draw(st.sampled_from(VERSIONS))
            log.append(f"version {m.version!r}")
        elif kind == "trailers":
            m.trailers += draw(st.lists(st.sampled_from(TRAILERS), min_size=1, max_size=3))
            if not m.chunked:
                m.chunked = True
                m.fields = [f for f in m.fields if f[0].lower() != b"content-length"]
                m.fields.append([b"Transfer-Encoding", b": ", b"chunked"])
            log.append(f"trailers {m.trailers}")
        elif kind == "hidden":
            m.hidden = HIDDEN % (len(SECRET), SECRET)
            m.hidden_counted = draw(st.booleans())
            log.append(
                "hidden request after the body"
                + (", inside its Content-Length" if m.hidden_counted else "")
            )
        elif kind == "fold" and n:
            f = m.fields[draw(st.integers(0, n - 1))]
            f[2] = f[2] + draw(st.sampled_from([b"\r\n x", b"\r\n\tx"]))
            log.append(f"fold {f[0].decode()}")
        elif kind == "line_end":
            line = draw(st.integers(0, 20))
            end = draw(st.sampled_from([b"\n", b"\r", b"\r\r\n", b"\n\r"]))
            m.line_ends[line % (n + 1)] = end
            log.append(f"line {line % (n + 1)} ends {end!r}")
        elif kind == "rechunk" and m.body:
            m.chunk_size = draw(st.integers(1, 128))
            log.append(f"chunks of {m.chunk_size}")
    return m


@st.composite
def examples(draw) -> Example:
    log: list[str] = []
    messages = []
    for rid in range(1, draw(st.integers(1, 3)) + 1):
        kind = draw(st.sampled_from(sorted(BASES)))
        m = base_message(kind, rid, draw(st.booleans()))
        log.append(f"request {rid}: {kind}{' chunked' if m.chunked else ''}")
        messages.append(draw(mutated(m, log)))
    cuts = draw(st.lists(st.floats(0, 1), max_size=2))
    if cuts:
        log.append(f"written in {len(cuts) + 1} pieces")
    return Example(messages, cuts, log)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    with start_world(tmp_path_factory.mktemp("differential"), names=UPSTREAMS) as w:
        yield w


def parsed_requests(obs) -> list[tuple]:
    """What an upstream made of what it was sent, minus what must differ between upstreams
    (the authority, the credential)."""
    return [(r["method"], r["target"], r["body_sha256"], r["complete"]) for r in obs.parsed()]


# make test: a bounded, derandomized run that reports the first failing example as found
# (each shrink step is a real exchange: shrinking belongs to make fuzz, which has the time)
@settings(
    max_examples=fuzz_examples(30),
    deadline=None,
    derandomize=not FUZZING,
    database=None,
    print_blob=FUZZING,
    phases=[Phase.explicit, Phase.generate] + ([Phase.shrink] if FUZZING else []),
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.filter_too_much,
    ],
)
@given(example=examples())
def test_whatever_the_workload_sends_both_parsers_see_only_what_the_proxy_decided(world, example):
    note("mutations: " + "; ".join(example.mutations))
    seen, problems = {}, []
    for name in UPSTREAMS:
        up = world.upstreams[name]
        pieces = example.pieces(up.authority.encode())
        note(f"bytes for {name}: {b''.join(p.data for p in pieces)[:3000]!r}")
        obs = world.exchange(up, pieces, expect=len(example.messages), idle=0.5, linger=0.05)
        seen[name] = parsed_requests(obs)
        found = violations(obs)
        if found:
            problems += [f"{name}: {p}" for p in found]
            note(f"{name}:\n{obs.describe()}")
    if len({tuple(v) for v in seen.values()}) > 1:
        problems.append(f"the parsers disagree on what they were sent: {seen}")
    assert not problems, "\n".join(problems)
