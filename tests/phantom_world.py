"""The world of the phantom-mode kernel tests (tests/integration/test_phantom.py,
test_phantom_files.py): an MCP server that introspects opaque tokens at oidc-provider, a
holder identity in the world's cgroup and a thief identity in a cgroup of its own, both
managed, and an agent serving one phantom-mode server, "weather"."""

from __future__ import annotations

from typing import Any

from tests.helpers import audit_events, free_port
from tests.kernel import cgroup_child
from tests.mcp.peers import McpServer
from tests.oidc.peer import OidcProvider
from tests.world import entry_table, server_table, table

RS_CLIENT = "mcp-resource-server:rs-secret"  # the MCP server's own client, for introspection


def phantom_world(
    tmp_path,
    w,
    holder: str,
    thief: str,
    holder_selectors: list[str] | None = None,
    phantom_dir: str | None = None,
    **server: Any,
):
    """Peers and agent into the World w; returns the thief's cgroup. The holder's entry
    matches w.selector plus holder_selectors, with phantom_dir when given."""
    thief_cg = w.enter(cgroup_child("credless-test-thief"))
    w.mcp = w.enter(McpServer(tmp_path, introspect=RS_CLIENT))
    jwks = f"http://127.0.0.1:{w.bundle_port}/jwks.json"
    rs_id, rs_secret = RS_CLIENT.split(":")
    w.oidc = w.enter(
        OidcProvider(
            tmp_path,
            resources={w.mcp.url: {"format": "opaque", "scope": "tools"}},
            clients=[
                {"client_id": holder, "jwks_uri": jwks},
                {"client_id": thief, "jwks_uri": jwks},
                {"client_id": rs_id, "client_secret": rs_secret},
            ],
            dpop=False,
        )
    )
    w.mcp.start(w.oidc.issuer)
    w.api_socket = tmp_path / "run" / "agent.sock"
    w.metrics_port = free_port()
    extra = {"phantom_dir": phantom_dir} if phantom_dir is not None else {}
    entries = entry_table(
        "holder", holder, [w.selector, *(holder_selectors or [])], **extra
    ) + entry_table("thief", thief, [f"cgroup:path:/{thief_cg.name}"])
    inject = table(
        "[inject]",
        listen_port=w.proxy_port,
        listen_port6=w.proxy_port,
        managed_cgroups=[f"/{w.cg.name}", f"/{thief_cg.name}"],
    )
    w.start_agent(
        server_table("weather", w.mcp.url, mode="phantom", dpop="never", **server),
        entries=entries,
        intercept=False,
        settings=inject,
        metrics_port=w.metrics_port,
    )
    return thief_cg


def only_obtained_tokens_reached_the_server(w, placeholder: str) -> None:
    """Every credentialed request the server saw carried a Bearer token credless obtained
    (token.obtained), and the placeholder appears nowhere in what the server recorded."""
    seen = w.mcp.credentialed()
    assert seen and all(r["auth_scheme"] == "Bearer" for r in seen)
    obtained = [
        e
        for e in audit_events(w.agent.stdout_path, until="request.injected")
        if e["event"] == "token.obtained"
    ]
    assert {r["token_sha256"] for r in seen} == {e["token_sha256"] for e in obtained}
    raw = (w.tmp / f"mcp-stats-{w.mcp.port}.json").read_text()
    assert placeholder not in raw and placeholder.split(".")[2] not in raw
