"""The Delegated Identity client against FakeSpireAgent (a FAKE, not SPIRE: see
tests/fakes/spire_agent.py for what it mirrors). Unix sockets only; the fake always stops."""

from __future__ import annotations

import json

import grpc
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import verification

from agent.identity.jwtsvid import JwtSvidError, validate_jwt_svid
from agent.identity.proto import delegatedidentity_pb2 as pb
from agent.identity.proto import delegatedidentity_pb2_grpc as pb_grpc
from agent.identity.proto import spire_types_pb2 as types_pb
from agent.identity.spiffeid import SpiffeId
from agent.identity.spire import SpireDelegatedIdentityClient, backoff_delays, retry
from agent.identity.spire_errors import (
    SpireError,
    SpireInvalidRequest,
    SpireNotAuthorized,
    SpireProtocolError,
    SpireUnavailable,
)
from agent.identity.x509svid import X509Svid
from tests.fakes.spire_agent import FakeSpireAgent

pytestmark = pytest.mark.timeout(60)

AUD = "https://as.example/"
WEB_SELECTORS = ["unix:uid:1000", "unix:gid:1000"]
WEB = "spiffe://example.org/workload/web"
API = "spiffe://example.org/k8s/ns/prod/sa/api"
DELEGATE_FIX = (
    "add this agent's SPIFFE ID to authorized_delegates in the SPIRE agent config "
    "(and register an entry for this agent itself)"
)


@pytest.fixture(params=["id", "name"])
def fake(request):
    """Bundle maps keyed `spiffe://td` (SPIRE's code) and `td` (the proto comments)."""
    with FakeSpireAgent(bundle_key_form=request.param) as agent:
        agent.register(
            ["unix:uid:1000"], WEB, hint="internal", federates_with=["spiffe://partner.example"]
        )
        agent.register(["k8s:ns:prod", "k8s:sa:api"], API)
        yield agent


@pytest.fixture
def client(fake):
    with SpireDelegatedIdentityClient(fake.socket_path, timeout=5) as c:
        yield c


def verify(svid, bundle):
    store = verification.Store(list(bundle.x509_authorities))
    verifier = verification.PolicyBuilder().store(store).build_client_verifier()
    return verifier.verify(svid.leaf, list(svid.cert_chain[1:])).chain


# ------------------------------------------------------------------ JWT-SVIDs
def test_jwt_svid_by_selectors_validates_against_streamed_bundle(fake, client):
    svids = client.fetch_jwt_svids(WEB_SELECTORS, [AUD])
    assert [(str(s.spiffe_id), s.hint) for s in svids] == [(WEB, "internal")]
    svid = svids[0]
    assert svid.issued_at < svid.expires_at

    call = fake.calls[-1]
    assert call.selectors == (("unix", "uid:1000"), ("unix", "gid:1000"))  # first colon only
    assert call.audience == (AUD,) and call.pid == 0
    assert call.metadata.get("workload.spiffe.io") == "true"

    with client.subscribe_jwt_bundles() as sub:
        bundles = next(sub)
    assert sorted(bundles) == ["example.org", "partner.example"]  # normalised in both forms
    checked = validate_jwt_svid(svid.token, AUD, bundles)
    assert checked.spiffe_id == SpiffeId.parse(WEB)
    with pytest.raises(JwtSvidError):
        validate_jwt_svid(svid.token, "https://other.example/", bundles)


def test_jwt_bundle_stream_pushes_rotation_and_keeps_old_key(fake, client):
    old = client.fetch_jwt_svids(["k8s:ns:prod", "k8s:sa:api", "k8s:pod-name:x"], AUD)[0]
    with client.subscribe_jwt_bundles() as sub:
        first = next(sub)
        fake.rotate()
        second = next(sub)
    assert set(second["example.org"].jwt_authorities) > set(first["example.org"].jwt_authorities)
    new = client.fetch_jwt_svids(["k8s:ns:prod", "k8s:sa:api"], AUD)[0]
    for svid in (old, new):  # the retired key stays published until its tokens expire
        assert str(validate_jwt_svid(svid.token, AUD, second).spiffe_id) == API


