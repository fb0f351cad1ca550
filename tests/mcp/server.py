"""The MCP server peer: the official `mcp` Python SDK (streamable HTTP), demanding tokens.

    python -m tests.mcp.server --fd N --issuer URL --resource URL [--dpop] --stats FILE
                               [--dpop-nonce ROTATE] [--certfile PEM --keyfile PEM]

It serves the listening sockets it inherits as fd N (--fd again for each more; bound by
tests/mcp/peers.py). Its Host check (the SDK's DNS-rebinding protection) also admits its
own URL's authority (an IPv4-mapped literal, say).

Bearer tokens are checked by the SDK's auth (TokenVerifier + AuthSettings): an ES256 JWT
access token from the issuer's JWKS whose `aud` is this server's URL. With --dpop a small
ASGI layer in front of the SDK (which knows only Bearer) demands `Authorization: DPoP` and
checks the DPoP proof (RFC 9449): its key thumbprint is the token's cnf.jkt, its ath is the
token's hash, htm/htu are this request; then hands the token on as Bearer. It says so as an
RFC 9728 server would: its 401 challenge names the DPoP scheme (algs="ES256") and its
protected-resource metadata has dpop_bound_access_tokens_required. With --dpop-nonce ROTATE
(implies --dpop) it also demands server nonces (RFC 9449 §9): a proof without the current or
the previous nonce it issued gets 401 `DPoP error="use_dpop_nonce"` with a DPoP-Nonce field;
every ROTATE-th accepted request makes a new nonce, sent in that answer's DPoP-Nonce; with
--dpop-nonce-forget K, after the K-th accepted request it forgets them all and makes one it
does not announce (as a restarted server would), so the next proof is challenged. It keeps, in
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
from urllib.parse import urlsplit

import jwt
import uvicorn
from jwt import PyJWKClient
from mcp.server.auth.provider import AccessToken
from mcp.server.auth.settings import AuthSettings
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.transport_security import TransportSecuritySettings

# nonces_issued: every nonce made; nonces_announced: those sent in a successful answer
STATS: dict = {
    "calls": {},
    "requests": [],
    "nonces_issued": [],
    "nonces_announced": [],
    "nonce_challenges": 0,
}


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


class IntrospectingVerifier:
    """Opaque tokens, each asked about at the authorization server (RFC 7662) as the resource
    server's own client: a token revoked there (RFC 7009) is refused here from then on."""

    def __init__(self, issuer: str, resource: str, client: str):
        self.issuer, self.resource = issuer, resource
        self.client_id, _, self.secret = client.partition(":")
        self.endpoint = ""
        self.seen: dict[str, str] = {}  # fingerprint -> token, every token it was shown

    async def recheck(self) -> dict[str, bool]:
        """GET /_recheck: whether each token it was ever shown would be accepted now."""
        return {fp: await self._active(t) is not None for fp, t in self.seen.items()}

    async def verify_token(self, token: str) -> AccessToken | None:
        self.seen[hashlib.sha256(token.encode()).hexdigest()[:16]] = token
        return await self._active(token)

    async def _active(self, token: str) -> AccessToken | None:
        import httpx

        async with httpx.AsyncClient(trust_env=False, timeout=10) as http:
            if not self.endpoint:
                meta = await http.get(f"{self.issuer}/.well-known/openid-configuration")
                self.endpoint = meta.json()["introspection_endpoint"]
            r = await http.post(
                self.endpoint,
                data={"token": token, "token_type_hint": "access_token"},
                auth=(self.client_id, self.secret),
            )
        claims = r.json() if r.status_code == 200 else {}
        auds = claims.get("aud", [])
        auds = [auds] if isinstance(auds, str) else auds
        if not claims.get("active") or self.resource not in auds:
            return None
        return AccessToken(
            token=token,
            client_id=claims.get("client_id", ""),
            scopes=claims.get("scope", "").split(),
            expires_at=claims.get("exp"),
            resource=self.resource,
        )


def with_field(message: dict, name: bytes, value: bytes) -> dict:
    """An http.response.start message with one more header field."""
    return dict(message, headers=[*message.get("headers", []), (name, value)])


