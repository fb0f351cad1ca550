"""What /proc says about a process, read once per image, and the executable's SHA-256.

/proc answers for whatever process holds a pid *now*; the caller pins the answer to an image
by checking the process start time here and the kernel's image map afterwards
(agent/attest/attestor.py). The executable is hashed through an fd opened on
/proc/<pid>/exe, which names the file the process really runs even if its path has since
been replaced or deleted; hashes are cached by file identity and change time (see
ExeHasher) so an exec storm of one binary hashes it once.
"""

from __future__ import annotations

import hashlib
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from agent.attest.cgroupfs import parse_proc_cgroup

PROC = Path("/proc")
CLK_TCK = os.sysconf("SC_CLK_TCK")
NS_PER_TICK = 1_000_000_000 // CLK_TCK


class ProcessGone(Exception):
    """The pid no longer exists, or is now another process."""


@dataclass(frozen=True)
class ProcStatus:
    name: str
    tgid: int
    ppid: int
    uids: tuple[int, int, int, int]  # real, effective, saved, filesystem
    gids: tuple[int, int, int, int]
    groups: tuple[int, ...]
    cap_eff: int = 0  # the effective capability set (CapEff), as a bit mask


@dataclass(frozen=True)
class ProcInfo:
    exe: str
    sha256: str | None
    exe_dev: int
    exe_ino: int
    status: ProcStatus
    cgroup_path: str | None
    start_ticks: int


def _ids(value: str) -> tuple[int, int, int, int]:
    """A Uid: or Gid: line's value: real, effective, saved and filesystem ids, in that
    order (proc(5)); any other count is a format this parser does not know."""
    real, effective, saved, filesystem = (int(x) for x in value.split())
    return real, effective, saved, filesystem


def parse_status(text: str) -> ProcStatus:
    fields: dict[str, str] = {}
    for line in text.splitlines():
        k, _, v = line.partition(":")
        fields[k] = v.strip()
    try:
        return ProcStatus(
            name=fields.get("Name", ""),
            tgid=int(fields["Tgid"]),
            ppid=int(fields["PPid"]),
            uids=_ids(fields["Uid"]),
            gids=_ids(fields["Gid"]),
            groups=tuple(int(x) for x in fields.get("Groups", "").split()),
            cap_eff=int(fields.get("CapEff", "0"), 16),
        )
    except (KeyError, ValueError) as e:
        raise ValueError(f"unexpected /proc/<pid>/status format: {e}") from None


class ProcIds(NamedTuple):
    """The ids a process's unix selectors are made from, as they are now."""

    real_uid: int
    uid: int  # effective
    real_gid: int
    gid: int  # effective
    groups: tuple[int, ...]  # supplementary


def status_of(pid: int) -> ProcStatus | None:
    """pid's /proc/<pid>/status now; None when it is gone. A caller that must know the
    status is that process's pins pid (a pidfd) and checks it is alive after this read."""
    try:
        return parse_status(Path(f"/proc/{pid}/status").read_text())
    except (OSError, ValueError):
        return None


def current_ids(pid: int) -> ProcIds | None:
    """pid's ids now (uids, gids, supplementary groups); None when it is gone (status_of)."""
    st = status_of(pid)
    if st is None:
        return None
    return ProcIds(st.uids[0], st.uids[1], st.gids[0], st.gids[1], st.groups)


def parse_stat_start_ticks(text: str) -> int:
    """Field 22 (starttime) of /proc/<pid>/stat; comm (field 2) may hold spaces and ')'."""
    rest = text[text.rindex(")") + 2 :].split()
    return int(rest[19])  # fields 3.. start at index 0, so field 22 is index 19


def start_ns_from_ticks(ticks: int) -> int:
    return ticks * NS_PER_TICK


