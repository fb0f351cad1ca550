"""Operator files: table-driven over tests/testdata/{config,entries,policy}/*.toml with the
exact messages (one engine, one error type, one format for all three), then the config's own."""

from __future__ import annotations

import subprocess

import pytest

from agent import config
from agent.config import ConfigError
from agent.identity import entries
from agent.identity.spiffeid import TrustDomain
from agent.policy import rules
from agent.schema import OperatorFileError
from tests.conftest import REPO, TESTDATA

# each kind of file as the agent loads it: entries for the trust domain example.org, policy
# against the [[servers]] its samples name
LOADERS = {
    "config": (config.load, ConfigError),
    "entries": (lambda p: entries.load(p, TrustDomain.parse("example.org")), entries.EntriesError),
    "policy": (lambda p: rules.load(p, servers={"weather", "maps"}), rules.PolicyError),
}
CASES = sorted(
    p
    for kind in LOADERS
    for p in (TESTDATA / kind).glob("*.toml")
    if p.with_suffix(".err").exists()
)


@pytest.mark.parametrize("path", CASES, ids=[f"{p.parent.name}/{p.stem}" for p in CASES])
def test_invalid_operator_file_reports_exact_problems(path):
    load, error = LOADERS[path.parent.name]
    expected = path.with_suffix(".err").read_text().splitlines()
    with pytest.raises(error) as err:
        load(path)
    assert isinstance(err.value, OperatorFileError)
    assert err.value.problems == expected
    assert str(err.value).splitlines() == [f"{path}: {line}" for line in expected]


def test_table_covers_the_required_failures():
    names = {f"{p.parent.name}/{p.stem}" for p in CASES}
    assert {
        "config/unknown_key",
        "config/wrong_type_bool",
        "config/bad_trust_domain_upper",
        "entries/invalid",
        "entries/duplicate_id",
        "policy/invalid",
        "policy/removed_keys",
        "policy/deny_without_methods",
    } <= names


@pytest.mark.parametrize("kind", LOADERS)
def test_every_kind_of_file_fails_alike_when_it_cannot_be_read(kind, tmp_path):
    load, error = LOADERS[kind]
    with pytest.raises(error) as err:
        load(tmp_path)
    assert err.value.problems == ["is a directory, expected a TOML file"]
    latin1 = tmp_path / "latin1.toml"
    latin1.write_bytes(b"# caf\xe9\n")
    with pytest.raises(error) as err:
        load(latin1)
    assert err.value.problems == ["not UTF-8 text (byte 5)"]
    with pytest.raises(error) as err:
        load(tmp_path / "nope.toml")
    assert err.value.problems[0].startswith("file not found; create it ")


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as err:
        config.load(missing)
    assert err.value.problems == [
        "file not found; create it (deploy/credless.example.toml "
        "documents every key) or pass --config FILE"
    ]


def test_not_toml_names_the_line():
    with pytest.raises(ConfigError) as err:
        config.load(TESTDATA / "config" / "not_toml.toml")
    # tomllib's wording is its own; what we promise is the line number.
    assert len(err.value.problems) == 1
    assert err.value.problems[0].startswith("not valid TOML: Cannot overwrite a value (at line 3,")


def test_directory_instead_of_file(tmp_path):
    with pytest.raises(ConfigError) as err:
        config.load(tmp_path)
    assert err.value.problems == ["is a directory, expected a TOML file"]


def test_empty_file_gives_defaults(tmp_path):
    f = tmp_path / "empty.toml"
    f.write_text("")
    assert config.load(f) == config.Config()


def test_example_config_loads_and_documents_every_default():
    """The shipped example is the documentation of defaults: it must equal the model's."""
    example = REPO / "deploy" / "credless.example.toml"
    assert config.load(example) == config.Config()
    text = example.read_text()
    for key, _default in config.iter_settings():
        name = key.rsplit(".", 1)[1]
        # array-of-table keys ([[servers]]) are documented as a commented example
        assert f"\n{name} = " in text or f"\n# {name} = " in text, (
            f"{key} is not documented in {example.name}"
        )


def test_ipv6_loopback_and_integer_for_float_are_accepted():
    cfg = config.parse({"metrics": {"listen": "[::1]:9999"}, "attest": {"exit_grace_seconds": 2}})
    assert cfg.metrics.listen == "[::1]:9999"
    assert cfg.attest.exit_grace_seconds == 2.0 and isinstance(cfg.attest.exit_grace_seconds, float)


