"""Writing a placeholder file into a workload's own filesystem, as root, without letting the
workload steer the write anywhere else.

The agent runs as root and the directory belongs to the workload: anything on the path may
have been planted to turn this write into "root overwrites /etc/shadow" (a symlink) or into a
write outside the workload's filesystem. So the path is never handed to the kernel whole:
- the start is the process's own root, opened through /proc/<pid>/root (the kernel's link
  to it, which a process cannot forge), and only while the process is known alive (a pidfd),
  so a reused pid cannot point the write into another process's filesystem;
- each component is opened relative to the previous one with O_NOFOLLOW|O_DIRECTORY: a
  symlink anywhere is refused, never followed; only the last directory may be created, and
  credless's own (root, 0711: the workload reaches its file by name, plants nothing beside
  it, and a refresh needs no right to write in a directory of the workload's);
- the file is made under a random name with O_CREAT|O_EXCL|O_NOFOLLOW (nothing already
  there, of any kind, is opened), mode 0400, chowned, written and fsynced, then renamed over
  the final name within the same directory fd. A rename replaces a directory entry and never
  writes through a link, but a symlink or a non-file at the final name is still refused:
  nothing honest puts one there.

- the process's mount namespace must be owned by the agent's own user namespace. Any
  unprivileged process can make a user and mount namespace of its own (unshare -U -r -m) and
  bind-mount a directory it may only read (the host's /etc) onto its phantom_dir; a walk
  from its root would then create, as root, a file of the workload's in that directory. In
  a namespace owned by the agent's user namespace only a privileged process mounts, and a
  less privileged namespace's mounts never propagate back (mount_namespaces(7)). Refusing
  is the one safe answer: which directory a mount put there cannot be told from here.
  (A Kubernetes pod with user namespaces, hostUsers: false, is refused the same way.)

(openat2's RESOLVE_NO_SYMLINKS|RESOLVE_IN_ROOT would say the same as the walk in one call;
Python's os module does not offer it, and the walk below is what it does.)
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import secrets
import signal
import stat

_DIR = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class Refused(Exception):
    """Something on the path is not what an honest workload puts there (a symlink, a
    directory at the file's name): nothing was written. The message names the component."""


def open_root(proc: str, pid: int, pidfd: int) -> int:
    """An O_PATH fd on the root directory of the process pidfd refers to. ProcessLookupError
    when it has exited (its pid may since name another process)."""
    try:
        procfd = os.open(f"{proc}/{pid}", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ProcessLookupError(pid) from None
    try:
        # alive after /proc/<pid> was opened: the pid was still its own when it was opened
        signal.pidfd_send_signal(pidfd, 0)
        _check_mount_namespace(procfd, pid)
        # the one link followed on purpose: the kernel's, to the process's root
        return os.open("root", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=procfd)
    finally:
        os.close(procfd)


# ioctl(2) on a namespace file: an fd on the user namespace that owns it (ioctl_ns(2))
NS_GET_USERNS = 0xB701


def _check_mount_namespace(procfd: int, pid: int) -> None:
    """Refused unless the process's mount namespace is owned by this process's own user
    namespace: in any other, the workload may have mounted what it likes onto the path."""
    ns = os.open("ns/mnt", os.O_RDONLY | os.O_CLOEXEC, dir_fd=procfd)
    try:
        owner = fcntl.ioctl(ns, NS_GET_USERNS)
    finally:
        os.close(ns)
    try:
        theirs = os.fstat(owner)
    finally:
        os.close(owner)
    ours = os.stat("/proc/self/ns/user")
    if (theirs.st_dev, theirs.st_ino) != (ours.st_dev, ours.st_ino):
        raise Refused(
            f"process {pid} runs in a mount namespace of its own user namespace, where it may "
            "have mounted any directory onto the path; placeholder files are written only "
            "for processes in the node's user namespace (docs/phantom.md)"
        )


def _lstat(name: str, dir_fd: int) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def _kind(name: str, dir_fd: int, wanted: str = "a directory") -> str:
    """What is at name, for a refusal that says what was found instead of `wanted`."""
    st = _lstat(name, dir_fd)
    if st is None:
        return "gone"
    if stat.S_ISLNK(st.st_mode):
        return "a symlink"
    if stat.S_ISDIR(st.st_mode):
        return "a directory"
    return "a regular file" if stat.S_ISREG(st.st_mode) else f"not {wanted}"


def _step(dir_fd: int, name: str, shown: str) -> int:
    try:
        return os.open(name, _DIR, dir_fd=dir_fd)
    except OSError as e:
        if e.errno in (errno.ENOTDIR, errno.ELOOP):
            raise Refused(f"{shown} is {_kind(name, dir_fd)}") from None
        raise


def open_dir(root_fd: int, path: str) -> int:
    """An O_PATH fd on `path` (absolute, plain: checked by the entries schema) under
    root_fd, walked one component at a time; the last is created when missing."""
    parts = path.strip("/").split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise Refused(f"{path!r} is not a plain absolute path")
    cur = os.dup(root_fd)
    try:
        for i, part in enumerate(parts):
            shown = "/" + "/".join(parts[: i + 1])
            try:
                nxt = _step(cur, part, shown)
            except FileNotFoundError:
                if i != len(parts) - 1:
                    raise
                nxt = _make_dir(cur, part, shown)
            os.close(cur)
            cur = nxt
        return cur
    except BaseException:
        os.close(cur)
        raise


def _make_dir(parent: int, name: str, shown: str) -> int:
    with contextlib.suppress(FileExistsError):  # made meanwhile: opened and checked below
        os.mkdir(name, 0o711, dir_fd=parent)
    try:
        fd = os.open(
            name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent
        )
    except OSError as e:
        if e.errno in (errno.ENOTDIR, errno.ELOOP):
            raise Refused(f"{shown} is {_kind(name, parent)}") from None
        raise
    try:
        if os.fstat(fd).st_uid == 0:  # ours, not one the workload made meanwhile
            os.fchmod(fd, 0o711)  # whatever the agent's umask
        return os.open(".", _DIR, dir_fd=fd)
    finally:
        os.close(fd)


def write_file(dir_fd: int, name: str, data: bytes, uid: int, gid: int, shown: str) -> None:
    """data into dir_fd/name, mode 0400, owned by uid:gid, replacing a regular file there."""
    if "/" in name or name in ("", ".", ".."):
        raise Refused(f"{name!r} is not a file name")
    st = _lstat(name, dir_fd)
    if st is not None and not stat.S_ISREG(st.st_mode):
        raise Refused(f"{shown} is {_kind(name, dir_fd, 'a regular file')}")
    tmp = f".{name}.{secrets.token_hex(8)}.tmp"
    flags = os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_WRONLY | os.O_CLOEXEC
    fd = os.open(tmp, flags, 0o400, dir_fd=dir_fd)
    try:
        try:
            os.fchmod(fd, 0o400)  # first: once the file is the workload's, that needs CAP_FOWNER
            made = os.fstat(fd)
            if (made.st_uid, made.st_gid) != (uid, gid):  # a root workload's needs no chown
                try:
                    os.fchown(fd, uid, gid)
                except PermissionError:
                    raise PermissionError(
                        errno.EPERM,
                        f"giving {shown} to uid {uid} needs CAP_CHOWN, which the agent lacks: "
                        "add it to the service's capabilities (docs/phantom.md, a systemd "
                        "drop-in with CapabilityBoundingSet=CAP_CHOWN)",
                    ) from None
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except IsADirectoryError:  # a directory planted since the check above
            raise Refused(f"{shown} is a directory") from None
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dir_fd)
        raise


def write_placeholder(
    proc: str, pid: int, pidfd: int, directory: str, name: str, data: bytes, uid: int, gid: int
) -> str:
    """data into <directory>/<name> as the process sees its filesystem; returns that path.
    Refused for anything planted on the path; OSError for the rest (ProcessLookupError: it
    has exited)."""
    shown = f"{directory}/{name}"
    root = open_root(proc, pid, pidfd)
    try:
        d = open_dir(root, directory)
    finally:
        os.close(root)
    try:
        write_file(d, name, data, uid, gid, shown)
    finally:
        os.close(d)
    return shown
