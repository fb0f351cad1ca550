"""The redirect and the proxy's HTTP handling on the real kernel, in passthrough mode.

No authorization server is involved: a passthrough server is observed, not credentialed,
which isolates the data path: redirect by cgroup, keep-alive, chunked bodies,
Expect: 100-continue, streamed responses, and processes outside the managed cgroup.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

from agent import config
from tests.helpers import AgentProcess, audit_events, free_port, wait_for, write_config
from tests.kernel import cgroup_child, run_python, start_python
from tests.upstreams.echo import BIG_BODY, Upstream, hangup_server, tls_upstream
from tests.world import inject_table, passthrough_config, server_table

pytestmark = pytest.mark.kernel

CLIENT = r"""
import http.client, json, sys, time
port, mode = int(sys.argv[1]), sys.argv[2]
c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
out = []
if mode == "basic":
    for i in range(3):   # keep-alive: three requests on one connection
        c.request("POST", "/mcp", body=json.dumps({"i": i}), headers={"Content-Type": "application/json", "Authorization": "Bearer workload-fake"})
        r = c.getresponse(); out.append([r.status, json.loads(r.read())])
    c.request("POST", "/mcp", body=iter([b'{"chunk', b'ed": 1}']), headers={"Transfer-Encoding": "chunked"}, encode_chunked=True)
    r = c.getresponse(); out.append([r.status, json.loads(r.read())])
    c.request("POST", "/mcp", body=b'{"expect": 1}', headers={"Expect": "100-continue", "Content-Length": "13"})
    r = c.getresponse(); out.append([r.status, json.loads(r.read())])
elif mode == "stream":
    t0 = time.monotonic()
    c.request("GET", "/stream")
    r = c.getresponse()
    while True:
        line = r.fp.readline()
        if not line: break
        if line.startswith(b"data:"): out.append([round((time.monotonic() - t0) * 1000), line.decode().strip()])
        if len(out) == 3: break
print(json.dumps(out))
"""


@pytest.fixture
def hangup_upstream():
    with hangup_server() as port:
        yield port


@pytest.fixture
def agent(tmp_path, upstream, hangup_upstream):
    with cgroup_child() as cg:
        dead = free_port()  # nothing listens there
        cfg = passthrough_config(
            tmp_path, cg, {"up": upstream, "hangup": hangup_upstream, "dead": dead}
        )
        with AgentProcess(cfg, tmp_path) as a:
            a.wait_ready()
            a.cg, a.upstream, a.hangup, a.dead = cg, upstream, hangup_upstream, dead
            yield a


def forwarded_in(events: list[dict]) -> list[dict]:
    return [e for e in events if e["event"] == "request.forwarded"]


def run_client(port, mode, cgroup=None):
    return json.loads(run_python(CLIENT, port, mode, cgroup=cgroup))


def test_managed_process_goes_through_the_proxy_with_http_semantics_intact(agent):
    out = run_client(agent.upstream, "basic", agent.cg)
    assert out == [
        [200, {"echo": {"i": 0}}],
        [200, {"echo": {"i": 1}}],
        [200, {"echo": {"i": 2}}],
        [200, {"echo": {"chunked": 1}}],
        [200, {"echo": {"expect": 1}}],
    ]
    # passthrough observes only; the workload's header passes as sent
    assert [s["auth"] for s in Upstream.seen[:3]] == ["Bearer workload-fake"] * 3
    # all five requests reused one upstream connection from the proxy's pool
    assert len({s["peer_port"] for s in Upstream.seen}) == 1
    audit = audit_events(agent.stdout_path, lambda evs: len(forwarded_in(evs)) >= 5)
    forwarded = [a for a in audit if a["event"] == "request.forwarded"]
    assert len(forwarded) == 5 and forwarded[0]["server"] == "up"
    assert forwarded[0]["pid"] > 0 and forwarded[0]["status"] == 200


def test_unmanaged_process_is_not_redirected(agent):
    run_client(agent.upstream, "basic")  # not in the managed cgroup
    audit = audit_events(agent.stdout_path, quiet=0.2)
    assert not [a for a in audit if a["event"].startswith("request.")]
    assert len({s["peer_port"] for s in Upstream.seen}) == 1  # its own direct connection


def test_sse_events_are_streamed_as_they_arrive(agent):
    out = run_client(agent.upstream, "stream", agent.cg)
    assert [e[1] for e in out] == ["data: 0", "data: 1", "data: 2"]
    assert out[0][0] < out[1][0] < out[2][0]  # arrived one by one, not all at the end


TLS_CLIENT = r"""
import http.client, json, ssl, sys
port, cafile = int(sys.argv[1]), sys.argv[2]
ctx = ssl.create_default_context(cafile=cafile)
c = http.client.HTTPSConnection("127.0.0.1", port, timeout=10, context=ctx)
try:
    c.request("POST", "/mcp", body=b'{"tls": 1}', headers={"Content-Length": "10"})
    r = c.getresponse(); print(json.dumps([r.status, json.loads(r.read())]))