# ------------------------------------------------------------------ X509-SVIDs
def test_x509_stream_chain_verifies_and_rotation_is_pushed(fake, client):
    with client.subscribe_x509_bundles() as bsub:
        bundles = next(bsub)
    assert sorted(bundles) == ["example.org", "partner.example"]
    local = bundles["example.org"]
    assert [c.fingerprint(c.signature_hash_algorithm) for c in local.x509_authorities] == [
        c.fingerprint(c.signature_hash_algorithm) for c in fake.ca.roots
    ]

    with client.subscribe_x509_svids(["unix:uid:1000"]) as sub:
        first = next(sub)
        fake.rotate()
        second = next(sub)
    for update in (first, second):
        assert len(update) == 1 and update.federates_with == ("partner.example",)
        svid = update[0]
        assert str(svid.spiffe_id) == WEB and svid.hint == "internal"
        assert verify(svid, local)[0] == svid.leaf
        assert svid.private_key.public_key() == svid.leaf.public_key()
        assert svid.expires_at == int(svid.leaf.not_valid_after_utc.timestamp())
        assert isinstance(svid, X509Svid) and svid.not_after == svid.leaf.not_valid_after_utc
    assert first[0].fingerprint != second[0].fingerprint
    assert first[0].private_key.private_numbers() != second[0].private_key.private_numbers()


def test_x509_stream_is_empty_until_an_entry_matches(fake, client):
    with client.subscribe_x509_svids(["unix:uid:2000"]) as sub:
        assert list(next(sub)) == []  # complete state: no identity, nothing to hold
        fake.register(["unix:uid:2000"], "spiffe://example.org/workload/batch")
        update = next(sub)
    assert [str(s.spiffe_id) for s in update] == ["spiffe://example.org/workload/batch"]


def test_x509_stream_ends_when_the_delegate_is_deauthorized(fake, client):
    sub = client.subscribe_x509_svids(["unix:uid:1000"])
    try:
        next(sub)
        fake.caller_authorized = False
        fake.rotate()  # the agent re-checks the caller before every update
        with pytest.raises(SpireNotAuthorized):
            next(sub)
    finally:
        sub.cancel()


def test_cancel_stops_iteration(fake, client):
    sub = client.subscribe_x509_bundles()
    next(sub)
    sub.cancel()
    with pytest.raises(StopIteration):
        next(sub)


# ------------------------------------------------------------------ errors
def test_not_an_authorized_delegate(fake, client):
    fake.caller_authorized = False
    with pytest.raises(SpireNotAuthorized) as ei:
        client.fetch_jwt_svids(WEB_SELECTORS, [AUD])
    assert str(ei.value) == (
        f"FetchJWTSVIDs denied by the SPIRE agent at {fake.socket_path} (caller not configured "
        f"as an authorized delegate): {DELEGATE_FIX}"
    )
    assert ei.value.retryable and ei.value.code == grpc.StatusCode.PERMISSION_DENIED


@pytest.mark.parametrize("caller_registered", [False, True])
def test_no_identity_issued(fake, client, caller_registered):
    fake.caller_registered = caller_registered  # unregistered caller, or unmatched selectors
    with pytest.raises(SpireNotAuthorized) as ei:
        client.fetch_jwt_svids(["unix:uid:4242"], [AUD])
    assert str(ei.value) == (
        f"FetchJWTSVIDs denied by the SPIRE agent at {fake.socket_path} (no identity issued): "
        f"either {DELEGATE_FIX}, or no registration entry for this node matches the selectors "
        "['unix:uid:4242']"
    )


@pytest.mark.parametrize(
    "code, detail, error, retryable, message",
    [
        (
            grpc.StatusCode.INVALID_ARGUMENT,
            "could not parse provided selectors",
            SpireInvalidRequest,
            False,  # the same request would fail the same way
            "FetchJWTSVIDs rejected by the SPIRE agent at {socket} as invalid (could not "
            "parse provided selectors); check the selectors and audience, retrying won't help",
        ),
        (
            grpc.StatusCode.UNAVAILABLE,
            "could not fetch JWT-SVID: upstream down",
            SpireUnavailable,
            True,
            "FetchJWTSVIDs: the SPIRE agent at {socket} is unavailable (could not fetch "
            "JWT-SVID: upstream down); is the SPIRE agent running with admin_socket_path = "
            '"{socket}"? (will retry)',
        ),
    ],
)
def test_an_error_from_the_agent_says_what_to_do(
    fake, client, code, detail, error, retryable, message
):
    fake.fail_next(1, code, detail)
    with pytest.raises(error) as ei:
        client.fetch_jwt_svids(WEB_SELECTORS, [AUD])
    assert str(ei.value) == message.format(socket=fake.socket_path)
    assert ei.value.retryable is retryable


