"""End to end on the real kernel with real peers: a credential-less MCP client (official
Python SDK) in a managed cgroup calls an MCP server (official SDK) that demands DPoP-bound
tokens from oidc-provider. credless attests, gets a token with a JWT-SVID and injects it."""

from __future__ import annotations

import contextlib
import json
import os

import pytest

from agent.policy import jsonrpc
from tests.helpers import audit_events
from tests.kernel import enter_cgroup, run_python, start_python
from tests.mcp.peers import McpServer, run_client
from tests.world import build_world, entry_table, server_table, tools_rule

pytestmark = pytest.mark.kernel
SPIFFE_ID = "spiffe://example.org/agent/weather-bot"


DEFAULT_POLICY = tools_rule("bot-tools", SPIFFE_ID, "weather", ["echo", "add", "stream_count"])


@contextlib.contextmanager
def start_world(tmp_path, dpop=True, entries=None, policy=DEFAULT_POLICY, policy_settings=""):
    """oidc-provider, an MCP server demanding tokens, and the agent, around a fresh cgroup.
    `entries(cg)` gives the registration entries (default: the cgroup is SPIFFE_ID)."""
    with build_world(tmp_path, SPIFFE_ID) as w:
        rows = entries(w.cg) if entries else [("bot", SPIFFE_ID, [w.selector])]
        w.mcp, w.dpop = w.enter(McpServer(tmp_path, dpop=dpop)), dpop
        w.authorization_server([w.mcp.url], [sid for _, sid, _ in rows], dpop=dpop)
        w.mcp.start(w.oidc.issuer)
        w.start_agent(
            server_table("weather", w.mcp.url),
            entries="".join(entry_table(*row) for row in rows),
            policy=policy,
            policy_settings=policy_settings,
        )
        yield w


@pytest.fixture(params=[True, False], ids=["dpop", "bearer"])
def world(tmp_path, request):
    with start_world(tmp_path, dpop=request.param) as w:
        yield w


def audit(world, until=None) -> list[dict]:
    return audit_events(world.agent.stdout_path, until)


def test_without_credless_the_server_refuses(world):
    out = run_client(world.mcp.url, "list")  # not in the managed cgroup
    assert out[0]["error"]
    assert world.mcp.stats()["calls"] == {}


def test_credential_less_client_works_through_credless(world):
    out = run_client(
        world.mcp.url,
        "list",
        'call:echo:{"text": "hi"}',
        'call:add:{"a": 2, "b": 3}',
        "stream:3:300",
        preexec=enter_cgroup(world.cg),
    )
    assert "error" not in out[0], out
    assert out[0]["tools"] == ["add", "echo", "secret_tool", "stream_count"]
    assert out[1]["text"] == "hi" and out[2]["text"] == "5"
    stream = out[3]
    assert stream["text"] == "counted 3" and len(stream["progress_ms"]) == 3
    # the first progress event reached the client long before the call finished
    assert stream["progress_ms"][0] < stream["progress_ms"][2] <= stream["done_ms"]
    stats = world.mcp.stats()
    assert stats["calls"] == {"echo": 1, "add": 1, "stream_count": 1}
    posts = [r for r in stats["requests"] if r["method"] == "POST"]
    # one unauthenticated POST: credless's own discovery probe for the 401 challenge
    assert [r["auth_scheme"] for r in posts].count(None) == 1
    assert {r["auth_scheme"] for r in posts} - {None} == {"DPoP" if world.dpop else "Bearer"}
    credentialed = [r for r in stats["requests"] if r["auth_scheme"]]
    events = audit(  # one request.injected for each request the server saw with a token
        world,
        lambda evs: [e["event"] for e in evs].count("request.injected") >= len(credentialed),
    )
    injected = [e for e in events if e["event"] == "request.injected"]
    assert injected and all(e["spiffe_id"] == SPIFFE_ID for e in injected)
    fingerprints = {e["token_sha256"] for e in injected}
    assert fingerprints == {r["token_sha256"] for r in stats["requests"] if r["auth_scheme"]}
    assert [e["event"] for e in events if e["event"] == "token.obtained"] == ["token.obtained"]


