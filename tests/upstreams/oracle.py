"""The oracle of the smuggling corpus and the differential test: what one exchange through
the agent may and may not have caused upstream (tests/upstreams/harness.py runs the
exchanges; ../shared/DESIGN.md states the invariants)."""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from tests.upstreams.wire import Answers

if TYPE_CHECKING:
    from tests.upstreams.harness import Upstream

BARRIER = "barrier"  # the server whose request closes each exchange's window


def fingerprint(token: str) -> str:
    """As agent/oauth/tokens.py names a token in the audit (token_sha256)."""
    return hashlib.sha256(token.encode()).hexdigest()[:16]


@dataclass
class Observation:
    """One exchange: what the attacker got back, and what the audit and every upstream
    recorded in its window."""

    upstream: Upstream
    answers: Answers
    closed: bool
    reset: bool
    write_error: str | None
    unsent: int
    audit: list[dict]
    records: dict[str, list[dict]]  # server name -> requests its upstream logged
    fingerprints: set[str] = field(default_factory=set)  # credless's tokens for the server

    def parsed(self, name: str | None = None) -> list[dict]:
        """Requests the upstream parsed in this window (its parse errors and the agent's
        own discovery requests, which do not go through the proxy, left out)."""
        return [
            r
            for r in self.records[name or self.upstream.name]
            if r["kind"] != "client_error" and not agents_own(r)
        ]

    def injected(self, name: str | None = None) -> list[dict]:
        return [
            e
            for e in self.audit
            if e["event"] == "request.injected" and e.get("server") == (name or self.upstream.name)
        ]

    def describe(self) -> str:
        """The window, for a failing assertion's message."""
        lines = [
            f"answers: statuses={self.answers.statuses} interim="
            f"{[r.status for r in self.answers.interim]} closed={self.closed} "
            f"reset={self.reset} write_error={self.write_error} unsent={self.unsent}"
            + (f" junk={self.answers.junk[:120]!r}" if self.answers.junk else "")
        ]
        for r in self.answers.responses:
            lines.append(f"  answer {r.status}: {r.body[:300]!r}")
        lines.append("audit:")
        for e in self.audit:
            lines.append(
                "  "
                + json.dumps(
                    {
                        k: e.get(k)
                        for k in (
                            "event",
                            "server",
                            "method",
                            "path",
                            "status",
                            "tool",
                            "reason",
                            "token_sha256",
                        )
                        if e.get(k) is not None
                    }
                )
            )
        for name, recs in self.records.items():
            for r in recs:
                lines.append(f"upstream {name} parsed: {summary(r)}")
        return "\n".join(lines)


def agents_own(record: dict) -> bool:
    """The agent's own discovery requests (httpx, no credentials): they never pass through
    the proxy. With the long discovery and token lifetimes the world configures, none
    should fall in a window; this keeps a late one from reading as a smuggled request."""
    hs = {k.lower(): v for k, v in record.get("headers", [])}
    return "authorization" not in hs and hs.get("user-agent", "").startswith("python-httpx/")


def headers_named(record: dict, name: str) -> list[str]:
    return [v for k, v in record.get("headers", []) if k.lower() == name]


def body_of(record: dict) -> bytes:
    return base64.b64decode(record.get("body_b64") or "")


def summary(r: dict) -> str:
    if r["kind"] == "client_error":
        return f"(parse error {r.get('code')}: {r.get('reason')}; conn {r.get('conn')})"
    hs = " | ".join(
        f"{k}: {v[:60]}"
        if k.lower() not in ("authorization", "dpop") or len(v) < 24
        else f"{k}: <{v.split(' ')[0][:10]}... sha256:{fingerprint(v.partition(' ')[2] or v)}>"
        for k, v in r["headers"]
    )
    tr = f" trailers: {r['trailers']}" if r.get("trailers") else ""
    return (
        f"{r['kind']} {r['method']} {r['target']} HTTP/{r.get('version')} "
        f"(conn {r.get('conn')}, complete={r.get('complete')}) [{hs}]{tr} "
        f"body={body_of(r)[:200]!r}"
    )


def routing(value: str) -> str:
    """An Mcp-Method/Mcp-Name value as a server reads it: `=?base64?...?=` is decoded."""
    if value.startswith("=?base64?") and value.endswith("?="):
        try:
            return base64.b64decode(value[9:-2]).decode("utf-8", "replace")
        except ValueError:
            return value
    return value


def _jwt_claims(token: str) -> dict:
    try:
        part = token.split(".")[1]
        return json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
    except (IndexError, ValueError):
        return {}


# What servers and frameworks read as a proxy's statement about the client and its request
# (RFC 7239 Forwarded, the X-Forwarded-* family, client-address and client-certificate
# fields, original-URL and method-override fields): written here independently of the
# agent's own list, so that a name the agent misses is caught.
PROXY_SAYS = re.compile(
    r"forwarded|x-forwarded-[a-z0-9-]+|x-real-ip|x-client-ip|true-client-ip"
    r"|x-original-[a-z0-9-]+|x-rewrite-url|x-http-method-override|x-http-method"
    r"|x-method-override|x-ssl-[a-z0-9-]+|ssl-client-[a-z0-9-]+|x-client-cert[a-z0-9-]*"
)