@pytest.mark.parametrize(
    "selectors, audience, message",
    [
        (
            WEB_SELECTORS,
            [],
            "FetchJWTSVIDs: audience must be one or more non-empty strings (e.g. the OAuth issuer)",
        ),
        (
            WEB_SELECTORS,
            [""],
            "FetchJWTSVIDs: audience must be one or more non-empty strings (e.g. the OAuth issuer)",
        ),
        (
            [],
            [AUD],
            "FetchJWTSVIDs: at least one selector is required (an empty set would name no "
            "workload)",
        ),
        (
            ["unix"],
            [AUD],
            "invalid selector 'unix': expected 'type:value', e.g. 'unix:uid:1000' or 'k8s:ns:prod'",
        ),
        (
            [":uid:1"],
            [AUD],
            "invalid selector ':uid:1': expected 'type:value', e.g. "
            "'unix:uid:1000' or 'k8s:ns:prod'",
        ),
    ],
)
def test_invalid_requests_are_refused_before_sending(fake, client, selectors, audience, message):
    with pytest.raises(SpireInvalidRequest) as ei:
        client.fetch_jwt_svids(selectors, audience)
    assert str(ei.value) == message
    assert fake.calls == []


def test_unavailable_when_the_socket_is_absent(tmp_path):
    path = str(tmp_path / "admin.sock")
    with SpireDelegatedIdentityClient(path, timeout=2) as c:
        with pytest.raises(SpireUnavailable) as ei:
            c.fetch_jwt_svids(WEB_SELECTORS, [AUD])
        assert str(ei.value) == (
            f"FetchJWTSVIDs: no SPIRE agent admin socket at {path}; is the SPIRE agent running "
            f'with admin_socket_path = "{path}"? (will retry)'
        )
        assert ei.value.retryable
        with pytest.raises(SpireUnavailable, match="SubscribeToX509SVIDs: no SPIRE agent"):
            c.subscribe_x509_svids(WEB_SELECTORS)


def test_malformed_responses_fail_closed_without_leaking_secrets(fake, client):
    tokens: list[str] = []

    def wrong_id(kind, msg):
        if kind == "FetchJWTSVIDsResponse":
            tokens.extend(s.token for s in msg.svids)
            msg.svids[0].id.path = "/workload/someone-else"
        return msg

    fake.response_hook = wrong_id
    with pytest.raises(SpireProtocolError) as ei:
        client.fetch_jwt_svids(WEB_SELECTORS, [AUD])
    assert "does not match the SPIFFE ID" in str(ei.value)
    assert tokens and tokens[0] not in str(ei.value) and tokens[0] not in repr(ei.value)

    other = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )

    def wrong_key(kind, msg):
        if kind == "SubscribeToX509SVIDsResponse":
            msg.x509_svids[0].x509_svid_key = other
        return msg

    fake.response_hook = wrong_key
    with client.subscribe_x509_svids(["unix:uid:1000"]) as sub:
        with pytest.raises(SpireProtocolError, match="does not match the leaf certificate"):
            next(sub)


def test_token_and_key_never_in_repr_or_str(fake, client):
    svids = client.fetch_jwt_svids(WEB_SELECTORS, [AUD])
    token = svids[0].token
    for text in (repr(svids), str(svids[0]), repr(svids[0])):
        assert token not in text and token.split(".")[2] not in text
    with client.subscribe_x509_svids(["unix:uid:1000"]) as sub:
        svid = next(sub)[0]
    pem = svid.private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    body = "".join(pem.splitlines()[1:-1])
    assert body[:40] not in repr(svid) and "PRIVATE" not in repr(svid)


# ------------------------------------------------------------------ retry
def test_retry_backs_off_then_succeeds(fake, client):
    fake.fail_next(2, grpc.StatusCode.UNAVAILABLE, "could not fetch JWT-SVID: upstream down")
    sleeps: list[float] = []
    svids = retry(
        lambda: client.fetch_jwt_svids(WEB_SELECTORS, [AUD]),
        initial=0.5,
        sleep=sleeps.append,
        rand=lambda: 0.5,
    )
    assert str(svids[0].spiffe_id) == WEB
    assert sleeps == [0.375, 0.75]  # d/2 + rand*d/2 for d = 0.5, 1.0
    assert len(fake.calls) == 3


def test_retry_waits_for_the_entry_to_appear(fake, client):
    # PermissionDenied "no identity issued" is retryable: entries may not have synced yet.
    def sleep(_):
        fake.register(["unix:uid:3000"], "spiffe://example.org/workload/late")

    svids = retry(lambda: client.fetch_jwt_svids(["unix:uid:3000"], [AUD]), sleep=sleep)
    assert str(svids[0].spiffe_id) == "spiffe://example.org/workload/late"


