"""The few bpf(2) commands BCC 0.26 does not expose: BPF links; and counter arrays read
from mapped memory (MappedCounters).

Why links: BCC attaches cgroup programs with BPF_PROG_ATTACH, an attachment that outlives
the process that made it. A crashed agent would leave its redirect attached with nobody
listening. A BPF link is owned by a file descriptor: when the agent exits, however it exits,
the kernel detaches the program. (Pinning a link in bpffs is the deliberate opposite, for
restarts that must not interrupt traffic.)
"""

from __future__ import annotations

import ctypes
import mmap
import os
import platform

_SYS_BPF = {"x86_64": 321, "aarch64": 280}[platform.machine()]
BPF_OBJ_PIN, BPF_OBJ_GET, BPF_OBJ_GET_INFO_BY_FD = 6, 7, 15
BPF_LINK_CREATE, BPF_LINK_UPDATE = 28, 29

# enum bpf_attach_type
CGROUP_SOCK_OPS = 3
CGROUP_INET4_CONNECT = 10
CGROUP_INET6_CONNECT = 11

_libc = ctypes.CDLL(None, use_errno=True)


class _Attr(ctypes.Structure):
    _fields_ = [("w", ctypes.c_uint32 * 32)]  # union bpf_attr, zero-padded


def _bpf(cmd: int, attr: _Attr) -> int:
    ret = _libc.syscall(_SYS_BPF, cmd, ctypes.byref(attr), ctypes.sizeof(attr))
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"bpf(cmd={cmd}): {os.strerror(err)}")
    return ret


def _address_words(ptr: int) -> tuple[int, int]:
    """A user-space address as a bpf_attr __aligned_u64 in two 32-bit words, low first
    (both machines above are little-endian)."""
    return ptr & 0xFFFFFFFF, ptr >> 32


def link_create(prog_fd: int, target_fd: int, attach_type: int) -> int:
    """Attach prog to target (a cgroup fd) through a new link; returns the link's fd."""
    attr = _Attr()
    attr.w[0], attr.w[1], attr.w[2], attr.w[3] = prog_fd, target_fd, attach_type, 0
    return _bpf(BPF_LINK_CREATE, attr)


def link_update(link_fd: int, prog_fd: int) -> None:
    """Swap the program behind a link in one step: no event in between sees no program."""
    attr = _Attr()
    attr.w[0], attr.w[1], attr.w[2], attr.w[3] = link_fd, prog_fd, 0, 0
    _bpf(BPF_LINK_UPDATE, attr)


def obj_pin(fd: int, path: str) -> None:
    buf = ctypes.create_string_buffer(path.encode())
    attr = _Attr()
    attr.w[0], attr.w[1] = _address_words(ctypes.addressof(buf))
    attr.w[2] = fd
    _bpf(BPF_OBJ_PIN, attr)


def obj_get(path: str) -> int:
    buf = ctypes.create_string_buffer(path.encode())
    attr = _Attr()
    attr.w[0], attr.w[1] = _address_words(ctypes.addressof(buf))
    return _bpf(BPF_OBJ_GET, attr)


def map_sizes(map_fd: int) -> tuple[int, int]:
    """(key_size, value_size) of a map, as the kernel has it (struct bpf_map_info)."""
    info = (ctypes.c_uint32 * 20)()  # type, id, key_size, value_size, ...
    attr = _Attr()
    attr.w[0], attr.w[1] = map_fd, ctypes.sizeof(info)
    attr.w[2], attr.w[3] = _address_words(ctypes.addressof(info))
    _bpf(BPF_OBJ_GET_INFO_BY_FD, attr)
    return info[2], info[3]


class MappedCounters:
    """A BPF_F_MMAPABLE array of u64 counters, read from the agent's memory without a
    syscall: the proxy asks one per request "has anything changed for this key since I last
    looked?" (bpf/process_events.c image_changes, bpf/redirect.c sender_changes). A key uses
    slot key % slots; keys that share a slot only cost their readers a syscall each."""

    def __init__(self, map_fd: int, slots: int):
        self.slots = slots
        self._map = mmap.mmap(map_fd, slots * 8, mmap.MAP_SHARED, mmap.PROT_READ)
        self._view: memoryview | None = memoryview(self._map).cast("Q")  # u64 slots

    def read(self, key: int) -> int | None:
        """The counter of key's slot; None once closed."""
        view = self._view
        if view is None:
            return None
        try:
            return view[key % self.slots]
        except ValueError:  # released by close() on another thread
            return None

    def close(self) -> None:
        view, self._view = self._view, None
        if view is not None:
            view.release()
        self._map.close()
