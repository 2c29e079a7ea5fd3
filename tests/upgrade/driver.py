"""Issue 11 hitless upgrade and drain acceptance, from the outside: see README.md beside this.

Run through run.sh, which passes: TERN, TEST_MACHINE, STREAM_LOAD, WORK (the run directory).
"""

import json
import os
import signal
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "wedge"))
import ternlab as L  # noqa: E402

TERN = os.environ["TERN"]
TEST_MACHINE = os.environ["TEST_MACHINE"]
STREAM_LOAD = os.environ["STREAM_LOAD"]
WORK = os.environ["WORK"]


def seconds(s):
    s = s.strip()
    for suffix, mult in (("ms", 0.001), ("s", 1), ("m", 60)):
        if s.endswith(suffix) and s[:-len(suffix)].replace(".", "", 1).isdigit():
            return float(s[:-len(suffix)]) * mult
    return float(s)


WINDOW_S = os.environ.get("UPGRADE_WINDOW", "20s")
DELAY_S = os.environ.get("UPGRADE_DRAIN_DELAY", "5s")
WINDOW, DELAY = seconds(WINDOW_S), seconds(DELAY_S)
N_SSE = int(os.environ.get("UPGRADE_SSE", "500"))
N_WS = int(os.environ.get("UPGRADE_WS", "100"))
CONNS = int(os.environ.get("UPGRADE_CONNS", "32"))
MODE = os.environ.get("UPGRADE_MODE", "upgrade")  # upgrade | sigusr2 | sigterm
ONLY = os.environ.get("UPGRADE_ONLY", "upgrade,drain").split(",")
DRAIN_SSE = int(os.environ.get("DRAIN_SSE", "20"))
DRAIN_WS = int(os.environ.get("DRAIN_WS", "5"))
SSE_GAP_MS = int(os.environ.get("UPGRADE_SSE_GAP_MS", "500"))
STRICT = os.environ.get("STRICT") == "1"
HOST = "upgrade.test"
N = N_SSE + N_WS

report = L.Report("upgrade")
procs = L.Procs(WORK)


class Node:
    def __init__(self, backend_addr):
        self.dir = WORK
        self.listen, self.admin = L.free_port(), L.free_port()
        self.config = os.path.join(WORK, "tern.toml")
        extra = {"shutdown": {"drain_window": WINDOW_S, "drain_delay": DELAY_S}}
        self.sections = L.prepare_config(TERN, self.config, self.listen, self.admin,
                                         os.path.join(WORK, "tern.db"), extra, report, STRICT)
        L.declare(TERN, self.config, WORK, "upgrade", HOST, backend_addr)
        self.proc = None

    def start(self):
        self.proc = procs.start("tern", [TERN, "serve", "-c", self.config])
        if not L.wait_ready(self.admin, self.listen, HOST):
            raise SystemExit(f"tern never became ready (see {WORK}/tern.log)")
        return self.proc.pid


# ---------------------------------------------------------------- streams


class Streams:
    """One stream_load process."""

    def __init__(self, node, name, n_sse, n_ws, reconnect=True):
        self.status = os.path.join(WORK, f"{name}.status")
        self.out = os.path.join(WORK, f"{name}.json")
        args = [STREAM_LOAD, "--addr", f"127.0.0.1:{node.listen}", "--host", HOST, "--sse", str(n_sse),
                "--ws", str(n_ws), "--sse-path", f"/ticks?n=100000000&gap_ms={SSE_GAP_MS}",
                "--status", self.status, "--out", self.out]
        if not reconnect:
            args.append("--no-reconnect")
        self.n = n_sse + n_ws
        self.proc = procs.start(name, args)

    def counts(self):
        try:
            return json.load(open(self.status))
        except (OSError, ValueError):
            return None

    def wait_open(self, timeout=60):
        end = L.now() + timeout
        c = None
        while L.now() < end:
            c = self.counts()
            if c and c["open"] == self.n:
                return c
            time.sleep(0.1)
        return c

    def finish(self):
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        try:
            return json.load(open(self.out))
        except (OSError, ValueError) as e:
            raise SystemExit(f"stream_load left no summary ({e}); see {WORK}") from e


# ---------------------------------------------------------------- analysis


