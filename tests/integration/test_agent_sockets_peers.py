"""Who may use the agent's own sockets: the handover socket (the running agent hands its
listening sockets, its tokens and its DPoP keys to the new agent) and the admin socket.

They sit in the agent's run directory, beside the Workload API socket that pods mount
(deploy/k8s/daemonset.yaml, deploy/systemd/credless.service). Both checked only that the
caller was uid 0, and a container's root is uid 0 to SO_PEERCRED, with no capability
needed to open a 0600 socket it owns. Such a process posing as the new agent received every
token and DPoP key on the node, and the proxy's listeners (found by review, stop 33). Now
the caller must also hold CAP_SYS_ADMIN or CAP_BPF, as the agent itself must; and the new
agent checks the same of whoever answers on the handover socket.

The attacker here is a real process: root with every capability dropped (setpriv), as in a
container without privileges. The same program with the capabilities is served (the
control). Needs root.

And a peer that is the new agent but stalls: once offered, it must send `takeover` within
the old agent's deadline, or the old agent takes its redirect back and serves on (a hung
new agent had kept it busy, refusing every later handover, for ever).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent import restart
from agent.handover import HandoverClient, HandoverError, HandoverServer, Offer
from agent.observe.admin import AdminServer
from tests.helpers import wait_for

pytestmark = pytest.mark.kernel

REPO = Path(__file__).resolve().parents[2]
MARKER = "a-token-only-the-new-agent-may-see"

# connects to the handover socket, says hello, prints what came back (never the token)
POSER = r"""
import json, socket, sys
from agent.handover import recv_message, send_message
s = socket.socket(socket.AF_UNIX)
s.settimeout(10)
s.connect(sys.argv[1])
try:
    send_message(s, {"op": "hello", "pid": 0})
    msg, fds = recv_message(s)
except Exception as e:
    print(json.dumps({"refused": type(e).__name__}))
else:
    print(json.dumps({"op": msg.get("op"), "tokens": bool(msg.get("tokens")), "fds": len(fds)}))
"""

# asks the admin socket for its status (a refused caller is answered without being read,
# and the socket closed: its request may meet a closed socket, the answer is there to read)
ADMIN = r"""
import json, socket, sys
s = socket.socket(socket.AF_UNIX)
s.settimeout(10)
s.connect(sys.argv[1])
try:
    s.sendall(b'{"cmd": "status"}\n')
except OSError:
    pass
print(s.makefile().readline().strip())
"""

# serves a handover socket as the running agent would: an offer with one descriptor
FAKE_AGENT = r"""
import os, socket, sys
from agent.handover import recv_message, send_message
srv = socket.socket(socket.AF_UNIX)
srv.bind(sys.argv[1])
srv.listen(1)
print("listening", flush=True)
conn, _ = srv.accept()
recv_message(conn)
fd = os.open("/dev/null", os.O_RDONLY)
send_message(conn, {"op": "offer", "pid": os.getpid(), "listeners": [], "tokens": {}}, [fd])
conn.recv(1)
"""


def as_root(capabilities: bool) -> list[str]:
    """The argv prefix: root as it is, or root with no capability at all (bounding,
    inheritable and ambient sets emptied, so the exec'd program's effective set is empty)."""
    if capabilities:
        return []
    return ["setpriv", "--bounding-set=-all", "--inh-caps=-all", "--ambient-caps=-all"]


def run(capabilities: bool, code: str, *args: str) -> str:
    r = subprocess.run(
        [*as_root(capabilities), sys.executable, "-c", code, *args],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout.strip().splitlines()[-1]


@pytest.fixture
def run_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="credless-peers-"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@contextlib.contextmanager
def handover_server(path: Path, takeover_seconds: float = 60.0) -> Iterator[list[str]]:
    """A running agent's handover side, on its own loop: yields what it did (offered)."""
    did: list[str] = []
    loop = asyncio.new_event_loop()
    pidfile = os.open("/dev/null", os.O_RDONLY)

    def offer() -> Offer:
        did.append("offered")
        return Offer(pidfile_fd=pidfile, listeners=[], tokens={"t": MARKER})

    async def release() -> None:
        did.append("released")

    server = HandoverServer(
        path, offer, release, lambda: None, lambda: did.append("aborted"), takeover_seconds
    )
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        asyncio.run_coroutine_threadsafe(server.start(), loop).result(10)
        yield did
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
        os.close(pidfile)


