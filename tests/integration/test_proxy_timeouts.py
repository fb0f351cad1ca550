"""The proxy's timeouts on the real kernel (agent/inject/timeouts.py), with limits of half a
second: an idle workload connection is closed, a trickled request gets 408, a server that
does not answer gets 504, one that cannot be connected to gets 502 naming the wait, and a
response that has begun is never cut."""

from __future__ import annotations

import contextlib
import json
import socket

import pytest

from tests.helpers import AgentProcess, audit_events
from tests.kernel import cgroup_child, run_python
from tests.upstreams.echo import Upstream, raw_server
from tests.world import passthrough_config

pytestmark = pytest.mark.kernel

# Runs in the managed cgroup; each mode prints what it saw as JSON.
CLIENT = r"""
import json, socket, sys, time
port, mode = int(sys.argv[1]), sys.argv[2]
s = socket.create_connection(("127.0.0.1", port), timeout=20)
def read_all():
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    return data.decode()
req = b"POST /mcp HTTP/1.1\r\nHost: x\r\nContent-Length: 8\r\n\r\n"
if mode == "idle":          # one answered request, then silence: the proxy closes
    import http.client
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    c.request("POST", "/mcp", body=b'{"i": 1}')
    r = c.getresponse()
    body = r.read().decode()
    print(json.dumps({"first": [r.status, body], "rest": c.sock.recv(65536).decode()}))
elif mode == "trickle":     # a head, then half a body, then nothing
    s.sendall(req + b'{"i"')
    print(json.dumps({"answer": read_all()}))
elif mode == "ask":         # one request; whatever comes back, until the proxy closes or 20 s
    s.sendall(req.replace(b"Content-Length: 8", b"Content-Length: 8\r\nConnection: close")
              + b'{"i": 1}')
    print(json.dumps({"answer": read_all()}))
elif mode == "stream-then-ask":   # a long answer, a pause shorter than the idle limit,
    import http.client               # then the next request on the same connection
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    c.request("GET", "/stream")
    events = c.getresponse().read().decode().count("data: ")
    time.sleep(0.2)                  # quiet, shorter than the idle limit: the behaviour tested
    c.request("POST", "/mcp", body=b'{"i": 2}')
    r = c.getresponse()
    print(json.dumps({"events": events, "next": [r.status, r.read().decode()]}))
elif mode == "stream":      # an SSE response lasting longer than every limit
    s.sendall(b"GET /stream HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    print(json.dumps({"answer": read_all()}))
"""


@contextlib.contextmanager
def silent_server():
    """Accepts and reads, never answers (until the test ends)."""
    held: list[socket.socket] = []
    try:
        with raw_server(held.append) as port:
            yield port
    finally:
        for c in held:
            c.close()


@contextlib.contextmanager
def unconnectable_server():
    """A listener whose accept queue is full and never drained: the kernel drops further
    SYNs, so a connect to it hangs (as to a host that does not answer), on loopback."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(0)
    port = srv.getsockname()[1]
    fillers = []
    try:
        for _ in range(2):  # backlog 0 still queues one; the next is dropped
            c = socket.socket()
            c.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                c.connect(("127.0.0.1", port))
            fillers.append(c)
        yield port
    finally:
        for c in fillers:
            c.close()
        srv.close()


@pytest.fixture
def agent(tmp_path, upstream):
    with cgroup_child() as cg, silent_server() as silent, unconnectable_server() as hung:
        ports = {"up": upstream, "silent": silent, "hung": hung}
        limits = (
            "client_idle_seconds",
            "request_timeout_seconds",
            "upstream_timeout_seconds",
            "upstream_connect_timeout_seconds",
        )
        cfg = passthrough_config(tmp_path, cg, ports, **dict.fromkeys(limits, 0.5))
        with AgentProcess(cfg, tmp_path) as a:
            a.wait_ready()
            a.cg, a.ports = cg, ports
            yield a


def run(a, server: str, mode: str) -> dict:
    return json.loads(run_python(CLIENT, a.ports[server], mode, cgroup=a.cg))


def audit(a, until: str) -> list[dict]:
    return audit_events(a.stdout_path, until)


def test_an_idle_workload_connection_is_closed(agent):
    out = run(agent, "up", "idle")
    assert out["first"] == [200, '{"echo": {"i": 1}}']
    assert out["rest"] == ""  # closed by the proxy, nothing more sent


def test_a_trickled_request_is_answered_408_and_closed(agent):
    out = run(agent, "up", "trickle")
    assert out["answer"].startswith("HTTP/1.1 408 Request Timeout")
    assert "stopped arriving" in out["answer"]
    failed = [e for e in audit(agent, "request.failed") if e["event"] == "request.failed"]
    assert failed and failed[0]["server"] == "up" and "stopped arriving" in failed[0]["reason"]
    assert Upstream.seen == []  # the half request never reached the server


def test_a_server_that_does_not_answer_gets_504(agent):
    out = run(agent, "silent", "ask")
    assert out["answer"].startswith("HTTP/1.1 504 Gateway Timeout")
    assert "did not answer within 0.5 s" in out["answer"]
    failed = [e for e in audit(agent, "request.failed") if e["event"] == "request.failed"]
    assert failed[0]["server"] == "silent" and "0.5 s" in failed[0]["reason"]


def test_a_server_that_cannot_be_connected_to_gets_502_naming_the_wait(agent):
    out = run(agent, "hung", "ask")
    assert out["answer"].startswith("HTTP/1.1 502 Bad Gateway")
    assert "no connection within 0.5 s" in out["answer"]


def test_a_response_that_has_begun_is_not_cut(agent):
    out = run(agent, "up", "stream")  # three events 300 ms apart: 0.9 s > every limit
    assert out["answer"].count("data: ") == 3


def test_idle_time_counts_from_the_end_of_the_last_answer(agent):
    """A 0.9 s answer, then 0.2 s of quiet: idle for 0.2 s, not for 1.1 s since the workload
    last sent anything, so the connection is still open for its next request."""
    out = run(agent, "up", "stream-then-ask")
    assert out == {"events": 3, "next": [200, '{"echo": {"i": 2}}']}
