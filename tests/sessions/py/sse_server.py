"""A machine for the EventSource scenario: `/` serves a page whose EventSource collects 20 events
from `/events` and writes their data (machine names) into the DOM; `/events` sends `retry: 50`
and one event (id = Last-Event-ID + 1, data = machine name), then closes, so the browser
reconnects with Last-Event-ID. One JSON line per request goes to LOGFILE.

Usage: sse_server.py PORT MACHINE LOGFILE
"""

import json
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

port, machine, log = int(sys.argv[1]), sys.argv[2], sys.argv[3]
logf = open(log, "a", buffering=1)

PAGE = b"""<!doctype html><html><head><title>waiting</title></head><body><pre id="out"></pre>
<script>
const names = [];
const es = new EventSource('/events');
es.onmessage = (e) => {
  names.push(e.lastEventId + ':' + e.data);
  if (names.length === 20) {
    es.close();
    document.getElementById('out').textContent = 'EVENTS=' + JSON.stringify(names);
    document.title = 'done';
  }
};
</script></body></html>"""


class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"

    def log_message(self, *a):
        pass

    def do_GET(self):
        lei = self.headers.get("Last-Event-ID")
        logf.write(
            json.dumps(
                {
                    "t": time.time(),
                    "machine": machine,
                    "method": "GET",
                    "path": self.path,
                    "last_event_id": lei,
                    "cookie": self.headers.get("Cookie"),
                }
            )
            + "\n"
        )
        if self.path == "/events":
            n = int(lei) + 1 if lei and lei.isdigit() else 1
            body = f"retry: 50\nid: {n}\ndata: {machine}\n\n".encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body)
            self.wfile.flush()
            self.close_connection = True
        elif self.path == "/":
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(PAGE)))
            self.end_headers()
            self.wfile.write(PAGE)
        else:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()


ThreadingHTTPServer.daemon_threads = True
srv = ThreadingHTTPServer(("127.0.0.1", port), H)
print(f"listening 127.0.0.1:{port}", flush=True)
srv.serve_forever()
