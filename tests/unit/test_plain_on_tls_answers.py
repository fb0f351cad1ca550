"""Plain HTTP sent to an https server's address (agent/inject/listeners.py): the TLS
listener answers 400 through agent/inject/answers.py, as the proxy answers: a JSON POST (an
MCP client's) gets a JSON-RPC error, id null, that names the audit event; any other request
the plain body with the event id. Only the head that arrived first is looked at, never the
body. In-process: a real TLS listener on 127.0.0.1, the redirect record faked."""

from __future__ import annotations

import asyncio
import io
import json

import pytest
from prometheus_client import CollectorRegistry

from agent.config import InjectSection
from agent.inject import answers
from agent.inject.listeners import ProxyListeners
from agent.inject.proxy import Proxy
from agent.inject.redirect import RedirectInfo
from agent.inject.tls import InjectionCA
from agent.inject.tls_listener import asked_by_head
from agent.inject.upstreams import Upstream
from agent.observe.logging import AuditLog
from tests.helpers import free_port
from tests.unit.test_fast_path import FakeAttestor, FakeIdentities, FakeOAuth, World

HTTPS_UP = Upstream(
    "weather",
    "https",
    "localhost",
    8443,
    "https://localhost:8443",
    "broker",
    b"/mcp",
    (b"localhost:8443",),
)
INFO = RedirectInfo("127.0.0.1", 8443, 100, 100, 0, 1, 1, 5, 1)
RPC = b'{"jsonrpc":"2.0","id":7,"method":"initialize"}'


class Redirected:
    """Every connection was redirected from 127.0.0.1:8443 (the https server's address)."""

    def __init__(self) -> None:
        self.forgotten = 0

    def lookup(self, peer, local, netns: int) -> RedirectInfo | None:
        return INFO

    def forget(self, peer, local, info: RedirectInfo) -> None:
        self.forgotten += 1

    def sender_changes(self, cookie: int) -> int | None:
        return 0

    def sender(self, cookie: int) -> int | None:
        return 0  # only the process that connected writes


def request(method: bytes, body: bytes, *fields: bytes) -> bytes:
    return b"%s /mcp HTTP/1.1\r\nHost: 127.0.0.1:8443\r\n%sContent-Length: %d\r\n\r\n%s" % (
        method,
        b"".join(f + b"\r\n" for f in fields),
        len(body),
        body,
    )


async def plain_to_tls(tmp_path, data: bytes) -> tuple[int, dict, list[dict], CollectorRegistry]:
    """data sent in clear to a TLS listener: the answer's status and body, the audit."""
    out = io.StringIO()
    registry = CollectorRegistry()
    redirect = Redirected()
    cfg = InjectSection(
        listen_host="127.0.0.1",
        listen_port=free_port(),
        listen_port6=free_port(),
        tls_listen_port=free_port(),
    )
    proxy = Proxy(
        cfg,
        {("127.0.0.1", 8443): HTTPS_UP},
        redirect,
        FakeAttestor((1, 5)),
        FakeIdentities(),
        FakeOAuth(World()),
        audit=AuditLog("node", stream=out),
        registry=registry,
    )
    listeners = ProxyListeners(cfg, proxy, InjectionCA(tmp_path / "state"))
    await listeners.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", cfg.tls_listen_port)
        writer.write(data)
        await writer.drain()
        answer = await reader.read()  # to the end: the listener closes after its answer
        writer.close()
    finally:
        await listeners.stop()
        proxy.close()
    assert redirect.forgotten == 1
    head, body = answer.split(b"\r\n\r\n", 1)
    events = [json.loads(line) for line in out.getvalue().splitlines()]
    return int(head.split(b" ", 2)[1]), json.loads(body), events, registry


def test_a_json_rpc_post_in_clear_gets_a_json_rpc_error_naming_its_event(tmp_path):
    status, body, events, registry = asyncio.run(
        plain_to_tls(tmp_path, request(b"POST", RPC, b"Content-Type: application/json"))
    )
    assert status == 400
    assert body["jsonrpc"] == "2.0" and body["id"] is None  # the body was never read
    error = body["error"]
    assert error["code"] == answers.REQUEST_REFUSED
    assert "is an https server and this request is plain HTTP" in error["message"]
    assert "https://localhost:8443/mcp" in error["message"]
    event_id = error["data"]["event_id"]
    assert f"(audit event {event_id})" in error["message"]
    [denied] = [e for e in events if e["event"] == "request.denied"]
    assert denied["event_id"] == event_id and denied["status"] == 400
    assert denied["server"] == "weather" and denied["pid"] == INFO.tgid
    assert (
        registry.get_sample_value(
            "credless_injected_requests_total",
            {"server": "weather", "mode": "broker", "outcome": "plain_http_to_https"},
        )
        == 1
    )


@pytest.mark.parametrize(
    "data",
    [
        request(b"GET", b""),  # not a JSON POST
        request(b"POST", b"a=b", b"Content-Type: application/x-www-form-urlencoded"),
        b"POST /mcp HTTP/1.1\r\nContent-Type: application/json\r\nConte",  # head cut short
        b"\x00\x01 not http at all\r\n\r\n",
    ],
    ids=["get", "form-post", "partial-head", "garbage"],
)
def test_anything_else_gets_the_plain_body_with_the_event_id(tmp_path, data):
    status, body, events, _ = asyncio.run(plain_to_tls(tmp_path, data))
    assert status == 400
    assert "is an https server and this request is plain HTTP" in body["error"]
    [denied] = [e for e in events if e["event"] == "request.denied"]
    assert body["event_id"] == denied["event_id"]


def test_only_a_whole_head_shapes_the_answer_and_the_body_is_not_needed():
    json_post = request(b"POST", RPC, b"Content-Type: application/json")
    assert asked_by_head(json_post, 1 << 16, 100) == answers.UNREAD_RPC
    head_only = json_post[: json_post.index(b"\r\n\r\n") + 4]
    assert asked_by_head(head_only, 1 << 16, 100) == answers.UNREAD_RPC
    assert asked_by_head(head_only[:-2], 1 << 16, 100) == answers.PLAIN
    assert asked_by_head(json_post, 16, 100) == answers.PLAIN  # a head over the limit
    assert asked_by_head(b"", 1 << 16, 100) == answers.PLAIN
