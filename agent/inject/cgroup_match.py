"""Which cgroups inject.managed_cgroups names: the one decision, used by the redirect's map
keeper (agent/inject/cgroup_watch.py), the pod listeners (agent/inject/netns.py) and
`credless doctor`.

A pattern is a cgroup path relative to the cgroup v2 root, each component a shell glob
(fnmatch: `*`, `?`, `[...]`) that never crosses a `/`: `/system.slice/agent-*.service`,
`/kubepods.slice/kubepods-burstable.slice/*`. A cgroup is managed when it, or one of its
ancestors, matches a pattern: everything below a managed cgroup is managed too, as the
kernel program decides it (it walks the task's ancestors). With no patterns every cgroup
but the agent's own is managed.

Patterns may name cgroups that do not exist yet; those are found when they appear.
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Iterator, Sequence

# bpf/redirect.c looks at the ancestors at levels 0..MAX_CGROUP_DEPTH-1
MAX_CGROUP_DEPTH = 16
_GLOB = set("*?[")


def components(path: str) -> tuple[str, ...]:
    return tuple(c for c in path.split("/") if c)


def pattern_error(pattern: str) -> str | None:
    """Why pattern cannot be used (None: it can)."""
    if not pattern.startswith("/"):
        return "must start with / (it is relative to the cgroup v2 root)"
    parts = components(pattern)
    if any(p in (".", "..") for p in parts):
        return "may not contain . or .. components"
    if any("**" in p for p in parts):
        return "** is not supported: a * matches within one path component"
    if len(parts) >= MAX_CGROUP_DEPTH:
        return f"is {len(parts)} levels deep; at most {MAX_CGROUP_DEPTH - 1} are supported"
    return None


class CgroupMatcher:
    """inject.managed_cgroups, compiled: the patterns and the agent's own cgroup."""

    def __init__(self, patterns: Sequence[str], own_cgroup: str = ""):
        for p in patterns:
            err = pattern_error(p)
            if err:
                raise ValueError(f"inject.managed_cgroups {p!r} {err}")
        self.patterns = list(patterns)
        self._parts = [components(p) for p in patterns]
        self.own_cgroup = own_cgroup

    @property
    def all_cgroups(self) -> bool:
        """No patterns: every cgroup but the agent's own is managed."""
        return not self.patterns

    @property
    def levels(self) -> set[int]:
        """The depths below the root at which a pattern names cgroups."""
        return {len(p) for p in self._parts}

    def matching(self, path: str) -> list[str]:
        """The patterns naming exactly this cgroup."""
        parts = components(path)
        return [
            pat
            for pat, pp in zip(self.patterns, self._parts, strict=True)
            if len(pp) == len(parts) and all(map(fnmatch.fnmatchcase, parts, pp))
        ]

    def is_managed(self, cgroup: str | None) -> bool:
        """Whether a process in this cgroup (a path from /proc/PID/cgroup; None: no such
        process) is managed: the cgroup or an ancestor matches."""
        if cgroup is None:
            return False
        if self.all_cgroups:
            return cgroup != self.own_cgroup
        parts = components(cgroup)
        return any(
            len(pp) <= len(parts) and all(map(fnmatch.fnmatchcase, parts, pp)) for pp in self._parts
        )

    def existing(self, root: str) -> dict[str, int]:
        """{path: cgroup id} of the cgroups under root (the v2 mount) matching a pattern
        now."""
        found: dict[str, int] = {}
        for parts in self._parts:
            for rel in _expand(root, parts):
                path = "/" + "/".join(rel)
                try:
                    found[path] = os.stat(os.path.join(root, *rel)).st_ino
                except FileNotFoundError:  # removed while we looked
                    continue
        return found

    def unmatched(self, root: str) -> list[str]:
        """The patterns no cgroup matches yet."""
        return [
            pat
            for pat, parts in zip(self.patterns, self._parts, strict=True)
            if next(_expand(root, parts), None) is None
        ]


def _expand(root: str, parts: tuple[str, ...], done: tuple[str, ...] = ()) -> Iterator[tuple]:
    """The existing directories under root whose components match parts, one by one."""
    if not parts:
        yield done
        return
    head, rest = parts[0], parts[1:]
    here = os.path.join(root, *done)
    if not _GLOB & set(head):
        if os.path.isdir(os.path.join(here, head)):
            yield from _expand(root, rest, (*done, head))
        return
    try:
        entries = sorted(e.name for e in os.scandir(here) if e.is_dir(follow_symlinks=False))
    except (FileNotFoundError, NotADirectoryError):
        return
    for name in entries:
        if fnmatch.fnmatchcase(name, head):
            yield from _expand(root, rest, (*done, name))


def cgroups_at(root: str, levels: set[int]) -> Iterator[tuple[str, int]]:
    """(path, id) of every cgroup at these depths below root: to name the ids the kernel
    left PENDING while no agent looked."""
    deepest = max(levels, default=0)

    def walk(rel: tuple[str, ...]) -> Iterator[tuple[str, int]]:
        here = os.path.join(root, *rel)
        try:
            with os.scandir(here) as it:
                dirs = [e for e in it if e.is_dir(follow_symlinks=False)]
        except FileNotFoundError:
            return
        for e in dirs:
            child = (*rel, e.name)
            if len(child) in levels:
                try:
                    yield "/" + "/".join(child), e.inode()
                except FileNotFoundError:
                    continue
            if len(child) < deepest:
                yield from walk(child)

    if 0 in levels:
        yield "/", os.stat(root).st_ino
    yield from walk(())


def describe(patterns: Sequence[str], root: str) -> tuple[list[str], list[str]]:
    """For an operator: ("PATTERN: N cgroups now" per matching pattern, the patterns
    matching nothing yet)."""
    matcher = CgroupMatcher(patterns)
    found = matcher.existing(root)
    unmatched = matcher.unmatched(root)
    counts = []
    for pat in patterns:
        if pat not in unmatched:
            n = sum(1 for path in found if pat in matcher.matching(path))
            counts.append(f"{pat}: {n} cgroup{'s' if n != 1 else ''} now")
    return counts, unmatched
