"""Where cgroup v2 lives, and which cgroup a process is in.

The mount point is found in /proc/mounts (never assumed): hosts here mount the unified
hierarchy at /sys/fs/cgroup (unified mode) or /sys/fs/cgroup/unified (hybrid mode).
A process's cgroup comes from /proc/<pid>/cgroup, which the kernel writes; mountinfo is not
used for identity because a workload can shape what it shows with bind mounts.
"""

from __future__ import annotations

from pathlib import Path

PROC = Path("/proc")


def _unescape_mount_field(s: str) -> str:
    # /proc/mounts escapes space, tab, newline and backslash as octal (\040 ...).
    out, i = [], 0
    while i < len(s):
        if s[i] == "\\" and len(s[i + 1 : i + 4]) == 3 and s[i + 1 : i + 4].isdigit():
            out.append(chr(int(s[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(s[i])
            i += 1
    return "".join(out)


def find_cgroup2_mount(mounts_text: str) -> str | None:
    """The first cgroup2 mount point in a /proc/mounts text, or None."""
    for line in mounts_text.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[2] == "cgroup2":
            return _unescape_mount_field(parts[1])
    return None


def is_cgroup2_mount(path: str, mounts_text: str) -> bool:
    for line in mounts_text.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[2] == "cgroup2" and _unescape_mount_field(parts[1]) == path:
            return True
    return False


def cgroup2_root(configured: str = "") -> str | None:
    """The configured cgroup v2 root if it is a cgroup2 mount, else the one in /proc/mounts."""
    mounts = (PROC / "mounts").read_text()
    if not configured:
        return find_cgroup2_mount(mounts)
    path = configured.rstrip("/") or "/"
    return path if is_cgroup2_mount(path, mounts) else None


def parse_proc_cgroup(text: str) -> str | None:
    """The cgroup v2 path ('0::/path') from a /proc/<pid>/cgroup text, or None."""
    for line in text.splitlines():
        if line.startswith("0::"):
            return line[3:].strip() or "/"
    return None


def process_cgroup(pid: int) -> str | None:
    try:
        return parse_proc_cgroup((PROC / str(pid) / "cgroup").read_text())
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None


def cgroup_id(root: str, cgroup_path: str) -> int:
    """The kernel's cgroup id: the inode number of the cgroup directory (cgroup v2)."""
    return Path(root, cgroup_path.lstrip("/")).stat().st_ino
