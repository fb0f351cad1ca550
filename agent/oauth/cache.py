"""The token cache: one token per (SPIFFE ID, server, resource, scope), in memory only.

- Refresh ahead: after `refresh_ahead` of a token's lifetime a background refresh starts,
  while callers keep getting the still-valid token.
- Single flight: however many callers want the same key at once, one request goes out and
  all of them await it.
- Backoff: a failed request schedules the next attempt with exponential backoff and full
  jitter; a still-valid token keeps being served meanwhile (the authorization server being
  down must not take working workloads down with it before their tokens expire).
- A caller with no valid token gets the error (typed), never a stale token.
- Grace (`grace_deadline`): an identity's tokens may outlive its last process, never their
  own expiry (docs/tokens.md); the OAuth service schedules the drop.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Hashable, Iterable
from dataclasses import dataclass
from typing import Generic, TypeVar

from agent.oauth.errors import OAuthError, ServerUnavailable
from agent.oauth.tokens import Token
from agent.observe.logging import get_logger

log = get_logger("oauth.cache")


@dataclass
class _Entry:
    token: Token | None = None
    failures: int = 0
    next_attempt: float = 0.0
    last_error: OAuthError | None = None


Key = TypeVar("Key", bound=Hashable)


def grace_deadline(tokens: Iterable[Token], now: float, grace: float) -> float | None:
    """Until when an identity's tokens are kept after its last process exits: `grace` from
    now, but never past the latest expiry among them (an expired token helps nobody). None:
    drop them now (no grace, or nothing valid left to keep)."""
    if grace <= 0:
        return None
    valid = [t.expires_at for t in tokens if t.valid(now)]
    if not valid:
        return None
    return min(now + grace, max(valid))


async def _awaited(aw: Awaitable[object]) -> object:
    return await aw


class GraceTimers:
    """The pending drops of identities whose last process has exited, on the event loop's
    own timer (monotonic: a wall-clock step neither stretches nor cuts a grace period).
    Used from the loop only."""

    def __init__(self) -> None:
        self._pending: dict[str, asyncio.TimerHandle] = {}
        self._running: set[asyncio.Task[object]] = set()

    def __bool__(self) -> bool:
        return bool(self._pending)

    def start(self, key: str, delay: float, drop: Callable[[], Awaitable[object]]) -> None:
        """drop() runs after delay unless cancel(key) comes first."""
        self.cancel(key)
        self._pending[key] = asyncio.get_running_loop().call_later(delay, self._fire, key, drop)

    def _fire(self, key: str, drop: Callable[[], Awaitable[object]]) -> None:
        self._pending.pop(key, None)
        task: asyncio.Task[object] = asyncio.get_running_loop().create_task(_awaited(drop()))
        self._running.add(task)  # held until done: the loop keeps only weak references
        task.add_done_callback(self._running.discard)

    def cancel(self, key: str) -> bool:
        """Cancel key's pending drop; whether there was one."""
        handle = self._pending.pop(key, None)
        if handle is not None:
            handle.cancel()
        return handle is not None

    def cancel_all(self) -> None:
        for handle in self._pending.values():
            handle.cancel()
        self._pending.clear()


