"""The in-memory ring of recent audit events `credless explain` shows: fed by the real audit
log, bounded, the newest events of one identity or pid, never a secret."""

from __future__ import annotations

import io
import json

from agent.observe import recent
from agent.observe.logging import AuditLog

SID = "spiffe://example.org/bot"


def test_the_ring_sees_every_event_the_audit_log_writes_redacted():
    out = io.StringIO()
    audit = AuditLog("node", stream=out)
    ring = recent.attach(audit)
    audit.emit("token.obtained", spiffe_id=SID, token_sha256="abcd", access_token="eyJsecret")
    shape = audit.shape("request.injected", "status")
    shape.emit(audit.fragment(spiffe_id=SID, pid=7), 200)
    audit.emit("identity.denied", pid=8, reason="no registration entry matches")
    got = ring.matching(10, spiffe_id=SID)
    assert [e["event"] for e in got] == ["token.obtained", "request.injected"]
    assert got[0]["access_token"] == "[redacted]" and "eyJsecret" not in json.dumps(got)
    assert [e["event"] for e in ring.matching(10, pid=8)] == ["identity.denied"]
    assert len(out.getvalue().splitlines()) == 3  # the stream still gets every line


def test_batched_lines_are_read_one_by_one_newest_kept():
    ring = recent.RecentEvents(size=3)
    lines = [json.dumps({"event": f"e{i}", "spiffe_id": SID}) for i in range(6)]
    ring.feed("\n".join(lines[:2]))  # one write carrying two events
    for line in lines[2:]:
        ring.feed(line)
    # bounded: the oldest feed (two events) fell out of a ring of three
    assert [e["event"] for e in ring.matching(10, spiffe_id=SID)] == ["e3", "e4", "e5"]
    assert [e["event"] for e in ring.matching(2, spiffe_id=SID)] == ["e4", "e5"]
    assert ring.matching(10, spiffe_id=None) == []
    ring.feed("not json")
    assert len(ring.matching(10, spiffe_id=SID)) == 2
