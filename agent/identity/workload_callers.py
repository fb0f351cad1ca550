"""Who is calling the Workload API: each accepted connection's process, known before
grpclib sees a byte of the connection.

The gRPC server is grpclib, an asyncio HTTP/2 server, listening on the public unix socket
itself. Each accepted connection is wrapped (AttestedConnection) before grpclib sees a byte
of it: reading is paused, the peer credentials are read from that very socket and the
process is attested, and only then is the connection handed to grpclib. A handler finds its
caller by the transport its request arrived on. There is no second socket, no address and no
port anywhere in the decision, so there is nothing for another process to bind, guess or
relay.

What this replaced, and the options weighed (issue 15, item 1):
- grpcio behind a splice (the old design). gRPC Python exposes no peer credentials (grpc
  issue 15511; LocalServerCredentials(UDS) does not check them either, issue 28755), so a
  front splice read them and connected to a gRPC backend on 127.0.0.1, and the handler
  mapped context.peer()'s *port* back to the caller. Any local process could bind another
  loopback address with a live splice's port (visible in /proc/net/tcp) and be served as
  that splice's process, private key included. Rejected: trust in an address.
- grpcio behind a splice to a backend only root can reach (a unix socket in a 0700
  directory), each splice binding its end to a unique path there, matched against
  context.peer() ("unix:/path" on grpcio 1.85). Sound while the directory stays root-only,
  but it keeps the extra hop, a per-connection thread pool slot for every open stream, and
  rests on grpc core's formatting of unix peer names, which has regressed before (grpc
  issues 13938, 35006). Rejected: an address again, only better hidden.
- grpcio with a per-connection credential (the splice doing mTLS to a loopback backend
  with a per-caller client certificate): TLS on every byte of a local call, a key to
  manage, and still a network listener. Rejected.
- grpclib (chosen): the handler sees the caller's own socket. It costs one dependency
  (pure Python, on h2) and two reaches into its internals: grpclib 0.4 builds each
  connection's protocol in Server._protocol_factory (overridden here to wrap it) and
  gives handlers the connection's Peer, whose transport is Peer._transport (transport_of).
  Both are pinned by the version range in pyproject.toml and fail closed: if either moved,
  no request would find a caller and every call would get PermissionDenied (the kernel
  tests would fail at once). Open streams are coroutines, not threads. py-spiffe (a
  grpcio client) talks to it unchanged.
  The price is pure-Python HTTP/2: on the 2-vCPU test VM, sequential FetchJWTSVID calls
  from one client went from about 450-600/s to about 280-330/s (python -m
  tests.bench.bench_workload_api), while a new connection's first X509-SVID arrives a
  little sooner (p50 about 6 ms, was about 7: one hop fewer). Workloads call the Workload
  API when they start and when their SVIDs rotate, not per request, so this is far from
  any limit.
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, cast

from grpclib.server import Server, Stream

from agent.attest.selectors import Attestation
from agent.observe.logging import get_logger
from agent.peercred import PeerCred, peer_cred

if TYPE_CHECKING:  # grpclib names the protocol of its handlers only for type checkers
    from grpclib._typing import IServable

log = get_logger("workload_api")

_EARLY_BYTES = 1 << 20  # held per connection while its caller is being attested


@dataclass
class Caller:
    """Who is on the other end of a connection: the process (pinned by its pidfd) and what
    it was attested as when the connection was accepted (None: unattestable)."""

    cred: PeerCred
    attestation: Attestation | None


class Admission(Protocol):
    """What a connection asks of the server that accepted it: its caller attested, and a
    place among the open connections and the callers known by transport."""

    connections: set[AttestedConnection]
    callers: dict[asyncio.BaseTransport, Caller]

    async def attest_caller(self, pid: int) -> Attestation | None: ...


class AttestedConnection(asyncio.Protocol):
    """One accepted connection: who is on the other end, then grpclib's HTTP/2 protocol.

    grpclib sees nothing of the connection until the caller is known: no request on it can
    be handled before its peer credentials were read and its process attested. Reading is
    paused meanwhile; whatever a loop still delivers is held (up to _EARLY_BYTES)."""

    # set by connection_made, before the connection is among api.connections
    transport: asyncio.Transport

    def __init__(self, api: Admission, inner: asyncio.Protocol):
        self.api, self.inner = api, inner
        self.caller: Caller | None = None
        self._task: asyncio.Task[None] | None = None
        self._open = False  # inner has been given the connection
        self._early = bytearray()
        self._early_eof = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # a unix stream socket's transport: asyncio types the callback for every kind
        self.transport = cast(asyncio.Transport, transport)
        self.transport.pause_reading()
        self.api.connections.add(self)
        self._task = asyncio.get_running_loop().create_task(self._identify())

    async def _identify(self) -> None:
        transport = self.transport
        try:
            cred = peer_cred(transport.get_extra_info("socket"))
        except OSError:
            transport.abort()
            return
        try:
            att = await self.api.attest_caller(cred.pid)
        except Exception:
            log.exception("attesting a Workload API caller failed", pid=cred.pid)
            cred.close()
            transport.abort()
            return
        except BaseException:
            cred.close()
            raise
        if att is not None and not cred.alive():
            att = None  # the pid was reused between SO_PEERCRED and attestation
        if att is not None and (att.uid, att.gid) != (cred.uid, cred.gid):
            # SO_PEERCRED's ids are the connecting task's at connect(2); the attestation is of
            # the process now. A caller that exec'd a setuid program in between would be served
            # as that program: unattested instead (the exec itself is a known gap,
            # docs/security.md; this closes the privilege-changing case)
            log.warning(
                "Workload API caller changed its credentials since it connected; unattested",
                pid=cred.pid,
                connect_uid=cred.uid,
                connect_gid=cred.gid,
                uid=att.uid,
                gid=att.gid,
            )
            att = None
        log.debug(
            "Workload API caller attested" if att is not None else "Workload API caller unattested",
            pid=cred.pid,
            uid=cred.uid,
            exe=att.exe if att is not None else None,
            cgroup=att.cgroup_path if att is not None else None,
        )
        if transport.is_closing():
            cred.close()
            return
        self.caller = Caller(cred, att)
        self.api.callers[transport] = self.caller
        self.inner.connection_made(transport)
        self._open = True
        if self._early:
            early, self._early = bytes(self._early), bytearray()
            self.inner.data_received(early)
        if self._early_eof:
            transport.close()
            return
        transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        if self._open:
            self.inner.data_received(data)
            return
        self._early += data
        if len(self._early) > _EARLY_BYTES:
            self.transport.abort()

    def eof_received(self) -> bool | None:
        if self._open:
            return self.inner.eof_received()
        self._early_eof = True
        return True  # keep the transport until the caller is known

    def pause_writing(self) -> None:
        if self._open:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self._open:
            self.inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self.api.connections.discard(self)
        self.api.callers.pop(self.transport, None)
        if self._open:
            self.inner.connection_lost(exc)
        elif self._task is not None:
            self._task.cancel()
        if self.caller is not None:
            self.caller.cred.close()


class AttestingServer(Server):
    """grpclib's server with every accepted connection wrapped in an AttestedConnection."""

    def __init__(self, api: Admission, handlers: Collection[IServable]):
        super().__init__(handlers)
        self._api = api

    # grpclib 0.4: the factory given to create_unix_server. grpclib types it as returning its
    # own H2Protocol; the server only needs an asyncio.Protocol
    def _protocol_factory(self) -> AttestedConnection:  # type: ignore[override]
        return AttestedConnection(self._api, super()._protocol_factory())


def transport_of(stream: Stream[Any, Any]) -> asyncio.BaseTransport | None:
    """The transport a request arrived on (grpclib 0.4: Stream.peer wraps it)."""
    transport: asyncio.BaseTransport | None = getattr(stream.peer, "_transport", None)
    return transport
