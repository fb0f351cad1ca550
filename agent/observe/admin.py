"""The admin socket: a root-only unix socket for operator commands (`credless ps`, ...).

One JSON request per connection ({"cmd": "ps"}), one JSON response. The socket is created
0600 and every caller is also checked with SO_PEERCRED, so a permissive umask or a copied
socket file cannot open it to other users: the table it serves maps pids to identities.
"""

from __future__ import annotations

import json
import os
import socket
import socketserver
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.observe.logging import get_logger, scrub_json
from agent.observe.serving import serve_in_background, stop_serving
from agent.peercred import not_the_agents_equal, peer_cred

log = get_logger("admin")
Handler = Callable[[dict[str, Any]], Any]  # the request ({"cmd": ..., args}) -> its result
MAX_REQUEST = 64 * 1024


class AdminServer:
    name = "admin"

    def __init__(self, path: Path):
        self.path = path
        self._handlers: dict[str, Handler] = {}
        self._server: socketserver.ThreadingUnixStreamServer | None = None

    def register(self, cmd: str, handler: Handler) -> None:
        self._handlers[cmd] = handler

    def start(self) -> None:
        handlers = self._handlers

        class Conn(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                cred = peer_cred(self.request)
                refused = not_the_agents_equal(cred.pid, cred.uid, cred.alive)
                cred.close()
                if refused is not None:
                    self._reply({"error": f"permission denied: {refused}"})
                    return
                line = self.rfile.readline(MAX_REQUEST)
                try:
                    req = json.loads(line)
                    handler = handlers[req["cmd"]]
                except (ValueError, KeyError, TypeError):
                    self._reply(
                        {"error": "bad request; known commands: " + ", ".join(sorted(handlers))}
                    )
                    return
                try:
                    self._reply({"ok": handler(req)})
                except Exception as e:
                    log.exception("admin command failed", cmd=req.get("cmd"))
                    self._reply({"error": f"{req['cmd']} failed: {e}"})

            def _reply(self, obj: dict) -> None:
                self.wfile.write(scrub_json(json.dumps(obj)).encode() + b"\n")

        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.unlink(missing_ok=True)
        old = os.umask(0o177)
        try:
            self._server = socketserver.ThreadingUnixStreamServer(str(self.path), Conn)
        finally:
            os.umask(old)
        self._server.daemon_threads = True
        serve_in_background(self._server, "admin")

    def stop(self) -> None:
        if self._server is not None:
            stop_serving(self._server)
            self._server = None
            self.path.unlink(missing_ok=True)


def call(path: Path, cmd: str, timeout: float = 10.0, **args: Any) -> Any:
    """Client side: send one command, return its result or raise RuntimeError."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError):
            raise RuntimeError(
                f"no agent is listening on {path}; is `credless run` running with this config?"
            ) from None
        except PermissionError:
            raise RuntimeError(f"permission denied on {path}: run as root") from None
        s.sendall(json.dumps({"cmd": cmd, **args}).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(1 << 16)
            if not chunk:
                break
            data += chunk
    reply = json.loads(data)
    if "error" in reply:
        raise RuntimeError(reply["error"])
    return reply["ok"]
