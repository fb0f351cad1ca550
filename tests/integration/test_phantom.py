"""Phantom mode end to end (docs/phantom.md): the real kernel, the Workload API through
py-spiffe, oidc-provider issuing opaque tokens, and the MCP Python SDK on both sides, the
server introspecting every token it is shown (so a token revoked at the authorization server
is refused there from then on).

Two workloads in two managed cgroups, each its own identity. The one a placeholder was issued
to calls with it and succeeds, the server seeing only the real token. The same placeholder
copied to the other process is refused (403, phantom.misuse naming both identities, counted),
and the holder's real token is revoked at oidc-provider: the server refuses that token
afterwards, and the holder's next call carries a new one."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import urllib.request

from tests.helpers import audit_events, metric_sum
from tests.kernel import enter_cgroup, start_workload
from tests.mcp.peers import REPO, run_client
from tests.phantom_world import only_obtained_tokens_reached_the_server
from tests.phantom_world import phantom_world as shared_phantom_world
from tests.world import build_world

HOLDER = "spiffe://example.org/phantom/holder"
THIEF = "spiffe://example.org/phantom/thief"


def placeholder_for(w, cg, server: str) -> str:
    """A placeholder fetched through the Workload API by a process in cg."""
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.workloads.spiffe_client",
            str(w.api_socket),
            "placeholder",
            f"credless-phantom:{server}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        preexec_fn=enter_cgroup(cg),
    )
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert "token" in out, out
    return out["token"]


def call(w, cg, token: str | None) -> dict:
    extra = ["--header", f"Authorization: Bearer {token}"] if token else []
    return run_client(
        w.mcp.url, "call:echo:" + json.dumps({"text": "hi"}), preexec=enter_cgroup(cg), extra=extra
    )[-1]


def held_call(w, placeholder: str) -> subprocess.Popen:
    """The holder's SDK client, its call made with its placeholder, then held (alive) until
    a line comes on its stdin."""
    proc = start_workload(
        [
            sys.executable,
            "-m",
            "tests.mcp.client",
            w.mcp.url,
            "call:echo:" + json.dumps({"text": "hi"}),
            "hold",
            "--header",
            f"Authorization: Bearer {placeholder}",
        ],
        w.cg,
    )
    lines = [json.loads(proc.stdout.readline()) for _ in range(2)]
    assert lines[0].get("text") == "hi" and lines[1] == {"step": "hold"}, lines
    return proc


def credentialed(w) -> list[dict]:
    return w.mcp.credentialed()


def misuse_count(metrics_port: int) -> float:
    return metric_sum(metrics_port, "credless_phantom_misuse_total", server="weather")


def phantom_world(tmp_path, w, **server):
    return shared_phantom_world(tmp_path, w, HOLDER, THIEF, **server)


def test_the_holder_calls_with_its_placeholder_and_the_server_sees_only_the_token(tmp_path):
    with build_world(tmp_path, HOLDER) as w:
        phantom_world(tmp_path, w)
        placeholder = placeholder_for(w, w.cg, "weather")
        out = call(w, w.cg, placeholder)
        assert out.get("text") == "hi", out
        # the placeholder never reached the server: only the token credless obtained
        only_obtained_tokens_reached_the_server(w, placeholder)


def test_a_token_whose_payload_nests_too_deep_is_the_workloads_own_and_replaced(tmp_path):
    """A JWT-shaped Authorization whose payload nests deeper than json can read: not a
    placeholder, so it is the workload's own credential, removed as any other, and the call
    goes with credless's token (json's RecursionError used to escape the placeholder check
    in the middle of the request)."""
    deep = b"[" * 10_000 + b"]" * 10_000
    segment = base64.urlsafe_b64encode(deep).decode().rstrip("=")
    forged = f"eyJhbGciOiJFUzI1NiJ9.{segment}.c2ln"
    with build_world(tmp_path, HOLDER) as w:
        phantom_world(tmp_path, w)
        out = call(w, w.cg, forged)
        assert out.get("text") == "hi", out
        only_obtained_tokens_reached_the_server(w, forged)


def test_a_copied_placeholder_is_refused_and_the_holders_token_revoked(tmp_path):
    with build_world(tmp_path, HOLDER) as w:
        thief_cg = phantom_world(tmp_path, w)
        placeholder = placeholder_for(w, w.cg, "weather")
        # the holder is running (its token held for it) when its placeholder is stolen
        holder = held_call(w, placeholder)
        [first] = {r["token_sha256"] for r in credentialed(w)}
        before = len(w.mcp.relayed())

        stolen = call(w, thief_cg, placeholder)
        assert stolen.get("error") == "MCPError" and stolen.get("code") == -32080, stolen
        assert HOLDER in stolen["message"]
        # nothing of the thief's request reached the server
        assert len(w.mcp.relayed()) == before

        events = audit_events(w.agent.stdout_path, until="token.revoked")
        # (each request the SDK client sent with it: a POST, and a retry of its own)
        misuses = [e for e in events if e["event"] == "phantom.misuse"]
        shown = stolen["message"].rsplit("(audit event ", 1)[1].rstrip(")")
        assert shown in {m["event_id"] for m in misuses}
        for misuse in misuses:
            assert misuse["spiffe_id"] == THIEF and misuse["issued_to"] == HOLDER
            assert misuse["issued_for"] == "weather" and misuse["status"] == 403
        [revoked] = [e for e in events if e["event"] == "token.revoked"]
        assert revoked["spiffe_id"] == HOLDER and revoked["token_sha256"] == first
        assert misuse_count(w.metrics_port) == len(misuses)

        holder.communicate("done\n", timeout=60)
        # the holder's next call obtains and carries a new one
        assert call(w, w.cg, placeholder).get("text") == "hi"
        second = credentialed(w)[-1]["token_sha256"]
        assert second != first
        # and the server refuses the revoked token from now on (it introspects each token)
        assert recheck(w) == {first: False, second: True}


def recheck(w) -> dict[str, bool]:
    """The MCP server's verdict now on every token it was ever shown (tests/mcp/server.py
    /_recheck: introspection at oidc-provider), by fingerprint."""
    url = f"http://127.0.0.1:{w.mcp.port}/_recheck"
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())


def test_refuse_only_keeps_the_holders_token(tmp_path):
    with build_world(tmp_path, HOLDER) as w:
        thief_cg = phantom_world(tmp_path, w, phantom_misuse="refuse")
        placeholder = placeholder_for(w, w.cg, "weather")
        holder = held_call(w, placeholder)
        [first] = {r["token_sha256"] for r in credentialed(w)}
        stolen = call(w, thief_cg, placeholder)
        assert stolen.get("code") == -32080, stolen
        audit_events(w.agent.stdout_path, until="phantom.misuse")
        # a revocation follows its misuse within milliseconds where one is configured
        events = audit_events(w.agent.stdout_path, quiet=1.0)
        holder.communicate("done\n", timeout=60)
        assert not [e for e in events if e["event"].startswith("token.revo")]
        assert recheck(w) == {first: True}  # still live at the authorization server
