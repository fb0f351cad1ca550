"""Which processes earn work done before their first request (pre-warmed tokens,
agent/oauth/prewarm.py; placeholder files, agent/inject/phantom_files.py): one that has just
exec'd a program, in a managed cgroup, and matches a registration entry. A fork's image
(source "fork") is its parent's program, about to exec another; a process seeded at start-up
was running before the agent; an unmanaged cgroup's connections are not intercepted. One
rule, here, so the two cannot come to disagree on it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from agent.identity.sources import Identity


class Resolver(Protocol):
    def resolve(self, attestation: Any, quiet: bool = False) -> Identity | None: ...


def starting_identity(
    image: Any, attestation: Any, managed: Callable[[Any], bool], identities: Resolver
) -> Identity | None:
    """The identity of a process starting a program that earns work ahead of its requests;
    None for anything else."""
    if image.source != "exec" or not managed(attestation):
        return None
    return identities.resolve(attestation, quiet=True)
