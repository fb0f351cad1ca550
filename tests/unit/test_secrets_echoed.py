"""Secrets another party hands back: an authorization server that echoes what credless sent
it, or answers with a value that is not what its field must be.

Found by review (stop 34). The audit stream redacted by field name only: a server refusing a
client assertion with `error_description: "could not verify client_assertion eyJ..."` had
the whole assertion written into the token.failed event's reason (a JWT-SVID, usable at that
server until it expired), and the same for a software statement echoed by a registration
endpoint. And nothing checked the characters of an access token or a registration access
token before they went into an Authorization field: a CR LF in one made a second request
(past policy) or an error that quoted it. Now every line of the audit, the diagnostics and
the admin socket is scrubbed as written (agent/observe/logging.py), and a token that is not
a token68 is refused where it comes in (agent/oauth/tokens.py, agent/oauth/registration.py).
The servers here are the recorded network of test_service_mutants.py, answering as such a
server would.
"""

from __future__ import annotations

import asyncio
import gc
import io
import json
from urllib.parse import parse_qsl

import httpx
import pytest

from agent.oauth.errors import MalformedResponse, OAuthError
from agent.oauth.tokens import Token
from agent.observe import logging as obs
from agent.observe.logging import AuditLog
from tests.unit.test_service_mutants import AS, IDENT, TOKEN_EP, World, answer, server


@pytest.fixture
def world(tmp_path, monkeypatch):
    return lambda *servers, **kw: World(tmp_path, monkeypatch, *servers, **kw)


def fails(w: World) -> OAuthError:
    async def go() -> OAuthError:
        async with w:
            with pytest.raises(OAuthError) as err:
                await w.svc.token(IDENT, "mcp")
            return err.value

    return asyncio.run(go())


def echo_assertion(request: httpx.Request) -> httpx.Response:
    form = dict(parse_qsl(request.content.decode()))
    return httpx.Response(
        400,
        json={
            "error": "invalid_client",
            "error_description": "could not verify client_assertion " + form["client_assertion"],
        },
    )


def echo_statement(request: httpx.Request) -> httpx.Response:
    meta = json.loads(request.content)
    return httpx.Response(
        400,
        json={
            "error": "invalid_software_statement",
            "error_description": "bad statement " + meta["software_statement"],
        },
    )


def test_a_client_assertion_the_server_echoes_is_in_no_audit_event_nor_diagnostic(world):
    w = world(server())
    w.net.routes[f"POST {TOKEN_EP}"] = echo_assertion
    diag = io.StringIO()
    obs.configure(level="debug", fmt="json", stream=diag)  # tests/conftest.py puts it back
    err = fails(w)
    assertion = w.minter.minted[0].token
    assert assertion in str(err)  # the server did echo it: what credless says must not
    (failed,) = w.audit("token.failed")
    assert "could not verify client_assertion [redacted]" in failed["reason"]
    assert assertion not in w.audit_out.getvalue()
    assert diag.getvalue() and assertion not in diag.getvalue()


def test_a_software_statement_a_registration_endpoint_echoes_is_in_no_audit_event(world):
    w = world(server(registration="dynamic"), jwks_uri="https://b.example/k")
    w.net.routes[f"POST {AS}/register"] = echo_statement
    fails(w)
    statement = w.minter.minted[0].token
    (failed,) = w.audit("token.failed")
    assert "bad statement [redacted]" in failed["reason"]
    assert statement not in w.audit_out.getvalue()


JWT = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJl"
PEM = "-----BEGIN PRIVATE KEY-----\nMIGHAgEAMBMG\n-----END PRIVATE KEY-----"


