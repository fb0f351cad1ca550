"""Loads bpf/redirect.c, attaches it through BPF links, and answers "where was this
accepted connection going, and who opened it?".

The programs attach at the cgroup v2 root, so they see every connect; they only act on
destinations in the target map, made by processes in the managed cgroups (or, with no
managed cgroups configured, in any cgroup but the agent's own). inject.managed_cgroups are
paths and globs that may name cgroups not made yet: agent/inject/cgroup_watch.py keeps the
map of their ids following the cgroup tree (docs/cgroups.md).

The links and maps are pinned under agent.bpf_pin_dir, so the redirect outlives the agent:
while it restarts (or after it crashed) an intercepted connect is still redirected, to a
port where nothing listens, and refused, never sent to the server uninjected and unchecked
by policy (inject.fail_open lets it out instead). A starting agent swaps its programs into
the pinned links in one step (BPF_LINK_UPDATE) and rewrites the maps' configuration.
`credless detach` (or inject.keep_redirect_on_stop = false) removes the redirect.
"""

from __future__ import annotations

import contextlib
import ctypes as ct
import ipaddress
import os
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry

from agent import bpfsys
from agent.attest.btf import offset_cflags
from agent.attest.cgroupfs import process_cgroup
from agent.bpfload import compile_program
from agent.config import InjectSection
from agent.inject import cgroup_watch
from agent.inject.cgroup_match import CgroupMatcher
from agent.observe.logging import AuditLog, get_logger

if TYPE_CHECKING:
    from bcc import BPF

log = get_logger("inject.redirect")

SENDER_CHANGE_SLOTS = 65536  # bpf/redirect.c's default
# bpf/redirect.c's probe of who writes on a connection (a recent tracepoint)
_SENDMSG_TRACEPOINT = Path("/sys/kernel/tracing/events/tcp/tcp_sendmsg_locked")
# bpf/redirect.h CREDLESS_SENDER_*: who else wrote on a connection, as the audit names it
SENDERS = ((1, "another process"), (2, "another uid"), (4, "another cgroup"))
_MAPS = ("redirect_targets", "redirect_config", "managed_cgroups", "redirected", "local_to_cookie")
# pinned link per program: what keeps the redirect attached while no agent runs
_LINKS = {
    b"credless_connect4": "link_connect4",
    b"credless_connect6": "link_connect6",
    b"credless_sockops": "link_sockops",
}
# managed_cgroups' size (bpf/cgroup_watch.h): a map pinned with another is made anew
_MAX_MANAGED = 16384


def detach(pin_dir: str | os.PathLike) -> list[str]:
    """Remove the pinned redirect (links first: that detaches the programs) and its maps;
    returns what was removed. A running agent keeps its own attachment until it stops."""
    removed = []
    for name in [*cgroup_watch.LINKS.values(), *_LINKS.values(), *_MAPS]:
        path = Path(pin_dir) / name
        if path.exists():
            path.unlink()
            removed.append(str(path))
    # the directory the agent made for them goes too, once nothing else is pinned there
    with contextlib.suppress(FileNotFoundError, OSError):
        if removed and not any(Path(pin_dir).iterdir()):
            Path(pin_dir).rmdir()
    return removed


@dataclass(frozen=True)
class Target:
    host: str  # an IP literal (hostnames are resolved by the caller)
    port: int
    listen_port: int = 0  # the proxy listener for this target; 0: the plain one


def compile_flags(pin_dir: Path) -> list[str]:
    """The -D flags bpf/redirect.c is compiled with on the running kernel."""
    flags = [f'-DPIN_DIR="{pin_dir}"', *offset_cflags()]
    if _SENDMSG_TRACEPOINT.is_dir():
        flags.append("-DHAVE_SENDMSG_TRACEPOINT")
    else:
        log.warning(
            "who writes on a redirected connection is not checked: this kernel has no "
            "tcp_sendmsg_locked tracepoint, so a process handed a connection (a child "
            "that inherited it) is served as the process that made it",
            tracepoint=str(_SENDMSG_TRACEPOINT),
        )
    return flags


@dataclass(frozen=True)
class RedirectInfo:
    orig_host: str
    orig_port: int
    tgid: int
    pid: int
    uid: int
    cgroup_id: int
    start_ns: int
    exec_ns: int
    cookie: int
    netns: int = 0  # network namespace cookie of the workload's socket


