"""The leak check the agent and doctor tests rely on (tests/kernel.programs_left_behind):
it reports a program a stopped process left loaded, and not one that another process on
the host still holds, so those tests can run beside the rest of the suite."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator

import pytest

from tests.kernel import bpf_pin_dir, bpf_program_ids, programs_held_by, programs_left_behind

pytestmark = pytest.mark.kernel

# Loads bpf/doctor.c's connect4 program (it allows every connect, and is attached nowhere),
# pins it at argv[1] if given, prints its id, and holds it until a line comes on stdin.
LOADER = r"""
import re, sys
from bcc import BPF, BPFAttachType
from agent import bpfsys
from agent.bpfload import compile_program
prog = compile_program("doctor")
fn = prog.load_func(b"doctor_connect4", BPF.CGROUP_SOCK_ADDR, None,
                    BPFAttachType.CGROUP_INET4_CONNECT)
if len(sys.argv) > 1:
    bpfsys.obj_pin(fn.fd, sys.argv[1])
info = open(f"/proc/self/fdinfo/{fn.fd}").read()
print(re.search(r"^prog_id:\s+(\d+)", info, re.M).group(1), flush=True)
sys.stdin.readline()
"""


@contextlib.contextmanager
def loaded(*args: str) -> Iterator[tuple[subprocess.Popen[str], int]]:
    """The loader running, and the id of the program it loaded."""
    p = subprocess.Popen(
        [sys.executable, "-c", LOADER, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert p.stdout is not None
        yield p, int(p.stdout.readline())
    finally:
        p.kill()
        p.wait()


def test_a_program_pinned_in_the_processs_own_directory_is_left_behind():
    before = bpf_program_ids()
    with bpf_pin_dir() as pins:
        with loaded(str(pins / "leaked")) as (_, prog_id):
            assert prog_id in programs_held_by()
        # the process is gone; its pin keeps the program loaded: a leak of its own ...
        assert programs_left_behind(before, own_pins=str(pins)) == {prog_id}
        # ... which another's pin, outside the directory of the process under test, is not
        assert prog_id not in programs_left_behind(before, own_pins="/sys/fs/bpf/elsewhere")
        assert prog_id not in programs_left_behind(before)  # a doctor pins nothing
    assert prog_id not in programs_left_behind(before, own_pins=str(pins))  # unpinned: gone


def test_a_program_a_live_process_holds_is_not_left_behind():
    before = bpf_program_ids()
    with loaded() as (_, prog_id):
        assert prog_id in bpf_program_ids()
        assert prog_id not in programs_left_behind(before)
