"""The redirect's user-space half (agent/inject/redirect.py), found by mutation testing: what
it writes into bpf/redirect.c's maps, which pinned maps and links it takes over or replaces,
how it answers "where was this connection going, and who opened it?", and what it leaves
pinned when it stops.

BCC cannot load a program here (no root, no kernel): its objects are stood in for at the
narrowest seam. `compile_program` returns a FakeBPF whose tables have BCC's interface
(ctypes Key and Leaf classes laid out as bpf/redirect.h declares them, item access that
copies, KeyError for a missing key, iteration over keys); the bpf(2) link and pin calls of
agent/bpfsys.py record what they were asked and pin a file where bpffs would; the link fds
are pipes, so a closed link is seen as its reader's end of file; sender_changes is a real
file mapped as the kernel's BPF_F_MMAPABLE array would be."""

from __future__ import annotations

import ctypes as ct
import errno
import ipaddress
import os
import socket
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar

import pytest
import structlog.testing
from bcc import BPF as BCC
from bcc import BPFAttachType

from agent import bpfsys
from agent.config import InjectSection
from agent.inject import cgroup_watch, redirect
from agent.inject.proxy import Proxy
from agent.inject.redirect import SENDER_CHANGE_SLOTS, RedirectInfo, Redirector, Target
from tests.unit.bcc_tables import Table


# -- bpf/redirect.h, as BCC's ctypes classes lay it out
class TargetKey(ct.Structure):  # struct redirect_target
    _fields_ = [("family", ct.c_uint32), ("port", ct.c_uint32), ("addr", ct.c_uint32 * 4)]


class Config(ct.Structure):  # struct redirect_config
    _fields_ = [
        ("enabled", ct.c_uint32),
        ("all_cgroups", ct.c_uint32),
        ("fail_open", ct.c_uint32),
        ("agent_up", ct.c_uint32),
        ("listen_ip4", ct.c_uint32),
        ("listen_port4", ct.c_uint32),
        ("listen_port6", ct.c_uint32),
        ("pad", ct.c_uint32),
        ("excluded_cgroup", ct.c_uint64),
    ]


class Info(ct.Structure):  # struct redirect_info
    _fields_ = [
        ("orig_addr", ct.c_uint32 * 4),
        ("orig_port", ct.c_uint32),
        ("family", ct.c_uint32),
        ("tgid", ct.c_uint32),
        ("pid", ct.c_uint32),
        ("uid", ct.c_uint32),
        ("sender", ct.c_uint32),
        ("cgroup_id", ct.c_uint64),
        ("start_ns", ct.c_uint64),
        ("exec_ns", ct.c_uint64),
        ("netns", ct.c_uint64),
    ]


class Endpoint(ct.Structure):  # struct local_endpoint
    _fields_ = [
        ("family", ct.c_uint32),
        ("port", ct.c_uint32),
        ("addr", ct.c_uint32 * 4),
        ("listen_port", ct.c_uint32),
        ("listen_addr", ct.c_uint32 * 4),
        ("pad", ct.c_uint32),
        ("netns", ct.c_uint64),
    ]


class FakeBPF:
    """bcc.BPF as the redirect uses it: its tables by name, its programs by name."""

    PROGRAM_FDS: ClassVar[dict[bytes, int]] = {
        b"credless_connect4": 41,
        b"credless_connect6": 42,
        b"credless_sockops": 43,
    }

    def __init__(self, senders_fd: int):
        self.tables = {
            b"redirect_targets": Table(TargetKey, ct.c_uint32, 101),
            b"redirect_config": Table(ct.c_int, Config, 102, size=1),
            b"managed_cgroups": Table(ct.c_uint64, ct.c_uint32, 103),
            b"redirected": Table(ct.c_uint64, Info, 104),
            b"local_to_cookie": Table(Endpoint, ct.c_uint64, 105),
            b"redirect_counts": Table(ct.c_int, ct.c_uint64, 106, size=4),
            b"sender_changes": Table(ct.c_uint32, ct.c_uint64, senders_fd),
        }
        self.loaded: list[tuple[bytes, int, Any, int]] = []
        self.cleaned = 0

    def __getitem__(self, name: bytes) -> Table:
        assert isinstance(name, bytes)  # BCC's table names are bytes
        return self.tables[name]

    def load_func(self, name: bytes, ptype: int, device: Any, expected: int) -> Any:
        self.loaded.append((name, ptype, device, expected))
        return SimpleNamespace(fd=self.PROGRAM_FDS[name])

    def cleanup(self) -> None:
        self.cleaned += 1


V4, V6 = socket.AF_INET, socket.AF_INET6
PROGRAMS = [  # the kernel's contract: each program's type and attach point
    (b"credless_connect4", BCC.CGROUP_SOCK_ADDR, BPFAttachType.CGROUP_INET4_CONNECT),
    (b"credless_connect6", BCC.CGROUP_SOCK_ADDR, BPFAttachType.CGROUP_INET6_CONNECT),
    (b"credless_sockops", BCC.SOCK_OPS, -1),
]
LINK_ATTACH = {
    b"credless_connect4": bpfsys.CGROUP_INET4_CONNECT,
    b"credless_connect6": bpfsys.CGROUP_INET6_CONNECT,
    b"credless_sockops": bpfsys.CGROUP_SOCK_OPS,
}
LINK_PINS = {"link_connect4", "link_connect6", "link_sockops"}
MAP_PINS = {
    "redirect_targets",
    "redirect_config",
    "managed_cgroups",
    "redirected",
    "local_to_cookie",
}
OWN_CGROUP = "/system.slice/credless.service"


def fdinfo(max_entries: int) -> str:
    """/proc/self/fdinfo of a BPF map fd, as the kernel writes it."""
    return (
        "pos:\t0\nflags:\t02000002\nmnt_id:\t15\nino:\t2077\nmap_type:\t1\nkey_size:\t8\n"
        f"value_size:\t4\nmax_entries:\t{max_entries}\nmap_flags:\t0x0\nmap_extra:\t0x0\n"
        "memlock:\t1318912\nmap_id:\t38\nfrozen:\t0\n"
    )


