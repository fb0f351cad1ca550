"""What a `credless doctor` check is given and what it gives back.

Apart from the checks (host.py, kubelet.py) and the runner (__init__.py) so that both sides
import it without importing each other: the runner lists the checks, the checks build
results.
"""

from __future__ import annotations

from dataclasses import dataclass

from agent.config import KubeletSection

__all__ = ["CheckResult", "DoctorOptions"]


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
