"""Assertion mode's routing: which POST to the authorization server is a token request or a
registration, read as the server routes it. Sans-IO.

credless adds its client authentication to exactly these (agent/inject/assertion.py), and
the workload's own is refused there; a request the server routes to one of these endpoints
but credless does not recognise would reach it with the workload's own credentials and
registration metadata. So paths are compared as the server routes them (route_key), and a
path whose routing servers disagree on is refused by the decision (request.plain_path).
"""

from __future__ import annotations

from agent.inject import http1

# assertion mode (agent/inject/assertion.py): the requests whose client authentication
# credless provides. A token request is a form POST to the configured token endpoint (every
# grant: the client authenticates the same way whatever it asks for); a registration
# (RFC 7591) is a JSON POST to the registration endpoint, which only the authorization
# server's metadata names: decide() admits every JSON POST to the server as a candidate (its
# body read, nothing added yet) and assertion_request(..., registration=) settles it.
TOKEN, REGISTRATION, CANDIDATE = "token", "registration", "registration?"
FORM = b"application/x-www-form-urlencoded"
JSON = b"application/json"


def assertion_request(
    target: bytes, content_type: bytes | None, token_path: bytes, registration: bytes | None = None
) -> str | None:
    """Which assertion-mode request a POST is: TOKEN, REGISTRATION (registration: the
    registration endpoint's path, once known), CANDIDATE (a JSON POST while it is not), or
    None (anything else: forwarded as sent, with nothing of credless's in it)."""
    path = route_key(target.split(b"?", 1)[0])
    kind = http1.media_type(content_type)
    token = route_key(token_path)
    if kind == FORM:
        return TOKEN if path == token else None
    if kind == JSON and path != token:  # (the token endpoint registers no one)
        if registration is None:
            return CANDIDATE
        return REGISTRATION if path == route_key(registration) else None
    return None


def route_key(path: bytes) -> bytes:
    """A path as authorization servers route it: oidc-provider's router folds ASCII case and
    drops one trailing slash, so /TOKEN/ is its token endpoint. Paths whose routing differs
    more between servers (percent-encoding, empty or dot segments, `;`) are refused before
    this is asked (request.plain_path)."""
    if len(path) > 1 and path.endswith(b"/"):
        path = path[:-1]
    return path.upper()
