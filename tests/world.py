"""One builder for the world the agent is tested in: a fresh cgroup it manages, an
authorization server (oidc-provider) that trusts the agent's JWT-SVIDs, registration
entries, a policy, `[[servers]]`, and the agent itself; all torn down in reverse order.

    with build_world(tmp, "spiffe://example.org/agent/bot") as w:
        mcp = w.enter(McpServer(tmp))                      # bound: its URL is known
        w.authorization_server([mcp.url])
        mcp.start(w.oidc.issuer)
        w.start_agent(server_table("weather", mcp.url))

Used by the integration tests, the smuggling harness, the benchmarks and `make demo`.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from tests.helpers import AgentProcess, free_port, write_config
from tests.kernel import cgroup_child
from tests.oidc.peer import OidcProvider

T = TypeVar("T")

# What oidc-provider issues for a resource: a JWT access token (the MCP servers verify it
# themselves) with the MCP scope
JWT_RESOURCE = {"format": "jwt", "scope": "tools"}


def toml_value(value: Any) -> str:
    """A string, number, boolean or list of them as TOML (JSON's spelling is TOML's)."""
    return json.dumps(value)


def table(header: str, **settings: Any) -> str:
    """`[header]` (or `[[header]]` when given so) with one line per setting."""
    lines = [header] + [f"{k} = {toml_value(v)}" for k, v in settings.items()]
    return "\n".join(lines) + "\n"


def server_table(name: str, url: str, **settings: Any) -> str:
    """One `[[servers]]` entry (issuer, dpop, mode, ... as keyword arguments)."""
    return table("[[servers]]", name=name, url=url, **settings)


def entry_table(id: str, spiffe_id: str, selectors: list[str], **settings: Any) -> str:
    """One `[[entry]]` of entries.toml."""
    return table("[[entry]]", id=id, spiffe_id=spiffe_id, selectors=selectors, **settings)


def tools_rule(id: str, spiffe_id: str, server: str, tools: list[str]) -> str:
    """A policy `[[rule]]`: spiffe_id may list server's tools and call these."""
    return table(
        "[[rule]]",
        id=id,
        spiffe_id=spiffe_id,
        server=server,
        methods=["tools/list", "tools/call"],
        tools=tools,
    )


def inject_table(cg: Path, listen_port: int, **settings: Any) -> str:
    """`[inject]` managing cgroup cg, listening on listen_port (v4 and v6)."""
    return table(
        "[inject]",
        listen_port=listen_port,
        listen_port6=listen_port,
        managed_cgroups=[f"/{cg.name}"],
        **settings,
    )


def passthrough_config(tmp: Path, cg: Path, servers: dict[str, int], **inject: Any) -> Path:
    """A config for an agent managing cgroup cg, with a passthrough server (observed, not
    credentialed: no authorization server involved) per name -> loopback port, and these
    [inject] settings."""
    tables = [inject_table(cg, free_port(), **inject)] + [
        server_table(name, f"http://127.0.0.1:{port}/mcp", mode="passthrough")
        for name, port in servers.items()
    ]
    return write_config(tmp, extra="".join(tables))


class World:
    """What a test is given: cg, oidc, agent (once started), and whatever it enter()s."""

    def __init__(self, tmp: Path, stack: contextlib.ExitStack, spiffe_id: str, cg: Path):
        self.tmp, self.stack, self.spiffe_id, self.cg = tmp, stack, spiffe_id, cg
        self.bundle_port, self.proxy_port = free_port(), free_port()
        self.entries_path = tmp / "entries.toml"
        self.oidc: OidcProvider | None = None
        self.agent: AgentProcess | None = None

    @property
    def selector(self) -> str:
        """The selector of every process in the world's cgroup."""
        return f"cgroup:path:/{self.cg.name}"

    def enter(self, context: contextlib.AbstractContextManager[T]) -> T:
        """A peer of the test's own, stopped with the world (in reverse order)."""
        return self.stack.enter_context(context)

    def authorization_server(
        self, resources: Iterable[str], spiffe_ids: Iterable[str] = (), **options: Any
    ) -> OidcProvider:
        """oidc-provider issuing tokens for these resource URLs to each SPIFFE ID (default:
        the world's), which authenticates with a JWT-SVID checked against the agent's bundle
        endpoint (private_key_jwt). options: OidcProvider's (dpop, access_token_ttl, ...)."""
        jwks = f"http://127.0.0.1:{self.bundle_port}/jwks.json"
        self.oidc = self.enter(
            OidcProvider(
                self.tmp,
                resources={url: JWT_RESOURCE for url in resources},
                clients=[
                    {"client_id": sid, "jwks_uri": jwks}
                    for sid in (list(spiffe_ids) or [self.spiffe_id])
                ],
                **options,
            )
        )
        return self.oidc

    def start_agent(
        self,
        servers: str = "",
        *,
        entries: str | None = None,
        policy: str | None = None,
        policy_settings: str = "",
        intercept: bool = True,
        inject: dict[str, Any] | None = None,
        settings: str = "",
        metrics_port: int | None = None,
        workload_api_socket: Path | None = None,
    ) -> AgentProcess:
        """The agent, once ready. entries: entries.toml (default: the world's SPIFFE ID for
        its cgroup); policy: policy.toml, if any, with policy_settings in its [policy]
        table; intercept: an [inject] table managing the world's cgroup, with the settings
        in inject; settings: other tables, before servers (`[[servers]]`)."""
        if entries is None:
            entries = entry_table("workload", self.spiffe_id, [self.selector])
        self.entries_path.write_text(entries)
        if intercept:
            config = inject_table(self.cg, self.proxy_port, **(inject or {}))
        elif "[inject]" in settings + servers:  # the test's own [inject] table
            config = ""
        else:  # none: the default would redirect every cgroup to port 15001, shared by all
            config = table("[inject]", enabled=False)
        if policy is not None:
            (self.tmp / "policy.toml").write_text(policy)
            config += table("[policy]", file=str(self.tmp / "policy.toml")) + policy_settings
        cfg = write_config(
            self.tmp,
            extra=config + settings + servers,
            bundle_port=self.bundle_port,
            metrics_port=metrics_port,
            workload_api_socket=workload_api_socket,
        )
        self.agent = self.enter(AgentProcess(cfg, self.tmp))
        self.agent.wait_ready()
        return self.agent


@contextlib.contextmanager
def build_world(
    tmp: Path, spiffe_id: str = "", cgroup_prefix: str = "credless-test"
) -> Iterator[World]:
    """A World around a fresh cgroup; everything entered into it is stopped on exit."""
    with contextlib.ExitStack() as stack:
        cg = stack.enter_context(cgroup_child(cgroup_prefix))
        yield World(tmp, stack, spiffe_id, cg)
