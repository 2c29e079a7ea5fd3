"""A tern fleet on loopback: a 3-member etcd cluster, 2 edge nodes and 2 worker nodes.

Used by examples/fleet/run.sh (the demo), examples/fleet/outage.sh and
benches/fleet/propagation.sh. Standard library only.

Addresses: every process gets a loopback address of its own (FLEET_NET, default 127.0.0, plus
a fixed host number below) and the usual port for its role (etcd 2379/2380, tern HTTP 8080,
admin 9090, backhaul 4280, machines 8001+). Fixed ports, because an etcd cluster is declared
before it starts (every member's peer URL is in --initial-cluster) and because the README's
curl lines should stay true; dedicated addresses, so they meet nothing else on the machine
(the embedded default tern, a system etcd, tests: all on 127.0.0.1 or random 127.x.y.z, and
kernel-picked ports are all above 32767). Every address is checked free before anything
starts.

Cleanup: this process makes itself a child subreaper, so a machine whose worker was SIGKILLed
(it outlives its tern on purpose) is reparented here, not to init. Stopping the fleet sends
SIGCONT and SIGTERM to every descendant, then SIGKILL to what is left: only what it started.
"""

import ctypes
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
NET = os.environ.get("FLEET_NET", "127.0.0")
PREFIX = "/tern/"
STATE = os.path.join(ROOT, "target", "fleet")

ETCD = [("m1", 11), ("m2", 12), ("m3", 13)]
# name, host number, region, the order it lists the etcd members in (tern follows its first
# endpoint and moves on to the next in its list when that one fails): each member serves at
# least one node at the start, and the two workers list them in opposite cyclic orders, so a
# member they both follow sends them to two different members when it dies.
NODES = [
    ("edge-1", 21, "ams", (0, 1, 2)),
    ("edge-2", 22, "ams", (1, 2, 0)),
    ("worker-1", 23, "ams", (2, 0, 1)),
    ("worker-2", 24, "fra", (0, 2, 1)),
]
RTT = {"ams": "{ ams = 0, fra = 9 }", "fra": "{ fra = 0, ams = 9 }"}
# The demo app's machines: id, owner, host number, port.
MACHINES = [
    ("demo-ams-1", "worker-1", 31, 8001),
    ("demo-ams-2", "worker-1", 31, 8002),
    ("demo-fra-1", "worker-2", 32, 8001),
]
HOST = "demo.fleet.test"
# [backhaul] heartbeat and dead_after of every node.
HEARTBEAT = os.environ.get("FLEET_HEARTBEAT", "500ms")
DEAD_AFTER = os.environ.get("FLEET_DEAD_AFTER", "1500ms")


def ip(n):
    return f"{NET}.{n}"


