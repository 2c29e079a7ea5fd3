"""Issue 11 wedge acceptance, from the outside: see README.md beside this file.

Run through run.sh, which passes: TERN, TEST_MACHINE, WORK (the run directory).
"""

import datetime
import json
import os
import re
import socket
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ternlab as L  # noqa: E402

TERN = os.environ["TERN"]
TEST_MACHINE = os.environ["TEST_MACHINE"]
WORK = os.environ["WORK"]
DURATION = int(os.environ.get("WEDGE_DURATION", "30"))
INJECT_AT = float(os.environ.get("WEDGE_INJECT_AT", "10"))
CONNS = int(os.environ.get("WEDGE_CONNS", "64"))
THREADS = int(os.environ.get("WEDGE_THREADS", "2"))
STALL_AFTER = os.environ.get("WEDGE_STALL_AFTER", "2s")
WRK_TIMEOUT = os.environ.get("WRK_TIMEOUT", "10s")
ONLY = os.environ.get("WEDGE_ONLY", "deadlock,block-worker,spin,panic").split(",")
PANIC_PATH = os.environ.get("WEDGE_PANIC_PATH", "/v1/debug/faults/panic")
STRICT = os.environ.get("STRICT") == "1"
WORKERS = 2  # `workers` in the node config (ternlab.toml_config)
HOST = "wedge.test"
DETECT_LIMIT, SERVE_LIMIT, SPIN_LIMIT = 2.0, 3.0, 2.0

report = L.Report("wedge")
procs = L.Procs(WORK)


class Node:
    """One tern on its own RIB directory, with the issue-11 sections."""

    def __init__(self, name, backend_addr):
        self.dir = os.path.join(WORK, name)
        os.makedirs(self.dir, exist_ok=True)
        self.listen, self.admin = L.free_port(), L.free_port()
        self.config = os.path.join(self.dir, "tern.toml")
        self.diag_dir = os.path.join(self.dir, "diagnostics")
        extra = {
            "watchdog": {"stall_after": STALL_AFTER, "action": "bounce", "diagnostics_dir": "diagnostics"},
            "debug": {"faults": True},
        }
        self.sections = L.prepare_config(TERN, self.config, self.listen, self.admin,
                                         os.path.join(self.dir, "tern.db"), extra, report, STRICT)
        L.declare(TERN, self.config, self.dir, "wedge", HOST, backend_addr)
        self.proc = procs.start(f"{name}/tern", [TERN, "serve", "-c", self.config])
        self.log = os.path.join(WORK, f"{name}/tern.log")
        if not L.wait_ready(self.admin, self.listen, HOST):
            raise SystemExit(f"tern never became ready (see {self.log})")
        self.pid = self.proc.pid

    def watchdog(self):
        return L.admin_json(self.admin, "/v1/watchdog", timeout=0.5)

    def post(self, path):
        return L.try_request(self.admin, path, method="POST", timeout=2)

    def stop_all(self):
        for pid in L.tern_serving_pids(TERN):
            procs.stop(pid)


def stalls_count(wd):
    s = wd.get("stalls") if isinstance(wd, dict) else None
    if isinstance(s, bool):
        return int(s)
    if isinstance(s, (int, float)):
        return s
    if isinstance(s, list):
        return len(s)
    if isinstance(s, dict):
        return sum(v for v in s.values() if isinstance(v, (int, float)))
    return None


def diag_files(d):
    try:
        return {f: os.stat(os.path.join(d, f)).st_mtime for f in os.listdir(d)}
    except OSError:
        return {}


def log_wedge_time(log, after):
    """Timestamp of tern's first log line after `after` that speaks of a wedge or stall."""
    try:
        lines = open(log, errors="replace").read().splitlines()
    except OSError:
        return None, None
    for line in lines:
        # The message only: paths in other fields contain "wedge" (target/wedge/run-*).
        try:
            entry = json.loads(line)
            message = str(entry.get("message") or entry.get("fields", {}).get("message", ""))
            ts = datetime.datetime.fromisoformat(entry["timestamp"]).timestamp()
        except (ValueError, KeyError, TypeError, AttributeError):
            continue
        if not re.search(r"wedge|stall|deadlock|watchdog", message, re.I):
            continue
        if ts >= after - 0.05:
            return ts, line[:240]
    return None, None


