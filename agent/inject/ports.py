"""What the proxy asks of the components around it, each as the few calls it makes.

The proxy is given the attestor, the identity manager, the OAuth service, the redirect and
the policy engine; it needs a handful of calls from each. Naming only those keeps the proxy
testable without the kernel or an authorization server (tests/unit/test_fast_path.py fakes
each port in a few lines) and shows, in one place, how far the proxy reaches into the rest.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Protocol

from agent.attest.selectors import Attestation
from agent.identity.bundle import TrustBundle
from agent.identity.jwtsvid import JwtSvid
from agent.identity.manager import Identity
from agent.inject.redirect import RedirectInfo
from agent.oauth.discovery import ServerMetadata
from agent.oauth.tokens import Token
from agent.policy.rules import Decision

# a socket's address as asyncio gives it: (host, port), or (host, port, flowinfo, scope_id)
SockAddr = tuple[Any, ...]


class RedirectRecords(Protocol):
    """The kernel's record of each redirected connection (agent.inject.redirect.Redirector)."""

    def lookup(self, peer: SockAddr, local: SockAddr, netns: int) -> RedirectInfo | None: ...

    def forget(self, peer: SockAddr, local: SockAddr, info: RedirectInfo) -> None: ...

    def sender_changes(self, cookie: int) -> int | None: ...

    def sender(self, cookie: int) -> int | None: ...


class ImageSource(Protocol):
    """The kernel's view of process images (agent.attest.events.ProcessEventSource)."""

    def image_changes(self, tgid: int) -> int | None: ...

    def kernel_image(self, tgid: int) -> tuple[int, int] | None: ...


class Attestations(Protocol):
    """Who a process image is (agent.attest.attestor.Attestor)."""

    @property
    def source(self) -> ImageSource: ...

    def attest_image(self, tgid: int, exec_ns: int, timeout: float = 1.0) -> Attestation | None: ...

    def ancestors(self, att: Attestation) -> Iterator[Attestation]: ...


class Identities(Protocol):
    """Attested image to SPIFFE identity (agent.identity.manager.IdentityManager)."""

    @property
    def generation(self) -> int:
        """Moves whenever the registration entries change: resolved identities are stale."""
        ...

    def resolve(self, attestation: Attestation, quiet: bool = False) -> Identity | None: ...

    def note_use(self, ident: Identity, attestation: Attestation) -> None: ...

    def jwt_svid(
        self, ident: Identity, audience: list[str], ttl: int | None = None, iss: str | None = None
    ) -> JwtSvid: ...

    def bundle(self) -> TrustBundle:
        """The JWT-SVID keys, for a registration's inline JWKS (assertion mode)."""
        ...


class ProofKey(Protocol):
    """A workload's DPoP key (agent.oauth.dpop.DPoPKey)."""

    def proof(self, method: str, url: str, access_token: str | None = None) -> str: ...


class CacheGeneration(Protocol):
    @property
    def generation(self) -> int:
        """Moves whenever a cached token is added, replaced or dropped."""
        ...


class HitCounter(Protocol):
    def inc(self, amount: int = 1) -> None: ...


class AuthorizationServer(Protocol):
    """A configured MCP server as the OAuth service knows it (agent.config.ServerSection):
    the settings the proxy and assertion mode read."""

    @property
    def issuer(self) -> str:
        """Its authorization server's issuer (assertion mode: configured)."""
        ...

    @property
    def auth_profile(self) -> str:
        """The client assertion's profile: "jwt-bearer" or "jwt-spiffe"."""
        ...

    @property
    def assertion_audience(self) -> str:
        """The client assertion's aud: "issuer" or "token_endpoint"."""
        ...

    @property
    def workload_assertion(self) -> str:
        """A workload's own JWT where credless's goes: "refuse" or "replace"."""
        ...


class Tokens(Protocol):
    """Tokens per identity and server (agent.oauth.service.OAuthService)."""

    @property
    def cache(self) -> CacheGeneration: ...

    @property
    def m_hit(self) -> HitCounter:
        """Counts cache hits; the fast lane's reuse of a token it holds is one too."""
        ...

    @property
    def servers(self) -> Mapping[str, AuthorizationServer]: ...

    @property
    def jwks_uri(self) -> str | None:
        """Where authorization servers fetch the JWT-SVID keys (None: registered inline)."""
        ...

    async def server_metadata(self, issuer: str) -> ServerMetadata:
        """The authorization server's RFC 8414 metadata, as discovered (OAuthError)."""
        ...

    def cached_token(self, ident: Identity, server_name: str) -> Token | None: ...

    async def token(self, ident: Identity, server_name: str) -> Token: ...

    def dpop_key(self, spiffe_id: str) -> ProofKey: ...

    def invalidate(
        self, ident: Identity, server_name: str, token: Token, challenge: str | None = None
    ) -> None:
        """The server refused token: never serve it again. challenge: the 401's
        WWW-Authenticate when it named a scheme credless did not use (the server changed
        what it accepts): the next token for the server follows it at once."""
        ...


class Policy(Protocol):
    """MCP policy per identity, server and call (agent.policy.engine.PolicyEngine)."""

    def decide(
        self,
        spiffe_id: str,
        server: str,
        method: str,
        tool: str | None,
        parent: str | None,
        /,
        args: Any = None,
        selectors: Iterable[str] = (),
    ) -> Decision:
        """method: the JSON-RPC method, or "http:GET" and the like for a request without a
        body; tool: the tool, prompt or resource it names; parent: the SPIFFE ID of the
        caller's nearest ancestor with one (the caller is its sub-agent); args: the call's
        params.arguments (None: none) and selectors: the calling process's attested ones,
        read by rules' conditions (docs/policy.md)."""
        ...


class Binding(Protocol):
    @property
    def spiffe_id(self) -> str: ...

    @property
    def server(self) -> str: ...


class Placeholders(Protocol):
    """Phantom placeholders (agent.inject.phantom.PhantomVerifier)."""

    def binding(self, authorization: bytes) -> Binding | None:
        """The holder and server of the placeholder in an Authorization value; None when it
        is not one; ValueError when it is one that does not verify."""
        ...
