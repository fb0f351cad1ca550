"""Placeholder files end to end (docs/phantom.md, "A placeholder in a file"): the real kernel
attesting a real exec, the agent writing the placeholder into the directory the process's
registration entry names, oidc-provider issuing opaque tokens and the MCP Python SDK on both
sides (the server introspecting every token it is shown).

The workload runs as an unprivileged user (65534, one of its entry's selectors) in a managed
cgroup; it reads the file credless wrote for it and calls the server with `Authorization:
Bearer <placeholder>`: the server sees only the real token. The file's content copied to
another managed process (another identity) is refused as misuse. And a process in the
managed cgroup that plants a symlink where the file goes gets nothing written anywhere: the
file the symlink points at is untouched."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.helpers import audit_events, metric_sum
from tests.kernel import enter_cgroup, start_workload
from tests.mcp.peers import run_client
from tests.phantom_world import only_obtained_tokens_reached_the_server, phantom_world
from tests.world import build_world

HOLDER = "spiffe://example.org/phantom-files/holder"
THIEF = "spiffe://example.org/phantom-files/thief"
NOBODY, ATTACKER = 65534, 65533  # the workload's user; a user matching no entry

# The workload: announces itself, waits for the test to see its file written, reads the
# file and execs the SDK client with it as its bearer token.
WORKLOAD = """
import os, sys
path, url = sys.argv[1], sys.argv[2]
print("ready", flush=True)
sys.stdin.readline()
token = open(path).read()
call = "call:echo:" + '{"text": "hi"}'
os.execv(sys.executable, [sys.executable, "-m", "tests.mcp.client", url, call,
                          "--header", "Authorization: Bearer " + token])
"""

PLANT = "import os, sys; os.symlink(sys.argv[1], sys.argv[2])"


PYTHON = os.path.realpath(sys.executable)  # the exe attested for the workloads


def as_user(uid: int) -> list[str]:
    """A command prefix: run as uid (its own group, no others), keeping only the right to
    read and search directories, since the interpreter lives under root's 0700 home."""
    return [
        "setpriv",
        f"--reuid={uid}",
        f"--regid={uid}",
        "--clear-groups",
        "--inh-caps=+dac_read_search",
        "--ambient-caps=+dac_read_search",
    ]


@contextlib.contextmanager
def shared_dir():
    """A directory under /tmp the unprivileged workload can reach (pytest's tmp_path is
    root's own 0700), removed at the end."""
    base = Path(tempfile.mkdtemp(prefix="credless-phantom-files-", dir="/tmp"))
    try:
        os.chmod(base, 0o755)
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


@contextlib.contextmanager
def killed(proc: subprocess.Popen):
    """proc, killed and reaped at the end whatever happens."""
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=30)


def files_world(tmp_path, w, phantom_dir: Path):
    return phantom_world(
        tmp_path,
        w,
        HOLDER,
        THIEF,
        holder_selectors=[f"unix:uid:{NOBODY}"],
        phantom_dir=str(phantom_dir),
        phantom_misuse="refuse",
    )


def workload_with_file(w, path: Path) -> subprocess.Popen:
    proc = start_workload(
        [*as_user(NOBODY), sys.executable, "-c", WORKLOAD, str(path), w.mcp.url], w.cg
    )
    assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
    return proc


def event_for(w, event: str, pid: int, exe: str | None = None) -> dict:
    """The first audit event of this name for pid (and for its image of exe, if named)."""

    def of(e: dict) -> bool:
        return e["event"] == event and e.get("pid") == pid and exe in (None, e.get("exe"))

    events = audit_events(w.agent.stdout_path, until=lambda evs: any(map(of, evs)))
    return next(filter(of, events))


def files_count(metrics_port: int, outcome: str) -> float:
    return metric_sum(
        metrics_port, "credless_phantom_files_total", server="weather", outcome=outcome
    )


def credentialed(w) -> list[dict]:
    return w.mcp.credentialed()