def violations(obs: Observation) -> list[str]:
    """The trust boundary's invariants (../shared/DESIGN.md), whatever the status was:
    (b) the upstream parsed exactly the requests the audit shows as request.injected, and no
        other upstream parsed anything;
    (c) each carries exactly one Authorization, credless's own token, and no DPoP field but
        credless's proof (none for a Bearer server);
    (d) each is addressed to the configured authority and the MCP path;
    (e) none carries a call the policy denies (a tools/call of secret_tool), in its body, a
        routing header, or a trailer;
    (g) none carries a field by which a proxy tells a server who the client is, how it
        connected or what it first asked (the server's peer is credless: such a field would
        read as credless's word), and the server's own view of the client is credless's
        loopback connection over plain HTTP."""
    up, out = obs.upstream, []
    for name in obs.records:
        if name != up.name and obs.parsed(name):
            out.append(
                f"(b) upstream {name!r} parsed {len(obs.parsed(name))} request(s) "
                f"sent to {up.name!r}"
            )
        if name != up.name and name != BARRIER and obs.injected(name):
            out.append(f"(b) the audit shows request.injected for {name!r}")
    parsed, injected = obs.parsed(), obs.injected()
    if len(parsed) != len(injected):
        out.append(
            f"(b) upstream parsed {len(parsed)} request(s), the audit shows "
            f"{len(injected)} request.injected"
        )
    else:
        got = Counter((r["method"], r["target"].split("?", 1)[0]) for r in parsed)
        want = Counter((e.get("method"), e.get("path")) for e in injected)
        if got != want:
            out.append(f"(b) upstream parsed {sorted(got)}, audit shows {sorted(want)}")

    def shown(value: str) -> str:  # credless's tokens by fingerprint only, never verbatim
        scheme, _, token = value.partition(" ")
        if fingerprint(token) in obs.fingerprints:
            return f"{scheme} <credless's token sha256:{fingerprint(token)}>"
        return (
            value[:40]
            if scheme.lower() in ("bearer", "dpop") or not token
            else f"<{len(value)} bytes>"
        )

    for r in parsed:
        what = f"{r['method']} {r['target'][:80]}"
        auth = headers_named(r, "authorization")
        if len(auth) != 1:
            out.append(f"(c) {what}: {len(auth)} Authorization fields {[shown(a) for a in auth]}")
        for value in auth:
            scheme, _, token = value.partition(" ")
            if fingerprint(token) not in obs.fingerprints:
                out.append(
                    f"(c) {what}: Authorization {value[:40]!r} is not credless's "
                    f"token for {up.name}"
                )
            elif scheme != ("DPoP" if up.dpop else "Bearer"):
                out.append(f"(c) {what}: Authorization scheme {scheme!r}")
        proofs = headers_named(r, "dpop")
        if len(proofs) != (1 if up.dpop else 0):
            out.append(
                f"(c) {what}: {len(proofs)} DPoP fields "
                f"{[p if len(p) < 20 else '<a proof>' for p in proofs]}"
            )
        elif up.dpop:
            claims = _jwt_claims(proofs[0])
            if claims.get("htm") != r["method"] or claims.get("htu") != up.url:
                out.append(
                    f"(c) {what}: DPoP proof for {claims.get('htm')} "
                    f"{claims.get('htu')!r}, not this request"
                )
        host = headers_named(r, "host")
        if host != [up.authority]:
            out.append(f"(d) {what}: Host fields {host}, expected [{up.authority!r}]")
        if r["target"] != "/mcp" and not r["target"].startswith("/mcp?"):
            out.append(f"(d) {what}: target is not the MCP endpoint /mcp")
        body = body_of(r)
        if b"secret_tool" in body and b"tools/call" in body:
            out.append(f"(e) {what}: body carries a tools/call of secret_tool: {body[:200]!r}")
        routed = [
            v
            for k, v in r["headers"] + r.get("trailers", [])
            # as CGI and WSGI servers read names too: `_` is `-` there (HTTP_MCP_NAME)
            if k.lower().replace("_", "-") in ("mcp-name", "mcp-method")
            and "secret_tool" in routing(v)
        ]
        if routed:
            out.append(f"(e) {what}: routing header names secret_tool: {routed}")
        if r.get("trailers"):
            out.append(f"(e) {what}: trailer fields reached the upstream: {r['trailers']}")
        vouched = [k for k, _ in r["headers"] if PROXY_SAYS.fullmatch(k.lower())]
        if vouched:
            out.append(f"(g) {what}: fields a proxy vouches for reached the upstream: {vouched}")
        if r.get("client") not in (None, "127.0.0.1", "::1") or r.get("scheme") not in (
            None,
            "http",
        ):
            out.append(f"(g) {what}: the server took the client for {r['client']} ({r['scheme']})")
    return out
