"""bench-restart: requests/s and failed requests through a handover (`credless restart`,
docs/restart.md), next to the same load with no restart, in one run.

The load is bench-inject's (tests/bench/bench_inject.py): nginx (one worker, CPU 0) answering
a fixed JSON-RPC result, wrk (1 thread, CPU 0) POSTing a tools/call body on 16 keep-alive
connections from inside a managed cgroup, through the agent in broker mode with a real token
from oidc-provider (the agent on CPU 1). Beside wrk, a client on a new connection per request
(FRESH_CLIENT, also managed): wrk's connections stay on the agent that accepted them, so this
one is what moves to the new agent. Each run lasts BENCH_RESTART_SECONDS (default 30); in the
second, `credless restart` starts 2 s in (the new agent compiles its BPF programs on any
core, and is moved to CPU 1 once it serves).

Failed requests: wrk's socket errors (connect, read, write, timeout) and non-2xx answers,
plus the fresh client's failures. Prints:
  restart-bench: steady_rps=… steady_failed=… handover_rps=… handover_failed=…
  steady_fresh_rps=… handover_fresh_rps=… handover_seconds=… new_agent_requests=…
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.bench.bench_inject import BODY, RESULT, nginx_conf
from tests.helpers import free_port, wait_for
from tests.kernel import enter_cgroup
from tests.world import build_world, server_table

SECONDS = int(os.environ.get("BENCH_RESTART_SECONDS", "60"))
# `credless restart` (until agent/cli.py wires it). Not confined to the agent's core: the
# old agent saturates it, and a node has spare cores for a new agent to compile on; the new
# agent is moved to that core once it serves, for a like-for-like figure.
RESTART = [sys.executable, "-m", "agent.restart"]

FRESH_CLIENT = r"""
import http.client, json, sys, time
port, body, seconds = int(sys.argv[1]), sys.argv[2], float(sys.argv[3])
ok = failed = 0
errors = []
end = time.monotonic() + seconds
while time.monotonic() < end:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        c.request("POST", "/mcp", body, {"Content-Type": "application/json",
                  "Accept": "application/json, text/event-stream"})
        r = c.getresponse()
        r.read()
        if r.status == 200:
            ok += 1
        else:
            failed += 1
            errors.append(r.status)
    except Exception as e:
        failed += 1
        errors.append(type(e).__name__)
    finally:
        c.close()
