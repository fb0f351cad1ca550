"""IPv6 on the real kernel (issue 18): an MCP server on [::1], a dual-stack client reaching an
IPv4 server through an IPv4-mapped address (::ffff:127.0.0.1 on an AF_INET6 socket), and a
server name that resolves to both families. Each connect goes through the connect6 hook (or
connect4, for the IPv4 half of a dual name); the workload is the official MCP Python SDK
client holding no credential, and the server (the SDK's, demanding tokens) must see
credless's token, with one request.injected audit event for each request it saw.

This machine's /etc/hosts maps localhost to 127.0.0.1 only, and it is not changed: a name
that resolves to both families is localhost inside a mount namespace of the test's own, with
its own /etc/hosts bind-mounted over the host's (`unshare --mount --propagation private`;
the namespace, and the mount, go with the last process in it).
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from agent.observe import admin
from tests.helpers import audit_events
from tests.kernel import enter_cgroup, run_python
from tests.mcp.peers import REPO, McpServer
from tests.world import World, build_world, server_table, tools_rule

pytestmark = pytest.mark.kernel
SPIFFE_ID = "spiffe://example.org/agent/v6-bot"
POLICY = tools_rule("bot-tools", SPIFFE_ID, "weather", ["echo", "add"])
DUAL_HOSTS = "127.0.0.1 localhost\n::1 localhost\n"

# The SDK client, its name lookups made as a resolver of one kind makes them: "v4" (IPv4
# only), "v6" (IPv6 only), "mapped" (a dual-stack resolver: AF_INET6 with AI_V4MAPPED, as a
# JVM's or a program's that opens only AF_INET6 sockets; an IPv4 answer comes back as
# ::ffff:a.b.c.d), "any" (the system's, unchanged).
CLIENT = r"""
import socket, sys
kind = sys.argv.pop(1)
family, extra = {
    "v4": (socket.AF_INET, 0),
    "v6": (socket.AF_INET6, 0),
    "mapped": (socket.AF_INET6, socket.AI_V4MAPPED),
    "any": (None, 0),
}[kind]
real = socket.getaddrinfo
def getaddrinfo(host, port, fam=0, type=0, proto=0, flags=0):
    return real(host, port, fam if family is None else family, type, proto, flags | extra)
socket.getaddrinfo = getaddrinfo
from tests.mcp import client
sys.exit(client.main())
"""


def in_hosts(hosts: Path) -> list[str]:
    """A command prefix: run in a new mount namespace whose /etc/hosts is hosts."""
    script = 'mount --bind "$0" /etc/hosts && exec "$@"'
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, str(hosts)]


def run_sdk_client(
    url: str, *steps: str, cg: Path | None, resolver: str = "any", prefix: Sequence[str] = ()
) -> list[dict]:
    """The SDK client (in cgroup cg: managed; None: not) calling url; its JSON lines."""
    r = subprocess.run(
        [*prefix, sys.executable, "-c", CLIENT, resolver, url, *steps],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=90,
        preexec_fn=enter_cgroup(cg) if cg else None,
    )
    lines = [json.loads(ln) for ln in r.stdout.splitlines() if ln.startswith("{")]
    assert lines, f"client printed nothing: {r.stderr[-3000:]}"
    return lines


@contextlib.contextmanager
def world(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    host: str = "127.0.0.1",
    url: str | None = None,
    agent_prefix: Sequence[str] = (),
) -> Iterator[World]:
    """oidc-provider, an MCP server on host (its URL: url, default the one it names) and the
    agent (run under agent_prefix) managing the world's cgroup, with that server. url may
    name the server's port as {port}."""
    with build_world(tmp_path, SPIFFE_ID) as w:
        w.mcp = w.enter(McpServer(tmp_path, host=host))
        if url is not None:  # the resource it serves, and what the agent is told
            w.mcp.url = url.format(port=w.mcp.port)
        w.authorization_server([w.mcp.url])
        w.mcp.start(w.oidc.issuer)
        with monkeypatch.context() as m:
            if agent_prefix:  # tests.helpers.AgentProcess runs sys.executable
                wrapper = tmp_path / "python-in-namespace"
                wrapper.write_text(
                    "#!/bin/sh\nexec "
                    + " ".join(f"'{a}'" for a in [*agent_prefix, sys.executable])
                    + ' "$@"\n'
                )
                wrapper.chmod(0o755)
                m.setattr(sys, "executable", str(wrapper))
            w.start_agent(server_table("weather", w.mcp.url), policy=POLICY)
        yield w


