"""The last audit events, in memory: what `credless explain` shows for an identity.

A bounded ring of the audit stream's lines as written (already redacted by the audit log,
agent/observe/logging.py), parsed only when someone asks. Feeding it costs the proxy one
deque append per event; the ring never holds more than `size` lines, whatever the traffic.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Callable
from typing import Any

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


def attach(audit: Any, size: int = DEFAULT_SIZE) -> RecentEvents:
    """A ring fed by every line the audit log writes from now on.

    Through the audit log's `add_tap(fn)` when it has one; until then by wrapping the log's
    line queue on this one instance (every event, whichever writer, passes through it)."""
    ring = RecentEvents(size)
    add_tap: Callable[[Callable[[str], None]], None] | None = getattr(audit, "add_tap", None)
    if add_tap is not None:
        add_tap(ring.feed)
        return ring
    queue = getattr(audit, "_queue", None)
    if queue is None:  # neither: an empty ring, never an error in the operator's command
        return ring

    def tapped(line: str) -> None:
        queue(line)
        ring.feed(line)

    setattr(audit, "_queue", tapped)  # noqa: B010 — an instance attribute, not the class's
    return ring
