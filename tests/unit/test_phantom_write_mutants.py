"""Writing a placeholder file as root into a workload's filesystem
(agent/inject/phantom_write.py), found by mutation testing: what a refusal says was found and
where, the names and paths refused before anything is opened, the races a workload can run
against the walk (a symlink or a directory planted between a check and the next step, the
temporary file removed under it), the modes nothing else can see in between, the chown that
needs a capability, and a process in a user namespace of its own.

Real files under tmp_path, real /proc and pidfds; the races are played by wrapping the one
os call the workload would race (restored when the test ends)."""

from __future__ import annotations

import errno
import os
import secrets
import stat
import subprocess

import pytest

from agent.inject import phantom_write
from agent.inject.phantom_write import Refused, write_file, write_placeholder

UID, GID = os.geteuid(), os.getegid()


def write(directory, name="weather", data=b"placeholder", pid=None):
    pid = pid or os.getpid()
    pidfd = os.pidfd_open(pid)
    try:
        return write_placeholder("/proc", pid, pidfd, str(directory), name, data, UID, GID)
    finally:
        os.close(pidfd)


@pytest.fixture(autouse=True)
def elsewhere(tmp_path_factory, monkeypatch):
    """The working directory is an empty one of the test's own: a path taken relative to it
    instead of to a directory fd lands there, never beside the files checked (nor in the
    tree the tests run from)."""
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))


@pytest.fixture
def dir_fd(tmp_path):
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    yield fd
    os.close(fd)


def secret(tmp_path):
    """A root file outside the workload's reach that a planted link points at."""
    target = tmp_path / "shadow"
    target.write_bytes(b"root:secret\n")
    os.chmod(target, 0o600)
    return target


# ------------------------------------------------------------ what a refusal says


def test_a_refusal_names_the_component_a_symlink_was_planted_at(tmp_path):
    (tmp_path / "outside").mkdir()
    (tmp_path / "run").symlink_to(tmp_path / "outside")
    with pytest.raises(Refused) as e:
        write(tmp_path / "run" / "deep" / "phantom")
    assert str(e.value) == f"{tmp_path}/run is a symlink"
    assert os.listdir(tmp_path / "outside") == []


def test_a_fifo_on_the_path_is_said_not_to_be_a_directory(tmp_path):
    os.mkfifo(tmp_path / "run")
    with pytest.raises(Refused) as e:
        write(tmp_path / "run" / "phantom")
    assert str(e.value) == f"{tmp_path}/run is not a directory"


def test_a_fifo_at_the_files_name_is_said_not_to_be_a_regular_file(tmp_path):
    (tmp_path / "phantom").mkdir()
    os.mkfifo(tmp_path / "phantom" / "weather")
    with pytest.raises(Refused) as e:
        write(tmp_path / "phantom")
    assert str(e.value) == f"{tmp_path}/phantom/weather is not a regular file"


def test_a_directory_at_the_files_name_is_said_to_be_one(tmp_path):
    (tmp_path / "phantom" / "weather").mkdir(parents=True)
    with pytest.raises(Refused) as e:
        write(tmp_path / "phantom")
    assert str(e.value) == f"{tmp_path}/phantom/weather is a directory"


def test_what_was_found_is_said_even_when_it_went_away_meanwhile(tmp_path, dir_fd):
    assert phantom_write._kind("vanished", dir_fd) == "gone"
    (tmp_path / "d").mkdir()
    assert phantom_write._kind("d", dir_fd) == "a directory"


# ------------------------------------------------------------ names and paths refused first


@pytest.mark.parametrize("path", ["/run//phantom", "/run/./phantom", "/run/../phantom", "/"])
def test_a_path_that_is_not_plain_is_refused_before_any_step(tmp_path, path):
    (tmp_path / "run").mkdir()
    with pytest.raises(Refused) as e:
        write(f"{tmp_path}{path}" if path != "/" else "/")
    assert "is not a plain absolute path" in str(e.value)
    assert os.listdir(tmp_path / "run") == [] and os.listdir(tmp_path) == ["run"]


