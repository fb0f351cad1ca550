"""The TLS listener's decisions (agent/inject/tls_listener.py), found by mutation testing: an
accept that fails is warned about with its error and retried after a short pause, a redirect
lookup that fails hands on a connection with no record, a workload silent before its first
byte or in its handshake is given up on after HANDSHAKE_SECONDS, and wait_closed returns only
when nothing of the listener still runs. A real listening socket on 127.0.0.1; the TLS
context is a server context with no certificate (no handshake here gets that far)."""

from __future__ import annotations

import asyncio
import errno
import socket
import ssl
from typing import Any

from agent.inject import tls_listener
from agent.inject.redirect import RedirectInfo
from agent.inject.tls_listener import Arrival, TlsListener
from tests.helpers import run_async
from tests.unit import test_tokens_mutants

debug_lines = test_tokens_mutants.debug_lines
WAIT = 5.0  # the bound on waiting for what the test expects (never a pause)


class Seen:
    """What the listener handed on: plain arrivals and failures, each with an event."""

    def __init__(self) -> None:
        self.plain: list[Arrival] = []
        self.failed: list[tuple[Arrival, BaseException]] = []
        self.got_plain, self.got_failed = asyncio.Event(), asyncio.Event()

    async def on_plain(self, arrival: Arrival) -> None:
        self.plain.append(arrival)
        self.got_plain.set()

    def on_failed(self, arrival: Arrival, error: BaseException) -> None:
        self.failed.append((arrival, error))
        self.got_failed.set()


def listening_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    sock.setblocking(False)
    return sock


# a connection the kernel redirected (one with no record is refused before any TLS work)
RECORDED = RedirectInfo("127.0.0.1", 8443, 4343, 4343, 0, 1, 1, 5, 1)


def listener(seen: Seen, lookup: Any = lambda peer, local: RECORDED) -> TlsListener:
    return TlsListener(
        listening_socket(),
        asyncio.Protocol,  # type: ignore[arg-type]
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER),
        lookup,
        seen.on_plain,
        seen.on_failed,
    )


async def connect(lst: TlsListener) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(*lst.sock.getsockname())


async def stopped(lst: TlsListener, *writers: asyncio.StreamWriter) -> None:
    for w in writers:
        w.close()
    lst.close()
    await lst.wait_closed()


def errors_logged(lines: list[dict]) -> list[dict]:
    return [ln for ln in lines if ln.get("level") == "error"]


@run_async
async def test_a_lookup_that_fails_hands_the_connection_on_with_no_record(debug_lines):
    def lookup(peer: tuple, local: tuple) -> None:
        raise KeyError("the redirect table cannot be read")

    seen = Seen()
    lst = listener(seen, lookup)
    _, w = await connect(lst)
    w.write(b"GET / HTTP/1.1\r\n\r\n")
    await asyncio.wait_for(seen.got_plain.wait(), WAIT)
    assert seen.plain[0].info is None
    (logged,) = errors_logged(debug_lines())
    assert logged["event"] and "the redirect table cannot be read" in logged["exception"]
    await stopped(lst, w)


@run_async
async def test_a_connection_with_no_record_is_refused_before_any_tls_work():
    """One the kernel did not redirect goes to the refusal (on_plain says so) before its
    first byte is even looked at: a ClientHello gets no handshake, no leaf is minted."""
    seen = Seen()
    lst = listener(seen, lambda peer, local: None)
    reader, w = await connect(lst)
    w.write(b"\x16\x03\x01\x00\x05hello")  # the start of a TLS record
    await asyncio.wait_for(seen.got_plain.wait(), WAIT)
    assert seen.plain[0].info is None and seen.failed == []
    assert await asyncio.wait_for(reader.read(), WAIT) == b""  # closed, nothing answered
    await stopped(lst, w)


@run_async
async def test_a_failure_that_cannot_be_recorded_is_logged_and_the_connection_closed(
    monkeypatch, debug_lines
):
    monkeypatch.setattr(tls_listener, "HANDSHAKE_SECONDS", 0.05)

    class Unrecorded(Seen):
        def on_failed(self, arrival: Arrival, error: BaseException) -> None:
            super().on_failed(arrival, error)
            raise RuntimeError("the audit cannot be written")

    seen = Unrecorded()
    lst = listener(seen)
    reader, w = await connect(lst)
    await asyncio.wait_for(seen.got_failed.wait(), WAIT)
    assert await asyncio.wait_for(reader.read(), WAIT) == b""  # closed all the same
    (logged,) = errors_logged(debug_lines())
    assert logged["event"] and "the audit cannot be written" in logged["exception"]
    await stopped(lst, w)


