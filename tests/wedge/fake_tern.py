#!/usr/bin/env python3
"""A stand-in for tern that speaks issue 11's interface, for the harnesses' self-check only.

`tests/wedge/run.sh tests/wedge/fake_tern.py` (and the same for tests/upgrade) runs each
harness against it, so that every path of the harnesses (a bounce to a new pid, a diagnostics
file, a gradual drain spread over the window, reparented processes) can be exercised before
tern has the features. It proves nothing about tern. Standard library only, one asyncio loop:

- `serve -c FILE`: listens on the first [[listen]] address and [admin] (or takes both sockets
  from a parent through $FAKE_TERN_FDS) and answers, itself, what the test backend would
  through tern: `/id`, `/ticks?gap_ms=G` (SSE, chunked), `/ws` (WebSocket echo).
- admin: `/healthz`, `/metrics`, `/v1/watchdog`, POST `/v1/debug/faults/{deadlock,
  block-worker,spin,panic}` (404 unless [debug] faults), POST `/v1/upgrade`, POST `/v1/drain`.
- a wedge (deadlock, block-worker): requests on every other connection hang; after
  stall_after a diagnostics file is written, then a child takes the sockets, and this process
  exits once the child is ready. spin: the next connection is closed after 0.5 s and counted.
- upgrade (POST /v1/upgrade or SIGUSR2): a child takes the sockets; this process stops
  accepting and ends its streams evenly over drain_window (SSE after a whole event, then the
  chunked end; WebSocket close 1001; keep-alive gets `Connection: close`), then exits 0.
- drain: /healthz 503 for drain_delay, the listener closes, the same gradual end, exit 0.
- `upgrade -c FILE`, `drain -c FILE`: POST to the admin address; `check`, `apply`: accept.
"""

import asyncio
import base64
import datetime
import hashlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import tomllib
import urllib.request


def dur(s, default):
    s = str(s or default)
    for suffix, mult in (("ms", 0.001), ("s", 1), ("m", 60)):
        if s.endswith(suffix):
            return float(s[:-len(suffix)]) * mult
    return float(s)


def config_path(argv):
    return argv[argv.index("-c") + 1] if "-c" in argv else "tern.toml"


def addr(s):
    host, port = s.rsplit(":", 1)
    return host, int(port)


def post(cfg, path):
    url = f"http://{cfg['admin']['addr']}{path}"
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="POST"), timeout=10) as r:
            print(r.read().decode().strip())
            return 0
    except Exception as e:  # noqa: BLE001
        print(f"fake_tern: {url}: {e}", file=sys.stderr)
        return 1


class Stream:
    def __init__(self):
        self.ending = asyncio.Event()
        self.done = asyncio.Event()


