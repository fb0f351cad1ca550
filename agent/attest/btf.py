"""Field offsets of kernel structs, read from the running kernel's BTF.

Why: BCC compiles bpf/*.c against the installed kernel *headers*, and on the hosts credless
targets those headers (Debian 6.1) do not match the running kernel (6.x, often newer, with
its own config). Dereferencing `task->start_boottime` through the headers would silently read
the wrong bytes. The running kernel describes its own layout in /sys/kernel/btf/vmlinux, so
the loader reads the few offsets the programs need from there and passes them in as -D
macros: a small, explicit form of CO-RE for a toolchain (BCC 0.26) that has none.

The parser handles exactly the BTF type encoding of linux/btf.h (kinds 1-19); it walks
anonymous struct/union members, which is where task_struct keeps fields under
randomize_layout. It is written by hand because no maintained Python library parses BTF.
"""

from __future__ import annotations

import functools
import struct
from pathlib import Path
from typing import NamedTuple

VMLINUX = Path("/sys/kernel/btf/vmlinux")

# linux/btf.h kinds
(
    _INT,
    _PTR,
    _ARRAY,
    _STRUCT,
    _UNION,
    _ENUM,
    _FWD,
    _TYPEDEF,
    _VOLATILE,
    _CONST,
    _RESTRICT,
    _FUNC,
    _FUNC_PROTO,
    _VAR,
    _DATASEC,
    _FLOAT,
    _DECL_TAG,
    _TYPE_TAG,
    _ENUM64,
) = range(1, 20)
_MODIFIERS = {_TYPEDEF, _VOLATILE, _CONST, _RESTRICT, _TYPE_TAG}


class BTFError(Exception):
    pass


class _Type(NamedTuple):  # a tuple: thousands are built at every agent start
    kind: int
    name_off: int  # into the string section; decoded only when asked (see _parse)
    size_or_type: int
    members: bytes  # STRUCT/UNION: vlen raw btf_member records (name_off, type, offset)
    kflag: bool


