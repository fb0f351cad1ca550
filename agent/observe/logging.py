"""Logging: diagnostics and the audit trail, two streams that never mix.

Diagnostics go to stderr (JSON lines, or console rendering on a TTY); audit events go to
stdout as JSON lines (later issues add a rotating file sink). Both pass through the same
redaction step, so a field that holds a credential by name never reaches either stream:
the place to record a credential is its fingerprint (jti, thumbprint), which is not redacted.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
from datetime import datetime, timezone
from typing import Any, TextIO

import structlog

# Field names whose values are credentials. Matching is on the whole lower-cased name, so
# `token_fingerprint`, `jti` and `jkt` stay visible.
SECRET_FIELDS = frozenset({
    "token", "access_token", "refresh_token", "id_token", "assertion", "client_assertion",
    "client_secret", "software_statement", "authorization", "dpop", "private_key", "key",
    "password", "svid", "jwt", "jwt_svid",
})
REDACTED = "[redacted]"

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR}


def redact_secrets(_logger: Any, _method: str, event: dict) -> dict:
    for k in list(event):
        if k.lower() in SECRET_FIELDS:
            event[k] = REDACTED
    return event


def _renderer(fmt: str, stream: TextIO):
    use_console = fmt == "console" or (fmt == "auto" and stream.isatty())
    if use_console:
        return structlog.dev.ConsoleRenderer(colors=False)
    return structlog.processors.JSONRenderer(sort_keys=False)


def _base_processors() -> list:
    return [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        redact_secrets,
        structlog.processors.format_exc_info,
    ]


def configure(level: str = "info", fmt: str = "auto", stream: TextIO | None = None) -> None:
    """Configure the diagnostic stream. Safe to call again (tests, reloads)."""
    stream = stream or sys.stderr
    structlog.configure(
        processors=[*_base_processors(), _renderer(fmt, stream)],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )


def get_logger(component: str):
    # Lazy: the logger is built on first use, after configure() has run.
    return structlog.get_logger(component=component)


class AuditLog:
    """The audit stream: one JSON object per decision, always emitted whatever the log level.

    Kept apart from structlog's configuration so diagnostics settings (level, console
    rendering) can never silence or reshape it. Written directly (one json.dumps and one
    write per event) because the proxy emits one per request: structlog's processor chain
    cost more than the proxying itself. The same redaction applies.
    """

    def __init__(self, node: str, stream: TextIO | None = None):
        self._node = node
        self._stream = stream or sys.stdout
        self._lock = threading.Lock()
        self.dropped = 0

    def emit(self, event: str, **fields: Any) -> None:
        record = {"time": datetime.now(timezone.utc).isoformat().replace("+00:00", "Z"),
                  "event": event, "stream": "audit", "node": self._node, **fields}
        redact_secrets(None, "", record)
        line = json.dumps(record, default=str) + "\n"
        try:
            with self._lock:
                self._stream.write(line)
                self._stream.flush()
        except (OSError, ValueError):
            self.dropped += 1   # counted and exported; never raises into the data path
