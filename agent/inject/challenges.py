"""How a 401 to credless's own credential is read: the part of an exchange that answers the
MCP server's challenge (agent/inject/exchange.py sends and relays; the fast lane,
agent/inject/lane.py, sends its own and asks here too).

- `DPoP error="use_dpop_nonce"` with a DPoP-Nonce (RFC 9449 §9): nonce_retry() says whether
  the request is sent once more with a proof carrying it (it is remembered for the
  server's next proofs either way), retrying() puts that on the record;
- refused(): a challenge naming only a scheme credless did not use, or a second nonce demand
  right after the retry, is what went wrong (the workload is answered 502 with it); an
  invalid_token drops the token from the cache.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from agent.inject.flows import UpstreamSide
from agent.inject.ports import Tokens
from agent.inject.record import AuditBase, Recorder
from agent.inject.served import Served
from agent.inject.upstreams import Upstream
from agent.oauth.discovery import parse_www_authenticate
from agent.oauth.dpop import asks_for_nonce, scheme_mismatch
from agent.oauth.tokens import Token
from agent.observe.logging import get_logger

log = get_logger("inject.challenges")


@runtime_checkable
class NonceKey(Protocol):
    """A DPoP key that remembers servers' nonces for its later proofs (oauth.dpop.DPoPKey)."""

    def note_nonce(self, url: str, nonce: str) -> bool: ...


class Challenges:
    """Reads the 401s to credless's credential of one proxy's exchanges."""

    def __init__(self, rec: Recorder, oauth: Tokens, retry_body_limit: int):
        self.rec = rec
        self.oauth = oauth  # told of a token the server refused (invalid_token)
        # the longest streamed request body kept, as sent, to send again once for a DPoP
        # nonce the server asks for (the proxy's: policy.max_body_bytes)
        self.retry_body_limit = retry_body_limit

    def nonce_retry(
        self,
        conn: UpstreamSide,
        served: Served,
        token: Token,
        audit_base: AuditBase,
        have_body: bool,
    ) -> bool:
        """Whether the exchange just ended is a held 401 asking for a DPoP nonce, to be sent
        again with it (then retrying(), and the nonce is remembered for the server's next
        proofs). have_body: the request can be sent again (its body is kept). Called once
        per request, before finished(): there is never a second retry."""
        if (
            conn.held is None
            or not conn.complete
            or conn.client_gone
            or conn.head is None
            or token.token_type != "DPoP"  # noqa: S105 — a token type
            or not conn.dpop_nonce
        ):
            return False
        challenges = parse_www_authenticate(
            (conn.head.get(b"www-authenticate") or b"").decode("latin-1")
        )
        if not asks_for_nonce(challenges):
            return False
        up = served.up
        if not self.note_nonce(token, up, conn.dpop_nonce):
            return False
        if not have_body:
            log.warning(
                "the MCP server asked for a DPoP nonce; the request's body was streamed and is "
                "longer than kept for a retry, so its 401 goes to the workload and the next "
                "request carries the nonce",
                server=up.name,
                limit=self.retry_body_limit,
            )
            return False
        return True

    def retrying(self, conn: UpstreamSide, audit_base: AuditBase) -> None:
        """The request nonce_retry() allowed is being sent again: its 401 is dropped."""
        conn.take_held()
        self.rec.audit_event(
            "request.retried",
            audit_base,
            status=401,
            reason="the MCP server asked for a DPoP nonce (401 use_dpop_nonce, RFC 9449 §9): "
            "sent again once with a proof carrying it",
        )

    def note_nonce(self, token: Token, up: Upstream, nonce: bytes) -> bool:
        key = self.oauth.dpop_key(token.spiffe_id)
        value = nonce.decode("latin-1").strip()
        if isinstance(key, NonceKey) and key.note_nonce(up.origin, value):
            return True
        log.warning(
            "a DPoP-Nonce from the MCP server is not a valid nonce; ignored", server=up.name
        )
        return False

    def refused(
        self, conn: UpstreamSide, served: Served, token: Token, retried: bool
    ) -> str | None:
        """Read a 401 to credless's credential: drop a token the server calls invalid, and
        say what is wrong (None: the answer goes to the workload as the server gave it) when
        its challenge names only a scheme credless did not use, or asks for a DPoP nonce
        again right after the retry that carried one."""
        up = served.up
        head = conn.head
        raw = (head.get(b"www-authenticate") if head is not None else None) or b""
        challenges = parse_www_authenticate(raw.decode("latin-1"))
        mismatch = scheme_mismatch(challenges, token.token_type, up.name)
        problem = mismatch
        if problem is None and retried and asks_for_nonce(challenges):
            problem = (
                f"the MCP server {up.name} asked again for a DPoP nonce (401 use_dpop_nonce) "
                "right after the request was sent again with a proof carrying the nonce it "
                "gave; credless retries once only. Check the server's nonce handling"
            )
        if b"invalid_token" in raw or problem is not None:
            # refused for its scheme: a token of the kind this server does not take, and
            # the server's next token follows this challenge (the server changed what it
            # accepts), not the cached metadata that chose this scheme
            self.oauth.invalidate(
                served.holder(),
                up.name,
                token,
                raw.decode("latin-1") if mismatch is not None else None,
            )
        return problem
