"""Handover: a new agent takes over from the running one without refusing a connect.

The old agent serves a root-only unix socket, <run_dir>/handover.sock. A new agent started
with `--take-over` (what `credless restart`, the systemd unit's ExecReload and the DaemonSet
run) finds the pid file locked, connects, and the two speak four messages, each a 4-byte
length and a JSON object:

    new -> old   hello     {pid}
    old -> new   offer     {pid, listeners, tokens, notify}   + SCM_RIGHTS: the pid file's
                           descriptor (its flock goes with it) and every listening socket
    new -> old   takeover  once the new agent serves (BPF swapped in, tokens adopted)
    old -> new   released  the old agent stopped accepting and let go of its unix sockets
                           and ports; it now drains its connections and exits

Why SCM_RIGHTS on a socket of our own, not systemd's file descriptor store: the store keeps
the listeners across a *restart*, where connects wait in the backlog for the whole start-up
of the new agent (seconds of BPF compilation) and overflow it; with a handover the old agent
accepts until the new one accepts. It also works the same on Kubernetes, where the socket is
on the run_dir hostPath shared by the old and the new pod. The admin socket is not used: it
is a line-JSON request/response protocol served from threads; this exchange spans the new
agent's start-up and carries descriptors.

Listening sockets: the proxy's, in the agent's network namespace and in every pod's
(agent/inject/netns.py), so connects queue on the very sockets the new agent accepts on; a
socket stays in the namespace it was made in, whoever holds it. The other listeners (the
Workload API's unix socket, the admin socket, this one, the metrics and bundle endpoints) are
bound by the new agent after `released`: for those few milliseconds a caller retries (gRPC,
Prometheus, an authorization server's JWKS fetch), none of them is an intercepted connect.

Tokens are handed over on the same socket, with their DPoP keys (agent/handover_tokens.py):
in memory from one root process to the other, never on disk. Fetching ahead instead would
need the authorization server to be up and to accept the new agent's assertions at that very
moment, and would turn every rollout into a burst of token requests from every node; the old
agent's tokens are valid now and the new agent refreshes them as usual.

If the new agent fails before `takeover` (bad configuration, a BPF load error), it closes
the socket; the old agent sees EOF, puts its own BPF programs and configuration back in the
pinned links and maps (the new one may have swapped them), and keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import struct
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.inject.listeners import Listening, ListenSpec
from agent.observe.logging import get_logger
from agent.peercred import not_the_agents_equal, peer_cred

log = get_logger("handover")

SOCKET_NAME = "handover.sock"
MAX_MESSAGE = 16 << 20
MAX_FDS = 250  # SCM_MAX_FD is 253
HELLO_SECONDS = 30.0  # to answer hello: building the offer is quick
# From the offer to `takeover`: the new agent's whole start but the late components (its
# own wait for `released` is 60 s). Past it the old agent takes its redirect back and
# serves on: a new agent hung after swapping its programs in would otherwise hold the
# intercepted traffic and the old agent busy (every later handover refused) for ever.
TAKEOVER_SECONDS = 120.0
# Components bound to a path or port the old agent holds: started by the new agent after
# `released` (names as in agent/wiring.py)
LATE = frozenset({"workload_api", "bundle_endpoint", "admin", "metrics", "handover"})


class HandoverError(Exception):
    """The handover could not happen; the message says why (the old agent keeps serving)."""


class NoHandover(HandoverError):
    """The running agent has no handover socket: a version from before handovers."""


# ------------------------------------------------------------------ framing
def send_message(sock: socket.socket, obj: dict[str, Any], fds: Sequence[int] = ()) -> None:
    """One message on a blocking socket; fds ride on its first bytes."""
    body = json.dumps(obj).encode()
    head = struct.pack("!I", len(body))
    if fds:
        socket.send_fds(sock, [head], list(fds))
    else:
        sock.sendall(head)
    sock.sendall(body)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise HandoverError("the other agent closed the handover socket")
        buf += chunk
    return buf


def recv_message(sock: socket.socket) -> tuple[dict[str, Any], list[int]]:
    """One message from a blocking socket, with the descriptors that came with it."""
    head, fds, _flags, _addr = socket.recv_fds(sock, 4, MAX_FDS)
    if not head:
        raise HandoverError("the other agent closed the handover socket")
    head += _recv_exact(sock, 4 - len(head))
    (size,) = struct.unpack("!I", head)
    if size > MAX_MESSAGE:
        for fd in fds:
            os.close(fd)
        raise HandoverError(f"handover message of {size} bytes refused")
    try:
        return json.loads(_recv_exact(sock, size)), fds
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise


# ------------------------------------------------------------------ listeners
def describe(srv: Listening, netns: int) -> tuple[int, dict[str, Any]]:
    """A served listener's socket descriptor and what it is (family, address, TLS)."""
    tls_sock = getattr(srv, "sock", None)  # TlsListener
    if tls_sock is not None:
        sock, tls = tls_sock, True
    else:
        sock, tls = srv.sockets[0], False  # type: ignore[attr-defined]  # asyncio.Server
    host, port = sock.getsockname()[:2]
    return sock.fileno(), {
        "netns": netns,
        "family": int(sock.family),
        "host": host,
        "port": port,
        "tls": tls,
    }