print(json.dumps({"ok": ok, "failed": failed, "errors": errors[:20]}))
"""


def wrk_run(url: str, lua: Path, preexec, seconds: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        ["taskset", "-c", "0", "wrk", "-t1", "-c16", f"-d{seconds}s", "-s", str(lua), url],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=preexec,
    )


def wrk_figures(out: str) -> tuple[float, int, int]:
    """(requests/s, requests, failed: socket errors and non-2xx/3xx answers)."""
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    failed = 0
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m:
        failed += sum(int(g) for g in m.groups())
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if m:
        failed += int(m.group(1))
    return rps, total, failed


def fresh_run(port: int, preexec, seconds: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        ["taskset", "-c", "0", sys.executable, "-c", FRESH_CLIENT, str(port), BODY, str(seconds)],
        stdout=subprocess.PIPE,
        text=True,
        preexec_fn=preexec,
    )


def load(port: int, lua: Path, preexec, during=None) -> dict:
    """wrk and the fresh client for SECONDS; during(): run meanwhile (the restart)."""
    url = f"http://127.0.0.1:{port}/mcp"
    w, f = wrk_run(url, lua, preexec, SECONDS), fresh_run(port, preexec, SECONDS)
    extra = during() if during else {}
    w_out, _ = w.communicate(timeout=SECONDS + 120)
    f_out, _ = f.communicate(timeout=SECONDS + 120)
    rps, total, failed = wrk_figures(w_out)
    fresh = json.loads(f_out)
    return {
        "rps": rps,
        "requests": total,
        "failed": failed + fresh["failed"],
        "fresh_rps": fresh["ok"] / SECONDS,
        "fresh_errors": fresh["errors"],
        **extra,
    }


def stop_pid_file_holder(run_dir: Path) -> None:
    with contextlib.suppress(OSError, ValueError):
        pid = int((run_dir / "credless.pid").read_text().split()[0])
        os.kill(pid, signal.SIGTERM)
        wait_for(lambda: not Path(f"/proc/{pid}").exists(), 90, what="the new agent stopped")


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="credless-bench-restart-") as tmp_name:
        tmp = Path(tmp_name)
        lua = tmp / "post.lua"
        lua.write_text(
            f"wrk.method = 'POST'\nwrk.body = '{BODY}'\n"
            "wrk.headers['Content-Type'] = 'application/json'\n"
            "wrk.headers['Accept'] = 'application/json, text/event-stream'\n"
        )
        up_port = free_port()
        conf = nginx_conf(
            tmp,
            "upstream",
            f"server {{ listen 127.0.0.1:{up_port}; location / {{ "
            f"default_type application/json; return 200 '{RESULT}'; }} }}",
        )
        up = subprocess.Popen(["taskset", "-c", "0", "nginx", "-c", str(conf)])
        try:
            with build_world(tmp, "spiffe://example.org/bench/restart", "credless-bench") as w:
                url = f"http://127.0.0.1:{up_port}/mcp"
                oidc = w.authorization_server([url])
                agent = w.start_agent(
                    server_table("bench", url, issuer=oidc.issuer, dpop="never"),
                    # wrk's connections are served out by the old agent within this
                    inject={"drain_seconds": SECONDS + 10},
                )
                subprocess.run(["taskset", "-a", "-cp", "1", str(agent.proc.pid)], check=True)
                inside = enter_cgroup(w.cg)
                try:
                    steady = load(up_port, lua, inside)
                    log = tmp / "new-agent.log"

                    def restart() -> dict:
                        time.sleep(2)  # the load is under way (a fixed point in the run)
                        t0 = time.monotonic()
                        with open(log, "ab") as out:
                            r = subprocess.run(
                                [*RESTART, "--config", str(agent.config)],
                                stdout=out,
                                stderr=out,
                                timeout=300,
                            )
                        if r.returncode != 0:
                            raise RuntimeError(f"restart failed: {log.read_text()[-2000:]}")
                        took = round(time.monotonic() - t0, 1)
                        new = (tmp / "run" / "credless.pid").read_text().split()[0]
                        subprocess.run(["taskset", "-a", "-cp", "1", new], check=True)
                        return {"handover_seconds": took, "taken_over_at": round(2 + took, 1)}

                    handover = load(up_port, lua, inside, restart)
                    agent.proc.wait(SECONDS + 60)  # the old agent drains and exits
                finally:
                    stop_pid_file_holder(tmp / "run")  # its audit lines are all written then
                new_requests = sum(
                    1 for ln in log.read_text().splitlines() if '"request.injected"' in ln
                )
        finally:
            up.send_signal(signal.SIGQUIT)
            up.wait(10)
    print(
        f"restart-bench: steady_rps={steady['rps']:.0f} steady_failed={steady['failed']} "
        f"handover_rps={handover['rps']:.0f} handover_failed={handover['failed']} "
        f"steady_fresh_rps={steady['fresh_rps']:.0f} "
        f"handover_fresh_rps={handover['fresh_rps']:.0f} "
        f"handover_seconds={handover['handover_seconds']} "
        f"taken_over_at_s={handover['taken_over_at']}/{SECONDS} new_agent_requests={new_requests}"
    )
    if handover["fresh_errors"] or steady["fresh_errors"]:
        print(
            f"restart-bench-errors: steady={steady['fresh_errors']} "
            f"handover={handover['fresh_errors']}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