def test_workload_supplied_authorization_never_reaches_the_server(world):
    out = run_client(
        world.mcp.url,
        "list",
        preexec=enter_cgroup(world.cg),
        extra=["--header", "Authorization: Bearer stolen-or-fake"],
    )
    assert "error" not in out[0]
    import hashlib

    fake = hashlib.sha256(b"stolen-or-fake").hexdigest()[:16]
    assert fake not in {r["token_sha256"] for r in world.mcp.stats()["requests"]}


def test_policy_denies_a_tool_before_it_reaches_the_server(world):
    out = run_client(world.mcp.url, "call:secret_tool", preexec=enter_cgroup(world.cg))
    assert out[0].get("error") or out[0].get("is_error")
    assert "secret_tool" not in world.mcp.stats()["calls"]
    denied = [e for e in audit(world, "call.denied") if e["event"] == "call.denied"]
    assert denied and denied[-1]["tool"] == "secret_tool"
    assert denied[-1]["spiffe_id"] == SPIFFE_ID and denied[-1]["decision"] == "deny"


def test_metrics_after_an_end_to_end_run_pass_promtool_and_moved(world):
    import shutil
    import subprocess

    from agent import config
    from tests.helpers import http_get, wait_for

    run_client(world.mcp.url, "list", 'call:echo:{"text": "x"}', preexec=enter_cgroup(world.cg))
    # the client has exited: its identity's last process is gone, so its token is kept for
    # oauth.token_grace_seconds (docs/tokens.md; the drop: tests/unit/test_token_grace.py)
    kept = "identity ended; its tokens are kept for the next process"
    ended = wait_for(
        lambda: [e for e in world.agent.log_events() if e.get("event") == kept],
        what="the end of the identity's last process",
    )
    assert ended[0]["spiffe_id"] == SPIFFE_ID and ended[0]["tokens_kept"] == 1
    listen = config.load(world.agent.config).metrics.listen
    status, body = http_get(f"http://{listen}/metrics")
    assert status == 200
    lint = subprocess.run(
        [shutil.which("promtool") or "promtool", "check", "metrics"],
        input=body,
        capture_output=True,
        text=True,
    )
    assert lint.returncode == 0 and not (lint.stdout + lint.stderr).strip(), lint.stdout

    def value(series: str) -> float:
        line = next(
            ln
            for ln in body.splitlines()
            if ln.startswith(series + " ")
            or (ln.startswith(series + "{") and ln.split(" ")[0] == series)
        )
        return float(line.rsplit(" ", 1)[1])

    assert (
        value('credless_injected_requests_total{mode="broker",outcome="injected",server="weather"}')
        >= 2
    )
    assert value('credless_token_requests_total{outcome="ok",server="weather"}') == 1
    assert value('credless_policy_decisions_total{decision="allow",server="weather"}') >= 2
    assert value('credless_attest_lookups_total{result="hit"}') >= 1
    assert value("credless_token_cache_size") == 1  # kept for the grace period
    assert value('credless_bpf_events_lost_total{program="process_events"}') == 0
    assert value("credless_proxy_added_seconds_count") >= 2
    # no label carries a pid, a token or a URL with a query
    assert "pid=" not in body and "token=" not in body and "?" not in body
    status, ready = http_get(f"http://{listen}/readyz")
    assert status == 200 and "ok redirect" in ready and "ok attest" in ready


