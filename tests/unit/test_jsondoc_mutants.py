"""JSON a peer wrote (agent/jsondoc.py), found by mutation testing: the error a document
nested too deep is says so, and a JWT segment that is not base64url (a `=` inside it) is
refused, never read as the JSON its padded form might decode to."""

from __future__ import annotations

import base64

import pytest

from agent import jsondoc

DEEP = "[" * 100_000 + "]" * 100_000


def test_a_document_nested_too_deep_says_so():
    with pytest.raises(jsondoc.NestedTooDeep) as refused:
        jsondoc.loads(DEEP)
    assert "JSON document nests too deep" in str(refused.value)


def test_a_segment_with_padding_inside_it_is_no_base64url():
    segment = base64.urlsafe_b64encode(b'{"a":1}').decode().rstrip("=")
    assert jsondoc.loads_b64url(segment) == {"a": 1}
    for at in range(1, len(segment)):  # one `=` inside: not base64url, whatever follows
        inside = segment[:at] + "=" + segment[at:]
        with pytest.raises(ValueError):
            jsondoc.loads_b64url(inside)
