"""The agent's OAuth side in-process against the real oidc-provider, for integration tests.

`build()` starts an identity manager (entries for the given SPIFFE IDs, one uid selector
each), the bundle endpoint the clients' jwks_uri points at, and oidc-provider; then makes an
OAuthService for `servers`. With `tls` (a TestCA) oidc-provider and the bundle endpoint
serve https with leaves of that CA, which the service trusts through oauth.ca_file and
oidc-provider through NODE_EXTRA_CA_CERTS. `running()` runs that service on an event loop
of its own and always stops everything it started.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterable
from pathlib import Path
from types import SimpleNamespace

import httpx
from prometheus_client import CollectorRegistry

from agent import config
from agent.identity.bundle_endpoint import BundleEndpoint, default_jwks_uri
from agent.identity.manager import IdentityManager
from agent.oauth.service import OAuthService
from agent.observe import logging as obs
from tests.helpers import free_port
from tests.oidc.peer import OidcProvider
from tests.tlsca import TestCA


def build(
    tmp_path: Path,
    *,
    stream,
    identities: Iterable[str],
    servers: list[dict] | Callable,
    resources: dict,
    registered: Iterable[str],
    oidc_kwargs: dict | None = None,
    default_issuer: bool = True,
    tls: TestCA | None = None,
) -> SimpleNamespace:
    """`servers` is a list of [[servers]] tables, or a function of the started OidcProvider
    returning one (for settings that name its issuer). With `default_issuer`, a server with
    no `issuer` key gets oidc-provider's."""
    identities = tuple(identities)
    entries = tmp_path / "entries.toml"
    entries.write_text(
        "".join(
            f'[[entry]]\nid = "{s.rsplit("/", 1)[-1]}"\nspiffe_id = "{s}"\n'
            f'selectors = ["unix:uid:{i}"]\n'
            for i, s in enumerate(identities)
        )
    )
    port = free_port()
    base: dict = {
        "identity": {"entries_file": str(entries)},
        "bundle_endpoint": {"listen": f"127.0.0.1:{port}"},
    }
    if tls is not None:
        cert, key = tls.issue(f"bundle-{port}")
        base["bundle_endpoint"].update(cert_file=str(cert), key_file=str(key))
        base["oauth"] = {"ca_file": str(tls.cert_path)}
    parsed = config.parse(base)
    audit = obs.AuditLog("test-node", stream)
    state = str(tmp_path / "state")
    mgr = IdentityManager(parsed.identity, state, audit=audit, registry=CollectorRegistry())
    mgr.start()
    bundle = BundleEndpoint(mgr, "127.0.0.1", port, parsed.bundle_endpoint)
    bundle.start()
    jwks_uri = default_jwks_uri(parsed.bundle_endpoint)
    kw = {
        "resources": resources,
        "clients": [{"client_id": s, "jwks_uri": jwks_uri} for s in registered],
        "tls": tls,
    }
    kw.update(oidc_kwargs or {})
    try:
        oidc = OidcProvider(tmp_path, **kw).start()
    except BaseException:
        bundle.stop()
        mgr.stop()
        raise
    tables = servers(oidc) if callable(servers) else servers
    if default_issuer:
        tables = [dict(s, issuer=s.get("issuer", oidc.issuer)) for s in tables]
    cfg = config.parse({**base, "servers": tables})

    def new_service() -> OAuthService:
        """An OAuthService as a (re)started agent would make it: same config, same state."""
        return OAuthService(
            cfg, mgr, state, audit=audit, registry=CollectorRegistry(), jwks_uri=jwks_uri
        )

    return SimpleNamespace(
        mgr=mgr,
        bundle=bundle,
        oidc=oidc,
        svc=new_service(),
        cfg=cfg,
        jwks_uri=jwks_uri,
        state_dir=Path(state),
        audit=audit,
        new_service=new_service,
        ident=lambda sid: mgr.identity_for_id(sid),
    )


@contextlib.contextmanager
def running(s: SimpleNamespace, guard: httpx.AsyncBaseTransport | None = None):
    """Start s.svc on a loop of its own (s.run runs a coroutine on it). With `guard`, every
    request the service makes goes through that transport (see tests/mcp/hostile.py).
    `s.restart()` stops the service and starts a new one on the same state directory."""
    loop = asyncio.new_event_loop()
    s.run = loop.run_until_complete

    async def start(svc):
        await svc.start()
        if guard is not None:
            await svc.http.aclose()
            svc.http = httpx.AsyncClient(
                transport=guard, timeout=10.0, follow_redirects=False, trust_env=False
            )
            svc.discovery.http = svc.http

    def restart():
        loop.run_until_complete(s.svc.stop())
        s.svc = s.new_service()
        loop.run_until_complete(start(s.svc))
        return s.svc

    s.restart = restart
    try:
        loop.run_until_complete(start(s.svc))
        yield s
    finally:
        loop.run_until_complete(s.svc.stop())
        if guard is not None:
            loop.run_until_complete(guard.aclose())
        loop.close()
        s.oidc.stop()
        s.bundle.stop()
        s.mgr.stop()