except ssl.SSLError as e:
    print(json.dumps(["ssl_error", e.reason]))
"""


def test_https_workload_is_intercepted_with_the_injection_ca_and_fails_closed_without(tmp_path):
    with tls_upstream(tmp_path) as (up_port, ca), cgroup_child() as cg:
        cfg = write_config(
            tmp_path,
            extra=inject_table(cg, free_port(), upstream_ca_file=str(ca))
            + server_table("tls", f"https://127.0.0.1:{up_port}/mcp", mode="passthrough"),
        )
        with AgentProcess(cfg, tmp_path) as a:
            a.wait_ready()
            # exported where workloads can read it (the state directory is 0700)
            inject_ca = tmp_path / "run" / "inject-ca.crt"
            assert oct(inject_ca.stat().st_mode & 0o777) == "0o644"

            def client(cafile):
                out = run_python(TLS_CLIENT, up_port, cafile, cgroup=cg, check=False)
                assert out, a.stderr_path.read_text()[-3000:]
                return json.loads(out)

            assert client(inject_ca) == [200, {"echo": {"tls": 1}}]
            assert client(ca)[0] == "ssl_error"  # trusts only the real server's CA
            assert len(Upstream.seen) == 1  # nothing reached the server unprotected


def test_malformed_http_from_a_workload_gets_400_and_nothing_upstream(agent):
    code = (
        f"import socket; s = socket.create_connection(('127.0.0.1', {agent.upstream})); "
        "s.sendall(b'NOT HTTP AT ALL\\r\\n\\r\\n'); print(s.recv(4096).decode())"
    )
    out = run_python(code, cgroup=agent.cg, timeout=30, check=False)
    assert out.startswith("HTTP/1.1 400 Bad Request")
    assert "credless: malformed HTTP" in out
    assert Upstream.seen == []


RAW_CLIENT = r"""
import socket, sys
port, payload = int(sys.argv[1]), sys.argv[2].encode().decode("unicode_escape").encode("latin-1")
s = socket.create_connection(("127.0.0.1", port), timeout=10)
s.sendall(payload)
buf = b""
while True:
    try:
        data = s.recv(65536)
    except socket.timeout:
        break
    if not data:
        break
    buf += data
