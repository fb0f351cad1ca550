"""The full path's own answers (agent/inject/refusals.py), found by mutation testing: the
status line, the Connection: close of an answer after which the connection is closed, the
event id the answer names, the audit's fields (a phantom misuse's identities, a malformed
request's cause), what of the request is read for the answer (its JSON-RPC ids, never the
body of a request refused for what it is, nor one the workload has not sent: Expect:
100-continue) and what is dropped so that the next request on a kept connection is framed
where it begins.

Sans-IO: the functions on a stand-in client connection (a ClientSide on a recording
transport) with a real Recorder writing its audit to memory."""

from __future__ import annotations

import asyncio
import io
import json
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from agent.inject import answers, decide, refusals
from agent.inject.decide import Verdict
from agent.inject.flows import ClientSide
from agent.inject.http1 import HEAD, ProtocolError
from agent.inject.record import AuditBase, Recorder
from agent.oauth.errors import DiscoveryError
from agent.oauth.trust import AuthorizationServerCertificateRefused
from agent.observe.logging import AuditLog
from agent.policy.jsonrpc import Call
from tests.unit.test_fast_path import SID, UP
from tests.unit.transport import Transport

RPC = b'{"jsonrpc":"2.0","id":7,"method":"tools/list"}'
NEXT = b"GET /next HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n\r\n"


class Side:
    """A workload's connection and the recorder the proxy would hand the functions."""

    def __init__(self) -> None:
        self.audit_out = io.StringIO()
        self.registry = CollectorRegistry()
        self.rec = Recorder(AuditLog("node", stream=self.audit_out), self.registry)
        self.client = ClientSide(lambda c: None)
        self.client.connection_made(Transport())
        self.fragment = self.rec.fragment(server=UP.name, spiffe_id=SID)

    def known(self) -> Side:
        self.client.served = (UP, self.fragment)
        return self

    async def head(self, request: bytes):
        self.client.data_received(request)
        ev = await self.client.next()
        assert ev is not None and ev[0] == HEAD
        return ev[1]

    def base(self) -> AuditBase:
        return AuditBase({"method": "POST", "path": "/mcp"}, self.fragment)

    def events(self, name: str) -> list[dict]:
        lines = [json.loads(x) for x in self.audit_out.getvalue().splitlines()]
        return [e for e in lines if e["event"] == name]

    @property
    def out(self) -> bytes:
        return self.client.transport.out

    def fields(self) -> dict[bytes, list[bytes]]:
        head = self.out.split(b"\r\n\r\n", 1)[0]
        got: dict[bytes, list[bytes]] = {}
        for line in head.split(b"\r\n")[1:]:
            k, v = line.split(b":", 1)
            got.setdefault(k.strip().lower(), []).append(v.strip())
        return got

    def closes(self) -> bool:
        return [v.lower() for v in self.fields().get(b"connection", [])] == [b"close"]

    def answer(self) -> Any:
        return json.loads(self.out.split(b"\r\n\r\n", 1)[1])

    async def next_is_the_next_request(self) -> bool:
        """Whether what the client reads next is the request after the refused one."""
        self.client.data_received(NEXT)
        ev = await self.client.next()
        return ev is not None and ev[0] == HEAD and ev[1].target == b"/next"


def post(body: bytes, *fields: bytes, ctype: bytes = b"application/json") -> bytes:
    return (
        b"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n"
        b"Content-Type: %s\r\n%sContent-Length: %d\r\n\r\n%s"
        % (
            ctype,
            b"".join(f + b"\r\n" for f in fields),
            len(body),
            body,
        )
    )


def run(body):
    return asyncio.run(body())


# ---------------------------------------------------------------- slow_request, malformed
def test_a_slow_request_is_answered_408_closing_and_naming_its_audit_event():
    async def body():
        s = Side().known()
        refusals.slow_request(s.rec, s.client, 2.5)
        assert s.out.startswith(b"HTTP/1.1 408 Request Timeout\r\n") and s.closes()
        [event] = s.events("request.failed")
        assert s.answer()["event_id"] == event["event_id"]
        assert event["server"] == UP.name and event["spiffe_id"] == SID  # the connection's
        assert "2.5 s" in event["reason"]

    run(body)