def test_a_directory_is_found_by_its_exact_name(tmp_path):
    """Only slashes are trimmed from the path, never letters of its first or last name."""
    path = write(tmp_path / "XX")
    assert path == f"{tmp_path}/XX/weather"
    assert (tmp_path / "XX" / "weather").read_bytes() == b"placeholder"


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "../escape"])
def test_a_name_that_is_not_a_file_name_is_refused(tmp_path, dir_fd, name):
    (tmp_path / "a").mkdir()
    with pytest.raises(Refused) as e:
        write_file(dir_fd, name, b"placeholder", UID, GID, "/shown")
    assert str(e.value) == f"{name!r} is not a file name"
    assert sorted(os.listdir(tmp_path)) == ["a"] and os.listdir(tmp_path / "a") == []


# ------------------------------------------------------------ races the workload can run


def test_a_symlink_planted_before_the_directory_is_made_is_refused(tmp_path, monkeypatch):
    """The directory was missing when looked at; the workload plants a symlink to a root
    directory before credless makes it: refused, nothing written there, its mode untouched."""
    target = tmp_path / "etc"
    target.mkdir(mode=0o755)
    real_mkdir = os.mkdir

    def raced(name, mode=0o777, *, dir_fd=None):
        if name == "phantom":
            os.symlink(target, tmp_path / "phantom")
        return real_mkdir(name, mode, dir_fd=dir_fd)

    monkeypatch.setattr(os, "mkdir", raced)
    with pytest.raises(Refused) as e:
        write(tmp_path / "phantom")
    assert str(e.value) == f"{tmp_path}/phantom is a symlink"
    assert os.listdir(target) == [] and stat.S_IMODE(os.stat(target).st_mode) == 0o755


def test_a_directory_the_workload_made_meanwhile_is_used_as_it_is(tmp_path, monkeypatch):
    real_mkdir = os.mkdir

    def raced(name, mode=0o777, *, dir_fd=None):
        if name == "phantom":
            real_mkdir(tmp_path / "phantom", 0o750)
            os.chown(tmp_path / "phantom", 65534, 65534)
        return real_mkdir(name, mode, dir_fd=dir_fd)

    if os.geteuid() != 0:
        pytest.skip("needs root: the workload's directory is another user's")
    monkeypatch.setattr(os, "mkdir", raced)
    write(tmp_path / "phantom")
    st = os.stat(tmp_path / "phantom")
    assert stat.S_IMODE(st.st_mode) == 0o750 and st.st_uid == 65534


@pytest.fixture
def modes_seen(monkeypatch):
    """The mode of each file and directory when credless sets it: what anyone could open
    before that (umask 0: nothing hides a mode asked for)."""
    seen: list[tuple[bool, int]] = []
    real_fchmod = os.fchmod

    def fchmod(fd, mode):
        st = os.fstat(fd)
        seen.append((stat.S_ISDIR(st.st_mode), stat.S_IMODE(st.st_mode)))
        return real_fchmod(fd, mode)

    monkeypatch.setattr(os, "fchmod", fchmod)
    old = os.umask(0)
    yield seen
    os.umask(old)


def test_nothing_is_open_to_others_even_before_its_mode_is_set(tmp_path, modes_seen):
    write(tmp_path / "phantom")
    assert modes_seen == [(True, 0o711), (False, 0o400)]
    assert stat.S_IMODE(os.stat(tmp_path / "phantom").st_mode) == 0o711
    assert stat.S_IMODE(os.stat(tmp_path / "phantom" / "weather").st_mode) == 0o400


def test_the_directory_is_credless_mode_whatever_the_umask(tmp_path):
    old = os.umask(0o077)
    try:
        write(tmp_path / "phantom")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "phantom").st_mode) == 0o711


def test_a_guessed_temporary_name_is_never_written_through(tmp_path, dir_fd, monkeypatch):
    """A workload that guessed the temporary name and planted a symlink there: the write
    fails, the file it points at is untouched."""
    target = secret(tmp_path)
    monkeypatch.setattr(secrets, "token_hex", lambda n=None: "guessed")
    os.symlink(target, tmp_path / ".weather.guessed.tmp")
    with pytest.raises(FileExistsError):
        write_file(dir_fd, "weather", b"placeholder", UID, GID, "/shown")
    assert target.read_bytes() == b"root:secret\n"
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o600
    assert not (tmp_path / "weather").exists()


