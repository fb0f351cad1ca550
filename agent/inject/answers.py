"""The answers credless gives in the server's place, shaped for whoever asked. Sans-IO.

An MCP client shows a JSON-RPC error's message; given any other body at a non-2xx status,
the Python SDK shows only "Server returned an error response" (the TypeScript SDK shows the
raw body text). So a refusal of a JSON-RPC request is a JSON-RPC error that keeps the
request's id(s), with a code per cause (CODES; docs/errors.md), the human message and the
audit event's id; any other request keeps the plain `{"error": ...}` body. The HTTP status
is the same either way: clients and operators key on it.

What the request was (Asked) is learnt from its head and, when read, its body:
- a body read and parsed as JSON-RPC: its calls, whose ids the error keeps;
- a POST saying `Content-Type: application/json` whose body was not read (a refusal that
  closes the connection, or a body never sent: Expect: 100-continue, or over the limit):
  one error with id null, which JSON-RPC prescribes when the id is unknown and both SDKs
  still show (the Python SDK puts its request's id in);
- anything else, or a body that did not parse as JSON-RPC: the plain body.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from typing import Any, Protocol

from agent.inject import http1
from agent.observe.logging import redact_secrets, scrub_json
from agent.policy import jsonrpc

# credless's own codes, in JSON-RPC's implementation-defined range (-32000..-32099), clear of
# those MCP and its SDKs use there (-32000..-32002, -32020..-32022, -32042)
NO_IDENTITY = -32081  # 403: the calling process has no SPIFFE identity
NOT_FOR_THIS_SERVER = -32082  # 403 path / 421 Host: not the configured server's endpoint
WORKLOAD_CREDENTIALS = -32083  # 400: the workload sent Authorization/DPoP (reject mode)
REQUEST_REFUSED = -32084  # 400/405/501: a request credless cannot frame or route safely
TOKEN_FAILED = -32085  # 502: no token from the authorization server
UPSTREAM_FAILED = -32086  # 502: the MCP server unreachable, or closed without answering
UPSTREAM_TIMEOUT = -32087  # 504: the MCP server did not answer in time
CREDENTIAL_REFUSED = -32088  # 502: the MCP server refused the credential credless sent
PLACEHOLDER_REFUSED = -32080  # 403/401: a phantom placeholder not the caller's, or invalid

# A refusal's outcome label (decide.Verdict.outcome, the request counter's) -> its code, for
# the refusals whose verdict names none (Verdict.rpc_code wins: parse errors, header
# mismatch, 413, 415 and policy denials carry theirs).
CODES: dict[str, int] = {
    "unattested": NO_IDENTITY,
    "path_refused": NOT_FOR_THIS_SERVER,
    "host_refused": NOT_FOR_THIS_SERVER,
    "workload_credentials": WORKLOAD_CREDENTIALS,
    "framing_refused": REQUEST_REFUSED,
    "target_refused": REQUEST_REFUSED,
    "method_refused": REQUEST_REFUSED,
    "upgrade_refused": REQUEST_REFUSED,
    "body_refused": REQUEST_REFUSED,
    "policy_denied": jsonrpc.POLICY_DENIED,
    "body_too_large": jsonrpc.INVALID_REQUEST,
    "encoding_refused": jsonrpc.INVALID_REQUEST,
    "header_mismatch": jsonrpc.HEADER_MISMATCH,
    "token_error": TOKEN_FAILED,
    "upstream_unreachable": UPSTREAM_FAILED,
    "upstream_closed": UPSTREAM_FAILED,
    "upstream_timeout": UPSTREAM_TIMEOUT,
    "credential_refused": CREDENTIAL_REFUSED,
    "phantom_misuse": PLACEHOLDER_REFUSED,
    "phantom_invalid": PLACEHOLDER_REFUSED,
}
FALLBACK_CODE = REQUEST_REFUSED

# Refusals whose body must never be read to learn the ids: the request is refused because
# what it is cannot be told with confidence (an upgrade's "body" is another protocol; a
# duplicated routing field or an absolute target names two destinations, a GET's body is
# what the policy never decides), and each closes the connection anyway.
UNREADABLE = frozenset(
    {"framing_refused", "target_refused", "method_refused", "upgrade_refused", "body_refused"}
)


@dataclass(frozen=True, slots=True)
class Asked:
    """What a request asked, as far as the shape of its answer goes."""

    rpc: bool  # answer with a JSON-RPC error
    calls: tuple[jsonrpc.Call, ...] = ()  # its JSON-RPC calls, when its body was read
    batch: bool = False


PLAIN = Asked(False)
UNREAD_RPC = Asked(True)  # a JSON POST whose body was not read: id null


def new_event_id() -> str:
    """An audit event's id, for an operator to find the event an answer names."""
    return secrets.token_hex(8)


