"""MCP sessions with the Python SDK whose requests alternate between two tern nodes.

Usage: mcp_client.py --ports A,B [--scheme http|https] [--h2] [--ca CA.pem] [--sessions N]
                     [--concurrency C] [--host mcp.test]
Prints one JSON object: {"ok", "failed", "first_error", "sessions": [...]}.

Each session: initialize -> tools/list -> tools/call slow_count (>= 1 progress notification)
-> the standalone GET SSE stream must have been opened (200) -> tools/call whoami -> DELETE (200).
The URL names the app's hostname; AlternatingTransport dials 127.0.0.1 on the next node's port
for each request, keeping the Host header (and TLS SNI) of the original URL.
"""

import argparse
import asyncio
import json
import ssl
import sys
import time

import anyio
import httpx
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client


class AlternatingTransport(httpx.AsyncBaseTransport):
    """Sends request i to 127.0.0.1:ports[i % len(ports)], Host and SNI unchanged; records each."""

    def __init__(self, ports, host, verify, http2):
        self.ports = ports
        self.host = host
        self.inner = httpx.AsyncHTTPTransport(verify=verify, http2=http2)
        self.n = 0
        self.log = []  # {"method", "port", "status", "sid", "http_version"}

    async def handle_async_request(self, request):
        port = self.ports[self.n % len(self.ports)]
        self.n += 1
        # httpx set Host from the original URL when it built the request; keep it.
        request.url = request.url.copy_with(host="127.0.0.1", port=port)
        request.extensions = {**request.extensions, "sni_hostname": self.host}
        rec = {"method": request.method, "port": port, "sid": request.headers.get("mcp-session-id")}
        self.log.append(rec)
        try:
            resp = await self.inner.handle_async_request(request)
        except Exception as e:
            rec["error"] = repr(e)
            raise
        rec["status"] = resp.status_code
        rec["http_version"] = resp.extensions.get("http_version", b"").decode()
        rec["resp_sid"] = resp.headers.get("mcp-session-id")
        rec["tern_error"] = resp.headers.get("tern-error")
        return resp

    async def aclose(self):
        await self.inner.aclose()


def make_client(args, log_into=None):
    verify = True
    if args.scheme == "https":
        verify = ssl.create_default_context(cafile=args.ca)
    t = AlternatingTransport(args.ports, args.host, verify, args.h2)
    c = httpx.AsyncClient(transport=t, timeout=httpx.Timeout(15, read=60), follow_redirects=False)
    return c, t


def url(args):
    return f"{args.scheme}://{args.host}:{args.ports[0]}/mcp"


async def one_session(args, idx):
    res = {"idx": idx, "ok": False}
    http, t = make_client(args)
    res["requests"] = t.log
    try:
        with anyio.fail_after(45):
            async with http:
                async with streamable_http_client(url(args), http_client=http, terminate_on_close=True) as (
                    r,
                    w,
                    get_sid,
                ):
                    async with ClientSession(r, w) as s:
                        await s.initialize()
                        res["token"] = get_sid()
                        tools = await s.list_tools()
                        names = sorted(x.name for x in tools.tools)
                        if "whoami" not in names or "slow_count" not in names:
                            raise RuntimeError(f"tools/list: {names}")
                        progress = []

                        async def on_progress(p, total, msg):
                            progress.append(p)

                        out = await s.call_tool("slow_count", {"n": 5}, progress_callback=on_progress)
                        if out.isError:
                            raise RuntimeError(f"slow_count: {out.content}")
                        if not progress:
                            raise RuntimeError("slow_count: no progress notification arrived")
                        res["progress"] = len(progress)
                        # The SDK opens the standalone GET stream after notifications/initialized.
                        deadline = time.monotonic() + 5
                        while not any(x["method"] == "GET" and "status" in x for x in t.log):
                            if time.monotonic() > deadline:
                                raise RuntimeError("the SDK never opened the GET SSE stream")
                            await asyncio.sleep(0.02)
                        get = next(x for x in t.log if x["method"] == "GET" and "status" in x)
                        if get["status"] != 200:
                            raise RuntimeError(f"GET SSE stream: {get['status']} tern-error={get.get('tern_error')}")
                        who = await s.call_tool("whoami", {})
                        if who.isError:
                            raise RuntimeError(f"whoami: {who.content}")
                        res["machine"] = who.content[0].text
        dels = [x for x in t.log if x["method"] == "DELETE"]
        if not dels:
            raise RuntimeError("no DELETE was sent")
        if dels[-1].get("status") != 200:
            raise RuntimeError(f"DELETE: {dels[-1].get('status')} tern-error={dels[-1].get('tern_error')}")
        res["ok"] = True
    except BaseException as e:  # noqa: BLE001 - report every failure as the session's
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        res["error"] = describe(e)
    return res


def describe(e):
    if isinstance(e, BaseExceptionGroup):
        return "; ".join(describe(x) for x in e.exceptions)
    msg = " ".join(f"{type(e).__name__}: {e}".split())
    if isinstance(e, TimeoutError):
        msg = "timed out (45 s)"
    return msg[:300]


async def run(args):
    sem = asyncio.Semaphore(args.concurrency)

    async def guarded(i):
        async with sem:
            return await one_session(args, i)

    results = await asyncio.gather(*(guarded(i) for i in range(args.sessions)))
    failed = [r for r in results if not r["ok"]]
    return {
        "ok": len(results) - len(failed),
        "failed": len(failed),
        "first_error": failed[0]["error"] if failed else None,
        "sessions": results,
    }


def parse(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--ports", required=True, type=lambda s: [int(x) for x in s.split(",")])
    p.add_argument("--scheme", default="http")
    p.add_argument("--h2", action="store_true")
    p.add_argument("--ca")
    p.add_argument("--host", default="mcp.test")
    p.add_argument("--sessions", type=int, default=50)
    p.add_argument("--concurrency", type=int, default=4)
    return p.parse_args(argv)


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.CRITICAL)
    print(json.dumps(asyncio.run(run(parse()))))
    sys.stdout.flush()
