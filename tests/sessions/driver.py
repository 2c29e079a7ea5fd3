"""Scenario driver for tests/sessions (run by run.sh with the harness venv's python).

Starts two tern nodes sharing one SQLite RIB, runs the MCP and EventSource machines itself
(declared `state = "started"` without `cmd`), applies declarations, runs the client matrix and
the extra scenarios, prints a results table, and exits non-zero on any failure.

Environment: TERN (binary, required), SESSIONS_N (sessions per combination, 50),
SESSIONS_CONCURRENCY (4), SESSIONS_MACHINES (machines per MCP app, 3; 1 is the harness
self-check, which must pass even without session affinity), SESSIONS_ONLY (comma list of
row groups to run: matrix,rebind,invalid,prune,autostop,eventsource), SESSIONS_MODES
(http,https,h2), CHROMIUM (/usr/bin/chromium).
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections import defaultdict
from pathlib import Path

import httpx
import trustme

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
WORK = ROOT / "target" / "sessions"
PY = sys.executable
NODE_DIR = WORK / "node"
TERN = os.environ["TERN"]
N = int(os.environ.get("SESSIONS_N", "50"))
CONC = int(os.environ.get("SESSIONS_CONCURRENCY", "4"))
MACHINES = int(os.environ.get("SESSIONS_MACHINES", "3"))
ONLY = set(filter(None, os.environ.get("SESSIONS_ONLY", "").split(",")))
MODES = os.environ.get("SESSIONS_MODES", "http,https,h2").split(",")
CHROMIUM = os.environ.get("CHROMIUM", shutil.which("chromium") or "/usr/bin/chromium")

procs = []
SERVERS = {}
rows = []  # (group, name, ok, figures, detail)


def want(group):
    return not ONLY or group in ONLY


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def spawn(argv, log, **kw):
    p = subprocess.Popen(argv, stdout=open(log, "a"), stderr=subprocess.STDOUT, start_new_session=True, **kw)
    procs.append(p)
    return p


def wait_port(port, deadline=20):
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {deadline} s")


def cleanup():
    for p in procs:
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)


def toml_str(s):
    return json.dumps(str(s))


class Machine:
    """A machine the harness runs (no `cmd`): an MCP server (py/ts) or an SSE server."""

    def __init__(self, tmp, app, mid, kind, allowed_hosts=("mcp.test",), extra=()):
        self.app, self.id, self.kind = app, mid, kind
        self.port = free_port()
        self.log = tmp / "machines" / f"{mid}.log"
        self.log.parent.mkdir(exist_ok=True)
        self.log.touch()
        out = tmp / "machines" / f"{mid}.out"
        if kind == "py":
            argv = [PY, HERE / "py" / "mcp_server.py", str(self.port), mid, self.log]
            argv += [a for h in allowed_hosts for a in ("--allowed-host", h)] + list(extra)
        elif kind == "ts":
            argv = ["node", NODE_DIR / "mcp_server.mjs", str(self.port), mid, self.log, ",".join(allowed_hosts)]
        else:
            argv = [PY, HERE / "py" / "sse_server.py", str(self.port), mid, self.log]
        spawn([str(a) for a in argv], out)

    def lines(self):
        return [json.loads(x) for x in self.log.read_text().splitlines() if x.strip()]

    def decl(self):
        return (
            f'[[machines]]\nid = "{self.id}"\napp = "{self.app}"\nregion = "ams"\n'
            f'addr = "127.0.0.1:{self.port}"\nstate = "started"\n'
        )


class LogView:
    """A machine tern runs itself: only its id and its request log."""

    def __init__(self, mid, log):
        self.id, self.log = mid, log

    lines = Machine.lines


class Cluster:
    """Two tern nodes (A and B) on one SQLite RIB, each with a plain and a TLS listener."""

    def __init__(self, tmp, certs):
        self.tmp, self.certs = tmp, certs
        self.rib = tmp / "rib.db"
        self.nodes = []
        for name in ("a", "b"):
            n = {"name": name, "http": free_port(), "https": free_port(), "admin": free_port()}
            n["config"] = tmp / f"node-{name}.toml"
            n["config"].write_text(
                f'region = "ams"\nnode = "edge-{name}"\n'
                f'[[listen]]\naddr = "127.0.0.1:{n["http"]}"\n'
                f'[[listen]]\naddr = "127.0.0.1:{n["https"]}"\ntls = true\n'
                f'[admin]\naddr = "127.0.0.1:{n["admin"]}"\n'
                f"[rib]\npath = {toml_str(self.rib)}\n"
                f'[log]\nformat = "json"\n'
            )
            self.nodes.append(n)
        self.decl_path = tmp / "decl.toml"

    def start(self):
        for n in self.nodes:
            spawn([TERN, "serve", "-c", str(n["config"])], self.tmp / f"tern-{n['name']}.log")
        for n in self.nodes:
            wait_port(n["admin"])
            wait_port(n["http"])
            wait_port(n["https"])

    def apply(self, text, prune=True):
        self.decl_path.write_text(text)
        argv = [TERN, "apply", "-c", str(self.nodes[0]["config"]), str(self.decl_path)] + (["--prune"] if prune else [])
        r = subprocess.run(argv, capture_output=True, text=True)
        if r.returncode != 0:
            raise ApplyError((r.stderr or r.stdout).strip())
        return r.stdout

    def app_json(self, node, app):
        r = httpx.get(f"http://127.0.0.1:{node['admin']}/v1/apps/{app}", timeout=2)
        return r.json() if r.status_code == 200 else None

    def wait_machines(self, app, ids, deadline=20):
        """Polls both nodes until app shows exactly `ids`, all started."""
        end = time.monotonic() + deadline
        want_ids = sorted(ids)
        while True:
            seen = []
            for n in self.nodes:
                j = self.app_json(n, app)
                ms = j["machines"] if j else []
                seen.append(sorted(m["id"] for m in ms if m["state"] == "started"))
                if len(ms) != len(want_ids):
                    seen[-1] = None
            if all(s == want_ids for s in seen):
                return
            if time.monotonic() > end:
                raise RuntimeError(f"app {app}: nodes show started {seen}, want {want_ids} after {deadline} s")
            time.sleep(0.05)


class ApplyError(Exception):
    pass


def app_decl(name, hostname, extra=""):
    return f'[[apps]]\nname = "{name}"\nhostnames = ["{hostname}"]\nprimary_region = "ams"\n{extra}\n'


def cert_decl(certs, hostname):
    return (
        f'[[certificates]]\nhostname = "{hostname}"\n'
        f"cert_file = {toml_str(certs['cert'])}\nkey_file = {toml_str(certs['key'])}\n"
    )


def make_certs(tmp):
    ca = trustme.CA()
    leaf = ca.issue_cert("mcp.test", "other.test", "rebind.test", "sse.test", "auto.test")
    d = {"ca": tmp / "ca.pem", "cert": tmp / "cert.pem", "key": tmp / "key.pem"}
    ca.cert_pem.write_to_path(str(d["ca"]))
    leaf.private_key_pem.write_to_path(str(d["key"]))
    with open(d["cert"], "wb") as f:
        for blob in leaf.cert_chain_pems:
            f.write(blob.bytes())
    return d


def snapshot(machines):
    return {m.id: len(m.lines()) for m in machines}


def new_lines(machines, snap):
    return {m.id: m.lines()[snap.get(m.id, 0):] for m in machines}


# ---------------------------------------------------------------------------------------------
# The MCP matrix


def run_client(client, mode, ports, certs, sessions=None):
    sessions = sessions or N
    common = ["--ports", ",".join(map(str, ports)), "--sessions", str(sessions), "--concurrency", str(CONC)]
    if mode != "http":
        common += ["--scheme", "https", "--ca", str(certs["ca"])]
    if mode == "h2":
        common += ["--h2"]
    if client == "py":
        argv = [PY, str(HERE / "py" / "mcp_client.py")] + common
    else:
        argv = ["node", str(NODE_DIR / "mcp_client.mjs")] + common
    r = subprocess.run(argv, capture_output=True, text=True, timeout=60 + sessions * 50 // max(CONC, 1))
    try:
        return json.loads(r.stdout.strip().splitlines()[-1])
    except Exception:
        return {"ok": 0, "failed": sessions, "first_error": f"client crashed (exit {r.returncode}): {r.stderr[-400:]} {r.stdout[-400:]}", "sessions": []}


def session_spread(lines_by_machine):
    """Session ids (as machines saw them) mapped to the set of machines that saw them."""
    where = defaultdict(set)
    for mid, lines in lines_by_machine.items():
        for x in lines:
            if x.get("sid"):
                where[x["sid"]].add(mid)
    return where


def mcp_matrix(cl, tmp, certs, servers):
    for server_kind in ("py", "ts"):
        ms = servers[server_kind]
        try:
            cl.apply(base_decl(certs, ms))
            cl.wait_machines("mcp", [m.id for m in ms])
        except Exception as e:
            for mode in MODES:
                for client in ("py", "ts"):
                    rows.append(("matrix", f"{client} client -> {server_kind} server, {mode}", False, "-", str(e)))
            continue
        for mode in MODES:
            for client in ("py", "ts"):
                port_key = "http" if mode == "http" else "https"
                ports = [cl.nodes[0][port_key], cl.nodes[1][port_key]]
                snap = snapshot(ms)
                t0 = time.monotonic()
                res = run_client(client, mode, ports, certs)
                took = time.monotonic() - t0
                lines = new_lines(ms, snap)
                spread = session_spread(lines)
                split = sum(1 for s in spread.values() if len(s) > 1)
                gets = sum(1 for ls in lines.values() for x in ls if x["method"] == "GET" and x.get("sid"))
                dels = sum(1 for ls in lines.values() for x in ls if x["method"] == "DELETE")
                used = defaultdict(int)
                for s in res["sessions"]:
                    if s.get("machine"):
                        used[s["machine"]] += 1
                by_port = defaultdict(int)
                versions = set()
                for s in res["sessions"]:
                    for x in s.get("requests", []):
                        by_port["A" if x["port"] == ports[0] else "B"] += 1
                        if x.get("http_version"):
                            versions.add(x["http_version"])
                want_v = {"HTTP/2"} if mode == "h2" else {"HTTP/1.1"}
                ok = res["failed"] == 0 and split == 0 and res["ok"] == N and versions <= want_v
                figures = (
                    f"{res['ok']}/{N} ok, {res['failed']} failed; {split} sessions seen by >1 machine; "
                    f"GET streams {gets}, DELETEs {dels}; machines {dict(sorted(used.items()))}; "
                    f"requests to node {dict(sorted(by_port.items()))}"
                    + (f" over {'/'.join(sorted(versions))}" if versions else "")
                    + f"; {took:.1f}s"
                )
                detail = res["first_error"] or ("" if ok else f"sessions reached more than one machine, or not over {want_v}")
                rows.append(("matrix", f"{client} client -> {server_kind} server, {mode}", ok, figures, detail))


def base_decl(certs, mcp_machines, extra_apps=None):
    """The whole declaration (applied with --prune): `mcp` with these machines, the other apps."""
    text = app_decl("mcp", "mcp.test")
    text += "".join(m.decl() for m in mcp_machines)
    text += extra_apps if extra_apps is not None else extra_apps_decl(SERVERS)
    for h in ("mcp.test", "other.test", "rebind.test", "sse.test"):
        text += cert_decl(certs, h)
    return text


# ---------------------------------------------------------------------------------------------
# Raw MCP requests (httpx, no SDK) for the scenarios that need precise control


INIT = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "raw", "version": "1"}},
}
HDRS = {"content-type": "application/json", "accept": "application/json, text/event-stream"}


def raw_post(port, host, body, sid=None, timeout=10):
    h = dict(HDRS, host=host)
    if sid is not None:
        h["mcp-session-id"] = sid
    return httpx.post(f"http://127.0.0.1:{port}/mcp", json=body, headers=h, timeout=timeout)


def raw_session(port, host, machines=()):
    """initialize + notifications/initialized. Returns the Mcp-Session-Id the client was given and
    the machine whose log got the initialize (None when `machines` is empty)."""
    snap = snapshot(machines)
    r = raw_post(port, host, INIT)
    if r.status_code != 200 or "mcp-session-id" not in r.headers:
        raise RuntimeError(f"initialize via {host}: {r.status_code} {r.headers.get('tern-error')} {r.text[:200]}")
    sid = r.headers["mcp-session-id"]
    got = [mid for mid, ls in new_lines(machines, snap).items() if any(x["sid"] is None for x in ls)]
    # Without affinity this may reach another machine (404): the session then fails later, where
    # the scenario looks.
    raw_post(port, host, {"jsonrpc": "2.0", "method": "notifications/initialized"}, sid)
    return sid, (got[0] if got else None)


def raw_whoami(port, host, sid, id_=7):
    r = raw_post(port, host, {"jsonrpc": "2.0", "id": id_, "method": "tools/call", "params": {"name": "whoami", "arguments": {}}}, sid)
    text = r.text
    machine = None
    for line in text.splitlines():
        if line.startswith("data:"):
            d = json.loads(line[5:])
            try:
                machine = d["result"]["content"][0]["text"]
            except (KeyError, IndexError, TypeError):
                pass
    return r, machine


# ---------------------------------------------------------------------------------------------
# Extra scenarios


def scenario_rebind(cl, certs, servers, rebind):
    """The Python SDK's default (FastMCP(host="127.0.0.1")) refuses Host: rebind.test with 421."""
    r = raw_post(cl.nodes[0]["http"], "rebind.test", INIT)
    ok = r.status_code == 421 and "Invalid Host header" in r.text
    rows.append(
        (
            "rebind",
            "py SDK default security behind tern -> 421",
            ok,
            f"{r.status_code} {r.text.strip()[:40]!r}",
            "" if ok else "expected 421 Invalid Host header from the SDK",
        )
    )