def observe(node, old_pid):
    """Pollers for a wedge run: /v1/watchdog, a proxied request on a fresh connection, and
    the diagnostics directory plus the tern processes alive; each every 50 ms."""
    def watchdog():
        st, wd = node.watchdog()
        if wd is None:
            return {"status": st}
        return {"status": st, "pid": wd.get("pid"), "stalls": stalls_count(wd), "wedged": wd.get("wedged"),
                "last_diagnostics": wd.get("last_diagnostics")}

    def proxied():
        return L.try_request(node.listen, "/id", host=HOST, timeout=3)

    def world():
        return {"diag": diag_files(node.diag_dir), "terns": L.tern_serving_pids(TERN),
                "old_alive": procs.alive(old_pid)}

    return [L.Prober(watchdog).start(), L.Prober(proxied).start(), L.Prober(world, workers=1).start()]


def analyse_times(node, t_inj, wd_samples, px_samples, world_samples, pid0, stalls0, diag0):
    """The figures of one wedge run, as a dict of seconds after injection (None: not seen)."""
    rel = lambda t: None if t is None else t - t_inj  # noqa: E731
    f = {}
    # Detection: the diagnostics file, /v1/watchdog, the log.
    new_files = {}
    for t0, _, w in world_samples:
        for name, mtime in w["diag"].items():
            if name not in diag0 and name not in new_files:
                new_files[name] = (mtime, t0)
    f["diag_written"] = rel(min((m for m, _ in new_files.values()), default=None))
    f["diag_files"] = sorted(new_files)
    f["wd_stall_seen"] = rel(next((t for t, _, s in wd_samples if t >= t_inj and s.get("status") == 200
                                   and (s.get("wedged") or (stalls0 is not None and (s.get("stalls") or 0) > stalls0))),
                                  None))
    log_t, log_line = log_wedge_time(node.log, t_inj)
    f["log_wedge"], f["log_line"] = rel(log_t), log_line
    seen = [x for x in (f["diag_written"], f["wd_stall_seen"], f["log_wedge"]) if x is not None]
    f["detected"] = min(seen) if seen else None
    # The fresh process.
    nxt = next(((t, s["pid"]) for t, _, s in wd_samples
                if t >= t_inj and s.get("status") == 200 and s.get("pid") not in (None, pid0)), None)
    f["new_pid_admin"], f["new_pid"] = (rel(nxt[0]), nxt[1]) if nxt else (None, None)
    spawned = next(((t, [p for p in w["terns"] if p != pid0]) for t, _, w in world_samples
                    if t >= t_inj and any(p != pid0 for p in w["terns"])), None)
    f["new_process_seen"] = rel(spawned[0]) if spawned else None
    f["new_pids_seen"] = spawned[1] if spawned else []
    f["old_exited"] = rel(next((t for t, _, w in world_samples if t >= t_inj and not w["old_alive"]), None))
    # Proxied requests on fresh connections.
    after = [(t, te, r) for t, te, r in px_samples if t >= t_inj]
    ok = [(t, te) for t, te, r in after if r[0] == 200]
    bounce_t = next((x for x in (f["new_pid_admin"], f["new_process_seen"]) if x is not None), None)
    f["first_proxied_after_bounce"] = rel(next((te for t, te in ok if bounce_t is not None
                                                and t >= t_inj + bounce_t), None))
    fails = [r for _, _, r in after if r[0] != 200]
    kinds = {}
    for r in fails:
        k = str(r[0]) if r[0] is not None else r[1]
        kinds[k] = kinds.get(k, 0) + 1
    f["probe_total"], f["probe_fail"], f["probe_fail_kinds"] = len(after), len(fails), kinds
    f["probe_refused"] = kinds.get("refused", 0)
    # The longest stretch with no successful completion, from injection on.
    ends = sorted(te for _, te in ok)
    gap, prev = 0.0, t_inj
    for te in ends:
        gap, prev = max(gap, te - prev), te
    f["longest_gap"] = gap
    return f