class Recorder:
    """Records every request; with dpop=True enforces RFC 9449 before the SDK sees it, and
    with nonce_rotate also its server nonces."""

    def __init__(
        self,
        app,
        stats: str,
        dpop: bool,
        origin: str,
        nonce_rotate: int = 0,
        forget: int = 0,
        recheck=None,
    ):
        self.app, self.stats, self.origin = app, stats, origin
        self.recheck = recheck  # GET /_recheck (an introspecting server): tokens' verdicts now
        self.dpop = dpop or nonce_rotate > 0
        self.nonce_rotate, self.forget = nonce_rotate, forget
        self.nonces: list[str] = []  # issued, newest last
        self.accepted = 0  # requests whose proof carried an accepted nonce
        if nonce_rotate:
            self._new_nonce()

    def _new_nonce(self) -> str:
        nonce = b64(os.urandom(16))
        self.nonces.append(nonce)
        STATS["nonces_issued"].append(nonce)
        return nonce

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if scope["path"] == "/_recheck" and self.recheck is not None:
            body = json.dumps(await self.recheck()).encode()
            await send({"type": "http.response.start", "status": 200, "headers": []})
            return await send({"type": "http.response.body", "body": body})
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        auth = headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        record = {
            "method": scope["method"],
            "path": scope["path"],
            "header_names": sorted(headers),
            "auth_scheme": scheme or None,
            "token_sha256": hashlib.sha256(token.encode()).hexdigest()[:16] if token else None,
            "mcp_method": headers.get("mcp-method"),
            "host": headers.get("host"),
            "user_agent": headers.get("user-agent"),
        }
        STATS["requests"].append(record)
        save_stats(self.stats)
        if not self.dpop:
            return await self.app(scope, receive, send)
        if not auth:  # the SDK's challenge and metadata, as a DPoP-requiring server says them
            return await self.app(scope, receive, self._advertising(scope, send))
        problem = self._check_dpop(scope, headers, scheme, token)
        if problem:
            return await self._refuse(send, "invalid_token", problem)
        nonce = None
        if self.nonce_rotate:
            carried = jwt.decode(headers["dpop"], options={"verify_signature": False}).get("nonce")
            record["dpop_nonce"] = carried
            record["nonce_challenged"] = carried not in self.nonces[-2:]
            if record["nonce_challenged"]:  # neither the current one nor the one before it
                record["nonce_given"] = self.nonces[-1]
                STATS["nonce_challenges"] += 1
                save_stats(self.stats)
                await drain(receive)  # the connection stays usable: the retry may come on it
                return await self._refuse(
                    send, "use_dpop_nonce", "a DPoP nonce is required", nonce=self.nonces[-1]
                )
            self.accepted += 1
            if self.accepted == self.forget:
                self.nonces.clear()
                self._new_nonce()  # not announced: the next proof is challenged
            elif self.accepted % self.nonce_rotate == 0:
                nonce = self._new_nonce()
                STATS["nonces_announced"].append(nonce)
            save_stats(self.stats)
        scope = dict(
            scope,
            headers=[(k, v) for k, v in scope["headers"] if k.lower() != b"authorization"]
            + [(b"authorization", f"Bearer {token}".encode())],
        )
        if nonce is not None:
            send = self._with_nonce(send, nonce)
        return await self.app(scope, receive, send)

    async def _refuse(self, send, error: str, description: str, nonce: str | None = None):
        body = json.dumps({"error": error, "error_description": description})
        fields = [
            (b"content-type", b"application/json"),
            (
                b"www-authenticate",
                f'DPoP algs="ES256", error="{error}", error_description="{description}"'.encode(),
            ),
        ]
        if nonce is not None:
            fields.append((b"dpop-nonce", nonce.encode()))
        await send({"type": "http.response.start", "status": 401, "headers": fields})
        await send({"type": "http.response.body", "body": body.encode()})

    @staticmethod
    def _with_nonce(send, nonce: str):
        async def sending(message):
            if message["type"] == "http.response.start":
                message = with_field(message, b"dpop-nonce", nonce.encode())
            await send(message)

        return sending

    @staticmethod
    def _advertising(scope, send):
        """send, with the SDK's Bearer challenge spoken as DPoP and its protected-resource
        metadata saying that tokens must be DPoP-bound (the SDK knows only Bearer)."""
        metadata = scope["path"].startswith("/.well-known/oauth-protected-resource")
        start: dict = {}
        body = bytearray()

        async def sending(message):
            if message["type"] == "http.response.start":
                fields = []
                for k, v in message.get("headers", []):
                    if k.lower() == b"www-authenticate" and v.startswith(b"Bearer "):
                        v = b'DPoP algs="ES256", ' + v[len(b"Bearer ") :]
                    fields.append((k, v))
                message = dict(message, headers=fields)
                if metadata and message["status"] == 200:
                    start.update(message)  # its body is rewritten: sent with it
                    return
            elif start and message["type"] == "http.response.body":
                body.extend(message.get("body", b""))
                if message.get("more_body"):
                    return
                doc = json.loads(body)
                doc["dpop_bound_access_tokens_required"] = True
                doc["dpop_signing_alg_values_supported"] = ["ES256"]
                out = json.dumps(doc).encode()
                fields = [(k, v) for k, v in start["headers"] if k.lower() != b"content-length"]
                fields.append((b"content-length", b"%d" % len(out)))
                await send(dict(start, headers=fields))
                message = {"type": "http.response.body", "body": out}
            await send(message)

        return sending

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


