"""The MCP server peer: the official `mcp` Python SDK (streamable HTTP), demanding tokens.

    python -m tests.mcp.server --fd N --issuer URL --resource URL [--dpop] --stats FILE
                               [--certfile PEM --keyfile PEM]

It serves the listening socket it inherits as fd N (bound by tests/mcp/peers.py).

Bearer tokens are checked by the SDK's auth (TokenVerifier + AuthSettings): an ES256 JWT
access token from the issuer's JWKS whose `aud` is this server's URL. With --dpop a small
ASGI layer in front of the SDK (which knows only Bearer) demands `Authorization: DPoP` and
checks the DPoP proof (RFC 9449): its key thumbprint is the token's cnf.jkt, its ath is the
token's hash, htm/htu are this request; then hands the token on as Bearer. It keeps, in
--stats, per-tool call counts and what each request carried (header names; the
Authorization scheme and a token fingerprint, never a token).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import os
import socket
import tempfile
import time

import jwt
import uvicorn
from jwt import PyJWKClient
from mcp.server.auth.provider import AccessToken
from mcp.server.auth.settings import AuthSettings
from mcp.server.mcpserver import Context, MCPServer

STATS: dict = {"calls": {}, "requests": []}


def save_stats(path: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path))
    with os.fdopen(fd, "w") as f:
        json.dump(STATS, f)
    os.replace(tmp, path)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class JwtVerifier:
    def __init__(self, issuer: str, resource: str):
        self.issuer, self.resource = issuer, resource
        self.jwks = PyJWKClient(f"{issuer}/jwks")

    async def verify_token(self, token: str) -> AccessToken | None:
        try:
            key = await asyncio.to_thread(self.jwks.get_signing_key_from_jwt, token)
            claims = jwt.decode(
                token, key.key, algorithms=["ES256"], audience=self.resource, issuer=self.issuer
            )
        except jwt.PyJWTError:
            return None
        return AccessToken(
            token=token,
            client_id=claims.get("client_id", ""),
            scopes=claims.get("scope", "").split(),
            expires_at=claims["exp"],
            resource=self.resource,
            claims=claims,
        )


class Recorder:
    """Records every request; with dpop=True enforces RFC 9449 before the SDK sees it."""

    def __init__(self, app, stats: str, dpop: bool, origin: str):
        self.app, self.stats, self.dpop, self.origin = app, stats, dpop, origin

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        auth = headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        STATS["requests"].append(
            {
                "method": scope["method"],
                "path": scope["path"],
                "header_names": sorted(headers),
                "auth_scheme": scheme or None,
                "token_sha256": hashlib.sha256(token.encode()).hexdigest()[:16] if token else None,
                "mcp_method": headers.get("mcp-method"),
            }
        )
        save_stats(self.stats)
        if self.dpop and auth:
            problem = self._check_dpop(scope, headers, scheme, token)
            if problem:
                body = json.dumps({"error": "invalid_token", "error_description": problem})
                await send(
                    {
                        "type": "http.response.start",
                        "status": 401,
                        "headers": [
                            (b"content-type", b"application/json"),
                            (
                                b"www-authenticate",
                                f'DPoP error="invalid_token", '
                                f'error_description="{problem}"'.encode(),
                            ),
                        ],
                    }
                )
                await send({"type": "http.response.body", "body": body.encode()})
                return
            scope = dict(
                scope,
                headers=[(k, v) for k, v in scope["headers"] if k.lower() != b"authorization"]
                + [(b"authorization", f"Bearer {token}".encode())],
            )
        return await self.app(scope, receive, send)

    def _check_dpop(self, scope, headers, scheme, token) -> str | None:
        if scheme.lower() != "dpop":
            return "this server requires DPoP-bound tokens"
        proof = headers.get("dpop")
        if not proof:
            return "missing DPoP proof"
        try:
            head = jwt.get_unverified_header(proof)
            claims = jwt.decode(proof, jwt.PyJWK(head["jwk"]).key, algorithms=["ES256"])
            token_claims = jwt.decode(token, options={"verify_signature": False})
        except (jwt.PyJWTError, KeyError) as e:
            return f"bad proof: {e}"
        jwk = head["jwk"]
        thumb = b64(
            hashlib.sha256(
                json.dumps(
                    {k: jwk[k] for k in ("crv", "kty", "x", "y")}, separators=(",", ":")
                ).encode()
            ).digest()
        )
        if head.get("typ") != "dpop+jwt":
            return "proof typ is not dpop+jwt"
        if thumb != token_claims.get("cnf", {}).get("jkt"):
            return "proof key does not match the token's cnf.jkt"
        if claims.get("ath") != b64(hashlib.sha256(token.encode()).digest()):
            return "proof ath does not match the token"
        if claims.get("htm") != scope["method"] or claims.get("htu") != self.origin + scope["path"]:
            return "proof htm/htu do not match this request"
        if abs(time.time() - claims.get("iat", 0)) > 60:
            return "proof is stale"
        return None


def build(args) -> Recorder:
    mcp = MCPServer(
        "credless-test-server",
        token_verifier=JwtVerifier(args.issuer, args.resource),
        auth=AuthSettings(
            issuer_url=args.issuer,
            resource_server_url=args.resource,
            validate_token_resource=True,
            required_scopes=args.required_scope or None,
        ),
    )

    def count(name: str) -> None:
        STATS["calls"][name] = STATS["calls"].get(name, 0) + 1
        save_stats(args.stats)

    @mcp.tool()
    def echo(text: str) -> str:
        count("echo")
        return text

    @mcp.tool()
    def add(a: int, b: int) -> int:
        count("add")
        return a + b

    @mcp.tool()
    def secret_tool() -> str:
        count("secret_tool")
        return "the secret"

    @mcp.tool()
    async def stream_count(n: int, delay_ms: int, ctx: Context) -> str:
        count("stream_count")
        for i in range(n):
            await ctx.report_progress(i + 1, n, f"step {i + 1}")
            await asyncio.sleep(delay_ms / 1000)
        return f"counted {n}"

    origin = args.resource.rsplit("/mcp", 1)[0]
    return Recorder(mcp.streamable_http_app(), args.stats, args.dpop, origin)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--fd", type=int, required=True)
    ap.add_argument("--issuer", required=True)
    ap.add_argument("--resource", required=True)
    ap.add_argument("--dpop", action="store_true")
    ap.add_argument("--required-scope", action="append")
    ap.add_argument("--stats", required=True)
    ap.add_argument("--certfile", help="serve https with this chain (leaf first)")
    ap.add_argument("--keyfile")
    args = ap.parse_args()
    save_stats(args.stats)
    tls = {"ssl_certfile": args.certfile, "ssl_keyfile": args.keyfile} if args.certfile else {}
    server = uvicorn.Server(uvicorn.Config(build(args), log_level="warning", lifespan="on", **tls))
    # the socket already listens: a client connecting before the loop serves it waits
    print(f"READY {args.resource}", flush=True)
    asyncio.run(server.serve(sockets=[socket.socket(fileno=args.fd)]))


if __name__ == "__main__":
    main()
