"""Assertion mode: a workload's own token requests to its authorization server, with
credless's client authentication put in.

In assertion mode a [[servers]] url is the authorization server's token endpoint; the
workload runs its own OAuth client and holds only a placeholder. decide.py has checked the
request (an attested process, a form POST to the configured endpoint, the right Host); this
module reads the form and puts a fresh JWT-SVID (aud = the issuer) in as the client
assertion, then hands the request to the exchange like any other.
"""

from __future__ import annotations

from collections.abc import Callable
from urllib.parse import parse_qsl, urlencode

from agent.inject.bodies import Replay, read_body
from agent.inject.exchange import Exchanges, reply
from agent.inject.http1 import Head
from agent.inject.ports import Identities
from agent.inject.record import AuditBase, Recorder
from agent.inject.served import Served
from agent.inject.upstreams import Upstream

JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"


class AssertionRequests:
    def __init__(
        self,
        identity: Identities,
        rec: Recorder,
        exchanges: Exchanges,
        issuer_of: Callable[[Upstream], str],
        max_body: int,
    ):
        self.identity = identity
        self.rec = rec
        self.exchanges = exchanges
        self.issuer_of = issuer_of  # the issuer of a server's authorization server
        self.max_body = max_body

    async def handle(
        self, head: Head, served: Served, audit_base: AuditBase, started: float
    ) -> bool:
        """Put the client authentication (a fresh JWT-SVID, aud = the issuer) in a token
        request in place of whatever placeholder it carried, when it is a client_credentials
        grant; other grants go on as sent. Returns whether the connection stays open."""
        client, up = served.client, served.up
        body = await read_body(client, self.max_body)
        if body is None:
            await reply(
                client,
                413,
                b"Payload Too Large",
                f"credless: token request body larger than {self.max_body} bytes",
            )
            return False
        form = dict(parse_qsl(body.decode("latin-1"), keep_blank_values=True))
        if form.get("grant_type") == "client_credentials":
            ident = served.holder()
            sid = str(ident.spiffe_id)
            issuer = self.issuer_of(up)
            svid = self.identity.jwt_svid(ident, [issuer], ttl=60, iss=sid)
            form.update(
                client_id=sid, client_assertion=svid.token, client_assertion_type=JWT_BEARER
            )
            form.pop("client_secret", None)
            self.rec.audit_event(
                "assertion.injected", audit_base, jti=svid.jti, kid=svid.kid, audience=issuer
            )
        new_body = urlencode(form).encode()
        head.remove(b"content-length", b"transfer-encoding")
        head.add(b"Content-Length", b"%d" % len(new_body))
        head.chunked = False
        return await self.exchanges.run(head, Replay(new_body), served, None, audit_base, started)
