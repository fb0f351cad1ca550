"""The DaemonSet's image on a real container runtime (podman + runc), on the real kernel.

The agent runs from the image built by deploy/k8s/build-image.sh (deploy/k8s/Containerfile)
with what deploy/k8s/daemonset.yaml gives it: the pod's host namespaces, the container's
securityContext, volumes and mounts, args and memory limit are read from the manifest here
and translated to `podman run` options (tests/container/podman.py), so the manifest cannot
change without this test running the change. Its configuration is the ConfigMap's
credless.toml with the test's ports, pins and servers. A workload in another container,
holding no credential, calls an MCP server on 127.0.0.1 that demands tokens; the agent
attests it by its real container id (`container:id:<64 hex>`, the only selector of the only
registration entry), obtains a token and injects it. A second container in the same managed
cgroup, not registered, gets nothing.

Both containers use the host's network namespace: the agent's as the DaemonSet's
hostNetwork, the workload's like a hostNetwork pod's (or a node process), so the MCP server
and authorization server on the host's loopback are reachable without bridge networking
(netavark, iptables) on the host. Pod network namespaces are tested without a runtime in
test_pod_netns.py. docs/container.md says what this proves and what only a cluster shows.
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import Iterator

import pytest

from tests.container.podman import (
    AgentContainer,
    Podman,
    build_image,
    daemonset_config,
    leftovers,
    load_yaml,
    pod_run_args,
    remove_cgroup_everywhere,
)
from tests.helpers import audit_events, free_port, http_get
from tests.mcp.peers import McpServer
from tests.world import build_world, entry_table, server_table, tools_rule

# Every name, cgroup, port and pin is the module world's own: on a worker each (if xdist
# does not keep the module on one), the worlds do not meet; the build script serializes
# the image builds.
pytestmark = [pytest.mark.kernel, pytest.mark.timeout(1200)]
SPIFFE_ID = "spiffe://example.org/container/weather-bot"

# The workload: the image's own Python, standard library only, no credential of any kind.
# One MCP session (initialize, initialized, tools/call echo) over streamable HTTP; prints
# one JSON line: each request's HTTP status and the echo's text.
CLIENT = r"""
import json, sys, urllib.error, urllib.request
url, session, version, out = sys.argv[1], None, "2025-06-18", {"status": []}
def post(msg):
    global session
    h = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream",
         "MCP-Protocol-Version": version}
    if session:
        h["Mcp-Session-Id"] = session
    try:
        with urllib.request.urlopen(urllib.request.Request(url, json.dumps(msg).encode(), h),
                                    timeout=60) as r:
            out["status"].append(r.status)
            session = r.headers.get("mcp-session-id") or session
            body = r.read().decode()
    except urllib.error.HTTPError as e:
        out["status"].append(e.code)
        return None
    data = [ln[5:] for ln in body.splitlines() if ln.startswith("data:")]
    return json.loads(data[0] if data else body) if "id" in msg else None
init = post({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
    "protocolVersion": version, "capabilities": {},
    "clientInfo": {"name": "container-workload", "version": "1"}}})
if init:
    version = init["result"]["protocolVersion"]
    post({"jsonrpc": "2.0", "method": "notifications/initialized"})
    res = post({"jsonrpc": "2.0", "id": 2, "method": "tools/call",
                "params": {"name": "echo", "arguments": {"text": "from a container"}}})
    out["echo"] = res["result"]["content"][0]["text"] if res and "result" in res else None
