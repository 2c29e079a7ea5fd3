"""A stateful MCP server (Python SDK, Streamable HTTP, in-memory sessions) that logs every request.

Usage: mcp_server.py PORT MACHINE LOGFILE [--allowed-host NAME ...] [--sdk-default-security]

Tools: whoami (the machine name), slow_count(n) (n progress notifications, then n).
Each HTTP request appends one JSON line to LOGFILE: {"t", "machine", "method", "path", "sid", "host", "last_event_id"}.

The SDK's DNS-rebinding protection: FastMCP(host="127.0.0.1") (the default host) turns it on
with allowed_hosts ["127.0.0.1:*", "localhost:*", "[::1]:*"], so a request that arrives through
tern with `Host: mcp.test` gets `421 Invalid Host header`. The fix is an explicit
TransportSecuritySettings naming the public hostname (docs/mcp.md). --sdk-default-security keeps the
SDK's default to show the 421.
"""

import argparse
import asyncio
import json
import time

import uvicorn
from mcp.server.fastmcp import Context, FastMCP
from mcp.server.transport_security import TransportSecuritySettings

p = argparse.ArgumentParser()
p.add_argument("port", type=int)
p.add_argument("machine")
p.add_argument("log")
p.add_argument("--allowed-host", action="append", default=[])
p.add_argument("--sdk-default-security", action="store_true")
args = p.parse_args()

if args.sdk_default_security:
    security = None  # FastMCP(host="127.0.0.1") enables protection for localhost names only
else:
    names = args.allowed_host or ["mcp.test"]
    security = TransportSecuritySettings(
        enable_dns_rebinding_protection=True,
        # "name" matches a Host without a port, "name:*" one with any port.
        allowed_hosts=[h for n in names for h in (n, f"{n}:*")] + ["127.0.0.1:*", "localhost:*"],
        allowed_origins=[o for n in names for o in (f"https://{n}", f"https://{n}:*", f"http://{n}:*")],
    )

mcp = FastMCP("tern-harness", host="127.0.0.1", port=args.port, transport_security=security)


@mcp.tool()
def whoami() -> str:
    """The machine this session lives on."""
    return args.machine


@mcp.tool()
async def slow_count(n: int, ctx: Context) -> int:
    """Sends n progress notifications, then returns n."""
    for i in range(n):
        await ctx.report_progress(i + 1, n, f"step {i + 1}")
        await asyncio.sleep(0.01)
    return n


inner = mcp.streamable_http_app()
logf = open(args.log, "a", buffering=1)


async def app(scope, receive, send):
    if scope["type"] != "http":
        return await inner(scope, receive, send)
    headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
    rec = {
        "t": time.time(),
        "machine": args.machine,
        "method": scope["method"],
        "path": scope["path"],
        "sid": headers.get("mcp-session-id"),
        "host": headers.get("host"),
        "last_event_id": headers.get("last-event-id"),
    }
    logf.write(json.dumps(rec) + "\n")  # on arrival: a request that reaches the machine is logged
    await inner(scope, receive, send)


print(f"listening 127.0.0.1:{args.port}", flush=True)
uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", lifespan="on")
