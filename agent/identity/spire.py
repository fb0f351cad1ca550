"""SVIDs from a SPIRE agent, through SPIRE's Delegated Identity API (SPEC-NOTES §2.3).

When SPIRE is the SVID source, credless does not mint SVIDs: it attests each workload itself
and asks the node's SPIRE agent for that workload's SVIDs, on the agent's *admin* socket.
Built from the public API definition (spire-api-sdk, `proto/spire/api/agent/
delegatedidentity/v1`); the tests run it against an in-test fake, never a real SPIRE agent.

SPIRE agent settings (agent block of agent.conf; see docs/spire.md):

    admin_socket_path    = "/run/spire/agent/private/admin.sock"   # off by default; not in
                                                                    # socket_path's directory
    authorized_delegates = ["spiffe://<td>/credless-agent"]

plus a registration entry that gives the credless agent itself that SPIFFE ID (SPIRE attests
the *caller* through the socket's peer credentials, then requires one of the caller's entry
IDs to be in `authorized_delegates`), and entries for the workloads credless will name.

**Security**: an authorized delegate can obtain the SVIDs of every workload whose selectors
it can name, i.e. impersonate every workload registered to this node. Treat the credless
agent's SPIFFE ID (and the host root it runs as) like the SPIRE agent itself.

Selectors, not PIDs: the API also accepts a `pid`, which makes SPIRE attest the process
itself. credless does not use it. It has already attested the process (eBPF exec events +
/proc, keyed by exec time, so a recycled PID is a different process image), and a PID is only
a name for a process until it exits: between credless deciding "this connection is PID 4242"
and SPIRE reading /proc/4242, the PID can be reused by another process, which would then get
the first one's identity. SPIRE documents that the delegate must prevent this (hold a pidfd
for the whole call or stream and discard results if the PID was recycled); passing the
selectors credless attested removes the race instead, and keeps one attestation (credless's)
behind both the embedded-CA and SPIRE sources.

Error semantics (SPEC-NOTES §2.1): InvalidArgument is not retried; Unavailable and
PermissionDenied (e.g. registration entries not synced yet) are retried with backoff — see
`retry()`. Streams carry the complete state in every message; when one ends, resubscribe.
Tokens and private keys never appear in repr(), str() or exception messages.

This module holds the calls; spire_messages.py turns SPIRE's messages into checked credless
types, and spire_errors.py holds the errors.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar

import grpc

from agent.identity.bundle import TrustBundle
from agent.identity.proto import delegatedidentity_pb2 as pb
from agent.identity.proto import delegatedidentity_pb2_grpc as pb_grpc
from agent.identity.proto import spire_types_pb2 as types_pb
from agent.identity.spire_errors import (
    SpireError,
    SpireInvalidRequest,
    SpireNotAuthorized,
    SpireUnavailable,
)
from agent.identity.spire_messages import (
    SpireJwtSvid,
    SpireX509Update,
    jwt_bundles,
    jwt_svids,
    selector_messages,
    selector_texts,
    x509_bundles,
    x509_update,
)

T = TypeVar("T")
DEFAULT_TIMEOUT = 10.0
# Harmless on the admin socket (SPIRE enforces it only for /SpiffeWorkloadAPI/ methods), and it
# keeps the client working if an operator fronts both APIs with one proxy.
_METADATA = (("workload.spiffe.io", "true"),)


def _clean(details: str | None) -> str:
    # Server text goes into our messages: keep it one short line.
    text = " ".join((details or "").split())
    return text if len(text) <= 300 else text[:297] + "..."


# ------------------------------------------------------------------------------ client
class Subscription(Iterator[T]):
    """A server stream as an iterator. `cancel()` is safe from another thread; iteration then
    stops (StopIteration) instead of raising."""

    def __init__(
        self,
        start: Callable[[], Any],
        convert: Callable[[Any], T],
        on_error: Callable[[grpc.RpcError], SpireError],
    ):
        self._start, self._convert, self._on_error = start, convert, on_error
        self._call: Any = None
        self._cancelled = False

    def __next__(self) -> T:
        if self._cancelled:
            raise StopIteration
        if self._call is None:
            self._call = self._start()
        try:
            msg = next(self._call)
        except grpc.RpcError as e:
            if self._cancelled:
                raise StopIteration from None
            raise self._on_error(e) from None
        try:
            return self._convert(msg)
        except SpireError:
            self.cancel()  # fail closed: a bad message ends the subscription
            raise

    def cancel(self) -> None:
        self._cancelled = True
        if self._call is not None:
            self._call.cancel()

    close = cancel

    def __enter__(self) -> Subscription[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cancel()


class SpireDelegatedIdentityClient:
    """A client of SPIRE's Delegated Identity API on the agent's admin socket."""

    def __init__(self, admin_socket_path: str, *, timeout: float = DEFAULT_TIMEOUT):
        path = admin_socket_path
        for prefix in ("unix://", "unix:"):
            if path.startswith(prefix):
                path = path[len(prefix) :]
                break
        if not path.startswith("/"):
            raise ValueError(
                f"admin_socket_path must be an absolute path to the SPIRE agent's "
                f"admin socket, got {admin_socket_path!r}"
            )
        self.socket_path = path
        self.timeout = timeout
        self._channel = grpc.insecure_channel("unix:" + path)
        self._stub = pb_grpc.DelegatedIdentityStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> SpireDelegatedIdentityClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -------------------------------------------------------------- error mapping
    def _check_socket(self, rpc: str) -> None:
        # A deterministic, actionable message for the commonest misconfiguration, instead of
        # gRPC's "failed to connect to all addresses".
        if not os.path.exists(self.socket_path):
            raise SpireUnavailable(
                f"{rpc}: no SPIRE agent admin socket at {self.socket_path}; is the SPIRE agent "
                f'running with admin_socket_path = "{self.socket_path}"? (will retry)',
                rpc=rpc,
                code=grpc.StatusCode.UNAVAILABLE,
            )

    def _error(self, rpc: str, err: grpc.RpcError, selectors: Iterable[str] = ()) -> SpireError:
        code, details = err.code(), _clean(err.details())
        where = f"the SPIRE agent at {self.socket_path}"
        kw = {"rpc": rpc, "code": code, "details": details}
        if code == grpc.StatusCode.PERMISSION_DENIED:
            fix = (
                "add this agent's SPIFFE ID to authorized_delegates in the SPIRE agent config "
                "(and register an entry for this agent itself)"
            )
            if "authorized delegate" not in details:  # "no identity issued" is ambiguous
                fix = (
                    f"either {fix}, or no registration entry for this node matches the "
                    f"selectors {sorted(selectors)}"
                )
            return SpireNotAuthorized(f"{rpc} denied by {where} ({details}): {fix}", **kw)
        if code in (
            grpc.StatusCode.UNAVAILABLE,
            grpc.StatusCode.DEADLINE_EXCEEDED,
            grpc.StatusCode.CANCELLED,
        ):  # CANCELLED here: by the server, not by us
            return SpireUnavailable(
                f"{rpc}: {where} is unavailable ({details}); is the SPIRE agent running with "
                f'admin_socket_path = "{self.socket_path}"? (will retry)',
                **kw,
            )
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            return SpireInvalidRequest(
                f"{rpc} rejected by {where} as invalid ({details}); "
                "check the selectors and audience, retrying won't help",
                **kw,
            )
        if code == grpc.StatusCode.UNIMPLEMENTED:
            return SpireError(
                f"{rpc}: {where} does not serve the Delegated Identity API; "
                "admin_socket_path must name the admin socket, not the Workload "
                "API socket_path",
                **kw,
            )
        return SpireError(f"{rpc} failed at {where}: {code.name} ({details})", **kw)

    # -------------------------------------------------------------- RPCs
    def _subscribe(
        self,
        rpc: str,
        method: Any,
        req: Any,
        convert: Callable[[Any], T],
        sels: Sequence[types_pb.Selector] = (),
    ) -> Subscription[T]:
        self._check_socket(rpc)  # eagerly, so a missing socket is reported at once
        return Subscription(
            lambda: method(req, metadata=_METADATA),
            convert,
            lambda e: self._error(rpc, e, selector_texts(sels)),
        )

    def fetch_jwt_svids(
        self, selectors: Iterable[str], audience: Iterable[str] | str
    ) -> list[SpireJwtSvid]:
        """JWT-SVIDs for the workload described by `selectors`, for `audience` (≥ 1 value)."""
        rpc = "FetchJWTSVIDs"
        sels = selector_messages(rpc, selectors)
        auds = [audience] if isinstance(audience, str) else list(audience)
        if not auds or not all(isinstance(a, str) and a for a in auds):
            raise SpireInvalidRequest(
                f"{rpc}: audience must be one or more non-empty strings (e.g. the OAuth issuer)",
                rpc=rpc,
            )
        self._check_socket(rpc)
        req = pb.FetchJWTSVIDsRequest(audience=auds, selectors=sels)
        try:
            resp = self._stub.FetchJWTSVIDs(req, timeout=self.timeout, metadata=_METADATA)
        except grpc.RpcError as e:
            raise self._error(rpc, e, selector_texts(sels)) from None
        return jwt_svids(resp)

    def subscribe_x509_svids(self, selectors: Iterable[str]) -> Subscription[SpireX509Update]:
        """Every message: the workload's complete set of X509-SVIDs (see SpireX509Update)."""
        rpc = "SubscribeToX509SVIDs"
        sels = selector_messages(rpc, selectors)
        req = pb.SubscribeToX509SVIDsRequest(selectors=sels)
        return self._subscribe(rpc, self._stub.SubscribeToX509SVIDs, req, x509_update, sels)

    def subscribe_x509_bundles(self) -> Subscription[dict[str, TrustBundle]]:
        """Every message: trust domain name → bundle (X.509 authorities only), local and
        federated."""
        return self._subscribe(
            "SubscribeToX509Bundles",
            self._stub.SubscribeToX509Bundles,
            pb.SubscribeToX509BundlesRequest(),
            x509_bundles,
        )

    def subscribe_jwt_bundles(self) -> Subscription[dict[str, TrustBundle]]:
        """Every message: trust domain name → bundle (JWT authorities only)."""
        return self._subscribe(
            "SubscribeToJWTBundles",
            self._stub.SubscribeToJWTBundles,
            pb.SubscribeToJWTBundlesRequest(),
            jwt_bundles,
        )