print(json.dumps(out), flush=True)
"""


def timed(timings: dict[str, float], step: str, since: float) -> None:
    timings[step] = round(time.monotonic() - since, 1)


@pytest.fixture(scope="module")
def image() -> Iterator[str]:
    """The agent image, built (or found current in podman's cache) by the build script."""
    start = time.monotonic()
    name, log = build_image()
    print(f"\n{log}container timing: image ready in {time.monotonic() - start:.1f}s")
    yield name


@pytest.fixture(scope="module")
def world(image: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """The MCP server and oidc-provider on the host, two created (not started) workload
    containers in a fresh managed cgroup, and the agent container attesting the first."""
    tmp = tmp_path_factory.mktemp("container")
    podman = Podman()
    timings: dict[str, float] = {}
    with build_world(tmp, SPIFFE_ID) as w, contextlib.ExitStack() as stack:
        cg_name = w.cg.name
        # podman (cgroupfs manager) makes the parent in every hierarchy, v1 ones included,
        # and leaves conmon's sub-group there: all removed, whatever happens
        stack.callback(remove_cgroup_everywhere, w.cg.name)
        stack.callback(podman.remove_all)
        mcp = w.enter(McpServer(tmp, dpop=True))
        w.authorization_server([mcp.url], dpop=True)
        mcp.start(w.oidc.issuer)

        def workload(role: str) -> str:
            return podman.create(
                image,
                f"credless-test-{role}-{uuid.uuid4().hex[:8]}",
                "--network=host",
                f"--cgroup-parent=/{w.cg.name}",
                "--user=65534:65534",
                "--read-only",
                "--entrypoint=python3",
                args=["-c", CLIENT, mcp.url],
            )

        registered, stranger = workload("workload"), workload("stranger")
        entries = entry_table("by-container-id", SPIFFE_ID, [f"container:id:{registered}"])
        policy = tools_rule("container-tools", SPIFFE_ID, "weather", ["echo"])
        config = daemonset_config(
            proxy_port=w.proxy_port,
            managed_cgroup=f"/{w.cg.name}",
            bundle_port=w.bundle_port,
            metrics_port=free_port(),
            pin_name=f"credless-test-ctr-{uuid.uuid4().hex[:10]}",
            servers=server_table("weather", mcp.url),
        )
        start = time.monotonic()
        agent = stack.enter_context(
            AgentContainer(
                podman, image, tmp, config, {"entries.toml": entries, "policy.toml": policy}
            )
        )
        agent.wait_ready()
        timed(timings, "agent start to ready", start)
        yield {
            "mcp": mcp,
            "agent": agent,
            "podman": podman,
            "registered": registered,
            "stranger": stranger,
            "cg": w.cg.name,
            "timings": timings,
        }
        start = time.monotonic()
    timed(timings, "teardown", start)
    print(f"\ncontainer timing: {json.dumps(timings)}")
    left = leftovers(podman.names, cg_name, agent.pin_dir)
    assert not left, f"left behind: {left}"


def run_workload(world: dict, cid: str, step: str) -> dict:
    start = time.monotonic()
    r = world["podman"].start_attached(cid)
    timed(world["timings"], step, start)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    assert lines, f"workload printed nothing (exit {r.returncode}): {r.stderr[-2000:]}"
    return json.loads(lines[-1])


def test_the_image_agent_runs_as_the_daemonset_runs_it(world):
    agent = world["agent"]
    inspect = world["podman"].inspect(agent.name)
    host = inspect["HostConfig"]
    assert host["Privileged"] and host["PidMode"] == "host" and host["NetworkMode"] == "host"
    assert host["ReadonlyRootfs"] and host["CgroupMode"] == "host"
    # the startupProbe's endpoint answers where the manifest's probes look (loopback)
    status, _ = http_get(f"http://127.0.0.1:{agent.metrics_port}{agent.probe_path}")
    assert status == 200
    # the agent's own cgroup, as the kernel sees it, is the container's: what the redirect
    # must exempt so that the agent's upstream connections are not looped back to itself
    own = agent.cgroup()
    assert own.endswith(f"/libpod-{inspect['Id']}"), own


def test_a_credential_less_container_is_attested_by_its_container_id(world):
    out = run_workload(world, world["registered"], "registered workload run")
    assert out["status"][0] == 200 and out.get("echo") == "from a container", out
    stats = world["mcp"].stats()
    assert stats["calls"] == {"echo": 1}
    credentialed = [r for r in stats["requests"] if r["auth_scheme"]]
    assert credentialed and {r["auth_scheme"] for r in credentialed} == {"DPoP"}
    events = audit_events(
        world["agent"].stdout_path,
        lambda evs: [e["event"] for e in evs].count("request.injected") >= len(credentialed),
    )
    injected = [e for e in events if e["event"] == "request.injected"]
    # the agent's audit names the container (its cgroup is libpod-<id>) and the identity its
    # container-id entry gave it; the tokens it injected are the ones the server saw
    container_cgroup = f"/{world['cg']}/libpod-{world['registered']}"
    assert injected and all(e["cgroup"] == container_cgroup for e in injected), injected
    assert all(e["spiffe_id"] == SPIFFE_ID for e in injected)
    assert {e["token_sha256"] for e in injected} == {r["token_sha256"] for r in credentialed}


def test_an_unregistered_container_in_the_managed_cgroup_is_refused(world):
    """The same image, cgroup parent and user, another container id: the agent attests it,
    finds no entry and answers 403 itself (fails closed); the server never sees it."""
    before = len(world["mcp"].relayed())
    out = run_workload(world, world["stranger"], "unregistered workload run")
    assert out["status"] == [403] and "echo" not in out, out
    assert len(world["mcp"].relayed()) == before
    stranger_cgroup = f"/{world['cg']}/libpod-{world['stranger']}"

    def refused(events: list[dict]) -> set[str]:
        return {e["event"] for e in events if e.get("cgroup") == stranger_cgroup}

    events = audit_events(
        world["agent"].stdout_path,
        lambda evs: {"identity.denied", "request.denied"} <= refused(evs),
    )
    assert refused(events) == {"identity.denied", "request.denied"}


@pytest.mark.parametrize(
    "change",
    [
        lambda pod, c: pod.update(hostIPC=True),
        lambda pod, c: c.update(lifecycle={"preStop": {"exec": {"command": ["true"]}}}),
        lambda pod, c: c["securityContext"].update(seccompProfile={"type": "RuntimeDefault"}),
        lambda pod, c: c["volumeMounts"][0].update(subPath="credless.toml"),
        lambda pod, c: (
            pod["volumes"].append({"name": "x", "secret": {"secretName": "x"}})
            or c["volumeMounts"].append({"name": "x", "mountPath": "/x"})
        ),
    ],
    ids=["hostIPC", "lifecycle", "seccompProfile", "subPath", "secret-volume"],
)
def test_a_manifest_change_the_test_cannot_reproduce_fails_it(change, tmp_path):
    """The translation refuses what it does not know, so a change to daemonset.yaml is
    either run by the container test or makes it fail; never silently left out."""
    manifest = load_yaml("daemonset.yaml")
    sources = {v: tmp_path for v in ("config", "run", "state", "tmp")}
    pod_run_args(manifest, sources)  # the manifest as it is translates
    pod = manifest["spec"]["template"]["spec"]
    change(pod, pod["containers"][0])
    with pytest.raises(ValueError):
        pod_run_args(manifest, sources)
