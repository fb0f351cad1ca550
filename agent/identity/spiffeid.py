"""SPIFFE IDs and trust domain names (SPIFFE-ID.md §2).

Parsing is strict and rule-by-rule so that an operator who mistypes an ID in a registration
entry is told *which* rule they broke, not just "invalid".

Case: the spec says scheme and trust domain compare case-insensitively, but it also says a
trust domain name is made of *lowercase* letters, and every SPIFFE implementation generates
lowercase. We therefore **reject** upper-case in the scheme or trust domain (as go-spiffe,
and therefore SPIRE, does) instead of silently normalising: an ID we accept is then byte-for-
byte the ID that will appear in SVIDs, logs, audit events and policy, so string comparison
everywhere else is safe. The error message shows the lowercase spelling to use.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

SCHEME = "spiffe"
_PREFIX = "spiffe://"
MAX_ID_BYTES = 2048  # SPIFFE-ID.md §2.3: MUST accept up to 2048 bytes, SHOULD NOT generate longer.
MAX_TRUST_DOMAIN_BYTES = 255

_TD_RE = re.compile(r"[a-z0-9._-]+")
_SEGMENT_RE = re.compile(r"[a-zA-Z0-9._-]+")
_TD_BAD_CHAR = re.compile(r"[^a-z0-9._-]")
_SEGMENT_BAD_CHAR = re.compile(r"[^a-zA-Z0-9._-]")


class InvalidSpiffeId(ValueError):
    """A string is not a valid SPIFFE ID or trust domain; the message names the rule broken.

    `rule` is a short stable tag (e.g. "port", "path-empty-segment") for tests and metrics.
    """

    def __init__(self, value: str, rule: str, detail: str):
        self.value = value
        self.rule = rule
        shown = value if len(value) <= 120 else value[:117] + "..."
        super().__init__(f"invalid SPIFFE ID {shown!r}: {detail} [{rule}]")


class InvalidTrustDomain(InvalidSpiffeId):
    """A trust domain name breaks SPIFFE-ID.md §2.1."""

    def __init__(self, value: str, rule: str, detail: str):
        self.value = value
        self.rule = rule
        shown = value if len(value) <= 120 else value[:117] + "..."
        ValueError.__init__(self, f"invalid trust domain {shown!r}: {detail} [{rule}]")


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


@dataclass(frozen=True, slots=True)
class TrustDomain:
    """A trust domain name such as ``example.org`` (not a URI). Construction validates."""

    name: str

    def __post_init__(self) -> None:
        if not isinstance(self.name, str):
            raise TypeError(f"trust domain name must be str, not {type(self.name).__name__}")
        problem = _trust_domain_problem(self.name)
        if problem:
            raise InvalidTrustDomain(self.name, *problem)

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
        return _PREFIX + self.name

    def spiffe_id(self) -> SpiffeId:
        return SpiffeId(self, "")

    def __str__(self) -> str:
        return self.name


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


@dataclass(frozen=True, slots=True)
class SpiffeId:
    """A SPIFFE ID: trust domain plus an optional path ('' or '/a/b'). Construction validates.

    Equality and hashing are on (trust domain, path); both are stored canonically (lowercase
    trust domain is enforced, the path is case-sensitive as the spec says).
    """

    trust_domain: TrustDomain
    path: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.trust_domain, TrustDomain):
            raise TypeError("trust_domain must be a TrustDomain; use SpiffeId.parse() for strings")
        problem = _path_problem(self.path)
        if problem:
            raise InvalidSpiffeId(_PREFIX + self.trust_domain.name + self.path, *problem)
        size = len(_PREFIX) + len(self.trust_domain.name) + len(self.path.encode("utf-8"))
        if size > MAX_ID_BYTES:
            raise InvalidSpiffeId(
                _PREFIX + self.trust_domain.name + self.path,
                "too-long",
                f"the ID is longer than {MAX_ID_BYTES} bytes",
            )

    @classmethod
    def parse(cls, value: str) -> SpiffeId:
        """Parse ``spiffe://<trust-domain>[/<path>]`` exactly per SPIFFE-ID.md §2."""
        if not isinstance(value, str):
            raise TypeError(f"SPIFFE ID must be str, not {type(value).__name__}")

        def bad(rule: str, detail: str) -> InvalidSpiffeId:
            return InvalidSpiffeId(value, rule, detail)

        if not value:
            raise bad("empty", "the ID is empty")
        if len(value.encode("utf-8")) > MAX_ID_BYTES:
            raise bad("too-long", f"the ID is longer than {MAX_ID_BYTES} bytes")
        # Query and fragment are checked first so that e.g. '/a?b' says "query", not "bad char".
        if "?" in value:
            raise bad("query", "a query ('?...') is not allowed")
        if "#" in value:
            raise bad("fragment", "a fragment ('#...') is not allowed")
        if not value.startswith(_PREFIX):
            if value[: len(_PREFIX)].lower() == _PREFIX:
                raise bad("scheme-uppercase", "the scheme must be lowercase 'spiffe://'")
            if "://" not in value:
                raise bad(
                    "scheme",
                    "the ID must start with 'spiffe://' (e.g. "
                    "'spiffe://example.org/ns/prod/sa/web')",
                )
            raise bad("scheme", "the scheme must be 'spiffe'")
        rest = value[len(_PREFIX) :]
        slash = rest.find("/")
        td_name, path = (rest, "") if slash < 0 else (rest[:slash], rest[slash:])
        if not td_name:
            raise bad(
                "td-empty", "the trust domain is missing (expected 'spiffe://<trust-domain>/...')"
            )
        problem = _trust_domain_problem(td_name)
        if problem:
            raise bad(*problem)
        problem = _path_problem(path)
        if problem:
            raise bad(*problem)
        return cls(TrustDomain(td_name), path)

    @classmethod
    def from_segments(cls, trust_domain: TrustDomain | str, *segments: str) -> SpiffeId:
        """Build an ID from path segments, e.g. ``from_segments(td, "ns", "prod")``."""
        td = trust_domain if isinstance(trust_domain, TrustDomain) else TrustDomain(trust_domain)
        return cls(td, "".join("/" + s for s in segments))

    @property
    def is_root(self) -> bool:
        """True for the trust domain's own ID (no path); such an ID names a signing authority,
        and MUST NOT appear in a leaf SVID (X509-SVID.md §3.1)."""
        return not self.path

    def member_of(self, trust_domain: TrustDomain) -> bool:
        return self.trust_domain == trust_domain

    def __str__(self) -> str:
        return _PREFIX + self.trust_domain.name + self.path
