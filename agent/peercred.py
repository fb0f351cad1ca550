"""Who is on the other end of a unix socket: SO_PEERCRED, and a pidfd that pins the process.

SO_PEERCRED names a pid, and pids are reused: between reading it and attesting the pid, the
caller can exit and another process take its pid. SO_PEERPIDFD (Linux 6.5+) returns a pidfd
for the very process that connected; after attesting the pid, checking that the pidfd's
process is still alive (its fdinfo shows a pid, not -1) proves the pid was not reused in
between, because a live process keeps its pid. Where the kernel lacks SO_PEERPIDFD the check
falls back to the attested image being current, which is what SPIRE does.
"""

from __future__ import annotations

import os
import socket
import struct
from dataclasses import dataclass

SO_PEERPIDFD = getattr(socket, "SO_PEERPIDFD", 77)  # asm-generic/socket.h


@dataclass
class PeerCred:
    pid: int
    uid: int
    gid: int
    pidfd: int | None = None

    def alive(self) -> bool:
        """True while the process that connected still exists (always True without a pidfd)."""
        if self.pidfd is None:
            return True
        try:
            with open(f"/proc/self/fdinfo/{self.pidfd}") as f:
                for line in f:
                    if line.startswith("Pid:"):
                        return int(line.split()[1]) == self.pid
        except OSError:
            return False
        return False

    def close(self) -> None:
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None


def peer_cred(sock: socket.socket) -> PeerCred:
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    pidfd = None
    try:
        pidfd = sock.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD)
    except OSError:
        pass  # kernel before 6.5
    return PeerCred(pid, uid, gid, pidfd)
