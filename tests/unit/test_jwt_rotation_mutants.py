"""JWT signing key rotation (agent/identity/jwt_rotation.py) as a JWKS reader sees it:
`version` moves exactly when the published key set changes (with a key store as without
one, on every handover another agent makes), a store written by another agent with the same
keys is no change, a keyset without a store has nothing to sync, and a store of another
algorithm is refused naming the file. Fake clock; the store lives in tmp_path."""

from __future__ import annotations

import pytest

from agent.identity.jwt_keys import JwtKeyFile, JwtKeyFileError
from agent.identity.jwt_rotation import JwtSigningKeys
from tests.unit.test_jwt_keys import LEEWAY, PRE, ROTATE, T0, TTL, Clock


def keys(clock: Clock, store: JwtKeyFile | None = None, **kw) -> JwtSigningKeys:
    args = {"rotate_every": ROTATE, "max_jwt_ttl": TTL, "prepublish": PRE, "leeway": LEEWAY}
    return JwtSigningKeys(clock=clock, store=store, **{**args, **kw})


def test_without_a_store_there_is_nothing_to_sync():
    k = keys(Clock())
    v = k.version
    assert k.sync() is False
    assert k.version == v


@pytest.mark.parametrize("stored", [False, True])
def test_version_moves_when_the_next_key_is_published(tmp_path, stored):
    clock = Clock()
    k = keys(clock, JwtKeyFile(tmp_path / "jwt") if stored else None)
    before, v = set(k.published()), k.version
    clock.t = T0 + ROTATE - PRE  # the prepublish window opens
    after = set(k.published())
    assert after > before
    assert k.version != v


def test_version_stays_while_the_published_set_does_not_change(tmp_path):
    clock = Clock()
    k = keys(clock, JwtKeyFile(tmp_path / "jwt"))
    k.rotate()
    old = set(k.published())
    v = k.version
    clock.t = T0 + TTL + LEEWAY  # the retired key's last instant: still published
    assert set(k.published()) == old and k.version == v
    assert set(k.published()) == old and k.version == v  # asked again, still no change
    clock.t += 1  # and now it is dropped
    assert set(k.published()) < old
    assert k.version != v


def test_each_handover_by_another_agent_moves_version_to_a_new_value(tmp_path):
    clock = Clock()
    mine = keys(clock, JwtKeyFile(tmp_path / "jwt"))
    other = keys(clock, JwtKeyFile(tmp_path / "jwt"))
    seen = {mine.version}
    for _ in range(3):
        other.rotate()
        assert mine.sync()
        assert set(mine.published()) == set(other.published())
        assert mine.version not in seen
        seen.add(mine.version)


def test_a_store_rewritten_with_the_same_keys_is_no_change(tmp_path):
    clock = Clock()
    mine = keys(clock, JwtKeyFile(tmp_path / "jwt"))
    published, v = set(mine.published()), mine.version
    # another agent starts with a shorter rotation period: it rewrites the store, same keys
    keys(clock, JwtKeyFile(tmp_path / "jwt"), rotate_every=ROTATE // 2)
    assert mine.sync() is False
    assert set(mine.published()) == published and mine.version == v


def test_a_store_of_another_algorithm_is_refused_naming_the_file(tmp_path):
    store = JwtKeyFile(tmp_path / "jwt")
    keys(Clock(), store, alg="ES256")
    other = "ES384"  # the store holds ES256 keys
    with pytest.raises(JwtKeyFileError) as e:
        keys(Clock(), JwtKeyFile(tmp_path / "jwt"), alg=other)
    assert str(store.path) in str(e.value)
    assert other in str(e.value)
