"""etcd outages under load (run through examples/fleet/outage.sh; README.md beside it).

The fleet of fleet.py, the demo app applied, and steady load on both edges for the whole run
(LOAD_CONNS keep-alive connections, half on each edge, each sending `GET /id` with the demo's
Host every LOAD_GAP_MS). Meanwhile every node's /metrics is read every 250 ms. Phases:

  1. one member      SIGKILL the etcd leader; a change applied meanwhile must reach every node
  2. all down        SIGKILL the other two, for ALL_DOWN_S (30) seconds
  3. back            restart all three; every node must reconnect (tern_rib_connected 1)
  4. a change        applied after recovery, timed until every node has it
  5. compaction      SIGSTOP a member some node follows, apply two changes through the others,
                     compact at the newest revision, let the node's probe give up on the frozen
                     member: its watch is behind the compaction, so it resyncs
                     (tern_rib_resyncs_total{reason="compacted"}); then SIGCONT

Reports failed requests (target 0) with their reasons and phases, and per node: the lowest
tern_rib_connected in the outage, the highest tern_rib_staleness_seconds, the compacted resyncs.
"""

import http.client
import os
import signal
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fleet as fl  # noqa: E402

ALL_DOWN_S = float(os.environ.get("ALL_DOWN_S", "30"))
LOAD_CONNS = int(os.environ.get("LOAD_CONNS", "16"))
LOAD_GAP = float(os.environ.get("LOAD_GAP_MS", "5")) / 1000
RESYNC = 'tern_rib_resyncs_total{reason="compacted"}'


class Load:
    """Steady load on the edges; every answer that is not the machine's 200 is a failure."""

    def __init__(self, edges):
        self.edges = edges
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.ok, self.failed = 0, []
        self.phase = "start"
        self.threads = [threading.Thread(target=self.conn, args=(edges[i % len(edges)],), daemon=True)
                        for i in range(LOAD_CONNS)]

    def start(self):
        for t in self.threads:
            t.start()

    def conn(self, edge):
        h, p = edge.http.rsplit(":", 1)
        c = None
        while not self.stop.is_set():
            if c is None:
                c = http.client.HTTPConnection(h, int(p), timeout=10)
            try:
                c.request("GET", "/id", headers={"Host": fl.HOST})
                r = c.getresponse()
                body = r.read().decode(errors="replace")
                why = None if r.status == 200 else f"{r.status} {r.getheader('tern-error')} {body[:80]}"
            except (OSError, http.client.HTTPException) as e:
                why = f"{type(e).__name__}: {e}"
                c.close()
                c = None
            with self.lock:
                if why is None:
                    self.ok += 1
                else:
                    self.failed.append((time.monotonic(), edge.name, self.phase, why))
            time.sleep(LOAD_GAP)

    def finish(self):
        self.stop.set()
        for t in self.threads:
            t.join(15)


class Monitor(threading.Thread):
    """Every node's RIB metrics, every 250 ms: lowest `connected` and highest staleness per
    phase."""

    def __init__(self, nodes):
        super().__init__(daemon=True)
        self.nodes = nodes
        self.stopped = threading.Event()
        self.lock = threading.Lock()
        self.phase = "start"
        self.low = {}   # (node, phase) -> lowest tern_rib_connected
        self.high = {}  # node -> highest tern_rib_staleness_seconds
        self.last = {}  # node -> latest metrics

    def run(self):
        while not self.stopped.is_set():
            for n in self.nodes:
                m = n.metrics()
                if not m:
                    continue
                with self.lock:
                    self.last[n.name] = m
                    k = (n.name, self.phase)
                    c = m.get("tern_rib_connected")
                    if c is not None:
                        self.low[k] = min(self.low.get(k, c), c)
                    s = m.get("tern_rib_staleness_seconds", 0.0)
                    self.high[n.name] = max(self.high.get(n.name, 0.0), s)
            self.stopped.wait(0.25)

    def metric(self, node, name):
        with self.lock:
            return self.last.get(node.name, {}).get(name)


