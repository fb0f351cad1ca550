"""inject.managed_cgroups names cgroups by path and glob, including ones that do not exist
yet or are deleted and made again (what systemd does at every service restart), on the real
kernel (issue 19, "Managed cgroups that do not exist yet, or are re-created").

Before: every path had to exist at start-up (`redirect: [Errno 2] No such file or
directory`), and a managed cgroup made again while the agent ran (a new cgroup id) was no
longer managed: its traffic went out without credentials and nothing was logged.

Every cgroup a test makes is named with one random prefix and removed afterwards, with
its processes, whatever happened (`cgroups` fixture).
"""

from __future__ import annotations

import contextlib
import os
import signal
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.attest import cgroupfs
from tests.helpers import AgentProcess, audit_events, free_port, http_get, wait_for, write_config
from tests.kernel import enter_cgroup, remove_cgroup, run_python
from tests.upstreams.echo import Upstream
from tests.world import server_table, table

pytestmark = pytest.mark.kernel

# One request to 127.0.0.1:<port>; prints the status, "refused" or "eperm" (the kernel
# refused the connect: the cgroup is not decided yet).
CALL = r"""
import http.client, sys
c = http.client.HTTPConnection("127.0.0.1", int(sys.argv[1]), timeout=10)
try:
    c.connect()
except PermissionError:
    print("eperm"); sys.exit()
except ConnectionRefusedError:
    print("refused"); sys.exit()
c.request("POST", "/mcp", body=b"{}", headers={"Content-Type": "application/json"})
r = c.getresponse()
r.read()  # the whole answer: the exchange ends complete
print(r.status, c.sock.getsockname()[1])
"""


class Cgroups:
    """Cgroups under the v2 root named <prefix>-<name>; all removed by the fixture."""

    def __init__(self) -> None:
        root = cgroupfs.cgroup2_root()
        assert root is not None, "kernel tests need a cgroup v2 mount"
        self.root = Path(root)
        self.prefix = f"credless-mc-{uuid.uuid4().hex[:8]}"

    def path(self, name: str) -> Path:
        return self.root / f"{self.prefix}-{name}"

    def rel(self, name: str) -> str:
        return f"/{self.prefix}-{name}"

    def make(self, name: str) -> Path:
        p = self.path(name)
        p.mkdir()
        return p

    def remove_all(self) -> None:
        for p in self.root.glob(f"{self.prefix}-*"):
            remove_cgroup(p)


@pytest.fixture
def cgroups() -> Iterator[Cgroups]:
    cg = Cgroups()
    try:
        yield cg
    finally:
        cg.remove_all()


def config(tmp: Path, patterns: list[str], upstream: int, metrics_port: int | None = None):
    port = free_port()
    return write_config(
        tmp,
        extra=table("[inject]", listen_port=port, listen_port6=port, managed_cgroups=patterns)
        + server_table("up", f"http://127.0.0.1:{upstream}/mcp", mode="passthrough"),
        metrics_port=metrics_port,
    )


def call(upstream: int, cgroup: Path) -> str:
    """The status of one request from a process in cgroup ("eperm": refused by the kernel)."""
    return run_python(CALL, upstream, cgroup=cgroup, timeout=30).split()[0]


def reaches_directly(upstream: int, cgroup: Path) -> bool:
    """One request from a process in cgroup is answered, and the server saw it come from
    the process's own socket: not redirected."""
    status, local = run_python(CALL, upstream, cgroup=cgroup, timeout=30).split()
    return status == "200" and int(local) in {s["peer_port"] for s in Upstream.seen}


def forwarded(agent: AgentProcess, count: int) -> list[dict]:
    """The request.forwarded events, once there are count of them."""

    def fw(events):
        return [e for e in events if e["event"] == "request.forwarded"]

    return fw(audit_events(agent.stdout_path, lambda evs: len(fw(evs)) >= count))


def wait_managed(agent: AgentProcess, cgroup: Path, count: int = 1) -> list[dict]:
    """The agent's "cgroup managed" log lines for cgroup, once there are count of them."""
    rel = "/" + cgroup.name

    def mine():
        found = [
            e
            for e in agent.log_events()
            if e.get("event") == "cgroup managed" and e.get("cgroup") == rel
        ]
        return found if len(found) >= count else []

    return wait_for(mine, what=f"{rel} managed")


def audited(agent: AgentProcess, event: str, cgroup: Path, count: int = 1) -> list[dict]:
    """The audit events `event` for cgroup, once there are count of them."""
    rel = "/" + cgroup.name

    def mine(events):
        return [e for e in events if e["event"] == event and e["cgroup"] == rel]

    return mine(audit_events(agent.stdout_path, lambda evs: len(mine(evs)) >= count))


