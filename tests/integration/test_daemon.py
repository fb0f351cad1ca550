"""The agent process: start-up, the metrics endpoint, and a clean stop."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
from pathlib import Path

import pytest

from agent import config
from tests.helpers import AgentProcess, free_port, http_get, wait_for, write_config
from tests.kernel import bpf_program_ids, programs_held_by, programs_left_behind

pytestmark = pytest.mark.kernel  # the agent loads its BPF programs at start


@pytest.fixture
def agent(tmp_path):
    port = free_port()
    cfg = write_config(tmp_path, metrics_port=port)
    with AgentProcess(cfg, tmp_path) as a:
        a.port = port
        a.wait_ready()
        yield a


def _credless(
    credless_cmd: list[str], *args: str, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*credless_cmd, *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_starts_serves_and_stops_cleanly(tmp_path, sig):
    before = bpf_program_ids()
    port = free_port()
    cfg = write_config(tmp_path, metrics_port=port)
    with AgentProcess(cfg, tmp_path) as a:
        a.wait_ready()
        pidfile = tmp_path / "run" / "credless.pid"
        assert pidfile.read_text().strip() == str(a.proc.pid)
        its_programs = programs_held_by({a.proc.pid})
        assert its_programs  # the process events' tracepoints, at least
        assert a.stop(sig) == 0
    assert not pidfile.exists()
    events = [e["event"] for e in a.log_events()]
    assert events[-2:] == ["stopping", "stopped"]
    # every program it loaded goes: a raw tracepoint's link frees its program an RCU grace
    # period after its fd closes (bpf_link's deferred dealloc), so not always by the time
    # the exit is seen; a program the agent leaked would stay, and time this out
    wait_for(lambda: not its_programs & bpf_program_ids(), 10, what="the agent's programs gone")
    assert programs_left_behind(before, config.load(cfg).agent.bpf_pin_dir) == set()
    with pytest.raises(OSError):  # the listener is gone
        http_get(f"http://127.0.0.1:{port}/healthz", timeout=1)


def test_components_start_in_order_of_dependence(agent):
    """Attestation first (everything asks it), operator surfaces last (agent/wiring.py);
    with no [[servers]] there is no policy, redirect or proxy."""
    [ready] = [e for e in agent.log_events() if e.get("event") == "ready"]
    assert ready["components"] == [
        "attest",
        "identity",
        "workload_api",
        "bundle_endpoint",
        "oauth",
        "admin",
        "metrics",
        "handover",  # last: a new agent takes over from one that serves (agent/handover.py)
    ]


def test_metrics_endpoint_passes_promtool(agent):
    status, body = http_get(f"http://127.0.0.1:{agent.port}/metrics")
    assert status == 200
    assert 'credless_build_info{python="' in body and 'version="' in body
    assert "process_cpu_seconds_total" in body
    lint = subprocess.run(
        [shutil.which("promtool") or "promtool", "check", "metrics"],
        input=body,
        capture_output=True,
        text=True,
    )
    assert lint.returncode == 0, lint.stdout + lint.stderr
    assert lint.stdout.strip() == "" and lint.stderr.strip() == ""


def test_health_and_unknown_paths(agent):
    assert http_get(f"http://127.0.0.1:{agent.port}/healthz") == (200, "ok\n")
    status, body = http_get(f"http://127.0.0.1:{agent.port}/readyz")
    assert status == 200
    status, body = http_get(f"http://127.0.0.1:{agent.port}/nope")
    assert status == 404 and body == "not found; this endpoint serves /healthz, /metrics, /readyz\n"


def test_second_agent_on_same_run_dir_refuses(agent, tmp_path):
    other = tmp_path / "second"
    other.mkdir()
    cfg = write_config(tmp_path, metrics_port=free_port())  # same run_dir as the first
    with AgentProcess(cfg, other) as b:
        assert b.proc.wait(30) == 1
    errors = [e for e in b.log_events() if e.get("event") == "start-up failed"]
    assert errors and f"another credless agent (pid {agent.proc.pid})" in errors[0]["error"]
    assert (tmp_path / "run" / "credless.pid").read_text().strip() == str(agent.proc.pid)


def test_busy_metrics_port_fails_startup_with_a_fix(tmp_path, agent):
    other = tmp_path / "b"
    other.mkdir()
    cfg = write_config(other, metrics_port=agent.port)
    with AgentProcess(cfg, other) as b:
        assert b.proc.wait(30) == 1
    errors = [e for e in b.log_events() if e.get("event") == "start-up failed"]
    assert errors and errors[0]["error"] == (
        f"metrics.listen 127.0.0.1:{agent.port}: Address already in use; choose a free "
        "port or set metrics.enabled = false"
    )
    assert not (other / "run" / "credless.pid").exists()


def test_kubelet_url_naming_an_unset_variable_fails_startup_with_a_fix(tmp_path):
    cfg = write_config(
        tmp_path,
        extra="""