def _addr_words(host: str) -> tuple[int, list[int]]:
    ip = ipaddress.ip_address(host)
    if ip.version == 4:
        return socket.AF_INET, [int.from_bytes(ip.packed, "little"), 0, 0, 0]
    p = ip.packed
    return socket.AF_INET6, [int.from_bytes(p[i : i + 4], "little") for i in range(0, 16, 4)]


def _unmapped(host: str) -> str:
    """A v4-mapped IPv6 address as the IPv4 address it is (bpf/redirect.c keys those
    connections as IPv4)."""
    ip = ipaddress.ip_address(host.split("%", 1)[0])
    mapped = getattr(ip, "ipv4_mapped", None)
    return str(mapped) if mapped is not None else str(ip)


def spellings(targets: Iterable[Target]) -> dict[tuple[str, int], str]:
    """(address as the kernel records it, port) -> the target's host, where they differ: a
    target named by its v4-mapped address is recorded as IPv4, and the proxy finds its
    server by the address as the target named it."""
    out = {}
    for t in targets:
        kernel = _unmapped(t.host)
        if kernel != t.host:
            out[(kernel, t.port)] = t.host
    return out


def _max_entries(map_fd: int) -> int:
    """A map's max_entries, as the kernel reports it in the fd's fdinfo."""
    for line in Path(f"/proc/self/fdinfo/{map_fd}").read_text().splitlines():
        if line.startswith("max_entries:"):
            return int(line.split()[1])
    return -1


def _net_port(port: int) -> int:
    return socket.htons(port)