@pytest.mark.parametrize(
    "listen,expected",
    [
        ("127.0.0.1", 'HOST:PORT such as "127.0.0.1:9890"'),
        ("127.0.0.1:0", 'HOST:PORT such as "127.0.0.1:9890"'),
        ("127.0.0.1:70000", 'HOST:PORT such as "127.0.0.1:9890"'),
        ("localhost:80", 'HOST:PORT such as "127.0.0.1:9890"'),
        ("[::2]:80", "a loopback"),
        ("10.0.0.1:80", "a loopback"),
    ],
)
def test_bad_listen_addresses(listen, expected):
    with pytest.raises(ConfigError) as err:
        config.parse({"metrics": {"listen": listen}})
    assert err.value.problems[0].startswith(f'metrics.listen: got "{listen}", expected {expected}')


def test_metrics_beyond_loopback_needs_expose():
    cfg = config.parse({"metrics": {"listen": "0.0.0.0:9890", "expose": True}})
    assert cfg.metrics.listen == "0.0.0.0:9890"


def test_check_config_cli_exit_codes(tmp_path, credless_cmd):
    ok = subprocess.run(
        [*credless_cmd, "check-config", str(REPO / "deploy/credless.example.toml")],
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0 and ok.stdout.strip().endswith(": ok")
    bad = subprocess.run(
        [*credless_cmd, "check-config", str(TESTDATA / "config/unknown_key.toml")],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2
    assert "Traceback" not in bad.stderr
    assert (
        "metrics.lisen: unknown key; accepted keys in [metrics]: enabled, expose, listen"
        in bad.stderr
    )
    missing = subprocess.run(
        [*credless_cmd, "check-config", str(tmp_path / "x.toml")], capture_output=True, text=True
    )
    assert missing.returncode == 2 and "file not found" in missing.stderr
    assert "Traceback" not in missing.stderr


def test_servers_array_is_validated_per_entry():
    with pytest.raises(ConfigError) as err:
        config.parse(
            {
                "servers": [
                    {"name": "a", "url": "http://127.0.0.1:1/mcp"},
                    {"name": "a", "url": "ftp://x", "dpop": "maybe"},
                    {"url": "http://127.0.0.1:2/mcp"},
                ]
            }
        )
    assert err.value.problems == [
        'servers[1].url: got "ftp://x", expected an absolute http(s) URL such as '
        '"https://mcp.example.com/mcp"',
        'servers[1].dpop: got "maybe", expected one of: auto, always, never',
    ]
    with pytest.raises(ConfigError) as err:
        config.parse(
            {
                "servers": [
                    {"name": "a", "url": "http://127.0.0.1:1/mcp"},
                    {"name": "a", "url": "http://127.0.0.1:2/mcp"},
                    {"url": "http://127.0.0.1:2/mcp"},
                ]
            }
        )
    assert err.value.problems == [
        "servers[1].name: 'a' is used twice; names must be unique",
        "servers[2].name: required",
    ]
    cfg = config.parse({"servers": [{"name": "w", "url": "http://127.0.0.1:1/mcp"}]})
    assert cfg.servers[0].auth_profile == "jwt-bearer" and cfg.servers[0].dpop == "auto"


@pytest.mark.parametrize(
    "url,refused",
    [
        ("https://as.example.com/token", False),
        ("http://127.0.0.1:8444/token", False),  # loopback http: tests, a node-local AS
        ("http://[::1]:8444/token", False),
        ("http://as.example.com/token", True),  # client assertions in clear
        ("http://10.0.0.5/token", True),
    ],
)
def test_assertion_mode_puts_assertions_only_into_https_or_loopback_urls(url, refused):
    server = {"name": "as", "url": url, "issuer": "https://as.example.com", "mode": "assertion"}
    if not refused:
        assert config.parse({"servers": [server]}).servers[0].url == url
        return
    with pytest.raises(config.ConfigError) as err:
        config.parse({"servers": [server]})
    assert err.value.problems == [
        f'servers[0].url: {url!r} with mode = "assertion": plain '
        "http to a host that is not loopback: https is required "
        "(http is allowed only to 127.0.0.0/8, ::1 or localhost)"
    ]
