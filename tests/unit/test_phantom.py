"""Phantom placeholders (agent/inject/phantom.py) and the decision on a request carrying one
(agent/inject/decide.py): the placeholder of the caller for this server is swapped for the
token; anyone else's, or one for another server, is refused as misuse and names the identity
it was issued to; one that does not verify is refused; any other token is not a placeholder.

Placeholders are real JWT-SVIDs signed with real keys (agent/identity/jwtsvid.py), checked
against a real trust bundle; the clock is injected."""

from __future__ import annotations

import dataclasses

import pytest
from prometheus_client import CollectorRegistry

from agent.config import InjectSection
from agent.identity.bundle import TrustBundle
from agent.identity.jwt_rotation import JwtSigningKeys
from agent.identity.jwtsvid import mint_jwt_svid
from agent.identity.spiffeid import TrustDomain
from agent.inject import answers, decide, http1
from agent.inject.phantom import PhantomInvalid, PhantomVerifier, audience
from agent.inject.upstreams import Upstream, authorities

NOW = 1_900_000_000.0
BOT, OTHER = "spiffe://example.org/bot", "spiffe://example.org/other"


class Bundles:
    """The identity manager's bundle() over keys of the test's own."""

    def __init__(self, keys: JwtSigningKeys):
        self.keys = keys

    def bundle(self) -> TrustBundle:
        return TrustBundle(TrustDomain("example.org"), jwt_authorities=self.keys.published(NOW))


@pytest.fixture
def keys() -> JwtSigningKeys:
    return JwtSigningKeys(clock=lambda: NOW)


@pytest.fixture
def verifier(keys) -> PhantomVerifier:
    return PhantomVerifier(Bundles(keys), clock=lambda: NOW, registry=CollectorRegistry())


def placeholder(keys, holder=BOT, server="tools", ttl=300) -> bytes:
    token = mint_jwt_svid(keys, holder, audience(server), ttl=ttl).token
    return b"Bearer " + token.encode()


def upstream(mode: str, name: str = "tools") -> Upstream:
    return Upstream(
        name,
        "http",
        "127.0.0.1",
        8080,
        "http://127.0.0.1:8080",
        mode,
        b"/mcp",
        authorities("http", "127.0.0.1:8080", 8080),
    )


def test_a_placeholder_names_its_holder_and_server(keys, verifier):
    found = verifier.binding(placeholder(keys))
    assert (found.spiffe_id, found.server) == (BOT, "tools") and found.jti


@pytest.mark.parametrize(
    "value",
    [
        b"Bearer not-a-jwt",
        b"Basic dXNlcjpwYXNz",
        b"Bearer eyJhbGciOiJFUzI1NiJ9.eyJhdWQiOiJodHRwczovL2FwaSJ9.c2ln",  # another audience
        b"Bearer a.b.c",
    ],
)
def test_another_credential_is_not_a_placeholder(verifier, value):
    assert verifier.binding(value) is None


@pytest.mark.parametrize(
    "spelling",
    [
        lambda token: b"Bearer\t" + token,  # servers read a tab as the separator
        lambda token: b"bearer  " + token + b" ",
        lambda token: b"DPoP " + token,
        lambda token: b"Bearer " + token + b" trailing",  # a placeholder behind other text
        lambda token: b"Bearer junk " + token,
    ],
    ids=["tab", "spaces", "dpop", "text-after", "text-before"],
)
def test_a_placeholder_is_found_however_the_value_around_it_is_spelt(keys, verifier, spelling):
    """A stolen placeholder sent as `Bearer<TAB>token` was not recognised: stripped as any
    other token, with no misuse event and no revocation of its holder's token."""
    token = placeholder(keys).split(b" ", 1)[1]
    found = verifier.binding(spelling(token))
    assert found is not None and (found.spiffe_id, found.server) == (BOT, "tools")


def test_a_placeholder_that_does_not_verify_is_invalid(keys, verifier):
    stranger_keys = JwtSigningKeys(clock=lambda: NOW)  # signed by no key of the bundle
    with pytest.raises(PhantomInvalid, match="kid"):
        verifier.binding(placeholder(stranger_keys))
    expired = PhantomVerifier(Bundles(keys), clock=lambda: NOW + 301)
    with pytest.raises(PhantomInvalid, match="expired"):
        expired.binding(placeholder(keys, ttl=300))
    token = placeholder(keys)
    forged = token[:-4] + (b"AAAA" if not token.endswith(b"AAAA") else b"BBBB")
    with pytest.raises(PhantomInvalid):
        verifier.binding(forged)


