"""`make demo`: the agent in the foreground on this machine, with a throwaway demo config.

Until the data path lands this shows the foundation: the host checks, the agent starting,
its metrics endpoint, and a clean stop on Ctrl-C / SIGTERM (or after --duration seconds).
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from agent import doctor


def _say(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m agent.demo")
    ap.add_argument("--duration", type=float, default=0,
                    help="stop after this many seconds (default: run until Ctrl-C)")
    ap.add_argument("--metrics-port", type=int, default=9890)
    args = ap.parse_args(argv)

    results = doctor.run_checks(doctor.DoctorOptions())
    _say("host checks (credless doctor):")
    print(doctor.render(results, as_json=False), flush=True)
    if doctor.exit_code(results):
        _say("this host cannot run credless; apply the fixes above (make setup does most)")
        return 1

    with tempfile.TemporaryDirectory(prefix="credless-demo-") as tmp:
        cfg = Path(tmp) / "credless.toml"
        cfg.write_text(f'[agent]\nstate_dir = "{tmp}/state"\nrun_dir = "{tmp}/run"\n'
                       f'[log]\nformat = "console"\n'
                       f'[metrics]\nlisten = "127.0.0.1:{args.metrics_port}"\n')
        _say(f"config: {cfg}")
        agent = subprocess.Popen([sys.executable, "-m", "agent", "run", "--config", str(cfg)])
        stop = {"now": False}

        def on_signal(*_):
            stop["now"] = True

        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)
        url = f"http://127.0.0.1:{args.metrics_port}"
        started = time.monotonic()
        try:
            while agent.poll() is None and not stop["now"]:
                try:
                    with urllib.request.urlopen(url + "/readyz", timeout=1) as r:
                        if r.status == 200:
                            break
                except OSError:
                    time.sleep(0.1)
            if agent.poll() is not None:
                _say(f"agent exited early with {agent.returncode}")
                return 1
            with urllib.request.urlopen(url + "/metrics", timeout=2) as r:
                build = [ln for ln in r.read().decode().splitlines()
                         if ln.startswith("credless_build_info")]
            _say(f"agent is ready; metrics at {url}/metrics: {build[0] if build else '?'}")
            _say("press Ctrl-C to stop" if not args.duration else
                 f"stopping in {args.duration:g}s")
            while not stop["now"] and agent.poll() is None:
                if args.duration and time.monotonic() - started >= args.duration:
                    break
                time.sleep(0.2)
        finally:
            if agent.poll() is None:
                agent.send_signal(signal.SIGTERM)
            rc = agent.wait(30)
        _say(f"agent stopped (exit {rc}); nothing left running")
        return rc


if __name__ == "__main__":
    raise SystemExit(main())
