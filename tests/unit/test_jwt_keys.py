"""JWT signing keys on disk (agent/identity/jwt_keys.py): a restarted agent signs with the keys
validators already hold, rotation carries on across restarts, and a damaged file is refused
by name instead of being replaced by keys nobody has seen."""

from __future__ import annotations

import json
import os
import stat

import pytest

from agent.config import IdentitySection
from agent.identity.bundle import TrustBundle
from agent.identity.embedded_source import EmbeddedSource, prepublish_seconds
from agent.identity.jwt_keys import SAVE_RETRY_SECONDS, JwtKeyFile, JwtKeyFileError
from agent.identity.jwt_rotation import JwtSigningKeys
from agent.identity.jwtsvid import mint_jwt_svid, validate_jwt_svid
from agent.identity.sources import SourceEvents
from agent.identity.spiffeid import SpiffeId, TrustDomain

TD = TrustDomain("example.org")
SID = SpiffeId.parse("spiffe://example.org/agent/a")
AS = "https://as.example"
T0 = 1_900_000_000.0
ROTATE, TTL, PRE, LEEWAY = 1000, 300, 200, 60


class Clock:
    def __init__(self) -> None:
        self.t = T0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def clock() -> Clock:
    return Clock()


def agent_keys(tmp_path, clock) -> JwtSigningKeys:
    """The keys as an agent starting on tmp_path's state makes them (a restart: call again)."""
    return JwtSigningKeys(
        rotate_every=ROTATE,
        max_jwt_ttl=TTL,
        prepublish=PRE,
        clock=clock,
        store=JwtKeyFile(tmp_path / "jwt"),
        leeway=LEEWAY,
    )


def verifies(token: str, keys: JwtSigningKeys, now: float) -> bool:
    validate_jwt_svid(token, AS, {TD: TrustBundle(TD, (), keys.published(now))}, now=now)
    return True


def test_a_restarted_agent_signs_with_the_keys_it_published(tmp_path, clock) -> None:
    first = agent_keys(tmp_path, clock)
    assert not first.loaded
    before = mint_jwt_svid(first, SID, [AS], ttl=60)
    again = agent_keys(tmp_path, clock)  # the restart
    assert again.loaded
    after = mint_jwt_svid(again, SID, [AS], ttl=60)
    assert after.kid == before.kid
    assert set(again.published()) == set(first.published())
    # what the old process signed verifies against what the new one publishes
    assert verifies(before.token, again, T0 + 1)


def test_the_file_is_private_and_written_whole(tmp_path, clock) -> None:
    agent_keys(tmp_path, clock)
    d, f = tmp_path / "jwt", tmp_path / "jwt" / "keys.json"
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    assert stat.S_IMODE(f.stat().st_mode) == 0o600
    assert sorted(p.name for p in d.iterdir()) == [".lock", "keys.json"]  # no temp file left
    doc = json.loads(f.read_text())
    assert [k["role"] for k in doc["keys"]] == ["current"]


def test_rotation_carries_on_across_restarts(tmp_path, clock) -> None:
    k1 = agent_keys(tmp_path, clock).current().kid
    clock.t = T0 + ROTATE - PRE  # the next key is prepared and published...
    prepared = set(agent_keys(tmp_path, clock).published()) - {k1}
    assert len(prepared) == 1
    (k2,) = prepared
    clock.t = T0 + ROTATE - 1  # ...a restart just before the rotation keeps both, k1 signing
    restarted = agent_keys(tmp_path, clock)
    assert restarted.current().kid == k1 and set(restarted.published()) == {k1, k2}
    last_k1 = mint_jwt_svid(restarted, SID, [AS], ttl=TTL)
    clock.t = T0 + ROTATE  # the rotation, then a restart right after it
    assert agent_keys(tmp_path, clock).current().kid == k2
    after = agent_keys(tmp_path, clock)
    assert after.current().kid == k2
    assert mint_jwt_svid(after, SID, [AS]).kid == k2
    # k1 stays published until its last token has expired, plus the validators' leeway
    assert verifies(last_k1.token, after, last_k1.expires_at - 1)
    clock.t = T0 + ROTATE + TTL + LEEWAY
    assert k1 in agent_keys(tmp_path, clock).published()
    clock.t += 0.5
    assert set(agent_keys(tmp_path, clock).published()) == {k2}


def test_a_key_is_published_prepublish_seconds_before_it_signs(tmp_path, clock) -> None:
    """Over three rotations, every key that signs was in the published set, in every state
    saved on disk, for at least PRE seconds before."""
    first_seen: dict[str, float] = {}
    first_signed: dict[str, float] = {}
    for t in range(0, 3 * ROTATE + 1, 10):
        clock.t = T0 + t
        keys = agent_keys(tmp_path, clock)  # a restart at every step
        for kid in keys.published():
            first_seen.setdefault(kid, clock.t)
        first_signed.setdefault(mint_jwt_svid(keys, SID, [AS]).kid, clock.t)
    for kid, signed in first_signed.items():
        if signed > T0:  # the very first key signs from the start: nobody knew any before
            assert signed - first_seen[kid] >= PRE, kid
    assert len(first_seen) == 4  # three rotations: four keys


def test_an_agent_down_across_the_rotation_starts_with_the_prepared_key(tmp_path, clock) -> None:
    keys = agent_keys(tmp_path, clock)
    clock.t = T0 + ROTATE - PRE
    (k2,) = set(keys.published()) - {keys.current().kid}
    clock.t = T0 + 5 * ROTATE  # stopped for days
    back = agent_keys(tmp_path, clock)
    assert back.current().kid == k2


