"""Test helpers: run a real agent process (always cleaned up), wait for what it does (never
for a fixed time), and read what it wrote."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import os
import signal
import socket
import socketserver
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar

from agent.observe.serving import serve_in_background, stop_serving
from tests import zygote
from tests.zygote import ForkedProcess

T = TypeVar("T")


class Stoppable(Protocol):
    """What stop_process needs of a process: a Popen, or a server forked by the zygote."""

    def poll(self) -> int | None: ...
    def send_signal(self, sig: int) -> None: ...
    def wait(self, timeout: float | None = None) -> int | None: ...
    def kill(self) -> None: ...


def run_async(test: Callable[..., Any]) -> Callable[..., Any]:
    """An async test body, run in an event loop of its own (as `@run_async` above it)."""

    @functools.wraps(test)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return asyncio.run(test(*args, **kwargs))

    return wrapper


def stop_process(proc: Stoppable | None, timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL if it does not exit in time; a no-op for a finished process."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


S = TypeVar("S", bound=socketserver.BaseServer)


@contextlib.contextmanager
def serving(server: S, name: str = "test-server", poll_interval: float = 0.5) -> Iterator[S]:
    """server serving on a thread of its own until the block ends, then stopped at once
    and closed (agent/observe/serving.py, as the agent's own servers are)."""
    thread = serve_in_background(server, name, poll_interval)
    try:
        yield server
    finally:
        stop_serving(server)
        thread.join()


def free_port() -> int:
    """A loopback port for a server the test starts, kept from everyone else until then.
    A port merely found free can be handed out again before that server binds it (as the
    source port of any connect() on the host: tests run in parallel): this one is left in
    TIME_WAIT, by a connection to itself closed from its side, so for a minute neither
    bind(0) nor connect() picks it; a server setting SO_REUSEADDR, as the agent's listeners
    and the test peers do, binds it all the same."""
    with socket.socket() as listener:
        # bind(0) never picks a port with another socket on it, even with SO_REUSEADDR
        # (net.ipv4.ip_autobind_reuse = 0); the TIME_WAIT one inherits this flag, without
        # which no server could bind the port either
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)) as client:
            server, _ = listener.accept()
            server.close()  # the side that closes first keeps the port in TIME_WAIT
            client.recv(1)  # the close has reached the client: its FIN answers it
        return port


def accepting(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something accepts connections on host:port (a wait_for() predicate: a
    refused connection is "not yet")."""
    with socket.create_connection((host, port), timeout=1):
        return True


def http_get(url: str, timeout: float = 2.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def run_json_program(
    module: str,
    *args: str,
    timeout: float,
    preexec_fn: Callable[[], object] | None = None,
) -> dict:
    """Run `python -m module args` from the repository root (a test program under tests/,
    in a cgroup when preexec_fn enters one) and return the JSON summary it prints last."""
    r = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=Path(__file__).resolve().parent.parent,
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=preexec_fn,
    )
    lines = r.stdout.splitlines()
    if not lines:
        raise AssertionError(f"{module} printed nothing (exit {r.returncode}): {r.stderr[-2000:]}")
    return json.loads(lines[-1])


def tcp_unread(local_port: int) -> int:
    """Bytes that have arrived on this network namespace's established IPv4 TCP sockets
    bound to local_port and that no process has read yet (/proc/net/tcp): what is waiting
    at a server that is not reading (a stopped one)."""
    with open("/proc/net/tcp") as f:
        rows = [line.split() for line in list(f)[1:]]
    return sum(
        int(cols[4].split(":")[1], 16)
        for cols in rows
        if cols[3] == "01" and int(cols[1].split(":")[1], 16) == local_port
    )


def json_lines(path: Path) -> list:
    """The JSON values of a log file's lines, skipping those that are not JSON (a line being
    written, a traceback)."""
    out = []
    for line in Path(path).read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            out.append(json.loads(line))
    return out


def audit_events(
    stdout_path: Path,
    until: str | Callable[[list[dict]], object] | None = None,
    quiet: float = 0.0,
) -> list[dict]:
    """The agent's audit events (JSON lines on its stdout). It writes them at the end of the
    loop iteration that emitted them (under load at most audit.flush_ms later), which may
    come after the workload has its answer: so a test names what it is waiting for, an
    event (`until="request.injected"`) or a predicate over all of them. A test that claims
    no event comes has nothing to wait for: it reads after `quiet` seconds, the window in
    which one would have come. With neither, the events written so far."""

    def written() -> list[dict]:
        text = Path(stdout_path).read_text()
        return [json.loads(ln) for ln in text[: text.rfind("\n") + 1].splitlines()]

    if until is None:
        time.sleep(quiet)
        return written()
    check = until if callable(until) else lambda events: any(e["event"] == until for e in events)

    def arrived() -> list[dict]:
        events = written()
        return events if check(events) else []

    return wait_for(arrived, what=f"the audit event {until}" if isinstance(until, str) else "")


def wait_for(
    predicate: Callable[[], T], timeout: float = 30.0, interval: float = 0.05, what: str = ""
) -> T:
    """The first true value of predicate(), polled until timeout: the one way the tests
    wait for something that gives no signal of its own. An OSError, ValueError or KeyError
    from predicate() means "not yet" (a file not written yet, a half-written line)."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
            last = value
        except (OSError, ValueError, KeyError) as e:
            last = e
        time.sleep(interval)
    raise TimeoutError(f"timed out waiting for {what or 'a condition'} (last: {last!r})")