def print_diagnostics(path, fault):
    """Prints the diagnostics file's relevant lines; returns (names a stale heartbeat,
    names two locks and two threads)."""
    try:
        text = open(path, errors="replace").read()
    except OSError as e:
        print(f"    cannot read {path}: {e}")
        return False, False
    try:
        text = json.dumps(json.loads(text), indent=2)
    except ValueError:
        pass
    lines = text.splitlines()
    print(f"    {path} ({len(text)} bytes, {len(lines)} lines)")
    pat = re.compile(r"stale|heartbeat|deadlock|cycle|lock|holder|waiter|thread|wchan", re.I)
    hits = [ln for ln in lines if pat.search(ln)]
    for ln in hits[:40]:
        print(f"    | {ln[:200]}")
    if len(hits) > 40:
        print(f"    | … {len(hits) - 40} more matching lines")
    # A heartbeat the watchdog called stale: "heartbeat X is stale" or the STALE mark.
    stale = any(re.search(r"heartbeat \S+ is stale|STALE", ln) for ln in lines)
    if fault != "deadlock":
        return stale, True
    # The deadlock's own lines must name two locks (dotted names such as rib.writer) and
    # two threads (by name, with their tid).
    cyc = [ln for ln in lines if re.search(r"deadlock|cycle", ln, re.I)]
    locks = {m for ln in cyc for m in re.findall(r"\b[a-z]+\.[a-z_]+\b", ln)}
    threads = {m for ln in cyc for m in re.findall(r"([\w-]+) \(tid \d+\)", ln)}
    print(f"    deadlock lines name locks {sorted(locks)} and threads {sorted(threads)}")
    return stale, len(locks) >= 2 and len(threads) >= 2


def find_diag(node, f, wd_samples):
    named = [s.get("last_diagnostics") for _, _, s in wd_samples if s.get("last_diagnostics")]
    for p in reversed(named):
        p = p if os.path.isabs(p) else os.path.join(node.dir, p)
        if os.path.exists(p):
            return p
    if f["diag_files"]:
        return os.path.join(node.diag_dir, f["diag_files"][-1])
    return None


def wedge_run(fault, backend_addr):
    print(f"\n== {fault}: wrk -c{CONNS} -t{THREADS} -d{DURATION}s --timeout={WRK_TIMEOUT} through tern, "
          f"POST /v1/debug/faults/{fault} at t={INJECT_AT:.0f} s", flush=True)
    node = Node(fault, backend_addr)
    pid0 = node.pid
    st, wd0 = node.watchdog()
    if wd0 is None:
        report.fail(f"{fault}: GET /v1/watchdog", f"answers {st} (not implemented in this binary?)")
    else:
        print(f"  /v1/watchdog before: {json.dumps(wd0)[:300]}")
        if wd0.get("pid") not in (None, pid0):
            print(f"  note: /v1/watchdog pid {wd0.get('pid')} is not the process started ({pid0})")
    stalls0 = stalls_count(wd0) if wd0 else None
    diag0 = diag_files(node.diag_dir)
    wrk = L.start_wrk(procs, f"{fault}/wrk", node.listen, HOST, "/id", CONNS, THREADS, f"{DURATION}s", WRK_TIMEOUT)
    t_wrk = L.now()
    probers = observe(node, pid0)
    time.sleep(max(0.0, t_wrk + INJECT_AT - L.now()))
    t_inj = L.now()
    st, body = node.post(f"/v1/debug/faults/{fault}")
    print(f"  injected at +{t_inj - t_wrk:.2f} s into wrk: POST /v1/debug/faults/{fault} -> {st} {body!r:.80}")
    if st not in (200, 202, 204):
        samples = [p.stop() for p in probers]
        w = L.finish_wrk(wrk, interrupt=True)
        print(f"  wrk (stopped early): {L.wrk_line(w)}")
        what = (f"{st}: no fault endpoint (not in this binary, or [debug] faults off)" if st in L.MISSING
                else f"{st} {body!r:.80}")
        report.fail(f"{fault}: inject", what)
        node.stop_all()
        return
    w = L.finish_wrk(wrk, timeout=DURATION + 30)
    time.sleep(0.5)
    wd_s, px_s, world_s = [p.stop() for p in probers]
    f = analyse_times(node, t_inj, [(a, b, r) for a, b, r in wd_s], px_s, world_s, pid0, stalls0, diag0)
    print_run(fault, node, f, w, wd_s, pid0)
    node.stop_all()


