"""Every test the documents cite exists: docs/security.md says which test proves each
guarantee, and a renamed or deleted test must not leave a guarantee proved by nothing.

A citation is `tests/<path>.py` (or a bare `test_<name>.py`, any file of that name under
tests/), optionally `::test_name` (a test function or, ending in `*`, the prefix of several);
a bare `::test_name` after it cites the same file again.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCUMENTS = sorted(
    [*REPO.glob("docs/*.md"), REPO / "README.md", REPO / "ARCHITECTURE.md"],
    key=lambda p: p.name,
)
CITATION = re.compile(r"(tests/[\w/]+\.py|\btest_\w+\.py)?(?:::(test_[\w*]+))?")


def citations(text: str) -> list[tuple[str, str | None]]:
    found: list[tuple[str, str | None]] = []
    last = None
    for m in CITATION.finditer(text):
        path, name = m.groups()
        if path:
            last = path
        if path or (name and last):
            found.append((path or last, name))  # type: ignore[arg-type]
    return found


def defines(source: str, name: str) -> bool:
    stem = name.rstrip("*")
    pattern = rf"^\s*(?:async )?def {re.escape(stem)}" + ("" if name.endswith("*") else r"\b")
    return re.search(pattern, source, re.M) is not None


def test_citations_are_read_as_written() -> None:
    text = "`tests/unit/test_a.py::test_x`, `::test_y_*`, tests/integration/test_b.py, `::1`"
    assert citations(text + " and `test_c.py::test_z`") == [
        ("tests/unit/test_a.py", "test_x"),
        ("tests/unit/test_a.py", "test_y_*"),
        ("tests/integration/test_b.py", None),
        ("test_c.py", "test_z"),
    ]
    assert defines("def test_y_one():\n", "test_y_*")
    assert not defines("def test_xy():\n", "test_x")


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: p.name)
def test_every_cited_test_exists(document: Path) -> None:
    missing = []
    for path, name in citations(document.read_text()):
        files = [REPO / path] if "/" in path else list((REPO / "tests").rglob(path))
        files = [f for f in files if f.is_file()]
        if not files:
            missing.append(path)
        elif name and not any(defines(f.read_text(), name) for f in files):
            missing.append(f"{path}::{name}")
    assert not missing, f"{document.name} cites tests that do not exist: {missing}"