class Redirector:
    name = "redirect"

    def __init__(
        self,
        pin_dir: str,
        cgroup_root: str,
        cfg: InjectSection,
        audit: AuditLog | None = None,
        registry: CollectorRegistry | None = None,
    ):
        self.pin_dir = Path(pin_dir)
        self.cgroup_root = cgroup_root
        # where intercepted connects go (listen_*), whose (managed_cgroups), and what
        # happens while no agent runs (fail_open, keep_redirect_on_stop)
        self.cfg = cfg
        self.matcher = CgroupMatcher(cfg.managed_cgroups)
        # keeps managed_cgroups following the patterns (none: every cgroup is managed)
        self.watch = (
            cgroup_watch.CgroupWatch(self.pin_dir, cgroup_root, self.matcher, audit, registry)
            if cfg.managed_cgroups
            else None
        )
        self.took_over = False  # found a pinned redirect of an earlier agent and kept it
        self._stale_targets: list[bytes] = []
        self._bpf: BPF | None = None
        self._owns_program = False  # compiled by start(), not compile_with()'s caller's
        self._senders: bpfsys.MappedCounters | None = None
        self._links: list[int] = []
        self._root_fd = -1
        self.targets: set[Target] = set()
        self._spelled: dict[tuple[str, int], str] = {}

    @property
    def _program(self) -> Any:
        """The loaded program and its maps (a bcc.BPF: BCC ships no types)."""
        if self._bpf is None:
            raise RuntimeError("the redirect program is not loaded (start() first)")
        return self._bpf

    @property
    def attached(self) -> bool:
        """Whether this agent holds the redirect's links (its programs are attached)."""
        return bool(self._links)

    # ------------------------------------------------------------ the kernel object
    def compile_with(self, first: Iterable[str] = (), first_flags: Iterable[str] = ()) -> BPF:
        """Compile the redirect's programs (and the cgroup watcher's) into one BCC object
        after the sources `first`, compiled with first_flags: attestation's process_events,
        so that the agent's kernel programs are one object and one compile (agent/bpfload.py
        says why). The maps an earlier agent pinned are reused (its links use them), or
        replaced when pinned with another layout. The redirect then uses this object, and
        its caller owns it (cleans it up); start() compiles one of its own otherwise."""
        self.pin_dir.mkdir(parents=True, exist_ok=True)
        flags = list(first_flags)
        own = compile_flags(self.pin_dir)
        sources = [*first, "redirect"]
        if self.watch is not None:  # its programs in this object too
            sources.append(cgroup_watch.SOURCE)
            own += self.watch.cflags()
        flags += [f for f in own if f not in flags]
        program: BPF | None = None
        try:
            program = compile_program(*sources, cflags=flags)
            stale = self._layout_mismatch(program)
        except Exception as e:  # noqa: BLE001 — BCC raises bare Exception
            stale = str(e)
        if stale:  # pinned by another version with another layout: anew
            log.warning("pinned redirect maps not reusable; replacing them", error=stale)
            if program is not None:
                program.cleanup()
            for m in _MAPS:
                (self.pin_dir / m).unlink(missing_ok=True)
            program = compile_program(*sources, cflags=flags)
        self._bpf, self._owns_program = program, False
        return program

    # ------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self.pin_dir.mkdir(parents=True, exist_ok=True)
        if not (self.pin_dir / "process_images").exists():
            raise RuntimeError(
                f"{self.pin_dir}/process_images is not pinned: attestation "
                "must start before the redirect"
            )
        if self._bpf is None:  # not compiled with attestation's programs: alone
            self.compile_with()
            self._owns_program = True
        self._senders = bpfsys.MappedCounters(
            self._program[b"sender_changes"].map_fd, SENDER_CHANGE_SLOTS
        )
        self._stale_targets = [bytes(k) for k in self._program[b"redirect_targets"]]
        progs = _programs()
        self._configure()
        self._manage_cgroups()
        self._root_fd = os.open(self.cgroup_root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for name, ptype, expected, attach in progs:
                fn = self._program.load_func(name, ptype, None, expected)
                pin = self.pin_dir / _LINKS[name]
                if pin.exists():
                    fd = bpfsys.obj_get(str(pin))
                    self._links.append(fd)
                    bpfsys.link_update(fd, fn.fd)
                    self.took_over = True
                else:
                    fd = bpfsys.link_create(fn.fd, self._root_fd, attach)
                    self._links.append(fd)
                    bpfsys.obj_pin(fd, str(pin))
        except Exception:
            # never remove a redirect an earlier agent left attached: that would let
            # intercepted connects out while this one cannot start
            self.stop(detach=not self.took_over)
            raise
        log.info(
            "redirect attached",
            cgroup_root=self.cgroup_root,
            took_over=self.took_over,
            pinned=str(self.pin_dir),
            listen=f"{self.cfg.listen_host}:{self.cfg.listen_port}",
            managed=self.cfg.managed_cgroups or "all but the agent's cgroup",
        )

    def _layout_mismatch(self, program: BPF) -> str | None:
        """BCC reuses a pinned map whatever its key and value sizes. A map pinned by an
        agent with other structs (a key without the network namespace, say) would be read
        through the new layout and match the wrong entries: compare, and say how it
        differs."""
        for name in _MAPS:
            table = program[name.encode()]
            want = (ct.sizeof(table.Key), ct.sizeof(table.Leaf))
            have = bpfsys.map_sizes(table.map_fd)
            if have != want:
                return f"{name}: pinned with key/value sizes {have}, this agent's are {want}"
        entries = _max_entries(program[b"managed_cgroups"].map_fd)
        if entries != _MAX_MANAGED:
            return f"managed_cgroups: pinned with {entries} entries, this agent's {_MAX_MANAGED}"
        return None

    def _configure(self) -> None:
        cfg_table = self._program[b"redirect_config"]
        leaf = cfg_table.Leaf()
        leaf.enabled = 1
        leaf.all_cgroups = 0 if self.cfg.managed_cgroups else 1
        leaf.fail_open = 1 if self.cfg.fail_open else 0
        leaf.agent_up = 0
        leaf.listen_ip4 = int.from_bytes(
            ipaddress.IPv4Address(self.cfg.listen_host).packed, "little"
        )
        leaf.listen_port4 = _net_port(self.cfg.listen_port)
        leaf.listen_port6 = _net_port(self.cfg.listen_port6)
        leaf.excluded_cgroup = self._own_cgroup_id()
        cfg_table[ct.c_int(0)] = leaf

    def _manage_cgroups(self, reclaiming: bool = False) -> None:
        """With patterns, the watch keeps their cgroups in managed_cgroups as they come and
        go (started, or after a failed handover put back into the pins); without, every
        cgroup is managed, and an earlier agent's watcher and entries go."""
        if self.watch is not None:
            if reclaiming:
                self.watch.reclaim()
            else:
                self.watch.start(self._program)
            return
        for pin_name in cgroup_watch.LINKS.values():  # an earlier agent's watcher: not needed
            (self.pin_dir / pin_name).unlink(missing_ok=True)
        managed = self._program[b"managed_cgroups"]
        for key in list(managed.keys()):  # an earlier agent's configuration
            del managed[key]

    def _own_cgroup_id(self) -> int:
        path = process_cgroup(os.getpid()) or "/"
        return os.stat(os.path.join(self.cgroup_root, path.lstrip("/"))).st_ino

    def set_agent_up(self, up: bool) -> None:
        table = self._program[b"redirect_config"]
        leaf = table[ct.c_int(0)]
        leaf.agent_up = 1 if up else 0
        table[ct.c_int(0)] = leaf

    def reclaim(self) -> None:
        """Put this agent's programs and configuration back into the pinned links and maps,
        after a new agent that may have swapped its own in failed to take over
        (agent/handover.py): the links run this agent's programs again, with its targets."""
        if not self.attached:
            return
        for link_fd, (name, ptype, expected, _attach) in zip(self._links, _programs(), strict=True):
            bpfsys.link_update(link_fd, self._program.load_func(name, ptype, None, expected).fd)
        self._configure()
        self._manage_cgroups(reclaiming=True)
        # the new agent may have written targets of its own: only this agent's stay
        self._stale_targets = [bytes(k) for k in self._program[b"redirect_targets"]]
        self.set_targets(set(self.targets))
        self.set_agent_up(True)
        log.info("redirect reclaimed", reason="a new agent failed to take over")

    def stop(self, detach: bool | None = None) -> None:
        """Close this agent's hold on the redirect; it stays attached through its pins
        unless detach (default: not inject.keep_redirect_on_stop)."""
        if detach is None:
            detach = not self.cfg.keep_redirect_on_stop
        if detach:
            for name in _LINKS.values():
                (self.pin_dir / name).unlink(missing_ok=True)
        for fd in self._links:
            os.close(fd)  # the last reference to an unpinned link: detaches the program
        self._links.clear()
        if self.watch is not None:
            self.watch.stop(detach)
        if self._root_fd >= 0:
            os.close(self._root_fd)
            self._root_fd = -1
        if self._senders is not None:
            self._senders.close()
            self._senders = None
        if self._bpf is not None and self._owns_program:
            self._bpf.cleanup()  # detaches the sender tracepoint too
        self._bpf = None  # compile_with()'s caller cleans its object up
        if detach:
            for m in _MAPS:
                (self.pin_dir / m).unlink(missing_ok=True)
        else:
            log.info(
                "redirect left attached while no agent runs: intercepted connects are "
                + ("let out" if self.cfg.fail_open else "refused"),
                pinned=str(self.pin_dir),
            )

    # ------------------------------------------------------------ targets
    def set_targets(self, targets: set[Target]) -> None:
        """Intercept exactly these targets (and forget an earlier agent's others). A
        v4-mapped address is keyed as the IPv4 address it is, which is how the kernel looks
        the connect up; two spellings of one address keep the IPv4 one's listener."""
        table = self._program[b"redirect_targets"]
        want: dict[bytes, Target] = {}
        for t in sorted(targets, key=lambda t: (":" in t.host, t.host, t.listen_port)):
            want.setdefault(bytes(self._target_key(table, t)), t)
        held = {bytes(self._target_key(table, t)) for t in self.targets}
        for raw in (held | set(self._stale_targets)) - want.keys():
            with contextlib.suppress(KeyError):
                del table[table.Key.from_buffer_copy(raw)]
        for raw, t in want.items():
            table[table.Key.from_buffer_copy(raw)] = ct.c_uint32(
                _net_port(t.listen_port) if t.listen_port else 0
            )
        self.targets = set(targets)
        self._spelled = spellings(want.values())
        self._stale_targets = []

    @staticmethod
    def _target_key(table, t: Target):
        family, words = _addr_words(_unmapped(t.host))
        key = table.Key()
        key.family = family
        key.port = _net_port(t.port)
        for i, w in enumerate(words):
            key.addr[i] = w
        return key

    # ------------------------------------------------------------ lookups
    def _endpoint_key(self, peer: tuple, local: tuple, netns: int):
        key = self._program[b"local_to_cookie"].Key()
        family, words = _addr_words(_unmapped(peer[0]))
        _, listen_words = _addr_words(_unmapped(local[0]))
        key.family, key.port, key.listen_port, key.netns = family, peer[1], local[1], netns
        for i in range(4):
            key.addr[i], key.listen_addr[i] = words[i], listen_words[i]
        return key

    def lookup(self, peer: tuple, local: tuple, netns: int) -> RedirectInfo | None:
        """The redirect record of an accepted connection, by its 4-tuple (the client's
        address and port, the listener's) and the network namespace (cookie) of the
        listener that accepted it. None: the kernel did not redirect this connection (it
        was dialled directly, or its record went with the socket that made it)."""
        try:
            cookie = self._program[b"local_to_cookie"][self._endpoint_key(peer, local, netns)].value
        except KeyError:
            return None
        try:
            info = self._program[b"redirected"][ct.c_uint64(cookie)]
        except KeyError:
            return None
        if info.netns != netns:  # a record of another namespace's socket: never serve it
            return None
        if info.family == socket.AF_INET:
            host = str(ipaddress.IPv4Address(info.orig_addr[0].to_bytes(4, "little")))
        else:
            host = str(
                ipaddress.IPv6Address(b"".join(w.to_bytes(4, "little") for w in info.orig_addr))
            )
        port = socket.ntohs(info.orig_port & 0xFFFF)
        return RedirectInfo(
            self._spelled.get((host, port), host),  # as the target named it
            port,
            info.tgid,
            info.pid,
            info.uid,
            info.cgroup_id,
            info.start_ns,
            info.exec_ns,
            cookie,
            info.netns,
        )

    def sender_changes(self, cookie: int) -> int | None:
        """The change counter of the connection's slot (bpf/redirect.c sender_changes), from
        mapped memory; read it *before* sender(): while it stays the same, no write by
        another task can have been marked since."""
        senders = self._senders
        return senders.read(cookie) if senders is not None else None

    def sender(self, cookie: int) -> int | None:
        """Who else has written on the connection: CREDLESS_SENDER_* bits (0: only the task
        that connected); None when its record is gone."""
        try:
            return int(self._program[b"redirected"][ct.c_uint64(cookie)].sender)
        except KeyError:
            return None

    def forget(self, peer: tuple, local: tuple, info: RedirectInfo) -> None:
        """Delete a served connection's records (the kernel does too when the client's socket
        closes; this frees them as soon as the proxy is done)."""
        for table, k in (
            (self._program[b"local_to_cookie"], self._endpoint_key(peer, local, info.netns)),
            (self._program[b"redirected"], ct.c_uint64(info.cookie)),
        ):
            with contextlib.suppress(KeyError):
                del table[k]

    def cgroups_status(self) -> dict[str, Any]:
        """inject.managed_cgroups for `credless status`: the patterns, the cgroups they
        match now, and those matching nothing yet (managed when they appear)."""
        if self.watch is None:
            return {"patterns": [], "managed": "every cgroup but the agent's own"}
        return {
            "patterns": self.matcher.patterns,
            "managed": self.watch.managed_paths(),
            "matching_nothing_yet": self.matcher.unmatched(self.cgroup_root),
        }

    def counts(self) -> dict[str, int]:
        if self._bpf is None:
            return {}
        table = self._program[b"redirect_counts"]
        names = ("redirected_v4", "redirected_v6", "unmanaged", "refused_pending_cgroup")
        return {name: table[ct.c_int(i)].value for i, name in enumerate(names)}


def _programs() -> list[tuple[bytes, int, int, int]]:
    """The redirect's programs, in the order of its links: (function name, BCC program
    type, expected attach type, the cgroup attach type its link is made with)."""
    # imported here, not at the top: importing bcc loads libbcc, which the commands that
    # never touch the kernel (check-config, ps) must not need
    from bcc import BPF, BPFAttachType

    return [
        (
            b"credless_connect4",
            BPF.CGROUP_SOCK_ADDR,
            BPFAttachType.CGROUP_INET4_CONNECT,
            bpfsys.CGROUP_INET4_CONNECT,
        ),
        (
            b"credless_connect6",
            BPF.CGROUP_SOCK_ADDR,
            BPFAttachType.CGROUP_INET6_CONNECT,
            bpfsys.CGROUP_INET6_CONNECT,
        ),
        (b"credless_sockops", BPF.SOCK_OPS, -1, bpfsys.CGROUP_SOCK_OPS),
    ]
