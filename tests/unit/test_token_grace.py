"""Tokens outlive an identity's last process by oauth.token_grace_seconds, never their own
expiry (agent/oauth/cache.py grace_deadline, agent/oauth/service.py forget/resume/drop).

The service runs on an event loop whose clock the test moves (`ClockLoop`): its timers fire
when the test says the time has come, and the service's wall clock moves with it."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json

import pytest

from agent import config
from agent.oauth.cache import TokenCache, grace_deadline
from agent.oauth.service import OAuthService
from agent.observe.logging import AuditLog
from tests.unit.test_oauth_units import tok

SID = "spiffe://example.org/agent/cli"
OTHER = "spiffe://example.org/agent/other"
T0 = 1_900_000_000.0


# ---------------------------------------------------------------- the deadline alone
def test_the_grace_period_is_cut_at_the_latest_expiry() -> None:
    assert grace_deadline([tok(T0, ttl=600)], T0, 300) == T0 + 300
    assert grace_deadline([tok(T0, ttl=100)], T0, 300) == T0 + 100
    assert grace_deadline([tok(T0, ttl=100), tok(T0, ttl=200)], T0, 300) == T0 + 200


@pytest.mark.parametrize(
    "tokens,grace",
    [
        ([tok(T0, ttl=600)], 0),  # 0: drop at once
        ([], 300),  # nothing to keep
        ([tok(T0 - 600, ttl=300)], 300),  # expired: helps nobody
    ],
    ids=["no-grace", "no-token", "expired"],
)
def test_nothing_is_kept_without_grace_or_a_valid_token(tokens, grace) -> None:
    assert grace_deadline(tokens, T0, grace) is None


# ---------------------------------------------------------------- the service, on a clock
class ClockLoop(asyncio.SelectorEventLoop):
    """An event loop whose time the test sets: timers due by then run on the next step."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0

    def time(self) -> float:
        return self.now


class Grace:
    def __init__(self, tmp_path, grace: float):
        self.loop = ClockLoop()
        self.audit_out = io.StringIO()
        cfg = config.parse({"oauth": {"token_grace_seconds": grace}})
        self.svc = OAuthService(
            cfg,
            identity=None,  # type: ignore[arg-type]  # no assertion is minted here
            state_dir=str(tmp_path),
            audit=AuditLog("node", self.audit_out),
            clock=lambda: T0 + self.loop.now,
        )
        self.fetches = 0

        async def fetch(key):  # the authorization server: a token living `ttl`
            self.fetches += 1
            return dataclasses.replace(
                tok(T0 + self.loop.now, ttl=self.ttl, name=f"t{self.fetches}"), spiffe_id=key[0]
            )

        self.ttl = 600.0
        self.svc.cache = TokenCache(fetch, clock=self.svc.clock)

    def step(self, coro=None):
        """Run coro (or one idle step) on the loop, with every timer due by now."""
        return self.loop.run_until_complete(coro if coro is not None else asyncio.sleep(0))

    def advance(self, seconds: float) -> None:
        self.loop.now += seconds
        for _ in range(3):  # the timer, then the drop task it starts
            self.step()

    def token(self, sid: str = SID):
        key = (sid, "s", "http://127.0.0.1:9/mcp", "")
        t = self.step(self.svc.cache.get(key))
        return t, self.svc.dpop_key(sid).jkt

    def held(self, sid: str = SID) -> list[str]:
        return [t.fingerprint for k, t in self.svc.cache.tokens() if k[0] == sid]

    def ended(self) -> list[dict]:
        lines = self.audit_out.getvalue().splitlines()
        return [e for e in map(json.loads, lines) if e["event"] == "identity.ended"]


@pytest.fixture
def grace(tmp_path):
    g = Grace(tmp_path, 300)
    yield g
    g.loop.close()


def test_the_next_process_within_the_grace_reuses_the_token_and_its_dpop_key(grace) -> None:
    first, jkt = grace.token()
    out = grace.step(grace.svc.forget(SID))  # the last process exits
    assert out == {"tokens_kept": 1, "kept_until": T0 + 300}
    grace.advance(299)
    assert grace.held() == [first.fingerprint] and grace.ended() == []
    assert grace.svc.resume(SID)  # a new process of the identity
    again, jkt_again = grace.token()
    assert (again.fingerprint, jkt_again) == (first.fingerprint, jkt)
    assert grace.fetches == 1
    grace.advance(3600)  # the cancelled drop never comes
    assert grace.ended() == [] and grace.held() == [first.fingerprint]


