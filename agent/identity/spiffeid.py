"""SPIFFE IDs and trust domain names (SPIFFE-ID.md §2), as py-spiffe's own types.

`SpiffeId` and `TrustDomain` subclass py-spiffe's `spiffe.SpiffeId` and `spiffe.TrustDomain`:
any ID credless holds can be handed to py-spiffe (bundles, SVIDs, sources) as it is, and
py-spiffe provides the storage, the `name` / `trust_domain` / `path` accessors, `str()`,
`as_spiffe_id()` and hashing. `InvalidSpiffeId` is a `spiffe.spiffe_id.spiffe_id.SpiffeIdError`
(and `InvalidTrustDomain` a `TrustDomainError`) too, so either family of except clauses works.

Hand-written, each because py-spiffe 0.3 gets it wrong or lacks it
(tests/unit/test_identity_py_spiffe.py shows each):
- the parser: py-spiffe accepts a trailing newline (`re.match("...$")`), an ID over 2048 bytes
  and a trust domain over 255 bytes; `TrustDomain("spiffe://td/path")` drops the path unseen;
- upper case is rejected here, normalised there (see "Case" below);
- errors name the rule broken (`rule`), for the operator; py-spiffe says "disallowed characters";
- `==` with a `str` is False (py-spiffe's is True): an ID is only equal to a parsed ID;
- instances are immutable; py-spiffe's fields can be reassigned;
- construction fills py-spiffe's fields (`_name`, `_trust_domain`, `_path`) directly: its
  `__init__` would only repeat a weaker check, a second pass on the JWT-SVID validation path.
  test_identity_py_spiffe.py checks py-spiffe's own methods read those fields correctly;
- `str()` is the string built once at construction: py-spiffe formats it on every call, at
  twice the cost, and IDs are formatted for every audit event, token and policy check.

Case: the spec says scheme and trust domain compare case-insensitively, but it also says a
trust domain name is made of *lowercase* letters, and every SPIFFE implementation generates
lowercase. We therefore **reject** upper-case in the scheme or trust domain (as go-spiffe,
and therefore SPIRE, does) instead of silently normalising: an ID we accept is then byte-for-
byte the ID that will appear in SVIDs, logs, audit events and policy, so string comparison
everywhere else is safe. The error message shows the lowercase spelling to use.
"""

from __future__ import annotations

import re
from dataclasses import FrozenInstanceError
from typing import cast

import spiffe
from spiffe.spiffe_id.spiffe_id import SpiffeIdError, TrustDomainError

SCHEME = "spiffe"
_PREFIX = "spiffe://"
MAX_ID_BYTES = 2048  # SPIFFE-ID.md §2.3: MUST accept up to 2048 bytes, SHOULD NOT generate longer.
MAX_TRUST_DOMAIN_BYTES = 255

_TD_RE = re.compile(r"[a-z0-9._-]+")
_SEGMENT_RE = re.compile(r"[a-zA-Z0-9._-]+")
_TD_BAD_CHAR = re.compile(r"[^a-z0-9._-]")
_SEGMENT_BAD_CHAR = re.compile(r"[^a-zA-Z0-9._-]")
# Every valid ID matches this (ASCII only, so characters are bytes); what it lets through
# that the spec forbids (lengths, '.'/'..' segments) is checked next to it in `parse`.
_WELL_FORMED_ID = re.compile(r"spiffe://([a-z0-9._-]+)((?:/[a-zA-Z0-9._-]+)*)")


class InvalidSpiffeId(SpiffeIdError, ValueError):
    """A string is not a valid SPIFFE ID or trust domain; the message names the rule broken.

    `rule` is a short stable tag (e.g. "port", "path-empty-segment") for tests and metrics.
    """

    _what = "SPIFFE ID"

    def __init__(self, value: str, rule: str, detail: str):
        self.value = value
        self.rule = rule
        shown = value if len(value) <= 120 else value[:117] + "..."
        # py-spiffe's __init__ words its own message; ours names the rule.
        Exception.__init__(self, f"invalid {self._what} {shown!r}: {detail} [{rule}]")


class InvalidTrustDomain(InvalidSpiffeId, TrustDomainError):
    """A trust domain name breaks SPIFFE-ID.md §2.1."""

    _what = "trust domain"


