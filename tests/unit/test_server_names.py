"""One reading of "which server" for every command: by name or by URL, unknown refused."""

from __future__ import annotations

import pytest

from agent import server_names
from agent.config import ServerSection

WEATHER = ServerSection(name="weather", url="https://Weather.example:443/mcp/")
LOCAL = ServerSection(
    name="local",
    url="https://tools.example/mcp",
    workload_url="http://127.0.0.1:8080/mcp",
)
SERVERS = [WEATHER, LOCAL]


@pytest.mark.parametrize(
    "value",
    [
        "weather",
        "https://weather.example/mcp",
        "HTTPS://WEATHER.EXAMPLE:443/mcp/",
        "https://weather.example/mcp/",
    ],
)
def test_a_server_by_its_name_or_its_url_however_spelled(value):
    assert server_names.resolve(SERVERS, value) is WEATHER


def test_a_workload_url_names_its_server():
    assert server_names.resolve(SERVERS, "http://127.0.0.1:8080/mcp") is LOCAL
    assert server_names.resolve(SERVERS, "local") is LOCAL


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("wether", "no [[servers]] entry is named 'wether'"),
        ("https://other.example/mcp", "no [[servers]] entry has the URL"),
        (
            "https://weather.example/admin",
            "is on the address of [[servers]] 'weather', whose MCP endpoint is",
        ),
        ("http://weather.example/mcp", "no [[servers]] entry has the URL"),  # another port
        ("ftp://weather.example/mcp", "is not an http(s) URL"),
    ],
)
def test_an_unknown_server_is_refused_naming_the_known_ones(value, why):
    with pytest.raises(server_names.UnknownServer) as e:
        server_names.resolve(SERVERS, value)
    assert why in str(e.value)
    assert str(e.value).endswith(
        "known: weather (https://Weather.example:443/mcp/), local (https://tools.example/mcp)"
    )


def test_no_servers_configured_says_so():
    with pytest.raises(server_names.UnknownServer, match=r"known: none \(the configuration"):
        server_names.resolve([], "weather")
    assert server_names.find([], "https://weather.example/mcp") is None
