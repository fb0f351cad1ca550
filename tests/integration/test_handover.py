"""Handover (agent/handover.py): MCP traffic across `credless restart`, and a restart whose
new agent cannot start.

The workload (WORKLOAD, in the managed cgroup) runs three loops at once until told to stop:
tools/call on one kept-alive connection, tools/call on a new connection each time, and one
SSE stream (stream_count with progress) open across the handover. Every request carries an
X-Test-Seq header, so the server's record tells the workload's requests from the agents'
own discovery probes.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import json_lines, wait_for
from tests.kernel import start_python
from tests.mcp.peers import McpServer
from tests.world import build_world, entry_table, server_table, tools_rule

pytestmark = pytest.mark.kernel

SPIFFE_ID = "spiffe://example.org/agent/handover-bot"
POLICY = tools_rule("bot-tools", SPIFFE_ID, "weather", ["echo", "stream_count"])
SSE_EVENTS = 150  # 15 s: open from before the new agent starts until after it serves
REQUESTS_AFTER = 40  # each loop's requests after the handover, before the workload stops

WORKLOAD = r"""
import http.client, json, os, sys, threading, time
port, out, stop, n_events = int(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
H = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
lock = threading.Lock()
state = {"ok": 0, "failed": 0, "errors": [], "seq": 0, "events": 0, "sse_done": False,
         "loops": {"keepalive": 0, "fresh": 0}}

def save():
    with lock:
        data = json.dumps(state)
    tmp = f"{out}.{threading.get_ident()}"
    with open(tmp, "w") as f:
        f.write(data)
    os.replace(tmp, out)

def post(conn, body, session=None):
    with lock:
        state["seq"] += 1
        seq = state["seq"]
    h = dict(H, **{"X-Test-Seq": str(seq)})
    if session:
        h["Mcp-Session-Id"] = session
        h["Mcp-Protocol-Version"] = "2025-06-18"
    conn.request("POST", "/mcp", json.dumps(body), h)
    r = conn.getresponse()
    data = r.read()
    return r, data

def session():
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    r, _ = post(c, {"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {},
        "clientInfo": {"name": "handover-test", "version": "1"}}})
    sid = r.getheader("mcp-session-id")
    post(c, {"jsonrpc": "2.0", "method": "notifications/initialized"}, sid)
    c.close()
    return sid

def call(conn, sid, i):
    # ids unique in the session: the server answers each request id on one stream
    r, data = post(conn, {"jsonrpc": "2.0", "id": i, "method": "tools/call",
                          "params": {"name": "echo", "arguments": {"text": f"m{i}"}}}, sid)
    if r.status != 200 or f"m{i}".encode() not in data:
        raise RuntimeError(f"status {r.status}: {data[:200]!r}")

def loop(kind, sid):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    i = 0
    while not os.path.exists(stop):
        i += 1
        if kind == "fresh":
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        try:
            call(conn, sid, f"{kind}-{i}")
            with lock:
                state["ok"] += 1
                state["loops"][kind] += 1
        except Exception as e:
            with lock:
                state["failed"] += 1
                state["errors"].append(f"{kind}: {type(e).__name__}: {e}"[:300])
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        if kind == "fresh":
            conn.close()
        save()
    conn.close()

def stream(sid):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    with lock:
        state["seq"] += 1
        seq = state["seq"]
    body = {"jsonrpc": "2.0", "id": "s", "method": "tools/call", "params": {
        "name": "stream_count", "arguments": {"n": n_events, "delay_ms": 100},
        "_meta": {"progressToken": "p"}}}
    c.request("POST", "/mcp", json.dumps(body), dict(H, **{
        "X-Test-Seq": str(seq), "Mcp-Session-Id": sid, "Mcp-Protocol-Version": "2025-06-18"}))
    r = c.getresponse()
    try:
        while True:
            line = r.fp.readline()
            if not line:
                break
            if line.startswith(b"data:") and b"notifications/progress" in line:
                with lock:
                    state["events"] += 1
                save()
            if line.startswith(b"data:") and b'"id":"s"' in line.replace(b" ", b""):
                with lock:
                    state["sse_done"] = True
                break
    except Exception as e:
        with lock:
            state["errors"].append(f"sse: {type(e).__name__}: {e}"[:300])
    save()