def _trust_domain_problem(name: str) -> tuple[str, str] | None:
    """Return (rule, detail) for the first rule `name` breaks as a bare trust domain, else None."""
    if not name:
        return "td-empty", "the trust domain is empty (expected e.g. 'example.org')"
    if len(name.encode("utf-8")) > MAX_TRUST_DOMAIN_BYTES:
        return "td-too-long", f"the trust domain is longer than {MAX_TRUST_DOMAIN_BYTES} bytes"
    if _TD_RE.fullmatch(name):
        return None
    if "%" in name:
        return "percent-encoding", "percent-encoding ('%') is not allowed"
    if "@" in name:
        return "userinfo", "a userinfo part ('user@') is not allowed in the trust domain"
    if name.startswith("["):
        return "ipv6", "an IPv6 literal is not allowed as trust domain (IPv4 dotted-quad is)"
    if ":" in name:
        return "port", "a port (':<port>') is not allowed in the trust domain"
    if name.lower() != name and _TD_RE.fullmatch(name.lower()):
        return "td-uppercase", (
            f"the trust domain must be lowercase: use {name.lower()!r} "
            "(SPIFFE generates lowercase trust domains only)"
        )
    bad = _TD_BAD_CHAR.search(name)
    ch = bad.group() if bad else "?"
    return "td-char", (
        f"the trust domain contains {ch!r}; only lowercase letters, digits, "
        "'.', '-' and '_' are allowed"
    )


def _path_problem(path: str) -> tuple[str, str] | None:
    """Return (rule, detail) for the first rule `path` ('' or '/seg/...') breaks, else None."""
    if not path:
        return None
    if not path.startswith("/"):
        return "path-no-slash", "the path must start with '/'"
    if path.endswith("/"):
        return "path-trailing-slash", "the path must not end with '/'"
    for seg in path[1:].split("/"):
        if not seg:
            return "path-empty-segment", "the path has an empty segment ('//')"
        if seg in (".", ".."):
            return "path-dot-segment", f"the path segment {seg!r} is not allowed"
        if not _SEGMENT_RE.fullmatch(seg):
            if "%" in seg:
                return "percent-encoding", "percent-encoding ('%') is not allowed"
            bad = _SEGMENT_BAD_CHAR.search(seg)
            ch = bad.group() if bad else "?"
            return "path-char", (
                f"the path segment {seg!r} contains {ch!r}; only letters, digits, "
                "'.', '-' and '_' are allowed"
            )
    return None


def _has_dot_segment(path: str) -> bool:
    tail = path + "/"
    return "/./" in tail or "/../" in tail


class TrustDomain(spiffe.TrustDomain):
    """A trust domain name such as ``example.org`` (not a URI). Construction validates."""

    def __init__(self, name: str) -> None:
        if not isinstance(name, str):
            raise TypeError(f"trust domain name must be str, not {type(name).__name__}")
        problem = _trust_domain_problem(name)
        if problem:
            raise InvalidTrustDomain(name, *problem)
        object.__setattr__(self, "_name", name)

    @classmethod
    def parse(cls, value: str) -> TrustDomain:
        """Accept a bare name (``example.org``) or a root ID (``spiffe://example.org``)."""
        if value.startswith(_PREFIX):
            sid = SpiffeId.parse(value)
            if sid.path:
                raise InvalidTrustDomain(
                    value, "td-has-path", "expected a trust domain, got a SPIFFE ID with a path"
                )
            return sid.trust_domain
        return cls(value)

    def id_string(self) -> str:
        """The trust domain's own SPIFFE ID, ``spiffe://<name>`` (used in CA URI SANs)."""
        return _PREFIX + self._name

    def spiffe_id(self) -> SpiffeId:
        return SpiffeId._checked(self, "")

    def __eq__(self, other: object) -> bool:
        if isinstance(other, spiffe.TrustDomain):
            return self._name == other.name
        return NotImplemented

    def __hash__(self) -> int:  # py-spiffe's: equal to a py-spiffe TrustDomain of that name
        return hash(self._name)

    def __setattr__(self, name: str, value: object) -> None:
        raise FrozenInstanceError(f"cannot assign to field {name!r}")

    def __delattr__(self, name: str) -> None:
        raise FrozenInstanceError(f"cannot delete field {name!r}")

    def __repr__(self) -> str:
        return f"TrustDomain(name={self._name!r})"


