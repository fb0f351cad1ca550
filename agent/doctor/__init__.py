"""`credless doctor`: can this host run credless? Each check really does the thing.

No check reads a version string: the BPF syscall is called, a tracepoint program is loaded
and attached, a cgroup connect4 program is attached to a throwaway cgroup v2 child (and
detached, and the child removed, whatever happens), the kubelet is asked for /pods with the
agent's own token and CA. A failing check prints the exact fix.

The checks are in host.py (the kernel and this process) and kubelet.py (the kubelet, with
the configuration's token and CA); this module runs them in order and renders the report.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict

from agent.doctor.host import (
    check_bcc_tracepoint,
    check_bpf_syscall,
    check_bpffs,
    check_btf,
    check_capabilities,
    check_cgroup2,
    check_cgroup_connect4,
    check_kernel_headers,
    check_managed_cgroups,
    check_tracefs,
)
from agent.doctor.kubelet import check_kubelet
from agent.doctor.model import CheckResult, DoctorOptions

# The public face of `agent.doctor` (cli.py, tests/demo.py): the runner, and the types it
# takes and gives, re-exported from model.py. The checks are reached through CHECKS.
__all__ = ["CHECKS", "CheckResult", "DoctorOptions", "exit_code", "render", "run_checks"]


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
