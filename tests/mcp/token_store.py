"""The MCP SDK's TokenStorage for a client that lives for one run: tokens and client info
in memory (the test workloads' OAuth clients: tests/mcp/spiffe_client.py,
tests/oidc/workload.py)."""

from __future__ import annotations

from typing import Any


class Memory:
    def __init__(self) -> None:
        self.tokens: Any = None
        self.client: Any = None

    async def get_tokens(self) -> Any:
        return self.tokens

    async def set_tokens(self, tokens: Any) -> None:
        self.tokens = tokens

    async def get_client_info(self) -> Any:
        return self.client

    async def set_client_info(self, info: Any) -> None:
        self.client = info