def print_run(fault, node, f, w, wd_s, pid0):
    s = L.fmt_s
    print(f"  wedge detected: +{s(f['detected'])} (diagnostics file written +{s(f['diag_written'])}, "
          f"/v1/watchdog stalls/wedged +{s(f['wd_stall_seen'])}, log +{s(f['log_wedge'])})")
    if f["log_line"]:
        print(f"    log: {f['log_line']}")
    print(f"  fresh process: pid {pid0} -> {f['new_pid'] or f['new_pids_seen'] or 'none'}; first /v1/watchdog "
          f"answer from it +{s(f['new_pid_admin'])}, process seen +{s(f['new_process_seen'])}, "
          f"old process exited +{s(f['old_exited'])} (code {procs.exit_code(pid0)})")
    print(f"  proxied probes (fresh connection every 50 ms): first success after the bounce "
          f"+{s(f['first_proxied_after_bounce'])}; longest stretch without a success {f['longest_gap']:.2f} s; "
          f"{f['probe_fail']} of {f['probe_total']} failed after injection {f['probe_fail_kinds'] or ''}")
    print(f"  wrk: {L.wrk_line(w)}")
    served = f["new_pid_admin"] if f["new_pid_admin"] is not None else None
    report.check(f["detected"] is not None and f["detected"] <= DETECT_LIMIT, f"{fault}: detected <= {DETECT_LIMIT:.0f} s",
                 f"+{s(f['detected'])}")
    report.check(served is not None and served <= SERVE_LIMIT, f"{fault}: fresh process serving <= {SERVE_LIMIT:.0f} s",
                 f"new pid on /v1/watchdog +{s(served)}, first proxied success after it "
                 f"+{s(f['first_proxied_after_bounce'])}")
    refused = f["probe_refused"]
    report.check(w["connect"] == 0 and refused == 0, f"{fault}: 0 refused / connect errors",
                 f"wrk connect errors {w['connect']} (write errors {w['write']}: wrk counts a refused "
                 f"non-blocking connect there), probe connections refused {refused}")
    failed = w["read"] + w["write"] + w["timeout"] + w["non2xx"]
    report.check(w["requests"] is not None and failed <= CONNS, f"{fault}: failed requests <= in flight",
                 f"wrk read {w['read']} + write {w['write']} + timeout {w['timeout']} + non-2xx {w['non2xx']} = "
                 f"{failed} (bound: {CONNS}, one in flight per connection; one worker's share of the "
                 f"connections is about {CONNS // WORKERS}); probes failed {f['probe_fail']}")
    path = find_diag(node, f, wd_s)
    if path is None:
        report.fail(f"{fault}: diagnostics file", f"none in {node.diag_dir} and none named by /v1/watchdog")
        return
    print("  diagnostics file:")
    stale, locks = print_diagnostics(path, fault)
    if fault == "deadlock" and not stale:
        # Seen as a cycle within a look of the fault, before anything it starves goes stale.
        report.check(True, f"{fault}: diagnostics name the stale heartbeat",
                     "none stale yet: the cycle was reported first (heartbeat ages are listed)")
    else:
        report.check(stale, f"{fault}: diagnostics name the stale heartbeat", os.path.basename(path))
    if fault == "deadlock":
        report.check(locks, f"{fault}: diagnostics name 2 locks, 2 threads",
                     "the deadlock lines name >= 2 locks and >= 2 threads (printed above)")


