"""parse_forbidden over the kubelet's 403 wordings (pkg/kubelet/server/server.go): before
1.32 one `subresource=`, from 1.32 the list it tried, `subresource(s)=[pods proxy]`."""

from __future__ import annotations

import pytest

from agent.attest.kubelet_errors import Forbidden, KubeletError, parse_forbidden

SA = "system:serviceaccount:credless:credless"


@pytest.mark.parametrize(
    "body, want",
    [
        (
            f"Forbidden (user={SA}, verb=get, resource=nodes, subresource=proxy)",
            Forbidden(SA, "get", ("proxy",)),
        ),
        (
            f"Forbidden (user={SA}, verb=get, resource=nodes, subresource(s)=[proxy])\n",
            Forbidden(SA, "get", ("proxy",)),
        ),
        (
            f"Forbidden (user={SA}, verb=get, resource=nodes, subresource(s)=[pods proxy])",
            Forbidden(SA, "get", ("pods", "proxy")),
        ),
        (
            b"Forbidden (user=system:anonymous, verb=get, resource=nodes, "
            b"subresource(s)=[healthz proxy])",
            Forbidden("system:anonymous", "get", ("healthz", "proxy")),
        ),
    ],
    ids=["before-1.32", "1.32-gate-off", "fine-grained", "healthz-bytes"],
)
def test_the_kubelets_wordings(body, want):
    assert parse_forbidden(body) == want


@pytest.mark.parametrize(
    "forbidden, fine_grained, grant",
    [
        (Forbidden(SA, "get", ("proxy",)), False, "nodes/proxy"),
        (Forbidden(SA, "get", ("pods", "proxy")), True, "nodes/pods"),
        (Forbidden(SA, "get", ("stats",)), False, "nodes/stats"),
        (Forbidden(SA, "get", ()), False, None),
    ],
)
def test_what_to_grant(forbidden, fine_grained, grant):
    assert (forbidden.fine_grained, forbidden.grant) == (fine_grained, grant)


@pytest.mark.parametrize(
    "body",
    [
        "",
        "Forbidden",
        "Unauthorized",
        '{"kind":"Status","status":"Failure","reason":"Forbidden"}',
        # the API server's proxy words it differently; not the kubelet's
        f"Forbidden (user={SA}, verb=get, resource=pods, subresource(s)=[proxy])",
        f"Forbidden (user={SA}, verb=get, resource=nodes, subresource(s)=[PODS])",
        "Forbidden (user=" + "x" * 300 + ", verb=get, resource=nodes, subresource=proxy)",
        b"\xff\xfe Forbidden (user=a, verb=get, resource=nodes",
    ],
    ids=["empty", "bare", "401", "status-json", "not-nodes", "upper", "long-user", "cut"],
)
def test_anything_else_is_not_a_kubelet_403(body):
    assert parse_forbidden(body) is None


def test_only_the_start_of_a_large_body_is_searched():
    tail = f"Forbidden (user={SA}, verb=get, resource=nodes, subresource=proxy)"
    assert parse_forbidden("x" * 5000 + tail) is None
    assert parse_forbidden("x" * 100 + tail) == Forbidden(SA, "get", ("proxy",))


def test_kubelet_error_defaults():
    e = KubeletError("kubelet /pods response is not JSON")
    assert (e.status, e.outcome, e.grant) == (None, "bad_response", None)
