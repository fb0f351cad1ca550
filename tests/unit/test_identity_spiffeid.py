"""SPIFFE ID parsing, table-driven from tests/testdata/spiffe_ids.tsv (SPIFFE-ID.md §2)."""

from __future__ import annotations

import random

import pytest
import spiffe

from agent.identity.spiffeid import (
    MAX_ID_BYTES,
    InvalidSpiffeId,
    InvalidTrustDomain,
    SpiffeId,
    TrustDomain,
    _why_invalid,
)
from tests.conftest import TESTDATA


def _rows() -> list[tuple[str, str, str, str]]:
    rows = []
    for line in (TESTDATA / "spiffe_ids.tsv").read_text(encoding="utf-8").splitlines():
        if not line or line.startswith("#"):
            continue
        value, result, td, path = line.split("\t")
        rows.append(("" if value == "<empty>" else value, result, td, path))
    return rows


ROWS = _rows()
VALID = [r for r in ROWS if r[1] == "ok"]
INVALID = [r for r in ROWS if r[1] != "ok"]


def test_table_is_big_enough() -> None:
    assert len(ROWS) >= 30 and len(VALID) >= 10 and len(INVALID) >= 20


@pytest.mark.parametrize("value,result,td,path", VALID, ids=[r[0] for r in VALID])
def test_valid(value: str, result: str, td: str, path: str) -> None:
    sid = SpiffeId.parse(value)
    assert sid.trust_domain == TrustDomain(td)
    assert sid.path == path
    assert str(sid) == value  # canonical form round-trips byte for byte
    assert sid.is_root == (path == "")
    # A real SPIFFE library agrees that it is valid and equal.
    assert str(spiffe.SpiffeId(value)) == value


@pytest.mark.parametrize("value,rule,_td,_path", INVALID, ids=[r[0] or "<empty>" for r in INVALID])
def test_invalid_names_the_rule(value: str, rule: str, _td: str, _path: str) -> None:
    with pytest.raises(InvalidSpiffeId) as exc:
        SpiffeId.parse(value)
    assert exc.value.rule == rule
    assert f"[{rule}]" in str(exc.value)


def test_uppercase_error_suggests_lowercase_spelling() -> None:
    with pytest.raises(InvalidSpiffeId, match="use 'example.org'"):
        SpiffeId.parse("spiffe://Example.Org/x")


def test_length_limits() -> None:
    td = "a" * 255
    assert SpiffeId.parse(f"spiffe://{td}/x").trust_domain.name == td
    with pytest.raises(InvalidSpiffeId) as exc:
        SpiffeId.parse(f"spiffe://{'a' * 256}/x")
    assert exc.value.rule == "td-too-long"

    prefix = "spiffe://example.org"
    path = "/" + "a" * (MAX_ID_BYTES - len(prefix) - 1)
    assert len(prefix + path) == MAX_ID_BYTES
    assert str(SpiffeId.parse(prefix + path)) == prefix + path  # MUST accept 2048 bytes
    with pytest.raises(InvalidSpiffeId) as exc:
        SpiffeId.parse(prefix + path + "a")
    assert exc.value.rule == "too-long"
    with pytest.raises(InvalidSpiffeId) as exc:
        SpiffeId(TrustDomain("example.org"), path + "a")
    assert exc.value.rule == "too-long"


def test_long_input_is_truncated_in_message() -> None:
    with pytest.raises(InvalidSpiffeId) as exc:
        SpiffeId.parse("spiffe://example.org/" + "x" * 3000)
    assert len(str(exc.value)) < 300


def test_trust_domain() -> None:
    td = TrustDomain("example.org")
    assert td.id_string() == "spiffe://example.org"
    assert str(td) == "example.org"
    assert td.spiffe_id() == SpiffeId.parse("spiffe://example.org")
    assert TrustDomain.parse("spiffe://example.org") == td
    assert TrustDomain.parse("example.org") == td
    assert hash(TrustDomain("example.org")) == hash(td)
    with pytest.raises(InvalidTrustDomain) as exc:
        TrustDomain.parse("spiffe://example.org/x")
    assert exc.value.rule == "td-has-path"
    for bad, rule in [
        ("", "td-empty"),
        ("Example.org", "td-uppercase"),
        ("example.org:443", "port"),
        ("exa/mple", "td-char"),
    ]:
        with pytest.raises(InvalidTrustDomain) as exc:
            TrustDomain(bad)
        assert exc.value.rule == rule
        assert "invalid trust domain" in str(exc.value)


def test_constructor_validates_and_value_semantics() -> None:
    td = TrustDomain("example.org")
    sid = SpiffeId.from_segments(td, "ns", "prod")
    assert str(sid) == "spiffe://example.org/ns/prod"
    assert sid == SpiffeId.parse("spiffe://example.org/ns/prod")
    assert {sid: 1}[SpiffeId.parse("spiffe://example.org/ns/prod")] == 1
    assert sid != SpiffeId.parse("spiffe://example.org/ns/Prod")  # path is case-sensitive
    assert sid.member_of(td) and not sid.member_of(TrustDomain("other.org"))
    with pytest.raises(InvalidSpiffeId):
        SpiffeId(td, "/a/")
    with pytest.raises(InvalidSpiffeId):
        SpiffeId.from_segments(td, "a", "")
    with pytest.raises(TypeError):
        SpiffeId("example.org", "/x")  # type: ignore[arg-type]
    with pytest.raises(AttributeError):  # dataclasses.FrozenInstanceError
        sid.path = "/other"  # type: ignore[misc]


def _near_ids(n: int) -> list[str]:
    """Strings close to SPIFFE IDs: each piece is valid somewhere and invalid elsewhere."""
    rnd = random.Random(16)
    schemes = ["spiffe://", "SPIFFE://", "spiffe:/", "http://", ""]
    hosts = ["example.org", "a", "Ex.org", "1.2.3.4", "[::1]", "td:443", "u@td", "t%41", "é", ""]
    segments = ["a", "Z", ".", "..", "", "a.b", "-", "%41", "a?b", "a#b", "x\n", "_", "ü"]
    out = []
    for i in range(n):
        k = 3 if i % 2 else None  # every other one from pieces that are valid where they go
        path = "".join("/" + rnd.choice(segments[:k]) for _ in range(rnd.randrange(4)))
        host, scheme = rnd.choice(hosts[:k]), rnd.choice(schemes[: k and 1])
        out.append(scheme + host + path + ("" if k else rnd.choice(["", "", "/"])))
    return out


def test_the_fast_path_and_the_rule_walk_agree() -> None:
    # parse() accepts on one regex and only walks the rules to name a refusal: the walk must
    # find a broken rule exactly when the regex refuses.
    accepted = 0
    for value in _near_ids(3000):
        walk = _why_invalid(value)
        try:
            sid = SpiffeId.parse(value)
        except InvalidSpiffeId as e:
            assert e.rule == walk.rule != "invalid", value
        else:
            assert walk.rule == "invalid" and str(sid) == value, value
            accepted += 1
    assert accepted > 500  # both sides of the agreement were exercised