# ------------------------------------------------------------------------------ retry
def backoff_delays(
    initial: float = 0.5,
    maximum: float = 30.0,
    multiplier: float = 2.0,
    rand: Callable[[], float] = random.random,
) -> Iterator[float]:
    """Exponential backoff with "equal jitter": each delay is in [d/2, d] for d = initial ·
    multiplier^n capped at `maximum`. The floor keeps a herd of agents restarted together from
    hammering a recovering SPIRE agent; the jitter spreads them out."""
    d = initial
    while True:
        yield d / 2 + rand() * d / 2
        d = min(maximum, d * multiplier)


def retry(
    fn: Callable[[], T],
    *,
    attempts: int = 6,
    initial: float = 0.5,
    maximum: float = 30.0,
    sleep: Callable[[float], None] = time.sleep,
    rand: Callable[[], float] = random.random,
    on_retry: Callable[[SpireError, float], None] | None = None,
) -> T:
    """Call `fn`, retrying retryable SpireErrors (Unavailable, PermissionDenied) with backoff.

    Anything else (InvalidArgument, protocol errors) propagates at once; after `attempts`
    tries the last error propagates. `sleep` and `rand` are injectable for tests.
    """
    if attempts < 1:
        raise ValueError("attempts must be at least 1")
    delays = backoff_delays(initial, maximum, rand=rand)
    for n in range(1, attempts + 1):
        try:
            return fn()
        except SpireError as e:
            if not e.retryable or n == attempts:
                raise
            delay = next(delays)
            if on_retry is not None:
                on_retry(e, delay)
            sleep(delay)
    raise AssertionError("unreachable")