def test_when_the_grace_ends_the_tokens_and_the_key_go(grace) -> None:
    first, jkt = grace.token()
    grace.token(OTHER)
    grace.step(grace.svc.forget(SID))
    grace.advance(300)
    assert grace.held() == [] and len(grace.held(OTHER)) == 1  # the other identity's stay
    (ended,) = grace.ended()
    assert ended["spiffe_id"] == SID and ended["tokens_dropped"] == 1
    assert ended["dpop_key_destroyed"] is True
    later, jkt_later = grace.token()
    assert later.fingerprint != first.fingerprint and jkt_later != jkt
    assert grace.fetches == 3


def test_the_grace_never_outlasts_the_token(grace) -> None:
    grace.ttl = 100
    grace.token()
    assert grace.step(grace.svc.forget(SID))["kept_until"] == T0 + 100
    grace.advance(99)
    assert grace.ended() == []
    grace.advance(1)
    assert len(grace.ended()) == 1 and grace.held() == []


def test_a_second_end_starts_the_grace_again(grace) -> None:
    grace.token()
    grace.step(grace.svc.forget(SID))
    grace.advance(200)
    grace.svc.resume(SID)
    grace.step(grace.svc.forget(SID))  # that process exits too, 200 s in
    grace.advance(299)
    assert grace.ended() == []
    grace.advance(1)
    assert len(grace.ended()) == 1


def test_stopping_the_service_cancels_pending_drops(grace) -> None:
    grace.token()
    grace.step(grace.svc.forget(SID))
    grace.step(grace.svc.stop())
    grace.advance(3600)
    assert grace.ended() == []


def test_with_no_grace_the_tokens_go_at_once(tmp_path) -> None:
    g = Grace(tmp_path, 0)
    try:
        g.token()
        out = g.step(g.svc.forget(SID))
        assert out == {"tokens_dropped": 1, "clients_deleted": []}
        assert g.held() == [] and len(g.ended()) == 1
    finally:
        g.loop.close()


# ---------------------------------------------------------------- what drives it
def test_the_identity_manager_says_when_an_identity_starts_and_ends(tmp_path) -> None:
    """on_identity_ended calls forget (agent/wiring.py), on_identity_started resume: once
    per identity going from one live process to none, and from none to one."""
    from types import SimpleNamespace

    from prometheus_client import CollectorRegistry

    from agent.config import IdentitySection
    from agent.identity.manager import IdentityManager

    entries = tmp_path / "entries.toml"
    entries.write_text(f'[[entry]]\nid = "a"\nspiffe_id = "{SID}"\nselectors = ["unix:uid:0"]\n')
    mgr = IdentityManager(
        IdentitySection(entries_file=str(entries)), str(tmp_path), registry=CollectorRegistry()
    )
    mgr.start()
    try:
        seen: list[tuple[str, str]] = []
        mgr.on_identity_started.append(lambda sid: seen.append(("started", sid)))
        mgr.on_identity_ended.append(lambda sid: seen.append(("ended", sid)))
        att = SimpleNamespace(selectors=frozenset({"unix:uid:0"}), tgid=10, start_ns=1, exe="/x")
        ident = mgr.resolve(SimpleNamespace(**vars(att), cgroup_path="/t"))
        assert ident is not None
        image = lambda tgid: SimpleNamespace(tgid=tgid, exec_ns=tgid * 10)  # noqa: E731
        exit_of = lambda tgid: SimpleNamespace(type=3, tgid=tgid, exec_ns=tgid * 10)  # noqa: E731
        mgr.note_use(ident, image(10))
        mgr.note_use(ident, image(10))  # its next request: no new start
        mgr.note_use(ident, image(11))  # a second process: the identity was live already
        mgr.process_event(exit_of(10))
        mgr.process_event(exit_of(11))
        mgr.note_use(ident, image(12))  # the next run, within the grace
        assert seen == [("started", SID), ("ended", SID), ("started", SID)]
    finally:
        mgr.stop()
