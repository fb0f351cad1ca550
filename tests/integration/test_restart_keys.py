"""A restarted agent signs client assertions with the keys it published before: the real
agent (`credless run`), restarted, against the real oidc-provider, which keeps a client's
jwks_uri answer for 60 s (tests/oidc/node_modules/oidc-provider/lib/models/client.js: at least
60 s, whatever the Cache-Control). Issue 20: with keys made anew at each start, every identity
got `invalid_client` for that minute.

Each token here is a `credless oauth probe` (a fresh token request through the running agent's
admin socket), so each one is a client assertion oidc-provider must verify.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.identity.jwt_keys import JwtKeyFile
from agent.identity.jwt_rotation import JwtSigningKeys
from tests.helpers import AgentProcess, wait_for
from tests.world import World, build_world, server_table

pytestmark = pytest.mark.kernel  # the agent loads its BPF programs at start
SPIFFE_ID = "spiffe://example.org/agent/restarted"
RESOURCE = "http://127.0.0.1:9/mcp"  # a resource identifier: never dialled
CREDLESS = (sys.executable, "-m", "agent")


def probe(agent: AgentProcess) -> dict:
    args = ["--config", str(agent.config), "--server", RESOURCE, "--spiffe-id", SPIFFE_ID]
    r = subprocess.run(
        [*CREDLESS, "oauth", "probe", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    out = json.loads(r.stdout) if r.stdout.strip() else {"error": r.stderr[-2000:]}
    assert "access_token" not in out and "eyJ" not in r.stdout  # a summary, never the token
    return out


def start(w: World) -> AgentProcess:
    assert w.oidc is not None
    return w.start_agent(
        # a configured issuer: no discovery; DPoP always: the resource is never asked
        server_table("mcp", RESOURCE, issuer=w.oidc.issuer, dpop="always"),
        intercept=False,
    )


def restart(w: World, name: str) -> AgentProcess:
    """SIGTERM the agent, then start it again on the same configuration and state."""
    assert w.agent is not None
    assert w.agent.stop() == 0
    logs = w.tmp / name
    logs.mkdir()
    w.agent = w.enter(AgentProcess(w.agent.config, logs))
    w.agent.wait_ready()
    return w.agent


def refusals(w: World) -> list[dict]:
    assert w.oidc is not None
    return [e for e in w.oidc.events("grant.error") if e.get("error") == "invalid_client"]


def fetched_jwks(w: World) -> int:
    assert w.oidc is not None
    return sum(url.endswith("/jwks.json") for url in w.oidc.fetched())


def test_a_restart_right_after_a_token_fetch(tmp_path):
    with build_world(tmp_path, SPIFFE_ID) as w:
        w.authorization_server([RESOURCE])
        first = probe(start(w))
        assert "error" not in first, first
        assert fetched_jwks(w) == 1  # oidc-provider holds the JWKS from now, 60 s
        again = probe(restart(w, "after-fetch"))
        assert "error" not in again, again
        assert refusals(w) == []
        # verified against the JWKS oidc-provider had cached before the restart (a second
        # fetch would mean its 60 s had passed: then this run proved nothing about the cache)
        assert fetched_jwks(w) == 1, "oidc-provider's JWKS cache expired during the restart"
        assert len(w.oidc.events("grant.success")) == 2


def test_a_restart_right_after_a_rotation(tmp_path):
    """The state an agent leaves a few seconds before its scheduled rotation (the next key
    prepared and published long enough): the running agent rotates, signs with the new key,
    and a restart right after carries on with it."""
    keys_dir = tmp_path / "state" / "jwt"
    day, prepublish = 86400, 1800  # identity.jwt_key_rotation_seconds's default, its prepublish
    now = time.time()
    t = [now - day + 5]  # rotation due 5 s from now
    made = JwtSigningKeys(
        rotate_every=day,
        max_jwt_ttl=3600,
        prepublish=prepublish,
        clock=lambda: t[0],
        store=JwtKeyFile(keys_dir),
    )
    k1 = made.current().kid
    t[0] = now - 60  # the next key was prepared well before
    (k2,) = set(made.published()) - {k1}
    with build_world(tmp_path, SPIFFE_ID) as w:
        w.authorization_server([RESOURCE])
        agent = start(w)
        assert "error" not in probe(agent)
        wait_for(lambda: _signing(keys_dir) == k2, what="the agent's scheduled rotation")
        assert "error" not in probe(agent)  # signed by k2, which oidc-provider had cached
        after = probe(restart(w, "after-rotation"))
        assert "error" not in after, after
        assert refusals(w) == []
        assert _signing(keys_dir) == k2


def _signing(keys_dir: Path) -> str:
    doc = json.loads((keys_dir / "keys.json").read_text())
    return next(k["kid"] for k in doc["keys"] if k["role"] == "current")
