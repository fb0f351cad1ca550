"""The workload under attack, or rather the attacking workload: a process the test puts in
the agent's managed cgroup, which writes raw bytes at an MCP server's address (the kernel
redirects the connect to credless) and reports every byte the proxy answered.

    python -m tests.upstreams.attacker        (run from the repository root)

It stays up for a whole test module, taking one JSON command per stdin line and printing one
JSON result line per command. One long-lived process, not one per case: its identity (and so
its cached token, which the proxy's fast lane needs) lives as long as it does; a process
per case would end the identity each time and make every case a token fetch.

Command: {"port": P, "pieces": [{"b64": ..., "wait": bool}], "expect": N | null,
          "close": bool, "idle": s, "linger": s, "gap": s}
  Pieces are written in order, reading whatever arrives meanwhile (so a proxy that answers
  and closes early is heard before its reset); a piece with "wait" is written once one more
  final response has arrived; "gap" seconds pass (reading) between the others. Then it reads
  until the connection closes, or: once N final responses have arrived, for "linger" more
  seconds of silence (or, with "close", until the close, at most "idle"); without N, until
  "idle" seconds of silence.
Result: {"received_b64", "closed" (EOF or reset seen), "reset", "write_error", "unsent"}.
Writes that fail because the proxy closed (EPIPE, ECONNRESET) are expected in some cases and
reported, not raised.
"""

from __future__ import annotations

import base64
import errno
import json
import selectors
import socket
import sys
import time

from tests.upstreams.wire import split_responses

WRITE_STEP = 64 * 1024


class Exchange:
    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.setblocking(False)
        self.sel = selectors.DefaultSelector()
        self.received = bytearray()
        self.closed = self.reset = False
        self.write_error: str | None = None

    def finals(self) -> int:
        return split_responses(bytes(self.received), eof=self.closed).complete

    def _drain_input(self) -> bool:
        """Read what is there; True if anything happened (bytes, EOF, reset)."""
        got = False
        while not self.closed:
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                break
            except ConnectionResetError:
                self.closed = self.reset = got = True
                break
            got = True
            if not data:
                self.closed = True
                break
            self.received += data
        return got

    def read_for(self, timeout: float) -> bool:
        """Wait up to timeout for input; True if anything arrived (or the peer closed)."""
        if self.closed:
            return False
        self.sel.register(self.sock, selectors.EVENT_READ)
        try:
            if not self.sel.select(timeout):
                return False
        finally:
            self.sel.unregister(self.sock)
        return self._drain_input()

    def write(self, data: bytes, stall: float) -> int:
        """Write data, reading meanwhile; returns how many bytes could not be written."""
        view, pos, last_progress = memoryview(data), 0, time.monotonic()
        while pos < len(data) and not self.write_error:
            try:
                pos += self.sock.send(view[pos : pos + WRITE_STEP])
                last_progress = time.monotonic()
                self._drain_input()
                continue
            except BlockingIOError:
                pass
            except OSError as e:  # the proxy closed on us: expected for refused cases
                self.write_error = errno.errorcode.get(e.errno, str(e))
                break
            if time.monotonic() - last_progress > stall:
                self.write_error = "stalled"  # the proxy stopped reading and did not close
                break
            self.sel.register(self.sock, selectors.EVENT_READ | selectors.EVENT_WRITE)
            try:
                self.sel.select(0.05)
            finally:
                self.sel.unregister(self.sock)
            self._drain_input()
        return len(data) - pos


def run(cmd: dict) -> dict:
    ex = Exchange(cmd["port"])
    idle, linger, gap = cmd.get("idle", 1.5), cmd.get("linger", 0.1), cmd.get("gap", 0.005)
    expect, want_close = cmd.get("expect"), cmd.get("close", False)
    unsent = 0
    try:
        answered = 0
        for i, piece in enumerate(cmd["pieces"]):
            data = base64.b64decode(piece["b64"])
            if ex.write_error or ex.closed:
                unsent += len(data)
                continue
            if piece.get("wait"):
                while ex.finals() <= answered and ex.read_for(idle):
                    pass
            elif i:
                deadline = time.monotonic() + gap
                while (left := deadline - time.monotonic()) > 0 and ex.read_for(left):
                    pass
            answered = ex.finals()
            unsent += ex.write(data, stall=idle)
        while not ex.closed:
            if expect is not None and ex.finals() >= expect:
                if not ex.read_for(idle if want_close else linger):
                    break
            elif not ex.read_for(idle):
                break
    finally:
        ex.sock.close()
    return {
        "received_b64": base64.b64encode(bytes(ex.received)).decode(),
        "closed": ex.closed,
        "reset": ex.reset,
        "write_error": ex.write_error,
        "unsent": unsent,
    }


def main() -> None:
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        try:
            out = run(json.loads(line))
        except Exception as e:  # noqa: BLE001 — report, keep serving: the test decides what it means
            out = {"error": f"{type(e).__name__}: {e}"}
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
