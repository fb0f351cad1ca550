"""Errors of the SPIRE Delegated Identity client: one base class, one subclass per remedy.

`retryable` says whether calling again later can help (see spire.retry()); every message says
what to do, and none holds a token, a key or key bytes.
"""

from __future__ import annotations

import grpc


class SpireError(Exception):
    """A Delegated Identity call failed; the message says what to do. Never holds secrets."""

    retryable = False

    def __init__(
        self, message: str, *, rpc: str = "", code: grpc.StatusCode | None = None, details: str = ""
    ):
        super().__init__(message)
        self.rpc, self.code, self.details = rpc, code, details


class SpireNotAuthorized(SpireError):
    """PermissionDenied: not an authorized delegate, or no identity issued (yet)."""

    retryable = True


class SpireUnavailable(SpireError):
    """The SPIRE agent cannot be reached or cannot serve the request now."""

    retryable = True


class SpireInvalidRequest(SpireError):
    """The request is malformed (here or as judged by the SPIRE agent); retrying won't help."""


class SpireProtocolError(SpireError):
    """The SPIRE agent sent something that is not a valid SVID or bundle."""