def status(w: World) -> dict:
    return admin.call(w.tmp / "run" / "admin.sock", "status")


def assert_injected(w: World, out: list[dict], calls: int = 1) -> None:
    """The client listed the tools and echoed; the server saw each call with credless's
    token, and the agent audited each request the server saw with one."""
    assert all("error" not in o for o in out), out
    assert out[0]["tools"] == ["add", "echo", "secret_tool", "stream_count"]
    assert out[1]["text"] == "hi"
    stats = w.mcp.stats()
    assert stats["calls"] == {"echo": calls}
    seen = [r["token_sha256"] for r in stats["requests"] if r["auth_scheme"]]
    assert seen and {r["auth_scheme"] for r in stats["requests"]} == {None, "Bearer"}
    events = audit_events(
        w.agent.stdout_path,
        lambda evs: [e["event"] for e in evs].count("request.injected") >= len(seen),
    )
    injected = [e for e in events if e["event"] == "request.injected"]
    assert {(e["spiffe_id"], e["server"]) for e in injected} == {(SPIFFE_ID, "weather")}
    assert {e["token_sha256"] for e in injected} == set(seen)


STEPS = ("list", 'call:echo:{"text": "hi"}')


def test_a_server_on_ipv6_loopback_is_intercepted_and_injected(tmp_path, monkeypatch):
    with world(tmp_path, monkeypatch, host="::1") as w:
        assert w.mcp.url.startswith("http://[::1]:")
        # the server demands a token: a client credless does not manage gets none
        refused = run_sdk_client(w.mcp.url, *STEPS, cg=None)
        assert refused[0]["error"] and w.mcp.stats()["calls"] == {}
        assert status(w)["redirect_counts"]["redirected_v6"] == 0

        assert_injected(w, run_sdk_client(w.mcp.url, *STEPS, cg=w.cg))
        counts = status(w)["redirect_counts"]
        assert counts["redirected_v6"] >= 1 and counts["redirected_v4"] == 0


def test_a_dual_stack_client_reaching_an_ipv4_server_through_a_mapped_address(
    tmp_path, monkeypatch
):
    """The server is 127.0.0.1 (its URL names localhost, which the agent resolves to
    127.0.0.1 only); the client's resolver answers ::ffff:127.0.0.1, so it connects an
    AF_INET6 socket there: connect6 with a v4-mapped destination, never connect4."""
    with world(tmp_path, monkeypatch, host="localhost") as w:
        assert_injected(w, run_sdk_client(w.mcp.url, *STEPS, cg=w.cg, resolver="mapped"))
        counts = status(w)["redirect_counts"]
        assert counts["redirected_v6"] >= 1 and counts["redirected_v4"] == 0


def test_a_server_named_by_its_v4_mapped_address(tmp_path, monkeypatch):
    """[[servers]] url = "http://[::ffff:127.0.0.1]:PORT/mcp", which the workload dials as
    written, on an AF_INET6 socket: connect6 sees a v4-mapped destination. The agent's
    resolver answers the mapped address as written (getaddrinfo does), and the redirect must
    key it as the IPv4 address connect6 looks it up by, or the workload's connects go
    straight to the server."""
    # the hex spelling, which the SDK server (pydantic) writes in its resource metadata
    mapped = "http://[::ffff:7f00:1]:{port}/mcp"
    with world(tmp_path, monkeypatch, url=mapped) as w:
        assert_injected(w, run_sdk_client(w.mcp.url, *STEPS, cg=w.cg))
        counts = status(w)["redirect_counts"]
        assert counts["redirected_v6"] >= 1 and counts["redirected_v4"] == 0


@pytest.mark.parametrize("resolver", ["v4", "v6", "mapped", "any"])
def test_a_server_name_resolving_to_both_families(tmp_path, monkeypatch, resolver):
    """localhost resolves to 127.0.0.1 and ::1 (for the agent and the workload alike); the
    server listens on both. Whichever address the client's resolver picks (v4: connect4;
    v6 and "any", which tries ::1 first: connect6; mapped: connect6, v4-mapped), it is
    intercepted and injected."""
    hosts = tmp_path / "hosts"
    hosts.write_text(DUAL_HOSTS)
    ns = in_hosts(hosts)
    with world(tmp_path, monkeypatch, host="localhost", agent_prefix=ns) as w:
        port = w.mcp.port
        assert sorted(status(w)["redirect_targets"]) == [f"127.0.0.1:{port}", f"::1:{port}"]
        out = run_sdk_client(w.mcp.url, *STEPS, cg=w.cg, resolver=resolver, prefix=ns)
        assert_injected(w, out)
        counts = status(w)["redirect_counts"]
        family = "redirected_v4" if resolver == "v4" else "redirected_v6"
        assert counts[family] >= 1, counts
        if resolver != "any":  # which tries 127.0.0.1 too when ::1 is slow to connect
            other = "redirected_v6" if resolver == "v4" else "redirected_v4"
            assert counts[other] == 0, counts


