"""What an MCP POST asks for, and the answers credless gives in the server's place. Sans-IO.

Reads a JSON-RPC body (one message or a batch) into calls (method, name, id), checks the
stateless revision's routing headers against it (Mcp-Method, Mcp-Name: a server that routes
by header must not be steerable past the policy by a header that disagrees with the body),
and renders JSON-RPC errors that keep each request's id, so MCP clients show a clean error.

Batches: if any call in a batch is denied, the whole batch is refused (HTTP 403) with one
error per request id, naming the denied call(s); nothing of it reaches the server. Splitting
a batch would change its meaning for servers that process batches atomically.
"""

from __future__ import annotations

import base64
import json
import re
from dataclasses import dataclass, field
from typing import Any

from agent import jsondoc

PARSE_ERROR, INVALID_REQUEST = -32700, -32600
HEADER_MISMATCH = -32020  # MCP 2026-07-28
# implementation-defined server error range, beside credless's other codes (inject/answers.py);
# not -32001, which the MCP SDKs use for their own request timeouts and unknown sessions
POLICY_DENIED = -32089


@dataclass(frozen=True)
class Call:
    method: str
    name: str | None  # params.name (tools/call, prompts/get) or params.uri (resources/read)
    id: Any  # None for notifications
    is_request: bool
    # params.arguments of tools/call and prompts/get, as parsed (None: absent), for policy
    # conditions; kept out of repr and comparison: arguments may hold secrets
    arguments: Any = field(default=None, repr=False, compare=False)
    # a response to a server's request (sampling, elicitation), not a call: a flag, not a
    # method name, since a notification may be named anything, "(response)" included
    is_response: bool = False


class Malformed(Exception):
    def __init__(self, code: int, message: str):
        self.code, self.message = code, message
        super().__init__(message)


def _call(msg: Any) -> Call:
    if not isinstance(msg, dict) or msg.get("jsonrpc") != "2.0":
        raise Malformed(INVALID_REQUEST, "not a JSON-RPC 2.0 message")
    if "method" not in msg:
        # a response to a server request (sampling, elicitation): not a call, allowed
        if "result" in msg or "error" in msg:
            return Call("(response)", None, msg.get("id"), False, is_response=True)
        raise Malformed(INVALID_REQUEST, "JSON-RPC message without a method")
    method = msg["method"]
    if not isinstance(method, str) or not method:
        raise Malformed(INVALID_REQUEST, "method must be a non-empty string")
    params = msg.get("params")
    name = None
    if isinstance(params, dict):
        key = "uri" if method == "resources/read" else "name"
        if isinstance(params.get(key), str):
            name = params[key]
    if method in ("tools/call", "prompts/get", "resources/read") and name is None:
        raise Malformed(
            INVALID_REQUEST,
            f"{method} without params." + ("uri" if method == "resources/read" else "name"),
        )
    arguments = None
    if method in ("tools/call", "prompts/get") and isinstance(params, dict):
        arguments = params.get("arguments")
    return Call(method, name, msg.get("id"), "id" in msg, arguments)


class _Duplicate(ValueError):
    pass


def _unique_members(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """An object whose member names are unique. JSON parsers disagree on duplicates (Python
    keeps the last, others the first or refuse), so `{"name": "a", "name": "b"}` could be
    decided as one tool and run as another: refused, not interpreted."""
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for k, _ in pairs:
            if k in seen:
                raise _Duplicate(k)
            seen.add(k)
    return obj


def parse_calls(body: bytes) -> tuple[list[Call], bool]:
    """(calls, is_batch). Raises Malformed with the JSON-RPC error code to answer."""
    try:
        # UTF-8 strictly, as decide() requires the request to declare: json.loads would guess
        # UTF-16 or UTF-32 from the bytes, which the server may not
        doc = jsondoc.loads(bytes(body).decode("utf-8"), object_pairs_hook=_unique_members)
    except _Duplicate as e:
        raise Malformed(
            INVALID_REQUEST, f"duplicate member name {str(e)[:100]!r} in a JSON object"
        ) from None
    except jsondoc.NestedTooDeep:
        raise Malformed(PARSE_ERROR, "parse error: the body nests too deep") from None
    except (ValueError, UnicodeDecodeError):
        raise Malformed(PARSE_ERROR, "parse error: the body is not valid JSON") from None
    if isinstance(doc, list):
        if not doc:
            raise Malformed(INVALID_REQUEST, "empty batch")
        return [_call(m) for m in doc], True
    return [_call(doc)], False


_ENCODED = re.compile(r"^=\?base64\?(.*)\?=$")


def _header_value(v: str) -> str | None:
    """A routing header's value, decoded when it is =?base64?...?= (None: it does not
    decode; no string stands for that, since a body may name any string)."""
    m = _ENCODED.match(v)
    if m:
        try:
            return base64.b64decode(m.group(1), validate=True).decode()
        except (ValueError, UnicodeDecodeError):
            return None
    return v


def header_mismatch(calls: list[Call], mcp_method: str | None, mcp_name: str | None) -> str | None:
    """Why the routing headers disagree with the body, or None when they agree/are absent."""
    if mcp_method is None and mcp_name is None:
        return None
    if len(calls) != 1:
        return "Mcp-Method/Mcp-Name headers on a batch"
    call = calls[0]
    for header, raw in (("Mcp-Method", mcp_method), ("Mcp-Name", mcp_name)):
        if raw is not None and _header_value(raw) is None:
            return f"{header} header {raw[:200]!r} is not valid base64 UTF-8"
    if mcp_method is not None and _header_value(mcp_method) != call.method:
        return f"Mcp-Method header {_header_value(mcp_method)!r} != body method {call.method!r}"
    if mcp_name is not None and _header_value(mcp_name) != (call.name or ""):
        return f"Mcp-Name header {_header_value(mcp_name)!r} != body name {call.name!r}"
    if mcp_name is None and call.name is not None and mcp_method is not None:
        return f"Mcp-Name header missing for {call.method} {call.name!r}"
    return None


def error_object(id_: Any, code: int, message: str, data: Any = None) -> dict[str, Any]:
    err: dict[str, Any] = {"code": code, "message": message}
    if data is not None:
        err["data"] = data
    return {"jsonrpc": "2.0", "id": id_, "error": err}


def error_body(
    calls: list[Call] | None, is_batch: bool, code: int, message: str, data: Any = None
) -> bytes:
    """The JSON-RPC error answer: one per request id (notifications get none). A body of
    notifications only, or of unknown calls, gets one error with id null: JSON-RPC answers
    those with nothing, but an HTTP refusal needs a body that says why, and an empty batch
    answer is not allowed."""
    errors = [error_object(c.id, code, message, data) for c in calls or () if c.is_request]
    if not errors:
        return json.dumps(error_object(None, code, message, data)).encode()
    return json.dumps(errors if is_batch else errors[0]).encode()
