"""SPIFFE-native OAuth: an official MCP SDK client authenticates to oidc-provider with a
JWT-SVID it fetches from the agent's Workload API (py-spiffe) as its client assertion."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.helpers import AgentProcess, audit_events, free_port, write_config
from tests.kernel import cgroup_child, enter_cgroup
from tests.mcp.peers import McpServer
from tests.oidc.peer import OidcProvider

pytestmark = pytest.mark.kernel
SPIFFE_ID = "spiffe://example.org/agent/native"


@contextlib.contextmanager
def native_world(tmp_path, entry: str = "", extra: str = ""):
    """oidc-provider, an MCP server trusting it, and the agent with an entry for a fresh
    cgroup (plus `entry` lines) and its Workload API on a socket any uid can reach; yields
    a runner of the SDK's private-key-JWT client in that cgroup (its JSON summary)."""
    sock_dir = Path(tempfile.mkdtemp(prefix="credless-native-"))
    os.chmod(sock_dir, 0o755)
    bundle_port, mcp_port = free_port(), free_port()
    mcp_url = f"http://127.0.0.1:{mcp_port}/mcp"
    try:
        with (
            cgroup_child() as cg,
            OidcProvider(
                tmp_path,
                dpop=False,
                resources={mcp_url: {"format": "jwt", "scope": "tools"}},
                clients=[
                    {
                        "client_id": SPIFFE_ID,
                        "jwks_uri": f"http://127.0.0.1:{bundle_port}/jwks.json",
                    }
                ],
            ) as oidc,
            McpServer(tmp_path, mcp_port, oidc.issuer) as mcp,
        ):
            (tmp_path / "entries.toml").write_text(
                f'[[entry]]\nid = "native"\nspiffe_id = "{SPIFFE_ID}"\n'
                f'selectors = ["cgroup:path:/{cg.name}"]\n{entry}'
            )
            cfg = write_config(
                tmp_path,
                bundle_port=bundle_port,
                extra=extra.format(mcp_url=mcp_url, issuer=oidc.issuer),
            )
            cfg.write_text(
                cfg.read_text().replace(
                    f'socket = "{tmp_path / "run" / "agent.sock"}"',
                    f'socket = "{sock_dir / "agent.sock"}"',
                )
            )
            with AgentProcess(cfg, tmp_path) as agent:
                agent.wait_ready()

                def client() -> dict:
                    r = subprocess.run(
                        [
                            sys.executable,
                            "-m",
                            "tests.mcp.spiffe_client",
                            mcp_url,
                            oidc.issuer,
                            SPIFFE_ID,
                            str(sock_dir / "agent.sock"),
                        ],
                        cwd=REPO,
                        capture_output=True,
                        text=True,
                        timeout=120,
                        preexec_fn=enter_cgroup(cg),
                    )
                    return json.loads(r.stdout.splitlines()[-1])

                yield type("World", (), dict(oidc=oidc, mcp=mcp, agent=agent, client=client))
    finally:
        shutil.rmtree(sock_dir, ignore_errors=True)


def test_mcp_sdk_private_key_jwt_with_a_jwt_svid_from_the_workload_api(tmp_path):
    with native_world(tmp_path) as w:
        out = w.client()
        assert "error" not in out, out
        assert out["text"] == "spiffe-native" and "echo" in out["tools"]
        assert out["assertion_audiences"] == [w.oidc.issuer]
        assert [e["client_id"] for e in w.oidc.events("grant.success")] == [SPIFFE_ID]
        assert w.mcp.stats()["calls"] == {"echo": 1}
        events = audit_events(w.agent.stdout_path)
        jwt_issued = [e for e in events if e["event"] == "svid.issued" and e["type"] == "jwt"]
        assert jwt_issued and jwt_issued[0]["audience"] == [w.oidc.issuer]