def test_status_shows_workloads_and_expiries_without_secrets(world, credless_cmd):
    import subprocess

    code = (
        "import socket, sys; s = socket.create_connection(('127.0.0.1', %d)); "
        "s.sendall(b'POST /mcp HTTP/1.1\\r\\nHost: 127.0.0.1:%d\\r\\nContent-Type: application/json\\r\\n"
        "Accept: application/json, text/event-stream\\r\\nContent-Length: 40\\r\\n\\r\\n"
        '{"jsonrpc":"2.0","id":1,"method":"ping"}\'); s.recv(65536); '
        "print('sent', flush=True); sys.stdin.read()" % (world.mcp.port, world.mcp.port)
    )  # then holds its connection open until the test is done with it
    holder = start_python(code, cgroup=world.cg)
    try:
        assert holder.stdout.readline().strip() == "sent"
        r = subprocess.run(
            [*credless_cmd, "status", "--json", "--config", str(world.agent.config)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        st = json.loads(r.stdout)
    finally:
        holder.kill()
        holder.wait()
    assert any(w["pid"] == holder.pid and w["spiffe_id"] == SPIFFE_ID for w in st["workloads"])
    assert [t["server"] for t in st["tokens"]] == ["weather"]
    assert 0 < st["tokens"][0]["expires_in"] <= 300
    assert st["redirect_targets"] == [f"127.0.0.1:{world.mcp.port}"]
    assert st["bpf_events_lost"] == 0
    assert "access_token" not in r.stdout and "eyJ" not in r.stdout


def test_typescript_sdk_client_works_through_credless(world):
    import subprocess

    from tests.conftest import REPO

    def ts(preexec=None):
        r = subprocess.run(
            ["node", str(REPO / "tests/mcp/client.mjs"), world.mcp.url],
            capture_output=True,
            text=True,
            timeout=60,
            preexec_fn=preexec,
        )
        return json.loads(r.stdout.strip().splitlines()[-1])

    assert ts().get("error")  # no credless: refused
    out = ts(enter_cgroup(world.cg))
    assert out == {
        "tools": ["add", "echo", "secret_tool", "stream_count"],
        "text": "from typescript",
    }


def test_oauth_probe_prints_a_summary_never_the_token(world, credless_cmd):
    import subprocess

    def probe(spiffe_id: str) -> subprocess.CompletedProcess:
        args = ["--config", str(world.agent.config), "--server", world.mcp.url]
        return subprocess.run(
            [*credless_cmd, "oauth", "probe", *args, "--spiffe-id", spiffe_id],
            capture_output=True,
            text=True,
            timeout=120,
        )

    r = probe(SPIFFE_ID)
    assert r.returncode == 0, r.stdout + r.stderr
    out = json.loads(r.stdout)
    assert out["issuer"] == world.oidc.issuer and out["token_endpoint"].endswith("/token")
    assert out["auth_profile"] == "jwt-bearer" and out["audience"] == world.mcp.url
    assert out["token_type"] == ("DPoP" if world.dpop else "Bearer")
    assert (out["cnf_jkt"] is not None) is world.dpop
    assert 0 < out["expires_in"] <= 300 and len(out["token_sha256"]) == 16
    assert "access_token" not in out and "eyJ" not in r.stdout
    bad = probe("spiffe://example.org/not/issuable")
    assert bad.returncode == 1 and "no registration entry produces it" in bad.stderr


def test_policy_reload_takes_effect_without_restart(world):
    import signal

    from tests.helpers import wait_for

    denied = run_client(world.mcp.url, "call:secret_tool", preexec=enter_cgroup(world.cg))
    assert denied[0].get("error") or denied[0].get("is_error")
    policy = world.agent.config.parent / "policy.toml"
    policy.write_text(
        policy.read_text().replace('"stream_count"]', '"stream_count", "secret_tool"]')
    )
    world.agent.proc.send_signal(signal.SIGHUP)
    wait_for(
        lambda: any(e.get("event") == "policy loaded" for e in world.agent.log_events()[3:]),
        what="policy reloaded",
    )
    out = run_client(world.mcp.url, "call:secret_tool", preexec=enter_cgroup(world.cg))
    assert out[0].get("text") == "the secret", out
    assert world.mcp.stats()["calls"]["secret_tool"] == 1


def test_a_batch_with_one_denied_call_is_refused_whole(world):
    code = f"""
import http.client, json, time
c = http.client.HTTPConnection("127.0.0.1", {world.mcp.port}, timeout=20)
batch = [{{"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {{"name": "echo", "arguments": {{"text": "a"}}}}}},
         {{"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {{"name": "secret_tool", "arguments": {{}}}}}}]
c.request("POST", "/mcp", body=json.dumps(batch), headers={{"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}})
r = c.getresponse(); print(json.dumps([r.status, json.loads(r.read())]), flush=True)
# Kept open for a second: anything the proxy sent on would reach the server meanwhile. A
# sleep, as the window of a claim that nothing happens: no event marks its absence.
time.sleep(1)
"""
    status, body = json.loads(run_python(code, cgroup=world.cg, check=False))
    assert status == 403
    assert [e["id"] for e in body] == [1, 2]
    assert all(e["error"]["code"] == jsonrpc.POLICY_DENIED for e in body)
    assert "secret_tool" in body[0]["error"]["message"]
    assert "echo" not in world.mcp.stats()["calls"]  # nothing of the batch reached it
    # not even its head: no credentialed request reached the server
    assert [q for q in world.mcp.stats()["requests"] if q["auth_scheme"]] == []


# How the parent (sh, an identity of its own) starts the sub-agent ({client}). The parent
# has run a moment first (the {sleep} 1): it stands for an agent that is attested and
# running, not one gone before its /proc could be read. Each but the first is a way such a
# parent could break the link a sub-agent policy follows, and each was served with the
# sub-agent's wider tools before the table kept lineage as it saw it (agent/attest/table.py
# `_started_by`):
SPAWNS = {
    # sh forks, the child execs the client
    "child": "{sleep} 1; {client}",
    # a subshell forks the client's process and sh exits: it is reparented (to init) before
    # it execs, and the kernel names init as its parent at exec
    "double-fork": "{sleep} 1; ( {sleep} 1; exec {client} ) &",
    # sh starts the client, then execs another program before the client connects
    "parent-execs-on": "{sleep} 1; {client} & exec {sleep} 3",
    # no fork: sh execs the client in its own place, choosing its arguments
    "exec-in-place": "{sleep} 1; exec {client}",
}


@pytest.mark.parametrize("spawn", SPAWNS)
def test_sub_agent_is_restricted_to_its_parents_tools(tmp_path, spawn):
    import sys

    from tests.kernel import copied_binaries

    parent_id, child_id = "spiffe://example.org/agent/parent", "spiffe://example.org/agent/child"
    python = os.path.realpath(sys.executable)
    with copied_binaries("sh", "sleep") as bins:

        def entries(cg):
            return [
                ("parent", parent_id, [f"cgroup:path:/{cg.name}", f"unix:path:{bins['sh']}"]),
                ("child", child_id, [f"cgroup:path:/{cg.name}", f"unix:path:{python}"]),
            ]

        policy = tools_rule("parent-tools", parent_id, "weather", ["echo"]) + tools_rule(
            "child-tools", child_id, "weather", ["echo", "secret_tool"]
        )
        with start_world(
            tmp_path,
            dpop=False,
            entries=entries,
            policy=policy,
            policy_settings='subagents = "restrict_to_parent"\n',
        ) as w:
            client = (
                f"{sys.executable} -m tests.mcp.client {w.mcp.url} "
                f'\'call:echo:{{"text": "ok"}}\' call:secret_tool'
            )
            cmd = SPAWNS[spawn].format(client=client, sleep=bins["sleep"])
            import subprocess

            from tests.conftest import REPO

            r = subprocess.run(
                [str(bins["sh"]), "-c", cmd],
                cwd=REPO,
                capture_output=True,
                text=True,
                timeout=120,
                preexec_fn=enter_cgroup(w.cg),
            )
            out = [json.loads(ln) for ln in r.stdout.splitlines() if ln.startswith("{")]
            assert out[0] == {"step": "call", "tool": "echo", "text": "ok", "is_error": False}
            assert out[1].get("error") or out[1].get("is_error")
            assert w.mcp.stats()["calls"] == {"echo": 1}
            denied = [e for e in audit(w, "call.denied") if e["event"] == "call.denied"]
            assert denied[-1]["spiffe_id"] == child_id
            assert denied[-1]["parent_spiffe_id"] == parent_id
            assert denied[-1]["reason"].startswith(f"sub-agent of {parent_id}")