def test_a_directory_planted_before_the_rename_is_refused_and_nothing_left(
    tmp_path, dir_fd, monkeypatch
):
    real_fsync = os.fsync

    def raced(fd):
        real_fsync(fd)
        os.mkdir(tmp_path / "weather")

    monkeypatch.setattr(os, "fsync", raced)
    with pytest.raises(Refused) as e:
        write_file(dir_fd, "weather", b"placeholder", UID, GID, "/run/phantom/weather")
    assert str(e.value) == "/run/phantom/weather is a directory"
    assert os.listdir(tmp_path) == ["weather"] and os.listdir(tmp_path / "weather") == []


def test_a_temporary_file_removed_under_the_write_fails_it_as_an_error(
    tmp_path, dir_fd, monkeypatch
):
    """The workload owns the directory and removes credless's temporary file before the
    rename: an error (tried again later), not a crash of the clean-up."""
    real_fsync = os.fsync

    def raced(fd):
        real_fsync(fd)
        for name in os.listdir(tmp_path):
            os.unlink(tmp_path / name)

    monkeypatch.setattr(os, "fsync", raced)
    with pytest.raises(FileNotFoundError):
        write_file(dir_fd, "weather", b"placeholder", UID, GID, "/shown")
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------ the chown


def test_a_chown_the_agent_may_not_do_says_which_capability_to_add(tmp_path, monkeypatch):
    def refused(fd, uid, gid):
        raise PermissionError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "fchown", refused)
    other = UID + 1
    with pytest.raises(PermissionError) as e:
        pidfd = os.pidfd_open(os.getpid())
        try:
            write_placeholder(
                "/proc", os.getpid(), pidfd, str(tmp_path / "phantom"), "weather", b"x", other, 1
            )
        finally:
            os.close(pidfd)
    err = e.value
    assert err.errno == errno.EPERM
    message = str(err)
    assert f"giving {tmp_path}/phantom/weather to uid {other} needs CAP_CHOWN" in message
    assert "docs/phantom.md" in message and "CapabilityBoundingSet=CAP_CHOWN" in message
    assert os.listdir(tmp_path / "phantom") == []


# ------------------------------------------------------------ a user namespace of its own


def test_a_process_in_a_user_namespace_of_its_own_gets_nothing_written(tmp_path):
    """The attack: unshare -U -r -m, bind-mount a directory it may only read onto its
    phantom_dir, and let root write there. Refused before any step of the walk."""
    protected = tmp_path / "protected"
    protected.mkdir(mode=0o755)
    (tmp_path / "phantom").mkdir()
    script = f"mount --bind {protected} {tmp_path}/phantom && echo ready && exec sleep 1000"
    try:
        child = subprocess.Popen(
            ["unshare", "-U", "-r", "-m", "sh", "-c", script],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
    except FileNotFoundError:
        pytest.skip("needs unshare (util-linux)")
    try:
        if child.stdout.readline().strip() != "ready":
            pytest.skip("user namespaces are not available here")
        with pytest.raises(Refused) as e:
            write(tmp_path / "phantom", pid=child.pid)
        message = str(e.value)
        assert f"process {child.pid} " in message and "docs/phantom.md" in message
        assert "user namespace" in message
    finally:
        child.kill()
        child.wait()
    assert os.listdir(protected) == [] and os.listdir(tmp_path / "phantom") == []


def test_a_process_that_has_exited_is_named_in_the_error(tmp_path):
    child = subprocess.Popen(["true"])
    pidfd = os.pidfd_open(child.pid)
    child.wait()
    try:
        with pytest.raises(ProcessLookupError) as e:
            write_placeholder(
                "/proc", child.pid, pidfd, str(tmp_path / "p"), "weather", b"x", UID, GID
            )
    finally:
        os.close(pidfd)
    assert e.value.args == (child.pid,)
