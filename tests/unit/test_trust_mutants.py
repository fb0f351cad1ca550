"""What discovery may believe (agent/oauth/trust.py), at the edges `make mutate` found
unpinned: a bracketed IPv6 loopback literal, the pin file's timestamp and layout (an
operator reads and edits it), one TLS context for the system store whoever connects with
it, the wording of a refusal verified against the system store, and how far down an
exception's chain a certificate failure is looked for."""

from __future__ import annotations

import json
import ssl
import time
from datetime import UTC, datetime

import pytest

from agent.oauth import trust

MCP = "https://mcp.example/mcp"


@pytest.mark.parametrize("host", ["[::1]", "[::ffff:127.0.0.1]", "[0:0:0:0:0:0:0:1]"])
def test_an_ipv6_loopback_literal_in_brackets_is_loopback(host):
    # the brackets an IPv6 literal wears in a URL's authority are not part of the address
    assert trust.is_loopback_host(host)
    assert trust.insecure_reason(f"http://{host}:8080/token") is None


@pytest.mark.parametrize("host", ["[::2]", "[2001:db8::1]", "[localhost.evil]"])
def test_a_bracketed_host_that_is_not_loopback_is_not(host):
    assert not trust.is_loopback_host(host)


@pytest.fixture
def far_from_utc(monkeypatch):
    """A local time zone 5:30 east of UTC (a POSIX TZ rule: no tz database needed)."""
    monkeypatch.setenv("TZ", "IST-5:30")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def test_a_pin_says_when_it_was_made_in_utc_whatever_the_local_zone(tmp_path, far_from_utc):
    pins = trust.PinStore(tmp_path)
    before = datetime.now(UTC).replace(microsecond=0)
    pins.pin("weather", MCP, "https://as.example")
    after = datetime.now(UTC)
    entry = json.loads(pins.path.read_text())[f"weather {MCP}"]
    # the Z says UTC: it must be UTC, not the host's local time spelt with a Z
    pinned = datetime.strptime(entry["pinned_at"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    assert before <= pinned <= after


def test_each_member_of_the_pin_file_is_on_a_line_of_its_own(tmp_path):
    # an operator un-pins by deleting an entry while the agent is stopped (PinStore's doc):
    # the file is laid out one member per line, not as a single line
    pins = trust.PinStore(tmp_path)
    pins.pin("weather", MCP, "https://as.example")
    pins.pin("maps", "https://maps.example/mcp", "https://as2.example")
    lines = pins.path.read_text().splitlines()
    for issuer in ("https://as.example", "https://as2.example"):
        assert [ln.strip().rstrip(",") for ln in lines if issuer in ln] == [f'"issuer": "{issuer}"']


def test_the_pin_file_is_the_same_whatever_order_the_pins_were_made_in(tmp_path, monkeypatch):
    # the same pins give the same file (diffable, comparable across nodes and restarts)
    monkeypatch.setattr(trust.time, "strftime", lambda fmt, t=None: "2026-12-03T00:00:00Z")
    pins = [
        ("weather", MCP, "https://as.example"),
        ("maps", "https://maps.example/mcp", "https://as2.example"),
    ]
    one, other = trust.PinStore(tmp_path / "one"), trust.PinStore(tmp_path / "other")
    for p in pins:
        one.pin(*p)
    for p in reversed(pins):
        other.pin(*p)
    assert one.path.read_bytes() == other.path.read_bytes()


def test_the_system_store_is_one_context_for_mcp_servers_and_authorization_servers():
    # one decision, one context: the system store's is shared by everything verified by it
    system = trust.server_tls("weather", "", "")
    assert trust.authorization_server_tls("").context is system.context
    assert trust.authorization_server_tls("") == system


def test_a_refusal_verified_against_the_system_store_names_no_file():
    refused = trust.AuthorizationServerCertificateRefused(
        "https://as.example/token",
        "certificate verify failed: self-signed certificate",
        trust.authorization_server_tls(""),
    )
    assert "verified against the system store." in str(refused)
    assert "()" not in str(refused)
    named = trust.McpServerCertificateRefused(
        MCP, "certificate verify failed", trust.server_tls("weather", "/etc/ca.pem", "")
    )
    assert "verified against servers[weather].ca_file (/etc/ca.pem)." in str(named)


def chain(depth: int, last: BaseException) -> BaseException:
    """An exception `depth` links above `last` (each raised from the one below)."""
    exc = last
    for i in range(depth):
        outer = RuntimeError(f"wrapper {i}")
        outer.__cause__ = exc
        exc = outer
    return exc


def test_a_certificate_failure_ten_exceptions_down_the_chain_is_found():
    # the failure is found wherever a client library's wrapping put it in a chain of ten
    # (httpx, anyio and asyncio wrap it two or three deep)
    failure = ssl.SSLCertVerificationError(1, "certificate verify failed")
    failure.verify_message = "unable to get local issuer certificate"
    cause = trust.certificate_failure(chain(9, failure))
    assert cause == "certificate verify failed: unable to get local issuer certificate"
    with pytest.raises(trust.McpServerCertificateRefused):
        trust.refuse_certificate(
            chain(9, failure),
            MCP,
            trust.server_tls("weather", "", ""),
            trust.McpServerCertificateRefused,
        )


def test_a_chain_that_loops_back_on_itself_ends_the_search():
    a, b = RuntimeError("a"), RuntimeError("b")
    a.__cause__, b.__context__ = b, a  # exceptions can reference each other
    assert trust.certificate_failure(a) is None
