"""The floor under any CPython proxy on this event loop and parser: a relay that does only
what every proxy must (parse each request with httptools, swap in an Authorization header,
write it to a kept-alive upstream, stream the response back, find its end) and nothing
credless adds (no attestation re-check, policy, token cache, audit event or metrics).

A benchmark baseline, not product code: bench-inject runs it on the same core as the
proxies, so credless's figure can be read against the most any design in this language
could reach here. Usage: python -m tests.bench.relay_floor LISTEN_PORT UPSTREAM_PORT
"""

from __future__ import annotations

import asyncio
import sys

import httptools
import uvloop


class UpstreamConn(asyncio.Protocol):
    def __init__(self, client: WorkloadConn):
        self.client = client
        self.parser = httptools.HttpResponseParser(self)
        self.transport = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.client.transport.write(data)  # streamed as it arrives
        self.parser.feed_data(data)  # only to find the response's end

    def on_message_complete(self) -> None:
        self.client.response_done()


class WorkloadConn(asyncio.Protocol):
    def __init__(self, upstream_port: int):
        self.upstream_port = upstream_port
        self.parser = httptools.HttpRequestParser(self)
        self.upstream: UpstreamConn | None = None
        self.queue: list[bytes] = []
        self.busy = False

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_message_begin(self) -> None:
        self.headers: list[bytes] = []
        self.body = b""

    def on_url(self, url: bytes) -> None:
        self.url = url

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() != b"authorization":
            self.headers.append(name + b": " + value + b"\r\n")

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        self.queue.append(
            b"%s %s HTTP/1.1\r\n%sAuthorization: Bearer floor\r\n\r\n%s"
            % (self.parser.get_method(), self.url, b"".join(self.headers), self.body)
        )
        self._next()

    def _next(self) -> None:
        if self.busy or not self.queue:
            return
        self.busy = True
        if self.upstream is None:
            self._connecting = asyncio.ensure_future(self._connect())
        else:
            self.upstream.transport.write(self.queue.pop(0))

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        _, self.upstream = await loop.create_connection(
            lambda: UpstreamConn(self), "127.0.0.1", self.upstream_port
        )
        self.upstream.transport.write(self.queue.pop(0))

    def response_done(self) -> None:
        self.busy = False
        self._next()

    def connection_lost(self, exc) -> None:
        if self.upstream is not None:
            self.upstream.transport.close()


async def serve(listen_port: int, upstream_port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: WorkloadConn(upstream_port), "127.0.0.1", listen_port)
    await server.serve_forever()


if __name__ == "__main__":
    uvloop.run(serve(int(sys.argv[1]), int(sys.argv[2])))