def stopped(pid: int) -> bool:
    """Every thread of pid is stopped (SIGSTOP takes effect thread by thread)."""
    states = [
        Path(f"/proc/{pid}/task/{t}/stat").read_text().rsplit(")", 1)[1].split()[0]
        for t in os.listdir(f"/proc/{pid}/task")
    ]
    return all(s in ("T", "t") for s in states)


def started_agent(stack: contextlib.ExitStack, tmp: Path, cfg: Path) -> AgentProcess:
    tmp.mkdir(exist_ok=True)
    agent = stack.enter_context(AgentProcess(cfg, tmp))
    agent.wait_ready()
    return agent


def test_patterns_naming_no_cgroup_yet_start_and_manage_each_cgroup_as_it_appears(
    tmp_path, upstream, cgroups
):
    glob, exact = cgroups.rel("app-*"), cgroups.rel("exact")
    cfg = config(tmp_path, [glob, exact], upstream)
    with contextlib.ExitStack() as stack:
        agent = started_agent(stack, tmp_path, cfg)  # before: [Errno 2] at start-up
        [watching] = [e for e in agent.log_events() if e["event"].startswith("watching cgroups")]
        assert watching["matching_nothing_yet"] == [glob, exact]

        app = cgroups.make("app-1")
        [event] = wait_managed(agent, app)
        assert event["cgroup_id"] == app.stat().st_ino and event["patterns"] == [glob]
        assert call(upstream, app) == "200"
        [fw] = forwarded(agent, 1)
        assert fw["server"] == "up" and fw["pid"] > 0

        # a directory made under a managed cgroup is managed at once (no event needed)
        child = app / "worker"
        child.mkdir()
        assert call(upstream, child) == "200"

        other = cgroups.make("other")  # the same depth, matching no pattern
        exact_cg = cgroups.make("exact")
        wait_managed(agent, exact_cg)  # events are decided in order: other's is done too
        assert call(upstream, exact_cg) == "200"
        assert reaches_directly(upstream, other)
        assert len(forwarded(agent, 3)) == 3  # app-1, its child, exact


def test_a_managed_cgroup_made_again_is_managed_at_once_and_both_changes_are_audited(
    tmp_path, upstream, cgroups
):
    metrics = free_port()
    app = cgroups.make("svc")
    cfg = config(tmp_path, [cgroups.rel("svc")], upstream, metrics_port=metrics)
    with contextlib.ExitStack() as stack:
        agent = started_agent(stack, tmp_path, cfg)
        first_id = app.stat().st_ino
        assert call(upstream, app) == "200"

        remove_cgroup(app)  # what systemd does when the service restarts
        [unmanaged] = audited(agent, "cgroup.unmanaged", app)
        assert unmanaged["cgroup_id"] == first_id and unmanaged["reason"] == "removed"

        app.mkdir()
        assert app.stat().st_ino != first_id  # a new cgroup id: the old entry names nothing
        present, appeared = audited(agent, "cgroup.managed", app, 2)
        assert present["reason"] == "present" and present["cgroup_id"] == first_id
        assert appeared["reason"] == "appeared" and appeared["cgroup_id"] == app.stat().st_ino
        assert appeared["patterns"] == ["/" + app.name]
        assert call(upstream, app) == "200"  # before: straight to the server
        assert len(forwarded(agent, 2)) == 2 and len(Upstream.seen) == 2

        _, body = http_get(f"http://127.0.0.1:{metrics}/metrics")
        assert 'credless_managed_cgroup_changes_total{change="managed"} 2.0' in body
        assert 'credless_managed_cgroup_changes_total{change="unmanaged"} 1.0' in body
        assert "credless_managed_cgroups 1.0" in body


def test_a_new_cgroup_is_refused_until_the_agent_has_decided_about_it(tmp_path, upstream, cgroups):
    """The race: a process put in a just-made cgroup connects before the agent has seen the
    cgroup. The agent is stopped (SIGSTOP) so it cannot decide: the kernel has marked the
    cgroup PENDING at mkdir, before anyone could enter it, and the connect is refused."""
    cfg = config(tmp_path, [cgroups.rel("app-*")], upstream)
    base = cgroups.make("base")
    with contextlib.ExitStack() as stack:
        agent = started_agent(stack, tmp_path, cfg)
        os.kill(agent.proc.pid, signal.SIGSTOP)
        stack.callback(os.kill, agent.proc.pid, signal.SIGCONT)
        wait_for(lambda: stopped(agent.proc.pid), what="every thread of the agent stopped")
        other = cgroups.make("other")  # same depth: undecided too, until the agent looks
        app = cgroups.make("app-1")
        deeper = base / "deeper"  # a depth no pattern has: never held up
        deeper.mkdir()
        assert call(upstream, app) == "eperm"  # never out uncredentialed
        assert call(upstream, other) == "eperm"
        assert reaches_directly(upstream, deeper)
        assert len(Upstream.seen) == 1

        os.kill(agent.proc.pid, signal.SIGCONT)
        wait_managed(agent, app)  # other's mkdir came first: decided as well
        assert call(upstream, app) == "200"
        assert not reaches_directly(upstream, app)  # through the proxy
        assert reaches_directly(upstream, other)
        assert len(forwarded(agent, 2)) == 2 and len(Upstream.seen) == 4