def test_a_remembered_placeholder_still_expires(keys):
    now = [NOW]
    v = PhantomVerifier(Bundles(keys), clock=lambda: now[0])
    token = placeholder(keys, ttl=60)
    assert v.binding(token) is not None
    now[0] = NOW + 61
    with pytest.raises(PhantomInvalid, match="expired"):
        v.binding(token)


def head(authorization: bytes | None) -> decide.Request:
    raw = b"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nContent-Length: 2\r\n"
    if authorization is not None:
        raw += b"Authorization: " + authorization + b"\r\n"
    events = http1.Reader().feed(raw + b"\r\n")
    return decide.Request.from_head(events[0][1])


# (case, placeholder holder/server, caller, server mode, workload_authorization) -> verdict
CASES = [
    ("own-placeholder", (BOT, "tools"), BOT, "phantom", "strip", "forward"),
    ("own-placeholder-reject-mode", (BOT, "tools"), BOT, "phantom", "reject", "forward"),
    ("another-identitys", (BOT, "tools"), OTHER, "phantom", "strip", "misuse"),
    ("no-identity", (BOT, "tools"), None, "phantom", "strip", "misuse"),
    ("for-another-server", (BOT, "files"), BOT, "phantom", "strip", "misuse"),
    ("at-a-broker-server", (BOT, "files"), BOT, "broker", "strip", "misuse"),
    ("own-at-a-broker-server", (BOT, "tools"), BOT, "broker", "strip", "forward"),
    ("own-at-a-broker-server-reject", (BOT, "tools"), BOT, "broker", "reject", "workload"),
    ("at-a-passthrough-server", (OTHER, "tools"), BOT, "passthrough", "strip", "misuse"),
]


@pytest.mark.parametrize(
    ("placed", "caller", "mode", "workload_authorization", "want"),
    [pytest.param(*c[1:], id=c[0]) for c in CASES],
)
def test_the_decision_on_a_placeholder(
    keys, verifier, placed, caller, mode, workload_authorization, want
):
    settings = dataclasses.replace(
        InjectSection(), workload_authorization=workload_authorization, unattested="deny"
    )
    req = head(placeholder(keys, *placed))
    v = decide.decide(req, upstream(mode), decide.Caller(True, caller), settings, None, verifier)
    if want == "forward":
        assert v.action == decide.FORWARD and v.strip and v.credential == (mode != "passthrough")
    elif want == "misuse":
        assert (v.action, v.status, v.outcome) == (decide.ANSWER, 403, "phantom_misuse")
        assert v.misuse.spiffe_id == placed[0] and v.misuse.server == placed[1]
        assert placed[0] in v.message and "tools" in v.message
        assert answers.CODES[v.outcome] == answers.PLACEHOLDER_REFUSED
    else:
        assert (v.status, v.outcome) == (400, "workload_credentials")


def test_an_invalid_placeholder_is_refused_401(keys, verifier):
    stranger_keys = JwtSigningKeys(clock=lambda: NOW)
    v = decide.decide(
        head(placeholder(stranger_keys)),
        upstream("phantom"),
        decide.Caller(True, BOT),
        InjectSection(),
        None,
        verifier,
    )
    assert (v.action, v.status, v.outcome) == (decide.ANSWER, 401, "phantom_invalid")


def test_without_a_placeholder_a_phantom_server_is_a_broker(verifier):
    v = decide.decide(
        head(None), upstream("phantom"), decide.Caller(True, BOT), InjectSection(), None, verifier
    )
    assert v.action == decide.FORWARD and v.credential and not v.strip
    # and a process without identity gets no credential there, as at a broker server
    v = decide.decide(
        head(None), upstream("phantom"), decide.Caller(True, None), InjectSection(), None, verifier
    )
    assert (v.status, v.outcome) == (403, "unattested")


def test_misuse_is_counted_and_answered_by_each_response(keys):
    registry = CollectorRegistry()
    v = PhantomVerifier(Bundles(keys), clock=lambda: NOW, registry=registry)
    seen = []
    v.on_misuse.append(lambda found, server: seen.append((found.spiffe_id, server)))
    v.misused(v.binding(placeholder(keys)), "files")
    assert seen == [(BOT, "files")]
    sample = registry.get_sample_value("credless_phantom_misuse_total", {"server": "files"})
    assert sample == 1
