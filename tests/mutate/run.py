"""`make mutate`: mutation testing of the security-critical modules, scored per module.

Runs mutmut 3 from the repository root (its settings are setup.cfg's [mutmut]: which modules
it mutates, and the unit suite as the tests that must kill each mutant), then reads its
verdicts (`mutmut results --all true`) and prints, per module, how many mutants were made,
killed, survived, timed out and reached no test; the score; and every surviving mutant that
tests/mutate/equivalent.txt does not explain. Exits non-zero only when mutmut itself fails:
a survivor is a finding to triage (docs/mutation.md), not a broken build.

    python -m tests.mutate.run [--max-children N] [--no-run] [--show] [MUTANT_GLOB ...]

mutmut keeps its copy of the tree and its verdicts in mutants/ (ignored by git) and, run
again, re-tests only the functions that changed; remove mutants/ for a run from scratch.
"""

from __future__ import annotations

import argparse
import configparser
import fnmatch
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
EQUIVALENT = Path(__file__).resolve().parent / "equivalent.txt"
# the console script beside this interpreter: `python -m mutmut` re-imports its own
# __main__ and warns, and the venv's mutmut is the pinned one
MUTMUT = str(Path(sys.executable).with_name("mutmut"))

# mutmut's verdicts (mutmut/stats.py status_by_exit_code), grouped as the report counts them
KILLED = {"killed", "timeout", "caught by type check", "segfault"}
COLUMNS = ("mutants", "killed", "survived", "timeout", "no tests", "equivalent", "other")
_RESULT = re.compile(r"^\s+(\S+__mutmut_\d+): (.+)$")


@dataclass
class Tally:
    counts: Counter = field(default_factory=Counter)
    survivors: list[str] = field(default_factory=list)  # survived, not explained

    def add(self, name: str, status: str, equivalent: bool) -> None:
        c = self.counts
        c["mutants"] += 1
        if status in KILLED:
            c["killed"] += 1
            if status == "timeout":
                c["timeout"] += 1
        elif equivalent and status in ("survived", "no tests"):
            c["equivalent"] += 1
        elif status == "survived":
            c["survived"] += 1
            self.survivors.append(name)
        elif status == "no tests":
            c["no tests"] += 1
            self.survivors.append(name)
        else:  # skipped, suspicious, not checked, interrupted
            c["other"] += 1

    @property
    def scored(self) -> int:
        """The mutants the score is over: all but the equivalent and those with no verdict
        (skipped, not checked). One no unit test reaches counts, as not killed: the code it
        changed is checked by no unit test."""
        return self.counts["mutants"] - self.counts["equivalent"] - self.counts["other"]

    @property
    def score(self) -> float:
        return self.counts["killed"] / self.scored if self.scored else 0.0


def parse_results(text: str) -> dict[str, str]:
    """mutant name -> status, from `mutmut results --all true`."""
    return {m[1]: m[2].strip() for m in map(_RESULT.match, text.splitlines()) if m}


def parse_equivalents(text: str) -> dict[str, str]:
    """mutant name -> why it cannot change behaviour, from equivalent.txt: one mutant a
    line, its name then the reason; lines starting with `#` are comments."""
    out = {}
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, _, reason = line.partition(" ")
        if "__mutmut_" not in name or not reason.strip():
            raise ValueError(f"{EQUIVALENT.name}:{n}: expected `MUTANT_NAME reason`, got {line!r}")
        out[name] = reason.strip()
    return out


def module_of(mutant: str) -> str:
    """agent.inject.decide.x_decide__mutmut_3 -> inject.decide (a function's mangled name
    has no dot: methods are spelled xǁClassǁmethod)."""
    return mutant.rsplit(".", 1)[0].removeprefix("agent.")


def tally(results: dict[str, str], equivalents: dict[str, str]) -> dict[str, Tally]:
    per_module: dict[str, Tally] = {}
    for name, status in sorted(results.items()):
        per_module.setdefault(module_of(name), Tally()).add(name, status, name in equivalents)
    return per_module


def render(per_module: dict[str, Tally]) -> str:
    total = Tally()
    rows = []
    for module, t in per_module.items():
        total.counts.update(t.counts)
        total.survivors += t.survivors
        rows.append((module, t))
    rows.append(("total", total))
    width = max(len(m) for m, _ in rows)
    lines = [f"{'module':<{width}}  " + "  ".join(f"{c:>10}" for c in COLUMNS) + "       score"]
    for module, t in rows:
        cells = "  ".join(f"{t.counts[c]:>10}" for c in COLUMNS)
        lines.append(f"{module:<{width}}  {cells}  {t.score:>9.1%}")
    c = total.counts
    reached = total.scored - c["no tests"]
    lines.append(
        f"\nmutation score: {c['killed']}/{total.scored} killed ({total.score:.1%}); "
        f"of the {reached} a unit test reaches, {c['killed'] / reached if reached else 0:.1%}; "
        f"{c['equivalent']} equivalent (tests/mutate/equivalent.txt), {c['no tests']} "
        f"reached by no unit test, {c['other']} without a verdict"
    )
    return "\n".join(lines)


