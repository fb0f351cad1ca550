"""resolve_cgroup over the real-world samples in tests/testdata/cgroups/paths.tsv."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.attest.resolvers import CgroupFacts, CgroupPathError, resolve_cgroup

TABLE = Path(__file__).resolve().parent.parent / "testdata" / "cgroups" / "paths.tsv"
COLUMNS = (
    "id",
    "path",
    "systemd_unit",
    "systemd_slice",
    "container_runtime",
    "container_id",
    "pod_uid",
    "qos_class",
    "user_manager_uid",
)


def _rows() -> list[dict[str, str]]:
    rows = []
    for lineno, line in enumerate(TABLE.read_text().splitlines(), start=1):
        if not line.strip() or line.startswith("#"):
            continue
        cells = line.split("\t")
        assert len(cells) == len(COLUMNS), f"{TABLE.name}:{lineno}: want {len(COLUMNS)} cells"
        rows.append(dict(zip(COLUMNS, cells, strict=False)))
    return rows


def _expected(row: dict[str, str]) -> CgroupFacts:
    def cell(name: str) -> str | None:
        return None if row[name] == "-" else row[name]

    uid = cell("user_manager_uid")
    return CgroupFacts(
        systemd_unit=cell("systemd_unit"),
        systemd_slice=cell("systemd_slice"),
        container_runtime=cell("container_runtime"),
        container_id=cell("container_id"),
        pod_uid=cell("pod_uid"),
        qos_class=cell("qos_class"),
        user_manager_uid=int(uid) if uid is not None else None,
    )


ROWS = _rows()


def test_table_is_big_enough_and_ids_unique():
    assert len(ROWS) >= 25
    ids = [r["id"] for r in ROWS]
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize("row", ROWS, ids=[r["id"] for r in ROWS])
def test_resolve_cgroup(row):
    assert resolve_cgroup(row["path"]) == _expected(row)


@pytest.mark.parametrize("row", ROWS, ids=[r["id"] for r in ROWS])
def test_trailing_slash_and_doubled_slashes_do_not_change_the_facts(row):
    path = row["path"].replace("/", "//") + "/"
    assert resolve_cgroup(path) == _expected(row)


@pytest.mark.parametrize(
    "path, message",
    [
        (
            "",
            "cgroup path '' is not absolute: pass the part after '0::' of a /proc/<pid>/cgroup"
            " line, e.g. '/system.slice/nginx.service'",
        ),
        (
            "0::/system.slice/nginx.service",
            "cgroup path '0::/system.slice/nginx.service' is not absolute: pass the part after "
            "'0::' of a /proc/<pid>/cgroup line, e.g. '/system.slice/nginx.service'",
        ),
        (
            "/../../system.slice/nginx.service",
            "cgroup path '/../../system.slice/nginx.service' lies outside the reader's cgroup "
            "namespace; run the agent in the host cgroup namespace (on Kubernetes: a privileged "
            "container, which containerd and CRI-O keep there) so paths start at the real root",
        ),
    ],
    ids=["empty", "whole-proc-line", "outside-namespace"],
)
def test_unresolvable_paths_say_what_to_pass(path, message):
    with pytest.raises(CgroupPathError) as exc:
        resolve_cgroup(path)
    assert str(exc.value) == message
    assert isinstance(exc.value, ValueError)


def test_facts_are_immutable():
    facts = resolve_cgroup("/system.slice/nginx.service")
    with pytest.raises(AttributeError):
        facts.systemd_unit = "sshd.service"  # type: ignore[misc]