class Kernel:
    """What the bpf(2) calls and BCC would do, recorded."""

    def __init__(self, tmp: Path, monkeypatch: pytest.MonkeyPatch):
        self.tmp = tmp
        self.pins = tmp / "pins"
        self.pins.mkdir()
        (self.pins / "process_images").touch()  # attestation has started
        self.cgroups = tmp / "cgroup"
        (self.cgroups / OWN_CGROUP.lstrip("/")).mkdir(parents=True)
        self.own_cgroup_id = os.stat(self.cgroups / OWN_CGROUP.lstrip("/")).st_ino
        senders = tmp / "sender_changes"
        senders.write_bytes(bytes(SENDER_CHANGE_SLOTS * 8))
        self.senders_fd = os.open(senders, os.O_RDWR)
        self.compiles: list[tuple[tuple[str, ...], list[str]]] = []
        self.pinned_at_compile: list[set[str]] = []
        self.programs: list[FakeBPF] = []
        self.compile_errors: list[Exception] = []
        self.sizes: dict[int, tuple[int, int]] = {}  # map fd -> sizes it was pinned with
        self.max_entries = 16384
        self.calls: list[tuple] = []
        self.readers: dict[int, int] = {}  # link fd -> the read end of its pipe
        self.pinned_links: dict[str, int] = {}  # an earlier agent's links: path -> fd
        self.fail_link: bytes | None = None
        self.root_inos: list[int] = []
        self.fdinfo = tmp / "fdinfo"
        self.fdinfo.mkdir()
        real_path = Path

        def path(p: Any, *more: Any) -> Path:
            s = str(p)
            if s.startswith("/proc/self/fdinfo/"):
                return real_path(self.fdinfo, s.rsplit("/", 1)[1])
            return real_path(p, *more)

        monkeypatch.setattr(redirect, "Path", path)
        monkeypatch.setattr(redirect, "compile_program", self.compile)
        monkeypatch.setattr(redirect, "offset_cflags", lambda: ("-DSK_COOKIE_OFF=8", "-DX=9"))
        monkeypatch.setattr(redirect, "_SENDMSG_TRACEPOINT", tmp / "tcp_sendmsg_locked")
        monkeypatch.setattr(redirect, "process_cgroup", lambda pid: OWN_CGROUP)
        monkeypatch.setattr(bpfsys, "map_sizes", self.map_sizes)
        monkeypatch.setattr(bpfsys, "obj_get", self.obj_get)
        monkeypatch.setattr(bpfsys, "obj_pin", self.obj_pin)
        monkeypatch.setattr(bpfsys, "link_create", self.link_create)
        monkeypatch.setattr(bpfsys, "link_update", self.link_update)

    def compile(self, *names: str, cflags: list[str]) -> FakeBPF:
        self.compiles.append((names, list(cflags)))
        self.pinned_at_compile.append(self.pinned())
        if self.compile_errors:
            raise self.compile_errors.pop(0)
        bpf = FakeBPF(self.senders_fd)
        for table in bpf.tables.values():
            (self.fdinfo / str(table.map_fd)).write_text(fdinfo(self.max_entries))
        self.programs.append(bpf)
        return bpf

    def map_sizes(self, fd: int) -> tuple[int, int]:
        for table in self.programs[-1].tables.values():
            if table.map_fd == fd:
                return self.sizes.get(fd, (ct.sizeof(table.Key), ct.sizeof(table.Leaf)))
        raise AssertionError(f"no map fd {fd}")

    def _link(self) -> int:
        r, w = os.pipe()
        self.readers[w] = r
        return w

    def link_create(self, prog_fd: int, target_fd: int, attach: int) -> int:
        self.root_inos.append(os.fstat(target_fd).st_ino)
        name = next(n for n, fd in FakeBPF.PROGRAM_FDS.items() if fd == prog_fd)
        if name == self.fail_link:
            raise OSError(1, "bpf(cmd=28): Operation not permitted")
        fd = self._link()
        self.calls.append(("create", name, attach, fd))
        return fd

    def link_update(self, link_fd: int, prog_fd: int) -> None:
        name = next(n for n, fd in FakeBPF.PROGRAM_FDS.items() if fd == prog_fd)
        if name == self.fail_link:
            raise OSError(1, "bpf(cmd=29): Operation not permitted")
        self.calls.append(("update", name, link_fd))

    def obj_pin(self, fd: int, path: str) -> None:
        Path(path).touch()
        self.calls.append(("pin", fd, Path(path).name))

    def obj_get(self, path: str) -> int:
        self.calls.append(("get", Path(path).name))
        return self.pinned_links[path]

    def earlier_agent(self) -> None:
        """An earlier agent's redirect, pinned: its links and maps."""
        for name in LINK_PINS | MAP_PINS:
            (self.pins / name).touch()
        for name in LINK_PINS:
            self.pinned_links[str(self.pins / name)] = self._link()

    def closed(self, link_fd: int) -> bool:
        """Whether the link's fd was closed (its pipe's reader sees the end)."""
        os.set_blocking(self.readers[link_fd], False)
        try:
            return os.read(self.readers[link_fd], 1) == b""
        except BlockingIOError:
            return False

    def pinned(self) -> set[str]:
        return {p.name for p in self.pins.iterdir()}

    def config(self) -> Config:
        return self.programs[-1].tables[b"redirect_config"][ct.c_int(0)]


@pytest.fixture
def kernel(tmp_path, monkeypatch):
    k = Kernel(tmp_path, monkeypatch)
    yield k
    for fd in [k.senders_fd, *k.readers.values(), *k.readers]:
        try:
            os.close(fd)
        except OSError:
            pass


class FakeWatch:
    """agent/inject/cgroup_watch.CgroupWatch, recorded."""

    made: ClassVar[list[FakeWatch]] = []

    def __init__(self, pin_dir, cgroup_root, matcher, audit=None, registry=None):
        self.args = (pin_dir, cgroup_root, matcher, audit, registry)
        self.events: list[Any] = []
        FakeWatch.made.append(self)

    def cflags(self) -> list[str]:
        return ["-DWATCH_LEVELS=2ULL", "-DTP_ID_OFF=16"]

    def start(self, program: Any) -> None:
        self.events.append(("start", program))

    def reclaim(self) -> None:
        self.events.append("reclaim")

    def stop(self, detach: bool) -> None:
        self.events.append(("stop", detach))

    def managed_paths(self) -> list[str]:
        return ["/a/b"]