def log(msg):
    print(f"[fleet {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class FleetError(Exception):
    pass


# ---------------------------------------------------------------- processes


def become_subreaper():
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(36, 1, 0, 0, 0) != 0:  # PR_SET_CHILD_SUBREAPER
            log("note: prctl(PR_SET_CHILD_SUBREAPER) failed; a killed worker's machines may outlive the run")
    except OSError:
        pass


def _ppid(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            s = f.read()
    except OSError:
        return None
    return int(s[s.rindex(")") + 2:].split()[1])


def descendants(root=None):
    root = root or os.getpid()
    children = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            pp = _ppid(int(d))
            if pp is not None:
                children.setdefault(pp, []).append(int(d))
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


def reap():
    """Collects reparented children that ended (machines of a killed worker)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def signal_pid(pid, sig):
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def alive(p):
    return p is not None and p.poll() is None


# ---------------------------------------------------------------- HTTP


def http_get(addr, path, host=None, timeout=2.0):
    """(status, headers, body) or (0, {}, error text)."""
    h, p = addr.rsplit(":", 1)
    c = http.client.HTTPConnection(h, int(p), timeout=timeout)
    try:
        c.request("GET", path, headers={"Host": host} if host else {})
        r = c.getresponse()
        return r.status, dict(r.getheaders()), r.read().decode(errors="replace")
    except (OSError, http.client.HTTPException) as e:
        return 0, {}, str(e)
    finally:
        c.close()


def metrics(admin):
    """The node's metrics as {name_with_labels: value} ({} when it does not answer)."""
    st, _, body = http_get(admin, "/metrics")
    if st != 200:
        return {}
    out = {}
    for line in body.splitlines():
        if line and not line.startswith("#"):
            k, _, v = line.rpartition(" ")
            try:
                out[k] = float(v)
            except ValueError:
                pass
    return out


def wait_for(what, check, timeout, every=0.05):
    end = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > end:
            raise FleetError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(every)


# ---------------------------------------------------------------- the fleet


class Member:
    def __init__(self, fleet, name, host):
        self.name, self.ip = name, ip(host)
        self.client = f"{self.ip}:2379"
        self.peer = f"{self.ip}:2380"
        self.url = f"http://{self.client}"
        self.dir = os.path.join(fleet.run, "etcd", name)
        self.fleet = fleet
        self.proc = None
        self.started_once = False

    def start(self):
        state = "existing" if self.started_once else "new"
        self.started_once = True
        logf = open(self.dir + ".log", "ab")
        args = [
            "etcd", "--name", self.name, "--data-dir", self.dir,
            "--listen-client-urls", self.url, "--advertise-client-urls", self.url,
            "--listen-peer-urls", f"http://{self.peer}",
            "--initial-advertise-peer-urls", f"http://{self.peer}",
            "--initial-cluster", self.fleet.initial_cluster,
            "--initial-cluster-state", state, "--initial-cluster-token", "tern-fleet",
            # The benchmark fills and compacts; a demo never comes near these.
            "--quota-backend-bytes", str(4 << 30), "--max-txn-ops", "10000",
        ]
        self.proc = subprocess.Popen(args, stdout=logf, stderr=logf, stdin=subprocess.DEVNULL)
        logf.close()

    def kill(self):
        """SIGKILL, as a crash (a frozen member too)."""
        if alive(self.proc):
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def signal(self, sig):
        if alive(self.proc):
            self.proc.send_signal(sig)


class Node:
    def __init__(self, fleet, name, host, region, order):
        self.name, self.ip, self.region = name, ip(host), region
        self.http = f"{self.ip}:8080"
        self.admin = f"{self.ip}:9090"
        self.backhaul = f"{self.ip}:4280"
        self.dir = os.path.join(fleet.run, "nodes", name)
        eps = [m.url for m in fleet.members]
        self.endpoints = [eps[i] for i in order]
        self.config = os.path.join(self.dir, "tern.toml")
        self.fleet = fleet
        self.proc = None

    def write_config(self):
        os.makedirs(self.dir, exist_ok=True)
        eps = ", ".join(f'"{e}"' for e in self.endpoints)
        with open(self.config, "w") as f:
            f.write(f"""# {self.name}: written by examples/fleet/fleet.py
region = "{self.region}"
node = "{self.name}"

[[listen]]
addr = "{self.http}"

[admin]
addr = "{self.admin}"

[rib]
kind = "etcd"
endpoints = [{eps}]
prefix = "{PREFIX}"
# A quiet watch is probed after 2s and counted dead 1s later (defaults 5s and 3s): a frozen
# member is left sooner in the demo.
probe_after = "2s"
probe_timeout = "1s"

[backhaul]
addr = "{self.backhaul}"
heartbeat = "{HEARTBEAT}"
dead_after = "{DEAD_AFTER}"

[regions]
rtt_ms = {RTT[self.region]}

[shutdown]
drain_window = "2s"
drain_delay = "0s"

[log]
access = false
""")

    def start(self):
        logf = open(os.path.join(self.dir, "tern.log"), "ab")
        # cwd: the node's directory, where the process driver writes machine-logs/.
        self.proc = subprocess.Popen([self.fleet.tern, "serve", "-c", self.config], cwd=self.dir,
                                     stdout=logf, stderr=logf, stdin=subprocess.DEVNULL)
        logf.close()

    def healthy(self):
        return http_get(self.admin, "/healthz", timeout=1)[0] == 200

    def app(self, name):
        """The catalog's view of an app (None: unknown here)."""
        st, _, body = http_get(self.admin, f"/v1/apps/{name}")
        return json.loads(body) if st == 200 else None

    def metrics(self):
        return metrics(self.admin)


class Fleet:
    def __init__(self, tern, test_machine):
        self.tern, self.test_machine = tern, test_machine
        self.run = os.path.join(STATE, "run")
        self.members = [Member(self, n, h) for n, h in ETCD]
        self.initial_cluster = ",".join(f"{m.name}=http://{m.peer}" for m in self.members)
        self.nodes = [Node(self, *n) for n in NODES]
        self.client_config = os.path.join(self.run, "client.toml")

    # -- start and stop

    def claim(self):
        """One fleet at a time: target/fleet/fleet.pid names the process that runs it."""
        os.makedirs(STATE, exist_ok=True)
        pidfile = os.path.join(STATE, "fleet.pid")
        try:
            with open(pidfile) as f:
                other = int(f.read().strip() or 0)
        except (OSError, ValueError):
            other = 0
        if other and other != os.getpid() and os.path.exists(f"/proc/{other}"):
            raise FleetError(f"a fleet already runs (pid {other}): examples/fleet/run.sh stop")
        with open(pidfile, "w") as f:
            f.write(f"{os.getpid()}\n")

    def check_addresses(self):
        want = [m.client for m in self.members] + [m.peer for m in self.members]
        for n in self.nodes:
            want += [n.http, n.admin, n.backhaul]
        want += [f"{ip(h)}:{p}" for _, _, h, p in MACHINES]
        for a in want:
            h, p = a.rsplit(":", 1)
            s = socket.socket()
            # As the servers do: a port left in TIME_WAIT by the last run is free.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((h, int(p)))
            except OSError as e:
                raise FleetError(f"{a} is taken ({e.strerror}): is another fleet running? "
                                 "(examples/fleet/run.sh stop), or pick other addresses with FLEET_NET=127.0.N")
            finally:
                s.close()

    def start(self):
        become_subreaper()
        self.claim()
        self.check_addresses()
        if os.path.exists(self.run):
            subprocess.run(["rm", "-rf", self.run], check=True)
        os.makedirs(os.path.join(self.run, "etcd"))
        with open(self.client_config, "w") as f:
            eps = ", ".join(f'"{m.url}"' for m in self.members)
            f.write(f'# For tern apply against the fleet\'s RIB.\n[rib]\nkind = "etcd"\n'
                    f'endpoints = [{eps}]\nprefix = "{PREFIX}"\n')
        log(f"etcd: 3 members on {', '.join(m.client for m in self.members)}")
        for m in self.members:
            m.start()
        self.wait_etcd()
        for n in self.nodes:
            n.write_config()
            n.start()
        for n in self.nodes:
            wait_for(f"{n.name} /healthz on {n.admin}", lambda n=n: self.node_up(n), 30)
        log("nodes: " + ", ".join(f"{n.name} ({n.region}) {n.http}" for n in self.nodes))

    def node_up(self, n):
        if not alive(n.proc):
            raise FleetError(f"{n.name} exited ({n.proc.returncode}); see {n.dir}/tern.log")
        return n.healthy()

    def stop(self):
        """Everything this process started (and what those started), nothing else. The nodes
        first, while etcd still runs: a node leaving deletes its row, and stops its machines."""
        nodes = [n.proc for n in self.nodes if alive(n.proc)]
        for p in nodes:
            p.send_signal(signal.SIGTERM)
        for p in nodes:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                pass
        # One member at a time: a leader stopping with every peer stopping too waits seconds
        # for a leadership transfer that cannot happen.
        for m in self.members:
            if alive(m.proc):
                m.proc.send_signal(signal.SIGCONT)
                m.proc.send_signal(signal.SIGTERM)
                try:
                    m.proc.wait(5)
                except subprocess.TimeoutExpired:
                    pass
        pids = descendants()
        for p in pids:
            signal_pid(p, signal.SIGCONT)  # a frozen member could not die of SIGTERM
            signal_pid(p, signal.SIGTERM)
        end = time.monotonic() + 8
        while time.monotonic() < end and descendants():
            reap()
            time.sleep(0.05)
        left = descendants()
        if left:
            log("still running 8s after SIGTERM, now SIGKILLed: " + ", ".join(
                f"{p} {' '.join(cmdline(p))[:60]}" for p in left))
        for p in left:
            signal_pid(p, signal.SIGKILL)
        for _ in range(40):
            reap()
            if not descendants():
                break
            time.sleep(0.05)
        try:
            pidfile = os.path.join(STATE, "fleet.pid")
            with open(pidfile) as f:
                if int(f.read().strip() or 0) == os.getpid():
                    os.unlink(pidfile)
        except (OSError, ValueError):
            pass

    def revive(self):
        """`run.sh revive`: starts again whatever was killed (members first), as it was."""
        dead = [m for m in self.members if m.proc is None or m.proc.poll() is not None]
        for m in dead:
            log(f"restarting etcd {m.name}")
            m.start()
        if dead:
            self.wait_etcd()
        for n in self.nodes:
            if n.proc.poll() is not None:
                log(f"restarting {n.name}")
                n.start()
                wait_for(f"{n.name} /healthz", lambda n=n: self.node_up(n), 30)
        log("everything runs")

    # -- etcd

    def etcdctl(self, *args, endpoints=None, timeout=10):
        eps = ",".join(endpoints or [m.client for m in self.members if alive(m.proc)])
        env = dict(os.environ, ETCDCTL_API="3")
        return subprocess.run(["etcdctl", "--endpoints", eps, "--command-timeout=3s", *args],
                              capture_output=True, text=True, env=env, timeout=timeout)

    def wait_etcd(self, timeout=30):
        """Until every running member reports healthy (`etcdctl endpoint health`)."""
        def healthy():
            for m in self.members:
                if m.proc is not None and m.proc.poll() is not None:
                    raise FleetError(f"etcd {m.name} exited ({m.proc.returncode}); see {m.dir}.log")
            up = [m.client for m in self.members if alive(m.proc)]
            r = self.etcdctl("endpoint", "health", endpoints=up)
            # etcdctl 3.4 prints the verdicts on stderr.
            return r.returncode == 0 and (r.stdout + r.stderr).count(" is healthy") == len(up)
        wait_for("etcd endpoint health", healthy, timeout, every=0.1)

    def status(self, members=None):
        """{member name: (revision, is_leader)} of the members (all) that answer."""
        out = {}
        for m in members or self.members:
            if not alive(m.proc):
                continue
            r = self.etcdctl("endpoint", "status", "-w", "json", endpoints=[m.client])
            if r.returncode == 0:
                s = json.loads(r.stdout)[0]["Status"]
                out[m.name] = (int(s["header"]["revision"]), s["leader"] == s["header"]["member_id"])
        return out

    def member_of(self, node):
        """The etcd member a node's tern is connected to now (from its TCP connections)."""
        r = subprocess.run(["ss", "-Htnp", "state", "established"], capture_output=True, text=True)
        for line in r.stdout.splitlines():
            if f"pid={node.proc.pid}," not in line:
                continue
            for m in self.members:
                if re.search(rf"\s{re.escape(m.client)}\s", line + " "):
                    return m
        return None

    # -- tern

    def apply(self, decl_text, name="decl", config=None, prune=False):
        """`tern apply`; returns its stdout, raises on failure."""
        path = os.path.join(self.run, f"{name}.toml")
        with open(path, "w") as f:
            f.write(decl_text)
        args = [self.tern, "apply", "-c", config or self.client_config, path] + (["--prune"] if prune else [])
        r = subprocess.run(args, capture_output=True, text=True, timeout=60)
        if r.returncode != 0:
            raise FleetError(f"tern apply {path} failed: {r.stdout}{r.stderr}")
        return r.stdout

    def demo_decl(self):
        text = f"""# The demo app: written by examples/fleet/fleet.py
[[apps]]
name = "demo"
hostnames = ["{HOST}"]
internal_port = 8001
auto_stop = "off"
[[apps.checks]]
type = "http"
path = "/healthz"
interval = "1s"
timeout = "1s"
"""
        regions = {n.name: n.region for n in self.nodes}
        for mid, owner, h, port in MACHINES:
            text += f"""
[[machines]]
id = "{mid}"
app = "demo"
node = "{owner}"                    # only {owner} starts, stops and checks it
region = "{regions[owner]}"
addr = "{ip(h)}:{port}"
state = "started"
cmd = ["{self.test_machine}", "{ip(h)}:{port}"]
"""
        return text

    def apply_demo(self):
        out = self.apply(self.demo_decl(), "demo")
        log("tern apply demo.toml:\n" + out.rstrip())
        for n in self.nodes:
            def ready(n=n):
                a = n.app("demo")
                return a and sum(m["state"] == "started" for m in a["machines"]) == len(MACHINES)
            wait_for(f"the demo app started in {n.name}'s catalog", ready, 30)
        for n in self.nodes:
            wait_for(f"{n.name} answering for {HOST}",
                     lambda n=n: http_get(n.http, "/id", host=HOST)[0] == 200, 30)


def binaries(profile):
    tern = os.environ.get("TERN") or os.path.join(ROOT, "target", profile, "tern")
    tm = os.environ.get("TEST_MACHINE") or os.path.join(ROOT, "target", profile, "examples", "test_machine")
    for b in (tern, tm):
        if not os.access(b, os.X_OK):
            raise FleetError(f"no {b}: cargo build {'--release ' if profile == 'release' else ''}"
                             "--bin tern --example test_machine")
    return tern, tm


def install_signal_exit():
    def bye(signum, _frame):
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, bye)
    signal.signal(signal.SIGINT, bye)
    signal.signal(signal.SIGHUP, bye)


def tour(fleet):
    e1, e2 = fleet.nodes[0], fleet.nodes[1]
    eps = ",".join(m.client for m in fleet.members)
    w1 = fleet.nodes[2]
    print(f"""
The fleet is up (logs and configs: {fleet.run}).

  etcd    m1 {fleet.members[0].client}   m2 {fleet.members[1].client}   m3 {fleet.members[2].client}
  nodes   """ + "\n          ".join(
        f"{n.name:9} {n.region}  http {n.http}  admin {n.admin}  backhaul {n.backhaul}"
        for n in fleet.nodes) + f"""

Ask each edge (the answer is the machine's id; edges in ams prefer worker-1's ams machines):
  curl -H 'Host: {HOST}' http://{e1.http}/id
  curl -H 'Host: {HOST}' http://{e2.http}/id
  curl -s http://{e1.admin}/v1/apps/demo          # what edge-1's catalog holds
  curl -s http://{e1.admin}/metrics | grep -E '^tern_(rib|catalog)_'

Watch the RIB (heartbeats in /tern/nodes/ every 500ms):
  ETCDCTL_API=3 etcdctl --endpoints {eps} watch --prefix /tern/
Change it live:
  {fleet.tern} apply -c {fleet.client_config} YOUR.toml
Kill worker-1 (its machines stay up; the edges move to fra within dead_after = 1.5s):
  kill -9 {w1.proc.pid}
Kill an etcd member (the nodes move to another; with all three down they keep serving):
  kill -9 {fleet.members[0].proc.pid}
Start again whatever was killed: examples/fleet/run.sh revive

Ctrl-C here, or examples/fleet/run.sh stop, stops everything this run started.
""", flush=True)


def up(profile):
    """The demo: start, apply, print the tour, then watch until told to stop."""
    tern, tm = binaries(profile)
    install_signal_exit()
    fleet = Fleet(tern, tm)
    try:
        fleet.start()
        fleet.apply_demo()
        tour(fleet)
        revive = []
        signal.signal(signal.SIGUSR1, lambda *_: revive.append(1))
        while True:
            reap()
            if revive:
                revive.clear()
                fleet.revive()
            time.sleep(0.2)
    except FleetError as e:
        log(f"error: {e}")
        return 1
    except SystemExit:
        log("stopping the fleet")
        return 0
    finally:
        fleet.stop()


def signal_fleet(sig):
    """`run.sh stop` (SIGTERM, then wait for the cleanup) and `run.sh revive` (SIGUSR1)."""
    pidfile = os.path.join(STATE, "fleet.pid")
    try:
        with open(pidfile) as f:
            pid = int(f.read().strip())
    except (OSError, ValueError):
        print("no fleet is running", file=sys.stderr)
        return 0
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().decode(errors="replace")
    except OSError:
        cmd = ""
    if "fleet" not in cmd:
        print(f"pid {pid} in {pidfile} is not a fleet any more; removing the file", file=sys.stderr)
        os.unlink(pidfile)
        return 0
    os.kill(pid, sig)
    if sig != signal.SIGTERM:
        return 0
    for _ in range(300):
        if not os.path.exists(f"/proc/{pid}"):
            print("stopped", file=sys.stderr)
            return 0
        time.sleep(0.05)
    print(f"pid {pid} is still stopping its fleet", file=sys.stderr)
    return 1


if __name__ == "__main__":
    cmd = sys.argv[1] if len(sys.argv) > 1 else "up"
    if cmd == "up":
        sys.exit(up(sys.argv[2] if len(sys.argv) > 2 else "debug"))
    elif cmd == "stop":
        sys.exit(signal_fleet(signal.SIGTERM))
    elif cmd == "revive":
        sys.exit(signal_fleet(signal.SIGUSR1))
    else:
        print("usage: fleet.py up [debug|release] | stop | revive", file=sys.stderr)
        sys.exit(2)