def test_a_workload_whose_localhost_is_also_ipv6_is_intercepted(tmp_path, monkeypatch):
    """A container's or pod's /etc/hosts maps localhost to ::1 as well (Docker's and the
    kubelet's do); the node's (this machine's) maps it to 127.0.0.1 only. The workload's
    SDK client tries ::1 first: that connect must be intercepted too, never reach the
    server uninjected (localhost is loopback in both families, RFC 6761)."""
    hosts = tmp_path / "hosts"
    hosts.write_text(DUAL_HOSTS)
    with world(tmp_path, monkeypatch, host="localhost") as w:
        port = w.mcp.port
        assert sorted(status(w)["redirect_targets"]) == [f"127.0.0.1:{port}", f"::1:{port}"]
        out = run_sdk_client(w.mcp.url, *STEPS, cg=w.cg, resolver="v6", prefix=in_hosts(hosts))
        assert_injected(w, out)


# Connects to argv[1]:argv[2] (the family the address is; from argv[4] if given), POSTs an
# MCP initialize with Host argv[3] and Connection: close, reads the answer to its end; prints
# its status line.
RAW_INITIALIZE = r"""
import json, socket, sys
host, port, authority = sys.argv[1], int(sys.argv[2]), sys.argv[3]
s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
s.settimeout(60)
if len(sys.argv) > 4:
    s.bind((sys.argv[4], 0))
s.connect((host, port))
body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
    "protocolVersion": "2025-06-18", "capabilities": {},
    "clientInfo": {"name": "raw", "version": "1"}}}).encode()
s.sendall(b"POST /mcp HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
          b"Accept: application/json, text/event-stream\r\nConnection: close\r\n"
          b"Content-Length: %d\r\n\r\n%s" % (authority.encode(), len(body), body))
answer = b""
while chunk := s.recv(65536):
    answer += chunk
print(answer.split(b"\r\n")[0].decode())
"""


@pytest.mark.parametrize(
    "server, dial, bound",
    [
        ("127.0.0.1", "0.0.0.0", ()),  # noqa: S104
        ("::1", "::", ()),
        ("127.0.0.1", "::ffff:0.0.0.0", ()),
        ("127.0.0.2", "0.0.0.0", ("127.0.0.2",)),  # noqa: S104
        ("127.0.0.2", "::ffff:0.0.0.0", ("::ffff:127.0.0.2",)),
        ("127.0.0.1", "::", ("::ffff:127.0.0.2",)),
    ],
    ids=["v4-any", "v6-any", "mapped-any", "v4-any-bound", "mapped-any-bound", "any-on-mapped"],
)
def test_the_unspecified_address_is_the_address_it_reaches(
    tmp_path, monkeypatch, server, dial, bound
):
    """Linux connects a socket dialling 0.0.0.0 or ::ffff:0.0.0.0 to the address it is bound
    to, else to 127.0.0.1; one dialling :: to ::1 (::ffff:127.0.0.1 on a socket bound to a
    v4-mapped address). That is the configured server, and the connect must be intercepted
    as one to it, never reach it uninjected and unaudited."""
    with world(tmp_path, monkeypatch, host=server) as w:
        authority = w.mcp.url.split("/")[2]
        args = (dial, w.mcp.port, authority, *bound)
        out = run_python(RAW_INITIALIZE, *args, cgroup=w.cg).strip()
        assert out == "HTTP/1.1 200 OK", out
        posts = [r for r in w.mcp.stats()["requests"] if r["method"] == "POST"]
        # credless's own discovery probe (no token), then the workload's, with its token
        assert [r["auth_scheme"] for r in posts] == [None, "Bearer"]
        injected = audit_events(w.agent.stdout_path, "request.injected")
        assert [e["token_sha256"] for e in injected if e["event"] == "request.injected"] == [
            posts[1]["token_sha256"]
        ]
