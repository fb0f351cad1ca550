"""A placeholder file is never written through a mount the workload made.

The agent writes a placeholder file as root, walking from /proc/<pid>/root: in the
workload's own mount namespace. Any unprivileged process can make a user and mount namespace
of its own (unshare -U -r -m, on by default on Debian) and bind-mount a directory it may read
but not write (here a root-owned 0755 directory standing for /etc) onto its entry's
phantom_dir. Before the fix, the agent then created -- or replaced a regular file of root's
there -- a file of the server's name owned by the workload's uid, which the workload (its
owner) could chmod and rewrite: a root-owned host directory held a file the unprivileged
workload controlled. write_placeholder now refuses any process whose mount namespace is not
owned by the agent's user namespace (agent/inject/phantom_write.py).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from agent.inject.phantom_write import Refused, write_placeholder

pytestmark = pytest.mark.kernel  # plays the root agent and an unprivileged workload
NOBODY = 65534


@pytest.fixture
def shared_tmp():
    # pytest's tmp_path is under a 0700 directory nobody cannot cross: a directory of /tmp
    path = Path(tempfile.mkdtemp(prefix="credless-mounts-", dir="/tmp"))
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path)


def workload(argv: list[str]) -> subprocess.Popen:
    """nobody running argv (which prints "ready" once in place, then waits on stdin)."""
    return subprocess.Popen(
        ["setpriv", "--reuid", str(NOBODY), "--regid", str(NOBODY), "--clear-groups", *argv],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )


def write_for(proc: subprocess.Popen, directory: Path) -> str:
    assert proc.stdout.readline() == b"ready\n", "the workload did not get in place"
    pidfd = os.pidfd_open(proc.pid)
    try:
        return write_placeholder(
            "/proc", proc.pid, pidfd, str(directory), "weather", b"placeholder", NOBODY, NOBODY
        )
    finally:
        os.close(pidfd)


def finish(proc: subprocess.Popen) -> None:
    proc.stdin.close()
    proc.wait(timeout=30)


def test_a_bind_mount_the_workload_made_is_not_written_through(shared_tmp):
    host = shared_tmp / "host-etc"  # root's, 0755: the workload can read it, not write it
    host.mkdir(mode=0o755)
    victim = host / "weather"  # a root-owned file that happens to carry the server's name
    victim.write_bytes(b"root's own\n")
    phantom = shared_tmp / "wl" / "phantom"  # the entry's phantom_dir, the workload's own
    phantom.mkdir(parents=True)
    os.chown(phantom, NOBODY, NOBODY)
    proc = workload(
        ["unshare", "-U", "-r", "-m", "sh", "-c", f"mount --bind {host} {phantom} && "
         "echo ready && exec cat"]
    )  # fmt: skip
    try:
        with pytest.raises(Refused, match="mount namespace of its own user namespace"):
            write_for(proc, phantom)
    finally:
        finish(proc)
    # the host's directory, seen from the agent's (the host's) mount namespace
    st = os.stat(victim)
    assert victim.read_bytes() == b"root's own\n" and st.st_uid == 0, (
        f"root's {victim.name} was replaced by a file owned by uid {st.st_uid}"
    )
    assert sorted(p.name for p in host.iterdir()) == ["weather"]


def test_a_workload_in_the_nodes_namespaces_gets_its_file(shared_tmp):
    phantom = shared_tmp / "wl" / "phantom"
    phantom.mkdir(parents=True)
    os.chown(phantom, NOBODY, NOBODY)
    proc = workload(["sh", "-c", "echo ready && exec cat"])
    try:
        shown = write_for(proc, phantom)
    finally:
        finish(proc)
    made = phantom / "weather"
    assert shown == f"{phantom}/weather" and made.read_bytes() == b"placeholder"
    assert (made.stat().st_uid, made.stat().st_mode & 0o777) == (NOBODY, 0o400)
