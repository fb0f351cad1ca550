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

import struct
from dataclasses import dataclass
from pathlib import Path

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


@dataclass(frozen=True)
class _Type:
    kind: int
    name: str
    size_or_type: int
    members: tuple  # (name, type_id, bit_offset) for STRUCT/UNION
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
        self._types: list[_Type | None] = [None]  # type id 0 is void
        self._by_name: dict[tuple[int, str], int] = {}
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
        pos, n = 0, len(blob)
        while pos < n:
            name_off, info, size_or_type = struct.unpack_from("<III", blob, pos)
            pos += 12
            kind = (info >> 24) & 0x1F
            vlen = info & 0xFFFF
            kflag = bool(info >> 31)
            members: tuple = ()
            if kind in (_STRUCT, _UNION):
                ms = []
                for _ in range(vlen):
                    m_name, m_type, m_off = struct.unpack_from("<III", blob, pos)
                    pos += 12
                    # with kflag set, the low 24 bits are the bit offset (high 8: bitfield size)
                    ms.append((self._str(m_name), m_type, m_off & 0xFFFFFF if kflag else m_off))
                members = tuple(ms)
            elif kind in (_INT, _VAR, _DECL_TAG):
                pos += 4
            elif kind == _ARRAY:
                pos += 12
            elif kind in (_ENUM, _FUNC_PROTO):
                pos += 8 * vlen
            elif kind in (_DATASEC, _ENUM64):
                pos += 12 * vlen
            elif kind not in (_PTR, _FWD, _FUNC, _FLOAT) and kind not in _MODIFIERS:
                raise BTFError(f"unknown BTF kind {kind} at type {len(self._types)}")
            t = _Type(kind, self._str(name_off), size_or_type, members, kflag)
            self._by_name.setdefault((kind, t.name), len(self._types))
            self._types.append(t)

    def struct_id(self, name: str) -> int:
        tid = self._by_name.get((_STRUCT, name))
        if tid is None:
            raise BTFError(f"struct {name} not in kernel BTF")
        return tid

    def _resolve(self, tid: int) -> int:
        while (t := self._types[tid]) is not None and t.kind in _MODIFIERS:
            tid = t.size_or_type
        return tid

    def _find(self, tid: int, field: str) -> tuple[int, int] | None:
        """(byte offset, member type id) of `field` in struct/union tid, descending anon members."""
        t = self._types[self._resolve(tid)]
        if t is None or t.kind not in (_STRUCT, _UNION):
            return None
        for name, mtype, bit_off in t.members:
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


# The task_struct fields bpf/process_events.c reads, and the macro each becomes.
TASK_FIELDS = {
    "pid": "TASK_PID_OFF",
    "tgid": "TASK_TGID_OFF",
    "real_parent": "TASK_REAL_PARENT_OFF",
    "start_boottime": "TASK_START_BOOTTIME_OFF",
}


def task_offset_cflags(btf: BTF | None = None) -> list[str]:
    btf = btf or BTF.from_file()
    return [f"-D{macro}={btf.offset_of('task_struct', f)}" for f, macro in TASK_FIELDS.items()]
