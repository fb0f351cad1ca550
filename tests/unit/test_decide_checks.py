"""The request decision at the edges the table (test_decide.py) left unpinned, found by
`make mutate`: every refusal's status line and message, a Host spelt in capitals, the
workload's credentials stripped in every mode that adds credless's own, Content-Encoding:
identity, a sub-agent's GET, the assertion mode's token request spelt with parameters, and
MCP endpoint paths with dot segments, a second `?` or a trailing slash."""

from __future__ import annotations

import dataclasses
from http import HTTPStatus

import pytest

from agent.config import InjectSection
from agent.inject import decide
from agent.inject.upstreams import Upstream, authorities
from agent.policy import jsonrpc
from tests.unit.test_decide import (
    CALLERS,
    ROWS,
    SERVERS,
    expected,
    parsed,
    policy_engine,
)
from tests.unit.test_policy_checks import CHILD, PARENT, engine, rule

SETTINGS = InjectSection(unattested="deny", workload_authorization="strip")


def decided(head: str, server: str = "broker", caller: str = "attested", policy=None, **settings):
    request = decide.Request.from_head(parsed(head.replace("\n", "\r\n").encode() + b"\r\n\r\n"))
    return decide.decide(
        request,
        SERVERS[server],
        CALLERS[caller],
        dataclasses.replace(SETTINGS, **settings),
        policy,
    )


def table_verdict(row: dict) -> decide.Verdict:
    settings = SETTINGS
    if row["settings"] != "-":
        key, value = row["settings"].split("=")
        settings = dataclasses.replace(settings, **{key: value})
    head = row["head"].replace("\\r\\n", "\r\n").encode() + b"\r\n\r\n"
    return decide.decide(
        decide.Request.from_head(parsed(head)),
        SERVERS[row["server"]],
        CALLERS[row["caller"]],
        settings,
        policy_engine() if row["policy"] == "on" else None,
    )


ANSWERED = [r for r in ROWS if expected(r["expect"])["action"] == decide.ANSWER]


@pytest.mark.parametrize("row", ANSWERED, ids=[r["name"] for r in ANSWERED])
def test_every_refusal_has_its_status_lines_reason_and_a_message(row):
    verdict = table_verdict(row)
    assert verdict.reason == HTTPStatus(verdict.status).phrase.encode()
    assert verdict.message.startswith("credless: ") and "None" not in verdict.message


def test_a_closed_connection_says_why():
    assert decided("GET /mcp HTTP/1.1\nHost: 127.0.0.1:8080", caller="exec'd").message == (
        "the process exec'd or exited since it connected; connection closed"
    )
    revoked = decided("GET /mcp HTTP/1.1\nHost: 127.0.0.1:8080", caller="revoked")
    assert revoked.message == "the registration entries changed"


@pytest.mark.parametrize(
    "head,message",
    [
        ("GET /mcp HTTP/1.1", "no Host fields: the request must carry exactly one"),
        (
            "POST /mcp HTTP/1.1\nHost: 127.0.0.1:8080\nMcp-Method: a\nMcp-Method: b",
            "2 Mcp-Method fields: the request must carry at most one",
        ),
        (
            "GET http://127.0.0.1:8080/mcp HTTP/1.1\nHost: 127.0.0.1:8080",
            "the request target must be a path (origin-form), not 'http://127.0.0.1:8080/mcp'",
        ),
        ("PUT /mcp HTTP/1.1\nHost: 127.0.0.1:8080", "PUT is not a method MCP uses"),
        (
            "GET /mcp HTTP/1.1\nHost: 127.0.0.1:8080\nConnection: upgrade\nUpgrade: h2c",
            "protocol upgrades (h2c) are not relayed",
        ),
        (
            "GET /mcp HTTP/1.1\nHost: evil.example",
            "Host 'evil.example' is not 'tools' (127.0.0.1:8080); credless sends credentials "
            "only to the server they are for",
        ),
        ("GET /other?q HTTP/1.1\nHost: 127.0.0.1:8080", "'/other' is not under the MCP endpoint"),
    ],
)
def test_a_refusal_names_what_was_wrong(head, message):
    assert message in decided(head).message


def test_a_host_is_compared_without_regard_to_case():
    up = Upstream(
        "named",
        "https",
        "mcp.example",
        443,
        "https://mcp.example:443",
        "broker",
        b"/mcp",
        authorities("https", "mcp.example", None),
    )
    request = decide.Request.from_head(
        parsed(b"GET /mcp HTTP/1.1\r\nHost: MCP.Example:443\r\n\r\n")
    )
    verdict = decide.decide(request, up, CALLERS["attested"], SETTINGS, None)
    assert (verdict.action, verdict.credential) == (decide.FORWARD, True)


