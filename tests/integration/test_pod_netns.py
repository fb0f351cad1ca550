"""Workloads in network namespaces of their own (pods, containers) on the real kernel.

The redirect sends an intercepted connect to 127.0.0.1 of the *workload's* namespace, so the
agent must listen inside it (agent/inject/netns.py). Each test makes its own namespaces
(`ip netns add`, loopback only) and removes them; the upstream is on the node's 127.0.0.1,
reached only by the agent.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from agent import config
from tests.helpers import AgentProcess, audit_events, free_port, wait_for
from tests.kernel import cgroup_child, enter_cgroup, network_namespace
from tests.world import passthrough_config

pytestmark = pytest.mark.kernel

# One request on a connection made from a fixed local port (when given).
CLIENT = r"""
import json, os, socket, sys
port, local_port = int(sys.argv[1]), int(sys.argv[2])
s = socket.socket()
if local_port:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", local_port))
try:
    s.connect(("127.0.0.1", port))
except OSError as e:
    print(json.dumps({"error": e.strerror})); sys.exit(0)
body = json.dumps({"pid": os.getpid()}).encode()
s.sendall(b"POST /mcp HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
          b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
data = b""
while chunk := s.recv(65536):
    data += chunk
head, _, rest = data.partition(b"\r\n\r\n")
print(json.dumps({"status": int(head.split()[1]), "body": json.loads(rest), "pid": os.getpid()}))
"""


def agent_config(tmp_path, cg, upstream):
    cfg = passthrough_config(tmp_path, cg, {"up": upstream}, netns_scan_seconds=0.5)
    return config.load(cfg).inject.listen_port, cfg


@pytest.fixture
def agent(tmp_path, upstream):
    with cgroup_child() as cg:
        port, cfg = agent_config(tmp_path, cg, upstream)
        with AgentProcess(cfg, tmp_path) as a:
            a.wait_ready()
            a.cg, a.upstream, a.port = cg, upstream, port
            yield a


def start_client(
    a, netns: str | None, local_port: int = 0, managed: bool = True
) -> subprocess.Popen:
    cmd = [sys.executable, "-c", CLIENT, str(a.upstream), str(local_port)]
    if netns:
        cmd = ["ip", "netns", "exec", netns, *cmd]
    return subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=enter_cgroup(a.cg) if managed else None,
    )


def result(p: subprocess.Popen) -> dict:
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err[-2000:]
    return json.loads(out)


def forwarded_in(events: list[dict]) -> int:
    return [e["event"] for e in events].count("request.forwarded")


def netns_events(a, event: str) -> list[dict]:
    return [e for e in a.log_events() if e.get("event") == event]


def listening_in(netns: str, port: int) -> bool:
    out = subprocess.run(
        ["ip", "netns", "exec", netns, "ss", "-Htln", f"sport = :{port}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return bool(out.strip())


def hold(a, netns: str) -> subprocess.Popen:
    """A long-lived managed process in netns: the pod's first process (its pause container)."""
    return subprocess.Popen(
        ["ip", "netns", "exec", netns, "sleep", "300"], preexec_fn=enter_cgroup(a.cg)
    )


def test_a_pod_with_its_own_network_is_served_inside_it(agent):
    with network_namespace() as ns:
        assert not listening_in(ns, agent.port)
        holder = hold(agent, ns)
        try:
            wait_for(lambda: listening_in(ns, agent.port), 10, what="listener in the netns")
            out = result(start_client(agent, ns))
            assert out["status"] == 200 and out["body"] == {"echo": {"pid": out["pid"]}}
            audit = audit_events(agent.stdout_path, "request.forwarded")
            forwarded = [e for e in audit if e["event"] == "request.forwarded"]
            assert [e["pid"] for e in forwarded] == [out["pid"]]
        finally:
            holder.kill()
            holder.wait()


def scanned(a, witness: str) -> subprocess.Popen:
    """Returns once the agent has scanned /proc since now: a process that joins a managed
    cgroup without exec'ing, in namespace witness, is found by a scan and nothing else.
    The process is returned (killed with the namespace)."""
    late = subprocess.Popen(["ip", "netns", "exec", witness, "sleep", "300"])
    wait_for(lambda: os.readlink(f"/proc/{late.pid}/exe").endswith("/sleep"), 10)
    (a.cg / "cgroup.procs").write_text(str(late.pid))
    wait_for(lambda: listening_in(witness, a.port), 10, what="a scan of /proc")
    return late


def test_an_unmanaged_process_in_a_namespace_gets_no_listener(agent):
    with network_namespace() as ns, network_namespace() as witness:
        holder = subprocess.Popen(["ip", "netns", "exec", ns, "sleep", "300"])  # no cgroup
        late = None
        try:
            out = result(start_client(agent, ns, managed=False))
            # not redirected: its own loopback has nothing on the server's port
            assert out == {"error": "Connection refused"}
            late = scanned(agent, witness)
            assert not listening_in(ns, agent.port)
            # the only namespace listened in is the witness's
            listened = netns_events(agent, "listening in a workload's network namespace")
            assert [e["netns"] for e in listened] == [os.stat(f"/run/netns/{witness}").st_ino]
        finally:
            for p in (holder, late):
                if p is not None:
                    p.kill()
                    p.wait()


def connected(netns: str | None, port: int, local: int) -> bool:
    cmd = ["ss", "-Htn", "state", "established", f"( dport = :{port} and sport = :{local} )"]
    if netns:
        cmd = ["ip", "netns", "exec", netns, *cmd]
    return bool(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip())


def test_the_same_local_port_in_two_namespaces_is_told_apart(agent):
    """Every pod has its own 127.0.0.1: two workloads can connect from 127.0.0.1:P at once.
    The redirect's lookup is keyed by namespace too, so each is served as itself. The agent
    is stopped while both connect (the kernel completes the handshakes), so both records
    exist before it looks either up."""
    local = free_port()
    with network_namespace() as ns:
        holder = hold(agent, ns)
        try:
            wait_for(lambda: listening_in(ns, agent.port), 10, what="listener in the netns")
            os.kill(agent.proc.pid, signal.SIGSTOP)
            try:
                pod = start_client(agent, ns, local_port=local)
                node = start_client(agent, None, local_port=local)
                wait_for(
                    lambda: connected(ns, agent.port, local) and connected(None, agent.port, local),
                    10,
                    what="both connected",
                )
            finally:
                os.kill(agent.proc.pid, signal.SIGCONT)
            outs = [result(pod), result(node)]
            for out in outs:
                assert out["status"] == 200 and out["body"] == {"echo": {"pid": out["pid"]}}
            audit = audit_events(agent.stdout_path, lambda evs: forwarded_in(evs) >= 2)
            forwarded = sorted(e["pid"] for e in audit if e["event"] == "request.forwarded")
            assert forwarded == sorted(o["pid"] for o in outs)
        finally:
            holder.kill()
            holder.wait()


def test_the_listener_goes_with_the_last_managed_process_and_comes_back(agent):
    with network_namespace() as ns:
        holder = hold(agent, ns)
        wait_for(lambda: listening_in(ns, agent.port), 10, what="listener in the netns")
        holder.kill()
        holder.wait()
        # a listener holds its namespace: it must not outlive the pod's processes
        wait_for(lambda: not listening_in(ns, agent.port), 10, what="listener closed")
        assert netns_events(agent, "network namespace left: no managed process in it")
        # a new process's exec is seen at once: its first connect is served
        out = result(start_client(agent, ns))
        if "error" in out:  # raced the event: refused, never sent out unredirected
            assert out == {"error": "Connection refused"}
            out = result(start_client(agent, ns))
        assert out["status"] == 200


def pin_map(path: str, key_size: int, value_size: int) -> None:
    """Pin an LRU hash map of the given sizes at path, as an older agent would have."""
    from agent import bpfsys

    attr = bpfsys._Attr()
    attr.w[0], attr.w[1], attr.w[2], attr.w[3] = 9, key_size, value_size, 16  # LRU_HASH
    fd = bpfsys._bpf(0, attr)  # BPF_MAP_CREATE
    try:
        bpfsys.obj_pin(fd, path)
    finally:
        os.close(fd)


def test_a_redirect_pinned_with_an_older_layout_is_replaced(tmp_path, upstream):
    """An agent before network namespaces pinned local_to_cookie with a 24-byte key. Reused
    as is, the kernel would compare only its first 24 bytes (no namespace) and pods
    connecting from one port would be served as each other: it must be replaced."""
    from pathlib import Path

    from agent import bpfsys

    with cgroup_child() as cg:
        _, cfg = agent_config(tmp_path, cg, upstream)
        pin = Path(config.load(cfg).agent.bpf_pin_dir)
        pin.mkdir(parents=True, exist_ok=True)
        pin_map(str(pin / "local_to_cookie"), 24, 8)
        with AgentProcess(cfg, tmp_path) as a:
            a.wait_ready()
            fd = bpfsys.obj_get(str(pin / "local_to_cookie"))
            try:
                # this agent's key: client and listener address and port, namespace
                assert bpfsys.map_sizes(fd) == (56, 8)
            finally:
                os.close(fd)
            warned = netns_events(a, "pinned redirect maps not reusable; replacing them")
            assert warned and "local_to_cookie" in warned[0]["error"]
