"""Assertion mode's routing (agent/inject/assertion_route.py) as the workload and the
authorization server see it: a token POST whose path an authorization server could route
to another endpoint (a dot segment anywhere, at the end included) is refused by the
decision, and paths are compared as oidc-provider routes them (one trailing slash dropped,
so `//` is the root). Sans-IO."""

from __future__ import annotations

import pytest

from agent.config import InjectSection
from agent.inject import decide
from agent.inject.assertion_route import FORM, TOKEN, assertion_request
from agent.inject.upstreams import Upstream, authorities
from tests.unit.test_decide import parsed

SETTINGS = InjectSection(unattested="deny", workload_authorization="strip")
CALLER = decide.Caller(True, "spiffe://example.org/bot")
AS = Upstream(
    "as",
    "http",
    "127.0.0.1",
    8080,
    "http://127.0.0.1:8080",
    "assertion",
    b"/token",
    authorities("http", "127.0.0.1:8080", 8080),
)


def token_post(target: bytes):
    data = (
        b"POST " + target + b" HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n"
        b"Content-Type: " + FORM + b"\r\nContent-Length: 0\r\n\r\n"
    )
    req = decide.Request.from_head(parsed(data))
    return decide.decide(req, AS, CALLER, SETTINGS, None)


@pytest.mark.parametrize(
    "target",
    [
        b"/./token",  # a dot segment at the start
        b"/a/./token",
        b"/token/.",  # a dot segment at the end: the server reads /token/
        b"/token/..",
        b"/x/token/..?q=1",
    ],
)
def test_a_form_post_to_a_path_with_a_dot_segment_is_refused(target):
    v = token_post(target)
    assert v.action == decide.ANSWER
    assert (v.status, v.outcome) == (400, "target_refused")


@pytest.mark.parametrize("target", [b"/token", b"/TOKEN/", b"/token?x=/./", b"/token/.well"])
def test_a_form_post_to_a_plain_path_is_not_refused_for_its_path(target):
    assert token_post(target).outcome != "target_refused"


@pytest.mark.parametrize(("target", "token_path"), [(b"/", b"//"), (b"//", b"/")])
def test_the_root_and_the_root_with_one_trailing_slash_are_one_endpoint(target, token_path):
    # oidc-provider drops one trailing slash: "//" routes to "/", so a token endpoint at
    # either is reached by a form POST to the other, and credless authenticates it
    assert assertion_request(target, FORM, token_path) == TOKEN