class _Asyncio:
    """The module's asyncio, its pauses recorded and not waited for."""

    def __init__(self) -> None:
        self.pauses: list[Any] = []

    async def sleep(self, delay: Any) -> None:
        self.pauses.append(delay)
        await asyncio.sleep(0)

    def __getattr__(self, name: str) -> Any:
        return getattr(asyncio, name)


@run_async
async def test_an_accept_that_fails_is_warned_about_and_retried_after_a_short_pause(
    monkeypatch, debug_lines
):
    paced = _Asyncio()
    monkeypatch.setattr(tls_listener, "asyncio", paced)
    loop = asyncio.get_running_loop()
    real_accept = loop.sock_accept
    failures = [OSError(errno.EMFILE, "Too many open files")]

    async def sock_accept(sock: socket.socket) -> tuple[socket.socket, Any]:
        if failures:
            raise failures.pop()
        return await real_accept(sock)

    monkeypatch.setattr(loop, "sock_accept", sock_accept)
    seen = Seen()
    lst = listener(seen)
    _, w = await connect(lst)
    w.write(b"GET / HTTP/1.1\r\n\r\n")
    await asyncio.wait_for(seen.got_plain.wait(), WAIT)  # served after the failure
    assert len(paced.pauses) == 1 and 0 < paced.pauses[0] < 1
    warned = [ln for ln in debug_lines() if ln.get("level") == "warning"]
    assert [ln.get("error") for ln in warned] == ["[Errno 24] Too many open files"]
    assert all(ln.get("event") for ln in warned)
    await stopped(lst, w)


@run_async
async def test_a_workload_silent_before_its_first_byte_is_given_up_on(monkeypatch):
    monkeypatch.setattr(tls_listener, "HANDSHAKE_SECONDS", 0.05)
    seen = Seen()
    lst = listener(seen)
    _, w = await connect(lst)
    await asyncio.wait_for(seen.got_failed.wait(), WAIT)
    assert isinstance(seen.failed[0][1], TimeoutError) and seen.plain == []
    await stopped(lst, w)


@run_async
async def test_a_workload_silent_in_its_handshake_is_given_up_on(monkeypatch):
    monkeypatch.setattr(tls_listener, "HANDSHAKE_SECONDS", 0.05)
    seen = Seen()
    lst = listener(seen)
    reader, w = await connect(lst)
    w.write(bytes([tls_listener.TLS_HANDSHAKE]))  # a record begun, never finished
    await asyncio.wait_for(seen.got_failed.wait(), WAIT)
    assert isinstance(seen.failed[0][1], OSError | TimeoutError) and seen.plain == []
    assert await asyncio.wait_for(reader.read(), WAIT) == b""  # closed, nothing sent
    await stopped(lst, w)


@run_async
async def test_wait_closed_returns_when_nothing_of_the_listener_still_runs():
    finished: list[str] = []

    class Slow(Seen):
        async def on_plain(self, arrival: Arrival) -> None:
            self.got_plain.set()
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                for _ in range(5):  # a clean-up that takes a few turns of the loop
                    await asyncio.sleep(0)
                finished.append("on_plain")
                raise

    seen = Slow()
    lst = listener(seen)
    _, w = await connect(lst)
    w.write(b"GET / HTTP/1.1\r\n\r\n")
    await asyncio.wait_for(seen.got_plain.wait(), WAIT)
    lst.close()
    await lst.wait_closed()
    assert finished == ["on_plain"]
    others = asyncio.all_tasks() - {asyncio.current_task()}
    assert all(t.done() for t in others), others
    w.close()


@run_async
async def test_wait_closed_waits_for_the_accepting_task_when_no_connection_is_pending():
    lst = listener(Seen())
    lst.close()
    await lst.wait_closed()
    others = asyncio.all_tasks() - {asyncio.current_task()}
    assert all(t.done() for t in others), others
