"""DPoP keys and diagnoses (agent/oauth/dpop.py), found by mutation testing: a key handed
over from the agent this one replaces is that key (the same thumbprint, proofs its public key
verifies) and nothing but a P-256 private key is taken; the nonce one origin sent goes to
that origin only; and a 401 naming a scheme credless did not send is diagnosed by what was
sent, naming the scheme as the server wrote it and the setting that fixes it."""

from __future__ import annotations

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from agent.identity.bundle import jwk_thumbprint
from agent.oauth.discovery import parse_www_authenticate
from agent.oauth.dpop import DPoPKey, scheme_mismatch


def pkcs8(private) -> bytes:
    return private.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def verified(proof: str, private: ec.EllipticCurvePrivateKey) -> dict:
    return jwt.decode(proof, private.public_key(), algorithms=["ES256"])


# --- the key handed over ---------------------------------------------------------------------


def test_a_key_handed_over_is_that_key():
    private = ec.generate_private_key(ec.SECP256R1())
    key = DPoPKey(private)
    assert key.jkt == jwk_thumbprint(private.public_key())
    assert verified(key.proof("POST", "https://as.example/token"), private)["htm"] == "POST"


def test_a_key_read_back_from_its_der_is_the_same_key():
    old = DPoPKey()
    new = DPoPKey.from_der(old.private_der())
    assert new.jkt == old.jkt
    proof = new.proof("GET", "https://mcp.example/mcp")
    header = jwt.get_unverified_header(proof)
    assert jwt.decode(proof, jwt.PyJWK(header["jwk"]).key, algorithms=["ES256"])
    assert header["jwk"] == jwt.get_unverified_header(old.proof("GET", "https://x"))["jwk"]


@pytest.mark.parametrize(
    "private",
    [
        pytest.param(ec.generate_private_key(ec.SECP384R1()), id="P-384"),
        pytest.param(rsa.generate_private_key(65537, 2048), id="RSA"),
        pytest.param(ed25519.Ed25519PrivateKey.generate(), id="Ed25519"),
    ],
)
def test_anything_but_a_p256_private_key_is_refused(private):
    with pytest.raises(ValueError, match="not a P-256 private key"):
        DPoPKey.from_der(pkcs8(private))


def test_bytes_that_are_no_key_are_a_value_error():
    with pytest.raises(ValueError):
        DPoPKey.from_der(b"\x30\x03\x02\x01\x00")


# --- nonces ----------------------------------------------------------------------------------


def test_a_nonce_goes_only_to_the_host_that_sent_it_whatever_its_letters():
    """Hosts are lower-cased to compare; upper-casing would make ß.example (SS.EXAMPLE) and
    ss.example one origin."""
    key = DPoPKey()
    assert key.note_nonce("https://ß.example/mcp", "n-1")
    assert key.nonce_for("https://ß.example/other") == "n-1"
    assert key.nonce_for("https://ss.example/mcp") is None
    assert "nonce" not in jwt.decode(
        key.proof("POST", "https://ss.example/mcp"), options={"verify_signature": False}
    )


# --- a 401 naming another scheme ----------------------------------------------------------------


def mismatch(header: str, sent: str) -> str | None:
    return scheme_mismatch(parse_www_authenticate(header), sent, "weather")


def test_a_bearer_token_refused_by_a_dpop_server_says_to_use_dpop():
    said = mismatch('DPoP algs="ES256"', "Bearer")
    assert said is not None
    assert "naming the DPoP scheme" in said and "weather" in said
    assert 'Set dpop = "always" on its [[servers]] entry' in said
    assert "401 challenge" in said and "(dpop_bound_access_tokens_required)" in said
    assert 'dpop = "auto" follows' in said


def test_a_dpop_token_refused_by_a_bearer_server_says_to_use_bearer():
    said = mismatch('Bearer error="invalid_token"', "DPoP")
    assert said is not None
    assert "naming the Bearer scheme only" in said
    assert "accepts Bearer tokens only" in said
    assert 'Set dpop = "never" on its [[servers]] entry' in said
    assert 'dpop = "auto" chooses DPoP only when the server asks for it' in said


@pytest.mark.parametrize("sent", ["Bearer", "DPoP"])
def test_a_scheme_credless_cannot_send_is_named_as_such_whatever_was_sent(sent):
    said = mismatch('Basic realm="x", Negotiate', sent)
    assert said is not None
    assert "naming the basic, negotiate scheme" in said
    assert f"credless sent a {sent} token; credless can send Bearer or DPoP tokens only" in said
    assert "dpop =" not in said  # no setting makes the server take either
