"""Assertion mode recognises the token and registration endpoints as the authorization
server routes them. It compared their paths byte for byte, but oidc-provider 9's router
(tests/oidc/node_modules/oidc-provider/lib/helpers/router.js, Router.#lookup / match) folds
ASCII case and drops one trailing slash: `POST /TOKEN` and `POST /token/` are its token
endpoint, `POST /REG` and `POST /reg/` its registration endpoint. credless took those for
"anything else" and forwarded the body as sent, so

- a workload's own JWT client assertion (and client_secret) reached the AS unrefused and
  unaudited (docs/security.md: "the workload's own JWT assertion is refused (400)");
- a registration reached the AS with the workload's own spiffe_id, jwks and
  software_statement, none of credless's metadata: the AS registered the client the
  workload chose, with keys the workload holds.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from agent.inject import decide
from tests.unit.test_assertion_seams import MINTED, SID, AsTokens, AsWorld, server
from tests.unit.test_decide_checks import decided

# the spellings oidc-provider's router sends to the endpoint the metadata names
TOKEN_SPELLINGS = ["/TOKEN", "/Token", "/token/", "/TOKEN/"]
REGISTRATION_SPELLINGS = [b"/REG", b"/Reg", b"/reg/"]


@pytest.mark.parametrize("target", TOKEN_SPELLINGS)
def test_a_token_request_spelt_as_the_as_routes_it_is_read_by_credless(target):
    # a form POST carrying the workload's own JWT client assertion
    verdict = decided(
        f"POST {target} HTTP/1.1\nHost: 127.0.0.1:8080\n"
        "Content-Type: application/x-www-form-urlencoded\nContent-Length: 2",
        server="assertion",
    )
    # either credless reads the body (rewrites or refuses the workload's JWT), or it
    # refuses the request: never forwarded unread to the token endpoint
    assert verdict.read_body or verdict.action != decide.FORWARD, verdict


@pytest.mark.parametrize("target", REGISTRATION_SPELLINGS)
def test_a_registration_spelt_as_the_as_routes_it_carries_credless_metadata(target):
    async def body():
        w = AsWorld(AsTokens(server()))
        workload_meta = {
            "client_name": "w",
            "spiffe_id": "spiffe://example.org/someone-else",
            "jwks": {"keys": [{"kty": "EC", "crv": "P-256", "x": "AA", "y": "AA", "kid": "mine"}]},
            "software_statement": MINTED,  # e.g. one an earlier registration's answer echoed
        }
        await w.send(target, json.dumps(workload_meta).encode(), b"Content-Type: application/json")
        if w.upstream.transport.out == b"":
            status, _ = w.answer()
            assert status == 400  # refused: acceptable
            return
        sent = w.sent_json()
        # what oidc-provider registers must be the caller's SPIFFE identity with credless's keys
        assert sent.get("spiffe_id") == SID, sent.get("spiffe_id")
        assert "mine" not in json.dumps(sent.get("jwks", {})), "the workload's own key was sent"
        assert sent.get("software_statement") != MINTED, "the workload's statement was sent"

    asyncio.run(body())