@pytest.mark.parametrize(
    "status, line", [(400, b"400 Bad Request"), (431, b"431 Request Header Fields Too Large")]
)
def test_a_malformed_request_is_answered_by_its_status_closing_and_audited(status, line):
    async def body():
        s = Side().known()
        refusals.malformed(s.rec, s.client, ProtocolError("bad chunk size", status))
        assert s.out.startswith(b"HTTP/1.1 " + line + b"\r\n") and s.closes()
        [event] = s.events("request.denied")
        assert event["status"] == status and "bad chunk size" in event["reason"]
        assert s.answer()["event_id"] == event["event_id"]

    run(body)


def test_a_malformed_first_request_is_closed_all_the_same():
    async def body():
        s = Side()  # no server known yet: nothing to count or audit
        refusals.malformed(None, s.client, ProtocolError("bad"))  # type: ignore[arg-type]
        assert s.out.startswith(b"HTTP/1.1 400 Bad Request\r\n") and s.closes()
        refusals.slow_request(None, Side().client, 1.0)  # type: ignore[arg-type]

    run(body)


# ---------------------------------------------------------------- token_failed
def test_a_token_failure_is_a_502_naming_its_kind_and_cause_in_answer_and_audit():
    async def body():
        s = Side()
        head = await s.head(post(b"not json-rpc", ctype=b"text/plain"))
        e = DiscoveryError("no metadata at the issuer")
        await refusals.token_failed(s.rec, 4096, e, head, s.client, s.client, None, UP, s.base())
        assert s.out.startswith(b"HTTP/1.1 502 Bad Gateway\r\n")
        answer = s.answer()
        [event] = s.events("request.failed")
        assert event["kind"] == answer["kind"] == "discovery"
        assert event["reason"] == answer["detail"] == "no metadata at the issuer"
        assert answer["event_id"] == event["event_id"]
        assert await s.next_is_the_next_request()  # the unread body was dropped

    run(body)


def test_a_token_failure_answers_a_json_rpc_request_with_its_id_and_cause():
    async def body():
        s = Side()
        head = await s.head(post(RPC))
        e = DiscoveryError("no metadata")
        await refusals.token_failed(s.rec, 4096, e, head, s.client, s.client, None, UP, s.base())
        answer = s.answer()
        assert answer["id"] == 7 and answer["error"]["code"] == answers.TOKEN_FAILED
        assert answer["error"]["data"]["cause"] == "token_error"
        assert answer["error"]["data"]["kind"] == "discovery"

    run(body)


def test_a_certificate_refusal_names_the_party_whose_certificate_failed():
    async def body():
        s = Side()
        head = await s.head(post(b"x", ctype=b"text/plain"))
        tls = SimpleNamespace(describe=lambda: "the system CAs")
        e = AuthorizationServerCertificateRefused("https://as.example/token", "expired", tls)
        await refusals.token_failed(s.rec, 4096, e, head, s.client, s.client, None, UP, s.base())
        error = s.answer()["error"]
        assert "authorization server's certificate" in error
        assert "could not obtain a token" not in error

    run(body)


# ---------------------------------------------------------------- refuse
def verdict(**kw: Any) -> Verdict:
    fields: dict[str, Any] = dict(
        status=403, reason=b"Forbidden", message="credless: no", outcome="policy_denied"
    )
    return Verdict(decide.ANSWER, **{**fields, **kw})


async def refuse(s: Side, v: Verdict, request: bytes, **kw: Any) -> bool:
    head = await s.head(request)
    phantom = kw.pop("phantom", None)
    return await refusals.refuse(s.rec, phantom, 4096, v, head, s.client, UP, s.base(), **kw)


class Phantom:
    def __init__(self) -> None:
        self.misuses: list[tuple[Any, str]] = []

    def misused(self, binding: Any, server: str) -> None:
        self.misuses.append((binding, server))


