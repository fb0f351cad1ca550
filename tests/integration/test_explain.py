"""`credless explain` against a live agent, on the real kernel: real processes in a managed
and an unmanaged cgroup and in a pod-like network namespace, a pid that is not attested (an
exited one, a thread id), a URL that is not intercepted, an https server on the TLS
listener, and the chain after a real request (policy, the cached token, the audit events it
left); `oauth probe` taking a server by name or URL.

A broker-mode server (the echo upstream) behind a real token from oidc-provider (Bearer);
the workloads are real processes; the commands are the real CLI on the real admin socket.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import pytest

from agent.explain.render import render
from tests.helpers import free_port, wait_for
from tests.kernel import cgroup_child, enter_cgroup, network_namespace, start_python
from tests.world import build_world, server_table, table, tools_rule

pytestmark = pytest.mark.kernel

SID = "spiffe://example.org/test/explained"
SLEEPER = "import sys; sys.stdin.read()"  # lives until its stdin closes

# waits; for each port given on stdin, one POST of a tools/call on a fresh connection to
# it, read whole, printing the status: a workload that stays alive (its identity, and the
# token cached for it, live as long as it does)
WORKLOAD = r"""
import http.client, sys
body = '{"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "echo"}}'
for port in sys.stdin:
    c = http.client.HTTPConnection("127.0.0.1", int(port), timeout=10)
    c.request("POST", "/mcp", body, {"Content-Type": "application/json"})
    r = c.getresponse()
    r.read()
    print(r.status, flush=True)
    c.close()
