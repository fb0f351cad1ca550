"""The proxy's one decision on a request, sans-IO: facts in, a Verdict out.

Both executors ask this module and nothing else whether and how a request goes upstream:
the full path (proxy.py: a parsed Head, a coroutine that may await a token or read a body)
and the fast lane (lane.py: a whole request relayed as read). Neither has admission rules
of its own; the lane only declines what it cannot execute (a field it would have to remove,
a body to read, a token not yet cached), and the full path then decides the same request
again, here, with the same answer. Two executors each deciding once let a refused request's
head reach the server with a token; one decision cannot disagree with itself. What it reads
of a request head, and how each executor reads it, is agent/inject/request.py's Request.

The order of the checks is the order of what the server must be able to rely on (docs/
inject.md, "What the upstream can rely on"):
1. the caller is still the process the connection was attested as (its image, its entry);
2. the request is one the proxy can frame unambiguously: origin-form target, one Host, no
   duplicated routing field (framing itself, Content-Length / chunked, is the parser's:
   agent/inject/http1.py refuses anything else before a head reaches this module);
3. a request that will carry credless's credential goes to the configured server only: its
   method is one MCP uses (a GET or DELETE without a body), its Host the server's authority,
   its path under the MCP endpoint;
4. the caller has an identity (else 403, or forwarded bare when inject.unattested says so);
5. policy: GET and DELETE by the identity's rules for the server, POST by its JSON-RPC body
   (decide_body), each call of a batch, with its arguments and the caller's selectors for
   rules with conditions (docs/policy.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

# the decision's reading of a request head (request.py); named here too, as decide.Request,
# by the fast lane and the tests
from agent.inject import http1
from agent.inject.assertion_route import FORM, JSON, assertion_request
from agent.inject.request import Request as Request
from agent.inject.request import alias_of, plain_path
from agent.policy import jsonrpc
from agent.policy.conditions import argument_names

if TYPE_CHECKING:  # data and a port only: the decision imports no executor
    from agent.config import InjectSection
    from agent.inject.ports import Placeholders, Policy
    from agent.inject.upstreams import Upstream

FORWARD, ANSWER, CLOSE = "forward", "answer", "close"

# The HTTP methods MCP's Streamable HTTP transport uses: POST for every message, GET to
# open a server-to-client stream, DELETE to end a session (2025-11-25; 2026-07-28 uses POST
# only). A credentialed request with any other method is refused.
MCP_METHODS = frozenset({b"POST", b"GET", b"DELETE"})
ALLOW = b"POST, GET, DELETE"

# A field the server could read either copy of: routing, expectation, how the body is to be
# read, and the credential fields (the placeholder check reads one; a server may take the
# other). RFC 9110 defines each as a single value.
SINGLE_FIELDS = (
    b"host",
    b"mcp-method",
    b"mcp-name",
    b"expect",
    b"content-type",
    b"authorization",
    b"dpop",
)
WORKLOAD_CREDENTIALS = (b"authorization", b"dpop")


@dataclass(frozen=True, slots=True)
class Caller:
    """Who asks, as of this request."""

    current: bool  # still the image (and entry) the connection was served as
    spiffe_id: str | None  # None: not attested, or no registration entry matches
    parent_spiffe_id: str | None = None
    changed: str = ""  # why not current (audited)
    selectors: frozenset[str] = frozenset()  # the process's attested ones (policy conditions)


@dataclass(frozen=True, slots=True)
class Verdict:
    action: str  # FORWARD, ANSWER (then keep the connection unless close)
    #                                 or CLOSE (no answer: the connection is closed)
    credential: bool = False  # add credless's credential (broker: the token, assertion:
    #                                 a client assertion in the token request's form)
    read_body: bool = False  # the body decides (decide_body) before anything goes out
    # remove the workload's Authorization and DPoP, and the fields a proxy vouches for
    # (Request.vouched), first
    strip: bool = False
    status: int = 0
    reason: bytes = b""
    message: str = ""  # for the workload and the audit
    rpc_code: int | None = None  # answer as a JSON-RPC error (keeping the request's ids)
    close: bool = False  # close the connection after the answer
    outcome: str = ""  # the refusal's outcome label on the request counter
    allow: bytes = b""  # the Allow field of a 405
    misuse: Any = None  # phantom_misuse: the placeholder's Binding (agent/inject/phantom.py)


# the common verdicts, made once: a frozen dataclass costs a microsecond to build, and the
# fast lane asks for one per request
_FORWARD = Verdict(FORWARD)
_FORWARD_CREDENTIAL = Verdict(FORWARD, credential=True)
_FORWARD_CREDENTIAL_STRIP = Verdict(FORWARD, credential=True, strip=True)
_READ_BODY = Verdict(FORWARD, credential=True, read_body=True)
_READ_BODY_STRIP = Verdict(FORWARD, credential=True, read_body=True, strip=True)


def _refuse(
    status: int, reason: bytes, outcome: str, message: str, close: bool = False, **kw: Any
) -> Verdict:
    return Verdict(
        ANSWER,
        status=status,
        reason=reason,
        outcome=outcome,
        message=f"credless: {message}",
        close=close,
        **kw,
    )


def under_endpoint(target: bytes, endpoint: bytes) -> bool:
    """Whether an origin-form target names the MCP endpoint or a path below it, spelled so
    that no server can read it as another path (request.plain_path)."""
    if target == endpoint:  # the common case, first
        return True
    path = target.split(b"?", 1)[0]
    if path == endpoint:
        return True
    base = endpoint.rstrip(b"/") + b"/"
    return path.startswith(base) and plain_path(path[len(base) - 1 :])


def stale(caller: Caller) -> Verdict:
    """The verdict on a caller that is not the one its connection was served as any more
    (caller.current is false): the connection is closed. decide() gives it for a head; the
    exchange for a body arriving later (agent/inject/exchange.py)."""
    return Verdict(
        CLOSE,
        outcome="image_changed" if not caller.changed else "identity_changed",
        message=caller.changed
        or "the process exec'd or exited since it connected; connection closed",
    )


def decide(
    req: Request,
    up: Upstream,
    caller: Caller,
    settings: InjectSection,
    policy: Policy | None,
    phantom: Placeholders | None = None,
) -> Verdict:
    """The decision on a request head. settings: the inject section (unattested,
    workload_authorization); policy: None when no policy is configured; phantom: the
    placeholder check (agent/inject/phantom.py), None when no server is in phantom mode.
    Written for the fast lane's budget (a few microseconds): the common verdicts are made
    once, and the checks of fields a request does not carry cost a dictionary lookup."""
    if not caller.current:
        return stale(caller)
    fields = req.fields
    method = req.method
    mode = up.mode
    if mode in ("broker", "phantom"):
        credentialed = True
    elif mode == "assertion":
        content_type = req.get(b"content-type")
        if (
            method == b"POST"
            and http1.media_type(content_type) in (FORM, JSON)
            and not plain_path(req.target)
        ):
            # which endpoint it reaches is the server's reading of the path: if that could be
            # the token or registration endpoint, credless must have read the body
            return _refuse(
                400,
                b"Bad Request",
                "target_refused",
                f"{req.target.split(b'?', 1)[0][:200].decode('latin-1')!r} is not a plain "
                "path (percent-encoding, empty or dot segments, ';'): an authorization "
                "server could route it to its token or registration endpoint",
            )
        credentialed = (
            method == b"POST" and assertion_request(req.target, content_type, up.path) is not None
        )
    else:
        credentialed = False
    if credentialed and method not in MCP_METHODS:
        return _refuse(
            405,
            b"Method Not Allowed",
            "method_refused",
            f"{method.decode('latin-1')} is not a method MCP uses; connection closed",
            close=True,
            allow=ALLOW,
        )
    if credentialed and req.bodied and method != b"POST":
        # policy decides a GET or DELETE by its method alone (MCP's carry no body), so a
        # body there would reach the server undecided: a server that reads it (as a
        # JSON-RPC call, whatever the method) would run what the policy never saw
        return _refuse(
            400,
            b"Bad Request",
            "body_refused",
            f"a {method.decode()} request with a body: MCP's GET and DELETE carry none, and "
            "credless decides only a POST by its body; connection closed",
            close=True,
        )
    if req.upgrade:
        # the parser stops at an upgrade: what follows would be another protocol, which
        # credless neither inspects nor credentials (MCP over HTTP never upgrades)
        return _refuse(
            501,
            b"Not Implemented",
            "upgrade_refused",
            "protocol upgrades "
            f"({(req.get(b'upgrade') or method).decode('latin-1')}) are not "
            "relayed; connection closed",
            close=True,
        )
    if req.target[:1] != b"/":
        return _refuse(
            400,
            b"Bad Request",
            "target_refused",
            "the request target must be a "
            "path (origin-form), not "
            f"{req.target[:200].decode('latin-1')!r}; connection closed",
            close=True,
        )
    hosts = fields.get(b"host")
    if hosts is None or len(hosts) != 1:
        return _duplicated(b"host", len(hosts or ()))
    placeholder = False
    if phantom is not None and b"authorization" in fields:
        # every value, before two are refused: a stolen placeholder is misuse (audited, and
        # revoked) wherever the workload put it
        for value in fields[b"authorization"]:
            found = _placeholder(phantom, value, caller, up)
            if isinstance(found, Verdict):
                return found
            placeholder = placeholder or found
    for name, values in fields.items():
        if len(values) > 1 and name in SINGLE_FIELDS:
            return _duplicated(name, len(values))
    if req.aliased:
        return _refuse(
            400,
            b"Bad Request",
            "framing_refused",
            f"the field {req.aliased[:100].decode('latin-1')!r} is "
            f"{alias_of(req.aliased)[:100].decode()!r} to servers that read '_' as '-' (CGI, "
            "WSGI): a second copy of a field credless reads; connection closed",
            close=True,
        )
    if b"connection" in fields:
        named = req.connection_names_a_field()
        if named:
            return _refuse(
                400,
                b"Bad Request",
                "framing_refused",
                f"the Connection field names {named[:100].decode('latin-1')!r}, an end-to-end "
                "field: only connection options (close, keep-alive) may be named; "
                "connection closed",
                close=True,
            )
    if caller.spiffe_id is None and credentialed:
        if settings.unattested == "passthrough":
            return _FORWARD  # as a passthrough server: nothing added or removed
        return _refuse(
            403,
            b"Forbidden",
            "unattested",
            "this process has no identity (not attested, or no registration entry matches it)",
        )
    if credentialed:
        host = hosts[0].lower()
        if host not in up.authorities:
            return _refuse(
                421,
                b"Misdirected Request",
                "host_refused",
                f"Host {host[:200].decode('latin-1')!r} is not {up.name!r} "
                f"({up.authorities[0].decode()}); credless sends credentials only "
                "to the server they are for; connection closed",
                close=True,
            )
        if mode != "assertion" and not under_endpoint(req.target, up.path):
            return _refuse(
                403,
                b"Forbidden",
                "path_refused",
                f"{req.target.split(b'?', 1)[0][:200].decode('latin-1')!r} is "
                f"not under the MCP endpoint {up.path.decode()} of {up.name!r}",
            )
    credentials = b"authorization" in fields or b"dpop" in fields
    strip = mode != "passthrough" and (credentials or bool(req.vouched))
    # a phantom server's own placeholder is expected there, and removed like any other
    if strip and credentials and settings.workload_authorization == "reject" and not placeholder:
        return _refuse(
            400,
            b"Bad Request",
            "workload_credentials",
            "this workload must not send Authorization or DPoP headers; credless adds them",
        )
    if mode == "assertion":
        if not credentialed:
            return Verdict(FORWARD, strip=strip)
        return _unreadable_body(req) or (_READ_BODY_STRIP if strip else _READ_BODY)
    if mode == "passthrough":
        return _FORWARD
    if policy is not None:
        if method == b"POST":
            return _unreadable_body(req) or (_READ_BODY_STRIP if strip else _READ_BODY)
        d = policy.decide(
            _attested(caller),
            up.name,
            "http:" + method.decode(),
            None,
            caller.parent_spiffe_id,
            selectors=caller.selectors,
        )
        if not d.allowed:
            return _refuse(
                403,
                b"Forbidden",
                "policy_denied",
                f"{method.decode()} denied by policy: {d.reason}",
            )
    return _FORWARD_CREDENTIAL_STRIP if strip else _FORWARD_CREDENTIAL


def _unreadable_body(req: Request) -> Verdict | None:
    """The refusal of a body credless must read (policy's JSON-RPC, the assertion form) that
    the server would decode otherwise than credless does (Request.body_coding,
    Request.body_charset); None: the body reads as the server reads it."""
    coding = req.body_coding()
    if coding is not None:
        return _refuse(
            415,
            b"Unsupported Media Type",
            "encoding_refused",
            f"a body with Content-Encoding {coding[:100].decode('latin-1')!r} "
            "cannot be checked against policy; send it unencoded",
            rpc_code=jsonrpc.INVALID_REQUEST,
        )
    declared = req.body_charset()
    if declared is not None:
        return _refuse(
            415,
            b"Unsupported Media Type",
            "encoding_refused",
            f"a body declared as {declared[:200].decode('latin-1')!r} "
            "cannot be checked against policy: send it as UTF-8, with no "
            "Content-Type parameter but charset=utf-8",
            rpc_code=jsonrpc.INVALID_REQUEST,
        )
    return None


def _placeholder(
    phantom: Placeholders, value: bytes, caller: Caller, up: Upstream
) -> bool | Verdict:
    """Whether the Authorization value is a placeholder issued to this caller for this
    server (False: not a placeholder at all), or the refusal of one that is not."""
    try:
        found = phantom.binding(value)
    except ValueError as e:  # PhantomInvalid
        return _refuse(
            401,
            b"Unauthorized",
            "phantom_invalid",
            f"the placeholder does not verify ({e}); fetch a new one from the Workload API",
        )
    if found is None:
        return False
    if found.spiffe_id == caller.spiffe_id and found.server == up.name:
        return up.mode == "phantom"
    holder = caller.spiffe_id or "a process without identity"
    return Verdict(
        ANSWER,
        status=403,
        reason=b"Forbidden",
        outcome="phantom_misuse",
        message=f"credless: this placeholder was issued to {found.spiffe_id} for "
        f"{found.server!r}; it came from {holder} to {up.name!r}",
        misuse=found,
    )


def _attested(caller: Caller) -> str:
    """The SPIFFE ID of the caller of a credentialed request, whose policy is asked: decide()
    has answered such a request of an unattested caller itself (403, or forwarded bare)."""
    if caller.spiffe_id is None:  # never asks policy about no one, with or without -O
        raise RuntimeError("policy asked about a credentialed request of an unattested caller")
    return caller.spiffe_id


def _duplicated(name: bytes, n: int) -> Verdict:
    return _refuse(
        400,
        b"Bad Request",
        "framing_refused",
        f"{'no' if n == 0 else n} {name.decode().title()} fields: the request must "
        "carry " + ("exactly one" if name == b"host" else "at most one") + "; connection closed",
        close=True,
    )


@dataclass(frozen=True, slots=True)
class CallRecord:
    """One JSON-RPC call's policy decision, for the audit."""

    event: str
    fields: dict[str, object]


def decide_body(
    body: bytes, req: Request, up: Upstream, caller: Caller, policy: Policy
) -> tuple[Verdict, list[CallRecord], list[jsonrpc.Call] | None, bool]:
    """The decision on a POST body read whole: every JSON-RPC call of it by policy, and the
    routing fields (Mcp-Method, Mcp-Name) against it. Returns the verdict, the calls'
    audit records, and the calls and whether they were a batch (for the error's ids)."""
    try:
        calls, batch = jsonrpc.parse_calls(body)
    except jsonrpc.Malformed as e:
        return (
            _refuse(400, b"Bad Request", "malformed_body", e.message, rpc_code=e.code),
            [CallRecord("call.denied", {"reason": e.message})],
            None,
            False,
        )
    mismatch = jsonrpc.header_mismatch(
        calls,
        (req.get(b"mcp-method") or b"").decode("latin-1") or None,
        (req.get(b"mcp-name") or b"").decode("latin-1") or None,
    )
    if mismatch:
        return (
            _refuse(
                400, b"Bad Request", "header_mismatch", mismatch, rpc_code=jsonrpc.HEADER_MISMATCH
            ),
            [CallRecord("call.denied", {"reason": mismatch})],
            calls,
            batch,
        )
    spiffe_id = _attested(caller)  # a body is read only for a credentialed request
    records, denied, rule = [], [], None
    for c in calls:
        if c.is_response:  # a response to the server's own request: no call to decide
            continue
        d = policy.decide(
            spiffe_id,
            up.name,
            c.method,
            c.name,
            caller.parent_spiffe_id,
            args=c.arguments,
            selectors=caller.selectors,
        )
        fields: dict[str, object] = {
            "rpc_method": c.method,
            "tool": c.name,
            "rpc_id": c.id,
            "rule": d.rule_id,
            "decision": "allow" if d.allowed else "deny",
            "reason": d.reason,
        }
        names = argument_names(c.arguments)
        if names is not None:  # the names only: argument values may be secrets
            fields["arguments"] = names
        records.append(CallRecord("call.allowed" if d.allowed else "call.denied", fields))
        if not d.allowed:
            denied.append(f"{c.method} {c.name or ''}".strip() + f": {d.reason}")
            rule = rule or d.rule_id
    if denied:
        return (
            _refuse(
                403,
                b"Forbidden",
                "policy_denied",
                "denied by policy: " + "; ".join(denied),
                rpc_code=jsonrpc.POLICY_DENIED,
            ),
            records,
            calls,
            batch,
        )
    return Verdict(FORWARD, credential=True), records, calls, batch
