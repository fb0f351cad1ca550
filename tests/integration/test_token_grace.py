"""A short-lived workload (a process per call, as a CLI agent run per task) reuses its
identity's token across processes within oauth.token_grace_seconds: the real kernel, the
agent, the MCP Python SDK client and server, and oidc-provider counting token requests."""

from __future__ import annotations

import contextlib

import pytest

from tests.helpers import audit_events, wait_for
from tests.kernel import enter_cgroup
from tests.mcp.peers import McpServer, run_client
from tests.world import build_world, server_table, table, tools_rule

pytestmark = pytest.mark.kernel
SPIFFE_ID = "spiffe://example.org/agent/cli-run"


@contextlib.contextmanager
def start_world(tmp_path, grace: float | None):
    with build_world(tmp_path, SPIFFE_ID) as w:
        w.mcp = w.enter(McpServer(tmp_path, dpop=True))
        w.authorization_server([w.mcp.url], dpop=True)
        w.mcp.start(w.oidc.issuer)
        w.start_agent(
            server_table("tools", w.mcp.url),
            policy=tools_rule("cli", SPIFFE_ID, "tools", ["echo"]),
            settings="" if grace is None else table("[oauth]", token_grace_seconds=grace),
        )
        yield w


def one_run(w, text: str) -> None:
    """One workload process: one MCP call, then it exits."""
    out = run_client(w.mcp.url, f'call:echo:{{"text": "{text}"}}', preexec=enter_cgroup(w.cg))
    assert out[0].get("text") == text, out


KEPT = "identity ended; its tokens are kept for the next process"


def identity_ended(w) -> None:
    """Wait until the agent has dealt with the end of the identity's last process: its
    tokens kept for the grace period (logged), or dropped (audited identity.ended)."""

    def dealt_with() -> bool:
        kept = any(e.get("event") == KEPT for e in w.agent.log_events())
        return kept or any(
            e["event"] == "identity.ended" for e in audit_events(w.agent.stdout_path)
        )

    wait_for(dealt_with, what="the agent dealing with the end of the identity")


def token_use(w) -> tuple[int, set[str], set[str]]:
    """Token requests oidc-provider granted; the tokens the MCP server was given; and the
    DPoP keys (cnf.jkt) of the requests the agent injected."""
    credentialed = w.mcp.credentialed()
    events = audit_events(  # one request.injected for each request the server saw with a token
        w.agent.stdout_path,
        lambda evs: sum(e["event"] == "request.injected" for e in evs) >= len(credentialed),
    )
    keys = {e["jkt"] for e in events if e["event"] == "request.injected"}
    tokens = {r["token_sha256"] for r in credentialed}
    return len(w.oidc.events("grant.success")), tokens, keys


def test_two_runs_within_the_grace_period_share_one_token(tmp_path):
    with start_world(tmp_path, grace=None) as w:  # the default: 300 s
        one_run(w, "first")
        identity_ended(w)
        one_run(w, "second")
        grants, tokens, keys = token_use(w)
        assert grants == 1 and len(tokens) == 1 and len(keys) == 1
        assert not any(e["event"] == "identity.ended" for e in audit_events(w.agent.stdout_path))


def test_with_no_grace_each_run_fetches_its_own(tmp_path):
    with start_world(tmp_path, grace=0) as w:
        one_run(w, "first")
        identity_ended(w)
        one_run(w, "second")
        grants, tokens, keys = token_use(w)
        assert grants == 2 and len(tokens) == 2 and len(keys) == 2
