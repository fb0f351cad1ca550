"""A server that changes what it accepts (issue 17, `dpop = "auto"`), on the real kernel with
the official MCP SDK server and oidc-provider: restarted from Bearer to DPoP, or from DPoP to
Bearer, it refuses the token credless holds with a 401 naming the other scheme. That request
is diagnosed (502, exchange.py) and the token dropped; the next one follows the 401's
challenge at once (agent/oauth/service.py invalidate), not the cached resource metadata
that chose the refused scheme until oauth.discovery_ttl_seconds (300 s here)."""

from __future__ import annotations

import json

import pytest

from tests.helpers import audit_events, stop_process
from tests.integration.test_dpop_interop import POLICY, calls, credentialed, start_world
from tests.kernel import run_python

pytestmark = pytest.mark.kernel

# one initialize from the managed cgroup: the status and whether the answer is an error
INITIALIZE = (
    "import httpx, json, sys\n"
    "r = httpx.post(sys.argv[1], json={'jsonrpc': '2.0', 'id': 1, 'method': 'initialize', "
    "'params': {'protocolVersion': '2025-11-25', 'capabilities': {}, "
    "'clientInfo': {'name': 't', 'version': '1'}}}, "
    "headers={'Accept': 'application/json, text/event-stream'}, trust_env=False, timeout=60)\n"
    "print(json.dumps({'status': r.status_code, 'body': r.text}))\n"
)


def initialize(world) -> tuple[int, str]:
    got = json.loads(run_python(INITIALIZE, world.mcp.url, cgroup=world.cg))
    return got["status"], got["body"]


@pytest.mark.parametrize(
    ("before", "after", "policy"),
    [(False, True, POLICY), (True, False, None)],
    ids=["bearer-to-dpop-full-path", "dpop-to-bearer-fast-lane"],
)
def test_after_a_scheme_refusal_the_next_request_follows_the_servers_new_challenge(
    tmp_path, before, after, policy
):
    with start_world(tmp_path, policy=policy, dpop=before) as w:
        first = calls(w, "list")
        assert "error" not in first[0], first
        held = "DPoP" if before else "Bearer"
        assert {r["auth_scheme"] for r in credentialed(w)} == {held}
        # the server restarts on its port, now taking the other scheme only
        stop_process(w.mcp.proc)
        w.mcp.dpop = after
        w.mcp.start(w.oidc.issuer)
        # the cached token of the old scheme is refused once: diagnosed, not relayed
        status, body = initialize(w)
        assert status == 502, body
        assert "refused the credential credless sent" in body, body
        failed = audit_events(
            w.agent.stdout_path,
            lambda evs: [e for e in evs if e["event"] == "request.failed"],
        )
        assert [e["status"] for e in failed if e["event"] == "request.failed"] == [401]
        # at once, within the discovery cache's lifetime: the new scheme
        status, body = initialize(w)
        assert status == 200, body
        wanted = "DPoP" if after else "Bearer"
        assert [r["auth_scheme"] for r in credentialed(w)] == [held, wanted]
        again = calls(w, "list")
        assert "error" not in again[0], again
        assert {r["auth_scheme"] for r in credentialed(w)[1:]} == {wanted}
        # each workload run is a process of its own, and the identity's tokens go with its
        # last process (identity.ended): a run may obtain a token of its own. The old
        # scheme until the refusal, the new one from the next request on
        obtained = audit_events(
            w.agent.stdout_path,
            lambda evs: (
                [e["token_type"] for e in evs if e["event"] == "token.obtained"][-1:] == [wanted]
            ),
        )
        types = [e["token_type"] for e in obtained if e["event"] == "token.obtained"]
        switch = types.index(wanted)
        assert switch >= 1 and set(types[:switch]) == {held}, types
        assert set(types[switch:]) == {wanted}, types
