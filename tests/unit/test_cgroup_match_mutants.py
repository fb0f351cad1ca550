"""Which cgroups inject.managed_cgroups names (agent/inject/cgroup_match.py), found by
mutation testing: a `.` component refused, a cgroup removed while the tree is read, links
in the tree never followed by a glob, the walk of cgroups_at (no levels, the root's own
level, no deeper than asked) and the count doctor shows for one cgroup. A directory tree
under tmp_path stands in for the cgroup v2 mount."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest

from agent.inject import cgroup_match
from agent.inject.cgroup_match import CgroupMatcher, cgroups_at, describe, pattern_error
from tests.unit.test_redirect_cgroup_match import tree  # noqa: F401 (a fixture)


class _Os:
    """The module's `os`, but for the calls a test replaces."""

    def __init__(self, **replaced: Any):
        self.__dict__.update(replaced)

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)


@pytest.mark.parametrize("pattern", ["/a/./b", "/.", "/system.slice/."])
def test_a_dot_component_is_refused_like_a_dot_dot(pattern):
    assert pattern_error(pattern) == pattern_error("/a/../b")
    with pytest.raises(ValueError, match="may not contain"):
        CgroupMatcher([pattern])


def test_a_cgroup_removed_while_the_tree_is_read_leaves_the_others_found(tree, monkeypatch):
    gone = os.path.join(tree, "system.slice", "agent-a.service")

    def stat(path, *args, **kwargs):
        if path == gone:  # removed between the listing and its stat
            os.rmdir(os.path.join(gone, "sub"))
            os.rmdir(gone)
        return os.stat(path, *args, **kwargs)

    monkeypatch.setattr(cgroup_match, "os", _Os(stat=stat))
    found = CgroupMatcher(["/system.slice/*"]).existing(tree)
    assert sorted(found) == ["/system.slice/agent-b.service", "/system.slice/ssh.service"]


def test_a_link_in_the_tree_is_not_a_cgroup_a_glob_or_the_walk_follows(tree):
    os.mkdir(os.path.join(tree, "user.slice", "elsewhere.service"))
    os.symlink(
        os.path.join(tree, "user.slice"), os.path.join(tree, "system.slice", "linked.service")
    )
    m = CgroupMatcher(["/system.slice/*.service"])
    assert "/system.slice/linked.service" not in m.existing(tree)
    assert CgroupMatcher(["/system.slice/linked.*"]).unmatched(tree) == ["/system.slice/linked.*"]
    at = dict(cgroups_at(tree, {2, 3}))
    assert "/system.slice/linked.service" not in at
    assert "/system.slice/linked.service/elsewhere.service" not in at


def test_cgroups_at_no_level_names_none(tree):
    assert list(cgroups_at(tree, set())) == []
    assert list(cgroups_at(tree, CgroupMatcher([]).levels)) == []


def test_cgroups_at_the_roots_level_names_the_root(tree):
    at = dict(cgroups_at(tree, {0, 1}))
    assert at["/"] == os.stat(tree).st_ino
    assert sorted(at) == ["/", "/system.slice", "/user.slice"]


def test_cgroups_at_lists_no_directory_below_the_deepest_level_asked(tree, monkeypatch):
    listed: list[str] = []

    def scandir(path: str) -> Iterator[os.DirEntry]:
        listed.append(os.path.relpath(path, tree))
        return os.scandir(path)

    monkeypatch.setattr(cgroup_match, "os", _Os(scandir=scandir))
    assert sorted(dict(cgroups_at(tree, {1}))) == ["/system.slice", "/user.slice"]
    assert listed == ["."]
    listed.clear()
    assert len(dict(cgroups_at(tree, {2}))) == 3
    assert sorted(listed) == [".", "system.slice", "user.slice"]


def test_doctor_counts_one_cgroup_in_the_singular(tree):
    counts, unmatched = describe(["/user.slice", "/system.slice/*.service"], tree)
    assert counts == ["/user.slice: 1 cgroup now", "/system.slice/*.service: 3 cgroups now"]
    assert unmatched == []
