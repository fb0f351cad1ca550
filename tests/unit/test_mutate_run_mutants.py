"""`make mutate` keeps mutmut's copy of the tree current: a module mutmut does not mutate is
copied into mutants/ once, so tests/mutate/run.py copies it anew when its source changed."""

from __future__ import annotations

from tests.mutate import run

SETUP_CFG = """\
[mutmut]
source_paths = pkg
# only these are mutated
only_mutate =
    pkg/sub/*
    pkg/checked.py
"""


def test_each_file_mutmut_does_not_mutate_is_copied_anew_when_its_source_changed(tmp_path):
    (tmp_path / "setup.cfg").write_text(SETUP_CFG)
    files = {
        "pkg/checked.py": ("new", "old"),  # mutated: mutmut's own to regenerate
        "pkg/sub/deep.py": ("new", "old"),  # mutated, by a glob
        "pkg/other.py": ("new", "old"),
        "pkg/sub/data.json": ("new", "old"),  # not Python: never mutated
        "pkg/same.py": ("same", "same"),
        "pkg/only_here.py": ("new", None),  # not copied yet: mutmut copies it
    }
    for rel, (source, copy) in files.items():
        for root, text in ((tmp_path, source), (tmp_path / "mutants", copy)):
            if text is not None:
                (root / rel).parent.mkdir(parents=True, exist_ok=True)
                (root / rel).write_text(text)
    assert run.refresh_unmutated(tmp_path) == ["pkg/other.py", "pkg/sub/data.json"]
    copies = {
        rel: (tmp_path / "mutants" / rel).read_text() for rel in files if rel != "pkg/only_here.py"
    }
    assert copies == {
        "pkg/checked.py": "old",
        "pkg/sub/deep.py": "old",
        "pkg/other.py": "new",
        "pkg/sub/data.json": "new",
        "pkg/same.py": "same",
    }
    assert not (tmp_path / "mutants/pkg/only_here.py").exists()


def test_nothing_is_refreshed_without_mutmut_settings_or_a_copy(tmp_path):
    assert run.refresh_unmutated(tmp_path) == []
    (tmp_path / "setup.cfg").write_text(SETUP_CFG)
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg/other.py").write_text("x")
    assert run.refresh_unmutated(tmp_path) == []


def test_the_tests_and_the_data_copied_beside_them_are_copied_anew_too(tmp_path):
    """A test added since mutmut copied tests/ ran against the old copy: the mutants it
    kills stayed survivors."""
    (tmp_path / "setup.cfg").write_text(SETUP_CFG + "also_copy =\n    README.md\n    docs\n")
    for rel in ("tests/unit/test_x.py", "README.md", "docs/a.md"):
        for root, text in ((tmp_path, "new"), (tmp_path / "mutants", "old")):
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_text(text)
    assert run.refresh_unmutated(tmp_path) == ["README.md", "docs/a.md", "tests/unit/test_x.py"]
    assert (tmp_path / "mutants/tests/unit/test_x.py").read_text() == "new"
