"""JSON nested deeper than the interpreter can read is each reader's own refusal, never an
exception past it (agent/jsondoc.py). json's C scanner raises RecursionError, not
ValueError, for it: a few kilobytes of `[` from a workload, a server or SPIRE used to escape
the code that answers and audits a refusal. Each row is one reader of a peer's JSON, given
such a document where its peer would put one."""

from __future__ import annotations

import base64
import json

import pytest

from agent import jsondoc
from agent.attest.kubelet_errors import KubeletError
from agent.attest.kubelet_pods import parse_pod_list
from agent.identity.bundle import BundleError, TrustBundle
from agent.identity.spiffeid import TrustDomain
from agent.inject import assertion, phantom
from agent.inject.answered import EventStream
from agent.policy import jsonrpc

DEEP = b"[" * 100_000 + b"]" * 100_000  # far past any recursion limit


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def test_too_deep_is_a_value_error_and_everything_else_reads_as_json_does():
    with pytest.raises(json.JSONDecodeError):
        json.loads(DEEP[:10])
    with pytest.raises(jsondoc.NestedTooDeep) as refused:
        jsondoc.loads(DEEP)
    assert isinstance(refused.value, ValueError)
    assert jsondoc.loads(b'{"a": [1, {"b": null}]}') == {"a": [1, {"b": None}]}
    assert jsondoc.loads("[1]", object_pairs_hook=dict) == [1]
    with pytest.raises(json.JSONDecodeError):
        jsondoc.loads(b"not json")


def test_a_workloads_client_assertion_nested_too_deep_is_no_jwt():
    # assertion mode: a JSON-serialized JWS the workload sent as its client_assertion
    assert assertion.is_jwt('{"payload": ' + DEEP.decode() + "}") is False


def test_a_placeholder_whose_payload_nests_too_deep_is_no_placeholder():
    token = f"{b64(b'{}')}.{b64(DEEP)}.{b64(b'sig')}"
    assert phantom._claims_unverified(token) is None


def test_a_json_rpc_body_nested_too_deep_is_a_parse_error():
    with pytest.raises(jsonrpc.Malformed, match="nests too deep") as refused:
        jsonrpc.parse_calls(DEEP)
    assert refused.value.code == jsonrpc.PARSE_ERROR


def test_an_mcp_answer_nested_too_deep_names_no_response():
    stream = EventStream()
    stream.feed(b"data: " + DEEP + b"\n\n")
    assert stream.responses == set()


def test_a_kubelet_pod_list_nested_too_deep_is_not_json():
    with pytest.raises(KubeletError, match="not JSON"):
        parse_pod_list(DEEP)


def test_a_bundle_nested_too_deep_is_not_valid_json():
    with pytest.raises(BundleError, match="not valid JSON"):
        TrustBundle.from_jwks_json(TrustDomain("example.org"), DEEP)
