"""The full path's own answers, in the server's place: each counted, audited and written.

A verdict's refusal (refuse: agent/inject/decide.py decided it), a request that cannot be
framed (malformed: agent/inject/http1.py refused it), one that stopped arriving
(slow_request: agent/inject/timeouts.py found it), and one whose token could not be obtained
(token_failed). What the answer says, and in which shape (a JSON-RPC error keeping the
request's ids, or the plain body), is agent/inject/answers.py's; this module decides what of
the request to read for it, and whether the connection stays open after it.

Functions, not methods: the proxy (agent/inject/proxy.py) calls them directly with what
they need of it (its recorder, the policy's body limit, the phantom verifier).
"""

from __future__ import annotations

from agent.inject import answers, decide
from agent.inject.bodies import EventSource, asked_of, drain_body
from agent.inject.decide import Verdict
from agent.inject.flows import ClientSide
from agent.inject.http1 import Head, ProtocolError
from agent.inject.phantom import PhantomVerifier
from agent.inject.record import AuditBase, Recorder
from agent.inject.upstreams import Upstream
from agent.oauth.errors import OAuthError
from agent.oauth.trust import CertificateRefused
from agent.policy import jsonrpc


def slow_request(rec: Recorder, client: ClientSide, seconds: float) -> None:
    """The request on client stopped arriving for seconds (timeouts.py's SLOW_REQUEST):
    answered 408, audited and counted when its server is known. The caller closes it."""
    up, fragment = client.served
    event_id = None
    if up is not None:
        rec.count(up, "request_timeout")
        event_id = rec.audit_answered(
            "request.failed",
            AuditBase({}, fragment),
            reason=f"the request stopped arriving for {seconds:g} s; connection closed",
        )
    # plain: the request never arrived whole, so what it was is unknown
    client.write(
        answers.response(
            answers.PLAIN,
            408,
            b"Request Timeout",
            "credless: the request stopped arriving",
            outcome="request_timeout",
            event_id=event_id,
            headers=[(b"Connection", b"close")],
        )
    )


def malformed(rec: Recorder, client: ClientSide, e: ProtocolError) -> None:
    """What the workload sent cannot be framed as a request credless accepts (http1.py):
    answered, audited and counted, and the connection closed (where the next request
    would begin is not known)."""
    up, fragment = client.served
    outcome = "head_too_large" if e.status == 431 else "malformed"
    event_id = None
    if up is not None:
        rec.count(up, outcome)
        event_id = rec.audit_answered(
            "request.denied",
            AuditBase({}, fragment),
            status=e.status,
            reason=f"malformed HTTP: {e}; connection closed",
        )
    reason = b"Request Header Fields Too Large" if e.status == 431 else b"Bad Request"
    # plain: a request that cannot be framed has no body to read, nor one to trust
    client.write(
        answers.response(
            answers.PLAIN,
            e.status,
            reason,
            f"credless: malformed HTTP: {e}",
            outcome=outcome,
            event_id=event_id,
            headers=[(b"Connection", b"close")],
        )
    )


async def token_failed(
    rec: Recorder,
    max_body: int,
    e: OAuthError,
    head: Head,
    client: ClientSide,
    src: EventSource,
    asked: answers.Asked | None,
    up: Upstream,
    audit_base: AuditBase,
) -> None:
    """No token for a request that needs one: its body read (bounded, for the ids of a
    JSON-RPC request) or dropped, the failure counted, audited and answered 502."""
    if asked is None:
        asked = await asked_of(src, head, max_body, readable=True, drain=True)
    rec.count(up, "token_error")
    event_id = rec.audit_answered("request.failed", audit_base, reason=str(e), kind=e.kind)
    client.write(
        answers.response(
            asked,
            502,
            b"Bad Gateway",
            f"credless: the {e.party}'s certificate did not verify"
            if isinstance(e, CertificateRefused)
            else "credless: could not obtain a token from the authorization server",
            outcome="token_error",
            event_id=event_id,
            kind=e.kind,
            detail=str(e),
        )
    )
    await client.drain()


async def refuse(
    rec: Recorder,
    phantom: PhantomVerifier | None,
    max_body: int,
    verdict: Verdict,
    head: Head,
    client: ClientSide,
    up: Upstream,
    audit_base: AuditBase,
    calls: list[jsonrpc.Call] | None = None,
    batch: bool = False,
    event_id: str | None = None,
) -> bool:
    """Carry out a refusal: count it, audit it (unless the calls' records did: their
    event_id is given), answer it (unless the verdict is to close), and say whether the
    connection stays open. calls: the body's calls when it was read whole and decided
    ([]: over the limit). A request whose body is unread is answered and its connection
    closed if the workload awaits 100 Continue or the verdict says close; otherwise its
    body is read and dropped first, so the next request on the connection is framed
    where it begins: read whole, when it may be JSON-RPC, for the ids the answer keeps."""
    rec.count(up, verdict.outcome)
    if verdict.misuse is not None and phantom is not None:
        # a placeholder out of its holder's hands: both identities (the caller's is the
        # connection's spiffe_id), then the response (phantom_misuse = "revoke": the
        # holder's real token revoked, so its next request obtains another)
        event_id = rec.audit_answered(
            "phantom.misuse",
            audit_base,
            status=verdict.status,
            reason=verdict.message,
            issued_to=verdict.misuse.spiffe_id,
            issued_for=verdict.misuse.server,
            placeholder_jti=verdict.misuse.jti,
        )
        phantom.misused(verdict.misuse, up.name)
    if event_id is None:
        event_id = rec.audit_answered(
            "request.denied", audit_base, status=verdict.status or None, reason=verdict.message
        )
    if verdict.action == decide.CLOSE:
        return False
    expect = head.get(b"expect")
    continues = expect is not None and expect.lower() == b"100-continue"
    keep = head.keep_alive and not verdict.close and not continues
    if calls is not None:  # read whole and decided (the verdict has its code)
        asked = answers.by_calls(calls, batch)
    elif verdict.rpc_code is not None:  # decided by the head alone: its code, id null
        if keep:
            await drain_body(client)
        asked = answers.UNREAD_RPC
    else:
        # read where it would be drained anyway, or where only the workload's request
        # closes the connection: never the body of a request refused for what it is
        # (UNREADABLE, or a verdict to close), nor one not sent (awaiting 100 Continue)
        readable = not (verdict.close or continues or verdict.outcome in answers.UNREADABLE)
        asked = await asked_of(client, head, max_body, readable=readable, drain=keep)
    extra = [(b"Allow", verdict.allow)] if verdict.allow else []
    if not keep:
        extra.append((b"Connection", b"close"))
    client.write(
        answers.response(
            asked,
            verdict.status,
            verdict.reason,
            verdict.message,
            outcome=verdict.outcome,
            event_id=event_id,
            rpc_code=verdict.rpc_code,
            headers=extra,
        )
    )
    await client.drain()
    return keep