sid = session()
threads = [threading.Thread(target=loop, args=(k, sid)) for k in ("keepalive", "fresh")]
threads.append(threading.Thread(target=stream, args=(sid,)))
for t in threads:
    t.start()
for t in threads:
    t.join()
save()
print("done", flush=True)
"""


def _events(path: Path) -> list[dict]:
    return [o for o in json_lines(path) if isinstance(o, dict) and "event" in o]


def _state(path: Path) -> dict:
    return json.loads(path.read_text())


def _restart(cfg: Path, log: Path, timeout: float = 180) -> tuple[int, str]:
    """`credless restart` (python -m agent.restart until cli.py wires it): its exit status
    and what it said on stderr. The new agent it starts inherits its stdout (audit, into
    log) and stderr (log lines, into log.stderr), as under systemd it inherits the journal."""
    err = log.with_suffix(".stderr")
    start = err.stat().st_size if err.exists() else 0
    with open(log, "ab") as out, open(err, "ab") as errf:
        r = subprocess.run(
            [sys.executable, "-m", "agent.restart", "--config", str(cfg)],
            stdout=out,
            stderr=errf,
            timeout=timeout,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    return r.returncode, err.read_text()[start:]


def _refused_restart(cfg: Path, log: Path) -> str:
    """A restart that must fail, leaving the old agent serving: the new one's verdict."""
    code, said = _restart(cfg, log)
    assert code != 0
    verdict = [ln for ln in said.splitlines() if ln.startswith("credless:")]
    assert verdict and "keeps serving" in verdict[-1], said
    return verdict[-1]


def _traffic_goes_on(out: Path, stop: Path, workload: subprocess.Popen) -> None:
    """The workload's calls keep succeeding, then it is told to stop and finishes."""
    before = _state(out)["ok"]
    wait_for(lambda: _state(out)["ok"] >= before + 40, 60, what="traffic after")
    stop.touch()
    workload.wait(120)


def _every_request_reached_the_server(w, out: Path, events: int) -> dict:
    """The workload saw no failure and its whole event stream; the server got each of its
    requests once, with a DPoP-bound token. The workload's final state."""
    state = _state(out)
    assert state["failed"] == 0, state["errors"]
    assert state["errors"] == []
    assert state["events"] == events and state["sse_done"]
    seen = [q for q in w.mcp.stats()["requests"] if "x-test-seq" in q["header_names"]]
    assert len(seen) == state["seq"]
    assert all(q["auth_scheme"] == "DPoP" and q["token_sha256"] for q in seen)
    return state


@contextlib.contextmanager
def _world(tmp_path):
    with build_world(tmp_path, SPIFFE_ID) as w:
        w.mcp = w.enter(McpServer(tmp_path, dpop=True))
        w.authorization_server([w.mcp.url], [SPIFFE_ID], dpop=True)
        w.mcp.start(w.oidc.issuer)
        w.start_agent(
            server_table("weather", w.mcp.url),
            entries=entry_table("bot", SPIFFE_ID, [w.selector]),
            policy=POLICY,
            inject={"drain_seconds": 60},
        )
        yield w


def _stop_pid_file_holder(run_dir: Path) -> None:
    """The agent that took over is no child of the test: stop it by its pid file."""
    with contextlib.suppress(OSError, ValueError):
        pid = int((run_dir / "credless.pid").read_text().split()[0])
        os.kill(pid, signal.SIGTERM)
        wait_for(lambda: not Path(f"/proc/{pid}").exists(), 60, what="the new agent stopped")