[attest.kubelet]
enabled = true
url = "https://${CREDLESS_TEST_UNSET_NODE_IP}:10250"
""",
    )
    env_before = os.environ.pop("CREDLESS_TEST_UNSET_NODE_IP", None)
    try:
        with AgentProcess(cfg, tmp_path) as a:
            assert a.proc.wait(30) == 1
    finally:
        if env_before is not None:
            os.environ["CREDLESS_TEST_UNSET_NODE_IP"] = env_before
    errors = [e for e in a.log_events() if e.get("event") == "start-up failed"]
    assert errors and "${CREDLESS_TEST_UNSET_NODE_IP}, which is not set" in errors[0]["error"]
    assert "Traceback" not in a.stderr_path.read_text()


def test_bad_config_exits_2_without_traceback(tmp_path, credless_cmd):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[log]\nlevel = "loud"\n')
    r = _credless(credless_cmd, "run", "--config", str(cfg), timeout=60)
    assert r.returncode == 2
    assert r.stderr == (
        f'credless: config error\n{cfg}: log.level: got "loud", expected one '
        "of: debug, info, warning, error\n"
    )


def test_ps_lists_processes_with_selectors(agent, credless_cmd):
    r = _credless(
        credless_cmd, "ps", "--config", str(agent.config), "--json", "--pid", str(agent.proc.pid)
    )
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert len(rows) == 1 and rows[0]["pid"] == agent.proc.pid
    assert rows[0]["ppid"] == agent.parent_pid
    assert "unix:uid:0" in rows[0]["selectors"]
    assert any(s.startswith("unix:sha256:") for s in rows[0]["selectors"])
    sock = agent.config.parent / "run" / "admin.sock"
    assert oct(sock.stat().st_mode & 0o777) == "0o600"


def test_ps_without_agent_says_what_to_do(tmp_path, credless_cmd):
    cfg = write_config(tmp_path)
    r = _credless(credless_cmd, "ps", "--config", str(cfg))
    assert r.returncode == 1
    assert r.stderr == (
        f"credless: no agent is listening on {tmp_path / 'run' / 'admin.sock'}; "
        "is `credless run` running with this config?\n"
    )


def test_bundle_endpoint_serves_the_spiffe_bundle(agent):
    from agent import config

    listen = config.load(agent.config).bundle_endpoint.listen
    status, body = http_get(f"http://{listen}/")
    doc = json.loads(body)
    assert status == 200 and doc["spiffe_sequence"] > 0 and doc["spiffe_refresh_hint"] > 0
    uses = sorted(k["use"] for k in doc["keys"])
    assert uses == ["jwt-svid", "x509-svid"]
    status, body = http_get(f"http://{listen}/jwks.json")
    jwks = json.loads(body)
    assert status == 200 and "spiffe_sequence" not in jwks
    assert [k["kid"] for k in jwks["keys"]] == [k["kid"] for k in doc["keys"] if "kid" in k]
    assert {(k["use"], k["alg"]) for k in jwks["keys"]} == {("sig", "ES256")}


def test_the_handover_socket_is_root_only_and_serves_one_handover_at_a_time(agent, tmp_path):
    """agent/handover.py: the running agent hands its pid file over (and with it the
    lock) to one new agent at a time; a new agent that goes away before `takeover` leaves
    it serving, and the next may try again."""
    from agent.handover import HandoverClient, HandoverError

    path = tmp_path / "run" / "handover.sock"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    pidfile = tmp_path / "run" / "credless.pid"
    first = HandoverClient(path)
    try:
        fd, inherited, tokens = first.offer()
        try:
            assert os.fstat(fd).st_ino == pidfile.stat().st_ino
            assert first.old_pid == agent.proc.pid
            assert inherited.main == [] and tokens == {"tokens": [], "dpop_keys": {}}
        finally:
            os.close(fd)
            inherited.close()
        second = HandoverClient(path)
        try:
            with pytest.raises(HandoverError, match="under way"):
                second.offer()
        finally:
            second.close()
    finally:
        first.close()  # gone before `takeover`: the running agent keeps serving
    wait_for(
        lambda: any(
            e.get("event") == "handover aborted: this agent keeps serving"
            for e in agent.log_events()
        ),
        30,
    )
    assert agent.proc.poll() is None
    assert pidfile.read_text().strip() == str(agent.proc.pid)
    assert http_get(f"http://127.0.0.1:{agent.port}/healthz")[0] == 200
    again = HandoverClient(path)
    try:
        fd, inherited, _ = again.offer()
        os.close(fd)
        inherited.close()
    finally:
        again.close()


def test_a_pid_file_descriptor_of_another_file_is_not_adopted(tmp_path):
    from agent.daemon import PidFile, StartupError

    mine = PidFile(tmp_path / "a.pid")
    mine.path.write_text("1\n")
    other = os.open(tmp_path / "b.pid", os.O_RDWR | os.O_CREAT, 0o644)
    with pytest.raises(StartupError, match="is not"):
        mine.adopt(other)


def test_restart_replaces_an_agent_without_a_handover_socket(agent, tmp_path):
    """An agent from before handovers (no handover.sock) is stopped and then replaced, as a
    restart does: `credless restart` and a DaemonSet's first rollout to a version with
    handovers never stall on it."""
    import sys

    (tmp_path / "run" / "handover.sock").unlink()
    log = tmp_path / "new-agent.log"
    with open(log, "wb") as out:
        r = subprocess.run(
            [sys.executable, "-m", "agent.restart", "--config", str(agent.config)],
            stdout=out,
            stderr=out,
            timeout=180,
        )
    assert r.returncode == 0, log.read_text()[-3000:]
    assert agent.proc.wait(60) == 0
    new = int((tmp_path / "run" / "credless.pid").read_text().split()[0])
    try:
        assert new != agent.proc.pid
        assert "no handover socket" in log.read_text()
        assert http_get(f"http://127.0.0.1:{agent.port}/healthz")[0] == 200
    finally:
        os.kill(new, signal.SIGTERM)
        wait_for(lambda: not Path(f"/proc/{new}").exists(), 60)