class SpiffeId(spiffe.SpiffeId):
    """A SPIFFE ID: trust domain plus an optional path ('' or '/a/b'). Construction validates.

    Equality and hashing are on (trust domain, path); both are stored canonically (lowercase
    trust domain is enforced, the path is case-sensitive as the spec says).
    """

    _text: str  # str(self), built once

    def __init__(self, trust_domain: TrustDomain, path: str = "") -> None:
        if not isinstance(trust_domain, TrustDomain):
            raise TypeError("trust_domain must be a TrustDomain; use SpiffeId.parse() for strings")
        problem = _path_problem(path)
        if problem:
            raise InvalidSpiffeId(_PREFIX + trust_domain.name + path, *problem)
        size = len(_PREFIX) + len(trust_domain.name) + len(path.encode("utf-8"))
        if size > MAX_ID_BYTES:
            raise InvalidSpiffeId(
                _PREFIX + trust_domain.name + path,
                "too-long",
                f"the ID is longer than {MAX_ID_BYTES} bytes",
            )
        self._fill(trust_domain, path, _PREFIX + trust_domain.name + path)

    def _fill(self, trust_domain: TrustDomain, path: str, text: str) -> None:
        object.__setattr__(self, "_trust_domain", trust_domain)
        object.__setattr__(self, "_path", path)
        object.__setattr__(self, "_text", text)

    @classmethod
    def _checked(cls, trust_domain: TrustDomain, path: str, text: str = "") -> SpiffeId:
        """An ID from parts the caller has already validated (no second pass)."""
        sid = cls.__new__(cls)
        sid._fill(trust_domain, path, text or _PREFIX + trust_domain.name + path)
        return sid

    @classmethod
    def parse(cls, value: str) -> SpiffeId:
        """Parse ``spiffe://<trust-domain>[/<path>]`` exactly per SPIFFE-ID.md §2."""
        if not isinstance(value, str):
            raise TypeError(f"SPIFFE ID must be str, not {type(value).__name__}")
        # Valid IDs take one regex match; the rule-by-rule walk below only names the problem.
        m = _WELL_FORMED_ID.fullmatch(value)
        if (
            m
            and len(value) <= MAX_ID_BYTES
            and len(m.group(1)) <= MAX_TRUST_DOMAIN_BYTES
            and not _has_dot_segment(m.group(2))
        ):
            td = TrustDomain.__new__(TrustDomain)
            object.__setattr__(td, "_name", m.group(1))
            return cls._checked(td, m.group(2), value)
        raise _why_invalid(value)

    @classmethod
    def from_segments(cls, trust_domain: TrustDomain | str, *segments: str) -> SpiffeId:
        """Build an ID from path segments, e.g. ``from_segments(td, "ns", "prod")``."""
        td = trust_domain if isinstance(trust_domain, TrustDomain) else TrustDomain(trust_domain)
        return cls(td, "".join("/" + s for s in segments))

    @property
    def trust_domain(self) -> TrustDomain:
        return cast(TrustDomain, self._trust_domain)

    @property
    def is_root(self) -> bool:
        """True for the trust domain's own ID (no path); such an ID names a signing authority,
        and MUST NOT appear in a leaf SVID (X509-SVID.md §3.1)."""
        return not self._path

    def member_of(self, trust_domain: TrustDomain) -> bool:
        return self._trust_domain == trust_domain

    def __eq__(self, other: object) -> bool:
        if isinstance(other, spiffe.SpiffeId):
            return self._path == other.path and self._trust_domain.name == other.trust_domain.name
        return NotImplemented

    def __hash__(self) -> int:  # py-spiffe's: equal to a py-spiffe SpiffeId of that value
        return hash((self._trust_domain, self._path))

    def __setattr__(self, name: str, value: object) -> None:
        raise FrozenInstanceError(f"cannot assign to field {name!r}")

    def __delattr__(self, name: str) -> None:
        raise FrozenInstanceError(f"cannot delete field {name!r}")

    def __str__(self) -> str:
        return self._text

    def __repr__(self) -> str:
        return f"SpiffeId(trust_domain={self._trust_domain!r}, path={self._path!r})"


def _why_invalid(value: str) -> InvalidSpiffeId:
    """The error for an ID `parse` refused: the first SPIFFE-ID.md rule it breaks."""

    def bad(rule: str, detail: str) -> InvalidSpiffeId:
        return InvalidSpiffeId(value, rule, detail)

    if not value:
        return bad("empty", "the ID is empty")
    if len(value.encode("utf-8")) > MAX_ID_BYTES:
        return bad("too-long", f"the ID is longer than {MAX_ID_BYTES} bytes")
    # Query and fragment are checked first so that e.g. '/a?b' says "query", not "bad char".
    if "?" in value:
        return bad("query", "a query ('?...') is not allowed")
    if "#" in value:
        return bad("fragment", "a fragment ('#...') is not allowed")
    if not value.startswith(_PREFIX):
        if value[: len(_PREFIX)].lower() == _PREFIX:
            return bad("scheme-uppercase", "the scheme must be lowercase 'spiffe://'")
        if "://" not in value:
            return bad(
                "scheme",
                "the ID must start with 'spiffe://' (e.g. 'spiffe://example.org/ns/prod/sa/web')",
            )
        return bad("scheme", "the scheme must be 'spiffe'")
    rest = value[len(_PREFIX) :]
    slash = rest.find("/")
    td_name, path = (rest, "") if slash < 0 else (rest[:slash], rest[slash:])
    if not td_name:
        return bad(
            "td-empty", "the trust domain is missing (expected 'spiffe://<trust-domain>/...')"
        )
    problem = _trust_domain_problem(td_name) or _path_problem(path)
    if problem:
        return bad(*problem)
    # Unreachable while _WELL_FORMED_ID and the rules above agree; fail closed if they drift.
    return bad("invalid", "the ID breaks SPIFFE-ID.md §2")
