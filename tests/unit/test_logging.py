"""Diagnostics and audit streams: format, separation, and redaction of credentials."""

from __future__ import annotations

import io
import json

import pytest

from agent.observe import logging as obs


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_json_lines_by_default_when_not_a_tty():
    out = io.StringIO()
    obs.configure(level="info", fmt="auto", stream=out)
    obs.get_logger("t").info("hello", n=1)
    obs.get_logger("t").debug("hidden")
    lines = out.getvalue().splitlines()
    assert len(lines) == 1
    event = json.loads(lines[0])
    assert event["event"] == "hello" and event["n"] == 1 and event["component"] == "t"
    assert event["level"] == "info" and event["timestamp"].endswith("Z")


def test_console_rendering_on_a_tty_and_level_from_config():
    out = FakeTTY()
    obs.configure(level="debug", fmt="auto", stream=out)
    obs.get_logger("t").debug("visible", n=2)
    text = out.getvalue()
    assert "visible" in text and "n=2" in text
    assert not text.lstrip().startswith("{")


def test_secret_fields_are_redacted_but_fingerprints_kept():
    out = io.StringIO()
    obs.configure(level="info", fmt="json", stream=out)
    secret = "eyJhbGciOiJFUzI1NiJ9.c2VjcmV0.c2ln"
    obs.get_logger("t").info(
        "issued",
        access_token=secret,
        client_assertion=secret,
        Authorization=f"Bearer {secret}",
        jti="abc",
        jkt="thumb",
    )
    event = json.loads(out.getvalue())
    assert secret not in out.getvalue()
    assert (
        event["access_token"] == event["client_assertion"] == event["Authorization"] == obs.REDACTED
    )
    assert event["jti"] == "abc" and event["jkt"] == "thumb"


def test_audit_stream_is_separate_and_ignores_log_level():
    diag, audit_out = io.StringIO(), io.StringIO()
    obs.configure(level="error", fmt="json", stream=diag)
    audit = obs.AuditLog(node="node-a", stream=audit_out)
    audit.emit("attested", spiffe_id="spiffe://example.org/x", token="t0ps3cret")
    assert diag.getvalue() == ""
    event = json.loads(audit_out.getvalue())
    assert event["event"] == "attested" and event["stream"] == "audit"
    assert event["node"] == "node-a" and event["time"].endswith("Z")
    assert event["token"] == obs.REDACTED


def test_audit_file_sink_rotates_by_size_and_counts_drops(tmp_path):
    path = tmp_path / "audit.jsonl"
    audit = obs.AuditLog(node="n", file=str(path), max_bytes=400, backups=2, to_stream=False)
    for i in range(20):
        audit.emit("call.allowed", i=i, tool="echo")
    audit.close()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["audit.jsonl", "audit.jsonl.1", "audit.jsonl.2"]
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    last = [json.loads(ln) for ln in path.read_text().splitlines()]
    assert last[-1]["i"] == 19 and all(e["event"] == "call.allowed" for e in last)
    assert audit.dropped == 0

    class Broken(io.StringIO):
        def write(self, s):
            raise OSError("disk full")

    broken = obs.AuditLog(node="n", stream=Broken())
    broken.emit("x")
    assert broken.dropped == 1


class CountingStream(io.StringIO):
    """A stream that counts its writes: one write(2) each, for a file."""

    def __init__(self):
        super().__init__()
        self.writes = 0

    def write(self, s):
        self.writes += 1
        return super().write(s)


def test_audit_events_on_the_loop_are_written_together_at_the_end_of_the_iteration():
    import asyncio
    import threading

    out = CountingStream()
    audit = obs.AuditLog(node="n", stream=out)

    async def main():
        audit.attach_loop(asyncio.get_running_loop())
        for i in range(5):
            audit.emit("request.injected", i=i)
        assert out.getvalue() == ""  # pending until the iteration ends
        await asyncio.sleep(0)
        assert out.writes == 1  # one write for all five
        # another thread's events are written at once, not deferred to the loop
        t = threading.Thread(target=audit.emit, args=("attested",))
        t.start()
        t.join()
        assert out.writes == 2
        audit.emit("last")  # pending when the loop detaches ...

    asyncio.run(main())
    audit.close()  # ... and written by close(), not lost
    events = [json.loads(ln)["event"] for ln in out.getvalue().splitlines()]
    assert events == ["request.injected"] * 5 + ["attested", "last"]
    assert [json.loads(ln).get("i") for ln in out.getvalue().splitlines()][:5] == [0, 1, 2, 3, 4]


