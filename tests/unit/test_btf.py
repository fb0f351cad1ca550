"""BTF offsets: the hand-written parser must agree with bpftool on the running kernel."""

from __future__ import annotations

import re
import struct
import subprocess

import pytest

from agent.attest.btf import BTF, FIELDS, TASK_FIELDS, BTFError


def _bpftool_offsets(struct_name: str = "task_struct") -> dict[str, int]:
    raw = subprocess.run(
        ["bpftool", "btf", "dump", "file", "/sys/kernel/btf/vmlinux", "format", "raw"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    block = raw.split(f"STRUCT '{struct_name}' size=", 1)[1].split("\n[", 1)[0]
    out = {}
    for name, bits in re.findall(r"'(\w+)' type_id=\d+ bits_offset=(\d+)", block):
        out.setdefault(name, int(bits) // 8)
    return out


def test_task_struct_offsets_match_bpftool():
    ours = BTF.from_file()
    theirs = _bpftool_offsets()
    for field in TASK_FIELDS:
        assert ours.offset_of("task_struct", field) == theirs[field], field


def test_every_program_field_matches_bpftool_through_its_members():
    ours = BTF.from_file()
    for path in FIELDS:
        struct_name, want = path[0], 0
        for field in path[1:]:
            want += _bpftool_offsets(struct_name)[field]
            struct_name = {"__sk_common": "sock_common"}.get(field, struct_name)
        assert ours.path_offset(*path) == want, path
    with pytest.raises(BTFError, match="sock.__sk_common has no field nope"):
        ours.path_offset("sock", "__sk_common", "nope")


def _blob(types: bytes, strings: bytes) -> bytes:
    hdr = struct.pack("<HBBIIIII", 0xEB9F, 1, 0, 24, 0, len(types), len(types), len(strings))
    return hdr + types + strings


def test_anonymous_member_offsets_are_added():
    # strings: 0:"" 1:"int" 5:"outer" 11:"a" 13:"b"
    strings = b"\0int\0outer\0a\0b\0"
    t_int = struct.pack("<III", 1, (1 << 24), 4) + struct.pack("<I", 32)  # id 1
    inner = struct.pack("<III", 0, (4 << 24) | 1, 4) + struct.pack("<III", 13, 1, 0)  # id 2
    outer = (
        struct.pack("<III", 5, (4 << 24) | 2, 16)
        + struct.pack("<III", 11, 1, 0)
        + struct.pack("<III", 0, 2, 64)
    )  # id 3
    btf = BTF(_blob(t_int + inner + outer, strings))
    assert btf.offset_of("outer", "a") == 0
    assert btf.offset_of("outer", "b") == 8


def test_errors_name_what_is_missing():
    btf = BTF.from_file()
    with pytest.raises(BTFError, match="struct task_struct has no field no_such_field"):
        btf.offset_of("task_struct", "no_such_field")
    with pytest.raises(BTFError, match="struct no_such_struct not in kernel BTF"):
        btf.struct_id("no_such_struct")
    with pytest.raises(BTFError, match="bad magic"):
        BTF(b"\0" * 64)


def test_an_anonymous_member_behind_a_typedef_with_bitfield_offsets_is_resolved():
    # strings: 0:"" 1:"int" 5:"outer" 11:"a" 13:"b"
    strings = b"\0int\0outer\0a\0b\0"
    t_int = struct.pack("<III", 1, (1 << 24), 4) + struct.pack("<I", 32)  # id 1
    inner = struct.pack("<III", 0, (5 << 24) | 1, 4) + struct.pack("<III", 13, 1, 0)  # id 2
    typedef = struct.pack("<III", 0, (8 << 24), 2)  # id 3: an unnamed typedef of 2
    # kflag: each member's offset keeps its bitfield size in the top 8 bits
    outer = (
        struct.pack("<III", 5, (1 << 31) | (4 << 24) | 2, 16)
        + struct.pack("<III", 11, 1, (5 << 24) | 32)
        + struct.pack("<III", 0, 3, 96)
    )  # id 4
    btf = BTF(_blob(t_int + inner + typedef + outer, strings))
    assert btf.offset_of("outer", "a") == 4
    assert btf.offset_of("outer", "b") == 12


def test_a_type_section_cut_inside_a_record_is_refused():
    strings = b"\0outer\0a\0"
    outer = struct.pack("<III", 1, (4 << 24) | 2, 8) + struct.pack("<III", 7, 0, 0)  # 1 of 2
    with pytest.raises(BTFError, match="ends inside a type record"):
        BTF(_blob(outer, strings))