@pytest.mark.parametrize("capabilities", [True, False], ids=["agent", "container-root"])
def test_only_a_process_with_the_agents_privileges_is_offered_a_handover(run_dir, capabilities):
    with handover_server(run_dir / "handover.sock") as did:
        got = json.loads(run(capabilities, POSER, str(run_dir / "handover.sock")))
    if capabilities:
        assert got == {"op": "offer", "tokens": True, "fds": 1}
        assert did[0] == "offered"  # then aborted: the poser went away
    else:
        assert got["refused"] in ("HandoverError", "BrokenPipeError", "ConnectionResetError")
        assert did == []


def test_a_new_agent_that_never_takes_over_is_given_up_and_the_next_one_is_offered(run_dir):
    path = run_dir / "handover.sock"
    with handover_server(path, takeover_seconds=0.5) as did:
        stalled = HandoverClient(path)
        try:
            pidfile_fd, _, tokens = stalled.offer()
            os.close(pidfile_fd)
            assert tokens == {"t": MARKER}
            wait_for(lambda: did == ["offered", "aborted"], timeout=30, what="the abort")
            with pytest.raises(HandoverError, match="did not confirm the takeover"):
                stalled.take_over(timeout=10)  # too late: the old agent closed its side
        finally:
            stalled.close()
        following = HandoverClient(path)
        try:
            pidfile_fd, _, _ = following.offer()  # not refused as "under way"
            os.close(pidfile_fd)
        finally:
            following.close()
        assert did[:3] == ["offered", "aborted", "offered"]


@pytest.mark.parametrize("capabilities", [True, False], ids=["agent", "container-root"])
def test_only_a_process_with_the_agents_privileges_may_use_the_admin_socket(run_dir, capabilities):
    admin = AdminServer(run_dir / "admin.sock")
    admin.register("status", lambda _req: {"serving": True})
    admin.start()
    try:
        got = json.loads(run(capabilities, ADMIN, str(run_dir / "admin.sock")))
    finally:
        admin.stop()
    if capabilities:
        assert got == {"ok": {"serving": True}}
    else:
        assert got["error"].startswith("permission denied: pid ")
        assert "root without CAP_SYS_ADMIN or CAP_BPF" in got["error"]


@pytest.mark.parametrize("capabilities", [True, False], ids=["agent", "container-root"])
def test_the_new_agent_takes_an_offer_only_from_a_process_with_the_agents_privileges(
    run_dir, capabilities
):
    """A process that could put a socket at the handover path (a pod mounting the run
    directory read-write) would hand the new agent listeners and tokens of its own."""
    path = run_dir / "handover.sock"
    fake = subprocess.Popen(
        [*as_root(capabilities), sys.executable, "-c", FAKE_AGENT, str(path)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert fake.stdout is not None and fake.stdout.readline().strip() == "listening"
        client = HandoverClient(path)
        try:
            if capabilities:
                pidfile_fd, inherited, tokens = client.offer()
                os.close(pidfile_fd)
                assert inherited.main == [] and tokens == {}
            else:
                with pytest.raises(HandoverError) as err:
                    client.offer()
                assert f"{path} is not the running agent's: pid {fake.pid} is root without" in (
                    str(err.value)
                )
        finally:
            client.close()
    finally:
        fake.kill()
        fake.wait()


@pytest.mark.parametrize("capabilities", [True, False], ids=["agent", "container-root"])
def test_a_restart_follows_the_pid_file_only_to_a_process_with_the_agents_privileges(
    run_dir, capabilities
):
    """`credless restart` starts the new agent in the cgroup of the pid the pid file names
    (the cgroup the redirect exempts): a pid file rewritten by a pod that mounts the run
    directory must not move the agent into the pod's cgroup."""
    sleeper = subprocess.Popen([*as_root(capabilities), "sleep", "60"])
    try:
        (run_dir / "credless.pid").write_text(f"{sleeper.pid}\n")
        wait_for(lambda: Path(f"/proc/{sleeper.pid}/exe").resolve().name == "sleep")
        assert restart._old_pid(str(run_dir)) == (sleeper.pid if capabilities else None)
    finally:
        sleeper.kill()
        sleeper.wait()
    assert restart._old_pid(str(run_dir)) is None  # no such process any more
