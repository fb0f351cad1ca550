"""Test helpers: run a real agent process and always clean it up."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path


def stop_process(proc: subprocess.Popen | None, timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL if it does not exit in time; a no-op for a finished process."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url: str, timeout: float = 2.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def audit_events(stdout_path: Path, settle: float = 0.1) -> list[dict]:
    """The agent's audit events on stdout, read once it has had time to write those it holds:
    under load it writes them together, at most audit.flush_ms (5 ms by default) late."""
    time.sleep(settle)
    return [json.loads(ln) for ln in Path(stdout_path).read_text().splitlines()]


def wait_for(predicate, timeout: float = 30.0, interval: float = 0.05, what: str = "condition"):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
            if last:
                return last
        except (OSError, ValueError, KeyError) as e:  # not there yet: keep polling
            last = e
        time.sleep(interval)
    raise TimeoutError(f"timed out waiting for {what} (last: {last!r})")


def write_config(
    tmp: Path, extra: str = "", metrics_port: int | None = None, bundle_port: int | None = None
) -> Path:
    port = metrics_port or free_port()
    cfg = tmp / "credless.toml"
    cfg.write_text(f"""
[agent]
state_dir = "{tmp / "state"}"
run_dir = "{tmp / "run"}"
bpf_pin_dir = "/sys/fs/bpf/credless-test-{tmp.name[-24:]}"
[log]
format = "json"
[metrics]
listen = "127.0.0.1:{port}"
[identity]
entries_file = "{tmp / "entries.toml"}"
[workload_api]
socket = "{tmp / "run" / "agent.sock"}"
[bundle_endpoint]
listen = "127.0.0.1:{bundle_port or free_port()}"
{extra}
""")
    return cfg


class AgentProcess:
    """`credless run` as a child process; stop() sends SIGTERM, kill on context exit."""

    def __init__(self, config: Path, log_dir: Path, args: list[str] = ()):
        self.config = config
        self.stdout_path = log_dir / "agent.stdout"
        self.stderr_path = log_dir / "agent.stderr"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "agent", "run", "--config", str(config), *args],
            stdout=open(self.stdout_path, "wb"),
            stderr=open(self.stderr_path, "wb"),
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )

    def log_events(self) -> list[dict]:
        out = []
        for line in self.stderr_path.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                out.append(json.loads(line))
        return out

    def wait_ready(self, timeout: float = 60.0) -> None:
        def ready():
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"agent exited {self.proc.returncode}: {self.stderr_path.read_text()[-2000:]}"
                )
            return any(e.get("event") == "ready" for e in self.log_events())

        wait_for(ready, timeout, what="agent ready")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        stop_process(self.proc, 30)
        # whatever happened, leave no pinned BPF object behind
        from agent import config

        with contextlib.suppress(Exception):
            pin = Path(config.load(self.config).agent.bpf_pin_dir)
            for f in pin.glob("*"):
                f.unlink()
            pin.rmdir()
