"""JSON that a peer wrote, read one way: a document nested too deep is a ValueError.

Every JSON document credless reads from a peer (the workload's request bodies and tokens, an
MCP or authorization server's answers, SPIRE, the kubelet) is refused on ValueError: that is
what json raises for bytes that are not JSON. But for an array or object nested deeper than
the interpreter's recursion limit, json's C scanner raises RecursionError instead, which no
caller expected: a few kilobytes of `[` from a peer became an exception in the middle of a
request, past the code that audits and answers refusals. `loads` turns it into
`NestedTooDeep`, a ValueError, so each caller's own refusal applies.
"""

from __future__ import annotations

import base64
import json
from typing import Any


class NestedTooDeep(ValueError):
    """The document nests arrays or objects deeper than this interpreter can read."""


def loads(data: str | bytes | bytearray, **kwargs: Any) -> Any:
    """json.loads, raising NestedTooDeep (a ValueError) where json raises RecursionError."""
    try:
        return json.loads(data, **kwargs)
    except RecursionError:
        raise NestedTooDeep("the JSON document nests too deep") from None


def loads_b64url(segment: str) -> Any:
    """The JSON of a base64url segment, as a JWT's header and payload are written (RFC 7515
    §2: no padding). A segment that is not base64url is a ValueError (binascii.Error)."""
    return loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
