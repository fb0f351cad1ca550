"""Logging: diagnostics and the audit trail, two streams that never mix.

Diagnostics go to stderr (JSON lines, or console rendering on a TTY); audit events go to
stdout as JSON lines (later issues add a rotating file sink). Both pass through the same
redaction step, so a field that holds a credential by name never reaches either stream:
the place to record a credential is its fingerprint (jti, thumbprint), which is not redacted.
And every line either writes is scrubbed, as written, of anything shaped like a JWT or a PEM
private key, wherever it sits (a field, a nested value, an exception's text): both quote
other parties' words (an authorization server's error_description, a URL), which may echo
one, as a server refusing a client assertion may. scrub_text and scrub_json are the one
scrub; the admin socket's answers (agent/observe/admin.py) and credless's answers to
workloads (agent/inject/answers.py) use them too.

What each diagnostic level adds is in docs/logging.md; `debug` names every decision.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import math
import os
import re
import secrets
import sys
import threading
import time
from collections.abc import Callable, MutableMapping
from typing import Any, TextIO

import structlog

# Field names whose values are credentials. Matching is on the whole lower-cased name, so
# `token_fingerprint`, `jti` and `jkt` stay visible.
SECRET_FIELDS = frozenset(
    {
        "token",
        "access_token",
        "refresh_token",
        "id_token",
        "assertion",
        "client_assertion",
        "client_secret",
        "software_statement",
        "authorization",
        "dpop",
        "private_key",
        "key",
        "password",
        "svid",
        "jwt",
        "jwt_svid",
    }
)
REDACTED = "[redacted]"


def new_event_id() -> str:
    """An audit event's id, named by the answer it explains (a refusal, a denial) so that
    whoever sees the answer can hand the operator the one line of the audit about it."""
    return secrets.token_hex(8)


_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


def redact_secrets(_logger: Any, _method: str, event: dict) -> dict:
    if "".join(event).islower():  # every key lower-case (the usual case): one set test
        for k in SECRET_FIELDS.intersection(event):
            event[k] = REDACTED
        return event
    for k in list(event):
        if k.lower() in SECRET_FIELDS:
            event[k] = REDACTED
    return event


# A JWT (a token, an assertion, an SVID, a DPoP proof) or a PEM private key, wherever it
# appears in a diagnostic's text. The JWT shape is the one agent/inject/answers.py scrubs
# from answers: a base64url JSON header ("eyJ") and two more segments.
_JWT = re.compile(r"eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
_PEM_KEY = re.compile(
    r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----.*?(?:-----END [A-Z0-9 ]*PRIVATE KEY-----|\Z)", re.S
)


# The same key inside a JSON string: it ends at its END line or before the string's
# closing quote (an escape, `\"` or `\n`, taken whole), so the text stays the same JSON.
_PEM_KEY_IN_JSON = re.compile(
    r'-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----(?:[^"\\]|\\.)*?'
    r'(?:-----END [A-Z0-9 ]*PRIVATE KEY-----|(?="))',
    re.S,
)


def scrub_text(text: str) -> str:
    """text with every JWT and PEM private key in it replaced by the redaction mark."""
    if "eyJ" in text or "PRIVATE KEY" in text:
        return _PEM_KEY.sub(REDACTED, _JWT.sub(REDACTED, text))
    return text


def scrub_json(text: str) -> str:
    """A JSON document's text with every JWT and PEM private key in its strings replaced,
    still the same JSON: a JWT's characters are letters, digits, `-`, `_` and `.` (never a
    quote or a backslash), and a key is cut at its string's end."""
    if "eyJ" in text or "PRIVATE KEY" in text:
        return _PEM_KEY_IN_JSON.sub(REDACTED, _JWT.sub(REDACTED, text))
    return text


_second = -1
_second_text = ""


