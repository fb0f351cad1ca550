"""An answer relayed with a value masked (agent/inject/flows.py, begin's `mask`): assertion
mode's client assertion, which an authorization server refusing it may quote in its error
(found by review, stop 34: the workload, which is to hold no credential, was handed one).

Every framing a server may give, arriving in every split a network may make; what the
workload gets is read back with h11 (a real HTTP/1.1 parser, as a workload's client would):
the masked value appears nowhere, and every other byte of the answer is the server's."""

from __future__ import annotations

import asyncio

import h11
import pytest

from agent.inject.flows import ClientSide, UpstreamSide
from agent.inject.masking import Mask
from tests.unit.transport import Transport

MINTED = b"eyJhbGciOiJFUzI1NiJ9.eyJqdGkiOiJhLTEifQ.c2lnbmF0dXJlLXNpZ25hdHVyZQ"
MASKED = b"*" * len(MINTED)
ERROR = b'{"error":"invalid_client","error_description":"could not verify %s; again: %s"}' % (
    MINTED,
    MINTED,
)


def chunked(body: bytes, size: int) -> bytes:
    out = b"".join(
        b"%x\r\n%s\r\n" % (len(body[i : i + size]), body[i : i + size])
        for i in range(0, len(body), size)
    )
    return out + b"0\r\n\r\n"


ANSWERS = {
    "content-length": b"HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\n"
    b"Content-Length: %d\r\n\r\n%s" % (len(ERROR), ERROR),
    # chunks that cut the value apart: the workload's parser joins them again
    "chunked": b"HTTP/1.1 400 Bad Request\r\nTransfer-Encoding: chunked\r\n\r\n"
    + chunked(ERROR, 7),
    "close-delimited": b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\n\r\n" + ERROR,
    "in-a-header": b"HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Bearer "
    b'error="invalid_client", error_description="%s"\r\nContent-Length: 0\r\n\r\n' % MINTED,
}


def relay(
    reads: list[bytes], close: bool, mask: bytes | None = MINTED
) -> tuple[bytes, UpstreamSide]:
    async def run() -> tuple[bytes, UpstreamSide]:
        client = ClientSide(lambda c: None)
        client.connection_made(Transport())
        up = UpstreamSide()
        up.connection_made(Transport())
        up.begin(client, on_done=lambda _: None, mask=mask)
        up.sent()
        for data in reads:
            up.data_received(data)
        if close:
            up.eof_received()
        return client.transport.out, up

    return asyncio.run(run())


def as_the_workload_reads(out: bytes) -> tuple[int, dict[bytes, bytes], bytes]:
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="POST", target="/token", headers=[("Host", "as")]))
    conn.receive_data(out)
    status, headers, body = 0, {}, b""
    while True:
        event = conn.next_event()
        if isinstance(event, h11.Response):
            status, headers = event.status_code, dict(event.headers)
        elif isinstance(event, h11.Data):
            body += event.data
        elif event is h11.NEED_DATA:
            conn.receive_data(b"")  # the connection closed: a close-delimited body ends
        elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
            return status, headers, body


def splits(wire: bytes) -> list[list[bytes]]:
    """The answer in one read, cut in two at every place, and a byte per read."""
    return (
        [[wire]]
        + [[wire[:i], wire[i:]] for i in range(1, len(wire))]
        + [[wire[i : i + 1] for i in range(len(wire))]]
    )


@pytest.mark.parametrize("framing", ANSWERS)
def test_the_minted_value_never_reaches_the_workload_however_the_answer_is_framed_and_cut(
    framing,
):
    wire = ANSWERS[framing]
    for reads in splits(wire):
        out, up = relay(reads, close=framing == "close-delimited")
        assert MINTED not in out and up.complete
        status, headers, body = as_the_workload_reads(out)
        assert MINTED not in body and all(MINTED not in v for v in headers.values())
        if framing == "in-a-header":
            assert status == 401 and MASKED in headers[b"www-authenticate"]
        else:
            assert status == 400 and body == ERROR.replace(MINTED, MASKED)


def test_without_a_mask_the_answer_is_relayed_as_the_server_gave_it():
    async def run() -> bytes:
        client = ClientSide(lambda c: None)
        client.connection_made(Transport())
        up = UpstreamSide()
        up.connection_made(Transport())
        up.begin(client, on_done=lambda _: None)
        up.data_received(ANSWERS["content-length"])
        return client.transport.out

    assert asyncio.run(run()) == ANSWERS["content-length"]  # verbatim, value and all


def test_without_a_mask_a_close_delimited_answer_ends_with_the_servers_last_byte():
    out, up = relay([ANSWERS["close-delimited"]], close=True, mask=None)
    assert up.complete  # its body ended at EOF, and nothing was added after it
    assert out.endswith(ERROR) and as_the_workload_reads(out)[2] == ERROR


@pytest.mark.parametrize("value", [b"", b"a*b"])
def test_a_mask_is_a_value_its_stars_cannot_be_taken_for(value):
    with pytest.raises(ValueError, match=r"^a mask is a non-empty value without '\*'$"):
        Mask(value)


def test_a_masked_body_goes_on_as_it_arrives_less_what_may_begin_the_value():
    mask = Mask(MINTED)
    piece = b"x" * 100
    assert mask.body(piece) == piece[: 100 - (len(MINTED) - 1)]  # kept back: the rest
    assert mask.body(MINTED[:10]) == piece[100 - (len(MINTED) - 1) :][:10]
    assert mask.rest() == piece[-(len(MINTED) - 11) :] + MINTED[:10]  # no value: as sent
    assert mask.rest() == b"" and mask.body(b"") == b""  # rest() gave everything