def redirector(kernel: Kernel, **settings: Any) -> Redirector:
    return Redirector(str(kernel.pins), str(kernel.cgroups), InjectSection(**settings))


def started(kernel: Kernel, **settings: Any) -> Redirector:
    r = redirector(kernel, **settings)
    r.start()
    return r


# ------------------------------------------------------------------ compile flags


def test_the_program_is_compiled_with_the_pin_dir_and_every_btf_offset(kernel):
    (kernel.tmp / "tcp_sendmsg_locked").mkdir()
    r = started(kernel)
    assert kernel.compiles == [
        (
            ("redirect",),
            [
                f'-DPIN_DIR="{kernel.pins}"',
                "-DSK_COOKIE_OFF=8",
                "-DX=9",
                "-DHAVE_SENDMSG_TRACEPOINT",
            ],
        )
    ]
    r.stop(detach=False)


def test_compiled_with_attestation_one_object_holds_both_and_its_caller_owns_it(kernel):
    """The agent's case (agent/wiring.py): process_events first, with its flags first and
    the redirect's after them, each once; start() compiles nothing more, and stop() leaves
    the object to its owner (attestation's source, which stops after the redirect)."""
    (kernel.tmp / "tcp_sendmsg_locked").mkdir()
    r = redirector(kernel)
    first = ["-DRINGBUF_PAGES=64", f'-DPIN_DIR="{kernel.pins}"', "-DX=9"]
    program = r.compile_with(["process_events"], first)
    assert kernel.compiles == [
        (
            ("process_events", "redirect"),
            [*first, "-DSK_COOKIE_OFF=8", "-DHAVE_SENDMSG_TRACEPOINT"],
        )
    ]
    r.start()
    assert len(kernel.compiles) == 1 and r.attached
    r.stop(detach=True)
    assert program.cleaned == 0 and not r.attached


def test_compiled_with_attestation_stale_pins_are_replaced_and_both_compiled_again(kernel):
    kernel.sizes[101] = (1, 1)  # redirect_targets pinned by an agent with another layout
    r = redirector(kernel)
    program = r.compile_with(["process_events"], ["-DA=1"])
    assert [names for names, _ in kernel.compiles] == [("process_events", "redirect")] * 2
    assert kernel.programs[0].cleaned == 1 and program is kernel.programs[1]
    assert program.cleaned == 0


def test_compiled_with_attestation_the_pin_dir_is_made_with_its_parents(kernel):
    """Attestation compiles through the redirect before anything made agent.bpf_pin_dir
    (agent/wiring.py): compile_with makes it, and its parents."""
    deeper = kernel.tmp / "bpf" / "credless"
    r = Redirector(str(deeper), str(kernel.cgroups), InjectSection())
    program = r.compile_with(["process_events"], ["-DA=1"])
    assert deeper.is_dir() and kernel.programs == [program]
    assert kernel.compiles[0][1][:2] == ["-DA=1", f'-DPIN_DIR="{deeper}"']


def test_alone_the_redirect_compiles_its_own_object_and_cleans_it_up(kernel):
    r = started(kernel)
    assert [names for names, _ in kernel.compiles] == [("redirect",)]
    r.stop(detach=True)
    assert kernel.programs[-1].cleaned == 1


def test_without_the_tracepoint_the_warning_names_it_and_no_probe_is_compiled(kernel):
    with structlog.testing.capture_logs() as logs:
        flags = redirect.compile_flags(kernel.pins)
    assert flags == [f'-DPIN_DIR="{kernel.pins}"', "-DSK_COOKIE_OFF=8", "-DX=9"]
    (warned,) = [e for e in logs if "tracepoint" in e]
    assert warned["log_level"] == "warning"
    assert warned["tracepoint"] == str(kernel.tmp / "tcp_sendmsg_locked")
    assert warned["event"] == (
        "who writes on a redirected connection is not checked: this kernel has no "
        "tcp_sendmsg_locked tracepoint, so a process handed a connection (a child "
        "that inherited it) is served as the process that made it"
    )


# ------------------------------------------------------------------ start


def test_a_redirect_cannot_start_before_attestation_has_pinned_its_images(kernel):
    (kernel.pins / "process_images").unlink()
    with pytest.raises(RuntimeError) as refused:
        redirector(kernel).start()
    assert str(refused.value) == (
        f"{kernel.pins}/process_images is not pinned: attestation must start before the redirect"
    )
    assert kernel.compiles == [] and kernel.calls == []
    deeper = Redirector(str(kernel.tmp / "bpf" / "credless"), str(kernel.cgroups), InjectSection())
    with pytest.raises(RuntimeError, match=r"process_images is not pinned"):
        deeper.start()  # the directory is made (parents too): the refusal says why


def test_a_first_start_attaches_each_program_at_the_cgroup_root_and_pins_its_link(kernel):
    with structlog.testing.capture_logs() as logs:
        r = started(kernel)
    bpf = kernel.programs[-1]
    assert len(kernel.programs) == 1 and bpf.cleaned == 0  # compiled once: nothing was pinned
    assert [(n, t, e) for n, t, _, e in bpf.loaded] == PROGRAMS
    assert {d for _, _, d, _ in bpf.loaded} == {None}
    creates = [c for c in kernel.calls if c[0] == "create"]
    assert [(n, a) for _, n, a, _ in creates] == [(n, LINK_ATTACH[n]) for n, _, _ in PROGRAMS]
    root = os.stat(kernel.cgroups).st_ino
    assert kernel.root_inos == [root, root, root]
    pins = {fd: name for _, fd, name in [c for c in kernel.calls if c[0] == "pin"]}
    assert pins == {
        creates[0][3]: "link_connect4",
        creates[1][3]: "link_connect6",
        creates[2][3]: "link_sockops",
    }
    assert r.attached and r.took_over is False
    assert kernel.pinned() >= LINK_PINS
    (attached,) = [e for e in logs if e["event"] == "redirect attached"]
    assert attached["took_over"] is False
    assert attached["cgroup_root"] == str(kernel.cgroups)
    assert attached["pinned"] == str(kernel.pins)
    assert attached["listen"] == "127.0.0.1:15001"
    assert attached["managed"] == "all but the agent's cgroup"
    r.stop(detach=False)


