"""`credless doctor`'s host checks: can this kernel and this process run credless?

Each check really does the thing: the BPF syscall is called, a tracepoint program is loaded
and attached, a cgroup connect4 program is attached to a throwaway cgroup v2 child (and
detached, and the child removed, whatever happens). A failing check prints the exact fix.

Apart from the kubelet checks (kubelet.py): these ask the kernel, those ask a peer over
the network, and they fail for unrelated reasons with unrelated fixes.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
from pathlib import Path

from agent.attest import cgroupfs
from agent.attest.procfs import parse_status
from agent.doctor.model import CheckResult, DoctorOptions

# bpf(2) syscall numbers by machine; BPF_MAP_CREATE = 0, BPF_MAP_TYPE_ARRAY = 2.
_SYS_BPF = {"x86_64": 321, "aarch64": 280}

# Linux capability numbers (include/uapi/linux/capability.h).
CAPS = {
    "CAP_NET_ADMIN": 12,
    "CAP_SYS_ADMIN": 21,
    "CAP_SYS_PTRACE": 19,
    "CAP_DAC_READ_SEARCH": 2,
    "CAP_PERFMON": 38,
    "CAP_BPF": 39,
}


def _libc():
    return ctypes.CDLL(None, use_errno=True)


def check_bpf_syscall(_: DoctorOptions) -> CheckResult:
    nr = _SYS_BPF.get(platform.machine())
    if nr is None:
        return CheckResult.failed(
            "bpf_syscall",
            f"unsupported machine {platform.machine()}",
            "run credless on x86_64 or aarch64",
        )

    class MapCreateAttr(ctypes.Structure):
        _fields_ = [
            ("map_type", ctypes.c_uint32),
            ("key_size", ctypes.c_uint32),
            ("value_size", ctypes.c_uint32),
            ("max_entries", ctypes.c_uint32),
            ("pad", ctypes.c_uint8 * 112),
        ]

    attr = MapCreateAttr(2, 4, 8, 1)
    libc = _libc()
    fd = libc.syscall(nr, 0, ctypes.byref(attr), ctypes.sizeof(attr))
    if fd < 0:
        err = ctypes.get_errno()
        fix = (
            "run as root (or grant CAP_BPF)"
            if err == errno.EPERM
            else "use a kernel built with CONFIG_BPF_SYSCALL=y"
        )
        return CheckResult.failed(
            "bpf_syscall",
            f"bpf(BPF_MAP_CREATE) failed: {errno.errorcode.get(err, err)} {os.strerror(err)}",
            fix,
        )
    os.close(fd)
    return CheckResult("bpf_syscall", True, "created and closed an array map")


def check_kernel_headers(_: DoctorOptions) -> CheckResult:
    build = Path(f"/lib/modules/{os.uname().release}/build")
    if (build / "include").is_dir():
        return CheckResult("kernel_headers", True, f"{build} -> {build.resolve()}")
    return CheckResult.failed(
        "kernel_headers",
        f"{build}/include missing (BCC compiles bpf/*.c against it)",
        "make setup (installs linux-headers-amd64 and "
        f"links {build} to /usr/src/linux-headers-*-amd64)",
    )


def check_tracefs(opts: DoctorOptions) -> CheckResult:
    mounts = Path("/proc/mounts").read_text()
    for line in mounts.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[2] == "tracefs" and parts[1] == opts.tracefs:
            return CheckResult("tracefs", True, f"mounted at {opts.tracefs}")
    return CheckResult.failed(
        "tracefs",
        f"tracefs not mounted at {opts.tracefs}",
        f"mount -t tracefs tracefs {opts.tracefs}",
    )


def check_bpffs(_: DoctorOptions) -> CheckResult:
    for line in Path("/proc/mounts").read_text().splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[2] == "bpf" and parts[1] == "/sys/fs/bpf":
            return CheckResult("bpffs", True, "mounted at /sys/fs/bpf")
    return CheckResult.failed(
        "bpffs",
        "bpffs not mounted at /sys/fs/bpf (the redirect pins its maps there)",
        "mount -t bpf bpf /sys/fs/bpf",
    )


def check_btf(opts: DoctorOptions) -> CheckResult:
    try:
        with open(opts.btf, "rb") as f:
            magic = f.read(2)
    except OSError as e:
        return CheckResult.failed(
            "btf",
            f"cannot read {opts.btf}: {e.strerror}",
            "use a kernel built with CONFIG_DEBUG_INFO_BTF=y",
            required=False,
        )
    if magic not in (b"\x9f\xeb", b"\xeb\x9f"):
        return CheckResult.failed(
            "btf",
            f"{opts.btf} has no BTF magic",
            "use a kernel built with CONFIG_DEBUG_INFO_BTF=y",
            required=False,
        )
    return CheckResult(
        "btf", True, f"{opts.btf} ({os.path.getsize(opts.btf)} bytes)", required=False
    )


def check_capabilities(_: DoctorOptions) -> CheckResult:
    eff = parse_status(Path("/proc/self/status").read_text()).cap_eff
    missing = [n for n, bit in CAPS.items() if not eff >> bit & 1]
    if missing:
        return CheckResult.failed(
            "capabilities",
            "missing " + ", ".join(missing),
            "run as root, or grant them (AmbientCapabilities= in the unit)",
        )
    return CheckResult("capabilities", True, "effective set has " + ", ".join(CAPS))


def check_cgroup2(opts: DoctorOptions) -> CheckResult:
    root = cgroupfs.cgroup2_root(opts.cgroup_root)
    if root is None:
        where = opts.cgroup_root or "any mount point"
        return CheckResult.failed(
            "cgroup_v2",
            f"no cgroup2 filesystem at {where} (per /proc/mounts)",
            "mount -t cgroup2 none /sys/fs/cgroup/unified, or set "
            "attest.cgroup_root to the cgroup2 mount point",
        )
    return CheckResult("cgroup_v2", True, f"cgroup2 mounted at {root}")


def check_bcc_tracepoint(_: DoctorOptions) -> CheckResult:
    try:
        from agent.bpfload import compile_program

        prog = compile_program("doctor")
    except ImportError:
        return CheckResult.failed(
            "bcc_tracepoint",
            "cannot import bcc",
            "make setup (installs python3-bpfcc and links it into .venv)",
        )
    except Exception as e:  # noqa: BLE001 — BCC raises bare Exception on compile/verify failures
        return CheckResult.failed(
            "bcc_tracepoint",
            f"loading bpf/doctor.c failed: {e}",
            "make setup (kernel headers, tracefs), then run as root",
        )
    try:
        if not prog.tracepoint_exists("sched", "sched_process_exec"):
            return CheckResult.failed(
                "bcc_tracepoint",
                "tracepoint sched:sched_process_exec not found",
                "mount tracefs; use a kernel with CONFIG_TRACEPOINTS",
            )
        return CheckResult("bcc_tracepoint", True, "loaded and attached sched:sched_process_exec")
    finally:
        prog.cleanup()


def check_cgroup_connect4(opts: DoctorOptions) -> CheckResult:
    root = cgroupfs.cgroup2_root(opts.cgroup_root)
    if root is None:
        return CheckResult.failed(
            "cgroup_connect4", "no cgroup v2 mount to attach to", "fix cgroup_v2 first"
        )
    try:
        from bcc import BPF, BPFAttachType

        from agent.bpfload import compile_program

        prog = compile_program("doctor")
    except Exception as e:  # noqa: BLE001 — a failing check, reported
        return CheckResult.failed(
            "cgroup_connect4",
            f"cannot compile bpf/doctor.c: {e}",
            "fix bcc_tracepoint first",
        )
    child = Path(root) / f"credless-doctor-{os.getpid()}"
    fd = -1
    try:
        fn = prog.load_func(
            b"doctor_connect4", BPF.CGROUP_SOCK_ADDR, None, BPFAttachType.CGROUP_INET4_CONNECT
        )
        child.mkdir()
        fd = os.open(child, os.O_RDONLY | os.O_DIRECTORY)
        BPF.attach_func(fn, fd, BPFAttachType.CGROUP_INET4_CONNECT)
        BPF.detach_func(fn, fd, BPFAttachType.CGROUP_INET4_CONNECT)
        return CheckResult("cgroup_connect4", True, f"attached and detached connect4 on {child}")
    except Exception as e:  # noqa: BLE001 — a failing check, reported
        return CheckResult.failed(
            "cgroup_connect4",
            f"attach to {child} failed: {e}",
            "run as root on a kernel with CONFIG_CGROUP_BPF=y",
        )
    finally:
        if fd >= 0:
            os.close(fd)
        try:
            child.rmdir()  # removing the cgroup also drops any attachment left on it
        except FileNotFoundError:
            pass
        prog.cleanup()


def check_managed_cgroups(opts: DoctorOptions) -> CheckResult:
    """Which inject.managed_cgroups patterns name no cgroup yet: not an error (they are
    managed when they appear), but a misspelt one never will be."""
    from agent.inject.cgroup_match import describe

    root = cgroupfs.cgroup2_root(opts.cgroup_root)
    if not opts.managed_cgroups or root is None:
        why = "no cgroup v2 mount" if opts.managed_cgroups else "every cgroup is managed"
        return CheckResult("managed_cgroups", True, f"not checked: {why}", required=False)
    counts, unmatched = describe(opts.managed_cgroups, root)
    detail = "; ".join(counts + [f"{p} matches no cgroup yet" for p in unmatched])
    if not unmatched:
        return CheckResult("managed_cgroups", True, detail, required=False)
    return CheckResult.failed(
        "managed_cgroups",
        detail,
        "nothing to do if those cgroups are made later (they are managed when they "
        "appear); otherwise check the spelling against systemd-cgls or /proc/PID/cgroup",
        required=False,
    )