@pytest.mark.parametrize(
    "fields",
    [
        {"reason": f"server said {JWT}"},  # a field whose name says nothing
        {"detail": {"headers": {"x": f"Bearer {JWT}"}}},  # nested
        {"calls": [{"args": [JWT]}]},  # in a list
        {"raw": JWT.encode()},  # bytes, rendered by str()
        {"key_text": PEM, "after": "kept"},  # a private key, and the field after it
        {"cut": PEM.split("-----END")[0], "after": "kept"},  # a key cut short
    ],
    ids=["field", "nested", "list", "bytes", "pem", "pem-cut-short"],
)
def test_every_audit_line_is_scrubbed_wherever_the_secret_sits_and_stays_json(fields):
    out = io.StringIO()
    audit = AuditLog("node", stream=out, flush_interval=0)
    seen: list[str] = []
    audit.add_tap(seen.append)
    audit.emit("request.failed", **fields)
    audit.emit_with("request.failed", audit.fragment(**fields), status=502)
    audit.shape("request.failed", "status").emit(audit.fragment(**fields), 502)
    audit.flush()
    lines = out.getvalue().splitlines()
    assert len(lines) == 3 and seen == lines  # the taps (credless explain) see the same
    for line in lines:
        event = json.loads(line)  # still JSON
        assert JWT not in line and "MIGHAgEAMBMG" not in line and "[redacted]" in line
        if "after" in fields:
            assert event["after"] == "kept"


def test_a_diagnostic_is_scrubbed_wherever_the_secret_sits():
    out = io.StringIO()
    obs.configure(level="info", fmt="json", stream=out)
    log = obs.get_logger("test")
    log.info("nested", detail={"headers": [f"Bearer {JWT}"]}, raw=JWT.encode())
    try:
        raise ValueError(f"refused {JWT}")
    except ValueError:
        log.exception("traceback")
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and JWT not in out.getvalue()
    assert all(json.loads(line) for line in lines)


def test_a_library_log_record_is_a_diagnostic_scrubbed_like_the_others():
    """asyncio logs a task's unretrieved exception, traceback and all, through the standard
    library's logging, which had no handler: Python printed it to stderr unscrubbed."""
    out = io.StringIO()
    obs.configure(level="info", fmt="json", stream=out)

    async def lost() -> None:
        async def refuse() -> None:
            raise ValueError(f"the server refused {JWT}")

        task = asyncio.ensure_future(refuse())
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        del task

    asyncio.run(lost())
    gc.collect()  # the task's __del__ logs it
    (line,) = [json.loads(x) for x in out.getvalue().splitlines()]
    assert line["component"] == "asyncio" and line["level"] == "error"
    assert line["event"].startswith("Task exception was never retrieved")
    assert "the server refused [redacted]" in line["exception"] and JWT not in out.getvalue()


def test_in_assertion_mode_the_workload_never_gets_back_the_assertion_credless_minted():
    """The workload's token request goes to the authorization server with credless's client
    assertion in it; a server that quoted the assertion in its error handed it to the
    workload, which is to hold no credential (found by review, stop 34)."""
    from tests.unit import test_assertion_seams as seams

    async def go() -> tuple[int, dict, str, bytes]:
        w = seams.AsWorld(seams.AsTokens(seams.server()))
        relay = w.upstream.data_received
        seen: dict[str, bytes] = {}

        def quote_it(_data: bytes) -> None:
            seen["request"], form = w.upstream.transport.out.split(b"\r\n\r\n", 1)
            seen["minted"] = dict(parse_qsl(form.decode()))["client_assertion"].encode()
            error = b'{"error": "invalid_client", "error_description": "no: %s"}' % seen["minted"]
            relay(
                b"HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(error), error)
            )

        w.upstream.data_received = quote_it  # type: ignore[method-assign]
        await w.send(
            b"/token", b"grant_type=client_credentials", *seams.FORM, b"Accept-Encoding: gzip"
        )
        status, doc = w.answer()
        return status, doc, seen["minted"].decode(), seen["request"]

    status, doc, minted, request = asyncio.run(go())
    assert status == 400 and doc["error"] == "invalid_client"
    assert minted.startswith("eyJ") and doc["error_description"] == "no: " + "*" * len(minted)
    assert b"accept-encoding" not in request.lower()  # the answer comes uncompressed