def test_a_cgroup_made_again_while_no_agent_runs_is_refused_then_managed_by_the_next(
    tmp_path, upstream, cgroups
):
    app = cgroups.make("svc")
    cfg = config(tmp_path, [cgroups.rel("svc")], upstream)
    with contextlib.ExitStack() as stack:
        first = started_agent(stack, tmp_path / "first", cfg)
        assert first.stop() == 0  # the redirect (and the watcher) stay pinned
        remove_cgroup(app)
        app.mkdir()
        # before: the new id was in no map and the request went out uncredentialed
        assert call(upstream, app) == "eperm"
        assert Upstream.seen == []

        second = started_agent(stack, tmp_path / "second", cfg)
        [event] = wait_managed(second, app)
        assert event["cgroup_id"] == app.stat().st_ino
        assert call(upstream, app) == "200"
        assert len(forwarded(second, 1)) == 1


def test_a_configuration_without_the_cgroup_any_more_unmanages_it(tmp_path, upstream, cgroups):
    app, kept = cgroups.make("old"), cgroups.make("kept")
    with contextlib.ExitStack() as stack:
        first = started_agent(
            stack, tmp_path / "first", config(tmp_path, [cgroups.rel("*")], upstream)
        )
        assert first.stop() == 0
        second = started_agent(
            stack, tmp_path / "second", config(tmp_path, [cgroups.rel("kept")], upstream)
        )
        [gone] = [e for e in second.log_events() if e.get("event") == "cgroup unmanaged"]
        assert gone["cgroup_id"] == app.stat().st_ino and gone["cgroup"] == "/" + app.name
        assert reaches_directly(upstream, app)
        assert not reaches_directly(upstream, kept)
        assert len(forwarded(second, 1)) == 1


def test_doctor_names_the_patterns_matching_nothing_yet(cgroups):
    from agent.doctor.host import check_managed_cgroups
    from agent.doctor.model import DoctorOptions

    cgroups.make("here")
    patterns = [cgroups.rel("here"), cgroups.rel("later-*")]
    check = check_managed_cgroups(DoctorOptions(managed_cgroups=patterns))
    assert check.name == "managed_cgroups" and not check.required and not check.ok
    assert f"{cgroups.rel('later-*')} matches no cgroup yet" in check.detail
    assert f"{cgroups.rel('here')}: 1 cgroup" in check.detail
    cgroups.make("later-1")
    assert check_managed_cgroups(DoctorOptions(managed_cgroups=patterns)).ok


def test_an_mcp_call_from_a_service_cgroup_made_again_is_injected(tmp_path):
    """The whole path: oidc-provider, an MCP server demanding DPoP-bound tokens, the
    official SDK client in the managed cgroup; the cgroup is deleted and made again (a
    service restart) while the agent runs, and the next call gets its credential."""
    from tests.mcp.peers import McpServer, run_client
    from tests.world import build_world, server_table, tools_rule

    spiffe_id = "spiffe://example.org/agent/restarted"
    with build_world(tmp_path, spiffe_id) as w:
        mcp = w.enter(McpServer(tmp_path, dpop=True))
        w.authorization_server([mcp.url], dpop=True)
        mcp.start(w.oidc.issuer)
        agent = w.start_agent(
            server_table("weather", mcp.url),
            policy=tools_rule("tools", spiffe_id, "weather", ["echo"]),
        )
        first_id = w.cg.stat().st_ino
        remove_cgroup(w.cg)
        w.cg.mkdir()
        _, event = wait_managed(agent, w.cg, 2)  # at start, then again
        assert event["cgroup_id"] == w.cg.stat().st_ino != first_id
        out = run_client(mcp.url, 'call:echo:{"text": "again"}', preexec=enter_cgroup(w.cg))
        assert out[0].get("text") == "again", out
        posts = [r for r in mcp.stats()["requests"] if r["method"] == "POST" and r["auth_scheme"]]
        assert posts and {r["auth_scheme"] for r in posts} == {"DPoP"}
        assert mcp.stats()["calls"] == {"echo": 1}