def spin_run(backend_addr):
    print("\n== spin: a concurrent wrk -c16, POST /v1/debug/faults/spin, then one new connection", flush=True)
    node = Node("spin", backend_addr)
    pid0 = node.pid
    m0 = L.metrics(node.admin)
    sw0 = L.metric_sum(m0, "tern_spurious_wakeups_total")
    _, wd0 = node.watchdog()
    wrk = L.start_wrk(procs, "spin/wrk", node.listen, HOST, "/id", 16, 1, "12s", WRK_TIMEOUT)
    time.sleep(3)
    st, body = node.post("/v1/debug/faults/spin")
    print(f"  POST /v1/debug/faults/spin -> {st} {body!r:.80}")
    if st not in (200, 202, 204):
        w = L.finish_wrk(wrk, interrupt=True)
        print(f"  wrk (stopped early): {L.wrk_line(w)}")
        report.fail("spin: inject", f"{st}: no fault endpoint" if st in L.MISSING else f"{st} {body!r:.80}")
        node.stop_all()
        return
    closed, got = spin_connection(node.listen)
    time.sleep(1.0)
    sw1 = L.metric_sum(L.metrics(node.admin), "tern_spurious_wakeups_total")
    w = L.finish_wrk(wrk, timeout=30)
    _, wd1 = node.watchdog()
    after = L.try_request(node.listen, "/id", host=HOST)
    print(f"  the spinning connection: closed after {L.fmt_s(closed)}, got {got!r:.80}")
    print(f"  tern_spurious_wakeups_total: {sw0} -> {sw1}")
    print(f"  wrk alongside: {L.wrk_line(w)}")
    report.check(closed is not None and closed <= SPIN_LIMIT, f"spin: closed <= {SPIN_LIMIT:.0f} s", L.fmt_s(closed))
    report.check(sw1 is not None and sw1 > (sw0 or 0), "spin: counted", f"tern_spurious_wakeups_total {sw0} -> {sw1}")
    pids = L.tern_serving_pids(TERN)
    same = procs.alive(pid0) and pids == [pid0] and (wd1 or {}).get("pid", pid0) == (wd0 or {}).get("pid", pid0)
    report.check(same, "spin: no bounce", f"tern pids {pids}, started {pid0}, /v1/watchdog pid "
                 f"{(wd0 or {}).get('pid')} -> {(wd1 or {}).get('pid')}")
    report.check(w["errors"] == 0 and w["non2xx"] == 0 and w["requests"] and after[0] == 200,
                 "spin: other traffic unaffected", f"wrk {w['requests']} requests, {w['errors']} socket errors, "
                 f"{w['non2xx']} non-2xx; a new request afterwards -> {after[0]}")
    node.stop_all()


def spin_connection(port, limit=5.0):
    """Opens a connection, sends a request, and times how long until tern closes it."""
    t0 = L.now()
    s = socket.create_connection(("127.0.0.1", port), timeout=limit)
    got = b""
    try:
        s.sendall(f"GET /id HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
        while L.now() - t0 < limit:
            s.settimeout(max(0.01, limit - (L.now() - t0)))
            chunk = s.recv(4096)
            if not chunk:
                return L.now() - t0, got
            got += chunk
    except (ConnectionResetError, BrokenPipeError):
        return L.now() - t0, got
    except (socket.timeout, TimeoutError):
        return None, got
    finally:
        s.close()
    return None, got


def panic_run(backend_addr):
    print(f"\n== panic: POST {PANIC_PATH}", flush=True)
    node = Node("panic", backend_addr)
    p0 = L.metric_sum(L.metrics(node.admin), "tern_task_panics_total")
    st, body = node.post(PANIC_PATH)
    if st in L.MISSING:
        report.skip("panic: restarted and counted", f"POST {PANIC_PATH} answers {st} (no such hook in this binary)")
        node.stop_all()
        return
    print(f"  POST {PANIC_PATH} -> {st} {body!r:.80}")
    # The task panics at its next pass, which a busy machine may put off: looked for until it
    # is counted, for at most 10 s.
    deadline = time.monotonic() + 10
    while True:
        p1 = L.metric_sum(L.metrics(node.admin), "tern_task_panics_total")
        if (p1 is not None and p1 > (p0 or 0)) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    after = L.try_request(node.listen, "/id", host=HOST)
    report.check(p1 is not None and p1 > (p0 or 0), "panic: counted", f"tern_task_panics_total {p0} -> {p1}")
    report.check(after[0] == 200 and procs.alive(node.pid) and L.tern_serving_pids(TERN) == [node.pid],
                 "panic: tern keeps serving, no bounce", f"request -> {after[0]}, pids {L.tern_serving_pids(TERN)}")
    node.stop_all()


def main():
    L.become_subreaper()
    L.install_signal_exit()
    ok = False
    try:
        _, backend_addr = L.start_backend(procs, TEST_MACHINE)
        print(f"tern {TERN}\nbackend {backend_addr}; run directory {WORK}")
        for fault in ("deadlock", "block-worker"):
            if fault in ONLY:
                wedge_run(fault, backend_addr)
        if "spin" in ONLY:
            spin_run(backend_addr)
        if "panic" in ONLY:
            panic_run(backend_addr)
        ok = report.print_summary()
    finally:
        procs.cleanup()
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