def histogram(times, start, width, span, label="+"):
    """Text bars of `times` (seconds after `start`) in buckets of `width` seconds."""
    nb = max(1, int(span / width + 0.999))
    buckets = [0] * nb
    over = 0
    for t in times:
        i = int((t - start) // width)
        if 0 <= i < nb:
            buckets[i] += 1
        else:
            over += 1
    top = max(buckets + [1])
    for i, c in enumerate(buckets):
        bar = "#" * (0 if c == 0 else max(1, round(50 * c / top)))
        print(f"    {label}{i * width:5.1f}s..{(i + 1) * width:5.1f}s {c:5d} {bar}")
    if over:
        print(f"    (outside the range: {over})")


def max_per_second(times):
    """The most ends within any 1 s (sliding)."""
    ts, best, j = sorted(times), 0, 0
    for i, t in enumerate(ts):
        while ts[j] < t - 1.0:
            j += 1
        best = max(best, i - j + 1)
    return best


def split_conns(summary, t0):
    """(the streams open when the upgrade began, and what followed each, per slot)."""
    by_slot = {}
    for c in summary["conns"]:
        by_slot.setdefault(c["slot"], []).append(c)
    for cs in by_slot.values():
        cs.sort(key=lambda c: c["opened"])
    originals = {s: next((c for c in cs if c["opened"] < t0 and (c["end"] == "open_at_exit" or c["ended"] >= t0)),
                         None) for s, cs in by_slot.items()}
    return by_slot, originals


def rel(t, base):
    return "n/a" if t is None or base is None else f"{t - base:+.2f} s"


def end_ok(c):
    return (c["kind"] == "sse" and c["end"] == "sse_boundary") or (c["kind"] == "ws" and c["end"] == "ws_close"
                                                                    and c["code"] == 1001)


def end_kinds(conns):
    kinds = {}
    for c in conns:
        k = c["end"] + (f" {c['code']}" if c.get("code") is not None else "")
        kinds[k] = kinds.get(k, 0) + 1
    return kinds


def probe_summary(samples, t_from):
    fails = {}
    total = 0
    for t, _, r in samples:
        if t < t_from:
            continue
        total += 1
        if r[0] != 200:
            k = str(r[0]) if r[0] is not None else r[1]
            fails[k] = fails.get(k, 0) + 1
    return total, fails


# ---------------------------------------------------------------- the upgrade


def act(node, old_pid):
    """Starts the upgrade (or its stand-in); returns the command's Popen or None."""
    if MODE == "upgrade":
        return procs.start("tern-upgrade", [TERN, "upgrade", "-c", node.config], append_log=False, cli=True)
    os.kill(old_pid, {"sigusr2": signal.SIGUSR2, "sigterm": signal.SIGTERM}[MODE])
    return None


def describe_action():
    return {"upgrade": "tern upgrade -c FILE", "sigusr2": "SIGUSR2 to tern",
            "sigterm": "SIGTERM to tern (a stand-in: today's stop, not an upgrade)"}[MODE]


def upgrade_run(node, old_pid):
    print(f"\n== upgrade: {N_SSE} SSE + {N_WS} WebSockets + wrk -c{CONNS} through tern; {describe_action()}; "
          f"drain_window {WINDOW_S}", flush=True)
    streams = Streams(node, "streams", N_SSE, N_WS)
    c = streams.wait_open()
    print(f"  streams open: {c and c['open']} of {N} ({c and c['open_sse']} SSE, {c and c['open_ws']} WS), "
          f"failed connects so far {c and c['connect_failures']}")
    if not c or c["open"] != N:
        report.fail("upgrade: streams opened", f"{c and c['open']} of {N} before the upgrade")
    wrk = L.start_wrk(procs, "wrk", node.listen, HOST, "/id", CONNS, 2, f"{int(WINDOW * 3 + 120)}s")
    probers = [
        L.Prober(lambda: L.try_request(node.listen, "/id", host=HOST, timeout=3)).start(),
        L.Prober(lambda: {"terns": L.tern_serving_pids(TERN), "old_alive": procs.alive(old_pid)},
                 interval=0.05, workers=1).start(),
    ]
    time.sleep(2)
    t0 = L.now()
    cmd = act(node, old_pid)
    print(f"  t0: {describe_action()}", flush=True)
    t_exit, cmd_rc, t_cmd_done = wait_old_exit(old_pid, cmd, t0)
    after_exit = settle(streams, t_exit)
    w = L.finish_wrk(wrk, interrupt=True)
    px, world = [p.stop() for p in probers]
    summary = streams.finish()
    new_pids = sorted({p for _, _, s in world for p in s["terns"] if p != old_pid})
    figures = dict(t0=t0, t_exit=t_exit, cmd_rc=cmd_rc, t_cmd_done=t_cmd_done, after_exit=after_exit,
                   wrk=w, px=px, new_pids=new_pids, old_pid=old_pid, cmd=cmd)
    judge_upgrade(summary, figures)
    live = [p for p in L.tern_serving_pids(TERN)]
    return live


def wait_old_exit(old_pid, cmd, t0):
    """Waits for the old process to end (the window plus 30 s at most); an upgrade command
    that fails gives up after 5 s."""
    t_exit = cmd_rc = t_done = None
    deadline = t0 + WINDOW + 30
    while L.now() < deadline:
        if cmd is not None and cmd_rc is None and cmd.poll() is not None:
            cmd_rc, t_done = cmd.returncode, L.now()
            if cmd_rc != 0:
                deadline = min(deadline, L.now() + 5)
        if not procs.alive(old_pid):
            t_exit = L.now()
            break
        time.sleep(0.02)
    if cmd is not None and cmd_rc is None:
        try:
            cmd_rc = cmd.wait(timeout=10)
            t_done = L.now()
        except subprocess.TimeoutExpired:
            pass
    return t_exit, cmd_rc, t_done


def settle(streams, t_exit, wait=3.0):
    """After the old process ended: are all streams open again, opened since the upgrade,
    and getting data since the old process ended?"""
    if t_exit is None:
        return None
    time.sleep(wait)
    return streams.counts()


def judge_upgrade(summary, f):
    t0, s = f["t0"], L.fmt_s
    if f["cmd"] is not None:
        out = open(os.path.join(WORK, "tern-upgrade.log"), errors="replace").read().strip()
        print(f"  tern upgrade: exit {f['cmd_rc']} after {s(f['t_cmd_done'] and f['t_cmd_done'] - t0)}; "
              f"said: {out[:300]!r}")
        report.check(f["cmd_rc"] == 0, "upgrade: tern upgrade exits 0", f"exit {f['cmd_rc']}")
    old_rc = procs.exit_code(f["old_pid"])
    print(f"  old process {f['old_pid']}: exited {s(f['t_exit'] and f['t_exit'] - t0)} after t0, code {old_rc}; "
          f"new tern process(es): {f['new_pids'] or 'none'}")
    by_slot, originals = split_conns(summary, t0)
    orig = [c for c in originals.values() if c]
    ended = [c for c in orig if c["end"] != "open_at_exit"]
    before = [c for cs in by_slot.values() for c in cs if c["end"] != "open_at_exit" and c["ended"] < t0]
    print(f"  streams open at t0: {len(orig)} of {N}; ended since: {len(ended)} {end_kinds(ended)}; "
          f"ended before t0 (unexpected): {len(before)}")
    times = [c["ended"] for c in ended]
    if times:
        width = 1.0 if WINDOW <= 40 else WINDOW / 40
        span = max(WINDOW + 2 * width, max(times) - t0 + width)
        print(f"  end times after t0 ({width:.1f} s buckets):")
        histogram(times, t0, width, span)
        first, last = min(times) - t0, max(times) - t0
        mps = max_per_second(times)
        print(f"  spread: first +{first:.2f} s, last +{last:.2f} s, max {mps} in any 1 s "
              f"(even over the window: {len(times) / WINDOW:.0f}/s)")
    reconnect_figures(by_slot, originals, summary, t0, f)
    judge_upgrade_rows(summary, f, orig, ended, times, by_slot, originals)


def reconnect_figures(by_slot, originals, summary, t0, f):
    lat, missing, again = [], 0, 0
    for slot, c in originals.items():
        if not c or c["end"] == "open_at_exit":
            continue
        nxt = next((d for d in by_slot[slot] if d["opened"] > c["ended"]), None)
        if nxt is None:
            missing += 1
        else:
            lat.append(nxt["opened"] - c["ended"])
        again += sum(1 for d in by_slot[slot] if d["opened"] > c["ended"] and d["end"] != "open_at_exit")
    fails = [x for x in summary["failures"] if x["at"] >= t0]
    kinds = {}
    for x in fails:
        kinds[x["error"]] = kinds.get(x["error"], 0) + 1
    f["reconnect_missing"], f["reconnect_fail_kinds"], f["ended_again"] = missing, kinds, again
    f["reconnect_fails"] = len(fails)
    if lat:
        print(f"  reconnects: {len(lat)} reopened, time from end to reopened: median "
              f"{statistics.median(lat) * 1000:.0f} ms, max {max(lat) * 1000:.0f} ms; never reopened: {missing}; "
              f"failed attempts since t0: {len(fails)} {kinds or ''}; reopened streams that ended again: {again}")
    else:
        print(f"  reconnects: none reopened; failed attempts since t0: {len(fails)} {kinds or ''}")
    ae = f["after_exit"]
    if ae:
        print(f"  3 s after the old process ended: {ae['open']} of {N} open; the oldest of them opened "
              f"{rel(ae['oldest_open'], t0)} after t0; the stalest got its last data {rel(ae['stalest_data'], f['t_exit'])} "
              f"after the old process ended")


def judge_upgrade_rows(summary, f, orig, ended, times, by_slot, originals):
    w, t0 = f["wrk"], f["t0"]
    total, pfails = probe_summary(f["px"], t0)
    print(f"  wrk: {L.wrk_line(w)}")
    print(f"  fresh-connection probes every 50 ms since t0: {total}, failed {sum(pfails.values())} {pfails or ''}")
    refused = w["connect"] + pfails.get("refused", 0) + f["reconnect_fail_kinds"].get("refused", 0)
    report.check(refused == 0, "upgrade: 0 refused connections",
                 f"wrk connect errors {w['connect']} (and write errors {w['write']}: wrk counts a refused "
                 f"non-blocking connect there), probes refused {pfails.get('refused', 0)}, stream reconnects "
                 f"refused {f['reconnect_fail_kinds'].get('refused', 0)}")
    failed = w["read"] + w["write"] + w["timeout"] + w["non2xx"] + sum(pfails.values()) + f["reconnect_fails"]
    report.check(failed == 0 and w["requests"], "upgrade: 0 failed requests",
                 f"wrk read {w['read']} write {w['write']} timeout {w['timeout']} non-2xx {w['non2xx']}; probes "
                 f"{sum(pfails.values())}; failed stream reconnects {f['reconnect_fails']}")
    bad = [c for c in ended if not end_ok(c)]
    report.check(len(ended) == N and not bad, "upgrade: every stream ends at a boundary",
                 f"{len(ended)} of {N} ended; {end_kinds(ended)}")
    ae = f["after_exit"]
    back = bool(ae and ae["open"] == N and ae["oldest_open"] and ae["oldest_open"] > t0
                and ae["stalest_data"] and ae["stalest_data"] > f["t_exit"])
    report.check(back and f["reconnect_missing"] == 0 and f["ended_again"] == 0,
                 "upgrade: all reconnect to the new process",
                 f"after the old exited: {ae and ae['open']} of {N} open, all opened after t0 and live: {back}; "
                 f"never reopened {f['reconnect_missing']}, reopened then ended again {f['ended_again']}")
    if times:
        spread, mps = max(times) - min(times), max_per_second(times)
        limit = max(3 * N / WINDOW, 10)
        report.check(spread >= 0.5 * WINDOW and mps <= limit and max(times) - t0 <= WINDOW + 2,
                     "upgrade: ends spread over the window",
                     f"first-to-last {spread:.1f} s (want >= {0.5 * WINDOW:.0f}), max {mps} in 1 s (want <= "
                     f"{limit:.0f}), last +{max(times) - t0:.1f} s (want <= {WINDOW + 2:.0f})")
    else:
        report.fail("upgrade: ends spread over the window", "no stream ended")
    old_rc = procs.exit_code(f["old_pid"])
    ok = f["t_exit"] is not None and f["t_exit"] - t0 <= WINDOW + 10 and old_rc in (0, "unknown")
    report.check(ok and f["new_pids"], "upgrade: old process gone, new one serving",
                 f"old exited {L.fmt_s(f['t_exit'] and f['t_exit'] - t0)} after t0 with {old_rc}; new {f['new_pids']}")


# ---------------------------------------------------------------- the drain


def drain_run(node, live):
    print(f"\n== drain: tern drain -c FILE (drain_delay {DELAY_S}, drain_window {WINDOW_S}), "
          f"{DRAIN_SSE} SSE + {DRAIN_WS} WS open, no reconnect", flush=True)
    if len(live) == 1:
        pid = live[0]
        print(f"  draining the tern now serving: pid {pid}")
    else:
        for p in live:
            procs.stop(p)
        pid = node.start()
        print(f"  started a fresh tern for it: pid {pid}")
    streams = Streams(node, "drain-streams", DRAIN_SSE, DRAIN_WS, reconnect=False)
    streams.wait_open()
    probers = [
        L.Prober(lambda: L.try_request(node.admin, "/healthz", timeout=1)).start(),
        L.Prober(lambda: L.try_request(node.listen, "/id", host=HOST, timeout=2)).start(),
    ]
    time.sleep(1)
    t_cmd = L.now()
    cmd = procs.start("tern-drain", [TERN, "drain", "-c", node.config], append_log=False, cli=True)
    deadline, cmd_rc, t_cmd_done = t_cmd + DELAY + WINDOW + 20, None, None
    while L.now() < deadline and procs.alive(pid):
        if cmd_rc is None and cmd.poll() is not None:
            cmd_rc, t_cmd_done = cmd.returncode, L.now()
            if cmd_rc != 0:
                deadline = min(deadline, L.now() + 3)
        time.sleep(0.02)
    t_exit = None if procs.alive(pid) else L.now()
    if cmd_rc is None:
        try:
            cmd_rc, t_cmd_done = cmd.wait(timeout=5), L.now()
        except subprocess.TimeoutExpired:
            pass
    hz, px = [p.stop() for p in probers]
    summary = streams.finish()
    judge_drain(pid, t_cmd, t_exit, cmd_rc, t_cmd_done, hz, px, summary)
    if procs.alive(pid):
        procs.stop(pid)


def judge_drain(pid, t_cmd, t_exit, cmd_rc, t_cmd_done, hz, px, summary):
    rel = lambda t: None if t is None else t - t_cmd  # noqa: E731
    s = L.fmt_s
    out = open(os.path.join(WORK, "tern-drain.log"), errors="replace").read().strip()
    print(f"  tern drain: exit {cmd_rc} after {s(rel(t_cmd_done))}; said: {out[:300]!r}")
    t503 = next((t for t, _, r in hz if t >= t_cmd and r[0] == 503), None)
    flaps = sum(1 for t, _, r in hz if t503 and t > t503 and r[0] == 200)
    # Closed: the first proxied request refused (or, for a listener that stays bound but no
    # longer accepts, timed out); any other failure before that is a failure during the delay.
    tclosed, kind = next(((t, r[1]) for t, _, r in px if t >= t_cmd and r[0] is None
                          and r[1] in ("refused", "timeout")), (None, None))
    during = [r for t, _, r in px if t503 and t503 <= t < (tclosed or 1e18)]
    ok_during = sum(1 for r in during if r[0] == 200)
    rc = procs.exit_code(pid)
    print(f"  /healthz 503 from {s(rel(t503))} (200 again afterwards: {flaps} times); listener stopped "
          f"answering at {s(rel(tclosed))} ({kind}); {ok_during} of {len(during)} proxied requests succeeded "
          f"in between; tern exited {s(rel(t_exit))} with code {rc}")
    ends = [c for c in summary["conns"] if c["end"] != "open_at_exit"]
    if ends:
        times = [c["ended"] for c in ends]
        print(f"  the {len(summary['conns'])} streams: {end_kinds(summary['conns'])}; ends after the command "
              f"from +{min(times) - t_cmd:.1f} s to +{max(times) - t_cmd:.1f} s:")
        width = 1.0 if DELAY + WINDOW <= 40 else (DELAY + WINDOW) / 40
        histogram(times, t_cmd, width, max(DELAY + WINDOW, max(times) - t_cmd) + width)
    report.check(cmd_rc == 0, "drain: tern drain exits 0", f"exit {cmd_rc}")
    held = None if t503 is None or tclosed is None else tclosed - t503
    report.check(held is not None and held >= DELAY - 0.25 and flaps == 0 and ok_during == len(during),
                 f"drain: /healthz 503 for drain_delay ({DELAY_S}) first",
                 f"503 at {s(rel(t503))}, listener closed {s(held)} later, proxied requests meanwhile "
                 f"{ok_during}/{len(during)} ok, flaps {flaps}")
    report.check(rc == 0, "drain: exit 0", f"code {rc}, {s(rel(t_exit))} after the command")


def main():
    L.become_subreaper()
    L.install_signal_exit()
    ok = False
    try:
        _, backend_addr = L.start_backend(procs, TEST_MACHINE)
        print(f"tern {TERN}\nbackend {backend_addr}; run directory {WORK}")
        node = Node(backend_addr)
        print(f"tern on 127.0.0.1:{node.listen}, admin 127.0.0.1:{node.admin}")
        pid = node.start()
        live = [pid]
        if "upgrade" in ONLY:
            live = upgrade_run(node, pid)
        if "drain" in ONLY:
            drain_run(node, live)
        ok = report.print_summary()
    finally:
        procs.cleanup()
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
