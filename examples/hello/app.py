#!/usr/bin/env python3
"""The example app: one machine of the "hello" app. Standard library only.

GET /         -> "Hello from <machine> in <region>" plus the forwarding headers tern added
GET /events   -> a text/event-stream that sends one event a second for ten minutes (long
                 enough to change the routing with `tern apply` while it runs)
"""
import argparse
import json
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


EVENTS = 600


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        if self.path.startswith("/events"):
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Connection", "close")
            self.end_headers()
            try:
                for i in range(EVENTS):
                    self.wfile.write(f"id: {i}\ndata: tick {i} from {ARGS.machine}\n\n".encode())
                    self.wfile.flush()
                    time.sleep(1)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client (or tern, shutting down) ended the stream
            return
        seen = {k: v for k, v in self.headers.items() if k.lower().startswith(("fly-", "x-forwarded", "via"))}
        body = f"Hello from {ARGS.machine} in {ARGS.region}\n" + json.dumps(seen, indent=2, sort_keys=True) + "\n"
        data = body.encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, fmt, *args):
        pass


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, default=9001)
    p.add_argument("--bind", default="127.0.0.1")
    p.add_argument("--machine", default="hello-1")
    p.add_argument("--region", default="local")
    ARGS = p.parse_args()
    ThreadingHTTPServer((ARGS.bind, ARGS.port), Handler).serve_forever()