def test_assertion_mode_replaces_a_placeholder_with_a_jwt_svid(tmp_path):
    bundle_port, mcp_port, proxy_port = free_port(), free_port(), free_port()
    mcp_url = f"http://127.0.0.1:{mcp_port}/mcp"
    sid = "spiffe://example.org/agent/assertion"
    with (
        cgroup_child() as cg,
        OidcProvider(
            tmp_path,
            dpop=False,
            resources={mcp_url: {"format": "jwt", "scope": "tools"}},
            clients=[{"client_id": sid, "jwks_uri": f"http://127.0.0.1:{bundle_port}/jwks.json"}],
        ) as oidc,
        McpServer(tmp_path, mcp_port, oidc.issuer) as mcp,
    ):

        def client(preexec):
            r = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "tests.mcp.spiffe_client",
                    mcp_url,
                    oidc.issuer,
                    sid,
                    "placeholder",
                ],
                cwd=REPO,
                capture_output=True,
                text=True,
                timeout=120,
                preexec_fn=preexec,
            )
            return json.loads(r.stdout.splitlines()[-1])

        # the placeholder alone is refused by the authorization server
        alone = client(None)
        assert alone.get("error"), alone
        assert oidc.events("grant.error") and not oidc.events("grant.success")
        (tmp_path / "entries.toml").write_text(
            f'[[entry]]\nid = "a"\nspiffe_id = "{sid}"\nselectors = ["cgroup:path:/{cg.name}"]\n'
        )
        cfg = write_config(
            tmp_path,
            bundle_port=bundle_port,
            extra=f'''
[inject]
listen_port = {proxy_port}
listen_port6 = {proxy_port}
managed_cgroups = ["/{cg.name}"]
[[servers]]
name = "as"
url = "{oidc.issuer}/token"
issuer = "{oidc.issuer}"
mode = "assertion"
''',
        )
        with AgentProcess(cfg, tmp_path) as agent:
            agent.wait_ready()
            out = client(enter_cgroup(cg))
            assert "error" not in out, out
            assert out["text"] == "spiffe-native"
            assert [e["client_id"] for e in oidc.events("grant.success")] == [sid]
            events = audit_events(agent.stdout_path)
            injected = [e for e in events if e["event"] == "assertion.injected"]
            assert len(injected) == 1 and injected[0]["spiffe_id"] == sid
            assert injected[0]["audience"] == oidc.issuer
            assert mcp.stats()["calls"] == {"echo": 1}


@pytest.mark.parametrize("opted_in", [False, True], ids=["default", "entry-opts-in"])
def test_a_jwt_svid_for_an_authorization_server_credless_uses_is_refused_by_default(
    tmp_path, opted_in
):
    """Issue 15, item 3. A JWT-SVID whose audience is an authorization server credless
    obtains tokens from is exactly the client assertion credless sends: a workload holding
    one could get its own token and call the MCP server without the proxy (no policy, no
    DPoP binding to the agent's key, no audit). The Workload API refuses it unless the
    registration entry opts in; so the AS never sees such an assertion from the workload."""
    # credless obtains tokens for this MCP server from this authorization server
    servers = (
        '[inject]\nenabled = false\n[[servers]]\nname = "weather"\nurl = "{mcp_url}"\n'
        'issuer = "{issuer}"\n'
    )
    with native_world(
        tmp_path, "authorization_server_audience = true\n" if opted_in else "", servers
    ) as w:
        out = w.client()
        if opted_in:
            assert "error" not in out, out
            assert [e["client_id"] for e in w.oidc.events("grant.success")] == [SPIFFE_ID]
            return
        assert out.get("error") and "authorization server" in out.get("message", ""), out
        assert not w.oidc.events("grant.success") and w.mcp.stats()["calls"] == {}
        events = audit_events(w.agent.stdout_path)
        assert not [e for e in events if e["event"] == "svid.issued" and e["type"] == "jwt"]
        [denied] = [e for e in events if e["event"] == "workload_api.denied"]
        assert denied["spiffe_id"] == SPIFFE_ID and denied["audience"] == [w.oidc.issuer]