def scenario_invalid(cl, certs, servers, other):
    ms = servers["py"]
    node = cl.nodes[0]
    port = node["http"]
    real, _ = raw_session(port, "mcp.test")
    other_token, _ = raw_session(port, "other.test")
    everyone = ms + [other]
    cases = [("garbage", "not-a-token-garbage-0000"), ("truncated", real[:-5]), ("other app's token", other_token)]
    for name, value in cases:
        snap = snapshot(everyone)
        body = {"jsonrpc": "2.0", "id": 2, "method": "tools/list"}
        rs = [raw_post(n["http"], "mcp.test", body, value) for n in cl.nodes]
        fresh = {k: v for k, v in new_lines(everyone, snap).items() if v}
        got = [(r.status_code, r.headers.get("tern-error")) for r in rs]
        ok = all(g == (404, "session_invalid") for g in got) and not fresh
        detail = ""
        if not ok:
            detail = f"want 404 session_invalid and no machine log line; machines saw it: {sorted(fresh) or 'none'}"
        rows.append(("invalid", f"{name} Mcp-Session-Id -> 404 session_invalid", ok, f"A,B got {got}", detail))


def scenario_prune(cl, certs, servers):
    """A session whose machine is pruned gets 404 session_gone; a fresh initialize then works."""
    import asyncio

    sys.path.insert(0, str(HERE / "py"))
    import mcp_client  # noqa: E402

    ms = servers["py"]
    args = mcp_client.parse(["--ports", f"{cl.nodes[0]['http']},{cl.nodes[1]['http']}", "--sessions", "1"])

    async def go():
        from mcp import ClientSession
        from mcp.client.streamable_http import streamable_http_client

        out = {}
        http, t = mcp_client.make_client(args)
        async with http:
            async with streamable_http_client(mcp_client.url(args), http_client=http) as (r, w, _):
                async with ClientSession(r, w) as s:
                    snap = snapshot(ms)
                    await s.initialize()
                    got = [mid for mid, ls in new_lines(ms, snap).items() if any(x["sid"] is None for x in ls)]
                    victim = got[0]
                    out["victim"] = victim
                    keep = [m for m in ms if m.id != victim]
                    cl.apply(base_decl(certs, keep), prune=True)
                    cl.wait_machines("mcp", [m.id for m in keep])
                    snap = snapshot(ms)
                    try:
                        await s.list_tools()
                        out["after"] = "tools/list succeeded"
                    except Exception as e:  # the SDK turns a 404 into an error for the caller
                        out["after"] = mcp_client.describe(e)
                    last = [x for x in t.log if x["method"] == "POST"][-1]
                    out["status"] = (last.get("status"), last.get("tern_error"))
                    out["reached"] = sorted(k for k, v in new_lines(ms, snap).items() if v)
        # A fresh session, as an application does when the SDK reports the session ended.
        res = await mcp_client.one_session(args, 0)
        out["fresh"] = res
        return out

    try:
        out = asyncio.run(go())
        fresh = out["fresh"]
        ok = out["status"] == (404, "session_gone") and not out["reached"] and fresh["ok"]
        figures = (
            f"victim {out['victim']}: next request got {out['status']}, machines reached {out['reached'] or 'none'}; "
            f"SDK said {out['after'][:60]!r}; fresh session: {'ok on ' + fresh.get('machine', '?') if fresh['ok'] else fresh['error']}"
        )
        rows.append(("prune", "--prune the session's machine -> 404 session_gone, then re-initialize", ok, figures, "" if ok else "want 404 session_gone before any machine"))
    except Exception as e:
        rows.append(("prune", "--prune the session's machine -> 404 session_gone, then re-initialize", False, "-", describe(e)))
    finally:
        cl.apply(base_decl(certs, ms))
        cl.wait_machines("mcp", [m.id for m in ms])