def is_json(content_type: bytes | None) -> bool:
    """Whether a Content-Type is JSON (application/json, or a +json type), parameters aside."""
    essence = http1.media_type(content_type)
    return essence == b"application/json" or (
        essence.startswith(b"application/") and essence.endswith(b"+json")
    )


def by_head(method: bytes, content_type: bytes | None) -> Asked:
    """What a request is by its head alone: a JSON POST may be JSON-RPC (UNREAD_RPC)."""
    return UNREAD_RPC if method == b"POST" and is_json(content_type) else PLAIN


class Asks(Protocol):
    """A request head as the parser (http1.Head) or the fast lane (decide.Request) has it."""

    method: bytes

    def get(self, name: bytes) -> bytes | None: ...


def of(asked: Asked | Asks) -> Asked:
    """asked, or what a request is by its head (by_head), worked out only when an answer is
    given: the fast lane hands its request over, not a verdict on it made per request."""
    if isinstance(asked, Asked):
        return asked
    return by_head(asked.method, asked.get(b"content-type"))


def by_body(body: bytes | None) -> Asked:
    """What a POST is by its body (None: not read whole, over the limit)."""
    if body is None:
        return UNREAD_RPC
    try:
        calls, batch = jsonrpc.parse_calls(body)
    except jsonrpc.Malformed:
        return PLAIN
    return by_calls(calls, batch)


def by_calls(calls: list[jsonrpc.Call] | None, batch: bool) -> Asked:
    """A request whose body was parsed into calls (None: it did not parse)."""
    return Asked(True, tuple(calls), batch) if calls else UNREAD_RPC


def code_for(outcome: str, rpc_code: int | None = None) -> int:
    if rpc_code is not None:
        return rpc_code
    return CODES.get(outcome, FALLBACK_CODE)


def body(
    asked: Asked,
    status: int,
    message: str,
    *,
    outcome: str,
    event_id: str | None,
    rpc_code: int | None = None,
    detail: str | None = None,
    **extra: Any,
) -> bytes:
    """The body of credless's answer. message: the human sentence; outcome: the cause
    (decide.Verdict.outcome, or the exchange's outcome label); detail: what the failing
    party said (the plain body's "detail"; a JSON-RPC message ends with it, since clients
    show only the message); extra: more members of the plain body, or of the error's data."""
    details = dict(extra)
    if detail is not None:
        details["detail"] = detail
    redact_secrets(None, "", details)  # a member named as a credential
    if not asked.rpc:
        plain: dict[str, Any] = {"error": message, **details}
        if event_id:
            plain["event_id"] = event_id
        serialized = json.dumps(plain).encode()
    else:
        shown = f"{message}: {detail}" if detail else message
        if event_id:
            shown += f" (audit event {event_id})"
        data: dict[str, Any] = {"status": status, "cause": outcome, **details}
        if event_id:
            data["event_id"] = event_id
        serialized = jsonrpc.error_body(
            list(asked.calls), asked.batch, code_for(outcome, rpc_code), shown, data
        )
    # an answer never carries a credential wherever it sits: logging.py's scrub of every
    # output, over the serialized text as the audit's is
    return scrub_json(serialized.decode()).encode()


def response(
    asked: Asked,
    status: int,
    reason: bytes,
    message: str,
    *,
    outcome: str,
    event_id: str | None,
    rpc_code: int | None = None,
    detail: str | None = None,
    headers: list[tuple[bytes, bytes]] | None = None,
    **extra: Any,
) -> bytes:
    """The whole HTTP response: status line, Content-Type application/json, the body."""
    shaped = body(
        asked,
        status,
        message,
        outcome=outcome,
        event_id=event_id,
        rpc_code=rpc_code,
        detail=detail,
        **extra,
    )
    return http1.simple_response(status, reason, shaped, extra=headers)