class TokenCache(Generic[Key]):
    def __init__(
        self,
        fetch: Callable[[Key], Awaitable[Token]],
        *,
        refresh_ahead: float = 0.8,
        backoff_base: float = 0.5,
        backoff_max: float = 60.0,
        clock: Callable[[], float] = time.time,
        on_event: Callable[[str, Key, object], None] | None = None,
    ):
        self._fetch = fetch
        self.refresh_ahead = refresh_ahead
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.clock = clock
        self._entries: dict[Key, _Entry] = {}
        self._inflight: dict[Key, asyncio.Task[Token]] = {}
        self._on_event = on_event or (lambda *_: None)
        self.hits = 0
        self.misses = 0
        # bumped whenever a cached token changes (obtained, refreshed, invalidated, dropped):
        # a caller holding a token from peek() may keep using it while this stays the same
        self.generation = 0

    def __len__(self) -> int:
        return sum(1 for e in self._entries.values() if e.token is not None)

    def _refresh_at(self, t: Token) -> float:
        return t.issued_at + (t.expires_at - t.issued_at) * self.refresh_ahead

    def peek(self, key: Key) -> Token | None:
        """The valid token for key, or None; starts a refresh ahead of expiry when due."""
        entry = self._entries.get(key)
        if entry is None or entry.token is None:
            return None
        now = self.clock()
        if not entry.token.valid(now):
            return None
        self.hits += 1
        if (
            now >= self._refresh_at(entry.token)
            and now >= entry.next_attempt
            and key not in self._inflight
        ):
            log.debug(
                "token refresh started",
                key=key,  # (SPIFFE ID, server, ...) for the OAuth service's keys
                token_sha256=entry.token.fingerprint,
            )
            self._start(key, refresh=True)
        return entry.token

    async def get(self, key: Key) -> Token:
        token = self.peek(key)
        if token is not None:
            return token
        entry = self._entries.get(key)
        now = self.clock()
        self.misses += 1
        if (
            entry is not None
            and now < entry.next_attempt
            and key not in self._inflight
            and entry.last_error is not None
        ):
            raise entry.last_error  # backing off: answer at once with the last failure
        task = self._inflight.get(key) or self._start(key, refresh=False)
        return await asyncio.shield(task)

    def _start(self, key: Key, refresh: bool) -> asyncio.Task[Token]:
        task = asyncio.get_running_loop().create_task(self._run(key, refresh))
        self._inflight[key] = task
        if refresh:  # nobody awaits a background refresh: keep its failure from warning
            task.add_done_callback(lambda t: t.cancelled() or t.exception())
        return task

    async def _run(self, key: Key, refresh: bool) -> Token:
        entry = self._entries.setdefault(key, _Entry())
        try:
            token = await self._fetch(key)
        except OAuthError as e:
            entry.failures += 1
            delay = min(self.backoff_max, self.backoff_base * 2 ** (entry.failures - 1))
            # full jitter for transient failures; client errors wait the whole step
            entry.next_attempt = self.clock() + (
                random.uniform(0, delay) if isinstance(e, ServerUnavailable) else delay  # noqa: S311 — jitter, not a secret
            )
            entry.last_error = e
            self._on_event("refresh_failed" if refresh else "failed", key, e)
            raise
        finally:
            # only its own: a fetch dropped (cancelled) may finish after a new one started
            if self._inflight.get(key) is asyncio.current_task():
                del self._inflight[key]
        entry.token, entry.failures, entry.next_attempt, entry.last_error = token, 0, 0.0, None
        self.generation += 1
        self._on_event("refreshed" if refresh else "obtained", key, token)
        return token

    def adopt(self, key: Key, token: Token) -> None:
        """Hold a token obtained elsewhere (handed over by the agent this one replaces:
        agent/handover_tokens.py); refreshed like any other from then on."""
        self._entries[key] = _Entry(token=token)
        self.generation += 1

    def invalidate(self, key: Key) -> None:
        """Forget a token the server rejected (invalid_token): the next get fetches anew."""
        entry = self._entries.get(key)
        if entry is not None:
            entry.token = None
            entry.next_attempt = 0.0
        self.generation += 1

    def drop(self, predicate: Callable[[Key], bool]) -> list[Key]:
        """Remove every entry whose key matches (e.g. all tokens of one SPIFFE ID)."""
        gone = [k for k in self._entries if predicate(k)]
        self.generation += 1
        for k in gone:
            del self._entries[k]
            task = self._inflight.pop(k, None)
            if task is not None:
                task.cancel()
        return gone

    def tokens(self) -> list[tuple[Key, Token]]:
        return [(k, e.token) for k, e in self._entries.items() if e.token is not None]
