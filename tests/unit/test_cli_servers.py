"""Every command that takes a server takes it by name or by URL, and refuses an unknown one
naming the known ones (`policy explain --server` once answered "has no rules" for a URL)."""

from __future__ import annotations

import json

import pytest

from agent import cli
from tests.helpers import write_config
from tests.world import server_table, table, tools_rule

SID = "spiffe://example.org/bot"
URL = "http://127.0.0.1:8080/mcp"


@pytest.fixture
def config(tmp_path):
    (tmp_path / "policy.toml").write_text(tools_rule("echo-only", SID, "echo", ["echo"]))
    return write_config(
        tmp_path,
        extra=table("[policy]", file=str(tmp_path / "policy.toml"))
        + server_table("echo", URL)
        + server_table("other", "https://other.example/mcp"),
    )


def policy_explain(config, server: str, tool: str = "echo") -> int:
    return cli.main(
        [
            *("policy", "explain", "--config", str(config), "--spiffe-id", SID),
            *("--server", server, "--method", "tools/call", "--tool", tool),
        ]
    )


@pytest.mark.parametrize("server", ["echo", URL, "HTTP://127.0.0.1:8080/mcp/"])
def test_policy_explain_takes_a_server_by_name_or_url(config, server, capsys):
    assert policy_explain(config, server) == 0
    assert json.loads(capsys.readouterr().out) == {
        "decision": "allow",
        "rule": "echo-only",
        "reason": "allowed by rule 'echo-only'",
    }
    assert policy_explain(config, server, tool="rm") == 1


KNOWN = f"known: echo ({URL}), other (https://other.example/mcp)"


@pytest.mark.parametrize(
    ("command", "server"),
    [
        (["policy", "explain", "--spiffe-id", SID, "--method", "tools/call"], "ecoh"),
        (["policy", "explain", "--spiffe-id", SID, "--method", "tools/call"], "http://x/mcp"),
        (["oauth", "probe", "--spiffe-id", SID], "ecoh"),
        (["oauth", "probe", "--spiffe-id", SID], "http://127.0.0.1:8080/other"),
    ],
)
def test_an_unknown_server_is_refused_naming_the_known_ones(config, command, server, capsys):
    # refused before any agent is asked: none runs for this config
    assert cli.main([*command, "--config", str(config), "--server", server]) == 2
    err = capsys.readouterr().err
    assert err.startswith("credless: ") and err.rstrip().endswith(KNOWN)
    assert "no agent is listening" not in err


def test_explain_is_a_command(capsys):
    with pytest.raises(SystemExit):
        cli.main(["explain", "--help"])
    out = capsys.readouterr().out
    assert "--pid" in out and "--url" in out and "--method" in out and "--json" in out


def test_explain_refuses_arguments_that_are_not_json(config, capsys):
    argv = ["explain", "--config", str(config), "--pid", "1", "--url", "echo", "--args", "{x"]
    assert cli.main(argv) == 2
    assert capsys.readouterr().err.startswith("credless: --args is not JSON")
