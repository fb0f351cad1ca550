"""The live policy: loaded at start, reloaded on SIGHUP or file change (an invalid file is
refused and the previous policy stays), asked by the proxy for every call."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable
from typing import Any

from prometheus_client import Counter

from agent.observe.logging import get_logger
from agent.policy.rules import Decision, Policy, PolicyError, load

log = get_logger("policy")


class PolicyEngine:
    name = "policy"

    def __init__(self, cfg: Any, servers: set[str], registry: Any = None):
        self.m_reloads = Counter(
            "credless_policy_reloads", "Policy file reloads", ["result"], registry=registry
        )
        self.m_decisions = Counter(
            "credless_policy_decisions",
            "Policy decisions",
            ["server", "decision"],
            registry=registry,
        )
        self.cfg = cfg  # agent.config.PolicySection
        self.servers = servers
        self.policy: Policy | None = None
        self._mtime = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self.cfg.file:
            self.reload(initial=True)
            self._thread = threading.Thread(target=self._watch, name="policy-watch", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def reload(self, initial: bool = False) -> bool:
        if not self.cfg.file:
            return True
        try:
            mtime = os.stat(self.cfg.file).st_mtime
            policy = load(self.cfg.file, self.servers)
        except (PolicyError, OSError) as e:
            self.m_reloads.labels("error").inc()
            if initial:
                raise
            log.error("policy not reloaded; keeping the previous one", error=str(e))
            return False
        self.policy, self._mtime = policy, mtime
        self.m_reloads.labels("ok").inc()
        log.info("policy loaded", rules=len(policy.rules), file=self.cfg.file)
        return True

    def _watch(self) -> None:
        while not self._stop.wait(1.0):
            try:
                if os.stat(self.cfg.file).st_mtime != self._mtime:
                    self.reload()
            except OSError:
                pass

    def decide(
        self,
        spiffe_id: str,
        server: str,
        method: str,
        name: str | None,
        parent_spiffe_id: str | None = None,
        /,
        args: Any = None,
        selectors: Iterable[str] = (),
    ) -> Decision:
        """args: the call's params.arguments (None: none); selectors: the calling process's
        attested selectors. Conditions read both; a sub-agent's parent is asked about the
        same call, made by the same process."""
        policy = self.policy
        if policy is None:
            d = Decision(True, None, "no policy configured")
        else:
            d = policy.decide(spiffe_id, server, method, name, args, selectors)
            if d.allowed and parent_spiffe_id and self.cfg.subagents == "restrict_to_parent":
                p = policy.decide(parent_spiffe_id, server, method, name, args, selectors)
                if not p.allowed:
                    d = Decision(
                        False,
                        p.rule_id,
                        f"sub-agent of {parent_spiffe_id}, which may not: {p.reason}",
                    )
        self.m_decisions.labels(server, "allow" if d.allowed else "deny").inc()
        log.debug(
            "policy decision",
            spiffe_id=spiffe_id,
            server=server,
            method=method,
            name=name,
            allowed=d.allowed,
            rule=d.rule_id,
            reason=d.reason,
        )
        return d
