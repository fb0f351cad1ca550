"""/proc parsers over captured samples."""

from __future__ import annotations

import hashlib
import os

import pytest

from agent.attest import procfs
from tests.conftest import TESTDATA
from tests.helpers import wait_for


def test_parse_status_effective_ids_and_groups():
    st = procfs.parse_status((TESTDATA / "proc/status_nobody.txt").read_text())
    assert st.name == "my sleep" and st.tgid == 4242 and st.ppid == 4200
    assert st.uids == (1000, 65534, 65534, 65534)
    assert st.gids == (1000, 65534, 65534, 65534)
    assert st.groups == (4, 24, 27)


def test_parse_status_rejects_garbage():
    with pytest.raises(ValueError, match="unexpected /proc/<pid>/status format"):
        procfs.parse_status("Name: x\n")


def test_stat_start_time_survives_parentheses_in_comm():
    text = (TESTDATA / "proc/stat_odd_comm.txt").read_text()
    assert procfs.parse_stat_start_ticks(text) == 123456


def test_same_start_tolerates_tick_rounding_only():
    ticks = 123456
    ns = ticks * procfs.NS_PER_TICK + procfs.NS_PER_TICK // 2
    assert procfs.same_start(ns, ticks)
    assert not procfs.same_start(ns + 5 * procfs.NS_PER_TICK, ticks)


def test_read_own_process_and_hash_cache(tmp_path):
    hasher = procfs.ExeHasher()
    info = procfs.read_process(os.getpid(), None, hasher)
    assert info.exe == os.path.realpath("/proc/self/exe")
    assert info.status.tgid == os.getpid()
    again = procfs.read_process(os.getpid(), procfs.start_ns_from_ticks(info.start_ticks), hasher)
    assert again.sha256 == info.sha256 and hasher.hits == 1 and hasher.misses == 1


def test_read_process_detects_another_process_on_the_pid():
    info = procfs.read_process(os.getpid(), None, procfs.ExeHasher())
    wrong_start = procfs.start_ns_from_ticks(info.start_ticks + 1000)
    with pytest.raises(procfs.ProcessGone, match="is now another process"):
        procfs.read_process(os.getpid(), wrong_start, procfs.ExeHasher())


def test_read_missing_process():
    with pytest.raises(procfs.ProcessGone, match="exited"):
        procfs.read_process(2**22 + 7, None, procfs.ExeHasher())


# ------------------------------------------------------------ the executable-hash cache


def _overwrite_same_size(path, st):
    """Issue 15 item 4: new code of the same size written in place, mtime put back."""
    data = path.read_bytes()
    with open(path, "r+b") as f:
        f.write(bytes(b ^ 0xFF for b in data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def _overwrite_same_size_new_mtime(path, st):
    with open(path, "r+b") as f:
        f.write(b"X" * st.st_size)


def _chmod(path, st):
    os.chmod(path, 0o700)  # metadata only: the bytes are the same


def _replace_by_rename(path, st):
    tmp = path.with_name("new")
    tmp.write_bytes(b"Y" * st.st_size)
    os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.rename(tmp, path)


def _append(path, st):
    with open(path, "ab") as f:
        f.write(b"\0")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def _untouched(path, st):
    pass


def clock_after(directory, ns: int) -> bool:
    """Whether the file system's clock is past ns: a fresh change's ctime is later."""
    probe = directory / "clock-probe"
    probe.touch()
    return os.stat(probe).st_ctime_ns > ns


@pytest.mark.parametrize(
    "change, same_inode, rehashed",
    [
        (_untouched, True, False),
        (_overwrite_same_size, True, True),  # the poisoning: dev, ino, mtime, size equal
        (_overwrite_same_size_new_mtime, True, True),
        (_chmod, True, True),  # ctime moved: hashed again (same digest)
        (_replace_by_rename, False, True),
        (_append, True, True),
    ],
    ids=lambda v: v.__name__.strip("_") if callable(v) else None,
)
def test_exe_hash_cache_follows_every_change_to_the_file(tmp_path, change, same_inode, rehashed):
    path = tmp_path / "tool"
    path.write_bytes(os.urandom(4096))
    os.utime(path, ns=(1_600_000_000_000_000_000, 1_600_000_000_000_000_000))
    hasher = procfs.ExeHasher()

    def digest():
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            return hasher.hash_fd(fd)
        finally:
            os.close(fd)

    before = os.stat(path)
    assert digest() == hashlib.sha256(path.read_bytes()).hexdigest()
    # A file's ctime comes from a clock that, without fine-grained timestamps (before Linux
    # 6.13), moves once a tick: a change within the tick of `before` would keep its ctime.
    wait_for(lambda: clock_after(tmp_path, before.st_ctime_ns), 5, interval=0.001)
    change(path, before)
    after = os.stat(path)
    assert (after.st_ino == before.st_ino) == same_inode
    got = digest()
    assert got == hashlib.sha256(path.read_bytes()).hexdigest()
    assert (hasher.hits, hasher.misses) == ((0, 2) if rehashed else (1, 1))


def test_a_file_that_changes_while_hashed_is_not_cached(tmp_path, monkeypatch):
    path = tmp_path / "tool"
    path.write_bytes(b"A" * (3 << 20))
    hasher = procfs.ExeHasher()
    real_pread = os.pread
    writes = []

    def read_then_write(fd, n, offset):
        chunk = real_pread(fd, n, offset)
        if not writes:  # someone writes the file between the hasher's first and last read
            with open(path, "r+b") as f:
                f.write(b"B")
            writes.append(1)
        return chunk

    monkeypatch.setattr(procfs.os, "pread", read_then_write)
    fd = os.open(path, os.O_RDONLY)
    try:
        assert hasher.hash_fd(fd) is None  # no digest of bytes no one can name
    finally:
        os.close(fd)
    monkeypatch.undo()
    fd = os.open(path, os.O_RDONLY)
    try:
        assert hasher.hash_fd(fd) == hashlib.sha256(path.read_bytes()).hexdigest()
    finally:
        os.close(fd)
    assert hasher.hits == 0
