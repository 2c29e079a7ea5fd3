"""Shared pieces of the outside harnesses for issue 11 (tests/wedge, tests/upgrade).

Standard library only. Everything runs on 127.0.0.1. The driver process makes itself a
child subreaper, so a tern started by a tern (a bounce, an upgrade) is reparented to it
rather than to init: cleanup finds every descendant by walking /proc, and the exit code of a
reparented tern can be read with waitpid.
"""

import concurrent.futures
import ctypes
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

PR_SET_CHILD_SUBREAPER = 36


def now():
    return time.time()


# ---------------------------------------------------------------- processes


def become_subreaper():
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
            print("note: prctl(PR_SET_CHILD_SUBREAPER) failed; a re-exec'd tern may outlive the run",
                  file=sys.stderr)
    except OSError:
        pass


def _stat(pid):
    """(comm, state, ppid) of a process, or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            s = f.read()
    except OSError:
        return None
    comm = s[s.index("(") + 1:s.rindex(")")]
    rest = s[s.rindex(")") + 2:].split()
    return comm, rest[0], int(rest[1])


def descendants(root=None):
    root = root or os.getpid()
    children = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            st = _stat(int(d))
            if st:
                children.setdefault(st[2], []).append(int(d))
    out, todo = [], [root]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


# Pids of tern CLI commands a harness ran (`tern upgrade`, `tern drain`): not servers.
CLI_PIDS = set()


def tern_serving_pids(tern_path):
    """Live tern processes below this driver (reparented ones included), other than the CLI
    commands in CLI_PIDS: a tern started by a tern is found whatever its arguments."""
    name = os.path.basename(tern_path)
    out = []
    for pid in descendants():
        st = _stat(pid)
        if not st or st[1] == "Z" or pid in CLI_PIDS:
            continue
        args = cmdline(pid)
        # argv[1]: a script through its interpreter (the self-check's fake_tern.py).
        if st[0] == name[:15] or any(os.path.basename(a) == name for a in args[:2]):
            out.append(pid)
    return sorted(out)


class Procs:
    """The processes a run starts; `alive`/`exit_code` also work for reparented terns."""

    def __init__(self, work):
        self.work = work
        self.popen = {}
        self.codes = {}
        self.lock = threading.Lock()

    def start(self, name, args, stdout=None, env=None, append_log=True, cli=False):
        log = open(os.path.join(self.work, f"{name}.log"), "ab" if append_log else "wb")
        p = subprocess.Popen(args, stdout=stdout if stdout is not None else log, stderr=log,
                             stdin=subprocess.DEVNULL, env=env, cwd=self.work)
        with self.lock:
            self.popen[p.pid] = p
        if cli:
            CLI_PIDS.add(p.pid)
        with open(os.path.join(self.work, "pids"), "a") as f:
            f.write(f"{p.pid}\n")
        return p

    def note_pid(self, pid):
        with open(os.path.join(self.work, "pids"), "a") as f:
            f.write(f"{pid}\n")

    def exit_code(self, pid):
        """The exit code (negative: killed by that signal) once `pid` has ended, else None.
        'unknown' when it ended but was not ours to wait for."""
        with self.lock:
            if pid in self.codes:
                return self.codes[pid]
            p = self.popen.get(pid)
        if p is not None:
            rc = p.poll()
            if rc is not None:
                with self.lock:
                    self.codes[pid] = rc
            return rc
        try:
            got, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            st = _stat(pid)
            if st and st[1] != "Z":
                return None
            return "unknown"
        if got == 0:
            return None
        rc = os.waitstatus_to_exitcode(status)
        with self.lock:
            self.codes[pid] = rc
        return rc

    def alive(self, pid):
        return self.exit_code(pid) is None

    def wait_exit(self, pid, timeout):
        end = now() + timeout
        while now() < end:
            if not self.alive(pid):
                return True
            time.sleep(0.02)
        return False

    def stop(self, pid, sig=signal.SIGTERM, timeout=10):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
        if not self.wait_exit(pid, timeout):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.wait_exit(pid, 3)

    def cleanup(self):
        """SIGTERM every descendant, then SIGKILL what is left; reap them all."""
        pids = descendants()
        for pid in pids:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        end = now() + 5
        while now() < end and any(self.alive(p) for p in pids):
            time.sleep(0.05)
        for pid in descendants():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for pid in pids:
            self.wait_exit(pid, 1)


def install_signal_exit():
    def bye(signum, _frame):
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, bye)
    signal.signal(signal.SIGINT, bye)


# ---------------------------------------------------------------- ports, config


def free_port():
    """A port that was free a moment ago (tern needs concrete ports: `tern upgrade -c FILE`
    and `tern drain -c FILE` find the admin address in the file)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def toml_config(listen_port, admin_port, rib_path, extra_sections):
    """A node config; extra_sections: {"watchdog": {"stall_after": "2s", ...}, ...}."""
    lines = [
        'region = "lab"',
        "workers = 2",
        "[[listen]]",
        f'addr = "127.0.0.1:{listen_port}"',
        "[admin]",
        f'addr = "127.0.0.1:{admin_port}"',
        "[rib]",
        f'path = "{rib_path}"',
        "[driver]",
        'kind = "process"',
        "[log]",
        'format = "json"',
        'level = "info"',
        "access = false",
    ]
    for name, table in extra_sections.items():
        lines.append(f"[{name}]")
        for k, v in table.items():
            lines.append(f"{k} = {json.dumps(v)}")
    return "\n".join(lines) + "\n"