@pytest.mark.parametrize(
    "head,server,policy",
    [
        ("POST /mcp HTTP/1.1\nHost: 127.0.0.1:8080\nAuthorization: Bearer its-own", "broker", True),
        ("GET /mcp HTTP/1.1\nHost: 127.0.0.1:8080\nDPoP: its-proof", "broker", False),
        (
            "GET /other HTTP/1.1\nHost: 127.0.0.1:8080\nAuthorization: Basic eDp5",
            "assertion",
            False,
        ),
    ],
)
def test_the_workloads_credentials_are_stripped_wherever_credless_forwards(head, server, policy):
    verdict = decided(head, server, policy=policy_engine() if policy else None)
    assert (verdict.action, verdict.strip) == (decide.FORWARD, True)


@pytest.mark.parametrize("coding", ["identity", "Identity"])
def test_an_identity_content_encoding_is_read_and_decided(coding):
    verdict = decided(
        f"POST /mcp HTTP/1.1\nHost: 127.0.0.1:8080\nContent-Encoding: {coding}\nContent-Length: 2",
        policy=policy_engine(),
    )
    assert (verdict.action, verdict.read_body) == (decide.FORWARD, True)


def test_a_sub_agents_get_is_decided_with_its_parent():
    # the parent has no rule on the server, so not even the session's GET
    child_may_get = {**rule("child", CHILD, ["*"]), "methods": ["http:GET"]}
    restricted = engine("restrict_to_parent", [child_may_get])
    request = decide.Request.from_head(parsed(b"GET /mcp HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n\r\n"))
    alone, spawned = (decide.Caller(True, CHILD, parent) for parent in (None, PARENT))
    assert decide.decide(request, SERVERS["broker"], alone, SETTINGS, restricted).credential
    refused = decide.decide(request, SERVERS["broker"], spawned, SETTINGS, restricted)
    assert (refused.status, refused.outcome) == (403, "policy_denied")


@pytest.mark.parametrize(
    "content_type,target,credentialed",
    [
        ("application/x-www-form-urlencoded; charset=UTF-8", "/token", True),
        ("Application/X-WWW-Form-Urlencoded", "/token?a=1?b", True),
        ("application/json", "/token", False),
        ("application/x-www-form-urlencoded", "/token/x", False),
    ],
)
def test_a_token_request_is_recognised_by_its_media_type_and_path(
    content_type, target, credentialed
):
    verdict = decided(
        f"POST {target} HTTP/1.1\nHost: 127.0.0.1:8080\nContent-Type: {content_type}\n"
        "Content-Length: 2",
        "assertion",
    )
    assert (verdict.credential, verdict.read_body) == (credentialed, credentialed)


@pytest.mark.parametrize(
    "target,endpoint,under",
    [
        (b"/mcp?a=1?b", b"/mcp", True),
        (b"/mcp/x?y", b"/mcp/", True),
        (b"/mcp/./tools", b"/mcp", False),
        (b"/mcp/../admin", b"/mcp", False),
        (b"/api/x", b"/apiX", False),
        (b"/apiX/x", b"/apiX", True),
    ],
)
def test_under_endpoint(target, endpoint, under):
    assert decide.under_endpoint(target, endpoint) is under


def test_field_values_lose_only_surrounding_spaces_and_tabs():
    request = decide.Request.from_head(
        parsed(b"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nMcp-Name: \tXecho X \r\n\r\n")
    )
    assert request.fields[b"mcp-name"] == [b"Xecho X"]


def test_an_encoded_body_is_refused_as_a_json_rpc_error():
    verdict = decided(
        "POST /mcp HTTP/1.1\nHost: 127.0.0.1:8080\nContent-Encoding: gzip\nContent-Length: 2",
        policy=policy_engine(),
    )
    assert (verdict.status, verdict.rpc_code) == (415, jsonrpc.INVALID_REQUEST)


def test_reject_mode_leaves_a_passthrough_servers_requests_alone():
    verdict = decided(
        "GET /mcp HTTP/1.1\nHost: 127.0.0.1:8080\nAuthorization: Bearer its-own",
        "passthrough",
        workload_authorization="reject",
    )
    assert (verdict.action, verdict.strip, verdict.credential) == (decide.FORWARD, False, False)
