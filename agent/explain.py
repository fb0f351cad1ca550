"""`credless explain`: the chain a live process's request to a URL would go through.

Answered over the admin socket from the running agent's own state (agent/daemon.py registers
it); never a secret, only names, fingerprints and times.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from agent.wiring import Agent


def explain(agent: Agent, req: dict[str, Any]) -> dict[str, Any]:
    """The chain for req["pid"] and req["url"] (optional "method", "tool")."""
    raise RuntimeError("credless explain is not built yet")
