"""The full path (agent/inject/proxy.py) forwards the request decide() decided on: nothing
the workload sends makes it remove, after the decision, a field the decision read. Sans-IO:
the proxy's protocols over stand-in transports, the World of tests/unit/test_fast_path.py."""

from __future__ import annotations

import asyncio

import pytest

from tests.unit.test_decide import parsed
from tests.unit.test_fast_path import BODY, RESPONSE, World


async def _until(cond, rounds: int = 200) -> None:
    """Let the loop run (no timers) until cond() holds."""
    for _ in range(rounds):
        if cond():
            return
        await asyncio.sleep(0)
    raise AssertionError("the proxy did not get there")


async def full_path(w: World, read: bytes, answer: bytes = RESPONSE) -> bytes:
    """Serve one read on the full path (the serving coroutine); what went upstream."""
    w.client.fast = None  # the lane is not offered: the coroutine decides and forwards
    task = asyncio.ensure_future(w.proxy._serve_requests(w.served))
    w.client.data_received(read)
    await _until(lambda: bool(w.upstream.transport.out or w.client.transport.out) or task.done())
    sent = w.upstream.transport.out
    if sent:
        w.upstream.data_received(answer)
        await _until(lambda: w.client.transport.out != b"")
    w.client.eof_received()
    await asyncio.wait_for(task, 5)
    return sent


def request(*fields: bytes) -> bytes:
    return b"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n%sContent-Length: %d\r\n\r\n%s" % (
        b"".join(f + b"\r\n" for f in fields),
        len(BODY),
        BODY,
    )


async def _plain() -> None:
    w = World()
    sent = await full_path(w, request(b"Connection: keep-alive"))
    head = parsed(sent)
    assert head.get(b"host") == b"127.0.0.1:8080"
    assert head.get(b"authorization") == b"Bearer header.payload.sig"


def test_harness_a_plain_request_reaches_the_server_with_its_host_and_credless_token():
    asyncio.run(_plain())


async def _connection_names(field: bytes) -> None:
    w = World()
    # decide() reads the one Host (the configured authority); a Connection field naming an
    # end-to-end field would have the proxy remove it after that (RFC 9110 7.6.1): before,
    # `Connection: Host` sent the server a credentialed request with no Host at all
    sent = await full_path(w, request(b"Connection: keep-alive, " + field))
    assert sent == b"", sent.split(b"\r\n\r\n")[0]
    assert w.client.transport.out.startswith(b"HTTP/1.1 400 "), w.client.transport.out[:200]
    assert field.lower() in w.client.transport.out.lower()  # the answer names it


@pytest.mark.parametrize("field", [b"Host", b"Content-Type", b"Mcp-Name", b"X-Anything"])
def test_a_connection_field_naming_an_end_to_end_field_is_refused(field):
    asyncio.run(_connection_names(field))
