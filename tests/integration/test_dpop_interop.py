"""DPoP against stock peers (issue 17), on the real kernel with the official MCP SDKs and
oidc-provider: `dpop = "auto"` follows what the MCP server accepts, a 401 naming a scheme
credless did not use is diagnosed (not relayed, not retried), and a server's DPoP nonces
(RFC 9449 §9) are answered with one retry and carried by later proofs.

oidc-provider advertises ES256 DPoP proofs in every test here: the AS offering DPoP must not
be what makes credless use it.
"""

from __future__ import annotations

import contextlib
import json

import httpx
import pytest

from agent.oauth.discovery import parse_www_authenticate
from tests.helpers import audit_events
from tests.kernel import enter_cgroup, run_python
from tests.mcp.peers import McpServer, run_client
from tests.world import build_world, server_table, tools_rule

pytestmark = pytest.mark.kernel
SPIFFE_ID = "spiffe://example.org/agent/dpop-bot"
POLICY = tools_rule("bot-tools", SPIFFE_ID, "srv", ["echo", "add"])
STEPS = ("list", 'call:echo:{"text": "hi"}', 'call:add:{"a": 2, "b": 3}')


@contextlib.contextmanager
def start_world(tmp_path, policy: str | None = POLICY, **server):
    """oidc-provider offering DPoP, an MCP server (McpServer options: dpop, dpop_nonce, ...)
    and the agent with one [[servers]] entry "srv" (servers.dpop from `server_dpop`)."""
    dpop_setting = server.pop("server_dpop", None)
    with build_world(tmp_path, SPIFFE_ID) as w:
        w.mcp = w.enter(McpServer(tmp_path, **server))
        w.authorization_server([w.mcp.url], dpop=True)
        w.mcp.start(w.oidc.issuer)
        extra = {"dpop": dpop_setting} if dpop_setting else {}
        w.start_agent(server_table("srv", w.mcp.url, **extra), policy=policy)
        yield w


def calls(world, *steps: str) -> list[dict]:
    return run_client(world.mcp.url, *steps, preexec=enter_cgroup(world.cg))


def credentialed(world) -> list[dict]:
    return world.mcp.credentialed()


def test_the_stock_bearer_server_gets_bearer_under_auto(tmp_path):
    """The stock SDK server (Bearer only) behind an AS that offers DPoP: auto uses Bearer."""
    with start_world(tmp_path) as w:
        challenge = httpx.post(w.mcp.url, json={}, headers={"Accept": "application/json"})
        assert set(parse_www_authenticate(challenge.headers["www-authenticate"])) == {"bearer"}
        out = calls(w, *STEPS)
        assert "error" not in out[0], out
        assert out[1]["text"] == "hi" and out[2]["text"] == "5"
        assert {r["auth_scheme"] for r in credentialed(w)} == {"Bearer"}
        assert not any("dpop" in r["header_names"] for r in credentialed(w))
        events = audit_events(w.agent.stdout_path, "token.obtained")
        [obtained] = [e for e in events if e["event"] == "token.obtained"]
        assert obtained["token_type"] == "Bearer" and obtained["jkt"] is None


@pytest.mark.parametrize("policy", [POLICY, None], ids=["policy", "no-policy"])
def test_a_dpop_requiring_server_gets_dpop_under_auto(tmp_path, policy):
    with start_world(tmp_path, policy=policy, dpop=True) as w:
        # what makes auto choose DPoP: the server says so, in its challenge and its metadata
        challenge = httpx.post(w.mcp.url, json={}, headers={"Accept": "application/json"})
        assert challenge.status_code == 401
        assert "dpop" in parse_www_authenticate(challenge.headers["www-authenticate"])
        origin = w.mcp.url.rsplit("/mcp", 1)[0]
        prm = httpx.get(f"{origin}/.well-known/oauth-protected-resource/mcp").json()
        assert prm["dpop_bound_access_tokens_required"] is True
        out = calls(w, *STEPS)
        assert "error" not in out[0], out
        assert out[2]["text"] == "5"
        sent = credentialed(w)
        assert {r["auth_scheme"] for r in sent} == {"DPoP"}
        assert all("dpop" in r["header_names"] for r in sent)
        assert w.mcp.stats()["calls"] == {"echo": 1, "add": 1}


