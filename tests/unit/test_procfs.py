"""/proc parsers over captured samples."""

from __future__ import annotations

import os

import pytest

from agent.attest import procfs
from tests.conftest import TESTDATA


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
