"""HTTP/1.1 message framing for the proxy, sans-IO: bytes in, events out, bytes to send.

Parsing is httptools (llhttp, the parser Node.js ships): a C parser that does the framing
(Content-Length, chunked, keep-alive, upgrades, pipelined messages) correctly and, chosen for
speed, costs a few microseconds a message where a pure-Python parser costs tens. This module
only turns its callbacks into an ordered list of events the proxy consumes, and renders heads
and body chunks back into wire bytes.
"""

from __future__ import annotations

import contextlib
import re
from typing import Final, Literal, TypeAlias

import httptools

# Connection management that belongs to one hop (RFC 9110 7.6.1). Framing headers
# (Transfer-Encoding, Content-Length) are not among them: the proxy keeps each message's
# framing and re-chunks chunked bodies itself.
CONNECTION_HEADERS = frozenset({b"connection", b"keep-alive", b"proxy-connection"})
_FRAMING = frozenset({b"transfer-encoding", b"content-length"})


def strip_connection_headers(head: Head) -> None:
    """Remove Connection, the headers it names, Keep-Alive and Proxy-Connection: each side
    of the proxy manages its own connection (a server closing its connection to the proxy
    does not close the workload's, and the reverse)."""
    if head.names.isdisjoint(CONNECTION_HEADERS):
        return
    named = set(CONNECTION_HEADERS)
    for k, v in head.headers:
        if k.lower() == b"connection":
            named.update(t.strip().lower() for t in v.split(b","))
    head.remove(*(named - _FRAMING))


