"""How long a `tern apply` takes to reach every node of a fleet, beside etcd's own watch latency.

Run through benches/fleet/propagation.sh (README there). Starts the fleet of examples/fleet
(3 etcd members, 4 tern nodes), then CHANGES times:

  tern   a one-app declaration (a new app, its hostname, one machine) goes through `tern apply`
         (a process, as an operator runs it); four pollers, one per node, ask the node's admin
         `GET /v1/apps/NAME` back to back until it answers 200: "served" on that node.
  etcd   a put of one key (outside tern's prefix, so tern never sees it) through etcd's own
         client port, from a connection kept open; four watchers, each on the member that a
         node follows, note when the event arrives: "delivered" to that watcher.

Both are timed from the moment the write was acknowledged to its writer (`tern apply`
returned; the put answered) to the moment the last of the four saw it. `tern apply` exits a
little after its transaction commits, so a node may serve a change before that moment (it is
counted as 0 ms and reported). Closer to the commit: the same four watchers note when the
tern change's own key arrives, and "first watcher had it" times from the first of them (an
upper bound on the commit's time). Timestamps: this process's monotonic clock.
"""

import base64
import http.client
import json
import os
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "examples", "fleet"))
import fleet as fl  # noqa: E402

CHANGES = int(os.environ.get("CHANGES", "200"))
TARGET_P99_MS = 100.0
POLL_GAP = float(os.environ.get("POLL_GAP_MS", "0.5")) / 1000


def b64(s):
    return base64.b64encode(s.encode()).decode()


class Watcher(threading.Thread):
    """An etcd watch (the JSON gateway's POST /v3/watch, a stream) on one member over every
    key under "/": records when each key's put first arrives."""

    def __init__(self, member, seen, cond):
        super().__init__(daemon=True)
        self.member, self.seen, self.cond = member, seen, cond
        self.ready = threading.Event()

    def run(self):
        h, p = self.member.client.rsplit(":", 1)
        c = http.client.HTTPConnection(h, int(p), timeout=None)
        body = json.dumps({"create_request": {"key": b64("/"), "range_end": b64("0")}})
        c.request("POST", "/v3/watch", body=body, headers={"Content-Type": "application/json"})
        r = c.getresponse()
        while True:
            line = r.readline()
            if not line:
                return
            t = time.monotonic()
            msg = json.loads(line).get("result", {})
            if msg.get("created"):
                self.ready.set()
            for ev in msg.get("events", []):
                if ev.get("type", "PUT") != "PUT":
                    continue
                key = base64.b64decode(ev["kv"]["key"]).decode(errors="replace")
                with self.cond:
                    self.seen.setdefault(key, {}).setdefault(self, t)
                    self.cond.notify_all()


class Poller(threading.Thread):
    """Asks one node for the armed app until it has it; notes when."""

    def __init__(self, node, cond):
        super().__init__(daemon=True)
        self.node, self.cond = node, cond
        self.want, self.got = None, None
        self.polls = 0

    def run(self):
        h, p = self.node.admin.rsplit(":", 1)
        c = None
        while True:
            with self.cond:
                while self.want is None or self.got is not None:
                    self.cond.wait()
                want = self.want
            if c is None:
                c = http.client.HTTPConnection(h, int(p), timeout=5)
            try:
                c.request("GET", f"/v1/apps/{want}")
                r = c.getresponse()
                r.read()
                status = r.status
            except (OSError, http.client.HTTPException):
                c.close()
                c, status = None, 0
            t = time.monotonic()
            self.polls += 1
            if status == 200:
                with self.cond:
                    if self.want == want:
                        self.got = t
                        self.cond.notify_all()
            else:
                time.sleep(POLL_GAP)


def pct(xs, q):
    s = sorted(xs)
    return s[min(len(s) - 1, round((len(s) - 1) * q))]


def row(label, xs):
    ms = [x * 1000 for x in xs]
    return f"{label:<50} {pct(ms, .5):8.1f} {pct(ms, .9):8.1f} {pct(ms, .99):8.1f} {max(ms):8.1f}"


def change_decl(i):
    return (f'[[apps]]\nname = "prop-{i}"\nhostnames = ["prop-{i}.fleet.test"]\ninternal_port = 8080\n\n'
            f'[[machines]]\nid = "prop-{i}-1"\napp = "prop-{i}"\nregion = "ams"\n'
            f'addr = "{fl.ip(41)}:{8000 + i % 1000}"\nstate = "started"\n')


def wait_all(cond, check, timeout, what):
    end = time.monotonic() + timeout
    with cond:
        while not check():
            left = end - time.monotonic()
            if left <= 0:
                raise fl.FleetError(f"timed out waiting for {what}")
            cond.wait(left)