sys.stdout.write(buf.decode("latin-1"))
"""


def raw_exchange(port: int, payload: str, cgroup) -> str:
    return run_python(RAW_CLIENT, port, payload, cgroup=cgroup)


def test_pipelined_requests_are_answered_in_order(agent):
    one = '{"n": 1}'
    two = '{"n": 2}'
    payload = (
        f"POST /mcp HTTP/1.1\\r\\nHost: x\\r\\nContent-Length: {len(one)}\\r\\n\\r\\n{one}"
        f"POST /mcp HTTP/1.1\\r\\nHost: x\\r\\nContent-Length: {len(two)}\\r\\n"
        f"Connection: close\\r\\n\\r\\n{two}"
    )
    out = raw_exchange(agent.upstream, payload, agent.cg)
    assert out.count("HTTP/1.1 200") == 2
    assert out.index('{"echo": {"n": 1}}') < out.index('{"echo": {"n": 2}}')
    assert [s["body"] for s in Upstream.seen] == [one, two]


def test_upstream_that_hangs_up_without_answering_gets_a_502_and_an_audit_event(agent):
    out = raw_exchange(
        agent.hangup,
        "POST /mcp HTTP/1.1\\r\\nHost: x\\r\\nContent-Length: 2\\r\\n\\r\\n{}",
        agent.cg,
    )
    assert out.startswith("HTTP/1.1 502 Bad Gateway")
    assert "closed the connection without answering" in out
    audit = audit_events(agent.stdout_path, "request.failed")
    failed = [a for a in audit if a["event"] == "request.failed"]
    assert failed and failed[-1]["server"] == "hangup"


def test_unreachable_upstream_gets_a_502_naming_the_cause(agent):
    out = raw_exchange(
        agent.dead,
        "POST /mcp HTTP/1.1\\r\\nHost: x\\r\\n"
        "Content-Length: 2\\r\\nConnection: close\\r\\n\\r\\n{}",
        agent.cg,
    )
    assert out.startswith("HTTP/1.1 502 Bad Gateway")
    body = json.loads(out.split("\n\n", 1)[1])  # text mode turned CRLF into LF
    assert body["error"] == "credless: the MCP server is unreachable"
    audit = audit_events(agent.stdout_path, "request.failed")
    assert any(a["event"] == "request.failed" and a["server"] == "dead" for a in audit)


SLOW_READER = r"""
import hashlib, http.client, sys, time
c = http.client.HTTPConnection("127.0.0.1", int(sys.argv[1]), timeout=30)
c.request("GET", "/big")
r = c.getresponse()
h, n = hashlib.sha256(), 0
while chunk := r.read(256 << 10):
    h.update(chunk)
    n += len(chunk)
    time.sleep(0.01)     # slower than the upstream writes: the proxy must hold back
print(n, h.hexdigest())
"""


def test_large_response_to_a_slow_reader_arrives_whole(agent):
    import hashlib

    n, digest = run_python(SLOW_READER, agent.upstream, cgroup=agent.cg, timeout=120).split()
    assert int(n) == len(BIG_BODY) and digest == hashlib.sha256(BIG_BODY).hexdigest()


HOP_CLIENT = r"""
import http.client, json, sys
c = http.client.HTTPConnection("127.0.0.1", int(sys.argv[1]), timeout=10)
out = {"close": [], "head": None, "eof": None}
for _ in range(3):
    c.request("GET", "/close")
    r = c.getresponse()
    out["close"].append([r.status, r.read().decode(), r.getheader("Connection"),
                         id(c.sock) if c.sock else None])
c.request("HEAD", "/anything")
r = c.getresponse()
out["head"] = [r.status, r.getheader("Content-Length"), r.read().decode()]
c.request("GET", "/eof")
r = c.getresponse()
out["eof"] = [r.status, r.read().decode(), r.getheader("Connection")]
print(json.dumps(out))
"""


def test_each_side_manages_its_own_connection(agent):
    out = json.loads(run_python(HOP_CLIENT, agent.upstream, cgroup=agent.cg))
    # the server closes after each answer; the workload's connection stays open (the
    # server's Connection: close is not forwarded) and the proxy dials the server anew
    assert [c[:3] for c in out["close"]] == [[200, "ok", None]] * 3
    assert len({c[3] for c in out["close"]}) == 1 and out["close"][0][3] is not None
    assert len({s["peer_port"] for s in Upstream.seen if s.get("path") == "/close"}) == 3
    # HEAD: the answer's Content-Length describes a body that is not sent
    assert out["head"] == [200, "1000", ""]
    # a body that ends with the server's connection ends the workload's too, and says so;
    # it is a complete answer, audited as forwarded
    assert out["eof"] == [200, "until the end", "close"]
    # /eof is the connection's last request: its event comes after the others'
    audit = audit_events(agent.stdout_path, lambda evs: any(a.get("path") == "/eof" for a in evs))
    paths = [a["path"] for a in audit if a["event"] == "request.forwarded"]
    assert paths.count("/eof") == 1
    assert not [a for a in audit if a["event"] == "request.failed"]


EXPECT_CLIENT = r"""
import socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=5)
s.sendall(b"POST /mcp HTTP/1.1\r\nHost: x\r\nContent-Length: 8\r\n"
          b"Expect: 100-continue\r\n\r\n")
