"""The live policy's lifecycle and the routing checks' words, left unpinned by the rest of
the suite (found by `make mutate`): loading at start (an invalid file stops the start),
reloading when the file changes and only then, what each reload logs and counts, the
metrics as Prometheus shows them, and the refusals of a batch or a duplicate name."""

from __future__ import annotations

import os
import threading

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from agent.config import PolicySection
from agent.policy import engine as engine_module
from agent.policy import jsonrpc, rules
from agent.policy.engine import PolicyEngine
from agent.policy.rules import PolicyError
from tests.helpers import wait_for

ALLOW_ECHO = """
[[rule]]
id = "echo"
spiffe_id = "spiffe://example.org/a"
server = "tools"
methods = ["tools/call"]
tools = ["echo"]
effect = "allow"
"""
ALLOW_BOTH = ALLOW_ECHO.replace('tools = ["echo"]', 'tools = ["echo", "delete"]')
SID = "spiffe://example.org/a"


def engine(path, registry=None) -> PolicyEngine:
    return PolicyEngine(
        PolicySection(file=str(path)), {"tools"}, registry=registry or CollectorRegistry()
    )


def may_delete(e: PolicyEngine) -> bool:
    return e.decide(SID, "tools", "tools/call", "delete").allowed


def reloads(registry: CollectorRegistry, result: str) -> float:
    return registry.get_sample_value("credless_policy_reloads_total", {"result": result}) or 0


class Ticks:
    """The watcher's stop event, driven by the test: each wait() is one poll, `n` of them
    before it says stop; records the period asked for."""

    def __init__(self, n: int):
        self.n, self.periods = n, []

    def wait(self, period: float) -> bool:
        self.periods.append(period)
        self.n -= 1
        return self.n < 0

    def set(self) -> None:
        self.n = 0


def test_the_watcher_reloads_when_the_file_changes_and_only_then(tmp_path):
    path = tmp_path / "policy.toml"
    path.write_text(ALLOW_ECHO)
    registry = CollectorRegistry()
    e = engine(path, registry)
    assert e.reload(initial=True)
    e._stop = Ticks(3)  # three polls of an unchanged file
    e._watch()
    assert reloads(registry, "ok") == 1 and not may_delete(e)
    assert e._stop.periods == [1.0] * 4  # a change is seen within a second
    path.write_text(ALLOW_BOTH)
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # surely another mtime
    e._stop = Ticks(1)
    e._watch()
    assert reloads(registry, "ok") == 2 and may_delete(e)


def test_a_vanished_file_keeps_the_watcher_and_the_policy(tmp_path):
    path = tmp_path / "policy.toml"
    path.write_text(ALLOW_BOTH)
    e = engine(path)
    e.reload(initial=True)
    path.unlink()
    e._stop = Ticks(2)
    e._watch()  # no error out of the thread
    assert may_delete(e)


def test_start_loads_the_policy_and_watches_it_until_stopped(tmp_path):
    path = tmp_path / "policy.toml"
    path.write_text(ALLOW_ECHO)
    registry = CollectorRegistry()
    e = engine(path, registry)
    before = set(threading.enumerate())
    e.start()
    try:
        watchers = [t for t in set(threading.enumerate()) - before if t.name == "policy-watch"]
        assert len(watchers) == 1 and watchers[0].daemon  # never holds the process up
        assert not may_delete(e)
        path.write_text(ALLOW_BOTH)
        st = os.stat(path)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
        wait_for(lambda: may_delete(e), what="the changed policy to be loaded")
    finally:
        e.stop()
    assert not watchers[0].is_alive()


def test_an_invalid_policy_file_stops_the_start(tmp_path):
    path = tmp_path / "policy.toml"
    path.write_text('[[rule]]\nid = "x"\neffect = "maybe"\n')
    e = engine(path)
    before = set(threading.enumerate())
    with pytest.raises(PolicyError):
        e.start()
    assert set(threading.enumerate()) - before == set()  # nothing left watching


def test_without_a_policy_file_there_is_nothing_to_watch():
    e = PolicyEngine(PolicySection(), {"tools"}, registry=CollectorRegistry())
    e.start()
    e.stop()
    assert e.reload() is True and e.decide(SID, "tools", "tools/call", "delete").allowed


class Log:
    """The engine's logger, as the test reads it: (level, event, fields) a call."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, str, dict]] = []

    def debug(self, event: str, **fields: object) -> None:
        self.lines.append(("debug", event, fields))

    def info(self, event: str, **fields: object) -> None:
        self.lines.append(("info", event, fields))

    def error(self, event: str, **fields: object) -> None:
        self.lines.append(("error", event, fields))


def test_each_reload_is_logged_with_what_came_of_it(tmp_path, monkeypatch):
    log = Log()
    monkeypatch.setattr(engine_module, "log", log)
    path = tmp_path / "policy.toml"
    path.write_text(ALLOW_ECHO)
    e = engine(path)
    assert e.reload(initial=True)
    path.write_text("not toml [")
    assert e.reload() is False
    loaded, refused = log.lines
    assert loaded == ("info", "policy loaded", {"rules": 1, "file": str(path)})
    assert refused[:2] == ("error", "policy not reloaded; keeping the previous one")
    assert list(refused[2]) == ["error"] and str(path) in str(refused[2]["error"])
    assert not may_delete(e)  # the previous policy stays


def test_the_policy_metrics_as_prometheus_shows_them(tmp_path):
    registry = CollectorRegistry()
    path = tmp_path / "policy.toml"
    path.write_text(ALLOW_ECHO)
    e = engine(path, registry)
    e.reload(initial=True)
    e.decide(SID, "tools", "tools/call", "echo")
    text = generate_latest(registry).decode()
    assert "# HELP credless_policy_reloads_total Policy file reloads\n" in text
    assert "# HELP credless_policy_decisions_total Policy decisions\n" in text
    assert 'credless_policy_decisions_total{decision="allow",server="tools"} 1.0' in text


# ---------------------------------------------------------------- the routing checks' words
def test_routing_headers_on_a_batch_are_refused_by_name():
    calls, _ = jsonrpc.parse_calls(
        b'[{"jsonrpc":"2.0","id":1,"method":"ping"},{"jsonrpc":"2.0","id":2,"method":"ping"}]'
    )
    assert jsonrpc.header_mismatch(calls, "ping", None) == "Mcp-Method/Mcp-Name headers on a batch"


def test_a_duplicate_member_name_is_echoed_cut_to_100_characters():
    name = "n" * 150
    body = b'{"jsonrpc":"2.0","id":1,"method":"x","%s":1,"%s":2}' % (
        name.encode(),
        name.encode(),
    )
    with pytest.raises(jsonrpc.Malformed) as err:
        jsonrpc.parse_calls(body)
    assert err.value.code == jsonrpc.INVALID_REQUEST
    assert err.value.message == f"duplicate member name {'n' * 100!r} in a JSON object"


def test_a_policy_given_as_data_is_named_policy_in_its_problems():
    with pytest.raises(PolicyError) as err:
        rules.parse({"rule": [{"id": "x", "server": "tools", "methods": ["*"]}]})
    problem = "required (a SPIFFE ID, or a glob over the whole ID)"
    assert str(err.value) == f'<policy>: rule[0] (id "x").spiffe_id: {problem}'