NOT_TOKEN68 = [
    "abc\r\nX-Evil: 1\r\n\r\nGET /smuggled HTTP/1.1",  # a second request
    "abc def",
    "abc\x00",
    "tok\u00e9n",
    "e30=.e30.sig",  # "=" only at its end
    "",
]


@pytest.mark.parametrize("access", NOT_TOKEN68, ids=range(len(NOT_TOKEN68)))
def test_an_access_token_that_is_not_a_token68_is_refused_and_never_quoted(world, access):
    w = world(server())
    w.net.routes[f"POST {TOKEN_EP}"] = answer(
        200, {"access_token": access, "token_type": "Bearer", "expires_in": 300}
    )
    err = fails(w)
    assert isinstance(err, MalformedResponse)
    if access:
        assert "not a token68" in str(err)
        assert access not in str(err) and access not in w.audit_out.getvalue()
    assert w.svc.cache.tokens() == []


def test_a_refused_access_token_names_the_token_endpoint_that_gave_it(world):
    w = world(server())
    w.net.routes[f"POST {TOKEN_EP}"] = answer(
        200, {"access_token": "abc def", "token_type": "Bearer", "expires_in": 300}
    )
    err = fails(w)
    assert isinstance(err, MalformedResponse) and err.url == TOKEN_EP
    assert str(err).startswith(f"token response from {TOKEN_EP}: the access token is not a token68")


@pytest.mark.parametrize("access", [a for a in NOT_TOKEN68 if a], ids=range(len(NOT_TOKEN68) - 1))
def test_no_token_holds_what_is_not_a_token68_however_it_is_made(access):
    """A handover's tokens are made from the other agent's data (agent/handover_tokens.py)."""
    with pytest.raises(ValueError, match="is not a token68") as err:
        Token(access, "Bearer", 0, 1e12, "", "r", "i", "s", "c", None, "fp", None)
    assert access not in str(err.value)


def test_a_token_refused_as_not_a_token68_is_named_by_its_fingerprint():
    with pytest.raises(ValueError) as err:
        Token("abc def", "Bearer", 0, 1e12, "", "r", "i", "s", "c", None, "fp-1", None)
    assert str(err.value).startswith("access token fp-1 is not a token68")


@pytest.mark.parametrize("ttype", ["mac", "bearer", ""])
def test_no_token_is_of_a_type_other_than_bearer_or_dpop(ttype):
    """parse_token_response spells the two types so; a token made otherwise (a handover's)
    of another type is refused, the type named."""
    with pytest.raises(ValueError) as err:
        Token("abc", ttype, 0, 1e12, "", "r", "i", "s", "c", None, "fp", None)
    assert str(err.value) == f"token type {ttype!r} is neither Bearer nor DPoP"


@pytest.mark.parametrize("management", ["rat secret", "rat\r\nX: 1", 12345])
def test_a_registration_access_token_that_is_not_a_token68_refuses_the_registration(
    world, management
):
    w = world(server(registration="dynamic"), jwks_uri="https://b.example/k")
    w.net.routes[f"POST {AS}/register"] = answer(
        201,
        {
            "client_id": "dyn-1",
            "registration_client_uri": f"{AS}/register/dyn-1",
            "registration_access_token": management,
        },
    )
    err = fails(w)
    assert isinstance(err, MalformedResponse)
    assert "registration_access_token that is not a token68" in str(err)
    assert str(management) not in str(err) and str(management) not in w.audit_out.getvalue()
    assert w.net.to(TOKEN_EP) == []  # no token asked for with a client it could not manage


def test_a_refused_registration_access_token_names_the_registration_endpoint(world):
    w = world(server(registration="dynamic"), jwks_uri="https://b.example/k")
    w.net.routes[f"POST {AS}/register"] = answer(
        201, {"client_id": "dyn-1", "registration_access_token": "rat secret"}
    )
    err = fails(w)
    assert isinstance(err, MalformedResponse) and err.url == f"{AS}/register"
    assert str(err).startswith(f"registration at {AS}/register returned a registration_access")