@dataclass
class Inherited:
    """What a new agent received: listening sockets by network namespace (0: its own)."""

    main: list[tuple[socket.socket, ListenSpec]] = field(default_factory=list)
    pods: dict[int, list[tuple[socket.socket, ListenSpec]]] = field(default_factory=dict)

    def close(self) -> None:
        for s, _ in self.main:
            s.close()
        for socks in self.pods.values():
            for s, _ in socks:
                s.close()
        self.main.clear()
        self.pods.clear()


def inherited_sockets(specs: list[dict[str, Any]], fds: list[int]) -> Inherited:
    out = Inherited()
    for spec, fd in zip(specs, fds, strict=True):
        sock = socket.socket(fileno=fd)
        sock.setblocking(False)
        ls = ListenSpec(spec["family"], spec["host"], spec["port"], spec["tls"])
        if spec["netns"]:
            out.pods.setdefault(spec["netns"], []).append((sock, ls))
        else:
            out.main.append((sock, ls))
    return out


def tcp_endpoints(cfg: Any) -> list[str]:
    """The TCP addresses an agent of cfg binds among its LATE components."""
    out = []
    if cfg.metrics.enabled:
        out.append(cfg.metrics.listen)
    if cfg.bundle_endpoint.enabled:
        out.append(cfg.bundle_endpoint.listen)
    return out


def check_bindable(mine: list[str], held_by_old: list[str]) -> None:
    """Before the takeover, whether the TCP addresses this agent binds after it are free or
    the old agent's (released at `takeover`): a port some other process holds would fail
    the new agent once the old one no longer serves. Raises HandoverError naming it."""
    from agent.config_values import parse_listen

    for value in mine:
        if value in held_by_old:
            continue
        address = parse_listen(value)
        if address is None:
            continue
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(address)
            except OSError as e:
                raise HandoverError(f"{value}: {e.strerror}; choose a free port") from None


# ------------------------------------------------------------------ BPF pins
def repin_process_images(attestor: Any) -> bool:
    """The attestor's process_images map pinned again if the other agent unlinked the pin."""
    pinned = attestor.source.pin_images()
    if pinned:
        log.info("process_images pinned again")
    return pinned


# ------------------------------------------------------------------ the old agent's side
@dataclass
class Offer:
    """What the running agent hands over, built on its loop."""

    pidfile_fd: int
    listeners: list[tuple[int, dict[str, Any]]]
    tokens: dict[str, Any]
    endpoints: list[str] = field(default_factory=list)  # TCP addresses released at takeover


