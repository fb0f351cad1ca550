"""agent/inject/cgroup_match.py: which cgroups inject.managed_cgroups names (the one
decision the redirect's map keeper, the pod listeners and doctor share)."""

from __future__ import annotations

import os

import pytest

from agent.inject.cgroup_match import CgroupMatcher, cgroups_at, describe, pattern_error

K8S = "/kubepods.slice/kubepods-burstable.slice/*"


# (patterns, cgroup, managed?): what inject.managed_cgroups means, for every reader of it
# (the redirect decision here; the pod listeners in tests/unit/test_netns.py)
MANAGED_CASES = [
    ([], "/kubepods.slice/pod1/cri-containerd-1.scope", True),  # all but the agent's own
    ([], "/system.slice/credless.service", False),
    ([], None, False),  # process gone
    (["/kubepods.slice"], "/kubepods.slice/pod1/c.scope", True),
    (["/kubepods.slice"], "/kubepods.slice", True),
    (["/kubepods.slice"], "/kubepods.slicer/pod1", False),  # a prefix is not a subtree
    (["/kubepods.slice/"], "/kubepods.slice/pod1", True),  # trailing slash
    (["/kubepods.slice"], "/system.slice/ssh.service", False),
    (["/"], "/anything", True),
    (["/system.slice/agent-*.service"], "/system.slice/agent-a.service", True),
    (["/system.slice/agent-*.service"], "/system.slice/agent-a.service/sub", True),
    (["/system.slice/agent-*.service"], "/system.slice/agent-.service", True),
    (["/system.slice/agent-*.service"], "/system.slice/other.service", False),
    (["/system.slice/agent-*.service"], "/system.slice", False),  # above it
    (["/*/agent.service"], "/system.slice/agent.service", True),
    (["/*"], "/a/b", True),  # a descendant of /a
    ([K8S], "/kubepods.slice/kubepods-burstable.slice/pod-1.slice/c.scope", True),
    ([K8S], "/kubepods.slice/kubepods-besteffort.slice/pod-1.slice", False),
    (["/a?c"], "/abc", True),
    (["/a[0-9]"], "/a7", True),
    (["/a[0-9]"], "/ax", False),
]


@pytest.mark.parametrize("patterns,cgroup,expected", MANAGED_CASES)
def test_a_cgroup_is_managed_when_it_or_an_ancestor_matches(patterns, cgroup, expected):
    m = CgroupMatcher(patterns, "/system.slice/credless.service")
    assert m.is_managed(cgroup) is expected


def test_a_star_never_crosses_a_slash():
    m = CgroupMatcher(["/system.slice/agent-*"])
    assert m.matching("/system.slice/agent-x") == ["/system.slice/agent-*"]
    assert m.matching("/system.slice/agent-x/y") == []  # managed, as a descendant, not a match
    assert m.levels == {2}


@pytest.mark.parametrize(
    "pattern,error",
    [
        ("system.slice", "must start with /"),
        ("/a/../b", "may not contain . or .."),
        ("/a/**", "** is not supported"),
        ("/" + "/".join("x" * 16), "at most 15"),
    ],
)
def test_unusable_patterns_are_refused_with_the_reason(pattern, error):
    assert error in (pattern_error(pattern) or "")
    with pytest.raises(ValueError, match=error.replace("*", r"\*").replace(".", r"\.")):
        CgroupMatcher([pattern])


@pytest.fixture
def tree(tmp_path):
    """A directory tree standing in for the cgroup v2 mount."""
    for d in (
        "system.slice/agent-a.service/sub",
        "system.slice/agent-b.service",
        "system.slice/ssh.service",
        "user.slice",
    ):
        (tmp_path / d).mkdir(parents=True)
    return str(tmp_path)


def test_existing_and_unmatched_read_the_tree(tree):
    m = CgroupMatcher(["/system.slice/agent-*.service", "/system.slice/later.service"])
    found = m.existing(tree)
    assert sorted(found) == ["/system.slice/agent-a.service", "/system.slice/agent-b.service"]
    assert (
        found["/system.slice/agent-a.service"]
        == os.stat(os.path.join(tree, "system.slice/agent-a.service")).st_ino
    )
    assert m.unmatched(tree) == ["/system.slice/later.service"]
    counts, unmatched = describe(m.patterns, tree)
    assert counts == ["/system.slice/agent-*.service: 2 cgroups now"]
    assert unmatched == ["/system.slice/later.service"]


def test_cgroups_at_names_every_cgroup_at_those_depths(tree):
    at2 = dict(cgroups_at(tree, {2}))
    assert sorted(at2) == [
        "/system.slice/agent-a.service",
        "/system.slice/agent-b.service",
        "/system.slice/ssh.service",
    ]
    assert (
        at2["/system.slice/ssh.service"]
        == os.stat(os.path.join(tree, "system.slice/ssh.service")).st_ino
    )
    assert sorted(dict(cgroups_at(tree, {1}))) == ["/system.slice", "/user.slice"]