async def drain(receive) -> None:
    """Read the request's body to its end (unread, the server would close the connection)."""
    while True:
        message = await receive()
        if message["type"] != "http.request" or not message.get("more_body"):
            return


def build(args) -> Recorder:
    verifier = (
        IntrospectingVerifier(args.issuer, args.resource, args.introspect)
        if args.introspect
        else JwtVerifier(args.issuer, args.resource)
    )
    mcp = MCPServer(
        "credless-test-server",
        token_verifier=verifier,
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
    return Recorder(
        mcp.streamable_http_app(
            transport_security=TransportSecuritySettings(
                enable_dns_rebinding_protection=True,
                # the SDK's loopback defaults, and this server's own authority
                allowed_hosts=["127.0.0.1:*", "localhost:*", "[::1]:*", urlsplit(origin).netloc],
                allowed_origins=["http://127.0.0.1:*", "http://localhost:*", "http://[::1]:*"],
            )
        ),
        args.stats,
        args.dpop,
        origin,
        args.dpop_nonce,
        args.dpop_nonce_forget,
        recheck=verifier.recheck if isinstance(verifier, IntrospectingVerifier) else None,
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--fd", type=int, action="append", required=True)
    ap.add_argument("--issuer", required=True)
    ap.add_argument("--resource", required=True)
    ap.add_argument("--dpop", action="store_true")
    ap.add_argument(
        "--dpop-nonce",
        type=int,
        default=0,
        metavar="ROTATE",
        help="demand DPoP nonces, a new one every ROTATE accepted requests (implies --dpop)",
    )
    ap.add_argument("--dpop-nonce-forget", type=int, default=0, metavar="K")
    ap.add_argument("--required-scope", action="append")
    ap.add_argument(
        "--introspect",
        metavar="CLIENT_ID:SECRET",
        help="opaque tokens, introspected at the issuer as this client (client_secret_basic)",
    )
    ap.add_argument("--stats", required=True)
    ap.add_argument("--certfile", help="serve https with this chain (leaf first)")
    ap.add_argument("--keyfile")
    args = ap.parse_args()
    save_stats(args.stats)
    tls = {"ssl_certfile": args.certfile, "ssl_keyfile": args.keyfile} if args.certfile else {}
    server = uvicorn.Server(uvicorn.Config(build(args), log_level="warning", lifespan="on", **tls))
    # the socket already listens: a client connecting before the loop serves it waits
    print(f"READY {args.resource}", flush=True)
    asyncio.run(server.serve(sockets=[socket.socket(fileno=fd) for fd in args.fd]))


if __name__ == "__main__":
    main()
