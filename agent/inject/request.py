"""What the decision reads of a request head, read the same way by both executors. Sans-IO.

The full path reads a parsed head (agent/inject/http1.py's Head: Request.from_head); the
fast lane a whole request as it arrived (Request.from_read), in one scan that also finds the
fields the lane cannot carry out. Both readings give the same fields, so the one decision
(agent/inject/decide.py) answers a request the same whichever executor asks
(tests/unit/test_decide.py checks both readings of each head).
"""

from __future__ import annotations

import re

from agent.inject.http1 import Head

# Fields the decision reads. Lower-case names; values with surrounding whitespace removed.
DECISION_FIELDS = frozenset(
    {
        b"host",
        b"mcp-method",
        b"mcp-name",
        b"expect",
        b"content-encoding",
        b"content-type",
        b"authorization",
        b"dpop",
        b"upgrade",
        b"connection",
    }
)
# The lane's reading of a head: in one scan, the fields the decision reads and those the
# lane cannot carry out (it relays the head as read, so it cannot remove the workload's
# credentials or connection fields, answer an expectation, or re-frame). llhttp's
# strictness makes `CRLF name:` the only spelling of a field (tests/unit/test_http1.py), so
# this cannot miss one.
LANE_CANNOT = frozenset(
    {
        b"authorization",
        b"dpop",
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"expect",
        b"upgrade",
        b"te",
        b"trailer",
        b"transfer-encoding",
    }
)
# Fields by which a proxy tells a server about the client and its request: who it is
# (RFC 7239 Forwarded, X-Forwarded-For, X-Real-IP, a client certificate or its verdict), how
# it connected (X-Forwarded-Proto/-Host/-Port), what it first asked (X-Original-URL,
# X-Rewrite-URL, method overrides). The server's peer is credless, so whatever such a field
# says reads as credless's word: uvicorn, which serves the MCP Python SDK, believes
# X-Forwarded-For and -Proto from a loopback peer by default. credless knows none of it to
# say, so the workload's are removed wherever it removes the workload's credentials.
VOUCHED_FIELDS = frozenset(
    {
        b"forwarded",
        b"x-real-ip",
        b"x-client-ip",
        b"true-client-ip",
        b"x-rewrite-url",
        b"x-http-method-override",
        b"x-http-method",
        b"x-method-override",
    }
)
VOUCHED_PREFIXES = (b"x-forwarded-", b"x-original-", b"x-ssl-", b"ssl-client-", b"x-client-cert")


def vouched(name: bytes) -> bool:
    """Whether a field (its lower-case name) is one a proxy vouches for (VOUCHED_FIELDS)."""
    return name in VOUCHED_FIELDS or name.startswith(VOUCHED_PREFIXES)


# CGI and WSGI servers name a field HTTP_<NAME> with `-` and `_` both `_`, so `Mcp_Name` is
# Mcp-Name there: a second copy of a field credless decides by (or removes, or frames by)
# that its own reading would not see. A request carrying one is refused (decide.py).
_ALIASED = DECISION_FIELDS | LANE_CANNOT | {b"content-length"}


def alias_of(name: bytes) -> bytes:
    """The field a lower-case name is to a server that reads `_` as `-`, when that is one
    credless reads or removes; b"" otherwise (no `_`, or a field credless leaves alone)."""
    if b"_" not in name:
        return b""
    as_read = name.replace(b"_", b"-")
    return as_read if as_read in _ALIASED or vouched(as_read) else b""


# a field name with `_` in it, for the lane's reading (which then leaves the request to the
# full path's, which names it): the name's token characters up to the first `_`
_UNDERSCORE_NAME = re.compile(rb"\r\n[!#$%&'*+.^`|~0-9A-Za-z-]*_")


# made from the sets, so the lane reads the same fields as Request.from_head, and finds
# every vouched field (an exact name, or a prefix and the rest of a field name)
_READ_FIELDS = re.compile(
    rb"\r\n("
    + b"|".join(re.escape(n) for n in sorted(DECISION_FIELDS | LANE_CANNOT | VOUCHED_FIELDS))
    + b"|"
    + b"|".join(re.escape(p) + rb"[!#-'*+.0-9A-Z^_`a-z|~-]*" for p in VOUCHED_PREFIXES)
    + rb"):([^\r]*)",
    re.IGNORECASE,
)


# What a workload's Connection field may name: connection options and the hop-by-hop fields
# the proxy removes anyway. Any other name would make the proxy remove a field after the
# decision read it (RFC 9110 §7.6.1): `Connection: Host` sent the server no Host at all.
CONNECTION_OPTIONS = frozenset(
    {b"close", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"upgrade"}
)
# The one charset a body credless reads may declare: what the policy and the assertion form
# decode it as. A server decodes the charset its Content-Type names (body-parser: any utf-*
# through iconv-lite, UTF-7 included, where `+AG4-ame` is a second `name`): a body in another
# charset is a different request to the server than to the policy.
BODY_CHARSET = b"utf-8"