def test_a_cgroup_root_that_is_no_directory_is_refused_before_anything_attaches(
    kernel, monkeypatch
):
    notdir = kernel.tmp / "file"
    notdir.touch()
    monkeypatch.setattr(redirect, "process_cgroup", lambda pid: None)
    r = Redirector(str(kernel.pins), str(notdir), InjectSection())
    with pytest.raises(NotADirectoryError):
        r.start()
    assert kernel.root_inos == []  # nothing attached to it


def test_a_start_takes_over_the_links_an_earlier_agent_pinned_and_swaps_its_programs_in(
    kernel,
):
    kernel.earlier_agent()
    with structlog.testing.capture_logs() as logs:
        r = started(kernel)
    assert not [c for c in kernel.calls if c[0] in ("create", "pin")]
    gets = [c[1] for c in kernel.calls if c[0] == "get"]
    assert gets == ["link_connect4", "link_connect6", "link_sockops"]
    updates = [(c[1], c[2]) for c in kernel.calls if c[0] == "update"]
    fds = [kernel.pinned_links[str(kernel.pins / n)] for n in gets]
    assert updates == list(zip([n for n, _, _ in PROGRAMS], fds, strict=True))
    assert r.took_over is True and r.attached
    (attached,) = [e for e in logs if e["event"] == "redirect attached"]
    assert attached["took_over"] is True
    # the maps an earlier agent pinned, with this layout, are kept (its links use them)
    assert kernel.pinned() >= MAP_PINS | LINK_PINS
    assert kernel.programs[-1].cleaned == 0 and len(kernel.compiles) == 1
    r.stop(detach=False)
    assert all(kernel.closed(fd) for fd in fds)  # this agent's hold on them is closed
    assert kernel.pinned() >= LINK_PINS  # and the pins keep the redirect attached


@pytest.mark.parametrize("mismatched", sorted(MAP_PINS))
def test_maps_pinned_with_another_layout_are_replaced_not_read_through_this_one(kernel, mismatched):
    kernel.earlier_agent()
    (kernel.pins / "elsewhere").touch()  # not the redirect's: kept
    fd = {
        "redirect_targets": 101,
        "redirect_config": 102,
        "managed_cgroups": 103,
        "redirected": 104,
        "local_to_cookie": 105,
    }[mismatched]
    kernel.sizes[fd] = (4, 4)
    with structlog.testing.capture_logs() as logs:
        r = started(kernel)
    (warned,) = [e for e in logs if "error" in e]
    assert warned["log_level"] == "warning"
    assert warned["event"] == "pinned redirect maps not reusable; replacing them"
    assert warned["error"].startswith(f"{mismatched}: ")
    assert "(4, 4)" in warned["error"]
    first, second = kernel.programs
    assert first.cleaned == 1 and second.cleaned == 0
    assert kernel.compiles[0] == kernel.compiles[1]  # the same flags, computed once
    # gone before the second compile (BCC would reuse them), the links stay (they keep the
    # redirect attached)
    before_first, before_second = kernel.pinned_at_compile
    assert before_first >= MAP_PINS
    assert not (before_second & MAP_PINS) and before_second >= LINK_PINS
    assert (kernel.pins / "process_images").exists() and (kernel.pins / "elsewhere").exists()
    assert r.took_over is True
    assert r._program is second
    r.stop(detach=False)


@pytest.mark.parametrize("entries", [16383, 16385, 1024])
def test_a_managed_cgroups_map_pinned_with_another_size_is_replaced(kernel, entries):
    kernel.max_entries = entries
    with structlog.testing.capture_logs() as logs:
        r = started(kernel)
    (warned,) = [e for e in logs if "error" in e]
    assert warned["log_level"] == "warning"
    assert warned["error"].startswith("managed_cgroups: ")
    assert str(entries) in warned["error"] and "16384" in warned["error"]
    assert len(kernel.programs) == 2
    r.stop(detach=False)


def test_a_map_size_the_kernel_does_not_report_is_a_mismatch(kernel):
    (kernel.fdinfo / "103").write_text("pos:\t0\nflags:\t02000002\n")
    kernel.programs.append(FakeBPF(kernel.senders_fd))
    assert redirect._max_entries(103) == -1
    r = redirector(kernel)
    assert "-1" in (r._layout_mismatch(kernel.programs[-1]) or "")


def test_the_max_entries_line_is_read_not_another_one(kernel):
    (kernel.fdinfo / "7").write_text(fdinfo(4242))
    assert redirect._max_entries(7) == 4242


def test_a_program_that_does_not_compile_against_pinned_maps_is_compiled_anew(kernel):
    kernel.earlier_agent()
    kernel.compile_errors.append(Exception("Failed to load BPF program: map redirected"))
    with structlog.testing.capture_logs() as logs:
        r = started(kernel)
    (warned,) = [e for e in logs if "error" in e]
    assert warned["log_level"] == "warning"
    assert warned["error"] == "Failed to load BPF program: map redirected"
    assert len(kernel.compiles) == 2 and len(kernel.programs) == 1
    assert not (MAP_PINS & kernel.pinned())  # the FakeBPF pins nothing: all gone
    r.stop(detach=False)


def test_a_failed_first_start_detaches_what_it_attached(kernel):
    kernel.fail_link = b"credless_sockops"
    r = redirector(kernel)
    with pytest.raises(OSError):
        r.start()
    made = [c[3] for c in kernel.calls if c[0] == "create"]
    assert len(made) == 2 and all(kernel.closed(fd) for fd in made)
    assert not (LINK_PINS & kernel.pinned())  # nothing left to redirect to a dead port
    assert not r.attached


def test_a_failed_take_over_leaves_the_earlier_agents_redirect_attached(kernel):
    kernel.earlier_agent()
    kernel.fail_link = b"credless_connect6"
    r = redirector(kernel)
    with pytest.raises(OSError):
        r.start()
    assert kernel.pinned() >= LINK_PINS | MAP_PINS  # connects stay intercepted
    assert not r.attached