def prepare_config(tern, path, listen_port, admin_port, rib_path, extra, report, strict):
    """Writes the config with the issue-11 sections; if this tern refuses them (an older
    binary: unknown field), records that, and writes it without them so that the rest of
    the harness can still run. Returns the sections kept."""
    with open(path, "w") as f:
        f.write(toml_config(listen_port, admin_port, rib_path, extra))
    r = subprocess.run([tern, "check", "-c", path], capture_output=True, text=True)
    if r.returncode == 0:
        report.ok("config", f"tern check accepts [{'], ['.join(extra)}]")
        return extra
    msg = (r.stderr or r.stdout).strip().splitlines()
    msg = msg[0].replace(path, os.path.basename(path)) if msg else f"exit {r.returncode}"
    report.fail("config", f"tern check refuses the issue-11 sections: {msg}")
    if strict:
        raise SystemExit("STRICT=1: stopping at the refused config")
    kept = {}
    for name, table in extra.items():
        with open(path, "w") as f:
            f.write(toml_config(listen_port, admin_port, rib_path, {**kept, name: table}))
        if subprocess.run([tern, "check", "-c", path], capture_output=True).returncode == 0:
            kept[name] = table
    with open(path, "w") as f:
        f.write(toml_config(listen_port, admin_port, rib_path, kept))
    dropped = [n for n in extra if n not in kept]
    print(f"  note: running WITHOUT [{'], ['.join(dropped)}] (this binary refuses them), "
          "to exercise the harness", flush=True)
    return kept


def declare(tern, config, work, app, host, backend_addr):
    decl = os.path.join(work, "decl.toml")
    with open(decl, "w") as f:
        f.write(f'''[[apps]]
name = "{app}"
hostnames = ["{host}"]
idle_timeout = "10m"

[[machines]]
id = "{app}-1"
app = "{app}"
region = "lab"
addr = "{backend_addr}"
state = "started"
''')
    r = subprocess.run([tern, "apply", "-c", config, decl], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"tern apply failed: {r.stderr.strip()}")


def start_backend(procs, test_machine, name="backend"):
    """The test backend (examples/test_machine.rs) on a port of its choosing."""
    log = os.path.join(procs.work, f"{name}.log")
    env = dict(os.environ, FLY_MACHINE_ID=name)
    p = procs.start(name, [test_machine, "127.0.0.1:0"], env=env)
    for _ in range(200):
        try:
            m = re.search(r"listening on (127\.0\.0\.1:\d+)", open(log).read())
        except OSError:
            m = None
        if m:
            return p, m.group(1)
        if p.poll() is not None:
            break
        time.sleep(0.05)
    raise SystemExit(f"the backend never reported its address (see {log})")


# ---------------------------------------------------------------- HTTP


# What tern's admin answers for a POST it has no route for: 404, or 405 from an admin that
# served only GET (before issue 11).
MISSING = (404, 405)


def classify(e):
    if isinstance(e, ConnectionRefusedError):
        return "refused"
    if isinstance(e, ConnectionResetError):
        return "reset"
    if isinstance(e, (socket.timeout, TimeoutError)):
        return "timeout"
    if isinstance(e, http.client.RemoteDisconnected):
        return "closed"
    if isinstance(e, BrokenPipeError):
        return "broken_pipe"
    return type(e).__name__


