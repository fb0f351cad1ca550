"""Which `[[servers]]` entry an operator means: named by its `name` or by a URL.

Every command that takes a server (`credless oauth probe --server`, `policy explain
--server`, `explain --url`) resolves it here, so a name and the URL it was configured with
mean the same server everywhere, and a server that is not configured is refused naming the
ones that are (once, `policy explain` given a URL answered "has no rules": a typo read as a
server without policy).

A URL matches a server when it is the server's `url` or `workload_url` up to spelling: the
scheme and host in any case, the default port written or not, a trailing slash or not
(agent/urls.py reads origins the same way for the OAuth trust checks).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol, TypeVar
from urllib.parse import urlsplit

from agent.urls import origin


class ServerLike(Protocol):
    """What is read of a server (agent.config.ServerSection)."""

    @property
    def name(self) -> str: ...
    @property
    def url(self) -> str: ...
    @property
    def workload_url(self) -> str: ...


S = TypeVar("S", bound=ServerLike)


class UnknownServer(ValueError):
    """No configured server has that name or URL; the message names the known ones."""


def looks_like_url(value: str) -> bool:
    return "://" in value


def canonical(url: str) -> tuple[str, str, int, str] | None:
    """(scheme, host, port, path) as a URL names a server; None for anything not http(s)."""
    o = origin(url)
    if o is None:
        return None
    return (*o, urlsplit(url).path.rstrip("/"))


def known(servers: Iterable[ServerLike]) -> str:
    """The configured servers, for a message: `weather (http://…/mcp), …`."""
    names = [f"{s.name} ({s.url})" for s in servers]
    return ", ".join(names) if names else "none (the configuration has no [[servers]])"


def find(servers: Iterable[S], value: str) -> S | None:
    """The server named `value`, or whose url or workload_url `value` is; None if none."""
    servers = list(servers)
    for s in servers:
        if s.name == value:
            return s
    want = canonical(value) if looks_like_url(value) else None
    if want is None:
        return None
    for s in servers:
        if want in (canonical(s.url), canonical(s.workload_url) if s.workload_url else None):
            return s
    return None


def resolve(servers: Iterable[S], value: str) -> S:
    """The server `value` names (by name or URL); UnknownServer naming the known ones."""
    servers = list(servers)
    found = find(servers, value)
    if found is not None:
        return found
    raise UnknownServer(f"{unknown_reason(servers, value)}; known: {known(servers)}")


def unknown_reason(servers: Iterable[ServerLike], value: str) -> str:
    """Why value names no configured server, with the nearest hint: a URL on a configured
    server's address but another path is that server's address, not its MCP endpoint."""
    if not looks_like_url(value):
        return f"no [[servers]] entry is named {value!r}"
    want = canonical(value)
    if want is None:
        return f"{value!r} is not an http(s) URL"
    for s in servers:
        for url in (s.url, s.workload_url):
            have = canonical(url) if url else None
            if have is not None and have[:3] == want[:3]:
                return (
                    f"{value!r} is on the address of [[servers]] {s.name!r}, whose MCP "
                    f"endpoint is {url}"
                )
    return f"no [[servers]] entry has the URL {value!r}"
