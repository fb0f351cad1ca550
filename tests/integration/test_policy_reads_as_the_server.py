"""The policy decides the call the server runs: the official TypeScript MCP SDK's server,
behind credless on the real kernel, reports every tool it ran.

The SDK's server (createMcpExpressApp, i.e. express.json() and body-parser) decodes a JSON
body in the charset its Content-Type names, any utf-* through iconv-lite, UTF-7 included. In
UTF-7 `+AG4-` is `n` and `+AHM-` is `s`, so a body can read as `tools/call echo` to a UTF-8
reader and as a call of secret_tool to the server. Before credless refused such bodies (415),
the first case below ran secret_tool, which the policy denies, with credless's token
(docs/security.md, "Nothing gets past policy and audit").
"""

from __future__ import annotations

import json

import pytest

from tests.upstreams.harness import start_world
from tests.upstreams.wire import Piece

pytestmark = pytest.mark.kernel

ECHO = b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo","arguments":{}}}'
SECRET = ECHO.replace(b'"echo"', b'"secret_tool"')
# to the server (UTF-7): a second member "name" = "secret_tool", which JSON.parse keeps
SECOND_NAME = ECHO.replace(b'"arguments"', b'"+AG4-ame":"secret_tool","arguments"')
# to the server (UTF-7): "secret_tool"; to a UTF-8 reader "+AHM-ecret_tool", denied by no rule
SPELT = ECHO.replace(b'"echo"', b'"+AHM-ecret_tool"')


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    with start_world(tmp_path_factory.mktemp("sdk"), names=("sdk",)) as w:
        yield w


def call(world, content_type: bytes, body: bytes):
    """One POST from the managed workload: (status, JSON answer, tools the server ran,
    the audit's refusals)."""
    up = world.upstreams["sdk"]
    raw = (
        b"POST /mcp HTTP/1.1\r\nHost: %s\r\nContent-Type: %s\r\n"
        b"Accept: application/json, text/event-stream\r\nContent-Length: %d\r\n\r\n%s"
        % (up.authority.encode(), content_type, len(body), body)
    )
    obs = world.exchange(up, [Piece(raw)], expect=1)
    [status] = obs.answers.statuses
    ran = [r["name"] for r in obs.records["sdk"] if r["kind"] == "tool"]
    refusals = [e for e in obs.audit if e["event"] in ("request.denied", "call.denied")]
    return status, json.loads(obs.answers.responses[0].body), ran, refusals


def test_an_allowed_call_runs_and_a_denied_one_does_not(world):
    status, answer, ran, _ = call(world, b"application/json", ECHO)
    assert (status, ran) == (200, ["echo"]), answer
    status, answer, ran, refusals = call(world, b"application/json; charset=utf-8", SECRET)
    assert (status, ran) == (403, []), answer
    assert refusals


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        (b"application/json; charset=utf-7", SECOND_NAME),
        (b'application/json; charset="UTF-7"', SECOND_NAME),
        (b"application/json; charset=utf-7", SPELT),
    ],
    ids=["second-name", "quoted", "spelt"],
)
def test_a_body_the_server_would_decode_otherwise_is_refused_and_runs_nothing(
    world, content_type, body
):
    status, answer, ran, refusals = call(world, content_type, body)
    assert ran == [], f"the server ran {ran} behind a call the policy read otherwise"
    assert status == 415 and answer["error"]["code"] == -32600, answer
    assert [(e["event"], e["status"]) for e in refusals] == [("request.denied", 415)], refusals
    assert content_type.decode() in refusals[0]["reason"]