# ------------------------------------------------------------------ configuration


def test_the_configuration_written_is_the_agents_settings(kernel):
    r = started(kernel, listen_host="127.0.0.2", listen_port=15101, listen_port6=15106)
    cfg = kernel.config()
    assert cfg.enabled == 1
    assert cfg.all_cgroups == 1  # no managed_cgroups: every cgroup but the agent's own
    assert cfg.fail_open == 0
    assert cfg.agent_up == 0  # until the proxy accepts connections
    assert cfg.listen_ip4.to_bytes(4, "little") == socket.inet_aton("127.0.0.2")
    assert socket.ntohs(cfg.listen_port4) == 15101
    assert socket.ntohs(cfg.listen_port6) == 15106
    assert cfg.excluded_cgroup == kernel.own_cgroup_id
    r.set_agent_up(True)
    up = kernel.config()
    assert up.agent_up == 1 and bytes(up)[:12] == bytes(cfg)[:12]
    assert up.excluded_cgroup == cfg.excluded_cgroup and up.listen_port6 == cfg.listen_port6
    r.set_agent_up(False)
    assert kernel.config().agent_up == 0
    r.stop(detach=False)


def test_fail_open_is_written_for_the_kernel_to_let_connects_out(kernel):
    r = started(kernel, fail_open=True)
    assert kernel.config().fail_open == 1
    r.stop(detach=False)


def test_the_agent_in_the_root_cgroup_excludes_the_root(kernel, monkeypatch):
    monkeypatch.setattr(redirect, "process_cgroup", lambda pid: None)
    r = started(kernel)
    assert kernel.config().excluded_cgroup == os.stat(kernel.cgroups).st_ino
    r.stop(detach=False)


def test_the_own_cgroup_is_found_under_the_root_whatever_its_name(kernel, monkeypatch):
    (kernel.cgroups / "Xorg.slice").mkdir()
    monkeypatch.setattr(redirect, "process_cgroup", lambda pid: "/Xorg.slice")
    r = started(kernel)
    assert kernel.config().excluded_cgroup == os.stat(kernel.cgroups / "Xorg.slice").st_ino
    r.stop(detach=False)


def test_the_own_cgroup_is_that_of_this_process(kernel, monkeypatch):
    asked: list[int] = []

    def process_cgroup(pid: int) -> str:
        asked.append(pid)
        return OWN_CGROUP

    monkeypatch.setattr(redirect, "process_cgroup", process_cgroup)
    r = started(kernel)
    assert asked == [os.getpid()]
    r.stop(detach=False)


def test_without_managed_cgroups_an_earlier_agents_watch_and_entries_go(kernel):
    kernel.earlier_agent()
    for pin in cgroup_watch.LINKS.values():
        (kernel.pins / pin).touch()
    first = FakeBPF(kernel.senders_fd)
    managed = first.tables[b"managed_cgroups"]
    for cg in (7, 8, 9):
        managed[ct.c_uint64(cg)] = ct.c_uint32(1)
    r = redirector(kernel)
    r._bpf = first
    r._manage_cgroups()
    assert managed.data == {}
    assert not (set(cgroup_watch.LINKS.values()) & kernel.pinned())
    assert kernel.pinned() >= LINK_PINS | MAP_PINS
    assert r.cgroups_status() == {"patterns": [], "managed": "every cgroup but the agent's own"}


def test_managed_cgroups_are_kept_by_the_watch(kernel, monkeypatch):
    FakeWatch.made = []
    monkeypatch.setattr(cgroup_watch, "CgroupWatch", FakeWatch)
    for pin in cgroup_watch.LINKS.values():
        (kernel.pins / pin).touch()
    audit, registry = object(), object()
    r = Redirector(
        str(kernel.pins),
        str(kernel.cgroups),
        InjectSection(managed_cgroups=["/kubepods.slice"]),
        audit,  # type: ignore[arg-type]
        registry,  # type: ignore[arg-type]
    )
    (watch,) = FakeWatch.made
    assert watch.args == (kernel.pins, str(kernel.cgroups), r.matcher, audit, registry)
    assert r.matcher.patterns == ["/kubepods.slice"]
    with structlog.testing.capture_logs() as logs:
        r.start()
    (attached,) = [e for e in logs if e["event"] == "redirect attached"]
    assert attached["managed"] == ["/kubepods.slice"]
    assert kernel.config().all_cgroups == 0
    # one compile carries the watcher's programs too, and the watch is given that object
    ((names, flags),) = kernel.compiles
    assert names == ("redirect", "cgroup_watch")
    assert flags == [f'-DPIN_DIR="{kernel.pins}"', "-DSK_COOKIE_OFF=8", "-DX=9", *watch.cflags()]
    assert watch.events == [("start", kernel.programs[-1])]
    assert set(cgroup_watch.LINKS.values()) <= kernel.pinned()  # the watch's own
    status = r.cgroups_status()
    assert status["patterns"] == ["/kubepods.slice"] and status["managed"] == ["/a/b"]
    assert status["matching_nothing_yet"] == ["/kubepods.slice"]
    r.reclaim()  # a new agent failed to take over: the watch puts its own links back
    assert watch.events[1:] == ["reclaim"]
    assert set(cgroup_watch.LINKS.values()) <= kernel.pinned()
    r.stop(detach=True)
    assert watch.events[1:] == ["reclaim", ("stop", True)]
    assert kernel.programs[-1].cleaned == 1  # the redirect owns the object the watch used


def test_a_redirector_not_started_has_no_program_and_holds_nothing(kernel, monkeypatch):
    r = redirector(kernel)
    assert not r.attached and r.took_over is False and r.targets == set()
    assert r.counts() == {}
    assert r.sender_changes(1) is None
    with pytest.raises(RuntimeError, match=r"start\(\) first"):
        r.set_agent_up(True)
    closed: list[int] = []
    monkeypatch.setattr(redirect.os, "close", closed.append)
    r.stop(detach=False)
    assert closed == []  # no fd of its own to close (not stdin's, stdout's...)
    assert r.cgroups_status()["patterns"] == []


# ------------------------------------------------------------------ stop and reclaim


