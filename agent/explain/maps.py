"""What the kernel's redirect maps say, read from their pins: `credless explain`'s answer to
"would this connect be intercepted?" is the kernel's, not a restatement of the config.

bpf/redirect.c decides a connect with three maps, pinned under agent.bpf_pin_dir:
`redirect_targets` (the destination), `redirect_config` (all cgroups or managed ones, the
agent's own cgroup, whether the agent is up) and `managed_cgroups` (cgroup ids, matched
against every ancestor of the connecting task's cgroup). This module looks entries up in
them, read-only, with the layouts of bpf/redirect.h; a map pinned with other key or value
sizes (another version's) is reported as unreadable, never misread.
"""

from __future__ import annotations

import contextlib
import ctypes as ct
import ipaddress
import os
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from agent import bpfsys


class MapUnreadable(Exception):
    """A pinned map is missing or has a layout this agent does not know."""


@dataclass(frozen=True)
class RedirectConfig:
    """bpf/redirect.h struct redirect_config, as pinned."""

    enabled: bool
    all_cgroups: bool
    fail_open: bool
    agent_up: bool
    excluded_cgroup: int


_CONFIG = struct.Struct("<8IQ")  # enabled .. pad (u32 each), excluded_cgroup (u64)
_TARGET_KEY = struct.Struct("<2I4I")  # family, port (network order), addr[4]


@contextlib.contextmanager
def _pinned(pin_dir: Path, name: str, sizes: tuple[int, int]) -> Iterator[int]:
    path = pin_dir / name
    if not path.exists():
        raise MapUnreadable(f"{path} is not pinned (no redirect is attached)")
    fd = bpfsys.obj_get(str(path))
    try:
        have = bpfsys.map_sizes(fd)
        if have != sizes:
            raise MapUnreadable(f"{path}: key/value sizes {have}, this agent knows {sizes}")
        yield fd
    finally:
        os.close(fd)


def _lookup(fd: int, key: bytes, size: int) -> bytes | None:
    from bcc import libbcc  # libbcc only where the kernel is asked (agent/wiring.py)

    kbuf = ct.create_string_buffer(key, len(key))
    vbuf = ct.create_string_buffer(size)
    if libbcc.lib.bpf_lookup_elem(fd, kbuf, vbuf):
        return None
    return vbuf.raw


def redirect_config(pin_dir: Path) -> RedirectConfig:
    with _pinned(pin_dir, "redirect_config", (4, _CONFIG.size)) as fd:
        raw = _lookup(fd, struct.pack("<i", 0), _CONFIG.size)
    if raw is None:
        raise MapUnreadable("redirect_config has no entry 0")
    enabled, all_cg, fail_open, up, *_rest, excluded = _CONFIG.unpack(raw)
    return RedirectConfig(bool(enabled), bool(all_cg), bool(fail_open), bool(up), excluded)


MANAGED, PENDING = 1, 2  # bpf/cgroup_watch.h CREDLESS_CG_*: the low byte of the value


def managed_states(pin_dir: Path, cgroup_ids: list[int]) -> dict[int, int]:
    """cgroup id -> MANAGED or PENDING, for those of cgroup_ids in the managed_cgroups map
    (PENDING: a new cgroup the agent has not decided on yet; any other value is managed)."""
    out = {}
    with _pinned(pin_dir, "managed_cgroups", (8, 4)) as fd:
        for i in cgroup_ids:
            raw = _lookup(fd, struct.pack("<Q", i), 4)
            if raw is not None:
                out[i] = PENDING if raw[0] == PENDING else MANAGED
    return out


def _target_key(host: str, port: int) -> bytes:
    ip = ipaddress.ip_address(host.split("%", 1)[0])
    mapped = getattr(ip, "ipv4_mapped", None)
    if mapped is not None:  # keyed as the IPv4 address it is (agent/inject/redirect.py)
        ip = mapped
    packed = ip.packed if ip.version == 6 else ip.packed + bytes(12)
    words = struct.unpack("<4I", packed)
    family = socket.AF_INET if ip.version == 4 else socket.AF_INET6
    return _TARGET_KEY.pack(family, socket.htons(port), *words)


def target_listener(pin_dir: Path, host: str, port: int) -> int | None:
    """The proxy port the kernel sends connects to host:port to (0: the plain listener), or
    None when host:port is not a redirect target."""
    with _pinned(pin_dir, "redirect_targets", (_TARGET_KEY.size, 4)) as fd:
        raw = _lookup(fd, _target_key(host, port), 4)
    if raw is None:
        return None
    return socket.ntohs(struct.unpack("<I", raw)[0] & 0xFFFF)


def ancestor_ids(cgroup_root: str, cgroup_path: str) -> list[tuple[str, int]]:
    """(path, cgroup id) of the cgroup and each ancestor, root first: the ids
    bpf_get_current_ancestor_cgroup_id() walks."""
    parts = [p for p in cgroup_path.split("/") if p]
    out = []
    for depth in range(len(parts) + 1):
        rel = "/" + "/".join(parts[:depth])
        with contextlib.suppress(OSError):  # gone meanwhile: it matches nothing
            out.append((rel, Path(cgroup_root, rel.lstrip("/")).stat().st_ino))
    return out
