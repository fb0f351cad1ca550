"""A hostile MCP server behind the real agent, on the real kernel (issue 15, item 6).

A workload in a managed cgroup calls an MCP server whose metadata names an authorization
server the operator did not allow (or that it later switched to, after the first one was
pinned). The proxy answers the workload 502 with the reason; the wrong authorization server
receives nothing, the MCP server nothing with a credential, and the refusal is audited under
the workload's identity. The honest authorization server is the real oidc-provider; the MCP
server and the wrong authorization server are tests/mcp/hostile.py's (in this process).
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys

import pytest

from tests.helpers import AgentProcess, free_port, wait_for, write_config
from tests.kernel import cgroup_child, enter_cgroup
from tests.mcp.hostile import HostileMcpServer, RecordingAuthorizationServer
from tests.oidc.peer import OidcProvider

pytestmark = pytest.mark.kernel
SID = "spiffe://example.org/test/hostile-server"

# One POST on one connection; prints the status line and the body of the answer as JSON.
CLIENT = r"""
import http.client, json, sys
c = http.client.HTTPConnection("127.0.0.1", int(sys.argv[1]), timeout=20)
body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/list"})
c.request("POST", "/mcp", body, {"Content-Type": "application/json",
                                 "Accept": "application/json, text/event-stream"})
r = c.getresponse()
print(json.dumps({"status": r.status, "body": r.read().decode()}))
"""


def audit_until(agent: AgentProcess, event: str) -> list[dict]:
    """The agent's audit events, once `event` is among them (it writes them in batches)."""

    def read() -> list[dict]:
        return [json.loads(ln) for ln in agent.stdout_path.read_text().splitlines()]

    wait_for(lambda: any(e["event"] == event for e in read()), what=f"{event} audit event")
    return read()


@contextlib.contextmanager
def world(tmp_path, server_settings: str = ""):
    bundle_port, proxy_port = free_port(), free_port()
    with (
        cgroup_child() as cg,
        HostileMcpServer("127.0.0.1") as mcp,
        RecordingAuthorizationServer("127.0.0.2") as wrong,
        OidcProvider(
            tmp_path,
            resources={mcp.url: {"format": "jwt", "scope": "tools"}},
            clients=[{"client_id": SID, "jwks_uri": f"http://127.0.0.1:{bundle_port}/jwks.json"}],
        ) as oidc,
    ):
        mcp.metadata([wrong.issuer])  # hostile from the start
        (tmp_path / "entries.toml").write_text(
            f'[[entry]]\nid = "w"\nspiffe_id = "{SID}"\nselectors = ["cgroup:path:/{cg.name}"]\n'
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
name = "h"
url = "{mcp.url}"
{server_settings.format(oidc=oidc.issuer)}
''',
        )
        with AgentProcess(cfg, tmp_path) as agent:
            agent.wait_ready()

            def call() -> dict:
                out = subprocess.run(
                    [sys.executable, "-c", CLIENT, str(mcp.port)],
                    capture_output=True,
                    text=True,
                    timeout=60,
                    preexec_fn=enter_cgroup(cg),
                )
                assert out.returncode == 0, out.stderr
                return json.loads(out.stdout)

            yield type(
                "World",
                (),
                dict(
                    agent=agent,
                    mcp=mcp,
                    wrong=wrong,
                    oidc=oidc,
                    call=staticmethod(call),
                    tmp=tmp_path,
                ),
            )


def test_a_server_naming_an_authorization_server_off_the_allow_list_gets_a_502(tmp_path):
    with world(tmp_path, 'authorization_servers = ["{oidc}"]') as w:
        answer = w.call()
        assert answer["status"] == 502
        body = json.loads(answer["body"])
        assert body["kind"] == "untrusted_authorization_server"
        assert w.wrong.issuer in body["detail"] and w.oidc.issuer in body["detail"]
        assert "'h'" in body["detail"]
        assert w.wrong.received() == []
        assert not any(s.carries_credential for s in w.mcp.received())
        assert w.oidc.events("grant.success") == []
        events = audit_until(w.agent, "request.failed")
        refused = [e for e in events if e["event"] == "oauth.refused"]
        assert refused and refused[0]["spiffe_id"] == SID and refused[0]["server"] == "h"
        assert refused[0]["authorization_server"] == w.wrong.issuer
        failed = [e for e in events if e["event"] == "request.failed"]
        assert failed and failed[0]["kind"] == "untrusted_authorization_server"
        assert failed[0]["spiffe_id"] == SID


def test_a_pinned_authorization_server_survives_a_restart_and_a_hostile_change(tmp_path):
    """No issuer, no list: the first AS discovered is pinned; after a restart, a server
    that now names another AS is refused and nothing reaches that AS."""
    with world(tmp_path) as w:
        w.mcp.metadata([w.oidc.issuer])  # honest at first
        first = w.call()
        assert first["status"] == 401  # the hostile server refuses every token:
        assert w.oidc.events("grant.success")  # what matters is that one was issued
        pins = tmp_path / "state" / "oauth" / "authorization_servers.json"
        assert [p["issuer"] for p in json.loads(pins.read_text()).values()] == [w.oidc.issuer]
        w.agent.stop()
        w.mcp.metadata([w.wrong.issuer])  # then switches to its accomplice
        with AgentProcess(w.agent.config, tmp_path) as agent:
            agent.wait_ready()
            answer = w.call()
            assert answer["status"] == 502
            assert json.loads(answer["body"])["kind"] == "untrusted_authorization_server"
            assert str(pins) in json.loads(answer["body"])["detail"]
            assert w.wrong.received() == []
            assert [p["issuer"] for p in json.loads(pins.read_text()).values()] == [w.oidc.issuer]
            refused = [
                e for e in audit_until(agent, "oauth.refused") if e["event"] == "oauth.refused"
            ]
            assert refused[0]["spiffe_id"] == SID
            assert refused[0]["check"] == "untrusted_authorization_server"