class Run:
    def __init__(self, fleet):
        self.fleet = fleet
        self.load = Load(fleet.nodes[:2])
        self.mon = Monitor(fleet.nodes)
        self.lines = []   # (ok, text)
        self.notes = []
        self.n = 0
        self.phase_at = {}

    def phase(self, name):
        fl.log(f"phase: {name}")
        self.phase_at[name] = time.monotonic()
        self.load.phase = self.mon.phase = name

    def check(self, ok, text):
        self.lines.append((ok, text))
        fl.log(("PASS: " if ok else "FAIL: ") + text)

    def change(self, label, config=None, timeout=60):
        """Applies a new app and times it until every node's catalog holds it."""
        self.n += 1
        name = f"outage-{self.n}"
        decl = f'[[apps]]\nname = "{name}"\nhostnames = ["{name}.fleet.test"]\n'
        t0 = time.monotonic()
        self.fleet.apply(decl, name, config=config)
        t1 = time.monotonic()
        seen = {}
        end = t1 + timeout
        while len(seen) < len(self.fleet.nodes) and time.monotonic() < end:
            for n in self.fleet.nodes:
                if n.name not in seen and n.app(name):
                    seen[n.name] = time.monotonic() - t1
            time.sleep(0.005)
        missing = [n.name for n in self.fleet.nodes if n.name not in seen]
        took = max(seen.values()) if seen else None
        self.notes.append((label, t1 - t0, took, missing))
        return name, took, missing

    def wait_connected(self, since, timeout=60):
        """Seconds from `since` until every node reports tern_rib_connected 1 (None: never)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if all(n.metrics().get("tern_rib_connected") == 1.0 for n in self.fleet.nodes):
                return time.monotonic() - since
            time.sleep(0.05)
        return None

    def leader(self):
        for name, (_, lead) in self.fleet.status().items():
            if lead:
                return next(m for m in self.fleet.members if m.name == name)
        return None

    def one_member(self):
        self.phase("one member down")
        victim = self.leader() or self.fleet.members[0]
        fl.log(f"SIGKILL etcd {victim.name} (the leader)")
        victim.kill()
        _, took, missing = self.change("a change with one member down")
        self.check(not missing, f"with {victim.name} down, a change reached every node in "
                   f"{took * 1000:.0f} ms" if not missing else f"with one member down, never on {missing}")
        time.sleep(3)

    def all_down(self):
        self.phase("all members down")
        before = time.monotonic()
        for m in self.fleet.members:
            m.kill()
        fl.log(f"SIGKILL every etcd member; down for {ALL_DOWN_S:.0f}s")
        time.sleep(ALL_DOWN_S)
        self.phase("restarting")
        for m in self.fleet.members:
            m.start()
        restarted = time.monotonic()
        self.fleet.wait_etcd(60)
        healthy = time.monotonic() - restarted
        back = self.wait_connected(restarted)
        self.check(back is not None, f"etcd down {restarted - before:.1f}s; healthy {healthy:.1f}s after the restart; "
                   f"every node connected again {back:.1f}s after it" if back is not None else
                   "a node never reconnected after the restart")

    def after_recovery(self):
        self.phase("after recovery")
        _, took, missing = self.change("the first change after recovery")
        self.check(not missing, f"a change applied after recovery was on every node {took * 1000:.0f} ms after "
                   "`tern apply` returned" if not missing else f"the change after recovery never reached {missing}")

    def pick_frozen(self):
        """A member to freeze: followed by some node, by at most one worker (the other keeps
        its heartbeat, so its machines stay routable), preferably not the leader."""
        by = {}
        for n in self.fleet.nodes:
            m = self.fleet.member_of(n)
            if m:
                by.setdefault(m.name, []).append(n)
        lead = self.leader()
        best = None
        for m in self.fleet.members:
            nodes = by.get(m.name, [])
            workers = [n for n in nodes if n.name.startswith("worker")]
            if not nodes or len(workers) > 1:
                continue
            score = (m is not lead, len(nodes))
            if best is None or score > best[0]:
                best = (score, m, nodes)
        return (best[1], best[2]) if best else (None, [])

    def spread_workers(self):
        """After the outages the workers may follow one member (each node's reconnects walk its
        own list from wherever they got to). Kills that member and starts it again: the workers
        list the members in opposite cyclic orders, so they move to two different ones."""
        workers = [n for n in self.fleet.nodes if n.name.startswith("worker")]
        shared = self.fleet.member_of(workers[0])
        if shared is None or any(self.fleet.member_of(w) is not shared for w in workers):
            return
        fl.log(f"both workers follow etcd {shared.name}; SIGKILL it so they move apart, then start it again")
        shared.kill()
        end = time.monotonic() + 15
        while time.monotonic() < end:
            now = [self.fleet.member_of(w) for w in workers]
            if None not in now and len(set(id(m) for m in now)) == len(workers):
                break
            time.sleep(0.05)
        shared.start()
        self.fleet.wait_etcd(60)

    def compaction(self):
        self.phase("compaction")
        frozen, behind = self.pick_frozen()
        if frozen is None:
            self.spread_workers()
            frozen, behind = self.pick_frozen()
        if frozen is None:
            self.check(False, "no member could be frozen safely (both workers follow the same one); not measured")
            return
        before = {n.name: self.mon.metric(n, RESYNC) or 0.0 for n in self.fleet.nodes}
        others = [m for m in self.fleet.members if m is not frozen]
        cfg = os.path.join(self.fleet.run, "others.toml")
        with open(cfg, "w") as f:
            eps = ", ".join(f'"{m.url}"' for m in others)
            f.write(f'[rib]\nkind = "etcd"\nendpoints = [{eps}]\nprefix = "{fl.PREFIX}"\n')
        fl.log(f"SIGSTOP etcd {frozen.name}, followed by {', '.join(n.name for n in behind)}")
        frozen.signal(signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            for i in (1, 2):
                name = f"during-freeze-{i}"
                self.fleet.apply(f'[[apps]]\nname = "{name}"\nhostnames = ["{name}.fleet.test"]\n', name,
                                 config=cfg)
            # Asked of the others only: the frozen member would hold etcdctl up for its timeout,
            # long enough for the node's probe to give up on it before the compaction.
            rev = max(r for r, _ in self.fleet.status(others).values())
            r = self.fleet.etcdctl("compact", str(rev), "--physical", endpoints=[m.client for m in others])
            fl.log(f"compacted at revision {rev}: {(r.stdout + r.stderr).strip()}")
            # Every node has both changes once the frozen member's followers gave up on it.
            end = time.monotonic() + 60
            while time.monotonic() < end and not all(n.app(name) for n in self.fleet.nodes):
                time.sleep(0.01)
            took = time.monotonic() - t0
            missing = [n.name for n in self.fleet.nodes if not n.app(name)]
        finally:
            frozen.signal(signal.SIGCONT)
        self.notes.append((f"changes while {frozen.name} was frozen, compacted", None, None if missing else took,
                           missing))
        time.sleep(1.5)
        after = {n.name: (n.metrics().get(RESYNC) or 0.0) for n in self.fleet.nodes}
        counted = {k: after[k] - before[k] for k in after}
        ok = not missing and all(counted[n.name] >= 1 for n in behind)
        self.check(ok, f"{frozen.name} frozen, history compacted at {rev}: the nodes that followed it "
                   f"({', '.join(n.name for n in behind)}) resynced, resyncs_total{{reason=\"compacted\"}} "
                   f"+{', +'.join(f'{counted[n.name]:.0f}' for n in behind)}; every node had the changes "
                   f"{took:.1f}s after the first apply" + (f"; missing on {missing}" if missing else ""))
        self.counted = counted

    def report(self):
        failed = self.load.failed
        self.check(len(failed) == 0, f"failed requests for the existing route: {len(failed)} of "
                   f"{self.load.ok + len(failed)}")
        low_ok = all(self.mon.low.get((n.name, "all members down"), 1) == 0 for n in self.fleet.nodes)
        back_ok = all(n.metrics().get("tern_rib_connected") == 1.0 for n in self.fleet.nodes)
        self.check(low_ok and back_ok, "tern_rib_connected went 0 while etcd was down and is 1 again, on every node")
        peak = min(self.mon.high.get(n.name, 0) for n in self.fleet.nodes)
        self.check(peak >= ALL_DOWN_S * 0.8, f"tern_rib_staleness_seconds peaked at {peak:.1f}s or more on every node "
                   f"(etcd was down {ALL_DOWN_S:.0f}s)")

        print(f"\nOutage run: {LOAD_CONNS} connections on 2 edges, one request each per {LOAD_GAP * 1000:.0f} ms "
              f"+ answer time; {self.load.ok + len(failed)} requests")
        print(f"\n{'node':10} {'connected min (1 down / all down)':>34} {'staleness max':>14} {'compacted resyncs':>18}")
        for n in self.fleet.nodes:
            lo1 = self.mon.low.get((n.name, "one member down"), float("nan"))
            lo3 = self.mon.low.get((n.name, "all members down"), float("nan"))
            rs = getattr(self, "counted", {}).get(n.name, 0)
            print(f"{n.name:10} {lo1:>21.0f} / {lo3:<10.0f} {self.mon.high.get(n.name, 0):>13.1f}s {rs:>18.0f}")
        print(f"\n{'change':52} {'apply':>8} {'on all 4':>10}")
        for label, apply_s, took, missing in self.notes:
            a = f"{apply_s * 1000:.0f} ms" if apply_s is not None else ""
            t = f"{took * 1000:.0f} ms" if took is not None and not missing else ("never" if missing else "")
            print(f"{label:52} {a:>8} {t:>10}")
        if failed:
            print("\nfailed requests (the first 3):")
            for t, edge, phase, why in failed[:3]:
                print(f"  {edge} during '{phase}': {' '.join(why.split())}")
            by = {}
            for t, edge, phase, why in failed:
                k = (phase, edge, why.split(" ")[0] + " " + why.split(" ")[1] if " " in why else why)
                at = t - self.phase_at.get(phase, t)
                n, lo, hi = by.get(k, (0, at, at))
                by[k] = (n + 1, min(lo, at), max(hi, at))
            print("  by phase, edge and answer (seconds after the phase began):")
            for (phase, edge, why), (n, lo, hi) in by.items():
                print(f"    {phase:18} {edge:7} {why:24} {n:6}  from {lo:6.2f}s to {hi:6.2f}s")
        print()
        for ok, text in self.lines:
            print(("PASS  " if ok else "FAIL  ") + text)
        return all(ok for ok, _ in self.lines)


def main():
    profile = sys.argv[1] if len(sys.argv) > 1 else "release"
    tern, tm = fl.binaries(profile)
    fl.install_signal_exit()
    fleet = fl.Fleet(tern, tm)
    try:
        fleet.start()
        fleet.apply_demo()
        run = Run(fleet)
        run.mon.start()
        run.load.start()
        run.phase("steady")
        time.sleep(3)
        run.one_member()
        run.all_down()
        run.after_recovery()
        time.sleep(2)
        run.compaction()
        run.phase("end")
        time.sleep(2)
        run.load.finish()
        run.mon.stopped.set()
        return 0 if run.report() else 1
    except fl.FleetError as e:
        fl.log(f"error: {e}")
        return 1
    finally:
        fleet.stop()


if __name__ == "__main__":
    sys.exit(main())