# A path every router reads alike, up to case and one trailing slash: non-empty segments of
# RFC 3986 unreserved characters and the sub-delims no server treats as a separator: no `%`
# (`%2e%2e`, `%2f`), no `;` (servlet containers drop path parameters: `..;` is `..` there),
# and no `.` or `..` segment. Used wherever a path decides something: the MCP endpoint a
# credential may go under (decide.under_endpoint), the token and registration endpoints
# assertion mode recognises (decide, assertion_route).
_PLAIN_PATH = re.compile(rb"(?:/[A-Za-z0-9\-._~!$&'()*+,=:@]+)*/?")


def plain_path(target: bytes) -> bool:
    """Whether target's path (its query aside) is plain (see _PLAIN_PATH)."""
    path = target.split(b"?", 1)[0]
    return (
        _PLAIN_PATH.fullmatch(path) is not None
        and b"/./" not in path + b"/"
        and b"/../" not in path + b"/"
    )


class Request:
    """What the decision needs of a request head. bodied: the head frames a body (a chunked
    one, or a Content-Length other than 0); vouched: the lower-case names of its fields a
    proxy vouches for (VOUCHED_FIELDS); aliased: the first name of a field that is another
    one credless reads to a server that reads `_` as `-` (alias_of; b"": none)."""

    __slots__ = ("aliased", "bodied", "fields", "method", "target", "upgrade", "vouched")

    def __init__(
        self,
        method: bytes,
        target: bytes,
        fields: dict[bytes, list[bytes]],
        upgrade: bool = False,
        bodied: bool = False,
        vouched: tuple[bytes, ...] = (),
        aliased: bytes = b"",
    ):
        self.method, self.target, self.upgrade, self.fields = method, target, upgrade, fields
        self.bodied, self.vouched, self.aliased = bodied, vouched, aliased

    @classmethod
    def from_head(cls, head: Head) -> Request:
        fields: dict[bytes, list[bytes]] = {}
        if not head.names.isdisjoint(DECISION_FIELDS):
            for k, v in head.headers:
                k = k.lower()
                if k in DECISION_FIELDS:
                    fields.setdefault(k, []).append(v.strip(b" \t"))
        # llhttp took exactly one Content-Length of digits (or refused the request): zeros
        # alone are 0
        length = head.get(b"content-length")
        bodied = head.chunked or (length is not None and length.strip(b" \t").lstrip(b"0") != b"")
        said = tuple(sorted(n for n in head.names if vouched(n)))
        aliased = next((n for n in sorted(head.names) if alias_of(n)), b"")
        return cls(head.method, head.target, fields, head.upgrade, bodied, said, aliased)

    @classmethod
    def from_read(cls, data: bytes, head_end: int, method: bytes, target: bytes) -> Request | None:
        """A whole request as read (the lane's: data is exactly one message, whose head ends
        at head_end), or None when it carries a field the lane cannot carry out
        (LANE_CANNOT, chunked framing among them), one a proxy vouches for (removed
        there) or a name with `_` in it (alias_of): the full path takes it."""
        if _UNDERSCORE_NAME.search(data, 0, head_end + 2):
            return None  # perhaps an alias of a field: the full path's reading names it
        fields: dict[bytes, list[bytes]] = {}
        for name, value in _READ_FIELDS.findall(data, 0, head_end + 2):
            name = name.lower()
            if name in LANE_CANNOT or vouched(name):
                return None
            if name in fields:
                fields[name].append(value.strip(b" \t"))
            else:
                fields[name] = [value.strip(b" \t")]
        return cls(method, target, fields, bodied=len(data) > head_end + 4)

    def get(self, name: bytes) -> bytes | None:
        values = self.fields.get(name)
        return values[0] if values else None

    def connection_names_a_field(self) -> bytes:
        """The first name the Connection fields list that is not a connection option
        (CONNECTION_OPTIONS), lower case; b"" for none."""
        for value in self.fields.get(b"connection", ()):
            for name in value.split(b","):
                name = name.strip(b" \t").lower()
                if name and name not in CONNECTION_OPTIONS:
                    return name
        return b""

    def body_coding(self) -> bytes | None:
        """The first content coding of the body that is not identity, in any Content-Encoding
        field, at any place in its list; None: the body is not encoded."""
        for value in self.fields.get(b"content-encoding", ()):
            for coding in value.split(b","):
                coding = coding.strip(b" \t")
                if coding.lower() != b"identity":
                    return coding
        return None

    def body_charset(self) -> bytes | None:
        """The Content-Type, when it says the body is anything but UTF-8: a parameter other
        than one `charset=utf-8` (any case, quoted or not). None: UTF-8, declared or not."""
        declared = self.get(b"content-type")
        if declared is None:
            return None
        for param in declared.split(b";")[1:]:
            name, _, value = param.partition(b"=")
            value = value.strip(b" \t")
            if len(value) > 1 and value[:1] == value[-1:] == b'"':
                value = value[1:-1]
            if name.strip(b" \t").lower() != b"charset" or value.lower() != BODY_CHARSET:
                return declared
        return None
