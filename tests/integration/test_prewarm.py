"""Tokens pre-fetched on exec (servers.prewarm, agent/oauth/prewarm.py), on the real kernel,
oidc-provider and the MCP Python SDK server and client.

A workload process is held right after its exec (waiting on a line of stdin, then running
the SDK client): the token must be obtained while it waits, before it has sent
anything, and be the one its first call carries. An exec storm of one identity obtains one
token; a process matching no entry, or a server with prewarm off, obtains none until a call
needs it."""

from __future__ import annotations

import subprocess

from agent import __version__
from tests.helpers import audit_events, free_port, metric_samples
from tests.kernel import start_python
from tests.mcp.peers import McpServer
from tests.world import build_world, entry_table, server_table, tools_rule

SPIFFE_ID = "spiffe://example.org/prewarm/bot"
QUIET = 2.0  # the window in which an unwanted pre-fetch would have been obtained


HOLD_THEN_CALL = """
import runpy, sys
sys.stdin.readline()
sys.argv = ["tests.mcp.client", sys.argv[1], "list"]
runpy.run_module("tests.mcp.client", run_name="__main__")
"""


def held_client(w, url: str) -> subprocess.Popen:
    """The SDK client in the world's cgroup, held after its exec until a line comes (then
    run in the same image: an exec would end the image the token was fetched for)."""
    return start_python(HOLD_THEN_CALL, url, cgroup=w.cg)


def events_while_held(w, agent) -> list[dict]:
    """The agent's audit events while a held client runs and sends nothing (until QUIET)."""
    client = held_client(w, w.mcp.url)
    try:
        return audit_events(agent.stdout_path, quiet=QUIET)
    finally:
        client.kill()
        client.wait()


def prewarm_counts(metrics_port: int) -> dict[str, float]:
    """credless_prewarm_total for the server "weather", by outcome."""
    return {
        s.labels["outcome"]: s.value
        for s in metric_samples(metrics_port, "credless_prewarm_total")
        if s.labels["server"] == "weather"
    }


def credentialed(w) -> list[dict]:
    return w.mcp.credentialed()


def obtained(events: list[dict]) -> list[dict]:
    return [e for e in events if e["event"] == "token.obtained"]


def start(w, entries=None, metrics_port=None, policy=None, **server):
    w.mcp = w.enter(McpServer(w.tmp))
    w.authorization_server([w.mcp.url])
    w.mcp.start(w.oidc.issuer)
    return w.start_agent(
        server_table("weather", w.mcp.url, **server),
        entries=entries,
        metrics_port=metrics_port,
        policy=policy,
    )


def test_the_token_is_obtained_on_exec_and_carried_by_the_first_call(tmp_path):
    with build_world(tmp_path, SPIFFE_ID) as w:
        agent = start(w)
        client = held_client(w, w.mcp.url)
        try:
            # the client has sent nothing yet: the token comes from its exec alone (the
            # server has seen only the agent's own probe for its metadata, no credential)
            [tok] = obtained(audit_events(agent.stdout_path, until="token.obtained"))
            assert tok["spiffe_id"] == SPIFFE_ID and tok["server"] == "weather"
            assert credentialed(w) == []
            # ... which says so: a server's log tells the agent's requests from relayed ones
            probes = w.mcp.stats()["requests"]
            assert probes and {r["user_agent"] for r in probes} == {f"credless/{__version__}"}
            assert w.mcp.relayed() == []
            _out, err = client.communicate("go\n", timeout=90)
        finally:
            client.kill()
        assert client.returncode == 0, err[-2000:]
        calls = credentialed(w)
        assert calls and {r["token_sha256"] for r in calls} == {tok["token_sha256"][:16]}
        # the call fetched nothing more: the exec of the client found the token held
        assert len(obtained(audit_events(agent.stdout_path, quiet=0.5))) == 1


def test_an_exec_storm_of_one_identity_obtains_one_token(tmp_path):
    metrics = free_port()
    with build_world(tmp_path, SPIFFE_ID) as w:
        agent = start(w, metrics_port=metrics)
        storm = [held_client(w, w.mcp.url) for _ in range(12)]
        try:
            audit_events(agent.stdout_path, until="token.obtained")
            events = audit_events(agent.stdout_path, quiet=QUIET)
        finally:
            for p in storm:
                p.kill()
                p.wait()
        assert len(obtained(events)) == 1
        counts = prewarm_counts(metrics)
        assert counts["fetched"] == 1 and counts["failed"] == counts["denied"] == 0
        # every other exec found the fetch under way or done (a fork attested before its
        # exec may add one more)
        assert counts["cached"] + counts["coalesced"] >= len(storm) - 1


def test_nothing_is_obtained_for_a_process_matching_no_entry(tmp_path):
    with build_world(tmp_path, SPIFFE_ID) as w:
        # the entry also asks for a uid no test process runs as
        entries = entry_table("workload", SPIFFE_ID, [w.selector, "unix:uid:4242"])
        agent = start(w, entries=entries)
        events = events_while_held(w, agent)
        assert obtained(events) == []


def test_a_server_with_prewarm_off_gets_its_token_from_the_first_call(tmp_path):
    with build_world(tmp_path, SPIFFE_ID) as w:
        agent = start(w, prewarm=False)
        client = held_client(w, w.mcp.url)
        try:
            assert obtained(audit_events(agent.stdout_path, quiet=QUIET)) == []
            _out, err = client.communicate("go\n", timeout=90)
        finally:
            client.kill()
        assert client.returncode == 0, err[-2000:]
        assert len(obtained(audit_events(agent.stdout_path, until="token.obtained"))) == 1


def test_nothing_is_obtained_for_a_server_the_policy_refuses_the_identity(tmp_path):
    metrics = free_port()
    with build_world(tmp_path, SPIFFE_ID) as w:
        # the server is governed, and only another identity may call it
        policy = tools_rule("others", "spiffe://example.org/other", "weather", ["echo"])
        agent = start(w, metrics_port=metrics, policy=policy)
        events = events_while_held(w, agent)
        assert obtained(events) == []
        counts = prewarm_counts(metrics)
        assert counts["denied"] >= 1 and counts["fetched"] == 0