def describe(e):
    if isinstance(e, BaseExceptionGroup):
        return "; ".join(describe(x) for x in e.exceptions)
    return " ".join(f"{type(e).__name__}: {e}".split())[:300]


def scenario_autostop(tmp, certs, mode="suspend"):
    """One node, 3 machines tern runs (cmd) with auto_stop = mode: sessions opened on them
    must, after their machines were suspended or stopped, wake and reach the same machine.
    A suspended process keeps its memory, so the session still works; a stopped one restarts
    without it, and the server itself answers 404 (the client starts a new session)."""
    d = tmp / f"autostop-{mode}"
    d.mkdir()
    http, admin = free_port(), free_port()
    cfg = d / "node.toml"
    cfg.write_text(
        f'region = "ams"\n[[listen]]\naddr = "127.0.0.1:{http}"\n[admin]\naddr = "127.0.0.1:{admin}"\n'
        f'[rib]\npath = {toml_str(d / "rib.db")}\n[log]\nformat = "json"\n'
    )
    ids, logs = [], {}
    text = app_decl(
        "auto",
        "auto.test",
        f'auto_stop = "{mode}"\nauto_stop_after = "2s"\nmin_machines_running = 0\nwake_timeout = "20s"\n',
    )
    for i in range(1, MACHINES + 1):
        mid, port = f"auto-{i}", free_port()
        log = d / f"{mid}.log"
        log.touch()
        ids.append(mid)
        logs[mid] = log
        cmd = [PY, str(HERE / "py" / "mcp_server.py"), str(port), mid, str(log), "--allowed-host", "auto.test"]
        text += (
            f'[[machines]]\nid = "{mid}"\napp = "auto"\nregion = "ams"\naddr = "127.0.0.1:{port}"\n'
            f'state = "started"\ncmd = {json.dumps(cmd)}\n'
        )
    decl = d / "decl.toml"
    decl.write_text(text)
    name = f'autostop ({mode}) mid-session: the woken request reaches the session\'s machine'
    r = subprocess.run([TERN, "apply", "-c", str(cfg), str(decl)], capture_output=True, text=True)
    if r.returncode != 0:
        rows.append(("autostop", name, False, "-", f"apply: {r.stderr.strip()[:200]}"))
        return
    p = spawn([TERN, "serve", "-c", str(cfg)], d / "tern.log")

    def states():
        j = httpx.get(f"http://127.0.0.1:{admin}/v1/apps/auto", timeout=2).json()
        return {m["id"]: m["state"] for m in j["machines"]}

    def lines(mid):
        return [json.loads(x) for x in logs[mid].read_text().splitlines() if x.strip()]

    try:
        wait_port(admin)
        end = time.monotonic() + 30
        while set(states().values()) != {"started"}:
            if time.monotonic() > end:
                raise RuntimeError(f"machines never all started: {states()}")
            time.sleep(0.1)
        # Open sessions until they sit on at least two machines (or 12 tries).
        sessions = {}
        auto_ms = [LogView(mid, logs[mid]) for mid in ids]
        for _ in range(12):
            sid, machine = raw_session(http, "auto.test", auto_ms)
            if machine and machine not in sessions:
                sessions[machine] = sid
            if len(sessions) >= min(2, MACHINES):
                break
        if not sessions:
            raise RuntimeError("no session could be opened")
        held = sorted(sessions)
        end = time.monotonic() + 60
        while any(states()[m] not in ("suspended", "stopped") for m in held):
            if time.monotonic() > end:
                raise RuntimeError(f"machines never suspended: {states()}")
            time.sleep(0.1)
        before = {m: states()[m] for m in held}
        results = []
        for machine, sid in sessions.items():
            snap = {m: len(lines(m)) for m in ids}
            resp, who = raw_whoami(http, "auto.test", sid, id_=9)
            landed = sorted(m for m in ids if len(lines(m)) > snap[m])
            results.append((machine, resp.status_code, resp.headers.get("tern-error"), who, landed))
        ok = all(
            landed == [m] and (mode == "stop" or (st == 200 and who == m)) for m, st, _, who, landed in results
        )
        figures = f"held by {held} ({before}); " + "; ".join(
            f"{m}: {st} {te or ''} whoami={who} landed on {landed}" for m, st, te, who, landed in results
        )
        rows.append(("autostop", name, ok, figures, "" if ok else "a woken session request reached another machine"))
    except Exception as e:
        rows.append(("autostop", name, False, "-", describe(e)))
    finally:
        os.killpg(p.pid, signal.SIGTERM)
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)


