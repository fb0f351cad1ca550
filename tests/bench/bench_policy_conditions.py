"""bench-policy-conditions: what a policy decision costs with a condition (`when`, CEL).

Pinned to one CPU. Each figure is a whole Policy.decide of a tools/call, best of 5 runs:
without a condition (the baseline), with a prefix derived from the SPIFFE ID, with a test of
the caller's selectors, with a regex (the library compiles it on every evaluation), and the
bounded worst cases: a regex over a 1 MiB argument and a comprehension over the most
values a condition may read. docs/policy.md has the figures and the choice of library.

Prints: policy-conditions-bench: <name>_us=X ...
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from agent.policy import conditions, rules

SID = "spiffe://example.org/agent/a"
SELECTORS = ["unix:uid:1000", "unix:gid:1000", "cgroup:path:/agents"]


def rule(id_: str, tool: str, when: str = "") -> dict:
    r = {"id": id_, "spiffe_id": SID, "server": "db", "methods": ["tools/call"], "tools": [tool]}
    return r | ({"when": when} if when else {})


POLICY = rules.parse(
    {
        "rule": [
            rule("plain", "echo"),
            rule("files", "write_file", 'args.path.startsWith("/srv" + spiffe.path + "/")'),
            rule("uid", "admin", '"unix:uid:1000" in selectors'),
            rule("sql", "query", '!args.sql.matches("(?i)\\\\b(drop|delete|update)\\\\b")'),
            rule("ids", "tag", "args.ids.all(i, type(i) == int && i > 0)"),
        ]
    }
)


def per_call_us(fn: Callable[[], object], n: int) -> float:
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - start) / n)
    return best * 1e6


def decide(tool: str, args: dict) -> Callable[[], object]:
    def run() -> object:
        d = POLICY.decide(SID, "db", "tools/call", tool, args, SELECTORS)
        if not d.allowed:
            raise SystemExit(f"bench: {tool} denied: {d.reason}")
        return d

    return run


def main() -> None:
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    figures = {
        "no_condition": per_call_us(decide("echo", {"text": "hi"}), 20000),
        "prefix": per_call_us(decide("write_file", {"path": "/srv/agent/a/out.csv"}), 20000),
        "selectors": per_call_us(decide("admin", {}), 20000),
        "regex": per_call_us(decide("query", {"sql": "SELECT name FROM t WHERE id = 1"}), 1000),
        "regex_1mib": per_call_us(decide("query", {"sql": "SELECT " + "a" * (1 << 20)}), 10),
        "all_max_items": per_call_us(
            decide("tag", {"ids": list(range(1, conditions.MAX_ARGUMENT_ITEMS - 1))}), 20
        ),
    }
    print("policy-conditions-bench: " + " ".join(f"{k}_us={v:.1f}" for k, v in figures.items()))


if __name__ == "__main__":
    main()