def test_audit_time_is_rfc3339_utc_with_microseconds():
    import datetime as dt

    out = io.StringIO()
    obs.AuditLog(node="n", stream=out).emit("x")
    stamp = json.loads(out.getvalue())["time"]
    parsed = dt.datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=dt.UTC)
    assert abs((dt.datetime.now(dt.UTC) - parsed).total_seconds()) < 5


def test_redaction_matches_field_names_whatever_their_case():
    event = {"Authorization": "Bearer x", "DPoP": "p", "client_assertion": "a", "jti": "j"}
    obs.redact_secrets(None, "", event)
    assert event == {
        "Authorization": obs.REDACTED,
        "DPoP": obs.REDACTED,
        "client_assertion": obs.REDACTED,
        "jti": "j",
    }


# table: a record shape's line must be emit_with()'s, byte for byte, whatever the values
SHAPE_VALUES = [
    ("POST", "/mcp", 200, "ab12", "jti-1", None, 1.25),
    ("GET", '/caf\u00e9 "q"\\\n\t\x01', 404, None, None, None, 0.0),
    ("POST", "/\U0001f600", 599, "x", True, False, 12345678.9),
    ("POST", "/m", 200, {"nested": [1, 2]}, float("nan"), float("inf"), -0.5),
    ("POST", "/m", 200, b"bytes", 3, 10**30, 1e-7),
]


def _body(line: str) -> str:
    return line.split(", ", 1)[1]  # without the time, which differs between two events


def test_record_shape_writes_what_emit_with_writes():
    names = ("method", "path", "status", "token_sha256", "jti", "jkt", "latency_ms")
    for node, values in [("node-\u00e9", v) for v in SHAPE_VALUES] + [("n%s%%d", SHAPE_VALUES[0])]:
        out = io.StringIO()
        log = obs.AuditLog(node, stream=out)
        frag = log.fragment(server="s", pid=7, spiffe_id="spiffe://example.org/w", pod=None)
        log.emit_with("request.injected", frag, **dict(zip(names, values, strict=False)))
        log.shape("request.injected", *names).emit(frag, *values)
        a, b = out.getvalue().splitlines()
        assert _body(a) == _body(b), values
        json.loads(b)  # and it is JSON (NaN as json.dumps writes it)


def test_record_shape_redacts_secret_names_and_checks_arity():
    out = io.StringIO()
    log = obs.AuditLog("n", stream=out)
    shape = log.shape("token.issued", "jti", "Access_Token", "client_assertion")
    shape.emit("", "j-1", "eyJhbGciOi.secret.value", "another-secret")
    line = out.getvalue()
    assert "secret" not in line
    assert json.loads(line)["Access_Token"] == obs.REDACTED
    assert json.loads(line)["jti"] == "j-1"
    with pytest.raises(ValueError, match="3 values expected"):
        shape.emit("", "only-one")


def test_under_load_loop_events_are_written_at_most_once_per_flush_interval():
    import asyncio

    out = CountingStream()
    audit = obs.AuditLog(node="n", stream=out, flush_interval=0.2)

    async def main():
        loop = asyncio.get_running_loop()
        audit.attach_loop(loop)
        audit.emit("first")  # after a quiet spell: this iteration
        await asyncio.sleep(0)
        assert out.writes == 1
        t0 = loop.time()
        for i in range(3):  # busy: held back, then written together
            audit.emit("busy", i=i)
            await asyncio.sleep(0)
        assert out.writes == 1
        while out.writes == 1:
            await asyncio.sleep(0.01)
        assert loop.time() - t0 >= 0.15  # not before the interval ...
        assert out.writes == 2  # ... and then in one write
        for i in range(obs.AuditLog.MAX_PENDING):  # a full batch does not wait
            audit.emit("burst", i=i)
        assert out.writes == 3
        audit.emit("pending at close")

    asyncio.run(main())
    audit.close()  # nothing pending is lost
    events = [json.loads(ln)["event"] for ln in out.getvalue().splitlines()]
    assert events == (
        ["first"] + ["busy"] * 3 + ["burst"] * obs.AuditLog.MAX_PENDING + ["pending at close"]
    )
