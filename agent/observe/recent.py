"""The last audit events, in memory: what `credless explain` shows for an identity.

A bounded ring of the audit stream's lines as written (already redacted by the audit log,
agent/observe/logging.py), parsed only when someone asks. Feeding it costs the proxy one
deque append per event; the ring never holds more than `size` lines, whatever the traffic.
"""

from __future__ import annotations

import json
from collections import deque
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from agent.observe.logging import AuditLog

DEFAULT_SIZE = 2048


class RecentEvents:
    def __init__(self, size: int = DEFAULT_SIZE):
        # deque.append and list(deque) are atomic under the GIL: the event loop feeds,
        # the admin thread reads, no lock on the proxy's path
        self._lines: deque[str] = deque(maxlen=size)

    def feed(self, line: str) -> None:
        """One audit line, or several joined by newlines (the log writes in batches)."""
        self._lines.append(line)

    def matching(self, limit: int, **fields: Any) -> list[dict[str, Any]]:
        """The newest `limit` events having any of these field values (spiffe_id=…,
        pid=…; a None value is ignored), oldest first."""
        wanted = {k: v for k, v in fields.items() if v is not None}
        out: list[dict[str, Any]] = []
        if not wanted:
            return out
        for chunk in reversed(list(self._lines)):
            for line in reversed(chunk.split("\n")):
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                if isinstance(event, dict) and any(event.get(k) == v for k, v in wanted.items()):
                    out.append(event)
                    if len(out) >= limit:
                        return out[::-1]
        return out[::-1]


def attach(audit: AuditLog, size: int = DEFAULT_SIZE) -> RecentEvents:
    """A ring fed by every line the audit log writes from now on."""
    ring = RecentEvents(size)
    audit.add_tap(ring.feed)
    return ring