def test_the_workload_calls_with_its_file_and_a_copy_elsewhere_is_misuse(tmp_path):
    with build_world(tmp_path, HOLDER) as w, shared_dir() as base:
        thief_cg = files_world(tmp_path, w, base / "phantom")
        path = base / "phantom" / "weather"
        workload = w.enter(killed(workload_with_file(w, path)))
        written = event_for(w, "phantom.file_written", workload.pid)
        assert written["spiffe_id"] == HOLDER and written["path"] == str(path)
        st = os.stat(path)
        assert stat.S_IMODE(st.st_mode) == 0o400 and (st.st_uid, st.st_gid) == (NOBODY,) * 2
        d = os.stat(path.parent)  # made by credless: the workload plants nothing in it
        assert stat.S_IMODE(d.st_mode) == 0o711 and d.st_uid == 0
        placeholder = path.read_text()
        # the audit names the placeholder by its jti, never holds it
        assert placeholder not in Path(w.agent.stdout_path).read_text()
        out, err = workload.communicate("go\n", timeout=90)
        lines = [json.loads(ln) for ln in out.splitlines() if ln.startswith("{")]
        assert lines and lines[-1].get("text") == "hi", (out, err[-3000:])
        only_obtained_tokens_reached_the_server(w, placeholder)
        assert files_count(w.metrics_port, "written") >= 1

        # the same content, presented by another managed process (another identity)
        before = len(w.mcp.relayed())
        stolen = run_client(
            w.mcp.url,
            "call:echo:" + json.dumps({"text": "hi"}),
            preexec=enter_cgroup(thief_cg),
            extra=["--header", f"Authorization: Bearer {placeholder}"],
        )[-1]
        assert stolen.get("error") == "MCPError" and stolen.get("code") == -32080, stolen
        assert HOLDER in stolen["message"]
        assert len(w.mcp.relayed()) == before
        misuses = [
            e
            for e in audit_events(w.agent.stdout_path, until="phantom.misuse")
            if e["event"] == "phantom.misuse"
        ]
        assert misuses and all(
            m["spiffe_id"] == THIEF and m["issued_to"] == HOLDER and m["status"] == 403
            for m in misuses
        )
        assert {m["placeholder_jti"] for m in misuses} == {written["placeholder_jti"]}


def test_a_planted_symlink_gets_nothing_written_through_it(tmp_path):
    with build_world(tmp_path, HOLDER) as w, shared_dir() as base:
        # the directory is the workload's to write in: its attacker plants there
        os.chmod(base, 0o777 | stat.S_ISVTX)
        outside = tmp_path / "outside"  # root's, out of the workload's reach
        outside.mkdir()
        secret = outside / "shadow"
        secret.write_bytes(b"root:secret\n")
        os.chmod(secret, 0o600)
        os.chmod(outside, 0o755)
        files_world(tmp_path, w, base / "phantom")
        # a process in the managed cgroup (a user matching no entry: its exec writes
        # nothing, so nothing races the plant) points phantom_dir at root's directory
        r = subprocess.run(
            [*as_user(ATTACKER), sys.executable, "-c", PLANT, str(outside), str(base / "phantom")],
            preexec_fn=enter_cgroup(w.cg),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert r.returncode == 0, r.stderr
        assert os.readlink(base / "phantom") == str(outside)

        workload = w.enter(killed(workload_with_file(w, base / "phantom" / "weather")))
        # the workload's own program: setpriv's image of the same pid may have been attested
        # too, refused the same way, if its enrichment read it after it took the uid
        refused = event_for(w, "phantom.file_refused", workload.pid, PYTHON)
        assert refused["spiffe_id"] == HOLDER and "is a symlink" in refused["reason"]
        assert refused["placeholder_jti"]
        assert sorted(os.listdir(outside)) == ["shadow"]
        assert secret.read_bytes() == b"root:secret\n"
        st = os.stat(secret)
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o600)
        assert os.readlink(base / "phantom") == str(outside)
        audited = [e for e in audit_events(w.agent.stdout_path) if e["event"] == refused["event"]]
        assert {e["pid"] for e in audited} == {workload.pid}
        assert files_count(w.metrics_port, "refused") == len(audited)  # each counted once
        assert files_count(w.metrics_port, "written") == 0
        assert not [
            e for e in audit_events(w.agent.stdout_path) if e["event"] == "phantom.file_written"
        ]