def _utc_timestamp() -> str:
    """RFC 3339 UTC with microseconds, like datetime.isoformat() + "Z", at a third of the
    cost: the audit stream stamps every proxied request."""
    global _second, _second_text
    now = time.time()
    sec = int(now)
    if sec != _second:
        _second_text, _second = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec)), sec
    return f"{_second_text}.{int((now - sec) * 1e6):06d}Z"


def _renderer(fmt: str, stream: TextIO) -> Callable[[Any, str, MutableMapping[str, Any]], str]:
    """The last processor: the line, rendered, then scrubbed (scrub_json, scrub_text)."""
    use_console = fmt == "console" or (fmt == "auto" and stream.isatty())
    if use_console:
        console = structlog.dev.ConsoleRenderer(colors=False)
        return lambda logger, method, event: scrub_text(console(logger, method, event))
    render = structlog.processors.JSONRenderer(sort_keys=False)
    return lambda logger, method, event: scrub_json(str(render(logger, method, event)))


def _base_processors() -> list:
    return [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        redact_secrets,
        structlog.processors.format_exc_info,  # its text is scrubbed with the line
    ]


class _StdlibBridge(logging.Handler):
    """The standard library's log records (asyncio's "Task exception was never retrieved"
    with its traceback, grpc's, a library's warnings) written as diagnostics, through the
    same redaction and scrub: with no handler of its own, Python printed them to stderr as
    they were, a token quoted in an exception included."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            logger = structlog.get_logger(component=record.name)
            extra = {"exc_info": record.exc_info} if record.exc_info else {}
            logger.log(record.levelno, record.getMessage(), **extra)
        except Exception:  # noqa: BLE001 — as logging's own handlers: never raise to the caller
            self.handleError(record)


_BRIDGE = _StdlibBridge()


# bumped by each configure(): a Logger rebuilds its structlog logger when it has moved
_generation = 0
_debug = False  # the level is debug: only then is a debug line more than a check


def configure(level: str = "info", fmt: str = "auto", stream: TextIO | None = None) -> None:
    """Configure the diagnostic stream. Safe to call again (tests, reloads)."""
    global _generation, _debug
    stream = stream or sys.stderr
    structlog.configure(
        processors=[*_base_processors(), _renderer(fmt, stream)],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )
    _generation += 1
    _debug = _LEVELS[level] <= logging.DEBUG
    root = logging.getLogger()
    if _BRIDGE not in root.handlers:
        root.addHandler(_BRIDGE)
    root.setLevel(logging.WARNING)  # the libraries' own info and debug lines stay theirs


class Logger:
    """A component's diagnostic logger. Built on first use after each configure(), then
    kept: structlog's lazy proxy builds a logger on every call (about 6 us, even for a
    line the level filters out), and the proxy's per-request debug lines must cost nearly
    nothing below debug: then debug() is one test of a flag."""

    __slots__ = ("_component", "_generation", "_logger")

    def __init__(self, component: str):
        self._component = component
        self._generation = -1
        self._logger: Any = None

    def _get(self) -> Any:
        if self._generation != _generation:
            self._logger = structlog.get_logger(component=self._component).bind()
            self._generation = _generation
        return self._logger

    def debug(self, event: str, *args: Any, **kw: Any) -> Any:
        return self._get().debug(event, *args, **kw) if _debug else None

    def info(self, event: str, *args: Any, **kw: Any) -> Any:
        return self._get().info(event, *args, **kw)

    def warning(self, event: str, *args: Any, **kw: Any) -> Any:
        return self._get().warning(event, *args, **kw)

    def error(self, event: str, *args: Any, **kw: Any) -> Any:
        return self._get().error(event, *args, **kw)

    def exception(self, event: str, *args: Any, **kw: Any) -> Any:
        return self._get().exception(event, *args, **kw)


def get_logger(component: str) -> Logger:
    # Lazy: the logger is built on first use, after configure() has run.
    return Logger(component)


class _PrivateRotatingFile(logging.handlers.RotatingFileHandler):
    """The standard library's size-based rotation (file, file.1 ... file.N), with every file
    it opens created owner-only: audit events name workloads and identities."""

    def _open(self):
        fd = os.open(self.baseFilename, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        os.fchmod(fd, 0o600)
        return open(fd, "a", encoding=self.encoding)


class AuditLog:
    """The audit stream: one JSON object per decision, always emitted whatever the log level.

    Kept apart from structlog's configuration so diagnostics settings (level, console
    rendering) can never silence or reshape it. Written directly (one json.dumps per event)
    because the proxy emits one per request: structlog's processor chain cost more than the
    proxying itself. The same redaction applies.

    Events emitted on the agent's event loop are written together (attach_loop): at the end
    of the loop iteration that produced them, and under load at most once per
    `flush_interval` seconds, so one write(2) carries every request finished meanwhile.
    Under load a write per iteration cost the proxy a tenth of its throughput (a file write
    updates the inode; iterations last a few hundred microseconds). The first event after a
    quiet spell is written at the end of its iteration, as before; none waits more than
    flush_interval (0: every iteration), and MAX_PENDING events are written at once.
    Events from other threads, or before a loop is attached, are written at once. close()
    writes whatever is still pending.
    """

    MAX_PENDING = 1024

    def __init__(
        self,
        node: str,
        stream: TextIO | None = None,
        file: str = "",
        max_bytes: int = 50 << 20,
        backups: int = 5,
        to_stream: bool = True,
        flush_interval: float = 0.005,
    ):
        self.node = node  # every event says which node wrote it
        self._flush_interval = flush_interval
        self._last_write = 0.0
        self._stream = (stream or sys.stdout) if to_stream else None
        self._lock = threading.Lock()
        self.dropped = 0
        self._file = None
        self._pending: list[str] = []
        self._loop = None
        self._loop_thread = 0
        self._flush_scheduled = False
        # called with every line as it is queued (agent/observe/recent.py keeps the last ones
        # for `credless explain`); a tap must be cheap and must not raise
        self._taps: list[Callable[[str], None]] = []
        if file:
            self._file = _PrivateRotatingFile(
                file, maxBytes=max_bytes, backupCount=backups, encoding="utf-8"
            )
            self._file.setFormatter(logging.Formatter("%(message)s"))

    def attach_loop(self, loop) -> None:
        """Coalesce the writes of events emitted on `loop` (see the class doc); None detaches
        (and writes what is pending)."""
        with self._lock:
            self._write_pending()
            self._loop = loop
            self._loop_thread = threading.get_ident() if loop is not None else 0

    def emit(self, event: str, **fields: Any) -> None:
        self.emit_with(event, "", **fields)

    def add_tap(self, fn: Callable[[str], None]) -> None:
        """fn(line) for every audit line from now on, as written (redacted)."""
        self._taps.append(fn)

    def _queue(self, line: str) -> None:
        line = scrub_json(line)  # emit_with and RecordShape write here; the taps see this
        for tap in self._taps:
            tap(line)
        with self._lock:
            self._pending.append(line)
            if (
                self._loop is not None
                and threading.get_ident() == self._loop_thread
                and len(self._pending) < self.MAX_PENDING
            ):
                if not self._flush_scheduled:
                    self._flush_scheduled = True
                    wait = self._last_write + self._flush_interval - time.monotonic()
                    if wait > 0:
                        self._loop.call_later(wait, self.flush)
                    else:
                        self._loop.call_soon(self.flush)
                return
            self._write_pending()

    def fragment(self, **fields: Any) -> str:
        """fields as JSON object members, redacted, for emit_with(): what stays the same over
        many events (a connection's process and identity) is serialized once."""
        return json.dumps(redact_secrets(None, "", fields), default=str)[1:-1]

    def emit_with(self, event: str, fragment: str, **fields: Any) -> None:
        """emit(event, **fields) plus the members of fragment (from fragment(), or "")."""
        record = {
            "time": _utc_timestamp(),
            "event": event,
            "stream": "audit",
            "node": self.node,
            **fields,
        }
        redact_secrets(None, "", record)
        line = json.dumps(record, default=str)
        self._queue(f"{line[:-1]}, {fragment}}}" if fragment else line)

    def shape(self, event: str, *names: str) -> RecordShape:
        """A writer for the event's records that carry these fields, in this order: the
        same line emit_with() writes, without building and serializing a dict per event."""
        return RecordShape(self, event, names)

    def flush(self) -> None:
        with self._lock:
            self._flush_scheduled = False
            self._write_pending()

    def _write_pending(self) -> None:
        lines, self._pending = self._pending, []
        if not lines:
            return
        self._last_write = time.monotonic()
        data = "\n".join(lines)
        if self._stream is not None:
            try:
                self._stream.write(data + "\n")
                self._stream.flush()
            except (OSError, ValueError):
                self._note_drop("stdout", len(lines))
        if self._file is not None:
            try:
                self._file.emit(logging.makeLogRecord({"msg": data, "levelno": 20}))
                if self._file.stream is None:
                    raise OSError("audit file closed")
            except (OSError, ValueError):
                self._note_drop("file", len(lines))

    def _note_drop(self, sink: str, n: int = 1) -> None:
        """Counted (credless_audit_events_dropped_total) and logged; never raises into the
        data path."""
        self.dropped += n
        get_logger("audit").error("audit event dropped", sink=sink, dropped=self.dropped)

    def close(self) -> None:
        self.attach_loop(None)
        if self._file is not None:
            self._file.close()


_encode_str = json.encoder.encode_basestring_ascii  # json.dumps's own, ensure_ascii=True


def _json_value(v: Any) -> str:
    """v as json.dumps(v, default=str) writes it, for the types a record shape meets most."""
    t = type(v)
    if t is str:
        return _encode_str(v)
    if v is None:
        return "null"
    if t is int:
        return int.__repr__(v)
    if t is float and math.isfinite(v):
        return float.__repr__(v)
    return json.dumps(v, default=str)


class RecordShape:
    """One audit event's records with a fixed list of fields (AuditLog.shape): the proxy
    writes one per request, and building a dict for json.dumps cost more than the rest of
    the audit. The line is the one emit_with() would write, byte for byte, redaction
    included (a secret field's name is found once, here, and its value never rendered)."""

    def __init__(self, log: AuditLog, event: str, names: tuple[str, ...]):
        self._log = log
        self._prefix = (
            '", "event": '
            + _encode_str(event)
            + ', "stream": "audit", "node": '
            + _json_value(log.node)
        )
        self._keys = tuple(", " + _encode_str(n) + ": " for n in names)
        # one %-template for the line: time, each value, then the fragment's separator and
        # the fragment (literal text escaped for %)
        self._template = (
            '{"time": "%s'
            + self._prefix.replace("%", "%%")
            + "".join(k.replace("%", "%%") + "%s" for k in self._keys)
            + "%s%s}"
        )
        # a secret field's value is never rendered: the redaction text takes its place
        self._secret = tuple(n.lower() in SECRET_FIELDS for n in names)

    def emit(self, fragment: str, *values: Any) -> None:
        if len(values) != len(self._keys):
            raise ValueError(f"record shape: {len(self._keys)} values expected")
        if True in self._secret:
            values = tuple(
                REDACTED if secret else v for secret, v in zip(self._secret, values, strict=False)
            )
        enc = _encode_str  # strings and ints inline: most values are, and a call each costs
        self._log._queue(
            self._template
            % (
                _utc_timestamp(),
                *[
                    enc(v)
                    if v.__class__ is str
                    else int.__repr__(v)
                    if v.__class__ is int
                    else _json_value(v)
                    for v in values
                ],
                ", " if fragment else "",
                fragment,
            )
        )
