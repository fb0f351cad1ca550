"""`credless doctor`: can this host run credless? Each check really does the thing.

No check reads a version string: the BPF syscall is called, a tracepoint program is loaded
and attached, a cgroup connect4 program is attached to a throwaway cgroup v2 child (and
detached, and the child removed, whatever happens), the kubelet is asked for /pods with the
agent's own token and CA. A failing check prints the exact fix.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import platform
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from agent.attest import cgroupfs
from agent.attest.kubelet import (
    DEFAULT_CA_FILE,
    KubeletClient,
    KubeletError,
    Probe,
    expand_server_name,
    expand_url,
)
from agent.config import KubeletSection

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


@dataclass
class CheckResult:
    name: str
    ok: bool
    detail: str
    fix: str = ""
    required: bool = True

    @classmethod
    def failed(cls, name: str, detail: str, fix: str, required: bool = True) -> CheckResult:
        return cls(name, False, detail, fix, required)


@dataclass
class DoctorOptions:
    cgroup_root: str = ""  # empty: find it in /proc/mounts
    tracefs: str = "/sys/kernel/tracing"
    btf: str = "/sys/kernel/btf/vmlinux"
    kubelet: KubeletSection | None = None  # from --config; None: not checked
    managed_cgroups: list[str] | None = None  # inject.managed_cgroups from --config


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
    eff = 0
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            eff = int(line.split()[1], 16)
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


# --------------------------------------------------------------------------- kubelet
_SELF_SIGNED_FIX = (
    "if the kubelet's serving certificate is self-signed (kubeadm's default, "
    "/var/lib/kubelet/pki/kubelet.crt on the node), mount that file read-only and set "
    "attest.kubelet.ca_file to it and server_name to the node's host name; or sign serving "
    "certificates with the cluster CA (kubelet serverTLSBootstrap: true, then approve the "
    "kubelet-serving CSRs); insecure_skip_verify = true only as the last resort "
    "(deploy/k8s/README.md)"
)
_DROP_PROXY = (
    "if every kubelet is 1.33+ with KubeletFineGrainedAuthz on: kubectl delete "
    "clusterrolebinding credless-kubelet-proxy (and drop rbac-nodes-proxy.yaml from "
    "deploy/k8s/kustomization.yaml), then run credless doctor on each node: kubelet_authz "
    "must still pass"
)


def _trust(k: KubeletSection, server_name: str) -> str:
    """Which of the three serving-CA choices the configuration makes."""
    if k.insecure_skip_verify:
        return "NOT verified (insecure_skip_verify = true)"
    which = "the cluster CA" if k.ca_file == DEFAULT_CA_FILE else "the configured bundle"
    name = f", name {server_name!r}" if server_name else ""
    return f"verified against {which} ({k.ca_file}{name})"


def check_kubelet(opts: DoctorOptions) -> list[CheckResult]:
    """Can the agent reach its kubelet, does the serving certificate verify, does the token
    get /pods, and does it hold more than it needs? Three results, one per question."""
    k = opts.kubelet
    if k is None or not k.enabled:
        return [
            CheckResult(
                "kubelet",
                True,
                "not checked: attest.kubelet.enabled is false in the --config given "
                "(or no --config); processes in pods get no k8s: selectors",
                required=False,
            )
        ]
    try:
        # getattr: a configuration schema without server_name has nothing to expand
        server_name = expand_server_name(getattr(k, "server_name", "") or "", os.environ)
        url = expand_url(k.url, os.environ)
        client = KubeletClient(
            url,
            token_file=k.token_file,
            ca_file=k.ca_file,
            insecure_skip_verify=k.insecure_skip_verify,
            server_name=server_name or None,
        )
    except (KubeletError, ValueError) as e:
        return [CheckResult.failed("kubelet_tls", str(e), "fix the [attest.kubelet] settings")]
    trust = _trust(k, server_name)
    try:
        pods = client.probe("/pods")
    except KubeletError as e:
        if e.outcome == "local_config" and "token" in str(e):
            return [
                CheckResult("kubelet_tls", True, f"not reached: no token to send ({trust})"),
                CheckResult.failed(
                    "kubelet_authz",
                    str(e),
                    "mount the agent's service account token (automountServiceAccountToken) "
                    "or set attest.kubelet.token_file",
                ),
            ]
        fix = {
            "tls_verify": _SELF_SIGNED_FIX,
            "local_config": "point attest.kubelet.ca_file at a readable PEM bundle",
            "unreachable": "check attest.kubelet.url: the node's address (NODE_IP from "
            "status.hostIP) and the kubelet's --port (10250)",
            "timeout": "check attest.kubelet.url and that the kubelet is healthy",
        }.get(e.outcome, "check attest.kubelet.url and the kubelet's TLS settings")
        return [
            CheckResult.failed("kubelet_tls", f"{e!s} [{trust}]", fix),
            CheckResult.failed("kubelet_authz", "not checked", "fix kubelet_tls first"),
        ]
    results = [_tls_result(k, url, trust, verifies_anyway=_verifies_anyway(k, url, server_name))]
    if pods.error is not None:
        results.append(
            CheckResult.failed("kubelet_authz", str(pods.error), _authz_fix(pods.error, pods))
        )
        return results
    results.append(
        CheckResult("kubelet_authz", True, f"the token from {k.token_file} gets 200 on /pods")
    )
    results.append(_grant_result(client))
    return results


def _verifies_anyway(k: KubeletSection, url: str, server_name: str) -> bool:
    """With insecure_skip_verify on: would ca_file have verified the kubelet anyway?"""
    if not k.insecure_skip_verify:
        return False
    verified = KubeletClient(
        url, token_file=k.token_file, ca_file=k.ca_file, server_name=server_name or None
    )
    try:
        verified.probe("/pods")
    except KubeletError:
        return False
    return True


def _tls_result(k: KubeletSection, url: str, trust: str, verifies_anyway: bool) -> CheckResult:
    if not k.insecure_skip_verify:
        return CheckResult("kubelet_tls", True, f"reached {url}; certificate {trust}")
    if verifies_anyway:
        return CheckResult.failed(
            "kubelet_tls",
            f"reached {url}; certificate {trust}, but it does verify against {k.ca_file}",
            "set insecure_skip_verify = false: the verified connection works",
            required=False,
        )
    return CheckResult.failed(
        "kubelet_tls",
        f"reached {url}; certificate {trust}: the agent's token goes to whatever answers "
        "at that address",
        _SELF_SIGNED_FIX.replace("; insecure_skip_verify = true only as the last resort", ""),
        required=False,
    )


def _authz_fix(error: KubeletError, probe: Probe) -> str:
    if error.status == 401:
        return (
            "the kubelet did not accept the token: check that it is the agent's current "
            "service account token and that the kubelet runs with "
            "--authentication-token-webhook (kubelet config authentication.webhook.enabled)"
        )
    if error.status == 403:
        f = probe.forbidden
        who = f.user if f is not None else "the agent's service account"
        if error.grant == "nodes/proxy":
            return (
                f"this kubelet has no fine-grained authorization: bind 'get' on nodes/proxy "
                f"to {who} (kubectl apply -f deploy/k8s/rbac-nodes-proxy.yaml), or turn "
                "KubeletFineGrainedAuthz on (kubelet 1.32+) and keep nodes/pods only"
            )
        if error.grant is not None:
            return f"bind 'get' on {error.grant} to {who} (kubectl apply -f deploy/k8s/rbac.yaml)"
        return "bind 'get' on nodes/pods (and, for kubelets before 1.33, nodes/proxy)"
    return "check the kubelet's logs"


def _grant_result(client: KubeletClient) -> CheckResult:
    """Does the token hold nodes/proxy? GET /healthz needs it (or nodes/healthz, which
    credless's RBAC does not grant), so a 200 there says it does."""
    try:
        healthz = client.probe("/healthz")
    except KubeletError as e:
        return CheckResult.failed(
            "kubelet_grant", f"cannot tell: {e}", "re-run credless doctor", required=False
        )
    if healthz.status == 200:
        return CheckResult.failed(
            "kubelet_grant",
            "the token holds nodes/proxy (it may GET /healthz): a broad grant that also "
            "reaches exec, attach and port-forward on every node's kubelet; needed only by "
            "kubelets without KubeletFineGrainedAuthz (before 1.33, or the gate off)",
            _DROP_PROXY,
            required=False,
        )
    f = healthz.forbidden
    if healthz.status == 403 and f is not None and f.fine_grained:
        return CheckResult(
            "kubelet_grant",
            True,
            "least privilege: nodes/pods only; this kubelet has KubeletFineGrainedAuthz "
            f"(GET /healthz: checked {'/'.join(f.subresources)}, neither granted)",
            required=False,
        )
    return CheckResult(
        "kubelet_grant",
        True,
        f"the token does not hold nodes/proxy (GET /healthz: {healthz.status})",
        required=False,
    )


Check = Callable[[DoctorOptions], "CheckResult | list[CheckResult]"]
CHECKS: list[Check] = [
    check_capabilities,
    check_bpf_syscall,
    check_kernel_headers,
    check_tracefs,
    check_bpffs,
    check_btf,
    check_cgroup2,
    check_bcc_tracepoint,
    check_cgroup_connect4,
    check_managed_cgroups,
    check_kubelet,
]


def run_checks(opts: DoctorOptions) -> list[CheckResult]:
    results: list[CheckResult] = []
    for check in CHECKS:
        try:
            result = check(opts)
        except Exception as e:  # noqa: BLE001 — a crashing check is a failed check, not a crashed doctor
            result = CheckResult.failed(
                check.__name__.removeprefix("check_"),
                f"check crashed: {e!r}",
                "report this as a bug",
            )
        results.extend(result if isinstance(result, list) else [result])
    return results


def render(results: list[CheckResult], as_json: bool) -> str:
    if as_json:
        return json.dumps(
            {
                "ok": all(r.ok or not r.required for r in results),
                "checks": [asdict(r) for r in results],
            },
            indent=2,
        )
    lines = []
    for r in results:
        status = "ok" if r.ok else ("missing" if r.required else "warn")
        line = f"{status:8} {r.name:16} {r.detail}"
        if not r.ok:
            line += f"\n{'':8} {'':16} fix: {r.fix}"
        lines.append(line)
    return "\n".join(lines)


def exit_code(results: list[CheckResult]) -> int:
    return 0 if all(r.ok or not r.required for r in results) else 1
