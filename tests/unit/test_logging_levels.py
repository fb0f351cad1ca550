"""The diagnostic levels do what docs/logging.md says (each adds its lines to the ones above
it), and no level shows a credential, whatever field or text carries it (issue 19)."""

from __future__ import annotations

import io
import json

import pytest

from agent.observe import logging as obs

# shaped like what credless handles; none is a real credential
JWT = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJzcGlmZmU6Ly9leGFtcGxlLm9yZy9hIn0.c2lnbmF0dXJl"
PEM = (
    "-----BEGIN PRIVATE KEY-----\nMIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQg\n"
    "-----END PRIVATE KEY-----"
)


def lines(level: str) -> list[dict]:
    out = io.StringIO()
    obs.configure(level=level, fmt="json", stream=out)
    log = obs.get_logger("t")
    log.debug("a decision")
    log.info("a lifecycle step")
    log.warning("something refused")
    log.error("something failed")
    return [json.loads(ln) for ln in out.getvalue().splitlines()]


@pytest.mark.parametrize(
    "level,shown",
    [
        ("debug", ["debug", "info", "warning", "error"]),
        ("info", ["info", "warning", "error"]),
        ("warning", ["warning", "error"]),
        ("error", ["error"]),
    ],
)
def test_each_level_adds_its_lines_to_those_above_it(level, shown):
    assert [e["level"] for e in lines(level)] == shown


def test_a_credential_in_any_text_is_scrubbed_but_its_fingerprint_kept():
    out = io.StringIO()
    obs.configure(level="debug", fmt="json", stream=out)
    log = obs.get_logger("t")
    log.debug(
        f"answer was {JWT}",
        error=f"server said invalid_client for assertion {JWT} (bad)",
        url=f"https://as.example/cb?assertion={JWT}",
        detail=f"key: {PEM} and more",
        jti="4f1c0e",
        token_sha256="0123456789abcdef",
    )
    try:
        raise ValueError(f"could not parse {JWT}")
    except ValueError:
        log.exception("failed")
    text = out.getvalue()
    assert "eyJ" not in text and "PRIVATE KEY" not in text and "MIGHAgEA" not in text
    first, second = (json.loads(ln) for ln in text.splitlines())
    assert first["event"] == "answer was [redacted]"
    assert first["error"] == "server said invalid_client for assertion [redacted] (bad)"
    assert first["url"] == "https://as.example/cb?assertion=[redacted]"
    assert first["detail"] == "key: [redacted] and more"
    assert (first["jti"], first["token_sha256"]) == ("4f1c0e", "0123456789abcdef")
    assert "could not parse [redacted]" in second["exception"]


def test_a_pem_key_cut_short_is_scrubbed_to_its_end():
    out = io.StringIO()
    obs.configure(level="info", fmt="json", stream=out)
    obs.get_logger("t").info("x", detail=PEM.split("-----END")[0])
    assert "MIGHAgEA" not in out.getvalue()


def test_audit_event_ids_are_16_hex_digits_and_differ():
    ids = {obs.new_event_id() for _ in range(100)}
    assert len(ids) == 100 and all(len(i) == 16 and int(i, 16) >= 0 for i in ids)


def test_a_logger_made_before_configure_follows_each_configure():
    log = obs.get_logger("early")  # as a module's `log = get_logger(...)` at import
    quiet, loud = io.StringIO(), io.StringIO()
    obs.configure(level="info", fmt="json", stream=quiet)
    log.debug("hidden")
    log.info("shown")
    obs.configure(level="debug", fmt="json", stream=loud)
    log.debug("now shown")
    assert [json.loads(ln)["event"] for ln in quiet.getvalue().splitlines()] == ["shown"]
    assert [json.loads(ln)["event"] for ln in loud.getvalue().splitlines()] == ["now shown"]