def test_stop_by_default_keeps_the_redirect_and_says_connects_are_refused(kernel):
    r = started(kernel)
    links = [c[3] for c in kernel.calls if c[0] == "create"]
    bpf = kernel.programs[-1]
    with structlog.testing.capture_logs() as logs:
        r.stop()
    assert kernel.pinned() >= LINK_PINS  # inject.keep_redirect_on_stop (default)
    assert all(kernel.closed(fd) for fd in links)
    assert bpf.cleaned == 1 and not r.attached
    assert r.sender_changes(5) is None
    (said,) = [e for e in logs if "left attached" in e["event"]]
    assert said["event"] == (
        "redirect left attached while no agent runs: intercepted connects are refused"
    )
    assert said["pinned"] == str(kernel.pins)
    closed: list[int] = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(redirect.os, "close", closed.append)
        r.stop()  # a second stop closes nothing twice (nor stdout...)
    assert closed == [] and bpf.cleaned == 1


def test_stop_with_fail_open_says_connects_are_let_out(kernel):
    r = started(kernel, fail_open=True)
    with structlog.testing.capture_logs() as logs:
        r.stop()
    (said,) = [e for e in logs if "left attached" in e["event"]]
    assert said["event"].endswith("let out")


def test_stop_without_keeping_removes_the_links_and_maps(kernel):
    r = started(kernel, keep_redirect_on_stop=False)
    kernel_maps = MAP_PINS
    for m in kernel_maps:
        (kernel.pins / m).touch()  # BCC pinned them
    with structlog.testing.capture_logs() as logs:
        r.stop()
    assert kernel.pinned() == {"process_images"}
    assert not [e for e in logs if "left attached" in e["event"]]


def test_stop_closes_the_cgroup_root(kernel):
    r = started(kernel)
    root_fd = r._root_fd
    os.fstat(root_fd)
    r.stop(detach=False)
    with pytest.raises(OSError):
        os.fstat(root_fd)


def test_reclaim_puts_this_agents_programs_configuration_and_targets_back(kernel):
    r = started(kernel)
    links = [c[3] for c in kernel.calls if c[0] == "create"]
    r.set_targets({Target("10.0.0.1", 443, 15443)})
    table = kernel.programs[-1].tables[b"redirect_targets"]
    # a new agent swapped its own in, wrote its configuration and targets, then failed
    cfg = kernel.config()
    cfg.listen_port4, cfg.excluded_cgroup = 1, 1
    kernel.programs[-1].tables[b"redirect_config"][ct.c_int(0)] = cfg
    table.data.clear()
    kernel.calls.clear()
    with structlog.testing.capture_logs() as logs:
        r.reclaim()
    assert [c for c in kernel.calls if c[0] == "update"] == [
        ("update", n, fd) for (n, _, _), fd in zip(PROGRAMS, links, strict=True)
    ]
    assert kernel.programs[-1].loaded[-3:] == [(n, t, None, e) for n, t, e in PROGRAMS]
    now = kernel.config()
    assert socket.ntohs(now.listen_port4) == 15001 and now.excluded_cgroup == kernel.own_cgroup_id
    assert now.agent_up == 1
    (key,) = table.keys()
    assert ipaddress.IPv4Address(bytes(key.addr)[:4]) == ipaddress.IPv4Address("10.0.0.1")
    assert socket.ntohs(table[key].value) == 15443
    (said,) = logs
    assert said["event"] == "redirect reclaimed"
    assert said["reason"] == "a new agent failed to take over"
    r.stop(detach=False)


def test_reclaim_forgets_the_targets_a_failed_new_agent_added(kernel):
    """A new agent's start() writes its targets into the pinned map (and removes the old
    agent's it lacks); when it fails to take over, reclaim() rewrites this agent's, but a
    destination only the new one intercepts stays redirected, to this agent's listener,
    which had no server for it: connects to it were refused until this agent restarted
    (before the fix)."""
    r = started(kernel)
    r.set_targets({Target("10.0.0.1", 443)})
    table = kernel.programs[-1].tables[b"redirect_targets"]
    key = TargetKey(family=V4, port=socket.htons(8443))
    key.addr[0] = int.from_bytes(socket.inet_aton("10.0.0.2"), "little")
    table[key] = ct.c_uint32(0)  # the new agent's own target
    r.reclaim()
    (only,) = table.keys()
    assert socket.ntohs(only.port) == 443
    r.stop(detach=False)


def test_a_redirector_that_never_attached_reclaims_nothing(kernel):
    r = redirector(kernel)
    r.reclaim()  # no program: would raise if it tried
    assert kernel.calls == []


# ------------------------------------------------------------------ detach


def test_detach_removes_the_pinned_redirect_and_its_directory(kernel):
    kernel.earlier_agent()
    for pin in cgroup_watch.LINKS.values():
        (kernel.pins / pin).touch()
    (kernel.pins / "process_images").unlink()
    removed = redirect.detach(kernel.pins)
    names = {Path(p).name for p in removed}
    assert names == LINK_PINS | MAP_PINS | set(cgroup_watch.LINKS.values())
    assert all(Path(p).parent == kernel.pins for p in removed)
    assert not kernel.pins.exists()


def test_detach_keeps_what_else_is_pinned_and_a_directory_it_did_not_empty(kernel):
    (kernel.pins / "link_sockops").touch()
    assert redirect.detach(kernel.pins) == [str(kernel.pins / "link_sockops")]
    assert kernel.pinned() == {"process_images"}
    (kernel.pins / "process_images").unlink()
    assert redirect.detach(kernel.pins) == []
    assert kernel.pins.exists()  # nothing of the redirect's was there: not its to remove
    assert redirect.detach(kernel.tmp / "never") == []


def test_detach_of_a_pin_dir_that_cannot_go_still_removes_the_redirect(kernel, monkeypatch):
    """agent.bpf_pin_dir may be the bpffs mount itself: emptied, it cannot be removed
    (EBUSY), and the redirect is detached all the same."""
    (kernel.pins / "process_images").unlink()
    (kernel.pins / "link_sockops").touch()

    def busy(self):
        raise OSError(errno.EBUSY, "Device or resource busy", str(self))

    monkeypatch.setattr(Path, "rmdir", busy)
    assert redirect.detach(kernel.pins) == [str(kernel.pins / "link_sockops")]
    assert kernel.pinned() == set()