def test_mcp_traffic_across_a_handover_loses_nothing(tmp_path):
    with _world(tmp_path) as w:
        out, stop = tmp_path / "workload.json", tmp_path / "stop"
        log = tmp_path / "new-agent.log"
        workload = start_python(WORKLOAD, w.mcp.port, out, stop, SSE_EVENTS, cgroup=w.cg)
        try:
            wait_for(lambda: out.exists() and _state(out)["ok"] >= 20, 60, what="traffic")
            code, said = _restart(w.agent.config, log)
            assert code == 0, said[-3000:]
            before = _state(out)["loops"]  # counted from the takeover on
            wait_for(
                lambda: all(_state(out)["loops"][k] >= before[k] + REQUESTS_AFTER for k in before),
                120,
                what="traffic after the handover",
            )
            stop.touch()
            workload.wait(120)
            # the old agent drains (its connections close with the workload) and exits
            assert w.agent.proc.wait(120) == 0
        finally:
            stop.touch()
            with contextlib.suppress(Exception):
                workload.kill()
            _stop_pid_file_holder(tmp_path / "run")
        state = _every_request_reached_the_server(w, out, SSE_EVENTS)
        old, new = _events(w.agent.stdout_path), _events(log)
        took = _events(log.with_suffix(".stderr"))
        assert any(e["event"] == "took over" for e in took)
        injected = [e for e in old + new if e["event"] == "request.injected"]
        # the new agent served at least the new connections made after it took over
        assert len([e for e in new if e["event"] == "request.injected"]) >= REQUESTS_AFTER
        # both agents' audit trails together account for each request the server got
        assert len(injected) == state["seq"]


BAD_POLICY = "[[rules]]\nid = 1\n"  # not a policy: the new agent's policy engine refuses it


def test_a_new_agent_that_cannot_start_leaves_the_old_one_serving(tmp_path):
    with _world(tmp_path) as w:
        out, stop = tmp_path / "workload.json", tmp_path / "stop"
        log = tmp_path / "new-agent.log"
        workload = start_python(WORKLOAD, w.mcp.port, out, stop, 20, cgroup=w.cg)
        try:
            wait_for(lambda: out.exists() and _state(out)["ok"] >= 20, 60, what="traffic")
            (tmp_path / "policy.toml").write_text(BAD_POLICY)
            assert "policy" in _refused_restart(w.agent.config, log)
            assert w.agent.proc.poll() is None  # the old agent still runs
            _traffic_goes_on(out, stop, workload)
        finally:
            stop.touch()
            with contextlib.suppress(Exception):
                workload.kill()
        _every_request_reached_the_server(w, out, 20)
        # the old agent still holds its pid file and answers on its admin socket
        pid = int((tmp_path / "run" / "credless.pid").read_text().split()[0])
        assert pid == w.agent.proc.pid


def test_a_new_agent_failing_after_the_redirect_swap_gives_it_back(tmp_path):
    """The new agent gets as far as its BPF programs in the pinned links and its proxy
    serving the shared sockets, then finds its metrics port held by another process: it
    stops, and the old agent puts its own programs back (reclaim) and serves on."""
    with _world(tmp_path) as w:
        out, stop = tmp_path / "workload.json", tmp_path / "stop"
        log = tmp_path / "new-agent.log"
        workload = start_python(WORKLOAD, w.mcp.port, out, stop, 20, cgroup=w.cg)
        squatter = socket.create_server(("127.0.0.1", 0))
        try:
            wait_for(lambda: out.exists() and _state(out)["ok"] >= 20, 60, what="traffic")
            port = squatter.getsockname()[1]
            text = w.agent.config.read_text()
            w.agent.config.write_text(
                re.sub(r'(\[metrics\]\nlisten = )"[^"]*"', rf'\1"127.0.0.1:{port}"', text)
            )
            assert f"127.0.0.1:{port}" in _refused_restart(w.agent.config, log)
            took = _events(log.with_suffix(".stderr"))
            assert any(e["event"] == "redirect attached" and e["took_over"] for e in took)
            wait_for(
                lambda: any(e.get("event") == "redirect reclaimed" for e in w.agent.log_events()),
                30,
                what="the old agent's programs back",
            )
            _traffic_goes_on(out, stop, workload)
        finally:
            squatter.close()
            stop.touch()
            with contextlib.suppress(Exception):
                workload.kill()
        assert w.agent.proc.poll() is None
        _every_request_reached_the_server(w, out, 20)
