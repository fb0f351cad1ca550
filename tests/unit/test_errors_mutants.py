"""What an operator reads when a request to an authorization server got no HTTP answer
(agent/oauth/errors.py describe_failure and unavailable), found by mutation testing: each
kind of failure in its own words, with the timeout httpx applied for that phase (read,
connect, write, pool) when the request recorded one, and what the transport said when it said
anything; the result a ServerUnavailable naming the URL, worth retrying.

httpx's exceptions are made here as its transports raise them, on a request whose
extensions carry (or lack) the timeouts; nothing is dialled."""

from __future__ import annotations

import httpx
import pytest

from agent.oauth.errors import ServerUnavailable, describe_failure, unavailable

URL = "https://as.example/token"
HEAD = f"token request to {URL}: "
# a distinct timeout per phase, so that a message naming another phase's shows
TIMEOUTS = {"connect": 1.5, "read": 10, "write": 2.5, "pool": 4}


def request(timeout: object = TIMEOUTS) -> httpx.Request:
    extensions = {} if timeout is None else {"timeout": timeout}
    return httpx.Request("POST", URL, extensions=extensions)


@pytest.mark.parametrize(
    "cls,said",
    [
        (httpx.ReadTimeout, "no answer after 10.0 s"),
        (httpx.ConnectTimeout, "could not connect within 1.5 s"),
        (httpx.WriteTimeout, "could not send the request within 2.5 s"),
        (httpx.PoolTimeout, "no connection free within 4.0 s"),
    ],
)
def test_a_timeout_says_what_did_not_happen_within_that_phases_timeout(cls, said):
    e = cls("timed out", request=request())
    assert describe_failure(e, "token request", URL) == HEAD + said


@pytest.mark.parametrize(
    "cls,said",
    [
        (httpx.ReadTimeout, "no answer"),
        (httpx.ConnectTimeout, "could not connect"),
        (httpx.WriteTimeout, "could not send the request"),
        (httpx.PoolTimeout, "no connection free"),
    ],
)
@pytest.mark.parametrize(
    "made",
    [
        lambda cls: cls("timed out", request=request(None)),  # no timeout recorded
        lambda cls: cls("timed out", request=request({})),
        # httpx.Timeout(None): no limit for any phase
        lambda cls: cls("timed out", request=request(dict.fromkeys(TIMEOUTS))),
        lambda cls: cls("timed out"),  # raised without its request
    ],
    ids=["no-extension", "empty", "unlimited", "no-request"],
)
def test_a_timeout_without_a_recorded_limit_says_no_number(cls, said, made):
    assert describe_failure(made(cls), "token request", URL) == HEAD + said


@pytest.mark.parametrize(
    "e,said",
    [
        (
            httpx.ConnectError("[Errno 111] Connection refused  "),
            "could not connect ([Errno 111] Connection refused)",
        ),
        (httpx.ConnectError(" \n"), "could not connect"),
        (
            httpx.RemoteProtocolError("Server disconnected without sending a response."),
            "the server closed the connection without answering",
        ),
        (
            httpx.RemoteProtocolError("illegal status line"),
            "RemoteProtocolError: illegal status line",
        ),
        (httpx.RemoteProtocolError(""), "RemoteProtocolError"),
        (
            httpx.ReadError("[Errno 104] Connection reset by peer"),
            "the connection was broken before a complete answer arrived "
            "([Errno 104] Connection reset by peer)",
        ),
        # only the protocol error is a close without an answer, whatever another one says
        (
            httpx.ReadError("closed without sending a response"),
            "the connection was broken before a complete answer arrived "
            "(closed without sending a response)",
        ),
        (httpx.ReadError(""), "the connection was broken before a complete answer arrived"),
        (
            httpx.UnsupportedProtocol("Request URL has an unsupported protocol 'ftp://'."),
            "UnsupportedProtocol: Request URL has an unsupported protocol 'ftp://'.",
        ),
        (httpx.ProxyError(" "), "ProxyError"),
    ],
)
def test_a_failure_without_an_answer_is_said_in_words_an_operator_can_act_on(e, said):
    assert describe_failure(e, "token request", URL) == HEAD + said


def test_an_unavailable_server_is_worth_retrying_and_names_the_url():
    e = httpx.ReadTimeout("timed out", request=request())
    err = unavailable(e, "revocation", URL)
    assert isinstance(err, ServerUnavailable) and err.kind == "unavailable"
    assert (err.url, err.status, err.error) == (URL, None, None)
    assert str(err) == f"revocation to {URL}: no answer after 10.0 s"