@pytest.mark.parametrize(
    "setting,server_dpop,wants",
    [("always", False, 'dpop = "never"'), ("never", True, 'dpop = "always"')],
    ids=["dpop-to-a-bearer-server", "bearer-to-a-dpop-server"],
)
def test_a_401_naming_a_scheme_credless_did_not_use_is_diagnosed(
    tmp_path, setting, server_dpop, wants
):
    """Configured against what the server takes: its 401 is read, the workload gets a 502
    naming the mismatch and the fix, audited; the request is not sent again."""
    with start_world(tmp_path, dpop=server_dpop, server_dpop=setting) as w:
        out = calls(w, "list")
        assert out[0]["error"], out
        refused = len(credentialed(w))
        events = audit_events(
            w.agent.stdout_path,
            lambda evs: [e["event"] for e in evs].count("request.failed") >= refused,
        )
        # the SDK client tries server/discover, then initialize: each refused once
        failed = [e for e in events if e["event"] == "request.failed"]
        sent = "Bearer" if setting == "never" else "DPoP-bound"
        for e in failed:
            assert e["status"] == 401 and f"credless sent a {sent} token" in e["reason"]
            assert wants in e["reason"]
        assert not [e for e in events if e["event"] in ("request.injected", "request.retried")]
        # each refused request reached the server once: none was sent again
        assert refused == len(failed) >= 1
        assert w.mcp.stats()["calls"] == {}
        # what the workload was told
        status, answer = _answer_to(w)
        assert status == 502
        assert answer["id"] == 1 and wants in answer["error"]["message"]
        assert wants in answer["error"]["data"]["detail"]


def _answer_to(world) -> tuple[int, dict]:
    """credless's answer to a bare initialize from the managed cgroup: status, JSON body."""
    script = (
        "import httpx, json, sys\n"
        f"r = httpx.post({world.mcp.url!r}, json={{'jsonrpc': '2.0', 'id': 1, "
        "'method': 'initialize', 'params': {'protocolVersion': '2025-11-25', "
        "'capabilities': {}, 'clientInfo': {'name': 't', 'version': '1'}}}, "
        "headers={'Accept': 'application/json, text/event-stream'}, trust_env=False)\n"
        "print(json.dumps({'status': r.status_code, 'body': r.text}))\n"
    )
    got = json.loads(run_python(script, cgroup=world.cg))
    return got["status"], json.loads(got["body"])


@pytest.mark.parametrize("policy", [POLICY, None], ids=["full-path", "fast-lane"])
def test_dpop_nonces_are_answered_once_and_carried_by_later_proofs(tmp_path, policy):
    """The server demands nonces, rotates one every 2 accepted requests (announced in the
    answer's DPoP-Nonce) and, after the 5th, forgets them all unannounced. Every challenge is
    answered with one retry whose proof carries the nonce it gave; the announced ones are
    carried without a challenge; the workload sees none of it. Without a policy the
    requests after the first go by the fast lane (whole requests in one read)."""
    with start_world(tmp_path, policy=policy, dpop_nonce=2, dpop_nonce_forget=5) as w:
        out = calls(w, *STEPS, 'call:echo:{"text": "again"}', 'call:add:{"a": 1, "b": 1}')
        assert "error" not in out[0], out
        assert [o.get("text") for o in out[1:]] == ["hi", "5", "again", "2"]
        stats = w.mcp.stats()
        assert stats["calls"] == {"echo": 2, "add": 2}
        challenges = stats["nonce_challenges"]
        # the first proof (no nonce yet) and the first after the server forgot: no more,
        # since the announced nonces were carried (one more, at most, if the event stream's
        # GET raced a rotation)
        assert 2 <= challenges <= 3, stats
        sent = credentialed(w)
        assert sum(1 for r in sent if r["nonce_challenged"]) == challenges
        # each challenged request was sent again at once, carrying the nonce it was given
        for i, r in enumerate(sent):
            if r["nonce_challenged"]:
                again = [s for s in sent[i + 1 :] if s["method"] == r["method"]]
                assert again and again[0]["dpop_nonce"] == r["nonce_given"], (r, sent)
                assert not again[0]["nonce_challenged"], (r, sent)
        carried = {r.get("dpop_nonce") for r in sent}
        assert carried & set(stats["nonces_announced"]), stats  # from successful answers
        events = audit_events(
            w.agent.stdout_path,
            lambda evs: [e["event"] for e in evs].count("request.retried") >= challenges,
        )
        retried = [e for e in events if e["event"] == "request.retried"]
        assert len(retried) == challenges and all(e["status"] == 401 for e in retried)
        assert all("use_dpop_nonce" in e["reason"] for e in retried)
        assert not [e for e in events if e["event"] == "request.failed"]
