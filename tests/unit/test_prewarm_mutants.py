"""The pre-fetch on exec (agent/oauth/prewarm.py), found by mutation testing: the default
bound on fetches at once, the metric's series and help as a scrape reads them, which
identity and server the policy and the identity manager are asked about, that a denied or
coalesced server does not stop the next one, and the lines an operator reads for a fetch
(the token named by fingerprint only) and for a failure (the error).

The identity manager and the OAuth service are the fakes of tests/unit/test_prewarm.py,
on a real event loop in a thread of its own as the OAuth service runs it."""

from __future__ import annotations

from types import SimpleNamespace

from prometheus_client import CollectorRegistry

from agent.oauth.prewarm import OUTCOMES, Prewarmer
from tests.unit import test_prewarm, test_tokens_mutants
from tests.unit.test_prewarm import EXEC, FakeIdentities, FakeTokens, Process, count, make, on_loop

loop = test_prewarm.loop  # an event loop running in a thread of its own
debug_lines = test_tokens_mutants.debug_lines  # the diagnostic stream at debug, parsed

BOT = "spiffe://example.org/bot"


def wait(futures) -> None:
    for f in futures:
        f.result(timeout=10)


def test_at_most_four_fetches_run_at_once_by_default(loop):
    warm, tokens, _ids, _registry = make(loop, servers=("a", "b"))
    futures = []
    for n in range(5):
        futures += warm.attested(EXEC, Process(n, f"{BOT}{n}"))
    on_loop(loop, lambda: None)  # every scheduled fetch has started or queued
    assert tokens.most == 4
    on_loop(loop, tokens.gate.set)
    wait(futures)
    assert len(tokens.calls) == 10 and tokens.most == 4


def test_every_server_and_outcome_is_a_series_from_the_start_with_its_meaning_in_help(loop):
    _warm, _tokens, _ids, registry = make(loop, servers=("a", "b"))
    for server in ("a", "b"):
        for outcome in OUTCOMES:
            labels = {"server": server, "outcome": outcome}
            assert registry.get_sample_value("credless_prewarm_total", labels) == 0
    (family,) = [f for f in registry.collect() if f.name == "credless_prewarm"]
    for outcome in OUTCOMES:  # the help says what each outcome counts
        assert outcome in family.documentation


class RecordingIdentities(FakeIdentities):
    def __init__(self) -> None:
        super().__init__()
        self.idents: list[object] = []

    def note_use(self, ident, attestation) -> None:
        self.idents.append(ident)
        super().note_use(ident, attestation)


def test_the_identity_in_use_and_the_policys_question_name_the_process_and_server(loop):
    asked: list[tuple[str, str]] = []
    ids = RecordingIdentities()
    tokens = FakeTokens(loop)
    tokens.gate.set()

    def allowed(sid: str, server: str) -> bool:
        asked.append((sid, server))
        return server != "a"

    warm = Prewarmer(ids, tokens, ("a", "b"), allowed=allowed, registry=CollectorRegistry())
    wait(warm.attested(EXEC, Process(7, BOT)))
    assert [str(i.spiffe_id) for i in ids.idents] == [BOT] and ids.used == [7]
    assert asked == [(BOT, "a"), (BOT, "b")]
    # a denied server does not stop the next one
    assert tokens.calls == [(BOT, "b")]


def test_a_fetch_under_way_for_one_server_does_not_stop_the_next_one(loop):
    permitted = {"a"}
    warm, tokens, _ids, registry = make(
        loop, servers=("a", "b"), allowed=lambda _sid, server: server in permitted
    )
    first = warm.attested(EXEC, Process(1, BOT))  # a: under way, held at the gate
    permitted.add("b")
    second = warm.attested(EXEC, Process(2, BOT))
    assert len(first) == 1 and len(second) == 1  # a coalesced, b scheduled
    on_loop(loop, tokens.gate.set)
    wait(first + second)
    assert sorted(tokens.calls) == [(BOT, "a"), (BOT, "b")]
    assert count(registry, "a", "coalesced") == 1 and count(registry, "b", "fetched") == 1


def test_a_fetch_is_a_debug_line_naming_the_token_by_fingerprint(loop, debug_lines):
    warm, tokens, _ids, _registry = make(loop)
    tokens.gate.set()
    wait(warm.attested(EXEC, Process(1, BOT)))
    (line,) = [line for line in debug_lines() if line.get("component") == "prewarm"]
    assert line["level"] == "debug" and "pre-fetched" in line["event"]
    assert line["spiffe_id"] == BOT and line["server"] == "weather"
    assert line["token_sha256"] == "f" * 64


def test_a_fetch_that_returns_no_fingerprint_logs_none(loop, debug_lines):
    class Bare(FakeTokens):
        async def token(self, ident, server, challenge=None):
            return SimpleNamespace()

    warm = Prewarmer(FakeIdentities(), Bare(loop), ("weather",), registry=CollectorRegistry())
    wait(warm.attested(EXEC, Process(1, BOT)))
    (line,) = [line for line in debug_lines() if line.get("component") == "prewarm"]
    assert line["token_sha256"] is None and line["server"] == "weather"


def test_a_failed_fetch_is_a_warning_naming_the_identity_server_and_error(loop, debug_lines):
    warm, tokens, _ids, registry = make(loop, fail=True)
    tokens.gate.set()
    wait(warm.attested(EXEC, Process(1, BOT)))
    (line,) = [line for line in debug_lines() if line.get("component") == "prewarm"]
    assert line["level"] == "warning" and "pre-fetch on exec failed" in line["event"]
    assert line["spiffe_id"] == BOT and line["server"] == "weather"
    assert line["error"] == "the authorization server is down"
    assert count(registry, "weather", "failed") == 1