interim = s.recv(4096)           # the body is held back until the proxy asks for it
s.sendall(b'{"n": 7}')
answer = b""
while b"}}" not in answer:
    answer += s.recv(4096)
print(interim.decode().split("\r\n")[0])
print(answer.decode().split("\r\n")[0])
print(answer.decode().rsplit("\r\n", 1)[-1])
"""


def test_expect_100_continue_is_answered_before_the_body_is_read(agent):
    out = run_python(EXPECT_CLIENT, agent.upstream, cgroup=agent.cg)
    assert out.splitlines() == [
        "HTTP/1.1 100 Continue",
        "HTTP/1.1 200 OK",
        '{"echo": {"n": 7}}',
    ]


PLAIN_CLIENT = r"""
import http.client, json, sys
c = http.client.HTTPConnection("127.0.0.1", int(sys.argv[1]), timeout=10)
try:
    c.request("POST", "/mcp", body=b'{"n": 1}', headers={"Content-Length": "8"})
    r = c.getresponse()
    print(json.dumps([r.status, json.loads(r.read())]))
except ConnectionRefusedError:
    print(json.dumps(["refused"]))
"""


def test_redirect_stays_attached_across_a_restart_and_detach_removes_it(
    tmp_path, upstream, credless_cmd
):
    with cgroup_child() as cg:
        cfg = passthrough_config(tmp_path, cg, {"up": upstream})
        pin = Path(config.load(cfg).agent.bpf_pin_dir)

        def client(cgroup=cg):
            return json.loads(run_python(PLAIN_CLIENT, upstream, cgroup=cgroup))

        with AgentProcess(cfg, tmp_path) as first:
            first.wait_ready()
            assert client() == [200, {"echo": {"n": 1}}]
            assert first.stop() == 0
            # no agent: the managed process is refused, the server sees nothing ...
            assert (pin / "link_connect4").exists()
            seen = len(Upstream.seen)
            assert client() == ["refused"]
            assert len(Upstream.seen) == seen
            # ... while an unmanaged one is untouched
            assert client(cgroup=None) == [200, {"echo": {"n": 1}}]
            with AgentProcess(cfg, tmp_path) as second:
                second.wait_ready()
                assert client() == [200, {"echo": {"n": 1}}]
                took_over = [
                    e for e in second.log_events() if e.get("event") == "redirect attached"
                ]
                assert took_over and took_over[0]["took_over"] is True
                assert second.stop() == 0
                # (inside the block: leaving it removes every pin, whatever happened)
                r = subprocess.run(
                    [*credless_cmd, "detach", "--config", str(cfg)],
                    capture_output=True,
                    text=True,
                    timeout=60,
                )
                assert r.returncode == 0 and "redirect detached" in r.stdout, r.stderr
                assert not (pin / "link_connect4").exists()
                assert not pin.exists()  # nothing else was pinned there: the directory goes
                # detached: the managed process now reaches the server directly
                before = len(Upstream.seen)
                assert client() == [200, {"echo": {"n": 1}}]
                assert len(Upstream.seen) == before + 1


def test_an_interim_response_is_relayed_and_the_answer_follows(agent):
    out = raw_exchange(
        agent.upstream,
        "GET /early HTTP/1.1\\r\\nHost: x\\r\\nConnection: close\\r\\n\\r\\n",
        agent.cg,
    )
    assert out.startswith("HTTP/1.1 103 ") and "rel=preload" in out
    assert "HTTP/1.1 200 OK" in out and out.endswith("after hints")
    audit = audit_events(agent.stdout_path, "request.forwarded")
    done = [a for a in audit if a["event"].startswith("request.")]
    assert [(a["event"], a["status"]) for a in done] == [("request.forwarded", 200)]


# One answered request, then the connection changes hands: the process that opened it
# exec's another image ("exec") or exits leaving it to a child ("fork"); or, while it still
# runs the same image, a child it forked writes the next request ("child") or the body of a
# request whose head it sent ("body"), or it writes it itself after setuid ("setuid") or
# after moving to another cgroup ("cgroup"). The next request on it must not be served as
# the process that connected.
CHANGE_CLIENT = r"""
import json, os, select, socket, sys
port, how = int(sys.argv[1]), sys.argv[2]
REQ = b"POST /mcp HTTP/1.1\r\nHost: x\r\nContent-Length: 8\r\n\r\n{\"i\": 1}"
def ask(s):
    s.sendall(REQ)
    data = b""
    while not data.endswith(b"}}"):
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    return data.decode().split("\r\n")[0]
if how == "second":          # the new image: the inherited connection, asked again
    s = socket.socket(fileno=int(sys.argv[3]))
    s.settimeout(10)
    print(json.dumps({"first": sys.argv[4], "second": ask(s), "pid": os.getpid()}))
    sys.exit(0)