# ------------------------------------------------------------------ records


def endpoint(client: tuple[str, int], listener: tuple[str, int], netns: int) -> Endpoint:
    """bpf/redirect.c endpoint_key: as sockops writes it when the redirected socket
    connects (the client's address is local to its socket, the listener's remote)."""
    key = Endpoint()

    def addr(host: str, out: Any) -> int:
        ip = ipaddress.ip_address(host)
        if ip.version == 6 and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        packed = ip.packed
        for i in range(0, len(packed), 4):
            out[i // 4] = int.from_bytes(packed[i : i + 4], "little")
        return V4 if ip.version == 4 else V6

    key.family = addr(client[0], key.addr)
    addr(listener[0], key.listen_addr)
    key.port, key.listen_port, key.netns = client[1], listener[1], netns
    return key


def record(kernel: Kernel, orig: tuple[str, int], cookie: int, netns: int, **fields: int) -> Info:
    ip = ipaddress.ip_address(orig[0])
    info = Info(family=V4 if ip.version == 4 else V6, orig_port=socket.htons(orig[1]))
    for i in range(0, len(ip.packed), 4):
        info.orig_addr[i // 4] = int.from_bytes(ip.packed[i : i + 4], "little")
    info.netns = netns
    for name, value in fields.items():
        setattr(info, name, value)
    kernel.programs[-1].tables[b"redirected"][ct.c_uint64(cookie)] = info
    return info


PROCESS = dict(tgid=100, pid=101, uid=1000, cgroup_id=77, start_ns=5, exec_ns=6)


def served(cookie: int, netns: int) -> RedirectInfo:
    """The record of a connection to 10.0.0.1:443 made by PROCESS, as lookup() gave it."""
    return RedirectInfo("10.0.0.1", 443, 100, 101, 1000, 77, 5, 6, cookie, netns)


@pytest.mark.parametrize(
    "client, listener, orig",
    [
        (("127.0.0.1", 40000), ("127.0.0.1", 15001), ("10.0.0.1", 443)),
        (("::1", 40001), ("::1", 15001), ("2001:db8::1", 8443)),
        (("::ffff:127.0.0.1", 40002), ("::ffff:127.0.0.1", 15001), ("192.0.2.1", 80)),
        (("fe80::1%lo", 40003), ("fe80::2", 15001), ("2001:db8::2", 80)),
    ],
)
def test_an_accepted_connection_is_found_by_its_four_tuple_and_namespace(
    kernel, client, listener, orig
):
    r = started(kernel)
    kernel.programs[-1].tables[b"local_to_cookie"][endpoint(client, listener, 9)] = ct.c_uint64(
        0xABCDEF0123
    )
    record(kernel, orig, 0xABCDEF0123, 9, **PROCESS)
    assert r.lookup(client, listener, 9) == RedirectInfo(
        orig[0], orig[1], 100, 101, 1000, 77, 5, 6, 0xABCDEF0123, 9
    )
    # another port, address or listener, or another namespace: not this connection
    assert r.lookup((client[0], client[1] + 1), listener, 9) is None
    assert r.lookup(client, (listener[0], listener[1] + 1), 9) is None
    assert r.lookup(client, listener, 8) is None
    other = "127.0.0.2" if "." in client[0] else "::2"
    assert r.lookup((other, client[1]), listener, 9) is None
    assert r.lookup(client, (other, listener[1]), 9) is None
    r.stop(detach=False)


def test_a_record_of_another_namespaces_socket_is_never_served(kernel):
    r = started(kernel)
    client, listener = ("127.0.0.1", 40000), ("127.0.0.1", 15001)
    kernel.programs[-1].tables[b"local_to_cookie"][endpoint(client, listener, 9)] = ct.c_uint64(3)
    record(kernel, ("10.0.0.1", 443), 3, 10, **PROCESS)  # the cookie's socket is elsewhere
    assert r.lookup(client, listener, 9) is None


def test_an_endpoint_whose_record_is_gone_is_not_redirected(kernel):
    r = started(kernel)
    client, listener = ("127.0.0.1", 40000), ("127.0.0.1", 15001)
    kernel.programs[-1].tables[b"local_to_cookie"][endpoint(client, listener, 9)] = ct.c_uint64(3)
    assert r.lookup(client, listener, 9) is None
    record(kernel, ("10.0.0.1", 443), 4, 9, **PROCESS)
    assert r.lookup(client, listener, 9) is None


def test_only_the_ports_low_half_is_the_port(kernel):
    r = started(kernel)
    client, listener = ("127.0.0.1", 40000), ("127.0.0.1", 15001)
    kernel.programs[-1].tables[b"local_to_cookie"][endpoint(client, listener, 9)] = ct.c_uint64(3)
    info = record(kernel, ("10.0.0.1", 443), 3, 9, **PROCESS)
    info.orig_port |= 0xBEEF0000
    kernel.programs[-1].tables[b"redirected"][ct.c_uint64(3)] = info
    found = r.lookup(client, listener, 9)
    assert found is not None and found.orig_port == 443


@pytest.mark.parametrize(
    "named, recorded",
    [
        ("::ffff:10.0.0.1", "10.0.0.1"),  # the kernel keys it as IPv4
        ("fe80::1%eth0", "fe80::1"),  # the kernel records no scope
        ("fe80::1%v%1", "fe80::1"),  # an interface name may hold a % (Linux allows it)
    ],
)
def test_a_record_names_the_server_as_its_target_did(kernel, named, recorded):
    r = started(kernel)
    r.set_targets({Target(named, 443), Target("10.0.0.2", 443)})
    client, listener = ("127.0.0.1", 40000), ("127.0.0.1", 15001)
    table = kernel.programs[-1].tables[b"local_to_cookie"]
    table[endpoint(client, listener, 9)] = ct.c_uint64(3)
    record(kernel, (recorded, 443), 3, 9, **PROCESS)
    found = r.lookup(client, listener, 9)
    assert found is not None and found.orig_host == named
    r.stop(detach=False)


def test_forget_deletes_the_connections_two_records_and_no_other(kernel):
    r = started(kernel)
    client, listener = ("127.0.0.1", 40000), ("127.0.0.1", 15001)
    ends = kernel.programs[-1].tables[b"local_to_cookie"]
    ends[endpoint(client, listener, 9)] = ct.c_uint64(3)
    ends[endpoint(("127.0.0.1", 40001), listener, 9)] = ct.c_uint64(4)
    record(kernel, ("10.0.0.1", 443), 3, 9, **PROCESS)
    record(kernel, ("10.0.0.1", 443), 4, 9, **PROCESS)
    info = r.lookup(client, listener, 9)
    assert info is not None
    r.forget(client, listener, info)
    assert r.lookup(client, listener, 9) is None
    assert r.sender(3) is None
    assert r.lookup(("127.0.0.1", 40001), listener, 9) is not None
    r.forget(client, listener, info)  # the kernel deleted them first: nothing to do
    kernel.programs[-1].tables[b"redirected"].data.clear()
    other = r.lookup(("127.0.0.1", 40001), listener, 9)
    assert other is None
    r.forget(("127.0.0.1", 40001), listener, served(4, 9))
    assert ends.data == {}
    r.stop(detach=False)


# ------------------------------------------------------------------ who wrote


def test_the_change_counter_is_the_connections_slot_in_mapped_memory(kernel):
    r = started(kernel)
    cookie = 3 * SENDER_CHANGE_SLOTS + 17
    os.pwrite(kernel.senders_fd, (5).to_bytes(8, "little"), 17 * 8)
    assert r.sender_changes(cookie) == 5
    assert r.sender_changes(17) == 5  # keys sharing a slot share its counter
    assert r.sender_changes(18) == 0
    os.pwrite(kernel.senders_fd, (6).to_bytes(8, "little"), (SENDER_CHANGE_SLOTS - 1) * 8)
    assert r.sender_changes(SENDER_CHANGE_SLOTS - 1) == 6
    r.stop(detach=False)


@pytest.mark.parametrize(
    "bits, named",
    [
        (0, ""),
        (1, "another process"),
        (6, "another uid and another cgroup"),
        (8, "a task credless cannot name (sender bits 0x8)"),  # a later kernel side's bit
        (0x80000000, "a task credless cannot name (sender bits 0x80000000)"),
        (None, "the connection's kernel record is gone"),
    ],
)
def test_who_else_wrote_is_the_records_bits_and_an_unknown_bit_closes(kernel, bits, named):
    r = started(kernel)
    cookie = 0x1234567890
    if bits is not None:
        record(kernel, ("10.0.0.1", 443), cookie, 9, sender=bits, **PROCESS)
        record(kernel, ("10.0.0.1", 443), cookie + 1, 9, sender=0, **PROCESS)
    assert r.sender(cookie) == bits
    info = served(cookie, 9)
    client = SimpleNamespace(sender_mark=-1)
    said = Proxy.other_sender(SimpleNamespace(redirect=r), info, client)  # type: ignore[arg-type]
    assert (said == "") is (bits == 0)
    assert named in said
    r.stop(detach=False)


# ------------------------------------------------------------------ counts and targets


def test_counts_name_each_slot_of_the_kernels_counters(kernel):
    r = started(kernel)
    table = kernel.programs[-1].tables[b"redirect_counts"]
    for i, n in enumerate((11, 22, 33, 44)):
        table[ct.c_int(i)] = ct.c_uint64(n)
    assert r.counts() == {
        "redirected_v4": 11,
        "redirected_v6": 22,
        "unmanaged": 33,
        "refused_pending_cgroup": 44,
    }
    r.stop(detach=False)


def test_a_start_forgets_the_targets_an_earlier_agent_wrote_that_this_one_lacks(
    kernel, monkeypatch
):
    kernel.earlier_agent()
    real_compile = kernel.compile

    def with_old_targets(*names: str, cflags: list[str]) -> FakeBPF:
        bpf = real_compile(*names, cflags=cflags)
        old = bpf.tables[b"redirect_targets"]
        for port in (80, 443):
            key = TargetKey(family=V4, port=socket.htons(port))
            key.addr[0] = int.from_bytes(socket.inet_aton("10.9.9.9"), "little")
            old[key] = ct.c_uint32(0)
        return bpf

    monkeypatch.setattr(redirect, "compile_program", with_old_targets)
    r = started(kernel)
    table = kernel.programs[-1].tables[b"redirect_targets"]
    assert len(table.data) == 2  # still intercepted until this agent says what it serves
    r.set_targets({Target("10.9.9.9", 443, 15443)})
    (key,) = table.keys()
    assert socket.ntohs(key.port) == 443 and socket.ntohs(table[key].value) == 15443
    r.set_targets(set())  # the earlier agent's are forgotten only once
    assert table.data == {}
    r.stop(detach=False)


def test_a_target_removed_behind_the_agents_back_is_forgotten_without_error(kernel):
    r = started(kernel)
    r.set_targets({Target("10.0.0.1", 443), Target("10.0.0.2", 443)})
    table = kernel.programs[-1].tables[b"redirect_targets"]
    gone = next(
        k for k in table if k.addr[0] == int.from_bytes(socket.inet_aton("10.0.0.1"), "little")
    )
    del table[gone]  # `credless detach` and a new start, say
    r.set_targets({Target("10.0.0.3", 443)})
    (key,) = table.keys()
    assert key.addr[0] == int.from_bytes(socket.inet_aton("10.0.0.3"), "little")
    r.stop(detach=False)


def test_a_target_on_the_plain_listener_is_written_as_zero(kernel):
    r = started(kernel)
    r.set_targets({Target("10.0.0.1", 443)})
    table = kernel.programs[-1].tables[b"redirect_targets"]
    (key,) = table.keys()
    assert table[key].value == 0 and key.family == V4
    r.set_targets({Target("2001:db8::1", 443, 15002)})
    (key,) = table.keys()
    assert key.family == V6 and socket.ntohs(table[key].value) == 15002
    assert bytes(key.addr) == ipaddress.IPv6Address("2001:db8::1").packed
    r.stop(detach=False)