def request(port, path, host=None, method="GET", timeout=2.0, body=None):
    """One request on a fresh connection: (status, headers, body) or raises."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        headers = {"Host": host} if host else {}
        c.request(method, path, body=body, headers=headers)
        r = c.getresponse()
        return r.status, dict(r.getheaders()), r.read()
    finally:
        c.close()


def try_request(port, path, host=None, method="GET", timeout=2.0):
    """(status or None, body or error kind)."""
    try:
        st, _, body = request(port, path, host, method, timeout)
        return st, body
    except Exception as e:  # noqa: BLE001 - every failure is a data point
        return None, classify(e)


def admin_json(port, path, timeout=1.0):
    st, body = try_request(port, path, timeout=timeout)
    if st != 200:
        return st, None
    try:
        return st, json.loads(body)
    except ValueError:
        return st, None


def metrics(port):
    """{'name{labels}': value} from /metrics, or None."""
    st, body = try_request(port, "/metrics")
    if st != 200:
        return None
    out = {}
    for line in body.decode(errors="replace").splitlines():
        if line and not line.startswith("#"):
            parts = line.rsplit(" ", 1)
            try:
                out[parts[0]] = float(parts[1])
            except (IndexError, ValueError):
                pass
    return out


def metric_sum(m, name):
    """Sum of a metric over its labels; None when absent."""
    if m is None:
        return None
    vals = [v for k, v in m.items() if k == name or k.startswith(name + "{")]
    return sum(vals) if vals else None


def wait_ready(admin_port, listen_port, host, path="/id", timeout=15):
    end = now() + timeout
    while now() < end:
        st, _ = try_request(admin_port, "/healthz", timeout=0.5)
        if st == 200:
            pst, _ = try_request(listen_port, path, host=host, timeout=1)
            if pst == 200:
                return True
        time.sleep(0.05)
    return False


class Prober:
    """Calls fn() every `interval` on a pool, so one slow call does not delay the next;
    keeps (t_start, t_end, result) for each."""

    def __init__(self, fn, interval=0.05, workers=64):
        self.fn, self.interval = fn, interval
        self.samples = []
        self.lock = threading.Lock()
        self.stop_ev = threading.Event()
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers)
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def start(self):
        self.thread.start()
        return self

    def _one(self):
        t0 = now()
        try:
            r = self.fn()
        except Exception as e:  # noqa: BLE001
            r = ("exception", classify(e))
        with self.lock:
            self.samples.append((t0, now(), r))

    def _loop(self):
        nxt = now()
        while not self.stop_ev.is_set():
            try:
                self.pool.submit(self._one)
            except RuntimeError:
                return
            nxt += self.interval
            self.stop_ev.wait(max(0.0, nxt - now()))

    def stop(self):
        self.stop_ev.set()
        self.thread.join()
        self.pool.shutdown(wait=True)
        with self.lock:
            return sorted(self.samples)


# ---------------------------------------------------------------- wrk


def start_wrk(procs, name, port, host, path, conns, threads, duration, timeout="10s"):
    args = ["wrk", f"-c{conns}", f"-t{threads}", f"-d{duration}", f"--timeout={timeout}",
            "-H", f"Host: {host}", f"http://127.0.0.1:{port}{path}"]
    out = open(os.path.join(procs.work, f"{name}.out"), "wb")
    p = procs.start(name, args, stdout=out)
    p.wrk_out = os.path.join(procs.work, f"{name}.out")
    p.wrk_args = args
    return p


def finish_wrk(p, timeout=None, interrupt=False):
    """Waits for wrk (SIGINT first when interrupt: wrk then prints its totals) and parses
    its report."""
    if interrupt and p.poll() is None:
        p.send_signal(signal.SIGINT)
    try:
        p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.send_signal(signal.SIGINT)
        try:
            p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    return parse_wrk(open(p.wrk_out).read())


def parse_wrk(text):
    r = {"requests": None, "connect": 0, "read": 0, "write": 0, "timeout": 0, "non2xx": 0,
         "rps": None, "raw": text}
    m = re.search(r"(\d+) requests in ([\d.]+\w+)", text)
    if m:
        r["requests"] = int(m.group(1))
        r["elapsed"] = m.group(2)
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    if m:
        r["connect"], r["read"], r["write"], r["timeout"] = map(int, m.groups())
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    if m:
        r["non2xx"] = int(m.group(1))
    m = re.search(r"Requests/sec:\s+([\d.]+)", text)
    if m:
        r["rps"] = float(m.group(1))
    r["errors"] = r["connect"] + r["read"] + r["write"] + r["timeout"]
    return r


def wrk_line(w):
    return (f"requests {w['requests']} ({w['rps']} req/s), socket errors: connect {w['connect']}, "
            f"read {w['read']}, write {w['write']}, timeout {w['timeout']}; non-2xx/3xx {w['non2xx']}")


# ---------------------------------------------------------------- report


class Report:
    def __init__(self, title):
        self.title = title
        self.rows = []

    def _add(self, verdict, name, detail):
        if (verdict, name, detail) in self.rows:
            return
        self.rows.append((verdict, name, detail))
        print(f"  {verdict:<4} {name}: {detail}", flush=True)

    def ok(self, name, detail=""):
        self._add("PASS", name, detail)

    def fail(self, name, detail=""):
        self._add("FAIL", name, detail)

    def skip(self, name, detail=""):
        self._add("SKIP", name, detail)

    def check(self, cond, name, detail=""):
        (self.ok if cond else self.fail)(name, detail)
        return cond

    def print_summary(self):
        print()
        print(f"== {self.title}: results")
        for verdict, name, detail in self.rows:
            print(f"{verdict:<4}  {name:<38} {detail}")
        n = {v: sum(1 for r in self.rows if r[0] == v) for v in ("PASS", "FAIL", "SKIP")}
        print(f"{self.title}: {n['PASS']} passed, {n['FAIL']} failed, {n['SKIP']} skipped")
        return n["FAIL"] == 0


def fmt_s(x):
    return "n/a" if x is None else f"{x:.2f} s"
