"""Kernel-test fixtures that always clean up: throwaway cgroups and workload binaries."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import time
import uuid
from pathlib import Path

from agent.attest import cgroupfs


@contextlib.contextmanager
def cgroup_child(prefix: str = "credless-test"):
    """A fresh cgroup v2 child of the root; its processes are killed and it is removed."""
    root = cgroupfs.cgroup2_root()
    if root is None:
        raise RuntimeError("no cgroup2 mount in /proc/mounts: kernel tests need cgroup v2")
    path = Path(root) / f"{prefix}-{uuid.uuid4().hex[:10]}"
    path.mkdir()
    try:
        yield path
    finally:
        remove_cgroup(path)


def remove_cgroup(path: Path) -> None:
    for _ in range(100):
        pids = (
            [int(p) for p in (path / "cgroup.procs").read_text().split()] if path.exists() else []
        )
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.02)
    for child in sorted(path.glob("*/"), reverse=True):
        if child.is_dir():
            remove_cgroup(child)
    with contextlib.suppress(FileNotFoundError):
        path.rmdir()


def enter_cgroup(path: Path, uid: int | None = None, gid: int | None = None):
    """A preexec_fn: move the child into `path`, then drop to uid/gid with no groups."""
    procs = str(path / "cgroup.procs")

    def preexec() -> None:
        with open(procs, "w") as f:
            f.write("0")
        if gid is not None:
            os.setgroups([])
            os.setgid(gid)
        if uid is not None:
            os.setuid(uid)

    return preexec


@contextlib.contextmanager
def copied_binaries(*names: str):
    """Copies of system binaries in a world-readable temp dir (a distinct sha256 path)."""
    d = Path(tempfile.mkdtemp(prefix="credless-bin-"))
    try:
        os.chmod(d, 0o755)
        out = {}
        for name in names:
            src = shutil.which(name)
            dst = d / f"copied-{name}"
            shutil.copy2(src, dst)
            os.chmod(dst, 0o755)
            out[name] = dst
        yield out
    finally:
        shutil.rmtree(d, ignore_errors=True)


@contextlib.contextmanager
def network_namespace(prefix: str = "credless-test"):
    """A fresh named network namespace with its loopback up, like a pod's; every process in
    it is killed and it is deleted afterwards."""
    import subprocess

    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        for _ in range(100):
            pids = subprocess.run(
                ["ip", "netns", "pids", name], capture_output=True, text=True
            ).stdout.split()
            if not pids:
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
            time.sleep(0.02)
        subprocess.run(["ip", "netns", "del", name], check=False)