class ProtocolError(Exception):
    """What a peer sent cannot be framed as one HTTP/1.1 message the proxy accepts. status:
    the answer to give a workload (400, or 431 for a head over the limits); the connection
    is closed after it, since nothing after the error can be framed with confidence."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


# Limits on a request head (inject.max_head_bytes, inject.max_header_fields): without them a
# workload could make the proxy buffer a header of any size (httptools joins a field's pieces
# in memory) and stall every other connection on the loop while it does.
MAX_HEAD_BYTES = 64 << 10
MAX_HEADER_FIELDS = 100
# A server's response head: not the workload's limits (inject.max_head_bytes protects the
# proxy from workloads, and servers legitimately send more), but bounded all the same, so a
# hostile server cannot make the proxy hold or parse a head of any size
MAX_RESPONSE_HEAD_BYTES = 1 << 20


class Head:
    """A request or response head. Header names are kept as sent; lookups are lowercase.
    A plain class with slots, not a dataclass: the proxy makes two per request."""

    __slots__ = (
        "chunked",
        "headers",
        "keep_alive",
        "method",
        "names",
        "reason",
        "status",
        "target",
        "upgrade",
        "version",
    )

    def __init__(
        self,
        method: bytes = b"",
        target: bytes = b"",
        status: int = 0,
        reason: bytes = b"",
        version: str = "1.1",
        headers: list[tuple[bytes, bytes]] | None = None,
        keep_alive: bool = True,
        chunked: bool = False,
        upgrade: bool = False,
        names: set[bytes] | None = None,
    ):
        self.method, self.target, self.status, self.reason = method, target, status, reason
        self.version = version
        self.headers = [] if headers is None else headers
        self.keep_alive, self.chunked, self.upgrade = keep_alive, chunked, upgrade
        # the lower-case names present: most lookups are for headers a message does not
        # carry, and answering those without a scan matters at one lookup per header
        self.names = names if names is not None else {k.lower() for k, _ in self.headers}

    def add(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))
        self.names.add(name.lower())

    def get(self, name: bytes) -> bytes | None:
        if name not in self.names:
            return None
        for k, v in self.headers:
            if k.lower() == name:
                return v
        return None

    def remove(self, *names: bytes) -> list[bytes]:
        """Drop every header with one of the lowercase names; returns their names as sent."""
        if self.names.isdisjoint(names):
            return []
        removed = [k for k, _ in self.headers if k.lower() in names]
        self.headers = [(k, v) for k, v in self.headers if k.lower() not in names]
        self.names.difference_update(names)
        return removed

    def request_bytes(self) -> bytes:
        lines = [b"%s %s HTTP/1.1" % (self.method, self.target)]
        lines += [k + b": " + v for k, v in self.headers]
        return b"\r\n".join(lines) + b"\r\n\r\n"

    def response_bytes(self) -> bytes:
        lines = [b"HTTP/1.1 %d %s" % (self.status, self.reason)]
        lines += [k + b": " + v for k, v in self.headers]
        return b"\r\n".join(lines) + b"\r\n\r\n"


# What a Reader yields: a head, a piece of body, the end of a message. Plain ints, not an
# enum: they are compared once per event on the proxy's hot path.
HEAD: Final = 1
BODY: Final = 2
END: Final = 3
# The Literal values repeat the three above (typing cannot name a Final's value); a consumer
# that tests ev[0] gets ev[1]'s type.
Event: TypeAlias = tuple[Literal[1], Head] | tuple[Literal[2], bytes] | tuple[Literal[3], None]


class _Collector:
    def __init__(self, response: bool, max_head: int, max_fields: int):
        self.events: list[Event] = []
        self._response = response
        self._head = Head()  # replaced at each message's start, before any field of it
        self._url = b""
        self.parser: httptools.HttpRequestParser | httptools.HttpResponseParser = (
            httptools.HttpResponseParser(self) if response else httptools.HttpRequestParser(self)
        )
        self.in_message = False
        self.in_head = False  # between a message's start and the end of its head
        self.head_bytes = 0  # of the head being read, as the callbacks saw it
        self.heads = self.ends = 0  # heads and messages completed (for Reader.feed)
        self.max_head, self.max_fields = max_head, max_fields
        self.error: ProtocolError | None = None  # raised from a callback to stop llhttp

    def _fail(self, message: str, status: int = 400) -> None:
        self.error = ProtocolError(message, status)
        raise self.error

    def on_message_begin(self) -> None:
        self._head = Head()
        self._url = b""
        self.in_message = self.in_head = True
        self.head_bytes = 0

    def on_url(self, url: bytes) -> None:
        self._url += url
        self.head_bytes += len(url)

    def on_status(self, status: bytes) -> None:
        self._head.reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.in_head:
            # a field after a chunked body's last chunk: the trailer section. It is never
            # merged into the head (whose checks have run: credentials stripped, routing
            # fields compared with the body) and never relayed: a request carrying one is
            # refused, the way the proxy refuses any framing it does not need
            if not self._response:
                self._fail("trailer fields after a chunked body are not accepted")
            return  # a response's trailers are dropped: the proxy re-frames the body
        headers = self._head.headers
        headers.append((name, value))  # names: once, at the end of the head
        self.head_bytes += len(name) + len(value) + 4
        if not self._response and len(headers) > self.max_fields:
            self._fail(f"more than {self.max_fields} header fields", 431)

    def on_headers_complete(self) -> None:
        self.in_head = False
        self.heads += 1
        h = self._head
        h.names = {k.lower() for k, _ in h.headers}
        p = self.parser
        h.version = p.get_http_version()
        h.keep_alive = p.should_keep_alive()
        if self.head_bytes > self.max_head:  # a server's too: its 401 challenge is parsed
            self._fail(_too_large(self._response, self.max_head), 431)
        if isinstance(p, httptools.HttpResponseParser):
            h.chunked = _response_chunked(h)
            h.status = p.get_status_code()
        else:
            try:
                h.chunked = _request_chunked(h)
            except ProtocolError as e:
                self.error = e
                raise
            h.method = p.get_method()
            h.target = self._url
            h.upgrade = p.should_upgrade()
        self.events.append((HEAD, h))

    def on_body(self, body: bytes) -> None:
        # llhttp hands an empty piece at a cut-short chunk's EOF: a consumer re-chunking it
        # would write chunk(b""), the last-chunk, and end a message the peer never finished
        if body:
            self.events.append((BODY, body))

    def on_message_complete(self) -> None:
        self.events.append((END, None))
        self.in_message = False
        self.ends += 1


def _too_large(response: bool, limit: int) -> str:
    """The refusal of a head over its bound, whichever of the two counts found it."""
    return f"{'response' if response else 'request'} head larger than {limit} bytes"


def _response_chunked(h: Head) -> bool:
    """Whether a response's body is chunked as llhttp reads it: its last transfer coding,
    over every Transfer-Encoding field (`gzip` in one field and `chunked` in a second is
    chunked; the first field alone said it was not, and the body went to the workload
    de-chunked under a head that said chunked)."""
    codings = b",".join(v for k, v in h.headers if k.lower() == b"transfer-encoding")
    return codings.rsplit(b",", 1)[-1].strip().lower() == b"chunked"


def _request_chunked(h: Head) -> bool:
    """A request's framing, which must be exactly one of: no body, one Content-Length (llhttp
    refuses two, and Content-Length beside Transfer-Encoding), or one Transfer-Encoding field
    whose value is `chunked`. Anything else is refused, not interpreted: llhttp frames
    `Transfer-Encoding: gzip` + `Transfer-Encoding: chunked` as chunked while a proxy reading
    the first field would not, and a server that disagrees with the proxy about where a body
    ends reads a request hidden in it."""
    if b"transfer-encoding" not in h.names:
        return False
    codings = [v for k, v in h.headers if k.lower() == b"transfer-encoding"]
    if len(codings) != 1 or codings[0].strip(b" \t").lower() != b"chunked":
        raise ProtocolError(
            "Transfer-Encoding must be one field saying chunked, got "
            + ", ".join(repr(c.decode("latin-1")) for c in codings)
        )
    return True


class Reader:
    """Feed bytes; take events. One instance per direction of one connection."""

    def __init__(
        self,
        response: bool = False,
        max_head: int = MAX_HEAD_BYTES,
        max_fields: int = MAX_HEADER_FIELDS,
    ):
        self._c = _Collector(
            response, MAX_RESPONSE_HEAD_BYTES if response else max_head, max_fields
        )
        self.response = response
        self._head_fed = 0  # bytes fed while a request head stayed unfinished

    @property
    def in_message(self) -> bool:
        """A message has begun and not ended (between messages: False)."""
        return self._c.in_message

    def feed(self, data: bytes) -> list[Event]:
        c = self._c
        marks = c.heads + c.ends
        try:
            c.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            pass  # the upgrade event was recorded; the caller switches to raw bytes
        except httptools.HttpParserError as e:
            raise (c.error or ProtocolError(str(e))) from None
        # httptools holds an unfinished field in memory until its end arrives: bound what a
        # head may make it hold (the callbacks' count only sees finished fields), a
        # workload's or a server's
        if c.heads + c.ends != marks:  # a head or message ended: count afresh
            self._head_fed = 0
        elif c.in_head or not c.in_message:
            self._head_fed += len(data)
            if self._head_fed > c.max_head:
                raise ProtocolError(_too_large(self.response, c.max_head), 431)
        events, c.events = c.events, []
        return events

    def feed_eof(self) -> list[Event]:
        """A close-delimited response body ends at EOF."""
        if self.response:
            with contextlib.suppress(httptools.HttpParserError):
                self._c.parser.feed_data(b"")
        events, self._c.events = self._c.events, []
        return events


# The verbatim answer (WholeMessage, UpstreamSide._verbatim): a response carrying one of
# these hop-by-hop fields is not relayed as read (the caller allows `Connection:
# keep-alive`, true of both hops). Requests: request.py reads the lane's fields the same way.
# llhttp is strict here (no space before the colon, no folded lines, CRLF only:
# tests/unit/test_http1.py shows each refused), so a field with one of these names is always
# CRLF, the name in some case, and a colon: the pattern cannot miss one.
RESPONSE_HOP_FIELDS = re.compile(
    rb"\r\n(connection|keep-alive|proxy-connection|upgrade|trailer|transfer-encoding):"
    rb"([^\r]*)",
    re.IGNORECASE,
)


class WholeMessage:
    """Is a read exactly one whole HTTP/1.1 message? The common case for MCP (a JSON-RPC
    POST and its answer each arrive in one read), answered by httptools with no per-header
    callbacks: the proxy then relays the bytes as read, with only its own fields spliced in,
    instead of building a Head and rendering it again. One per direction of a connection,
    used only between messages; what it declines goes to a Reader, which never saw it."""

    def __init__(self, response: bool = False):
        self._cls = httptools.HttpResponseParser if response else httptools.HttpRequestParser
        self._parser = self._cls(self)
        self._begun = self._ended = 0
        # the last whole message's (llhttp resets its own at the message's end)
        self.url = self.method = b""
        self.status = 0
        self.version = ""
        self.keep_alive = False
        self.head_end = -1  # where the last whole message's head ends (its blank line)

    def on_message_begin(self) -> None:
        self._begun += 1

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_headers_complete(self) -> None:
        p = self._parser
        self.keep_alive = p.should_keep_alive()
        self.version = p.get_http_version()
        if isinstance(p, httptools.HttpResponseParser):
            self.status = p.get_status_code()
        else:
            self.method = p.get_method()

    def on_message_complete(self) -> None:
        self._ended += 1

    def one(self, data: bytes) -> bool:
        """Whether data is one whole message, nothing before or after it; then url, method
        or status, version, keep_alive and head_end describe it."""
        # llhttp skips empty lines before a message: they are something before it, and with
        # them the head's end (the first blank line) would be found before the head
        if data[:1] in (b"\r", b"\n"):
            return False
        self._begun = self._ended = 0
        self.url = b""
        try:
            self._parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade):
            self._parser = self._cls(self)  # the Reader will say what is wrong with it
            return False
        if self._begun == 1 and self._ended == 1:
            if not self.keep_alive:  # llhttp refuses anything after it: start clean
                self._parser = self._cls(self)
            self.head_end = data.find(b"\r\n\r\n")
            return True
        if self._begun != self._ended:  # stopped inside a message: start clean next time
            self._parser = self._cls(self)
        return False


def media_type(content_type: bytes | None) -> bytes:
    """A Content-Type's essence (RFC 9110 §8.3.1): the type/subtype, parameters aside, lower
    case; b"" for none."""
    return (content_type or b"").split(b";", 1)[0].strip().lower()


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


LAST_CHUNK = b"0\r\n\r\n"


def simple_response(
    status: int,
    reason: bytes,
    body: bytes,
    content_type: bytes = b"application/json",
    extra: list[tuple[bytes, bytes]] | None = None,
) -> bytes:
    head = Head(
        status=status,
        reason=reason,
        headers=[
            (b"Content-Type", content_type),
            (b"Content-Length", b"%d" % len(body)),
            *(extra or []),
        ],
    )
    return head.response_bytes() + body