def scenario_eventsource(cl, certs, servers):
    name = "Chromium EventSource, cookie affinity: 20/20 events from one machine"
    sse = servers["sse"]
    note = ""
    affinity = '[apps.affinity]\ncookie = "tern_affinity"\n'
    try:
        cl.apply(base_decl(certs, servers["py"], extra_apps=extra_apps_decl(servers, sse_extra=affinity)))
    except ApplyError as e:
        note = f"apply refused [apps.affinity] ({str(e).splitlines()[0][:120]}); ran without it. "
        cl.apply(base_decl(certs, servers["py"], extra_apps=extra_apps_decl(servers)))
    cl.wait_machines("sse", [m.id for m in sse])
    snap = snapshot(sse)
    port = cl.nodes[0]["http"]
    profile = tempfile.mkdtemp(prefix="chromium-", dir=cl.tmp)
    argv = [
        CHROMIUM,
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        f"--user-data-dir={profile}",
        "--host-resolver-rules=MAP sse.test 127.0.0.1",
        "--virtual-time-budget=30000",
        "--dump-dom",
        f"http://sse.test:{port}/",
    ]
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=90)
    except subprocess.TimeoutExpired:
        rows.append(("eventsource", name, False, "-", note + "chromium timed out"))
        return
    dom = r.stdout
    events = None
    if "EVENTS=" in dom:
        raw = dom.split("EVENTS=", 1)[1].split("</pre>", 1)[0]
        events = json.loads(raw.replace("&quot;", '"'))
    lines = new_lines(sse, snap)
    ev_reqs = sorted((x for ls in lines.values() for x in ls if x["path"] == "/events"), key=lambda x: x["t"])
    page_reqs = [(mid, x) for mid, ls in lines.items() for x in ls if x["path"] == "/"]
    if events is None:
        rows.append(("eventsource", name, False, f"{len(ev_reqs)} /events requests", note + f"no events in the DOM; chromium: {r.stderr.strip()[-200:]}"))
        return
    per = defaultdict(int)
    for e in events:
        per[e.split(":", 1)[1]] += 1
    with_lei = sum(1 for x in ev_reqs[1:] if x.get("last_event_id"))
    page_on = [mid for mid, _ in page_reqs]
    ok = len(events) == 20 and len(per) == 1 and with_lei == len(ev_reqs) - 1 and len(ev_reqs) >= 20
    ok = ok and (not page_on or page_on[0] in per)
    cookies = sorted({(x.get("cookie") or "")[:30] for x in ev_reqs})
    figures = (
        f"{len(events)} events by machine {dict(sorted(per.items()))}; page from {page_on}; "
        f"{len(ev_reqs)} /events requests, {with_lei} of the {max(len(ev_reqs) - 1, 0)} reconnects carried Last-Event-ID; "
        f"cookies seen {cookies}"
    )
    rows.append(("eventsource", name, ok, figures, note + ("" if ok else "events spread over machines")))


