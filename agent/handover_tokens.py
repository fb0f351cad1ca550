"""Tokens across a handover (agent/handover.py): the old agent's cached tokens and the DPoP
keys they are bound to, handed to the new agent on the handover socket.

Memory to memory between two root processes over a 0600 unix socket: a token or key never
touches disk, and only fingerprints are logged. A token that would not verify any more, or
whose identity the new agent's entries no longer produce, is not taken.

The OAuth service exposes what this needs: held_dpop_keys() and adopt(); the keys travel as
PKCS#8 DER (DPoPKey.private_der / from_der).
"""

from __future__ import annotations

import base64
import dataclasses
import time
from typing import Any

from agent.oauth.dpop import DPoPKey
from agent.oauth.service import OAuthService
from agent.oauth.tokens import Token
from agent.observe.logging import get_logger

log = get_logger("handover")


def export_tokens(oauth: OAuthService) -> dict[str, Any]:
    """The valid cached tokens, with their cache keys, and the DPoP keys they need."""
    tokens = []
    sids = set()
    for key, tok in oauth.cache.tokens():
        if tok.valid():
            tokens.append({"key": list(key), "token": dataclasses.asdict(tok)})
            sids.add(key[0])
    keys = {
        sid: base64.b64encode(dk.private_der()).decode()
        for sid, dk in oauth.held_dpop_keys().items()
        if sid in sids
    }
    return {"tokens": tokens, "dpop_keys": keys}


def adopt_tokens(oauth: OAuthService, identity: Any, data: dict[str, Any]) -> list[tuple]:
    """Put the handed-over tokens into this agent's cache; returns (identity, server name)
    of each, for the caller to resolve so the cache can refresh them later."""
    adopted = []
    keys: dict[str, DPoPKey] = {}
    for sid, der in data.get("dpop_keys", {}).items():
        try:
            keys[sid] = DPoPKey.from_der(base64.b64decode(der))
        except (ValueError, TypeError):
            log.warning("a DPoP key handed over was refused", spiffe_id=sid)
    for item in data.get("tokens", []):
        try:
            key = tuple(item["key"])
            tok = Token(**item["token"])
        except (KeyError, TypeError):
            log.warning("a token handed over was refused: not a token")
            continue
        ident = identity.identity_for_id(key[0])
        if ident is None or not tok.valid() or key[1] not in oauth.servers:
            continue
        dk = keys.get(key[0])
        if tok.jkt is not None and (dk is None or dk.jkt != tok.jkt):
            continue  # a DPoP-bound token without its key is no use
        oauth.adopt(key, tok, dk)
        adopted.append((ident, key[1]))
        log.info(
            "token taken over",
            spiffe_id=key[0],
            server=key[1],
            token_sha256=tok.fingerprint,
            expires_in=int(tok.expires_at - time.time()),
        )
    return adopted


async def resolve_adopted(oauth: OAuthService, adopted: list[tuple]) -> None:
    """token() for each adopted pair: resolves the server (discovery, no token request while
    the adopted token is valid) so the cache knows how to refresh it."""
    for ident, server in adopted:
        try:
            await oauth.token(ident, server)
        except Exception as e:  # noqa: BLE001 — the adopted token serves on; first use retries
            log.warning("resolving a server for a token taken over failed", error=str(e))