def test_a_shorter_rotation_period_applies_after_a_restart(tmp_path, clock) -> None:
    JwtSigningKeys(
        rotate_every=10 * ROTATE, prepublish=PRE, clock=clock, store=JwtKeyFile(tmp_path)
    )
    shorter = JwtSigningKeys(
        rotate_every=ROTATE, prepublish=PRE, clock=clock, store=JwtKeyFile(tmp_path)
    )
    assert shorter.next_change_at() == T0 + ROTATE - PRE  # not T0 + 10 * ROTATE - PRE
    k1 = shorter.current().kid
    clock.t = T0 + ROTATE - PRE  # the preparation reads the file again: still the new schedule
    assert len(shorter.published()) == 2
    clock.t = T0 + ROTATE
    assert shorter.current().kid != k1


def test_two_agents_on_one_state_directory_prepare_the_same_next_key(tmp_path, clock) -> None:
    """A handover: the old and the new agent both run for a moment; the first to prepare
    the next key writes it, the other adopts it instead of making its own."""
    old, new = agent_keys(tmp_path, clock), agent_keys(tmp_path, clock)
    clock.t = T0 + ROTATE - PRE
    assert set(old.published()) == set(new.published())
    clock.t = T0 + ROTATE
    assert old.current().kid == new.current().kid


def test_a_rotation_by_another_agent_is_picked_up_by_sync(tmp_path, clock) -> None:
    old, new = agent_keys(tmp_path, clock), agent_keys(tmp_path, clock)
    assert not new.sync()  # nothing changed: one stat, no reload
    rotated = old.rotate()
    v = new.version
    assert new.sync() and new.version > v
    assert new.current().kid == rotated.kid


def test_a_change_that_cannot_be_written_does_not_take_effect(tmp_path, clock, monkeypatch):
    keys = agent_keys(tmp_path, clock)
    k1 = keys.current().kid
    writes = []

    def full_disk(state) -> None:
        writes.append(state)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(keys.store, "save", full_disk)
    clock.t = T0 + ROTATE  # both the preparation and the rotation are due
    assert keys.current().kid == k1 and list(keys.published()) == [k1]  # nothing unsaved signs
    assert len(writes) == 1  # and it is not retried on every signature...
    clock.t += SAVE_RETRY_SECONDS - 1
    keys.current()
    assert len(writes) == 1
    monkeypatch.undo()
    clock.t += 1  # ...but after the retry delay, once the disk takes it
    assert keys.current().kid != k1
    assert agent_keys(tmp_path, clock).current().kid == keys.current().kid


@pytest.mark.parametrize(
    "damage,says",
    [
        (lambda p: p.write_text("{not json"), "is not a valid JWT signing key file"),
        (lambda p: p.write_text(p.read_text()[:-40]), "is not a valid JWT signing key file"),
        (lambda p: p.write_text(_swap_kid(p.read_text())), "kid does not match its key"),
        (lambda p: p.write_text(_drop_roles(p.read_text())), "exactly one current key"),
    ],
    ids=["not-json", "truncated", "tampered-kid", "no-current-key"],
)
def test_a_damaged_file_is_refused_naming_it_and_the_way_out(tmp_path, clock, damage, says):
    agent_keys(tmp_path, clock)
    path = tmp_path / "jwt" / "keys.json"
    damage(path)
    kept = path.read_bytes()
    with pytest.raises(JwtKeyFileError) as err:
        agent_keys(tmp_path, clock)
    msg = str(err.value)
    assert str(path) in msg and says in msg and f"mv {path} {path}.bad" in msg
    assert "PRIVATE KEY" not in msg
    assert path.read_bytes() == kept  # never silently replaced


def test_a_file_others_can_read_is_refused(tmp_path, clock) -> None:
    agent_keys(tmp_path, clock)
    path = tmp_path / "jwt" / "keys.json"
    os.chmod(path, 0o640)
    with pytest.raises(JwtKeyFileError, match="readable by group or others"):
        agent_keys(tmp_path, clock)


def test_the_embedded_source_refuses_to_start_on_a_damaged_file(tmp_path) -> None:
    cfg = IdentitySection(entries_file="")
    first = EmbeddedSource(cfg, str(tmp_path))
    first.start(SourceEvents())
    kid = first.keys.current().kid if first.keys else ""
    first.stop()
    again = EmbeddedSource(cfg, str(tmp_path))
    again.start(SourceEvents())
    assert again.keys is not None and again.keys.current().kid == kid
    again.stop()
    (tmp_path / "jwt" / "keys.json").write_text("garbage")
    with pytest.raises(JwtKeyFileError, match="keys.json is not a valid"):
        EmbeddedSource(cfg, str(tmp_path)).start(SourceEvents())


@pytest.mark.parametrize("rotation", [600, 3600, 86400, 10**6])
def test_prepublication_outlasts_authorization_server_jwks_caches(rotation) -> None:
    # oidc-provider keeps a jwks_uri answer 60 s (the bundle endpoint says no-store); Nimbus
    # (Spring Authorization Server) 5 min: the smallest rotation allowed (600 s) gives 150 s
    assert prepublish_seconds(rotation) >= 60
    assert prepublish_seconds(rotation) >= min(300, rotation // 4)


def _swap_kid(text: str) -> str:
    doc = json.loads(text)
    doc["keys"][0]["kid"] = "A" * 43
    return json.dumps(doc)


def _drop_roles(text: str) -> str:
    doc = json.loads(text)
    doc["keys"][0]["role"] = "retired"
    doc["keys"][0]["retired_at"] = T0
    return json.dumps(doc)