def extra_apps_decl(servers, sse_extra=""):
    text = app_decl("other", "other.test") + servers["other"].decl()
    text += app_decl("rebind", "rebind.test") + servers["rebind"].decl()
    text += app_decl("sse", "sse.test", sse_extra) + "".join(m.decl() for m in servers["sse"])
    return text


# ---------------------------------------------------------------------------------------------


def print_table():
    print()
    print(f"{'result':6}  {'group':11}  check")
    print("-" * 100)
    for group, name, ok, figures, detail in rows:
        print(f"{'PASS' if ok else 'FAIL':6}  {group:11}  {name}")
        print(f"{'':6}  {'':11}    {figures}")
        if detail:
            print(f"{'':6}  {'':11}    first failure: {detail}")
    passed = sum(1 for r in rows if r[2])
    print("-" * 100)
    print(f"sessions: {passed}/{len(rows)} checks passed, {len(rows) - passed} failed "
          f"(N={N} sessions per combination, {MACHINES} machines per MCP app, tern {TERN})")


def main():
    import logging

    logging.basicConfig(level=logging.CRITICAL)  # the SDK warns on every 404; the table says it
    tmp = Path(tempfile.mkdtemp(prefix="run-", dir=WORK))
    print(f"work dir: {tmp}")
    try:
        certs = make_certs(tmp)
        servers = {
            "py": [Machine(tmp, "mcp", f"mcp-py-{i}", "py") for i in range(1, MACHINES + 1)],
            "ts": [Machine(tmp, "mcp", f"mcp-ts-{i}", "ts") for i in range(1, MACHINES + 1)],
            "other": Machine(tmp, "other", "other-py-1", "py", allowed_hosts=("other.test",)),
            "rebind": Machine(tmp, "rebind", "rebind-py-1", "py", extra=["--sdk-default-security"]),
            "sse": [Machine(tmp, "sse", f"sse-{i}", "sse") for i in range(1, 4)],
        }
        SERVERS.update(servers)
        every = servers["py"] + servers["ts"] + [servers["other"], servers["rebind"]] + servers["sse"]
        for m in every:
            wait_port(m.port)
        cl = Cluster(tmp, certs)
        cl.apply(base_decl(certs, servers["py"], extra_apps=extra_apps_decl(servers)))
        cl.start()
        cl.wait_machines("mcp", [m.id for m in servers["py"]])
        steps = [
            ("matrix", lambda: mcp_matrix(cl, tmp, certs, servers)),
            ("rebind", lambda: scenario_rebind(cl, certs, servers, servers["rebind"])),
        ]
        steps += [
            ("invalid", lambda: (cl.apply(base_decl(certs, servers["py"])), cl.wait_machines("mcp", [m.id for m in servers["py"]]), scenario_invalid(cl, certs, servers, servers["other"]))),
            ("prune", lambda: scenario_prune(cl, certs, servers)),
            ("eventsource", lambda: scenario_eventsource(cl, certs, servers)),
            ("autostop", lambda: scenario_autostop(tmp, certs)),
            ("autostop", lambda: scenario_autostop(tmp, certs, "stop")),
        ]
        for group, fn in steps:
            if not want(group):
                continue
            print(f"== {group}", flush=True)
            try:
                fn()
            except Exception as e:
                traceback.print_exc()
                rows.append((group, group, False, "-", describe(e)))
    finally:
        cleanup()
    print_table()
    return 0 if rows and all(r[2] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
