"""The `credless` command line."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable

from agent import __version__, config
from agent.config import ConfigError


def _load_config(path: str | None):
    return config.load(path or config.DEFAULT_CONFIG_PATH)


def _admin_call(args, cmd: str, timeout: float = 10.0, **fields):
    """Ask the running agent (its admin socket, from the config's run_dir); None after
    printing why when it cannot be asked."""
    from pathlib import Path

    from agent.observe import admin

    cfg = _load_config(args.config)
    try:
        return admin.call(Path(cfg.agent.run_dir) / "admin.sock", cmd, timeout=timeout, **fields)
    except RuntimeError as e:
        print(f"credless: {e}", file=sys.stderr)
        return None


def cmd_check_config(args) -> int:
    config.load(args.file)
    print(f"{args.file}: ok")
    return 0


def cmd_run(args) -> int:
    from agent.daemon import Daemon, StartupError
    from agent.observe import logging as obs_logging

    if args.take_over:  # a handover from the running agent, if any (docs/restart.md)
        from agent.restart import cmd_run_taking_over

        return cmd_run_taking_over(args)
    cfg = _load_config(args.config)
    obs_logging.configure(
        level=args.log_level or cfg.log.level, fmt=args.log_format or cfg.log.format
    )
    try:
        daemon = Daemon(cfg)
    except StartupError as e:
        obs_logging.get_logger("daemon").error("start-up failed", error=str(e))
        return 1
    try:
        import uvloop
    except ImportError:
        return asyncio.run(daemon.run())
    return uvloop.run(daemon.run())


def cmd_restart(args) -> int:
    from agent.restart import cmd_restart as restart

    return restart(args)


def cmd_doctor(args) -> int:
    from agent import doctor

    opts = doctor.DoctorOptions()
    cfg = _load_config(args.config) if args.config else None
    if args.cgroup_root:
        opts.cgroup_root = args.cgroup_root
    elif cfg is not None:
        opts.cgroup_root = cfg.attest.cgroup_root
    if cfg is not None:
        opts.kubelet = cfg.attest.kubelet
        opts.managed_cgroups = list(cfg.inject.managed_cgroups)
    results = doctor.run_checks(opts)
    print(doctor.render(results, as_json=args.json))
    return doctor.exit_code(results)


def cmd_ps(args) -> int:
    import json

    rows = _admin_call(args, "ps")
    if rows is None:
        return 1
    if args.pid is not None:
        rows = [r for r in rows if r["pid"] == args.pid]
    if args.json or not sys.stdout.isatty():
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'PID':>7} {'PPID':>7} {'UID':>6}  {'EXE':40} CGROUP")
    for r in sorted(rows, key=lambda r: r["pid"]):
        print(f"{r['pid']:>7} {r['ppid']:>7} {r['uid']:>6}  {r['exe'][-40:]:40} {r['cgroup']}")
        if args.selectors:
            for sel in r["selectors"]:
                print(f"{'':24}{sel}")
    return 0


def _server(args, value: str):
    """The configured [[servers]] entry value names (by name or URL), or None after saying
    it is unknown and which are known (agent/server_names.py)."""
    from agent import server_names

    try:
        return server_names.resolve(_load_config(args.config).servers, value)
    except server_names.UnknownServer as e:
        print(f"credless: {e}", file=sys.stderr)
        return None


def cmd_oauth_probe(args) -> int:
    import json

    server = _server(args, args.server)
    if server is None:
        return 2
    out = _admin_call(
        args, "oauth_probe", timeout=120, server=server.name, spiffe_id=args.spiffe_id
    )
    if out is None:
        return 1
    print(json.dumps(out, indent=2))
    return 1 if "error" in out else 0


def cmd_policy_check(args) -> int:
    from agent.policy.rules import PolicyError, load

    servers = None
    if args.config:
        servers = {srv.name for srv in _load_config(args.config).servers}
    try:
        policy = load(args.file, servers)
    except PolicyError as e:
        print(f"credless: policy error\n{e}", file=sys.stderr)
        return 2
    print(
        f"{args.file}: ok ({len(policy.rules)} rules, default_unlisted = {policy.default_unlisted})"
    )
    return 0


def cmd_policy_explain(args) -> int:
    import json

    from agent.policy.rules import PolicyError, load

    server = _server(args, args.server)
    if server is None:
        return 2
    try:
        policy = load(args.file or _load_config(args.config).policy.file)
    except PolicyError as e:
        print(f"credless: policy error\n{e}", file=sys.stderr)
        return 2
    name = args.tool or args.resource or args.prompt
    try:
        arguments = json.loads(args.args) if args.args is not None else None
    except ValueError as e:
        print(f"credless: --args is not JSON: {e}", file=sys.stderr)
        return 2
    d = policy.decide(args.spiffe_id, server.name, args.method, name, arguments, args.selector)
    print(
        json.dumps(
            {"decision": "allow" if d.allowed else "deny", "rule": d.rule_id, "reason": d.reason},
            indent=2,
        )
    )
    return 0 if d.allowed else 1


def cmd_explain(args) -> int:
    import json

    from agent.explain import render as explain_render

    call_args = None
    if args.args is not None:
        try:
            call_args = json.loads(args.args)
        except ValueError as e:
            print(f"credless: --args is not JSON: {e}", file=sys.stderr)
            return 2
    answer = _admin_call(
        args,
        "explain",
        timeout=30,
        pid=args.pid,
        url=args.url,
        method=args.method,
        tool=args.tool,
        arguments=call_args,
    )
    if answer is None:
        return 1
    if "error" in answer:
        print(explain_render.render(answer), file=sys.stderr)
        return 2
    if args.json or not sys.stdout.isatty():
        print(json.dumps(answer, indent=2))
    else:
        print(explain_render.render(answer))
    return 1 if explain_render.failed(answer) else 0


def cmd_status(args) -> int:
    import json

    st = _admin_call(args, "status")
    if st is None:
        return 1
    if args.json or not sys.stdout.isatty():
        print(json.dumps(st, indent=2))
        return 0
    print("WORKLOADS")
    for w in st["workloads"]:
        print(f"  {w['pid']:>7}  {w['exe'][-40:]:40}  {w['spiffe_id']}")
    print("SVIDS")
    for s_ in st["svids"]:
        print(f"  {s_['spiffe_id']:50} expires in {s_['expires_in']}s")
    print("TOKENS")
    for t in st["tokens"]:
        print(
            f"  {t['spiffe_id']:40} {t['server']:12} {t['token_type']:6} expires in "
            f"{t['expires_in']}s  sha256 {t['token_sha256']}"
        )
    print("REDIRECT  " + ", ".join(st["redirect_targets"]) + f"  {st['redirect_counts']}")
    print(f"BPF EVENTS LOST  {st['bpf_events_lost']}")
    return 0


def cmd_detach(args) -> int:
    from agent.inject.redirect import detach

    pin_dir = _load_config(args.config).agent.bpf_pin_dir
    removed = detach(pin_dir)
    if not removed:
        print(f"credless: no redirect pinned under {pin_dir}")
        return 0
    print(
        f"credless: redirect detached ({len(removed)} pins removed under {pin_dir}); "
        "MCP connects now go out untouched until an agent starts"
    )
    return 0


CONFIG_HELP = f"config file (default {config.DEFAULT_CONFIG_PATH})"
JSON_HELP = "JSON (the default when not a TTY)"
SERVER_HELP = "a [[servers]] entry, by its name or its URL"


def _command(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    name: str,
    func: Callable[[argparse.Namespace], int],
    help: str,
    config_help: str | None = CONFIG_HELP,
    json_help: str | None = None,
) -> argparse.ArgumentParser:
    """A subcommand running func, with the --config and --json options most commands take."""
    cmd = sub.add_parser(name, help=help)
    if config_help is not None:
        cmd.add_argument("--config", help=config_help)
    if json_help is not None:
        cmd.add_argument("--json", action="store_true", help=json_help)
    cmd.set_defaults(func=func)
    return cmd


def _group(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], name: str, help: str
) -> argparse._SubParsersAction[argparse.ArgumentParser]:
    """A command with subcommands of its own (credless NAME SUBCOMMAND)."""
    return sub.add_parser(name, help=help).add_subparsers(dest=f"{name}_command", required=True)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="credless",
        description=(
            "Node-local credential injection agent: attests processes with eBPF, gives them "
            "SPIFFE identities, and injects OAuth credentials into their MCP traffic."
        ),
    )
    p.add_argument("--version", action="version", version=f"credless {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = _command(sub, "run", cmd_run, "run the agent in the foreground")
    run.add_argument("--log-level", choices=config.LOG_LEVELS, help="overrides log.level")
    run.add_argument("--log-format", choices=config.LOG_FORMATS, help="overrides log.format")
    run.add_argument(
        "--take-over",
        action="store_true",
        help="if an agent runs with this run_dir, take over from it without refusing a "
        "connect (docs/restart.md); if none does, start as usual",
    )
    restart = _command(
        sub,
        "restart",
        cmd_restart,
        "start a new agent that takes over from the running one (docs/restart.md); "
        "if it cannot start, the running one keeps serving and this exits 1 naming why",
    )
    restart.add_argument("--timeout", type=float, help="seconds to wait for the new agent")

    chk = _command(
        sub, "check-config", cmd_check_config, "validate a config file and exit", config_help=None
    )
    chk.add_argument("file")

    doc = _command(
        sub,
        "doctor",
        cmd_doctor,
        "check that this host can run credless",
        config_help="read attest.cgroup_root and [attest.kubelet] from this config",
        json_help="machine-readable output",
    )
    doc.add_argument(
        "--cgroup-root", help="cgroup v2 mount point to check (default: found in /proc/mounts)"
    )

    ps = _command(
        sub,
        "ps",
        cmd_ps,
        "the running agent's process table, with selectors",
        json_help=JSON_HELP,
    )
    ps.add_argument("--pid", type=int, help="only this process")
    ps.add_argument("--selectors", action="store_true", help="list selectors under each row")

    _command(
        sub,
        "status",
        cmd_status,
        "workloads, SVID and token expiries (no secrets), "
        "redirect targets and lost events of the running agent",
        json_help=JSON_HELP,
    )
    _command(
        sub,
        "detach",
        cmd_detach,
        "remove the pinned connect redirect the agent leaves "
        "attached across restarts (for uninstalling)",
    )

    exp = _command(
        sub,
        "explain",
        cmd_explain,
        "the whole chain a live process's request to a server would go through, each "
        "step saying why (exit 0: sent with a credential, 1: not)",
        json_help=JSON_HELP,
    )
    exp.add_argument("--pid", type=int, required=True, help="a running process")
    exp.add_argument("--url", required=True, help="the URL it calls, or a [[servers]] name")
    exp.add_argument("--method", help="JSON-RPC method for the policy decision, e.g. tools/call")
    exp.add_argument("--tool", help="tool, resource URI or prompt name the method names")
    exp.add_argument(
        "--args", help="the call's arguments as JSON, for policy rules with a condition"
    )

    oauth = _group(sub, "oauth", "OAuth tools")
    probe = _command(
        oauth,
        "probe",
        cmd_oauth_probe,
        "discovery, registration and a token request for "
        "one identity, through the running agent; prints a summary, "
        "never the token",
    )
    probe.add_argument("--server", required=True, help=SERVER_HELP)
    probe.add_argument("--spiffe-id", required=True, help="an identity the agent can issue")

    pol = _group(sub, "policy", "check and try MCP policy files")
    pc = _command(
        pol,
        "check",
        cmd_policy_check,
        "validate a policy file",
        config_help="also check that servers named in rules are configured",
    )
    pc.add_argument("file")
    pe = _command(
        pol,
        "explain",
        cmd_policy_explain,
        "which rule decides a call, without traffic (exit 0 allow, 1 deny)",
    )
    pe.add_argument("--file", help="policy file (default: policy.file of --config)")
    pe.add_argument("--spiffe-id", required=True)
    pe.add_argument("--server", required=True, help=SERVER_HELP)
    pe.add_argument("--method", required=True, help="JSON-RPC method, e.g. tools/call")
    pe.add_argument("--tool", help="tool name for tools/call")
    pe.add_argument("--resource", help="resource URI for resources/read")
    pe.add_argument("--prompt", help="prompt name for prompts/get")
    pe.add_argument("--args", help="the call's arguments as JSON, for rules with a condition")
    pe.add_argument(
        "--selector",
        action="append",
        default=[],
        help="a selector of the calling process, for rules with a condition (repeatable)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"credless: config error\n{e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