"""


def explain(w, pid: int, url: str, *args: str) -> tuple[int, Any]:
    """`credless explain --json`: its exit code and answer (the error text on exit 2)."""
    r = subprocess.run(
        [
            *(sys.executable, "-m", "agent", "explain", "--config", str(w.agent.config)),
            *("--pid", str(pid), "--url", url, *args, "--json"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if r.returncode == 2:
        return r.returncode, r.stdout + r.stderr
    return r.returncode, json.loads(r.stdout)


def steps(answer: dict) -> dict[str, dict]:
    return {s["step"]: s for s in answer["steps"]}


@pytest.fixture
def world(tmp_path, upstream):
    with build_world(tmp_path, SID) as w:
        url = f"http://127.0.0.1:{upstream}/mcp"
        oidc = w.authorization_server([url], dpop=False)
        w.url = url
        w.tls_port = free_port()
        # an https server, observed only: intercepted on the TLS listener (nothing serves it)
        w.secure = f"https://localhost:{free_port()}/mcp"
        # prewarm off: the token cache stays empty until the test's own call
        w.start_agent(
            server_table("echo", url, issuer=oidc.issuer, dpop="never", prewarm=False)
            + server_table("secure", w.secure, mode="passthrough"),
            inject={"tls_listen_port": w.tls_port},
            entries=table("[[entry]]", id="explained", spiffe_id=SID, selectors=[w.selector])
            + table(
                "[[entry]]",
                id="root-only",
                spiffe_id="spiffe://example.org/test/root",
                selectors=[w.selector, "unix:uid:4242"],
            ),
            policy=tools_rule("echo-only", SID, "echo", ["echo"]),
        )
        yield w


def test_a_managed_process_is_explained_link_by_link_and_after_a_real_call(world, upstream):
    proc = world.enter(start_python(WORKLOAD, cgroup=world.cg))
    world.stack.callback(proc.kill)
    code, a = explain(world, proc.pid, world.url, "--method", "tools/call", "--tool", "echo")
    s = steps(a)
    assert code == 0, a
    assert a["spiffe_id"] == SID and a["server"] == "echo"
    assert s["process"]["ok"] and s["process"]["data"]["cgroup"] == f"/{world.cg.name}"
    assert s["process"]["data"]["exec_time"].endswith("+00:00")
    assert world.selector in s["selectors"]["lines"]
    considered = {c["id"]: c for c in s["entries"]["data"]["considered"]}
    assert considered["explained"]["chosen"] and considered["explained"]["matched"]
    assert not considered["root-only"]["matched"]
    assert "unix:uid:4242" in considered["root-only"]["reason"]
    assert s["intercept"]["ok"] and s["intercept"]["data"]["managed"] == "managed"
    assert s["intercept"]["data"]["addresses"]["127.0.0.1"] == 0  # the plain listener
    assert s["policy"]["data"] == {
        "decision": "allow",
        "rule": "echo-only",
        "reason": "allowed by rule 'echo-only'",
    }
    assert s["token"]["ok"] is None and s["token"]["data"]["cached"] is False
    # a denied tool: the rule that decides, and exit 1
    code, denied = explain(world, proc.pid, "echo", "--method", "tools/call", "--tool", "rm")
    assert code == 1 and steps(denied)["policy"]["ok"] is False
    assert denied["outcome"].startswith("policy: tools/call rm: denied")

    # a real call by the process: its token is cached, its audit events are kept
    proc.stdin.write(f"{upstream}\n")
    proc.stdin.flush()
    assert proc.stdout.readline().strip() == "200"
    code, after = explain(world, proc.pid, world.url)
    s = steps(after)
    assert s["token"]["ok"] is True and s["token"]["data"]["cached"] is True
    tok = s["token"]["data"]["tokens"][0]
    assert tok["token_type"] == "Bearer" and tok["issuer"] == world.oidc.issuer
    assert len(tok["token_sha256"]) == 16
    events = [e["event"] for e in s["audit"]["data"]["events"]]
    assert "token.obtained" in events and "request.injected" in events
    assert "access_token" not in json.dumps(after) and "eyJ" not in json.dumps(after)
    # the same answer for people: every step, in order
    text = render(after)
    titles = [ln.split()[1] for ln in text.splitlines()[3:] if ln[:2] in ("ok", "NO", "--")]
    assert titles == [
        "process",
        "selectors",
        "entries",
        "SPIFFE",
        "intercept",
        "policy",
        "token",
        "audit",
    ], text


def test_a_process_in_an_unmanaged_cgroup_is_not_intercepted_and_says_why(world):
    with cgroup_child("credless-explain-other") as other:
        proc = start_python(SLEEPER, cgroup=other)
        try:
            code, a = explain(world, proc.pid, world.url)
        finally:
            proc.kill()
            proc.wait()
    s = steps(a)
    assert code == 1 and a["spiffe_id"] is None
    assert s["identity"]["ok"] is False and s["entries"]["ok"] is None
    assert a["outcome"] == "intercept: not intercepted: the process's cgroup is not managed"
    assert s["intercept"]["ok"] is False and s["intercept"]["data"]["managed"] == "not managed"
    assert f"neither /{other.name} nor a cgroup above it is managed" in " ".join(
        s["intercept"]["lines"]
    )
    assert s["policy"]["ok"] is None and s["token"]["ok"] is None


def test_an_unattested_pid_says_why(world):
    proc = start_python(SLEEPER, cgroup=world.cg)
    proc.kill()
    proc.wait()  # reaped: the pid names no process now
    code, a = explain(world, proc.pid, world.url)
    s = steps(a)
    assert code == 1 and s["process"]["ok"] is False
    assert f"no process {proc.pid} is running" in s["process"]["summary"]
    # a thread id is not a process id
    threads = start_python(
        "import threading, sys; t = threading.Thread(target=sys.stdin.read); t.start();"
        "import threading as th; print(t.native_id, flush=True); t.join()",
        cgroup=world.cg,
    )
    try:
        tid = int(threads.stdout.readline())
        code, a = explain(world, tid, world.url)
    finally:
        threads.kill()
        threads.wait()
    assert f"{tid} is a thread of process {threads.pid}" in steps(a)["process"]["summary"]


def test_a_url_that_is_not_intercepted_and_a_name_that_is_not_configured(world):
    proc = world.enter(start_python(SLEEPER, cgroup=world.cg))
    world.stack.callback(proc.kill)
    elsewhere = f"http://127.0.0.1:{free_port()}/mcp"
    code, a = explain(world, proc.pid, elsewhere)
    s = steps(a)
    assert code == 1 and a["server"] is None
    assert s["intercept"]["summary"] == "not intercepted: its address is not a redirect target"
    known = f"known: echo ({world.url}), secure ({world.secure})"
    assert f"no [[servers]] entry has the URL {elsewhere!r}; {known}" in s["intercept"]["lines"]
    # the server's address, another path: intercepted, and refused by the proxy
    code, a = explain(world, proc.pid, world.url.replace("/mcp", "/admin"))
    assert steps(a)["intercept"]["summary"].startswith("intercepted as echo, but this URL")
    code, text = explain(world, proc.pid, "ecoh")
    assert code == 2
    assert f"no [[servers]] entry is named 'ecoh'; {known}" in text


def test_an_https_server_by_name_goes_to_the_tls_listener_of_both_loopbacks(world):
    proc = world.enter(start_python(SLEEPER, cgroup=world.cg))
    world.stack.callback(proc.kill)
    code, a = explain(world, proc.pid, "secure", "--method", "tools/call", "--tool", "x")
    s = steps(a)
    assert code == 0 and a["server"] == "secure"
    assert a["outcome"] == "would be forwarded as sent, observed and audited only (passthrough)"
    assert s["intercept"]["ok"] is True
    # localhost is both loopbacks, as the proxy intercepts it
    assert s["intercept"]["data"]["addresses"] == {
        "127.0.0.1": world.tls_port,
        "::1": world.tls_port,
    }
    ca = world.tmp / "run" / "inject-ca.crt"
    assert (
        f"  the workload's TLS must trust credless's injection CA ({ca})"
        in (s["intercept"]["lines"])
    )
    assert s["policy"]["summary"] == "not asked: passthrough mode forwards without MCP policy"
    assert s["token"]["summary"] == "none added: passthrough mode observes and audits only"


def test_oauth_probe_takes_the_server_by_name_or_url_from_a_live_agent(world):
    def probe(server: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [
                *(sys.executable, "-m", "agent", "oauth", "probe"),
                *("--config", str(world.agent.config), "--server", server, "--spiffe-id", SID),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )

    for server in ("echo", world.url.upper().replace("/MCP", "/mcp/")):
        r = probe(server)
        assert r.returncode == 0, r.stderr
        out = json.loads(r.stdout)
        assert out["server"] == "echo" and out["issuer"] == world.oidc.issuer
    r = probe("http://127.0.0.1:1/mcp")
    assert r.returncode == 2 and "no [[servers]] entry has the URL" in r.stderr


def test_a_process_in_a_pods_network_namespace_is_served_there(world):
    with network_namespace("credless-explain") as ns:
        proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-c", SLEEPER],
            stdin=subprocess.PIPE,
            preexec_fn=enter_cgroup(world.cg),
        )
        try:
            wait_for(  # the agent listens in a namespace once a managed process lives there
                lambda: subprocess.run(
                    ["ip", "netns", "exec", ns, "ss", "-Htln", f"sport = :{world.proxy_port}"],
                    capture_output=True,
                    text=True,
                ).stdout.strip(),
                30,
                what="the agent's listener in the namespace",
            )
            code, a = explain(world, proc.pid, world.url)
        finally:
            proc.kill()
            proc.wait()
    s = steps(a)
    assert code == 0 and s["intercept"]["ok"] is True, a
    ino = os.stat(f"/proc/{os.getpid()}/ns/net").st_ino
    lines = " ".join(s["intercept"]["lines"])
    assert "the agent listens in its network namespace too (net:[" in lines
    assert f"net:[{ino}]" not in lines  # not this (the agent's) namespace