def measure(fleet):
    cond = threading.Condition()
    seen = {}
    # One watcher on the member each node follows first (m1 twice: edge-1 and worker-2).
    watchers = [Watcher(fleet.members[[m.url for m in fleet.members].index(n.endpoints[0])], seen, cond)
                for n in fleet.nodes]
    for w in watchers:
        w.start()
    for w in watchers:
        if not w.ready.wait(10):
            raise fl.FleetError("an etcd watch was not created")
    pollers = [Poller(n, cond) for n in fleet.nodes]
    for p in pollers:
        p.start()
    writer_member = fleet.members[0]  # the first endpoint of client.toml: where tern apply writes
    wh, wp = writer_member.client.rsplit(":", 1)
    put_conn = http.client.HTTPConnection(wh, int(wp), timeout=5)

    res = {k: [] for k in ("tern_ack", "tern_start", "apply_cmd", "tern_over_watch", "tern_watch_ack",
                           "etcd_ack", "etcd_start", "etcd_over_watch")}
    early = 0
    decl = os.path.join(fleet.run, "change.toml")
    for i in range(CHANGES):
        with open(decl, "w") as f:
            f.write(change_decl(i))
        with cond:
            for p in pollers:
                p.want, p.got = f"prop-{i}", None
            cond.notify_all()
        t0 = time.monotonic()
        r = subprocess.run([fleet.tern, "apply", "-c", fleet.client_config, decl], capture_output=True, text=True)
        t1 = time.monotonic()
        if r.returncode != 0:
            raise fl.FleetError(f"tern apply failed: {r.stdout}{r.stderr}")
        key = f"{fl.PREFIX}apps/prop-{i}"
        wait_all(cond, lambda: all(p.got for p in pollers) and len(seen.get(key, {})) == len(watchers), 10,
                 f"change {i} on every node")
        served = max(p.got for p in pollers)
        watched = seen[key]
        early += served < t1
        res["tern_ack"].append(max(0.0, served - t1))
        res["tern_start"].append(served - t0)
        res["apply_cmd"].append(t1 - t0)
        res["tern_over_watch"].append(served - min(watched.values()))
        res["tern_watch_ack"].append(max(0.0, max(watched.values()) - t1))

        # The same kind of write, straight to etcd: one put, four watchers.
        ref = f"/fleet-bench/k-{i}"
        body = json.dumps({"key": b64(ref), "value": b64(f"v{i}")})
        t2 = time.monotonic()
        put_conn.request("POST", "/v3/kv/put", body=body, headers={"Content-Type": "application/json"})
        resp = put_conn.getresponse()
        resp.read()
        t3 = time.monotonic()
        if resp.status != 200:
            raise fl.FleetError(f"etcd put answered {resp.status}")
        wait_all(cond, lambda: len(seen.get(ref, {})) == len(watchers), 10, f"put {i} on every watcher")
        last = max(seen[ref].values())
        res["etcd_ack"].append(max(0.0, last - t3))
        res["etcd_over_watch"].append(last - min(seen[ref].values()))
        res["etcd_start"].append(last - t2)
    with cond:
        for p in pollers:
            p.want = None
    return res, early, sum(p.polls for p in pollers)


def report(res, early, polls):
    print(f"\nPropagation over {CHANGES} changes: 3 etcd members, 4 tern nodes (edge-1, edge-2, worker-1, worker-2)")
    print(f"{'(milliseconds)':<50} {'p50':>8} {'p90':>8} {'p99':>8} {'max':>8}")
    print(row("tern: apply returned -> served on all 4", res["tern_ack"]))
    print(row("etcd: put answered -> delivered to all 4", res["etcd_ack"]))
    print(row("tern: first watcher had it -> served on all 4", res["tern_over_watch"]))
    print(row("etcd: first watcher had it -> all 4 had it", res["etcd_over_watch"]))
    print(row("tern: apply started -> served on all 4", res["tern_start"]))
    print(row("etcd: put sent -> delivered to all 4", res["etcd_start"]))
    print(row("  tern apply (the process, start to exit)", res["apply_cmd"]))
    print(row("  tern's key: apply returned -> all 4 watchers", res["tern_watch_ack"]))
    for label, a, b in (("acknowledged", "tern_ack", "etcd_ack"), ("first watcher had it", "tern_over_watch",
                                                                   "etcd_over_watch")):
        ratio = [pct(res[a], q) / max(pct(res[b], q), 1e-6) for q in (.5, .9, .99)]
        print(f"{'ratio tern/etcd, ' + label + ' -> all 4':<50} {ratio[0]:8.1f} {ratio[1]:8.1f} {ratio[2]:8.1f}")
    print(f"{early} of {CHANGES} changes were served on all 4 nodes before `tern apply` had exited "
          f"(counted as 0 ms); {polls} admin polls")
    p99 = pct(res["tern_ack"], .99) * 1000
    verdict = "PASS" if p99 <= TARGET_P99_MS else "FAIL"
    print(f"{verdict}: p99 apply returned -> served on all 4 = {p99:.1f} ms (target <= {TARGET_P99_MS:.0f} ms)")
    return verdict == "PASS"


def main():
    profile = sys.argv[1] if len(sys.argv) > 1 else "release"
    tern, tm = fl.binaries(profile)
    fl.install_signal_exit()
    fleet = fl.Fleet(tern, tm)
    try:
        fleet.start()
        fleet.apply_demo()
        fl.log(f"measuring {CHANGES} changes")
        res, early, polls = measure(fleet)
        ok = report(res, early, polls)
        return 0 if ok or not os.environ.get("STRICT") else 1
    except fl.FleetError as e:
        fl.log(f"error: {e}")
        return 1
    finally:
        fleet.stop()


if __name__ == "__main__":
    sys.exit(main())