def test_a_phantom_misuse_is_audited_with_both_identities_and_reported():
    async def body():
        s = Side()
        phantom = Phantom()
        binding = SimpleNamespace(spiffe_id="spiffe://example.org/holder", server="s1", jti="p-1")
        v = verdict(
            status=401, outcome="phantom_misuse", message="credless: not yours", misuse=binding
        )
        await refuse(s, v, post(b"x", ctype=b"text/plain"), phantom=phantom)
        [event] = s.events("phantom.misuse")
        assert event["status"] == 401 and event["reason"] == "credless: not yours"
        assert event["issued_to"] == binding.spiffe_id and event["issued_for"] == "s1"
        assert event["placeholder_jti"] == "p-1" and event["spiffe_id"] == SID
        assert phantom.misuses == [(binding, UP.name)]
        assert s.answer()["event_id"] == event["event_id"] and s.events("request.denied") == []

    run(body)


def test_a_refusal_without_misuse_is_denied_even_where_phantoms_are_verified():
    async def body():
        s = Side()
        phantom = Phantom()
        keep = await refuse(s, verdict(), post(b"x", ctype=b"text/plain"), phantom=phantom)
        assert keep and phantom.misuses == [] and s.events("phantom.misuse") == []
        [event] = s.events("request.denied")
        assert event["status"] == 403 and s.answer()["event_id"] == event["event_id"]

    run(body)


@pytest.mark.parametrize("expect", [b"100-continue", b"100-Continue"])
def test_a_request_awaiting_100_continue_is_answered_unread_and_closed(expect):
    async def body():
        s = Side()
        head = await s.head(
            b"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nContent-Type: application/json\r\n"
            b"Expect: " + expect + b"\r\nContent-Length: %d\r\n\r\n" % len(RPC)
        )  # the body is not sent: the workload awaits 100 Continue
        keep = await asyncio.wait_for(
            refusals.refuse(s.rec, None, 4096, verdict(), head, s.client, UP, s.base()), 5
        )
        assert keep is False and s.closes()
        assert s.answer()["id"] is None  # its ids unknown: never read

    run(body)


def test_a_head_decided_json_rpc_refusal_on_a_kept_connection_drops_the_body():
    async def body():
        s = Side()
        v = verdict(status=400, reason=b"Bad Request", rpc_code=-32600, outcome="header_mismatch")
        keep = await refuse(s, v, post(RPC))
        assert keep and not s.closes()
        answer = s.answer()
        assert answer["id"] is None and answer["error"]["code"] == -32600
        assert await s.next_is_the_next_request()

    run(body)


def test_a_plain_request_refused_on_a_kept_connection_has_its_body_dropped():
    async def body():
        s = Side()
        keep = await refuse(s, verdict(), post(b"plain text body", ctype=b"text/plain"))
        assert keep and "error" in s.answer()
        assert await s.next_is_the_next_request()

    run(body)


@pytest.mark.parametrize(
    "kw",
    [dict(outcome="framing_refused", close=False), dict(close=True)],
    ids=["unreadable", "close"],
)
def test_the_body_of_a_request_refused_for_what_it_is_or_closed_is_never_read(kw):
    async def body():
        s = Side()
        await refuse(s, verdict(**kw), post(RPC))
        assert s.answer()["id"] is None  # the ids of a body never read

    run(body)


def test_a_readable_json_rpc_request_keeps_its_id_and_cause():
    async def body():
        s = Side()
        await refuse(s, verdict(), post(RPC))
        answer = s.answer()
        assert answer["id"] == 7 and answer["error"]["data"]["cause"] == "policy_denied"

    run(body)


def test_decided_calls_are_answered_with_the_verdicts_code_not_as_a_batch_by_default():
    async def body():
        s = Side()
        calls = [Call("tools/call", "rm", 9, True)]
        v = verdict(rpc_code=-32001)
        await refuse(s, v, post(b'{"jsonrpc":"2.0","id":9}'), calls=calls)
        answer = s.answer()
        assert isinstance(answer, dict) and answer["id"] == 9
        assert answer["error"]["code"] == -32001

    run(body)


def test_a_405_names_what_is_allowed_and_other_refusals_no_allow():
    async def body():
        s = Side()
        v = verdict(status=405, reason=b"Method Not Allowed", allow=b"GET, POST")
        await refuse(s, v, post(b"x", ctype=b"text/plain"))
        assert s.fields()[b"allow"] == [b"GET, POST"]
        other = Side()
        await refuse(other, verdict(), post(b"x", ctype=b"text/plain"))
        assert b"allow" not in other.fields()

    run(body)