def same_start(start_ns: int, start_ticks: int) -> bool:
    """Does a kernel start time (ns) denote the same process as a /proc starttime (ticks)?"""
    return abs(start_ns // NS_PER_TICK - start_ticks) <= 1


class ExeHasher:
    """SHA-256 of executables, cached by file identity and change time. Thread-safe.

    The cache key is (st_dev, st_ino, st_size, st_mtime_ns, st_ctime_ns). mtime alone is not
    enough: utime(2) lets the file's owner put it back after writing new code of the same
    size over the same inode, and the cached digest of the old code would then vouch for
    the new. ctime cannot be set from user space (utime and every write set it to the
    current time; only root, by moving the clock, could aim it), so a same-size in-place
    overwrite changes the key. On filesystems with multigrain timestamps (Linux 6.13+:
    ext4, xfs, btrfs, tmpfs) the fstat below marks ctime as queried, so the next change
    gets a fresh fine-grained ctime even within one timer tick (seen on this project's
    test kernels); on older kernels two changes within one tick can share a coarse ctime,
    which is also why a file that changes while it is being hashed is not cached at all.

    What is hashed is the file the process runs: the caller passes an fd opened on
    /proc/<pid>/exe, so a path swapped by rename(2) names another inode (another key),
    and the kernel refuses writes to a file mapped for execution (ETXTBSY), so the bytes
    cannot change under a running image. What this cannot see is an overwrite between the
    exec and the hash on kernels that allow writing to a running executable. The inode's
    i_version (the NFSv4 change attribute) would be a stronger key but is not exposed to
    user space (statx's STATX_CHANGE_COOKIE is kernel-internal); the complete answer is a
    digest taken in the kernel at exec (bpf_ima_file_hash() from an LSM program on
    bprm_committed_creds), which needs CONFIG_BPF_LSM and IMA and is not done here.
    """

    def __init__(self, max_entries: int = 4096, max_bytes: int = 512 * 1024 * 1024):
        self._cache: dict[tuple[int, int, int, int, int], str] = {}
        self._lock = threading.Lock()
        self._max_entries = max_entries
        self._max_bytes = max_bytes
        self.hits = 0
        self.misses = 0

    @staticmethod
    def _key(st: os.stat_result) -> tuple[int, int, int, int, int]:
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    def hash_fd(self, fd: int) -> str | None:
        """The digest of the file open at `fd` (read from offset 0), or None when it is too
        large to hash or changed while being hashed (a sha256 selector then never matches)."""
        key = self._key(os.fstat(fd))
        with self._lock:
            cached = self._cache.get(key)
            if cached is not None:
                self.hits += 1
                return cached
        if key[2] > self._max_bytes:
            return None
        h = hashlib.sha256()
        offset = 0
        while chunk := os.pread(fd, 1 << 20, offset):
            h.update(chunk)
            offset += len(chunk)
        if self._key(os.fstat(fd)) != key:
            return None  # written while read: the digest names no version of the file
        digest = h.hexdigest()
        with self._lock:
            self.misses += 1
            if len(self._cache) >= self._max_entries:
                self._cache.pop(next(iter(self._cache)))
            self._cache[key] = digest
        return digest


def read_process(pid: int, start_ns: int | None, hasher: ExeHasher, proc: Path = PROC) -> ProcInfo:
    """Read one process's facts; ProcessGone if it is gone or is not the expected process."""
    base = proc / str(pid)
    try:
        start_ticks = parse_stat_start_ticks((base / "stat").read_text())
        if start_ns is not None and not same_start(start_ns, start_ticks):
            raise ProcessGone(f"pid {pid} is now another process")
        status = parse_status((base / "status").read_text())
        cgroup_path = parse_proc_cgroup((base / "cgroup").read_text())
        exe = os.readlink(base / "exe")
        fd = os.open(base / "exe", os.O_RDONLY | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
            digest = hasher.hash_fd(fd)
        finally:
            os.close(fd)
    except (FileNotFoundError, ProcessLookupError) as e:
        raise ProcessGone(f"pid {pid} exited") from e
    except PermissionError as e:
        # kernel threads have no exe; a process may also have dropped dumpable
        raise ProcessGone(f"pid {pid}: {e.strerror} reading {e.filename}") from e
    # ProcessGone from the start-time check escapes unchanged
    if exe.endswith(" (deleted)"):
        exe = exe[: -len(" (deleted)")]
    # the same check again after reading: the pid may have been reused meanwhile
    try:
        if parse_stat_start_ticks((base / "stat").read_text()) != start_ticks:
            raise ProcessGone(f"pid {pid} was reused while being read")
    except (FileNotFoundError, ProcessLookupError) as e:
        raise ProcessGone(f"pid {pid} exited") from e
    return ProcInfo(
        exe=exe,
        sha256=digest,
        exe_dev=st.st_dev,
        exe_ino=st.st_ino,
        status=status,
        cgroup_path=cgroup_path,
        start_ticks=start_ticks,
    )


def list_pids(proc: Path = PROC) -> list[int]:
    return sorted(int(p.name) for p in proc.iterdir() if p.name.isdigit())
