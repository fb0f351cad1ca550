"""A credential-less MCP workload: the official `mcp` Python SDK client, no auth configured.

    python -m tests.mcp.client URL STEP... [--header 'Name: value'] [--ca-file F]
    steps: list | call:TOOL[:json-args] | stream:N:DELAY_MS | hold (until a line on stdin)
Prints one JSON line per step; on failure an {"error": ...} line and exit 1, with the
message the SDK surfaced (and a JSON-RPC error's code and data).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import ssl
import sys
import time

import httpx2
from mcp import Client
from mcp.client.streamable_http import streamable_http_client


def emit(obj) -> None:
    print(json.dumps(obj), flush=True)


def text_of(result) -> str:
    return "".join(getattr(c, "text", "") for c in result.content)


async def run(args) -> int:
    headers = dict(h.split(": ", 1) for h in args.header)
    verify = ssl.create_default_context(cafile=args.ca_file) if args.ca_file else True
    http = httpx2.AsyncClient(
        headers=headers, verify=verify, trust_env=False, timeout=httpx2.Timeout(30, read=60)
    )
    async with Client(streamable_http_client(args.url, http_client=http)) as client:
        for step in args.steps:
            kind, _, rest = step.partition(":")
            if kind == "list":
                tools = await client.list_tools()
                emit({"step": "list", "tools": sorted(t.name for t in tools.tools)})
            elif kind == "call":
                tool, _, raw = rest.partition(":")
                result = await client.call_tool(tool, json.loads(raw) if raw else {})
                emit(
                    {
                        "step": "call",
                        "tool": tool,
                        "text": text_of(result),
                        "is_error": bool(result.is_error),
                    }
                )
            elif kind == "hold":  # keep the process (and its identity) until a line comes
                emit({"step": "hold"})
                await asyncio.to_thread(sys.stdin.readline)
            elif kind == "stream":
                n, delay = (int(x) for x in rest.split(":"))
                t0 = time.monotonic()
                arrivals: list[float] = []

                async def progress(p, total, message, arrivals=arrivals, t0=t0):
                    arrivals.append(round((time.monotonic() - t0) * 1000, 1))

                result = await client.call_tool(
                    "stream_count", {"n": n, "delay_ms": delay}, progress_callback=progress
                )
                emit(
                    {
                        "step": "stream",
                        "text": text_of(result),
                        "progress_ms": arrivals,
                        "done_ms": round((time.monotonic() - t0) * 1000, 1),
                    }
                )
    return 0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("url")
    ap.add_argument("steps", nargs="+")
    ap.add_argument("--header", action="append", default=[])
    ap.add_argument("--ca-file")
    args = ap.parse_args()
    try:
        return asyncio.run(run(args))
    except BaseException as e:  # noqa: BLE001 - the test reads what went wrong
        inner = e
        while isinstance(inner, BaseExceptionGroup) and inner.exceptions:
            inner = inner.exceptions[0]
        status = getattr(getattr(inner, "response", None), "status_code", None)
        # what the SDK surfaces to its user: for a JSON-RPC error, its message (MCPError's
        # str), code and data
        error = getattr(inner, "error", None)
        emit(
            {
                "error": type(inner).__name__,
                "message": str(inner)[:2000],
                "status": status,
                "code": getattr(error, "code", None),
                "data": getattr(error, "data", None),
            }
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