class HandoverServer:
    """The old agent's side: serves handover.sock (root only), one handover at a time.

    offer() builds what to hand over; release() is called at `takeover` (stop accepting,
    let go of unix sockets and ports) and must return once done; then on_handed_over()
    starts the drain. abort() is called when a new agent goes away before `takeover`, or
    has not sent it within takeover_seconds of the offer."""

    name = "handover"

    def __init__(
        self,
        path: Path,
        offer: Callable[[], Offer],
        release: Callable[[], Awaitable[None]],
        on_handed_over: Callable[[], None],
        abort: Callable[[], None],
        takeover_seconds: float = TAKEOVER_SECONDS,
    ):
        self.path = path
        self.takeover_seconds = takeover_seconds
        self._offer, self._release = offer, release
        self._on_handed_over, self._abort = on_handed_over, abort
        self._sock: socket.socket | None = None
        self._task: asyncio.Task[None] | None = None
        self._busy = False
        self._serving: set[asyncio.Task[None]] = set()
        # the new agent's connection, held open until this process exits: its EOF tells
        # the new agent this one is gone
        self._kept: socket.socket | None = None
        self.handed_over = False

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.unlink(missing_ok=True)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)  # 0600: root only (and SO_PEERCRED is checked per caller)
        try:
            s.bind(str(self.path))
        finally:
            os.umask(old)
        s.listen(4)
        s.setblocking(False)
        self._sock = s
        self._task = asyncio.create_task(self._accept())

    async def stop(self) -> None:
        """Stop listening, path and all: at a handover this runs at `released`, before the
        new agent binds its own."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None
            self.path.unlink(missing_ok=True)

    async def _accept(self) -> None:
        loop = asyncio.get_running_loop()
        sock = self._sock
        if sock is None:
            return
        while True:
            conn, _ = await loop.sock_accept(sock)
            task = loop.create_task(self._serve(conn))
            self._serving.add(task)
            task.add_done_callback(self._serving.discard)

    async def _serve(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        taken = False
        try:
            cred = peer_cred(conn)
            refused = not_the_agents_equal(cred.pid, cred.uid, cred.alive)
            cred.close()
            if refused is not None:
                log.warning("handover refused", reason=refused, pid=cred.pid, uid=cred.uid)
                return
            # hello read first, whatever the answer: the caller is done sending when told
            hello = await asyncio.wait_for(_recv_async(loop, conn), HELLO_SECONDS)
            if hello.get("op") != "hello":
                return
            if self._busy or self.handed_over:
                await _send_async(loop, conn, {"op": "refused", "error": "a handover is under way"})
                return
            self._busy = True
            taken = True
            log.info("handover: a new agent asks to take over", pid=hello.get("pid"))
            offer = self._offer()
            fds = [offer.pidfile_fd] + [fd for fd, _ in offer.listeners]
            conn.setblocking(True)
            try:
                await loop.run_in_executor(
                    None,
                    send_message,
                    conn,
                    {
                        "op": "offer",
                        "pid": os.getpid(),
                        "listeners": [spec for _, spec in offer.listeners],
                        "tokens": offer.tokens,
                        "endpoints": offer.endpoints,
                        "notify": _notify_env(),
                    },
                    fds,
                )
            finally:
                conn.setblocking(False)
            # the new agent starts now (seconds): this agent serves meanwhile
            try:
                msg = await asyncio.wait_for(_recv_async(loop, conn), self.takeover_seconds)
            except TimeoutError:
                raise HandoverError(
                    f"the new agent did not take over within {self.takeover_seconds:g} s"
                ) from None
            if msg.get("op") != "takeover":
                raise HandoverError(f"unexpected message {msg.get('op')!r}")
            self.handed_over = True
            await self._release()
            await _send_async(loop, conn, {"op": "released", "pid": os.getpid()})
            log.info("handover: taken over; draining", new_pid=hello.get("pid"))
            self._kept, conn = conn, None  # type: ignore[assignment]
            self._on_handed_over()
        except (HandoverError, OSError, ValueError, TimeoutError) as e:
            if taken and not self.handed_over:
                log.warning("handover aborted: this agent keeps serving", error=str(e))
                try:
                    self._abort()
                except Exception:
                    log.exception("reclaiming after an aborted handover failed")
        finally:
            if taken and not self.handed_over:
                self._busy = False
            if conn is not None:
                conn.close()


def _notify_env() -> dict[str, str]:
    """systemd's notify socket and watchdog interval, for a new agent ExecReload started
    (systemd gives them to the main process only)."""
    return {k: os.environ[k] for k in ("NOTIFY_SOCKET", "WATCHDOG_USEC") if k in os.environ}


async def _send_async(loop: asyncio.AbstractEventLoop, conn: socket.socket, obj: dict) -> None:
    body = json.dumps(obj).encode()
    await loop.sock_sendall(conn, struct.pack("!I", len(body)) + body)


async def _recv_async(loop: asyncio.AbstractEventLoop, conn: socket.socket) -> dict[str, Any]:
    async def exact(n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = await loop.sock_recv(conn, n - len(buf))
            if not chunk:
                raise HandoverError("the new agent closed the handover socket")
            buf += chunk
        return buf

    (size,) = struct.unpack("!I", await exact(4))
    if size > MAX_MESSAGE:
        raise HandoverError(f"handover message of {size} bytes refused")
    return json.loads(await exact(size))


# ------------------------------------------------------------------ the new agent's side
class HandoverClient:
    """The new agent's side of one handover."""

    def __init__(self, path: Path, timeout: float = HELLO_SECONDS):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.old_pid = 0
        self.notify: dict[str, str] = {}
        self.endpoints: list[str] = []  # the old agent's TCP endpoints (released at takeover)

    def offer(self) -> tuple[int, Inherited, dict[str, Any]]:
        """Connect, say hello, and receive (pid file descriptor, listeners, tokens)."""
        try:
            self.sock.connect(str(self.path))
        except (FileNotFoundError, ConnectionRefusedError) as e:
            raise NoHandover(f"{self.path}: {e.strerror or e}") from None
        except OSError as e:
            raise HandoverError(
                f"cannot reach the running agent's {self.path}: {e.strerror or e}"
            ) from None
        # the one answering must be the running agent, not whoever could put a socket at
        # this path: its listeners and tokens are about to be adopted
        cred = peer_cred(self.sock)
        refused = not_the_agents_equal(cred.pid, cred.uid, cred.alive)
        cred.close()
        if refused is not None:
            raise HandoverError(f"{self.path} is not the running agent's: {refused}")
        try:
            send_message(self.sock, {"op": "hello", "pid": os.getpid()})
            msg, fds = recv_message(self.sock)
        except (OSError, ValueError) as e:
            raise HandoverError(f"handover with the running agent failed: {e}") from None
        if msg.get("op") != "offer":
            for fd in fds:
                os.close(fd)
            raise HandoverError(f"the running agent refused the handover: {msg.get('error')}")
        specs = msg.get("listeners", [])
        if len(fds) != 1 + len(specs):
            for fd in fds:
                os.close(fd)
            raise HandoverError("the running agent's offer lost descriptors on the way")
        self.old_pid = int(msg.get("pid", 0))
        self.notify = dict(msg.get("notify", {}))
        self.endpoints = [str(e) for e in msg.get("endpoints", [])]
        return fds[0], inherited_sockets(specs, fds[1:]), dict(msg.get("tokens", {}))

    def take_over(self, timeout: float = 60.0) -> None:
        """Tell the old agent to stop accepting; returns once it let go of its sockets."""
        self.sock.settimeout(timeout)
        try:
            send_message(self.sock, {"op": "takeover"})
            msg, fds = recv_message(self.sock)
        except (OSError, ValueError) as e:
            raise HandoverError(f"the running agent did not confirm the takeover: {e}") from None
        for fd in fds:
            os.close(fd)
        if msg.get("op") != "released":
            raise HandoverError(f"the running agent answered {msg.get('op')!r} to takeover")

    def close(self) -> None:
        self.sock.close()
