"""The systemd unit verifies cleanly, agrees with the agent, reaches the exposure score the
README states, and really runs the agent in its sandbox (a private systemd)."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from agent import config
from tests.conftest import REPO
from tests.helpers import free_port, wait_for

UNIT = REPO / "deploy" / "systemd" / "credless.service"
VENV_BIN = Path(sys.executable).parent


# ------------------------------------------------------------------------- systemd
def _unit_values(section: str, key: str) -> list[str]:
    """Every value of `key` in `[section]` of the unit, in order (keys repeat in units)."""
    current, values = None, []
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = line.strip("[]")
        elif current == section and line.split("=", 1)[0] == key:
            values.append(line.split("=", 1)[1])
    return values


def _restart_command() -> str:
    """`credless restart` (the unit's ExecReload), or the same as `python -m agent.restart`
    while agent/cli.py does not have the subcommand yet."""
    from agent.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    if "restart" in sub.choices:  # type: ignore[operator]
        return f"{VENV_BIN / 'credless'} restart"
    return f"{sys.executable} -m agent.restart"


def _unit_with_local_binary(tmp_path: Path) -> Path:
    # verify checks that ExecStart's binary exists: point it at this venv's console script
    unit = tmp_path / "credless.service"
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/credless", str(VENV_BIN / "credless")))
    return unit


def test_systemd_unit_verifies_without_any_warning(tmp_path):
    r = subprocess.run(
        ["systemd-analyze", "verify", str(_unit_with_local_binary(tmp_path))],
        capture_output=True,
        text=True,
    )
    # systemd-analyze verify exits 0 on warnings too: any output at all is a failure
    assert r.returncode == 0 and (r.stdout + r.stderr).strip() == "", r.stdout + r.stderr


def test_systemd_exposure_score_is_what_the_readme_says(tmp_path):
    unit = tmp_path / "credless.service"
    shutil.copy(UNIT, unit)
    r = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", str(unit)], capture_output=True, text=True
    )
    score = re.search(r"Overall exposure level for credless.service: ([\d.]+)", r.stdout)
    assert score, r.stdout[-2000:] + r.stderr
    readme = (REPO / "deploy/systemd/README.md").read_text()
    documented = re.search(r"exposure ([\d.]+)", readme)
    assert documented, "deploy/systemd/README.md must state the exposure score"
    # a looser unit must be a deliberate, documented change
    assert score.group(1) == documented.group(1), (
        f"systemd-analyze says {score.group(1)}, the README says {documented.group(1)}"
    )


def test_systemd_unit_agrees_with_the_agent():
    """Paths the sandbox makes writable are the agent's defaults; notify and watchdog are
    implemented by the daemon."""
    defaults = config.AgentSection()
    exec_start = _unit_values("Service", "ExecStart")
    assert exec_start == [f"/usr/local/bin/credless run --config {config.DEFAULT_CONFIG_PATH}"]
    assert _unit_values("Service", "StateDirectory") == [Path(defaults.state_dir).name]
    assert defaults.state_dir == "/var/lib/credless"
    assert _unit_values("Service", "RuntimeDirectory") == [Path(defaults.run_dir).name]
    assert defaults.run_dir == "/run/credless"
    assert config.WorkloadApiSection().socket.startswith(defaults.run_dir + "/")
    pin = defaults.bpf_pin_dir
    assert _unit_values("Service", "ReadWritePaths") == [f"-{pin}"]
    assert any(
        v.endswith(f"mkdir -p -m 0700 {pin}") for v in _unit_values("Service", "ExecStartPre")
    )
    assert _unit_values("Service", "Type") == ["notify"]
    assert _unit_values("Service", "WatchdogSec") == ["30"]
    daemon = (REPO / "agent" / "daemon.py").read_text()
    assert "READY=1" in daemon and "WATCHDOG=1" in daemon and "WATCHDOG_USEC" in daemon
    assert set(_unit_values("Service", "CapabilityBoundingSet")[0].split()) == {
        "CAP_BPF",
        "CAP_PERFMON",
        "CAP_NET_ADMIN",
        "CAP_SYS_ADMIN",
        "CAP_SYS_PTRACE",
        "CAP_DAC_READ_SEARCH",
    }


# The unit's sandbox is only credible if the agent really runs in it: boot a private systemd
# (PID 1 of new pid/mount/uts/ipc namespaces, confined to a child cgroup) that knows nothing
# but this unit, and start the agent through it. A drop-in changes only paths (binary, config,
# directories, output) and the watchdog's interval (WATCHDOG_SECONDS: its pings are seen
# within seconds, not the shipped half minute), never a hardening setting.
WATCHDOG_SECONDS = 10


@pytest.mark.kernel
@pytest.mark.timeout(240)
def test_systemd_sandbox_runs_the_agent(tmp_path):
    sandbox = _SystemdSandbox(tmp_path)
    try:
        sandbox.boot()
        sandbox.ctl("start", "credless.service", check=False)
        state = sandbox.wait_active()
        out = sandbox.agent_output()
        assert state == "active", f"credless.service is {state}:\n{sandbox.journal()}\n{out}"
        ready = sandbox.curl("/readyz")
        assert "ok attest" in ready and "ok redirect" in ready, ready
        # the sandbox is really applied (not silently ignored)
        status = sandbox.main_status()
        assert re.search(r"^NoNewPrivs:\s+1$", status, re.M), status
        assert re.search(r"^Seccomp:\s+2$", status, re.M), status
        assert re.search(r"^CapEff:\s+000000c000281004$", status, re.M), status
        # the ring buffer callback runs under MemoryDenyWriteExecute: events are counted
        sandbox.nsexec(["/bin/true"])
        exec_counted = re.compile(r'^credless_attest_events_total\{type="exec"\} [1-9]', re.M)
        with contextlib.suppress(TimeoutError):  # counted by the ring buffer callback
            wait_for(lambda: exec_counted.search(sandbox.curl("/metrics")), 10)
        assert exec_counted.search(sandbox.curl("/metrics"))
        # `systemctl reload` is a handover (docs/restart.md): a new agent, started by
        # ExecReload, becomes the main process (MAINPID=, NotifyAccess=all) and the old one
        # drains and exits
        old_pid = sandbox.prop("MainPID")
        sandbox.ctl("reload", "credless.service")
        new_pid = sandbox.prop("MainPID")
        assert new_pid not in ("0", old_pid), sandbox.journal() + sandbox.agent_output()
        assert sandbox.prop("ActiveState") == "active", sandbox.journal()
        ready = sandbox.curl("/readyz")
        assert "ok attest" in ready and "ok redirect" in ready, ready
        # the new agent pings the watchdog: systemd's record of its last ping moves on for
        # longer than WatchdogSec (10 s in the drop-in), and it has not restarted the agent,
        # which it would have on a missed deadline
        pings = [int(sandbox.prop("WatchdogTimestampMonotonic") or 0)]

        def pinged_past_the_deadline() -> bool:
            last = int(sandbox.prop("WatchdogTimestampMonotonic") or 0)
            if last != pings[-1]:
                pings.append(last)
            return pings[0] > 0 and pings[-1] - pings[0] > WATCHDOG_SECONDS * 1_000_000

        wait_for(
            pinged_past_the_deadline, 4 * WATCHDOG_SECONDS, interval=0.5, what="watchdog pings"
        )
        assert sandbox.prop("NRestarts") == "0" and sandbox.prop("ActiveState") == "active", (
            sandbox.journal()
        )
        assert sandbox.prop("MainPID") == new_pid
        assert sandbox.nsexec(["test", "-e", f"/proc/{old_pid}"], check=False).returncode, (
            "the old agent drained and exited"
        )
        sandbox.ctl("stop", "credless.service")
        assert sandbox.prop("Result") == "success", (
            sandbox.journal()
            + sandbox.ctl("status", "credless.service", check=False).stdout
            + sandbox.prop("ExecMainStatus")
            + sandbox.agent_output()[-1500:]
        )
        # nothing the sandbox refused (the agent's own bugs are other tests' business)
        refused = [
            line
            for line in out.splitlines()
            if re.search(
                r"Operation not permitted|Permission denied|Read-only file system|EPERM|EACCES|"
                r"EROFS|Bad system call|No such file or directory: '/(proc|sys|dev|lib|usr)/",
                line,
            )
        ]
        assert not refused, "\n".join(refused)
    finally:
        sandbox.teardown()


class _SystemdSandbox:
    def __init__(self, tmp_path: Path):
        self.id = uuid.uuid4().hex[:8]
        self.tmp = tmp_path
        # outside /tmp: PrivateTmp= hides the test's tmp_path from the service
        self.conf = Path(f"/var/lib/credless-sdtest-{self.id}-conf")
        self.pin = f"/sys/fs/bpf/credless-sdtest-{self.id}"
        self.managed = f"/credless-sdtest-{self.id}"
        self.metrics, self.bundle, self.listen, self.tls = (free_port() for _ in range(4))
        self.proc: subprocess.Popen | None = None
        self.pid1: int | None = None
        self.cgroups: list[Path] = []

    # -------------------------------------------------------------- set-up
    def boot(self) -> None:
        if shutil.which("unshare") is None or not Path("/lib/systemd/systemd").exists():
            pytest.fail("needs util-linux unshare and systemd (make setup installs systemd)")
        from agent.attest.cgroupfs import cgroup2_root

        root = cgroup2_root("")
        assert root, "no cgroup v2 mount (credless doctor)"
        self.cg_root = root
        Path(root, self.managed.lstrip("/")).mkdir()
        self.conf.mkdir(mode=0o700)
        (self.conf / "entries.toml").write_text("")
        (self.conf / "credless.toml").write_text(f"""
[agent]
state_dir = "/var/lib/credless-sdtest-{self.id}"
bpf_pin_dir = "{self.pin}"
[log]
format = "json"
[metrics]
listen = "127.0.0.1:{self.metrics}"
[bundle_endpoint]
listen = "127.0.0.1:{self.bundle}"
[identity]
entries_file = "{self.conf}/entries.toml"
[inject]
listen_port = {self.listen}
listen_port6 = {self.listen}
tls_listen_port = {self.tls}
managed_cgroups = ["{self.managed}"]
[[servers]]
name = "loopback"
url = "http://127.0.0.1:9/mcp"
""")
        units = self.tmp / "units"
        (units / "credless.service.d").mkdir(parents=True)
        shutil.copy(UNIT, units / "credless.service")
        for t in (
            "sysinit",
            "basic",
            "shutdown",
            "network",
            "multi-user",
            "local-fs",
            "sockets",
            "timers",
            "paths",
            "slices",
            "umount",
            "swap",
        ):
            (units / f"{t}.target").write_text("[Unit]\nDefaultDependencies=no\n")
        (units / "system.slice").write_text("[Unit]\nDefaultDependencies=no\n")
        for u in (
            "systemd-journald.service",
            "systemd-journald.socket",
            "systemd-journald-dev-log.socket",
        ):
            shutil.copy(Path("/lib/systemd/system") / u, units / u)
        # journald's IP firewall (IPAddressDeny=any) went to the host's own
        # system.slice/systemd-journald.service cgroup, outside this test's cgroups, and its
        # two BPF programs stayed attached there after each run: none here
        (units / "systemd-journald.service.d").mkdir()
        (units / "systemd-journald.service.d" / "test.conf").write_text(
            "[Service]\nIPAddressDeny=\n"
        )
        # The unit hides /tmp (PrivateTmp=) and home directories (ProtectHome=); a checkout
        # or an interpreter there is bound in read-only, and nothing else of them is visible
        # (ProtectHome=tmpfs keeps home directories empty rather than unreachable).
        python_home = Path(os.path.realpath(sys.executable)).parents[1]
        hidden = ("/tmp/", "/var/tmp/", "/root/", "/home/")
        binds = [p for p in (python_home, REPO.resolve()) if str(p).startswith(hidden)]
        home_binds = "".join(f"BindReadOnlyPaths={p}\n" for p in binds)
        if any(str(p).startswith(("/root/", "/home/")) for p in binds):
            home_binds = "ProtectHome=tmpfs\n" + home_binds
        (units / "credless.service.d" / "test.conf").write_text(f"""[Service]
ExecStart=
ExecStart={VENV_BIN / "credless"} run --config {self.conf / "credless.toml"}
ExecReload=
ExecReload={_restart_command()} --config {self.conf / "credless.toml"}
ExecStartPre=
ExecStartPre=+/bin/mkdir -p -m 0700 {self.pin}
ReadWritePaths=
ReadWritePaths=-{self.pin}
StateDirectory=
StateDirectory=credless-sdtest-{self.id}
LogsDirectory=
ConfigurationDirectory=
WatchdogSec={WATCHDOG_SECONDS}
StandardOutput=append:/run/credless-test.out
StandardError=append:/run/credless-test.out
{home_binds}""")
        empty = self.tmp / "empty"
        empty.mkdir()
        inner = (
            f"mount -t tmpfs -o mode=755 tmpfs /run && "
            f"mount --bind {units} /etc/systemd/system && "
            f"mount --bind {empty} /usr/lib/systemd/system && "
            f"mount --bind {empty} /usr/lib/systemd/system-generators && "
            f"hostname credless-sdtest && "
            f"exec env container=credless-test /lib/systemd/systemd --system "
            f"--unit=basic.target --log-target=console"
        )
        self._make_child_cgroups()
        join = "".join(f"echo $$ > {cg}/cgroup.procs 2>/dev/null; " for cg in self.cgroups)
        self.proc = subprocess.Popen(
            [
                "sh",
                "-c",
                join + 'exec "$@"',
                "sh",
                "unshare",
                "--pid",
                "--mount",
                "--uts",
                "--ipc",
                "--fork",
                "--mount-proc",
                "--propagation",
                "private",
                "sh",
                "-c",
                inner,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )

        def up() -> bool:
            self.pid1 = _child_named(self.proc.pid, "systemd")
            if not self.pid1:
                return False
            state = self.nsexec(["systemctl", "is-system-running"], check=False)
            return state.stdout.strip() in ("running", "degraded", "starting", "initializing")

        try:
            wait_for(up, 30, interval=0.3, what="the private systemd")
        except TimeoutError:
            pytest.fail("the private systemd did not come up")
        self.ctl("start", "systemd-journald.service", check=False)

    def _make_child_cgroups(self) -> None:
        """A child of this process's cgroup in every hierarchy: the private systemd creates
        its cgroups there and nowhere else."""
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, ctrl, path = line.split(":", 2)
            if ctrl == "":
                base = (
                    Path("/sys/fs/cgroup/unified")
                    if Path("/sys/fs/cgroup/unified/cgroup.procs").exists()
                    else Path("/sys/fs/cgroup")
                )
            else:
                base = Path("/sys/fs/cgroup", ctrl.replace("name=", ""))
            cg = base / path.lstrip("/") / f"credless-sdtest-{self.id}"
            if ctrl == "cpuset" or not base.is_dir():
                continue  # a cpuset child needs cpus/mems first: stay in the current one
            try:
                cg.mkdir()
                self.cgroups.append(cg)
            except OSError:
                pass

    # -------------------------------------------------------------- helpers
    def nsexec(self, argv: list[str], check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["nsenter", "-t", str(self.pid1), "-m", "-p", "-u", "-i", *argv],
            capture_output=True,
            text=True,
            check=check,
            timeout=60,
        )

    def ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return self.nsexec(["systemctl", *args], check=check)

    def prop(self, name: str) -> str:
        return self.ctl("show", "-p", name, "--value", "credless.service").stdout.strip()

    def wait_active(self) -> str:
        """The unit's state once it is no longer starting (or whatever it is after 150 s)."""
        with contextlib.suppress(TimeoutError):
            return wait_for(
                lambda: (s := self.prop("ActiveState")) not in ("activating", "reloading") and s,
                150,
                interval=0.5,
            )
        return self.prop("ActiveState")

    def main_status(self) -> str:
        pid = self.prop("MainPID")
        return self.nsexec(["cat", f"/proc/{pid}/status"]).stdout

    def curl(self, path: str) -> str:
        import urllib.request

        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics}{path}", timeout=5) as r:
                return r.read().decode()
        except Exception as e:  # noqa: BLE001 - the message is the assertion's context
            return f"{path}: {e}"

    def agent_output(self) -> str:
        return self.nsexec(["cat", "/run/credless-test.out"], check=False).stdout

    def journal(self) -> str:
        r = self.nsexec(
            ["journalctl", "--no-pager", "-o", "cat", "-u", "credless.service", "-n", "40"],
            check=False,
        )
        return r.stdout + r.stderr

    # -------------------------------------------------------------- clean-up
    def teardown(self) -> None:
        if self.pid1:
            self.ctl("stop", "credless.service", check=False)
            os.kill(self.pid1, signal.SIGKILL)  # PID 1 of its namespace: takes all with it
        if self.proc:
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
        for cg in self.cgroups:
            for d in sorted(cg.rglob("*"), key=lambda p: -len(p.parts)):
                if d.is_dir():
                    # busy until the killed processes in it are gone
                    with contextlib.suppress(TimeoutError):
                        wait_for(lambda d=d: _removed(d), 5, interval=0.1)
            with contextlib.suppress(OSError):
                cg.rmdir()
        shutil.rmtree(self.conf, ignore_errors=True)
        shutil.rmtree(f"/var/lib/credless-sdtest-{self.id}", ignore_errors=True)
        shutil.rmtree(self.pin, ignore_errors=True)
        if getattr(self, "cg_root", None):
            with contextlib.suppress(OSError):
                Path(self.cg_root, self.managed.lstrip("/")).rmdir()


def _removed(d: Path) -> bool:
    with contextlib.suppress(FileNotFoundError):
        d.rmdir()
    return True


def _child_named(ppid: int, comm: str) -> int | None:
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        name = text[text.index("(") + 1 : text.rindex(")")]
        if name == comm and int(text[text.rindex(")") + 2 :].split()[1]) == ppid:
            return int(stat.parent.name)
    return None
