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
from collections.abc import Callable
from dataclasses import dataclass

from agent.attest.procfs import status_of

SO_PEERPIDFD = getattr(socket, "SO_PEERPIDFD", 77)  # asm-generic/socket.h

# the privileges that make a process the agent's equal: it cannot run without one of them
# (loading BPF programs), and a container's root has neither unless it is privileged (then
# it is the node's root anyway)
CAP_SYS_ADMIN, CAP_BPF = 21, 39


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


def not_the_agents_equal(pid: int, uid: int, alive: Callable[[], bool]) -> str | None:
    """Why the process pid (running as uid, by SO_PEERCRED or /proc) may not act as the
    agent or command it (the handover and admin sockets, the pid file a restart follows), or
    None when it may: it runs as root *and* holds CAP_SYS_ADMIN or CAP_BPF. uid 0 alone is not
    enough: a container's root is uid 0 to SO_PEERCRED, and a pod that mounts the agent's
    run directory for the Workload API socket can reach these sockets too. The capabilities
    are read while alive() (a pidfd) says the process lives, so they are its own, not a
    reused pid's."""
    if uid != 0:
        return f"pid {pid} runs as uid {uid}, not root"
    st = status_of(pid)
    if st is None or not alive():
        return f"pid {pid} exited"
    if not (st.cap_eff >> CAP_SYS_ADMIN & 1 or st.cap_eff >> CAP_BPF & 1):
        return (
            f"pid {pid} is root without CAP_SYS_ADMIN or CAP_BPF (a container's root, "
            "say): only a process that could run the agent may use this socket"
        )
    return None
