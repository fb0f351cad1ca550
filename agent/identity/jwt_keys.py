"""The JWT-SVID signing keys on disk: `<state_dir>/jwt/keys.json`, so a restart signs with
the keys authorization servers already hold.

Why on disk: an authorization server verifies a client assertion against the JWKS it fetched
from the client's `jwks_uri` and keeps that answer for a while (oidc-provider: at least 60 s,
whatever the response's Cache-Control says). A restarted agent signing with a new key (a
`kid` nobody has seen) is refused `invalid_client` until every such cache has expired.

The file holds the whole rotation state (current, prepared and retired keys with their
times), so after a restart the schedule carries on where it stopped. It is the most
valuable secret after the CA key and is handled like it (agent/identity/ca.py): directory
0700, file 0600 written atomically (tmp + fsync + rename + fsync of the directory), and a
file anyone but its owner can read or write is refused rather than used.

A file that cannot be read or makes no sense is never silently replaced: new keys would have
a `kid` no authorization server has seen, which is exactly the outage this file prevents,
and a damaged key file may be a tampered one. The agent refuses to start and says what to
do (restore it, or move it aside and accept that validators refuse assertions until they
refetch the JWKS).

Several agents may share the state directory for a moment (a handover): every change to the
key set is made under an exclusive lock on `<dir>/.lock`, after re-reading the file, so both
agents converge on the same keys instead of each preparing its own next key.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from agent.fsutil import atomic_write
from agent.identity.bundle import jwk_thumbprint
from agent.identity.ca import private_file_problem
from agent.observe.logging import get_logger

log = get_logger("identity")

KEYS_FILE = "keys.json"
# a key change that could not be written is tried again this much later
SAVE_RETRY_SECONDS = 30.0
LOCK_FILE = ".lock"
_FORMAT = 1
_EC_CURVE = {"ES256": "secp256r1", "ES384": "secp384r1", "ES512": "secp521r1"}


class JwtKeyFileError(Exception):
    """The JWT signing key file cannot be used; the message names it and says what to do."""


@dataclass(frozen=True)
class StoredKey:
    """One key as stored: what `JwtSigningKey` needs to be rebuilt."""

    kid: str
    private_key: Any
    activates_at: float
    retired_at: float | None = None


@dataclass(frozen=True)
class KeySetState:
    """The whole rotation state of a `JwtSigningKeys`."""

    alg: str
    current: StoredKey
    next: StoredKey | None
    retired: tuple[StoredKey, ...]
    rotate_at: float

    def kids(self) -> tuple[str, ...]:
        """Every kid with its role, for telling whether two states publish the same keys."""
        return (
            self.current.kid,
            self.next.kid if self.next else "",
            *(k.kid for k in self.retired),
        )


class JwtKeyFile:
    """`<directory>/keys.json` and its lock. `signature` is the file's identity when last
    read or written here, so a change made by another agent is noticed (`changed()`)."""

    def __init__(self, directory: str | os.PathLike[str]):
        self.dir = Path(directory)
        self.path = self.dir / KEYS_FILE
        self.signature: tuple[int, int, int] | None = None

    # ------------------------------------------------------------ locking
    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Exclusive across processes: one agent changes the key set at a time."""
        self._ensure_dir()
        fd = os.open(self.dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def _ensure_dir(self) -> None:
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        mode = stat.S_IMODE(self.dir.stat().st_mode)
        if mode & 0o077:
            os.chmod(self.dir, 0o700)  # ours alone, like the CA's directory

    def changed(self) -> bool:
        """Whether the file is not the one last read or written here (another agent moved)."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return self.signature is not None
        return (st.st_ino, st.st_mtime_ns, st.st_size) != self.signature

    # ------------------------------------------------------------ reading
    def load(self) -> KeySetState | None:
        """The stored state; None when there is no file (a first start)."""
        raw = self._read()
        if raw is None:
            return None
        try:
            return _parse(json.loads(raw))
        except (ValueError, KeyError, TypeError) as e:
            raise self._refuse(f"is not a valid JWT signing key file ({e})") from None

    def _read(self) -> bytes | None:
        try:
            # O_NOFOLLOW + fstat: the checks apply to the very file read (no symlink, no race)
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            self.signature = None
            return None
        except OSError as e:
            raise self._refuse(f"cannot be opened: {e.strerror} (symlinks are refused)") from None
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            problem = private_file_problem(st, self.path)
            if problem:
                raise JwtKeyFileError(f"JWT signing key file {self.path} {problem}")
            data = f.read()
        self.signature = (st.st_ino, st.st_mtime_ns, st.st_size)
        return data

    def _refuse(self, what: str) -> JwtKeyFileError:
        return JwtKeyFileError(
            f"JWT signing key file {self.path} {what}. The agent does not replace it on its own: "
            f"new keys would have a kid no authorization server has seen, and each refuses this "
            f"node's client assertions (invalid_client) until it fetches the JWKS again "
            f"(oidc-provider: up to 60 s). Restore the file from a backup, or move it aside "
            f"(mv {self.path} {self.path}.bad) and start the agent again to make new keys"
        )

    # ------------------------------------------------------------ writing
    def save(self, state: KeySetState) -> None:
        """Write the state atomically (0600); the caller holds `locked()`."""
        self._ensure_dir()
        doc = {
            "format": _FORMAT,
            "alg": state.alg,
            "rotate_at": state.rotate_at,
            "keys": [
                _key_doc(state.current, "current"),
                *([_key_doc(state.next, "next")] if state.next else []),
                *(_key_doc(k, "retired") for k in state.retired),
            ],
        }
        atomic_write(self.path, json.dumps(doc, indent=1).encode() + b"\n", 0o600)
        st = os.stat(self.path)
        self.signature = (st.st_ino, st.st_mtime_ns, st.st_size)

    def unsaved(self, e: OSError) -> None:
        """A change could not be written: it does not take effect (see JwtSigningKeys)."""
        log.error(
            "JWT signing key change not written; the current key keeps signing, retrying",
            path=str(self.path),
            error=e.strerror or str(e),
            retry_seconds=SAVE_RETRY_SECONDS,
        )


def _key_doc(key: StoredKey, role: str) -> dict[str, Any]:
    pem = key.private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    doc: dict[str, Any] = {
        "kid": key.kid,
        "role": role,
        "activates_at": key.activates_at,
        "private_key": pem.decode(),
    }
    if key.retired_at is not None:
        doc["retired_at"] = key.retired_at
    return doc


def _time(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{what} must be a number, got {value!r}")
    return float(value)


def _parse(doc: Any) -> KeySetState:
    if not isinstance(doc, dict) or doc.get("format") != _FORMAT:
        raise ValueError(
            f"unsupported format {doc.get('format') if isinstance(doc, dict) else doc!r}"
        )
    alg = doc["alg"]
    if alg not in ("ES256", "ES384", "ES512", "RS256", "PS256"):
        raise ValueError(f"unknown alg {alg!r}")
    by_role: dict[str, list[StoredKey]] = {"current": [], "next": [], "retired": []}
    for i, k in enumerate(doc["keys"]):
        role = k["role"]
        if role not in by_role:
            raise ValueError(f"keys[{i}]: unknown role {role!r}")
        by_role[role].append(_parse_key(k, alg, i))
    if len(by_role["current"]) != 1 or len(by_role["next"]) > 1:
        raise ValueError("exactly one current key and at most one next key are expected")
    if any(k.retired_at is None for k in by_role["retired"]):
        raise ValueError("a retired key has no retired_at")
    kids = [k.kid for keys in by_role.values() for k in keys]
    if len(set(kids)) != len(kids):
        raise ValueError("a kid appears twice")
    return KeySetState(
        alg,
        by_role["current"][0],
        by_role["next"][0] if by_role["next"] else None,
        tuple(by_role["retired"]),
        _time(doc["rotate_at"], "rotate_at"),
    )


def _parse_key(k: dict[str, Any], alg: str, i: int) -> StoredKey:
    try:
        key = serialization.load_pem_private_key(k["private_key"].encode(), password=None)
    except (ValueError, TypeError, AttributeError):
        # never echo key material: say only what was expected
        raise ValueError(f"keys[{i}]: private_key is not an unencrypted PEM private key") from None
    if alg.startswith("ES"):
        fits = isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == _EC_CURVE[alg]
    else:
        fits = isinstance(key, rsa.RSAPrivateKey) and key.key_size >= 2048
    if not fits:
        raise ValueError(f"keys[{i}]: the key does not fit alg {alg}")
    # the kid is the key's RFC 7638 thumbprint: a mismatch means the file was altered
    if jwk_thumbprint(key.public_key()) != k["kid"]:  # type: ignore[arg-type]
        raise ValueError(f"keys[{i}]: kid does not match its key")
    retired = k.get("retired_at")
    return StoredKey(
        k["kid"],
        key,
        _time(k["activates_at"], f"keys[{i}].activates_at"),
        None if retired is None else _time(retired, f"keys[{i}].retired_at"),
    )