def test_retry_gives_up_and_never_retries_invalid(fake, client):
    fake.fail_next(5, grpc.StatusCode.UNAVAILABLE, "down")
    sleeps: list[float] = []
    with pytest.raises(SpireUnavailable):
        retry(lambda: client.fetch_jwt_svids(WEB_SELECTORS, [AUD]), attempts=3, sleep=sleeps.append)
    assert len(sleeps) == 2 and len(fake.calls) == 3
    sleeps.clear()
    with pytest.raises(SpireInvalidRequest):
        retry(lambda: client.fetch_jwt_svids(WEB_SELECTORS, []), sleep=sleeps.append)
    assert sleeps == []


def test_backoff_is_capped_and_jittered():
    top = backoff_delays(initial=1, maximum=8, rand=lambda: 0.999999)
    assert [round(next(top)) for _ in range(6)] == [1, 2, 4, 8, 8, 8]
    low = backoff_delays(initial=1, maximum=8, rand=lambda: 0.0)
    assert [next(low) for _ in range(5)] == [0.5, 1, 2, 4, 4]


# ------------------------------------------------------------------ the fake's own contract
def test_fake_enforces_selectors_xor_pid_and_audience(fake):
    """The rules the fake copies from SPIRE, checked on the raw wire (the client never sends
    a pid, so these paths are only reachable with the generated stub)."""
    fake.pids[777] = ["unix:uid:1000"]
    sel = [types_pb.Selector(type="unix", value="uid:1000")]
    with grpc.insecure_channel("unix:" + fake.socket_path) as ch:
        stub = pb_grpc.DelegatedIdentityStub(ch)

        def code(**req):
            try:
                stub.FetchJWTSVIDs(pb.FetchJWTSVIDsRequest(**req), timeout=5)
                return grpc.StatusCode.OK
            except grpc.RpcError as e:
                return e.code()

        assert code(audience=[AUD], selectors=sel, pid=777) == grpc.StatusCode.INVALID_ARGUMENT
        assert code(audience=[AUD]) == grpc.StatusCode.INVALID_ARGUMENT
        assert code(audience=[AUD], selectors=sel, pid=0) == grpc.StatusCode.OK
        assert code(audience=[AUD], pid=777) == grpc.StatusCode.OK
        assert code(audience=[AUD], pid=778) == grpc.StatusCode.UNAVAILABLE
        assert code(selectors=sel) == grpc.StatusCode.INVALID_ARGUMENT
        stream = stub.SubscribeToX509SVIDs(pb.SubscribeToX509SVIDsRequest())
        with pytest.raises(grpc.RpcError) as ei:
            next(stream)
        assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_bundle_maps_on_the_wire(fake):
    """What the fake sends: keys in the fixture's form; JWKS without `use` (StandardJWKS)."""
    want = {
        "id": ["spiffe://example.org", "spiffe://partner.example"],
        "name": ["example.org", "partner.example"],
    }[fake.bundle_key_form]
    with grpc.insecure_channel("unix:" + fake.socket_path) as ch:
        stub = pb_grpc.DelegatedIdentityStub(ch)
        jwt_msg = next(stub.SubscribeToJWTBundles(pb.SubscribeToJWTBundlesRequest()))
        x509_msg = next(stub.SubscribeToX509Bundles(pb.SubscribeToX509BundlesRequest()))
    assert sorted(jwt_msg.bundles) == want and sorted(x509_msg.ca_certificates) == want
    keys = json.loads(jwt_msg.bundles[want[0]])["keys"]
    assert keys and all("use" not in k and k["kid"] for k in keys)


def test_both_key_forms_for_one_trust_domain_are_refused(fake, client):
    def duplicate(kind, msg):
        if kind == "SubscribeToX509BundlesResponse":
            der = next(iter(msg.ca_certificates.values()))
            msg.ca_certificates["example.org"] = der
            msg.ca_certificates["spiffe://example.org"] = der
        return msg

    fake.response_hook = duplicate
    with client.subscribe_x509_bundles() as sub:
        with pytest.raises(SpireProtocolError, match="trust domain example.org appears twice"):
            next(sub)


def test_errors_are_spire_errors():
    for cls in (SpireNotAuthorized, SpireUnavailable, SpireInvalidRequest, SpireProtocolError):
        assert issubclass(cls, SpireError)
