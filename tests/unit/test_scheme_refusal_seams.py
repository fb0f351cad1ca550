"""A 401 naming a scheme credless did not use (agent/inject/exchange.py) hands its challenge
to the OAuth service with the refused token (Tokens.invalidate), and the service's next
resolution for that server reads it instead of the cached resource metadata
(agent/oauth/service.py). End to end: tests/integration/test_dpop_scheme_switch.py."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from agent.config import Config, ServerSection
from agent.identity.entries import Entry
from agent.identity.manager import Identity
from agent.identity.spiffeid import SpiffeId
from agent.oauth.discovery import ServerMetadata
from agent.oauth.errors import OAuthError, ServerUnavailable
from agent.oauth.resolution import Resolved
from agent.oauth.service import OAuthService
from tests.helpers import free_port
from tests.unit.test_as_certificate import Minting
from tests.unit.test_fast_path import TOKEN, World, in_loop, request, run

SID = "spiffe://example.org/w"
IDENT = Identity(SpiffeId.parse(SID), Entry("w", SID, frozenset()))
DPOP_ONLY = 'DPoP algs="ES256", error="invalid_token"'


def answer_401(challenge: str) -> bytes:
    return (
        b"HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: %s\r\nContent-Length: 0\r\n\r\n"
        % challenge.encode()
    )


@in_loop
def test_a_scheme_refusal_hands_its_challenge_over_with_the_token():
    w = World()  # a Bearer token, the fast lane
    run(w, request(), answer=answer_401(DPOP_ONLY))
    assert w.oauth.invalidated == [TOKEN] and w.oauth.challenges == [DPOP_ONLY]
    assert w.client.transport.out.startswith(b"HTTP/1.1 502")


@in_loop
def test_an_invalid_token_of_the_scheme_sent_is_dropped_without_a_challenge():
    w = World()
    run(w, request(), answer=answer_401('Bearer error="invalid_token"'))
    assert w.oauth.invalidated == [TOKEN] and w.oauth.challenges == [None]
    assert w.client.transport.out.startswith(b"HTTP/1.1 401")


class Resolving(OAuthService):
    """The service with resolution recorded: each challenge it was asked with; it fails
    (`fail`) or resolves to a token endpoint where nobody listens."""

    def __init__(self, tmp, dpop: str):
        cfg = Config(servers=(ServerSection(name="mcp", url="http://127.0.0.1:9/mcp", dpop=dpop),))
        super().__init__(cfg, Minting(), str(tmp))
        self.seen: list[str | None] = []
        self.fail = True

    async def resolve(self, server, challenge=None, ident=None) -> Resolved:
        self.seen.append(challenge)
        if self.fail:
            raise OAuthError("the metadata could not be read")
        issuer = "http://127.0.0.1:9"
        meta = ServerMetadata(issuer, f"http://127.0.0.1:{free_port()}/token")
        return Resolved("http://127.0.0.1:9/mcp", issuer, meta, "", False)


def test_the_next_resolution_reads_the_refusals_challenge_until_it_succeeds(tmp_path):
    async def body() -> None:
        svc = Resolving(tmp_path, "auto")
        await svc.start()
        try:
            svc.invalidate(IDENT, "mcp", TOKEN, DPOP_ONLY)
            with pytest.raises(OAuthError):
                await svc.token(IDENT, "mcp")
            svc.fail = False  # a failed resolution keeps it for the next
            for _ in range(2):  # resolved once with it: the cached metadata says it now
                with pytest.raises(ServerUnavailable):
                    await svc.token(IDENT, "mcp")
        finally:
            await svc.stop()
        assert svc.seen == [DPOP_ONLY, DPOP_ONLY, None]

    asyncio.run(body())


def test_a_challenge_the_request_carries_wins_and_a_set_dpop_keeps_none(tmp_path):
    async def body() -> None:
        auto = Resolving(tmp_path / "a", "auto")
        auto.invalidate(IDENT, "mcp", TOKEN, DPOP_ONLY)
        with pytest.raises(OAuthError):
            await auto.token(IDENT, "mcp", challenge="Bearer scope=x")
        assert auto.seen == ["Bearer scope=x"]
        for setting in ("always", "never"):  # the setting decides: nothing to re-read
            fixed = Resolving(tmp_path / setting, setting)
            fixed.invalidate(IDENT, "mcp", TOKEN, DPOP_ONLY)
            fixed.invalidate(IDENT, "other", dataclasses.replace(TOKEN), DPOP_ONLY)
            with pytest.raises(OAuthError):
                await fixed.token(IDENT, "mcp")
            assert fixed.seen == [None]

    asyncio.run(body())
