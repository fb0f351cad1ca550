"""Kernel-test fixtures that always clean up: throwaway cgroups and workload binaries; and
the one way a test asks what BPF programs a stopped process left loaded."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from agent.attest import cgroupfs
from tests.helpers import wait_for

REPO = Path(__file__).resolve().parents[1]


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


def kill_all(pids: list[str]) -> bool:
    """SIGKILL each of pids; true when there was none (a wait_for() predicate).

    The test process itself, or the one that started it, among them is a clean-up bug (a
    cgroup or namespace joined by this process, not a child): refused with an error naming
    it, rather than the pytest worker dying with nothing to say why."""
    ours = {os.getpid(), os.getppid()} & {int(p) for p in pids}
    if ours:
        raise AssertionError(f"refusing to SIGKILL the test run's own process {sorted(ours)}")
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), signal.SIGKILL)
    return not pids


def remove_cgroup(path: Path) -> None:
    def emptied() -> bool:
        return not path.exists() or kill_all((path / "cgroup.procs").read_text().split())

    with contextlib.suppress(TimeoutError):  # then rmdir says what is left
        wait_for(emptied, timeout=5, interval=0.02, what=f"{path} emptied")
    for child in sorted(path.glob("*/"), reverse=True):
        if child.is_dir():
            remove_cgroup(child)
    with contextlib.suppress(FileNotFoundError):
        path.rmdir()


def run_python(
    code: str, *args: object, cgroup: Path | None = None, timeout: float = 60, check: bool = True
) -> str:
    """`python -c code args...` as a workload in cgroup (None: unmanaged, not redirected);
    what it printed. It must exit 0, unless check is false."""
    r = subprocess.run(
        [sys.executable, "-c", code, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=enter_cgroup(cgroup) if cgroup else None,
    )
    assert r.returncode == 0 or not check, r.stderr[-2000:]
    return r.stdout


def run_json(argv: list[str], cgroup: Path, timeout: float = 60) -> dict:
    """argv run from the repository's root (importable from anywhere) as a workload in
    cgroup; the JSON object it printed (its stderr's end is the failure otherwise)."""
    r = subprocess.run(
        argv,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=enter_cgroup(cgroup),
    )
    assert r.stdout.startswith("{"), r.stderr[-3000:]
    return json.loads(r.stdout)


def start_workload(argv: list[str], cgroup: Path | None = None) -> subprocess.Popen:
    """argv started from the repository's root as a workload in cgroup (None: unmanaged),
    its stdin, stdout and stderr pipes of text."""
    return subprocess.Popen(
        argv,
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=enter_cgroup(cgroup) if cgroup else None,
    )


def start_python(code: str, *args: object, cgroup: Path | None = None) -> subprocess.Popen:
    """`python -c code args...` started as a workload (start_workload)."""
    return start_workload([sys.executable, "-c", code, *map(str, args)], cgroup)


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
    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield name
    finally:

        def emptied() -> bool:
            ls = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True)
            return kill_all(ls.stdout.split())

        with contextlib.suppress(TimeoutError):  # deleted all the same: it goes with them
            wait_for(emptied, timeout=5, interval=0.02, what=f"network namespace {name} emptied")
        subprocess.run(["ip", "netns", "del", name], check=False)


@contextlib.contextmanager
def bpf_pin_dir(prefix: str = "credless-test") -> Iterator[Path]:
    """A BPF filesystem directory of the caller's own, removed with what was pinned in it."""
    path = Path("/sys/fs/bpf") / f"{prefix}-{uuid.uuid4().hex[:12]}"
    path.mkdir()
    try:
        yield path
    finally:
        for pinned in path.iterdir():
            pinned.unlink()
        path.rmdir()


def bpftool(*command: str) -> list[dict]:
    """`bpftool -j -f COMMAND...` as JSON (-f: with the paths each object is pinned at)."""
    out = subprocess.run(
        ["bpftool", "-j", "-f", *command], capture_output=True, text=True, check=True
    ).stdout
    return json.loads(out or "[]")


def bpf_program_ids() -> set[int]:
    """The id of every BPF program loaded on the host."""
    return {p["id"] for p in bpftool("prog", "show")}


def programs_held_by(pids: set[int] | None = None) -> set[int]:
    """Programs a live process (of pids; None: any) holds a file descriptor of: the program
    itself, or a link to it (a link's fdinfo names its program too)."""
    held = set()
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or (pids is not None and int(pid) not in pids):
            continue
        try:
            for fd in os.listdir(f"/proc/{pid}/fdinfo"):
                m = re.search(
                    r"^prog_id:\s+(\d+)", Path(f"/proc/{pid}/fdinfo/{fd}").read_text(), re.M
                )
                if m:
                    held.add(int(m.group(1)))
        except OSError:  # exited meanwhile
            continue
    return held


def _kept_elsewhere(programs: list[dict], own_pins: str | None) -> set[int]:
    """Of programs (`bpftool prog show`), and of every link and cgroup attachment, those
    something other than the process under test keeps loaded without holding a
    descriptor: a pin (of the program or of a link to it) outside own_pins, or an
    attachment to a cgroup below the root (a container runtime's device filter, a private
    systemd's firewall). The agent pins under its own directory and attaches only at the
    root, so none of its programs is ever counted here."""
    outside = lambda pins: any(  # noqa: E731
        own_pins is None or not p.startswith(own_pins.rstrip("/") + "/") for p in pins
    )
    kept = {p["id"] for p in programs if outside(p.get("pinned", []))}
    kept |= {link["prog_id"] for link in bpftool("link", "show") if outside(link.get("pinned", []))}
    root = cgroupfs.cgroup2_root()
    for cg in bpftool("cgroup", "tree") if root else []:
        if Path(cg.get("cgroup", root)) != Path(root):
            kept |= {p["id"] for p in cg.get("programs", [])}
    return kept


def programs_left_behind(before: set[int], own_pins: str | None = None) -> set[int]:
    """Programs loaded since `before` that nothing but the stopped process under test can
    account for: not held by a live process (agents and doctors of tests running alongside)
    nor kept elsewhere (_kept_elsewhere). A program it leaked is never either, so it stays
    here however often this looks; another's may come and go between looks (a raw
    tracepoint's link frees its program an RCU grace period after its last descriptor
    closes), so this looks again, for up to 5 s, until none is left. Safe beside every other
    test on the host: it needs no host-wide lock."""
    left: set[int] = set()
    for _ in range(20):
        programs = bpftool("prog", "show")  # once a look: its ids, and which are pinned
        loaded = {p["id"] for p in programs}
        left = loaded - before - programs_held_by() - _kept_elsewhere(programs, own_pins)
        if not left:
            break
        time.sleep(0.25)
    return left
