"""Bytes on the wire, without dependencies (the attacker process imports this too).

- The corpus format (tests/testdata/smuggling/*.http): raw request bytes written as text,
  so CR, LF, NUL and friends stay exact and visible in review.
- A lenient HTTP/1.1 response splitter: how many answers a connection carried, and their
  statuses, whatever the proxy sent (it must not trust what it reads any more than the
  proxy should).

Corpus file format. Lines starting with `#` are comments. Every other line contributes its
text without its newline; line breaks on the wire are written as escapes:
  \\r \\n \\t \\xHH \\\\        the byte they name (nothing else may follow a backslash)
  ${AUTHORITY}               the upstream's configured authority, 127.0.0.1:PORT
  ${PORT}                    its port
  ${REPEAT:N:text}           text (escapes already decoded) N times
A line that is exactly `%%` ends a piece: the attacker writes the pieces one after another
(a few milliseconds apart); `%% wait` first waits for one more final response.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

_ESCAPE = re.compile(r"\\(x[0-9A-Fa-f]{2}|[rnt\\]|.|$)")
_SIMPLE = {"r": b"\r", "n": b"\n", "t": b"\t", "\\": b"\\"}
_MACRO = re.compile(rb"\$\{(AUTHORITY|PORT|REPEAT:(\d+):(.*?))\}", re.DOTALL)


def decode_line(line: str) -> bytes:
    out, pos = bytearray(), 0
    for m in _ESCAPE.finditer(line):
        out += line[pos : m.start()].encode("latin-1")
        code = m.group(1)
        if code in _SIMPLE:
            out += _SIMPLE[code]
        elif code.startswith("x") and len(code) == 3:
            out.append(int(code[1:], 16))
        else:
            raise ValueError(f"unknown escape \\{code} in {line!r}")
        pos = m.end()
    out += line[pos:].encode("latin-1")
    return bytes(out)


@dataclass(frozen=True)
class Piece:
    data: bytes
    wait_response: bool = False  # wait for one more final response before writing it


def expand(data: bytes, port: int) -> bytes:
    def one(m: re.Match) -> bytes:
        if m.group(1) == b"AUTHORITY":
            return b"127.0.0.1:%d" % port
        if m.group(1) == b"PORT":
            return b"%d" % port
        return m.group(3) * int(m.group(2))

    return _MACRO.sub(one, data)


def load_pieces(text: str, port: int) -> list[Piece]:
    pieces, current, wait = [], bytearray(), False
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        if line.strip() in ("%%", "%% wait"):
            pieces.append(Piece(expand(bytes(current), port), wait))
            current, wait = bytearray(), line.strip() == "%% wait"
            continue
        current += decode_line(line)
    pieces.append(Piece(expand(bytes(current), port), wait))
    return [p for p in pieces if p.data]


# ---------------------------------------------------------------- responses
@dataclass
class Response:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes = b""
    complete: bool = True

    def header(self, name: bytes) -> bytes | None:
        for k, v in self.headers:
            if k.lower() == name:
                return v
        return None


@dataclass
class Answers:
    """What came back on one connection: final responses in order, interim (1xx) ones apart,
    and whatever did not parse as a response (which the oracle reports)."""

    responses: list[Response] = field(default_factory=list)
    interim: list[Response] = field(default_factory=list)
    junk: bytes = b""

    @property
    def statuses(self) -> list[int]:
        return [r.status for r in self.responses]

    @property
    def complete(self) -> int:
        return sum(r.complete for r in self.responses)


def _chunked(data: bytes, pos: int) -> int | None:
    """End of a chunked body starting at pos, or None if it has not all arrived."""
    while True:
        eol = data.find(b"\r\n", pos)
        if eol < 0:
            return None
        try:
            size = int(data[pos:eol].split(b";")[0].strip(), 16)
        except ValueError:  # not chunked after all: the rest is this body, unended
            return None
        pos = eol + 2
        if size == 0:
            while True:  # trailer section up to an empty line
                eol = data.find(b"\r\n", pos)
                if eol < 0:
                    return None
                if eol == pos:
                    return eol + 2
                pos = eol + 2
        if len(data) < pos + size + 2:
            return None
        pos += size + 2


def split_responses(data: bytes, eof: bool = True) -> Answers:
    """Split what a connection carried into HTTP/1.1 responses. Lenient: a body without
    framing runs to the end; a response to HEAD (a Content-Length but the next response
    follows at once) is taken as bodiless."""
    out, pos = Answers(), 0
    while pos < len(data):
        if not data.startswith(b"HTTP/", pos):
            out.junk = data[pos:]
            break
        end = data.find(b"\r\n\r\n", pos)
        if end < 0:
            out.junk = data[pos:]
            break
        lines = data[pos:end].split(b"\r\n")
        try:
            status = int(lines[0].split(b" ")[1])
        except (IndexError, ValueError):
            out.junk = data[pos:]
            break
        headers = [
            tuple(part.strip() for part in ln.split(b":", 1)) for ln in lines[1:] if b":" in ln
        ]
        r = Response(status, headers)
        body_at = end + 4
        te = (r.header(b"transfer-encoding") or b"").lower()
        cl = r.header(b"content-length")
        if 100 <= status < 200 or status in (204, 304):
            stop = body_at
        elif b"chunked" in te:
            stop = _chunked(data, body_at)
        elif cl is not None and cl.strip().isdigit():
            n = int(cl)
            stop = body_at + n
            if n and data.startswith(b"HTTP/1.", body_at):  # HEAD: no body followed
                stop = body_at
        else:
            stop = len(data) if eof else None
        if stop is None or stop > len(data):
            r.body, r.complete = data[body_at:], False
            out.responses.append(r)
            break
        r.body = data[body_at:stop]
        (out.interim if 100 <= status < 200 else out.responses).append(r)
        pos = stop
    return out


# ---------------------------------------------------------------- corpus index
@dataclass(frozen=True)
class Case:
    name: str
    statuses: tuple[int, ...]
    close: bool  # the proxy must close the connection after its answer(s)
    upstream: int  # requests the upstream must parse (0: nothing reaches it)
    jsonrpc_error: bool  # the (last) answer is a JSON-RPC error object
    why: str
    text: str  # the .http file

    def pieces(self, port: int) -> list[Piece]:
        return load_pieces(self.text, port)

    @property
    def refused(self) -> bool:
        return any(s >= 400 for s in self.statuses)


def load_corpus(directory: Path) -> list[Case]:
    """index.tsv: case, statuses, close, upstream, answer, why (see its header)."""
    cases = []
    for line in (directory / "index.tsv").read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        name, statuses, close, upstream, answer, why = line.split("\t")
        if close not in ("close", "-") or answer not in ("jsonrpc", "-"):
            raise ValueError(f"index.tsv: bad row {line!r}")
        cases.append(
            Case(
                name,
                tuple(int(s) for s in statuses.split(",")),
                close == "close",
                int(upstream),
                answer == "jsonrpc",
                why,
                (directory / f"{name}.http").read_text(),
            )
        )
    files = {p.stem for p in directory.glob("*.http")}
    if files != {c.name for c in cases}:
        raise ValueError(
            f"index.tsv and the .http files disagree: {sorted(files ^ {c.name for c in cases})}"
        )
    return cases
