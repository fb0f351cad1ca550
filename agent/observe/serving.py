"""Run a standard-library socket server on a thread of its own, and stop it at once.

`socketserver.BaseServer.shutdown()` only sets a flag that `serve_forever` reads between two
waits of `poll_interval` (half a second): each of the agent's three such servers (metrics,
bundle endpoint, admin socket) made a stop, and so a restart or a handover, half a second
longer. `stop_serving` wakes the wait instead: a listening socket that is shut down polls as
hung up (Linux, TCP and unix alike) and its accept() fails, which `serve_forever` ignores, so
the loop reads the flag now. The poll interval is left as it is: it is what stops the loop if
the socket cannot be shut down, and it costs nothing while the server waits.
"""

from __future__ import annotations

import contextlib
import socket
import socketserver
import threading


def serve_in_background(
    server: socketserver.BaseServer, name: str, poll_interval: float = 0.5
) -> threading.Thread:
    """serve_forever on a daemon thread named name (a stuck handler cannot hold up exit)."""
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": poll_interval}, name=name, daemon=True
    )
    thread.start()
    return thread


def stop_serving(server: socketserver.BaseServer) -> None:
    """Stop serve_forever on its thread, without waiting for its next poll, and close the
    listening socket. Connections being handled finish on their own threads."""
    flagged = threading.Thread(target=server.shutdown, name="stop-serving", daemon=True)
    flagged.start()  # sets the flag, then waits for the loop to leave
    listener = getattr(server, "socket", None)
    if listener is not None:
        with contextlib.suppress(OSError):  # not connected is fine: the wake-up is the point
            listener.shutdown(socket.SHUT_RDWR)
    flagged.join()
    server.server_close()
