"""A logging MCP-server stand-in on uvicorn with h11 (pure-Python, strict HTTP/1.1 parser),
for the smuggling corpus and the differential test; the other parser is Node's llhttp
(node_upstream.mjs), and both answer and log alike.

    python -m tests.upstreams.h11_upstream FD LOGFILE ISSUER RESOURCE

It serves the listening socket inherited as FD (bound by the test). Every request that
reaches the ASGI app, i.e. that h11 parsed, is appended to LOGFILE as one JSON line before
it is answered (the same record as node_upstream.mjs; h11 gives header names lowercased, in
order, duplicates kept, and drops trailers, so `trailers` is always empty here). A request
h11 refuses never reaches the app: uvicorn answers 400 itself and nothing is logged.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import socket
import sys
from urllib.parse import urlsplit

import uvicorn

BODY_KEEP = 64 * 1024


def build(log_path: str, issuer: str, resource: str):
    log_fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    parts = urlsplit(resource)
    prm_path = f"/.well-known/oauth-protected-resource{parts.path}"
    prm_url = f"{parts.scheme}://{parts.netloc}{prm_path}"

    def log(record: dict) -> None:
        os.write(log_fd, (json.dumps({"server": "h11", **record}) + "\n").encode())

    async def reply(send, status: int, headers: list, body: bytes) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [*headers, (b"content-length", b"%d" % len(body))],
            }
        )
        await send({"type": "http.response.body", "body": body})

    def rpc_answer(body: bytes):
        try:
            msg = json.loads(body)
        except ValueError:
            return {"jsonrpc": "2.0", "id": None, "result": {}}  # not JSON: GET, DELETE

        def one(m):
            if isinstance(m, dict) and "id" in m:
                return {"jsonrpc": "2.0", "id": m["id"], "result": {"echoed": m.get("method")}}
            return None

        if isinstance(msg, list):
            return [a for a in map(one, msg) if a is not None] or None
        return one(msg)

    async def app(scope, receive, send):
        if scope["type"] == "lifespan":
            return
        target = scope["raw_path"] + (
            b"?" + scope["query_string"] if scope["query_string"] else b""
        )
        record = {
            "kind": "request" if scope["type"] == "http" else scope["type"],
            "conn": scope["client"][1] if scope.get("client") else None,
            # who uvicorn says the client is, and over what: with its default proxy_headers
            # it believes X-Forwarded-For/-Proto from a loopback peer, i.e. from credless
            "client": scope["client"][0] if scope.get("client") else None,
            "scheme": scope.get("scheme"),
            "method": scope.get("method", "GET"),
            "target": target.decode("latin-1"),
            "version": scope.get("http_version"),
            "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in scope["headers"]],
            "trailers": [],
        }
        if scope["type"] != "http":  # a WebSocket handshake: parsed, logged, refused
            log(
                {
                    **record,
                    "complete": True,
                    "body_len": 0,
                    "body_sha256": hashlib.sha256(b"").hexdigest(),
                    "body_b64": "",
                }
            )
            await send({"type": "websocket.close"})
            return
        body, complete = bytearray(), False
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                break
            body += msg.get("body", b"")
            if not msg.get("more_body"):
                complete = True
                break
        body = bytes(body)
        log(
            {
                **record,
                "complete": complete,
                "body_len": len(body),
                "body_sha256": hashlib.sha256(body).hexdigest(),
                "body_b64": base64.b64encode(body[:BODY_KEEP]).decode(),
            }
        )
        if not complete:
            return
        authorized = any(k == b"authorization" for k, _ in scope["headers"])
        if scope["method"] == "GET" and target == prm_path.encode() and not authorized:
            await reply(
                send,
                200,
                [(b"content-type", b"application/json")],
                json.dumps({"resource": resource, "authorization_servers": [issuer]}).encode(),
            )
        elif not authorized:
            await reply(
                send,
                401,
                [
                    (b"content-type", b"application/json"),
                    (b"www-authenticate", f'Bearer resource_metadata="{prm_url}"'.encode()),
                ],
                b'{"error": "unauthorized"}',
            )
        else:
            out = rpc_answer(body)
            if out is None:
                await reply(send, 202, [], b"")
            else:
                await reply(
                    send, 200, [(b"content-type", b"application/json")], json.dumps(out).encode()
                )

    return app


def main() -> None:
    fd, log_path, issuer, resource = sys.argv[1:5]
    sock = socket.socket(fileno=int(fd))
    config = uvicorn.Config(
        build(log_path, issuer, resource),
        http="h11",
        lifespan="off",
        log_level="error",
        access_log=False,
    )
    server = uvicorn.Server(config)
    # READY once the loop serves the inherited socket: the port was bound by the test
    print(f"READY {sock.getsockname()[1]}", flush=True)
    asyncio.run(server.serve(sockets=[sock]))


if __name__ == "__main__":
    main()