s = socket.create_connection(("127.0.0.1", port), timeout=10)
first = ask(s)
if how == "exec":
    os.set_inheritable(s.fileno(), True)
    os.execv(sys.executable, [sys.executable, "-c", sys.argv[3], str(port), "second",
                              str(s.fileno()), first])
if how in ("setuid", "cgroup"):
    if how == "setuid":
        os.setuid(65534)
    else:
        with open(os.path.join(sys.argv[3], "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))
    print(json.dumps({"first": first, "second": ask(s), "pid": os.getpid()}), flush=True)
    sys.exit(0)
if how in ("child", "body"):     # the process that connected runs on, waiting for it
    if how == "body":            # it sends a head, decided once 100 Continue comes; its
        head, body = REQ.split(b"\r\n\r\n")  # child, the body
        s.sendall(head + b"\r\nExpect: 100-continue\r\n\r\n")
        interim = b""
        while not interim.endswith(b"\r\n\r\n"):
            interim += s.recv(1)
        assert interim.startswith(b"HTTP/1.1 100 "), interim
        REQ = body
    child = os.fork()
    if child == 0:
        print(json.dumps({"first": first, "second": ask(s), "pid": os.getpid()}), flush=True)
        os._exit(0)
    os.waitpid(child, 0)
    os._exit(0)
parent = os.pidfd_open(os.getpid())
if os.fork() == 0:
    select.select([parent], [], [])   # readable once the process that connected has exited
    print(json.dumps({"first": first, "second": ask(s), "pid": os.getpid()}), flush=True)
    os._exit(0)
os._exit(0)
"""


CHANGED_HANDS = {
    "exec": "exec'd or exited",
    "fork": "exec'd or exited",
    "child": "another process wrote on this connection",
    "body": "another process wrote on this connection",
    "setuid": "another uid wrote on this connection",
    "cgroup": "another cgroup wrote on this connection",
}


@pytest.mark.parametrize("how", list(CHANGED_HANDS))
def test_a_connection_that_changed_hands_is_closed_not_served(agent, how):
    with cgroup_child() as elsewhere:  # "cgroup": a cgroup no pattern manages
        arg = str(elsewhere) if how == "cgroup" else CHANGE_CLIENT
        out = json.loads(run_python(CHANGE_CLIENT, agent.upstream, how, arg, cgroup=agent.cg))
    assert out["first"] == "HTTP/1.1 200 OK"
    assert out["second"] == ""  # closed without an answer
    assert len(Upstream.seen) == 1  # the second request never reached the server
    audit = audit_events(agent.stdout_path, "request.denied")
    denied = [a for a in audit if a["event"] == "request.denied"]
    assert len(denied) == 1 and CHANGED_HANDS[how] in denied[0]["reason"]


UPGRADE_CLIENT = r"""
import socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=10)
s.sendall(b"GET /mcp HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
          b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
          b"\x81\x05hello")   # a frame of the other protocol right behind the request
data = b""
while chunk := s.recv(65536):
    data += chunk
print(data.decode("latin-1"))
"""


def test_a_protocol_upgrade_is_refused_and_the_connection_closed(agent):
    out = run_python(UPGRADE_CLIENT, agent.upstream, cgroup=agent.cg)  # exits 0: the proxy closed
    assert out.startswith("HTTP/1.1 501 Not Implemented")
    assert "upgrades" in out
    audit = audit_events(agent.stdout_path, "request.denied")
    assert not [a for a in audit if a["event"] == "request.forwarded"]  # never sent
    denied = [a for a in audit if a["event"] == "request.denied"]
    assert len(denied) == 1 and "websocket" in denied[0]["reason"]


# An idle keep-alive connection and an SSE stream in flight when the agent is told to stop.
STOPPING_CLIENT = r"""
import json, socket, sys, time
port = int(sys.argv[1])
idle = socket.create_connection(("127.0.0.1", port), timeout=10)
idle.sendall(b"POST /mcp HTTP/1.1\r\nHost: x\r\nContent-Length: 8\r\n\r\n{\"n\": 1}")
answer = b""
while not answer.endswith(b"}}"):     # answered (in however many reads); then idle
    answer += idle.recv(65536)
stream = socket.create_connection(("127.0.0.1", port), timeout=10)
stream.sendall(b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n")
buf = b""
while b"data: 0" not in buf:
    buf += stream.recv(65536)
print("streaming", flush=True)        # the test stops the agent now
t0 = time.monotonic()
idle_closed = idle.recv(65536) == b""
idle_after = time.monotonic() - t0
while not buf.endswith(b"0\r\n\r\n"):
    data = stream.recv(65536)
    if not data:
        break
    buf += data
print(json.dumps({"idle_closed": idle_closed, "idle_after": idle_after,
                  "events": buf.count(b"data: "), "complete": buf.endswith(b"0\r\n\r\n")}))
"""


def test_stopping_drains_answers_in_flight_and_closes_idle_connections(agent):
    client = start_python(STOPPING_CLIENT, agent.upstream, cgroup=agent.cg)
    try:
        assert client.stdout.readline().strip() == "streaming", client.stderr.read()[-2000:]
        stopped_at = time.monotonic()
        agent.proc.send_signal(signal.SIGTERM)
        out, _err = client.communicate(timeout=30)
        assert agent.proc.wait(30) == 0
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
    result = json.loads(out)
    assert result["idle_closed"] and result["idle_after"] < 2  # closed at once, cleanly
    assert result["events"] == 3 and result["complete"]  # the stream ran to its end
    assert time.monotonic() - stopped_at < 10  # not the whole drain time
    assert "draining proxy connections" in agent.stderr_path.read_text()


def test_a_stream_whose_workload_has_gone_is_closed_on_the_server_side_too(agent):
    """An MCP session's notification stream may stay silent for as long as the session
    lives: when its workload exits, the proxy must not hold it (and the server's side)
    open until the server ends it."""
    code = (
        "import socket, sys\n"
        "s = socket.create_connection(('127.0.0.1', int(sys.argv[1])), timeout=10)\n"
        "s.sendall(b'GET /forever HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n')\n"
        "buf = b''\n"
        "while b'data: 0' not in buf:\n"
        "    buf += s.recv(65536)\n"
    )  # then exits: its socket closes
    run_python(code, agent.upstream, cgroup=agent.cg, timeout=30)
    closed = wait_for(
        lambda: [s for s in Upstream.seen if s.get("path") == "/forever"],
        10,
        what="the server's side of the stream closed",
    )
    assert closed[0]["closed_after"] < 5
    audit = audit_events(agent.stdout_path, "request.aborted")
    aborted = [a for a in audit if a["event"] == "request.aborted"]
    assert aborted and aborted[-1]["server"] == "up" and aborted[-1]["status"] == 200