class Fake:
    def __init__(self, cfg, path):
        self.cfg, self.path = cfg, path
        sd, wd = cfg.get("shutdown", {}), cfg.get("watchdog", {})
        self.window = dur(sd.get("drain_window"), "60s")
        self.delay = dur(sd.get("drain_delay"), "5s")
        self.stall_after = dur(wd.get("stall_after"), "2s")
        self.faults = cfg.get("debug", {}).get("faults", False)
        rib_dir = os.path.dirname(os.path.abspath(cfg.get("rib", {}).get("path", "tern.db")))
        self.diag_dir = os.path.join(rib_dir, wd.get("diagnostics_dir", "diagnostics"))
        self.health, self.stalls, self.wedged, self.last_diag = 200, 0, False, None
        self.spurious = self.panics = 0
        self.spin_next, self.closing = False, False
        self.frozen = asyncio.Event()
        self.streams, self.conn_no, self.started = set(), 0, time.time()
        self.leaving = False

    async def run(self):
        fds = os.environ.get("FAKE_TERN_FDS")
        if fds:
            lfd, afd = map(int, fds.split(","))
            lsock, asock = socket.socket(fileno=lfd), socket.socket(fileno=afd)
        else:
            lsock, asock = self.bind(self.cfg["listen"][0]["addr"]), self.bind(self.cfg["admin"]["addr"])
        self.lsock, self.asock = lsock, asock
        self.lserver = await asyncio.start_server(self.client, sock=lsock)
        self.aserver = await asyncio.start_server(self.admin, sock=asock)
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, lambda: os._exit(0))
        loop.add_signal_handler(signal.SIGUSR2, lambda: asyncio.ensure_future(self.upgrade()))
        log(f"serving, pid {os.getpid()}")
        ready = os.environ.pop("FAKE_TERN_READY_FD", None)
        if ready:
            os.write(int(ready), b"r")
            os.close(int(ready))
        await asyncio.Event().wait()

    @staticmethod
    def bind(a):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(addr(a))
        s.listen(1024)
        return s

    # ------------------------------------------------------------ handing over

    async def handoff(self):
        """Starts a child on the same sockets and returns once it is ready."""
        r, w = os.pipe()
        lfd, afd = self.lsock.fileno(), self.asock.fileno()
        env = dict(os.environ, FAKE_TERN_FDS=f"{lfd},{afd}", FAKE_TERN_READY_FD=str(w))
        subprocess.Popen([sys.argv[0], "serve", "-c", self.path], pass_fds=(lfd, afd, w), env=env,
                         stdin=subprocess.DEVNULL)
        os.close(w)
        loop = asyncio.get_running_loop()
        await asyncio.wait_for(loop.run_in_executor(None, os.read, r, 1), 10)
        os.close(r)
        # The child accepts now; this process stops (its copies only: the sockets live on).
        self.lserver.close()
        self.aserver.close()

    async def gradual(self):
        """Ends every stream, evenly over the window; keep-alive gets Connection: close."""
        self.closing = True
        streams = list(self.streams)
        for i, s in enumerate(streams):
            asyncio.get_running_loop().call_later((i + 0.5) * self.window / max(1, len(streams)), s.ending.set)
        await asyncio.sleep(self.window)
        for s in streams:
            try:
                await asyncio.wait_for(s.done.wait(), 2)
            except asyncio.TimeoutError:
                pass

    async def upgrade(self):
        if self.leaving:
            return
        self.leaving = True
        await self.handoff()
        log("upgrade: handed over, draining")
        await self.gradual()
        os._exit(0)

    async def drain(self):
        self.leaving = True
        self.health = 503
        await asyncio.sleep(self.delay)
        self.lserver.close()
        self.lsock.close()
        log("drain: listener closed")
        await self.gradual()
        os._exit(0)

    async def wedge(self, fault):
        self.frozen.set()
        await asyncio.sleep(self.stall_after * 0.95)
        self.stalls, self.wedged, self.health = self.stalls + 1, True, 503
        os.makedirs(self.diag_dir, exist_ok=True)
        path = os.path.join(self.diag_dir, f"wedge-{int(time.time())}-{os.getpid()}.txt")
        lines = [f"wedge: {fault}", f"stale heartbeat: worker-1 (age {self.stall_after:.1f} s)"]
        if fault == "deadlock":
            lines += ["deadlock cycle:", "  thread tern-worker-0 holds lock catalog.live, waits for lock pool.idle",
                      "  thread tern-worker-1 holds lock pool.idle, waits for lock catalog.live"]
        lines += ["threads:", "  tern-worker-0 state S wchan futex_wait", "  tern-worker-1 state S wchan futex_wait"]
        with open(path, "w") as f:
            f.write("\n".join(lines) + "\n")
        self.last_diag = path
        log(f"watchdog: wedge ({fault}), diagnostics {path}; bouncing")
        self.leaving = True
        await self.handoff()
        os._exit(1)

    # ------------------------------------------------------------ admin

    def watchdog(self):
        age = (self.stall_after + 0.1) if self.wedged else 0.01
        return {"pid": os.getpid(), "heartbeats": [{"what": "worker-0", "age_seconds": 0.01},
                                                  {"what": "worker-1", "age_seconds": age}],
                "stalls": self.stalls, "wedged": self.wedged, "last_diagnostics": self.last_diag}

    async def admin(self, reader, writer):
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode()
            method, path = head.split(" ")[:2]
            status, body = self.admin_route(method, path)
            data = body.encode()
            writer.write(f"HTTP/1.1 {status} X\r\ncontent-length: {len(data)}\r\nconnection: close\r\n\r\n".encode()
                         + data)
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ValueError):
            pass
        finally:
            writer.close()

    def admin_route(self, method, path):
        if method == "GET" and path == "/healthz":
            return self.health, "ok\n" if self.health == 200 else "draining\n"
        if method == "GET" and path == "/metrics":
            return 200, (f"tern_spurious_wakeups_total {self.spurious}\ntern_task_panics_total{{task=\"hook\"}} "
                         f"{self.panics}\ntern_watchdog_stalls_total{{what=\"worker\"}} {self.stalls}\n")
        if method == "GET" and path == "/v1/watchdog":
            return 200, json.dumps(self.watchdog())
        if method == "POST" and path == "/v1/upgrade":
            asyncio.ensure_future(self.upgrade())
            return 202, "upgrading\n"
        if method == "POST" and path == "/v1/drain":
            asyncio.ensure_future(self.drain())
            return 202, "draining\n"
        fault = path.removeprefix("/v1/debug/faults/")
        if method == "POST" and self.faults and fault in ("deadlock", "block-worker", "spin", "panic"):
            if fault == "spin":
                self.spin_next = True
            elif fault == "panic":
                self.panics += 1
            else:
                asyncio.ensure_future(self.wedge(fault))
            return 200, f"{fault} injected\n"
        return 404, "not found\n"

    # ------------------------------------------------------------ clients

    async def client(self, reader, writer):
        self.conn_no += 1
        mine = self.conn_no
        if self.spin_next:
            self.spin_next = False
            await asyncio.sleep(0.5)
            self.spurious += 1
            writer.close()
            return
        try:
            while True:
                head = (await reader.readuntil(b"\r\n\r\n")).decode(errors="replace")
                if self.frozen.is_set() and mine % 2:
                    await asyncio.Event().wait()
                line, *hdrs = head.split("\r\n")
                path = line.split(" ")[1]
                headers = {h.split(":", 1)[0].strip().lower(): h.split(":", 1)[1].strip() for h in hdrs if ":" in h}
                if path.startswith("/ticks"):
                    gap = next((int(kv[7:]) for kv in path.split("?")[-1].split("&") if kv.startswith("gap_ms=")), 500)
                    await self.sse(writer, gap / 1000)
                    return
                if path.startswith("/ws") and "sec-websocket-key" in headers:
                    await self.ws(reader, writer, headers["sec-websocket-key"])
                    return
                close = self.closing
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n" + (b"connection: close\r\n" if close else b"")
                             + b"\r\nfake\n")
                await writer.drain()
                if close:
                    return
        except (asyncio.IncompleteReadError, ConnectionError, IndexError):
            pass
        finally:
            writer.close()

    async def sse(self, writer, gap):
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
        s = Stream()
        self.streams.add(s)
        try:
            i = 0
            while not s.ending.is_set():
                ev = f"data: tick {i}\n\n".encode()
                writer.write(f"{len(ev):x}\r\n".encode() + ev + b"\r\n")
                await writer.drain()
                i += 1
                try:
                    await asyncio.wait_for(s.ending.wait(), gap)
                except asyncio.TimeoutError:
                    pass
            writer.write(b"0\r\n\r\n")
            await writer.drain()
        finally:
            self.streams.discard(s)
            s.done.set()

    async def ws(self, reader, writer, key):
        accept = base64.b64encode(hashlib.sha1((key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest())
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\n"
                     b"sec-websocket-accept: " + accept + b"\r\n\r\n")
        s = Stream()
        self.streams.add(s)

        async def ender():
            await s.ending.wait()
            writer.write(frame(8, struct.pack("!H", 1001) + b"going away"))

        end_task = asyncio.ensure_future(ender())
        try:
            while True:
                op, payload = await read_frame(reader)
                if op == 8:
                    if not s.ending.is_set():
                        writer.write(frame(8, payload[:2]))
                    break
                if op in (1, 2):
                    writer.write(frame(op, payload))
                elif op == 9:
                    writer.write(frame(10, payload))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            end_task.cancel()
            self.streams.discard(s)
            s.done.set()


def frame(op, payload):
    n = len(payload)
    head = bytes([0x80 | op]) + (bytes([n]) if n < 126 else bytes([126]) + struct.pack("!H", n))
    return head + payload


async def read_frame(reader):
    b0, b1 = await reader.readexactly(2)
    n = b1 & 0x7F
    if n == 126:
        n = struct.unpack("!H", await reader.readexactly(2))[0]
    elif n == 127:
        n = struct.unpack("!Q", await reader.readexactly(8))[0]
    mask = await reader.readexactly(4) if b1 & 0x80 else b"\0\0\0\0"
    data = await reader.readexactly(n)
    return b0 & 0x0F, bytes(c ^ mask[i % 4] for i, c in enumerate(data))


def log(msg):
    ts = datetime.datetime.now(datetime.timezone.utc).isoformat()
    print(json.dumps({"timestamp": ts, "message": msg, "pid": os.getpid()}), file=sys.stderr, flush=True)


def main():
    argv = sys.argv[1:]
    cmd = next((a for a in argv if not a.startswith("-") and a != config_path(argv)), "")
    cfg = tomllib.load(open(config_path(argv), "rb")) if cmd in ("check", "serve", "upgrade", "drain") else {}
    if cmd in ("check", "apply"):
        return 0
    if cmd == "upgrade":
        return post(cfg, "/v1/upgrade")
    if cmd == "drain":
        return post(cfg, "/v1/drain")
    if cmd == "serve":
        asyncio.run(Fake(cfg, config_path(argv)).run())
        return 0
    print(f"fake_tern: unknown command {cmd!r}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