class BTF:
    def __init__(self, data: bytes):
        if len(data) < 24:
            raise BTFError("BTF blob too short")
        (magic,) = struct.unpack_from("<H", data, 0)
        if magic != 0xEB9F:
            raise BTFError("not a little-endian BTF blob (bad magic)")
        _, _, hdr_len, type_off, type_len, str_off, str_len = struct.unpack_from(
            "<BBIIIII", data, 2
        )
        self._strings = data[hdr_len + str_off : hdr_len + str_off + str_len]
        self._types: list[_Type | None] = [None]  # by type id: 0 is void; None, no lookup
        self._structs: dict[str, int] | None = None  # name -> first STRUCT id, on first ask
        self._parse(data[hdr_len + type_off : hdr_len + type_off + type_len])

    @classmethod
    def from_file(cls, path: Path = VMLINUX) -> BTF:
        try:
            return cls(path.read_bytes())
        except OSError as e:
            raise BTFError(
                f"cannot read {path}: {e.strerror}; credless needs a kernel built "
                "with CONFIG_DEBUG_INFO_BTF=y"
            ) from None

    def _str(self, off: int) -> str:
        end = self._strings.index(b"\0", off)
        return self._strings[off:end].decode()

    def _parse(self, blob: bytes) -> None:
        # Runs at every agent start over the whole kernel BTF (some 100,000 types), for the
        # offsets of four fields: names stay offsets and members stay raw bytes until a
        # lookup needs them (decoding every name cost about 0.6 s of CPU per start).
        pos, n = 0, len(blob)
        unpack, types = struct.unpack_from, self._types
        while pos < n:
            name_off, info, size_or_type = unpack("<III", blob, pos)
            pos += 12
            kind = (info >> 24) & 0x1F
            vlen = info & 0xFFFF
            members = b""
            if kind in (_STRUCT, _UNION):
                members = blob[pos : pos + 12 * vlen]
                pos += 12 * vlen
            elif kind in (_INT, _VAR, _DECL_TAG):
                pos += 4
            elif kind == _ARRAY:
                pos += 12
            elif kind in (_ENUM, _FUNC_PROTO):
                pos += 8 * vlen
            elif kind in (_DATASEC, _ENUM64):
                pos += 12 * vlen
            elif kind not in (_PTR, _FWD, _FUNC, _FLOAT) and kind not in _MODIFIERS:
                raise BTFError(f"unknown BTF kind {kind} at type {len(types)}")
            # lookups only walk structs, unions and the modifiers in front of them
            if kind in (_STRUCT, _UNION) or kind in _MODIFIERS:
                types.append(_Type(kind, name_off, size_or_type, members, bool(info >> 31)))
            else:
                types.append(None)
        if pos != n:
            raise BTFError("BTF type section ends inside a type record")

    def struct_id(self, name: str) -> int:
        if self._structs is None:
            self._structs = {}
            for type_id, t in enumerate(self._types):
                if t is not None and t.kind == _STRUCT:
                    self._structs.setdefault(self._str(t.name_off), type_id)
        found = self._structs.get(name)
        if found is None:
            raise BTFError(f"struct {name} not in kernel BTF")
        return found

    def _resolve(self, tid: int) -> int:
        while (t := self._types[tid]) is not None and t.kind in _MODIFIERS:
            tid = t.size_or_type
        return tid

    def _find(self, tid: int, field: str) -> tuple[int, int] | None:
        """(byte offset, member type id) of `field` in struct/union tid, descending anon members."""
        t = self._types[self._resolve(tid)]
        if t is None or t.kind not in (_STRUCT, _UNION):
            return None
        for name_off, mtype, offset in struct.iter_unpack("<III", t.members):
            # with kflag set, the low 24 bits are the bit offset (high 8: bitfield size)
            bit_off = offset & 0xFFFFFF if t.kflag else offset
            name = self._str(name_off)
            if name == field:
                return bit_off // 8, mtype
            if name == "":
                inner = self._find(mtype, field)
                if inner is not None:
                    return bit_off // 8 + inner[0], inner[1]
        return None

    def offset_of(self, struct_name: str, field: str) -> int:
        found = self._find(self.struct_id(struct_name), field)
        if found is None:
            raise BTFError(f"struct {struct_name} has no field {field} in kernel BTF")
        return found[0]

    def path_offset(self, struct_name: str, *fields: str) -> int:
        """The offset of fields[-1], reached through the members before it (each a struct or
        union member of the one before), from the start of struct_name."""
        tid, total = self.struct_id(struct_name), 0
        for i, field in enumerate(fields):
            found = self._find(tid, field)
            if found is None:
                where = ".".join((struct_name, *fields[:i]))
                raise BTFError(f"{where} has no field {field} in kernel BTF")
            total += found[0]
            tid = found[1]
        return total


# Every field a kernel program reads at a BTF offset: (struct, member, member of that...)
# and the macro the offset becomes. All go to every program (a macro nobody uses is free);
# one parse of the kernel's BTF per agent (about a quarter second of CPU), however many
# programs ask.
FIELDS = {
    ("task_struct", "pid"): "TASK_PID_OFF",  # bpf/process_events.c
    ("task_struct", "tgid"): "TASK_TGID_OFF",
    ("task_struct", "real_parent"): "TASK_REAL_PARENT_OFF",
    ("task_struct", "start_boottime"): "TASK_START_BOOTTIME_OFF",
    ("task_struct", "flags"): "TASK_FLAGS_OFF",  # bpf/redirect.c: who writes on a socket
    ("sock", "__sk_common", "skc_cookie"): "SK_COOKIE_OFF",
}
TASK_FIELDS = {path[1]: macro for path, macro in FIELDS.items() if path[0] == "task_struct"}


@functools.cache
def offset_cflags() -> tuple[str, ...]:
    """-D<macro>=<offset> for every FIELDS entry, from the running kernel's BTF."""
    btf = BTF.from_file()
    return tuple(f"-D{macro}={btf.path_offset(*path)}" for path, macro in FIELDS.items())