def write_config(
    tmp: Path,
    extra: str = "",
    metrics_port: int | None = None,
    bundle_port: int | None = None,
    workload_api_socket: Path | None = None,
) -> Path:
    """credless.toml for an agent whose every file is under tmp (its pins under a name
    made from tmp's), listening on free loopback ports; extra: more TOML at the end."""
    port = metrics_port or free_port()
    # bpffs is the host's: the same test in another worker or suite has a tmp of this name
    unique = hashlib.sha256(str(tmp.resolve()).encode()).hexdigest()[:8]
    cfg = tmp / "credless.toml"
    cfg.write_text(f"""
[agent]
state_dir = "{tmp / "state"}"
run_dir = "{tmp / "run"}"
bpf_pin_dir = "/sys/fs/bpf/credless-test-{tmp.name[-16:]}-{unique}"
[log]
format = "json"
[metrics]
listen = "127.0.0.1:{port}"
[identity]
entries_file = "{tmp / "entries.toml"}"
[workload_api]
socket = "{workload_api_socket or tmp / "run" / "agent.sock"}"
[bundle_endpoint]
listen = "127.0.0.1:{bundle_port or free_port()}"
{extra}
""")
    return cfg


class AgentProcess:
    """`credless run` as a process of its own; stop() sends SIGTERM, kill on context exit.

    Forked from the worker's agent zygote (tests/zygote.py says why, and what differs from
    an exec), or exec'd as `python -m agent` with CREDLESS_TEST_AGENT_EXEC=1."""

    def __init__(self, config: Path, log_dir: Path, args: Sequence[str] = ()):
        self.config = config
        self.stdout_path = log_dir / "agent.stdout"
        self.stderr_path = log_dir / "agent.stderr"
        argv = ["run", "--config", str(config), *args]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc: subprocess.Popen[bytes] | ForkedProcess
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            if os.environ.get("CREDLESS_TEST_AGENT_EXEC") == "1":
                self.proc = subprocess.Popen(
                    [sys.executable, "-m", "agent", *argv], stdout=out, stderr=err, env=env
                )
            else:
                self.proc = zygote.spawn_agent(argv, Path.cwd(), out.fileno(), err.fileno(), env)

    @property
    def parent_pid(self) -> int:
        """The agent's parent: this process, or the zygote that forked it."""
        return self.proc.parent if isinstance(self.proc, ForkedProcess) else os.getpid()

    def log_events(self) -> list[dict]:
        return json_lines(self.stderr_path)

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


def metric_samples(metrics_port: int, name: str) -> list:
    """The samples of `name` (a sample name, e.g. credless_x_total) on the agent's metrics
    endpoint, read once."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    return [
        s
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name
    ]


def metric_sum(metrics_port: int, name: str, **labels: str) -> float:
    """The sum of the samples of `name` whose labels include these."""
    return sum(
        s.value for s in metric_samples(metrics_port, name) if labels.items() <= s.labels.items()
    )