def diff(name: str) -> str:
    """A mutant's diff. mutmut's own renderer in this process where its layout is the known
    one (`mutmut show` starts an interpreter per mutant: a second or more each)."""
    try:
        from mutmut.mutation.diff_apply import get_diff_for_mutant
    except ImportError:  # another mutmut layout: its CLI
        return mutmut("show", name, capture=True).stdout
    return get_diff_for_mutant(name)


def refresh_unmutated(repo: Path = REPO) -> list[str]:
    """mutmut copies the tree into mutants/ once and later regenerates only the modules it
    mutates: any other file under its source_paths keeps its first copy, and a test written
    against a newer one then fails there (the clean run stops) or passes against the old.
    So do the tests themselves (tests/, which it copies too: a test added since ran against
    the old copy, and the mutants it kills stayed survivors) and the data in also_copy.
    Copy anew each such file that differs from its source; returns their paths."""
    cfg = configparser.ConfigParser()
    cfg.read(repo / "setup.cfg")
    settings = cfg["mutmut"] if cfg.has_section("mutmut") else {}

    def paths(key: str) -> list[str]:
        return [v.strip() for v in settings.get(key, "").splitlines() if v.strip()]

    mutated = paths("only_mutate")
    refreshed = []
    for top in [*paths("source_paths"), *paths("also_copy"), "tests"]:
        tree = repo / top
        for source in [tree] if tree.is_file() else sorted(tree.rglob("*")):
            rel = source.relative_to(repo)
            if source.is_dir() or {"__pycache__", "node_modules"} & set(rel.parts):
                continue
            if rel.suffix == ".py" and any(fnmatch.fnmatch(str(rel), g) for g in mutated):
                continue  # mutmut's own: regenerated when its source changes
            copy = repo / "mutants" / rel
            if copy.exists() and copy.read_bytes() != source.read_bytes():
                shutil.copy2(source, copy)
                refreshed.append(str(rel))
    return refreshed


def mutmut(*args: str, capture: bool = False) -> subprocess.CompletedProcess:
    return subprocess.run([MUTMUT, *args], cwd=REPO, text=True, capture_output=capture, check=False)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--max-children", type=int, help="parallel test workers (default: CPUs)")
    ap.add_argument("--no-run", action="store_true", help="report the last run's verdicts")
    ap.add_argument("--show", action="store_true", help="print each survivor's diff")
    ap.add_argument("mutants", nargs="*", help="re-test only these (mutmut globs)")
    args = ap.parse_args(argv)
    os.chdir(REPO)  # mutmut reads setup.cfg and mutants/ from the working directory
    if not args.no_run:
        for path in refresh_unmutated():
            print(f"make mutate: mutants/{path} refreshed (not mutated, changed since copied)")
        run = ["run", *(["--max-children", str(args.max_children)] if args.max_children else [])]
        if mutmut(*run, *args.mutants).returncode != 0:
            print("make mutate: mutmut run failed (see above)", file=sys.stderr)
            return 2
    listed = mutmut("results", "--all", "true", capture=True)
    if listed.returncode != 0:
        print(f"make mutate: mutmut results failed:\n{listed.stderr}", file=sys.stderr)
        return 2
    results = parse_results(listed.stdout)
    if not results:
        print("make mutate: mutmut reported no mutants (has it run?)", file=sys.stderr)
        return 2
    equivalents = parse_equivalents(EQUIVALENT.read_text()) if EQUIVALENT.exists() else {}
    per_module = tally(results, equivalents)
    print(render(per_module))
    stale = sorted(n for n in equivalents if n not in results or results[n] in KILLED)
    if stale:
        print(f"\n{EQUIVALENT.name} lists {len(stale)} mutant(s) killed or no longer made:")
        print("".join(f"  {n}\n" for n in stale), end="")
    for module, t in per_module.items():
        if not t.survivors:
            continue
        print(f"\n{module}: {len(t.survivors)} not killed")
        for name in t.survivors:
            print(f"  {name}  ({results[name]})")
            if args.show:
                print(diff(name))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
