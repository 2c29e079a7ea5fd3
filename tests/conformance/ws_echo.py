"""A WebSocket echo server (the `websockets` library) standing in for an app's machine in the
Autobahn runs. It echoes every message on any path, prints its port, and runs until killed."""

import asyncio
import sys

from websockets.asyncio.server import serve


async def echo(ws):
    try:
        async for message in ws:
            await ws.send(message)
    except Exception:
        pass


async def main(port):
    # No size cap and no compression: the cases send large and fragmented frames.
    async with serve(echo, "127.0.0.1", port, max_size=None, compression=None, ping_interval=None) as server:
        print(server.sockets[0].getsockname()[1], flush=True)
        await asyncio.Future()


asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 0))
