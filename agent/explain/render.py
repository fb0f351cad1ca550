"""`credless explain`'s steps and how a person reads them.

agent/explain.py answers with a dict (`--json` prints it as it is); render() turns it into
lines: the outcome first, then each step in the order a request meets them, marked
`ok` (passes), `NO` (the request stops, or goes out uncredentialed, here) or `--` (not
applicable), with the reasons indented under it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

MARKS = {True: "ok", False: "NO", None: "--"}
TITLES = {
    "process": "process",
    "selectors": "selectors",
    "entries": "entries",
    "identity": "SPIFFE ID",
    "intercept": "intercept",
    "policy": "policy",
    "token": "token",
    "audit": "audit",
}


@dataclass
class Step:
    """One link of the chain: ok true (passes), false (stops here), None (not applicable)."""

    step: str
    ok: bool | None
    summary: str
    lines: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "ok": self.ok,
            "summary": self.summary,
            "lines": self.lines,
            "data": self.data,
        }


def render(answer: dict[str, Any]) -> str:
    """The answer of agent/explain.py as readable lines."""
    if "error" in answer:
        return f"credless: {answer['error']}"
    asked = f"pid {answer['pid']} → {answer['url']}"
    if answer.get("method"):
        asked += f"  {answer['method']}" + (f" {answer['tool']}" if answer.get("tool") else "")
    out = [asked, f"outcome: {answer['outcome']}", ""]
    width = max(len(t) for t in TITLES.values())
    for s in answer["steps"]:
        title = TITLES.get(s["step"], s["step"])
        out.append(f"{MARKS[s['ok']]:2}  {title:{width}}  {s['summary']}")
        out.extend(f"    {'':{width}}  {line}" for line in s["lines"])
    return "\n".join(out)


def failed(answer: dict[str, Any]) -> bool:
    """Whether the request would not be sent with a credential (the command's exit 1)."""
    return "error" in answer or any(s["ok"] is False for s in answer["steps"])
