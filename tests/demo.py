"""`make demo`: the whole path on one machine, with a readable transcript.

Starts the real peers (oidc-provider as the authorization server, an MCP server from the
official SDK that demands DPoP-bound tokens, and a stock one behind https), the credless
agent, and a credential-less MCP client (official SDK) in a fresh cgroup, then again from a
network namespace of its own (as a Kubernetes pod has), then over https to the second
server (credless intercepts with its injection CA, which the client trusts, and verifies
the server by its own CA); then `credless explain` on a live workload and on a process
outside the managed cgroup; prints who was attested as what, which token was obtained
(fingerprints only) and the tool results; leaves nothing running.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from agent import doctor
from tests.helpers import audit_events, free_port, wait_for
from tests.kernel import enter_cgroup, network_namespace, start_python
from tests.mcp.peers import REPO, McpServer, run_client
from tests.tlsca import TestCA
from tests.world import build_world, server_table

SPIFFE_ID = "spiffe://example.org/agent/weather-bot"


def say(msg: str = "") -> None:
    print(f"[demo] {msg}" if msg else "", flush=True)


def pod_step(cg, mcp_url: str, proxy_port: int) -> list[dict]:
    """The same client in a network namespace of its own, as in a Kubernetes pod: the agent
    listens inside that namespace once a managed process lives there."""
    say("3. the MCP client in a network namespace of its own (a pod's), no credentials:")
    with network_namespace("credless-demo") as ns:
        pause = subprocess.Popen(
            ["ip", "netns", "exec", ns, "sleep", "120"], preexec_fn=enter_cgroup(cg)
        )  # the pod's first process
        try:
            wait_for(
                lambda: subprocess.run(
                    ["ip", "netns", "exec", ns, "ss", "-Htln", f"sport = :{proxy_port}"],
                    capture_output=True,
                    text=True,
                ).stdout.strip(),
                15,
                what="the agent's listener in the pod's namespace",
            )
            say(f"   the agent now listens inside namespace {ns} too")
            out = run_client(
                mcp_url,
                'call:echo:{"text": "hello from a pod"}',
                preexec=enter_cgroup(cg),
                prefix=["ip", "netns", "exec", ns],
            )
            for line in out:
                say(f"   <- {json.dumps(line)}")
            return out
        finally:
            pause.kill()
            pause.wait()


def https_step(cg, url: str, inject_ca: Path) -> list[dict]:
    """The client speaking https itself, trusting only credless's injection CA."""
    say("4. the MCP client over https to a stock SDK server, no credentials; it trusts only")
    say(f"   credless's injection CA ({inject_ca}):")
    r = subprocess.run(
        [
            *(sys.executable, "-m", "tests.mcp.client", url),
            *('call:echo:{"text": "hello over https"}', "--ca-file", str(inject_ca)),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=90,
        preexec_fn=enter_cgroup(cg),
    )
    out = [json.loads(ln) for ln in r.stdout.splitlines() if ln.startswith("{")]
    for line in out or [{"error": r.stderr[-500:]}]:
        say(f"   <- {json.dumps(line)}")
    return out or [{"error": "no output"}]


# A workload that stays alive (its identity, and the token cached for it, live as long as
# it does): for each port on stdin it sends one MCP initialize, with no credentials, reads
# the answer whole and prints its status.
LIVE_WORKLOAD = r"""
import http.client, json, sys
body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
    "protocolVersion": "2025-06-18", "capabilities": {},
    "clientInfo": {"name": "demo", "version": "1"}}})
for port in sys.stdin:
    c = http.client.HTTPConnection("127.0.0.1", int(port), timeout=30)
    c.request("POST", "/mcp", body, {"Content-Type": "application/json",
                                     "Accept": "application/json, text/event-stream"})
    r = c.getresponse()
    r.read()
    print(r.status, r.reason, flush=True)
    c.close()
"""


def explain_step(w, mcp: McpServer, config: Path) -> bool:
    """`credless explain` on a live workload that has just called the server, and on a
    process outside the managed cgroup (this demo's own)."""
    from agent.explain.render import render
    from agent.observe import admin

    sock = w.tmp / "run" / "admin.sock"
    say("5. `credless explain`: the chain a live process's request goes through, each step")
    say("   saying why (the operator's view; run as root on the node):")
    worker = start_python(LIVE_WORKLOAD, cgroup=w.cg)
    try:
        assert worker.stdin is not None and worker.stdout is not None
        worker.stdin.write(f"{mcp.port}\n")
        worker.stdin.flush()
        say(
            f"   a live workload (pid {worker.pid}) sent an MCP initialize: "
            f"{worker.stdout.readline().strip()}"
        )
        say(
            f"   $ credless explain --config {config} --pid {worker.pid} --url {mcp.url} "
            "--method tools/call --tool echo"
        )
        answer = admin.call(
            sock,
            "explain",
            timeout=30,
            pid=worker.pid,
            url=mcp.url,
            method="tools/call",
            tool="echo",
        )
        for line in render(answer).splitlines():
            say(f"   {line}")
    finally:
        worker.kill()
        worker.wait()
    say()
    say(f"   $ credless explain --config {config} --pid {os.getpid()} --url {mcp.url}")
    outside = admin.call(sock, "explain", timeout=30, pid=os.getpid(), url=mcp.url)
    for line in render(outside).splitlines()[:2]:
        say(f"   {line}")
    intercepted = next(s for s in outside["steps"] if s["step"] == "intercept")
    for line in intercepted["lines"][-1:]:
        say(f"      {line}")
    return answer["outcome"] == "would be sent with credless's credential" and (
        intercepted["ok"] is False
    )


def main() -> int:
    results = doctor.run_checks(doctor.DoctorOptions())
    if doctor.exit_code(results):
        print(doctor.render(results, as_json=False))
        say("this host cannot run credless; apply the fixes above (make setup does most)")
        return 1
    say("host checks passed (credless doctor)")
    with tempfile.TemporaryDirectory(prefix="credless-demo-") as tmp:
        with build_world(Path(tmp), SPIFFE_ID, "credless-demo") as w:
            mcp = w.enter(McpServer(w.tmp, dpop=True))
            ca = TestCA(w.tmp, "demo server CA")
            mcps = w.enter(McpServer(w.tmp, tls=ca))  # stock: Bearer tokens
            oidc = w.authorization_server([mcp.url, mcps.url])
            mcp.start(oidc.issuer)
            mcps.start(oidc.issuer)
            say(f"authorization server (oidc-provider): {oidc.issuer}")
            say(f"MCP server (official SDK, requires DPoP-bound tokens): {mcp.url}")
            say(f"MCP server (official SDK, stock, behind https): {mcps.url}")
            agent = w.start_agent(
                server_table("weather", mcp.url)
                + "\n"
                + server_table("weather-tls", mcps.url, ca_file=str(ca.cert_path)),
                inject={"tls_listen_port": free_port()},
            )
            say(
                f"credless agent running (pid {agent.proc.pid}); workloads in cgroup "
                f"/{w.cg.name} are redirected to it"
            )
            say()
            say("1. the same MCP client, outside the managed cgroup (no credless):")
            out = run_client(mcp.url, "list")
            say(f"   -> {out[0].get('error')}: {out[0].get('message')}")
            say("2. the MCP client inside the managed cgroup, still with no credentials:")
            out = run_client(
                mcp.url,
                "list",
                'call:echo:{"text": "hello from a workload that holds nothing"}',
                'call:add:{"a": 20, "b": 22}',
                preexec=enter_cgroup(w.cg),
            )
            for line in out:
                say(f"   <- {json.dumps(line)}")
            pod = pod_step(w.cg, mcp.url, w.proxy_port)
            tls = https_step(w.cg, mcps.url, w.tmp / "run" / "inject-ca.crt")
            say()
            explained = explain_step(w, mcp, agent.config)
            say()
            events = audit_events(agent.stdout_path, "request.injected")
            inj = next((e for e in events if e["event"] == "request.injected"), None)
            tok = next((e for e in events if e["event"] == "token.obtained"), None)
            if inj:
                say(f"attested: pid {inj['pid']} {inj['exe']} in cgroup {inj['cgroup']}")
                say(f"   as {inj['spiffe_id']}")
            if tok:
                say(
                    f"token: {tok['token_type']} from {tok['issuer']}, expires in "
                    f"{tok['expires_in']}s, jti {tok['jti']}, bound to DPoP key "
                    f"{tok['jkt']}, sha256 {tok['token_sha256']} (the token itself never "
                    "left the agent)"
                )
            for t in (e for e in events if e["event"] == "token.obtained"):
                say(
                    f"   {t.get('server')}: a {t.get('token_type')} token (dpop = auto: what "
                    "the server's challenge asked for)"
                )
            n = sum(1 for e in events if e["event"] == "request.injected")
            say(f"{n} requests injected, each an audit event (agent stdout)")
            ok = bool(
                inj and tok and explained and all("error" not in ln for ln in out + pod + tls)
            )
        say(
            "stopped the agent, the MCP server and the authorization server; removed the "
            "cgroup and the namespace"
        )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
