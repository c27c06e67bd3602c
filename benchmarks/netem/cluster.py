#!/usr/bin/env python3
"""An emulated bandwidth-limited cluster on one machine: one network namespace per
machine, holding one MPI rank (the default) or k of them (``--ranks-per-machine k``).

Layout (all names start with ``scnet-<tag>-``; nothing is added to the root namespace)::

    scnet-<tag>-r0  eth0 10.77.0.1 --veth-- p0 ┐
    scnet-<tag>-r1  eth0 10.77.0.2 --veth-- p1 ├─ br0 10.77.0.254   (in scnet-<tag>-br)
    ...                                        ┘

Namespace ``r<i>`` is machine i (with k = 1, rank i).  Every machine's link is limited in both directions with a token bucket (``tc tbf``): on the
rank's ``eth0`` (what the rank sends) and on the bridge port ``p<i>`` (what it receives),
so "rate" means a full-duplex NIC of that speed.  A latency is added with ``netem`` when
the kernel has it (``--delay-ms``); where it does not, asking for one is an error, never
silently ignored.

MPICH's Hydra launcher starts one proxy per host of a hosts file through a program that
behaves like ``ssh`` (``-launcher ssh -launcher-exec nsexec.sh``); here every host is a
namespace and ``nsexec.sh`` runs the proxy with ``ip netns exec <host>``.  ``mpiexec`` itself
runs in the bridge namespace and listens on ``br0`` (``-iface br0``).  MPICH is told to use
libfabric's TCP provider on ``eth0`` and to treat no two ranks as local (``MPI_ENV``):
without that it would move the bytes through shared memory and the links would carry
nothing (measured: 75 Gbit/s "through" a 1 Gbit/s link).

Machines of k ranks (``ranks_per_machine=k``): the hosts file gives every namespace k
slots, so Hydra starts one proxy per namespace with k ranks, in blocks (machine m holds
world ranks m*k .. m*k+k-1, the layout of ``MVSM(ranks_per_node=k)``).  MPICH takes its
node map from Hydra's process mapping (one node per proxy), so with ``MPIR_CVAR_NOLOCAL``
left off (``MPI_ENV_MACHINES``) the ranks of one namespace pair through POSIX shared
memory and ``MPI.COMM_TYPE_SHARED`` splits the world into the machines, while ranks of
different namespaces still only reach each other over libfabric TCP on ``eth0``: the
shaped link carries exactly the traffic between machines.  ``check_machines`` proves it
(``--check --ranks-per-machine k``).  k = 1 is the one-rank-per-namespace cluster above,
unchanged.

Command line (as root)::

    cluster.py --np 4 --gbit 1 -- .venv/bin/python -m mpi4py script.py ARGS
    cluster.py --np 8 --ranks-per-machine 2 -- ...   # 4 machines of 2 ranks
    cluster.py --check [--gbit 1]      # proof: a 2-rank transfer vs the link rate + tc counters
    cluster.py --check --ranks-per-machine 2   # proof: machine grouping, shm inside, link between
    cluster.py --cleanup               # remove every scnet-* namespace left by a killed run
    cluster.py --list

Teardown is always attempted: on normal exit, on an exception, on SIGINT/SIGTERM/SIGHUP
(turned into exceptions so ``finally`` runs) and at interpreter exit.  Every wait is
bounded by a timeout and every loop by a count.
"""
from __future__ import annotations

import argparse
import atexit
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
NSEXEC = HERE / "nsexec.sh"
XFER = HERE / "xfer.py"

PREFIX = "scnet"
SUBNET = "10.77.0"          # the project's own test hosts, on a bridge inside our namespace
BRIDGE_IP = f"{SUBNET}.254"
MAX_RANKS = 64
TAG_RE = re.compile(r"^[A-Za-z0-9]{1,12}$")

# What makes MPICH 5 (ch4, device "ucx,ofi") send rank-to-rank bytes over eth0 via TCP.
MPI_ENV = {
    # The default netmod is UCX, whose shm/CMA transports bypass the network entirely.
    "MPIR_CVAR_CH4_NETMOD": "ofi",
    # libfabric's TCP provider (with ofi_rxm on top), on the namespace's only NIC.
    "FI_PROVIDER": "tcp",
    "FI_TCP_IFACE": "eth0",
    # `ip netns exec` keeps the UTS namespace, so every rank reports the same hostname and
    # MPICH would pair them through its POSIX shared-memory module: forbid that.
    "MPIR_CVAR_NOLOCAL": "1",
}
# Machines of several ranks: the same, except that ranks of one namespace are local to
# each other (MPICH's node map follows Hydra's proxies: one per namespace).
MPI_ENV_MACHINES = dict(MPI_ENV, MPIR_CVAR_NOLOCAL="0")
MACHINES = HERE / "machines.py"


class NetemError(RuntimeError):
    """The emulated cluster could not be built, or a job in it failed."""


# --------------------------------------------------------------------------- helpers

def _run(argv, *, timeout=20, check=True):
    try:
        p = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise NetemError(f"timed out after {timeout}s: {' '.join(map(str, argv))}") from e
    if check and p.returncode != 0:
        raise NetemError(f"`{' '.join(map(str, argv))}` failed ({p.returncode}): "
                         f"{p.stderr.strip() or p.stdout.strip()}")
    return p


def _ip(*args, ns=None, **kw):
    return _run(["ip", *(["-n", ns] if ns else []), *map(str, args)], **kw)


def _tc(ns, *args, **kw):
    return _run(["ip", "netns", "exec", ns, "tc", *map(str, args)], **kw)


def mpiexec_path():
    for cand in (Path(sys.executable).parent / "mpiexec", ROOT / ".venv" / "bin" / "mpiexec"):
        if cand.exists():
            return str(cand)
    found = shutil.which("mpiexec")
    if not found:
        raise NetemError("mpiexec not found: run `make setup` (it installs MPICH into .venv)")
    return found


def venv_python():
    cand = ROOT / ".venv" / "bin" / "python"
    return str(cand) if cand.exists() else sys.executable


def namespace_support():
    """None when namespaces + veth + bridge + tbf can be made here, else the reason."""
    if os.name != "posix" or not sys.platform.startswith("linux"):
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "needs root (creating network namespaces and tc qdiscs needs CAP_NET_ADMIN)"
    for tool in ("ip", "tc"):
        if not shutil.which(tool):
            return f"`{tool}` not found (apt-get install -y iproute2)"
    probe = f"{PREFIX}-probe{os.getpid()}"
    ns0, ns1 = f"{probe}-r0", f"{probe}-br"
    try:
        _ip("netns", "add", ns0)
        _ip("netns", "add", ns1)
        _ip("link", "add", "eth0", "netns", ns0, "type", "veth", "peer", "name", "p0", "netns", ns1)
        _ip("link", "add", "br0", "type", "bridge", ns=ns1)
        _tc(ns0, "qdisc", "replace", "dev", "eth0", "root", "tbf", "rate", "1gbit",
            "burst", "500000", "latency", "100ms")
    except NetemError as e:
        return f"cannot build a namespace/veth/bridge/tbf link here: {e}"
    finally:
        for ns in (ns0, ns1):
            _ip("netns", "del", ns, check=False)
    return None


def netem_available():
    """Whether the kernel has the netem qdisc (needed only for --delay-ms > 0)."""
    ns = f"{PREFIX}-probe{os.getpid()}-nm"
    try:
        _ip("netns", "add", ns)
        _ip("link", "set", "lo", "up", ns=ns)
        return _tc(ns, "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms",
                   check=False).returncode == 0
    finally:
        _ip("netns", "del", ns, check=False)


def qdisc_bytes(dev, ns=None):
    """Bytes the root qdisc of ``dev`` has let through (the shaper's own counter): in
    namespace ``ns``, or in the caller's own when None (a rank reading its machine's
    link from inside)."""
    argv = ["tc", "-s", "-j", "qdisc", "show", "dev", dev]
    p = _run(argv if ns is None else ["ip", "netns", "exec", ns, *argv])
    return sum(int(q.get("bytes", 0)) for q in json.loads(p.stdout or "[]") if q.get("root"))


def list_namespaces(prefix=PREFIX + "-"):
    p = _run(["ip", "netns", "list"], check=False)
    names = [line.split()[0] for line in p.stdout.splitlines() if line.strip()]
    return sorted(n for n in names if n.startswith(prefix))


def _kill_namespace_pids(ns):
    """SIGKILL the processes still inside one of *our* namespaces (ranks we launched)."""
    p = _run(["ip", "netns", "pids", ns], check=False)
    pids = [int(x) for x in p.stdout.split() if x.isdigit()]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return pids


def cleanup(prefix=PREFIX + "-"):
    """Remove every namespace whose name starts with ``prefix`` (and its veths/bridge)."""
    if not prefix.startswith(PREFIX + "-"):
        raise NetemError(f"refusing to clean up names outside {PREFIX}-*: {prefix!r}")
    removed = []
    for ns in list_namespaces(prefix):
        _kill_namespace_pids(ns)
        if _ip("netns", "del", ns, check=False).returncode == 0:
            removed.append(ns)
    return removed


def tbf_args(gbit, burst_ms=1.0):
    """tbf parameters for a link of ``gbit`` Gbit/s.

    The bucket lets ``burst`` bytes through at once (the test's lower bound allows for
    it), so it is kept small: 1 ms of traffic, at least 128 KiB (two 64 KiB GSO
    segments).  tbf's hrtimer watchdog keeps the rate with it (measured 0.92-0.95 of the
    rate for large transfers at 1 Gbit/s, as with a 4 ms bucket; a 1.46 MB transfer no
    longer beats its floor).
    """
    rate_bps = int(round(gbit * 1e9))
    burst = max(int(rate_bps / 8 * burst_ms / 1000), 128 * 1024)
    return ["rate", f"{rate_bps}bit", "burst", str(burst), "latency", "100ms"], burst


# --------------------------------------------------------------------------- cluster

class Cluster:
    """``n`` namespaces (machines), each with one ``gbit`` Gbit/s full-duplex link to a
    shared bridge and room for ``ranks_per_machine`` ranks (``size = n * k`` in all)."""

    def __init__(self, n, gbit, *, delay_ms=0.0, mtu=1500, tag=None, burst_ms=1.0,
                 ranks_per_machine=1):
        if not 1 <= int(n) <= MAX_RANKS:
            raise ValueError(f"n must be in 1..{MAX_RANKS}, got {n}")
        k = ranks_per_machine
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_RANKS:
            raise ValueError(f"ranks_per_machine must be an int in 1..{MAX_RANKS}, got {k!r}")
        if int(n) * k > MAX_RANKS:
            raise ValueError(f"{n} machines x {k} ranks exceeds {MAX_RANKS} ranks")
        if gbit is not None and not 0.001 <= float(gbit) <= 400:
            raise ValueError(f"gbit must be in [0.001, 400] or None (unlimited), got {gbit}")
        self.n = int(n)                    # machines = namespaces
        self.k = k                         # ranks per machine
        self.size = self.n * k             # ranks
        self.gbit = None if gbit is None else float(gbit)
        self.delay_ms = float(delay_ms)
        self.mtu = int(mtu)
        self.burst_ms = float(burst_ms)
        self.tag = tag or secrets.token_hex(3)
        if not TAG_RE.match(self.tag):
            raise ValueError(f"tag must be 1-12 letters/digits, got {self.tag!r}")
        self.prefix = f"{PREFIX}-{self.tag}"
        self.br = f"{self.prefix}-br"
        # one namespace per machine; named r<i> because with k = 1 machine i is rank i
        self.ranks = [f"{self.prefix}-r{i}" for i in range(self.n)]
        self.burst_bytes = 0
        self._tmp = None
        self._is_up = False
        self._atexit = False

    # -- lifecycle
    def up(self):
        if self._is_up:
            return self
        if self.n > 253:
            raise ValueError("one /24: at most 253 ranks")
        if self.delay_ms > 0 and not netem_available():
            raise NetemError(
                f"--delay-ms {self.delay_ms} needs the netem qdisc, which this kernel lacks "
                "(CONFIG_NET_SCH_NETEM); run without a delay or on a kernel that has it")
        if not self._atexit:
            atexit.register(self.down)
            self._atexit = True
        self._is_up = True      # from here on, down() has something to remove
        try:
            self._tmp = tempfile.mkdtemp(prefix=f"{self.prefix}-")
            _ip("netns", "add", self.br)
            _ip("link", "set", "lo", "up", ns=self.br)
            _ip("link", "add", "br0", "type", "bridge", ns=self.br)
            _ip("addr", "add", f"{BRIDGE_IP}/24", "dev", "br0", ns=self.br)
            _ip("link", "set", "br0", "up", ns=self.br)
            for i, ns in enumerate(self.ranks):
                _ip("netns", "add", ns)
                _ip("link", "set", "lo", "up", ns=ns)
                # Create the pair directly inside the two namespaces: no name ever lives in
                # the root namespace, so runs cannot collide with each other or the host.
                _ip("link", "add", "eth0", "netns", ns, "mtu", self.mtu, "type", "veth",
                    "peer", "name", f"p{i}", "netns", self.br, "mtu", self.mtu)
                _ip("link", "set", f"p{i}", "master", "br0", ns=self.br)
                _ip("link", "set", f"p{i}", "up", ns=self.br)
                _ip("addr", "add", f"{SUBNET}.{i + 1}/24", "dev", "eth0", ns=ns)
                _ip("link", "set", "eth0", "up", ns=ns)
            self.set_rate(self.gbit, self.delay_ms)
            with open(self.hostfile, "w") as f:
                f.writelines(f"{ns}:{self.k}\n" for ns in self.ranks)
        except BaseException:
            self.down()
            raise
        return self

    def _links(self):
        for i, ns in enumerate(self.ranks):
            yield ns, "eth0"           # rank -> bridge (what rank i sends)
            yield self.br, f"p{i}"     # bridge -> rank (what rank i receives)

    def set_rate(self, gbit, delay_ms=None):
        """(Re)shape every link; ``gbit=None`` removes the limit."""
        self.gbit = None if gbit is None else float(gbit)
        if delay_ms is not None:
            self.delay_ms = float(delay_ms)
        for ns, dev in self._links():
            _tc(ns, "qdisc", "del", "dev", dev, "root", check=False)
            if self.delay_ms > 0:
                _tc(ns, "qdisc", "add", "dev", dev, "root", "handle", "1:", "netem",
                    "delay", f"{self.delay_ms}ms", "limit", "100000")
                parent = ["parent", "1:1", "handle", "10:"]
            else:
                parent = ["root", "handle", "10:"]
            if self.gbit is not None:
                args, self.burst_bytes = tbf_args(self.gbit, self.burst_ms)
                _tc(ns, "qdisc", "add", "dev", dev, *parent, "tbf", *args)
            elif self.delay_ms <= 0:
                _tc(ns, "qdisc", "add", "dev", dev, *parent, "pfifo", "limit", "10000")
        return self

    def down(self):
        """Kill what runs in our namespaces, delete them. Idempotent, never raises."""
        if not self._is_up:
            return
        try:
            for ns in self.ranks + [self.br]:
                _kill_namespace_pids(ns)
            for ns in self.ranks + [self.br]:
                _ip("netns", "del", ns, check=False)
        except Exception as e:  # pragma: no cover - best effort, reported
            print(f"cluster.py: teardown of {self.prefix}: {e}", file=sys.stderr)
        finally:
            if self._tmp:
                shutil.rmtree(self._tmp, ignore_errors=True)
                self._tmp = None
            self._is_up = False

    def __enter__(self):
        return self.up()

    def __exit__(self, *exc):
        self.down()
        return False

    # -- observation
    @property
    def hostfile(self):
        return os.path.join(self._tmp, "hosts")

    def link_bytes(self):
        """Bytes each machine's link has carried so far: {machine: {"tx": sent, "rx":
        received}} (with k = 1, machine i is rank i).

        Read from the root qdisc's counters, so it counts every byte that crossed the
        shaper (payload + TCP/IP headers + MPI control)."""
        out = {}
        for i, ns in enumerate(self.ranks):
            out[i] = {"tx": qdisc_bytes("eth0", ns), "rx": qdisc_bytes(f"p{i}", self.br)}
        return out


    # -- running jobs
    def machine_of(self, rank):
        """The machine (namespace index) that holds world rank ``rank``."""
        return int(rank) // self.k

    def mpiexec_argv(self, argv, n=None):
        """mpiexec for ``n`` ranks (default all ``size``), k per namespace in blocks."""
        n = self.size if n is None else int(n)
        if not 1 <= n <= self.size:
            raise ValueError(f"n must be in 1..{self.size} (ranks), got {n}")
        return ["ip", "netns", "exec", self.br, mpiexec_path(), "-iface", "br0",
                "-launcher", "ssh", "-launcher-exec", str(NSEXEC), "-f", self.hostfile,
                "-np", str(n), *map(str, argv)]

    def env(self, extra=None):
        env = dict(os.environ)
        env.update(MPI_ENV if self.k == 1 else MPI_ENV_MACHINES)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        env["PYTHONUNBUFFERED"] = "1"
        env.update(extra or {})
        return env

    def run(self, argv, *, n=None, timeout=300, env=None, stream=False):
        """Run ``argv`` on ``n`` ranks (default all; k per namespace). Returns (returncode,
        output).

        The job runs in its own process group; on timeout or interrupt the group and every
        process left inside our namespaces are killed before this returns or re-raises."""
        if not self._is_up:
            raise NetemError("cluster is not up")
        cmd = self.mpiexec_argv(argv, n)
        proc = subprocess.Popen(cmd, stdout=None if stream else subprocess.PIPE,
                                stderr=None if stream else subprocess.STDOUT, text=True,
                                env=self.env(env), cwd=str(ROOT), start_new_session=True)
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._kill_job(proc)
            out, _ = proc.communicate()
            raise NetemError(f"job timed out after {timeout}s: {' '.join(map(str, argv))}\n"
                             f"{out or ''}")
        except BaseException:
            self._kill_job(proc)
            raise
        finally:
            self._kill_job(proc)
        return proc.returncode, out or ""

    def _kill_job(self, proc):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        for ns in self.ranks + [self.br]:
            _kill_namespace_pids(ns)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass


# --------------------------------------------------------------------------- proof

def check_transfer(cluster, nbytes, reps=3, timeout=120):
    """Rank 0 sends ``nbytes`` to rank 1 ``reps`` times; returns times and tc byte counts.

    This is the proof that MPI traffic crosses the limited link: the time (send until
    the receiver's acknowledgement) is bounded below by (bytes - bucket) / rate, and
    rank 0's qdisc counter grows by >= the payload."""
    with tempfile.TemporaryDirectory(prefix=f"{cluster.prefix}-x-") as tmp:
        out_json = os.path.join(tmp, "xfer.json")
        before = cluster.link_bytes()
        rc, out = cluster.run([venv_python(), "-m", "mpi4py", str(XFER), str(nbytes),
                               str(reps), out_json], n=2, timeout=timeout)
        after = cluster.link_bytes()
        if rc != 0 or not os.path.exists(out_json):
            raise NetemError(f"transfer job failed (rc={rc}):\n{out}")
        with open(out_json) as f:
            res = json.load(f)
    res["link_bytes_delta"] = {r: {k: after[r][k] - before[r][k] for k in ("tx", "rx")}
                               for r in after}
    res["gbit_per_s"] = cluster.gbit
    res["burst_bytes"] = cluster.burst_bytes
    if cluster.gbit:
        res["floor_seconds"] = nbytes * 8 / (cluster.gbit * 1e9)
        res["lower_bound_seconds"] = max(nbytes - cluster.burst_bytes, 0) * 8 / (cluster.gbit * 1e9)
    return res


def check_machines(cluster, nbytes, timeout=120):
    """Machines of k ranks: every rank's ``COMM_TYPE_SHARED`` members, its namespace,
    and two transfers from rank 0 (to rank 1 on its machine, to rank k on the next one)
    with the namespace's NIC counters around each and the shaped links' tc counters
    around the whole job.  ``machine_failures`` judges the result."""
    if cluster.k < 2 or cluster.n < 2:
        raise ValueError("the machine proof needs >= 2 machines of >= 2 ranks")
    with tempfile.TemporaryDirectory(prefix=f"{cluster.prefix}-m-") as tmp:
        out_json = os.path.join(tmp, "machines.json")
        before = cluster.link_bytes()
        rc, out = cluster.run([venv_python(), "-m", "mpi4py", str(MACHINES), str(nbytes),
                               out_json], timeout=timeout)
        after = cluster.link_bytes()
        if rc != 0 or not os.path.exists(out_json):
            raise NetemError(f"machine probe failed (rc={rc}):\n{out}")
        with open(out_json) as f:
            res = json.load(f)
    res["k"] = cluster.k
    res["link_bytes_delta"] = {m: {w: after[m][w] - before[m][w] for w in ("tx", "rx")}
                               for m in after}
    res["gbit_per_s"] = cluster.gbit
    res["burst_bytes"] = cluster.burst_bytes
    if cluster.gbit:
        res["lower_bound_seconds"] = (max(nbytes - cluster.burst_bytes, 0) * 8
                                      / (cluster.gbit * 1e9))
    return res


def machine_failures(res):
    """What is wrong with a ``check_machines`` result ([] when the cluster is right):
    the shared communicator of every rank is its machine (ranks m*k .. m*k+k-1), ranks
    share a namespace exactly when they share a machine, the in-machine transfer moved
    nothing over ``eth0`` or ``lo`` (shared memory), and the cross-machine transfer went
    over the shaped link: machine 0's tc counter grew by the payload (and by less than
    twice it: the in-machine copy did not cross), no faster than the link allows."""
    k, size, nbytes = res["k"], res["size"], res["nbytes"]
    bad = []
    for r, members in enumerate(res["groups"]):
        want = list(range(r // k * k, min(r // k * k + k, size)))
        if sorted(members) != want:
            bad.append(f"rank {r}: COMM_TYPE_SHARED holds {sorted(members)}, machine is {want}")
    for r, ino in enumerate(res["netns"]):
        for q, other in enumerate(res["netns"][:r]):
            if (ino == other) != (r // k == q // k):
                bad.append(f"ranks {q} and {r}: namespaces {other} / {ino} do not follow "
                           f"the machines")
    intra, cross = res["intra"], res["cross"]
    leaked = intra["eth0_tx"] + intra["lo_tx"]
    if leaked > nbytes // 10:
        bad.append(f"in-machine transfer of {nbytes} B moved {intra['eth0_tx']} B over eth0 "
                   f"and {intra['lo_tx']} B over lo: not shared memory")
    if cross["eth0_tx"] < nbytes:
        bad.append(f"cross-machine transfer of {nbytes} B moved only {cross['eth0_tx']} B "
                   f"over eth0")
    tc0 = res["link_bytes_delta"][0]["tx"]
    if not nbytes <= tc0 < 2 * nbytes:
        bad.append(f"machine 0's shaped link carried {tc0} B for one {nbytes} B transfer "
                   f"across and one inside (expected [{nbytes}, {2 * nbytes}))")
    lower = res.get("lower_bound_seconds")
    if lower and cross["seconds"] < lower:
        bad.append(f"cross-machine transfer took {cross['seconds']:.3f} s < {lower:.3f} s: "
                   f"not limited")
    return bad


# --------------------------------------------------------------------------- CLI

def _raise_on_signals():
    def handler(signum, _frame):
        raise SystemExit(128 + signum)   # unwinds through `finally` / __exit__ -> teardown
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, handler)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--np", type=int, default=2,
                    help="ranks (default 2); namespaces = np / --ranks-per-machine")
    ap.add_argument("--ranks-per-machine", type=int, default=1, metavar="K",
                    help="ranks per namespace (machine), sharing memory inside it; only "
                         "the links between machines are shaped (default 1)")
    ap.add_argument("--gbit", type=float, default=1.0,
                    help="per-rank link rate in Gbit/s, each direction (default 1); 0 = unlimited")
    ap.add_argument("--delay-ms", type=float, default=0.0,
                    help="one-way added latency per link direction (needs netem)")
    ap.add_argument("--mtu", type=int, default=1500)
    ap.add_argument("--tag", default=None, help="name tag (default random): scnet-<tag>-*")
    ap.add_argument("--timeout", type=float, default=600, help="job wall-clock limit, s")
    ap.add_argument("--cleanup", action="store_true", help="remove leftover scnet-* namespaces")
    ap.add_argument("--prefix", default=PREFIX + "-", help="--cleanup/--list: name prefix")
    ap.add_argument("--list", action="store_true", help="list scnet-* namespaces")
    ap.add_argument("--check", action="store_true",
                    help="prove it: 2-rank transfer over the limited link vs its rate")
    ap.add_argument("--check-bytes", type=int, default=100_000_000)
    ap.add_argument("cmd", nargs=argparse.REMAINDER, help="-- command to run on every rank")
    a = ap.parse_args(argv)

    if a.list:
        print("\n".join(list_namespaces(a.prefix)))
        return 0
    if a.cleanup:
        removed = cleanup(a.prefix)
        print(f"removed {len(removed)} namespace(s)" + (": " + " ".join(removed) if removed else ""))
        return 0
    why = namespace_support()
    if why:
        print(f"cluster.py: cannot run here: {why}", file=sys.stderr)
        return 77
    _raise_on_signals()
    gbit = None if a.gbit == 0 else a.gbit
    cmd = a.cmd[1:] if a.cmd[:1] == ["--"] else a.cmd
    k = a.ranks_per_machine
    if k < 1 or a.np < 1 or a.np % k:
        ap.error(f"--np {a.np} must be a positive multiple of --ranks-per-machine {k}")
    if a.check and k > 1:
        with Cluster(2, gbit, mtu=a.mtu, tag=a.tag, ranks_per_machine=k) as c:
            res = check_machines(c, a.check_bytes)
        print(json.dumps(res, indent=1))
        bad = machine_failures(res)
        print(f"2 machines x {k} ranks: shared comms {res['groups']}; in-machine "
              f"{a.check_bytes} B in {res['intra']['seconds']:.3f} s with "
              f"{res['intra']['eth0_tx']} B on eth0, {res['intra']['lo_tx']} B on lo; "
              f"cross-machine in {res['cross']['seconds']:.3f} s, machine 0's link carried "
              f"{res['link_bytes_delta'][0]['tx']} B -> "
              + ("machines are right" if not bad else "WRONG: " + "; ".join(bad)))
        return 0 if not bad else 1
    if a.check:
        with Cluster(2, gbit, delay_ms=a.delay_ms, mtu=a.mtu, tag=a.tag) as c:
            res = check_transfer(c, a.check_bytes)
        print(json.dumps(res, indent=1))
        if gbit:
            ok = (min(res["seconds"]) >= res["lower_bound_seconds"]
                  and res["link_bytes_delta"][0]["tx"] >= a.check_bytes)
            print(f"{a.check_bytes} B at {gbit} Gbit/s: floor {res['floor_seconds']:.3f} s, "
                  f"measured {min(res['seconds']):.3f} s, rank 0 link carried "
                  f"{res['link_bytes_delta'][0]['tx']} B -> "
                  + ("traffic crosses the limited link" if ok else "NOT LIMITED: check MPI_ENV"))
            return 0 if ok else 1
        return 0
    if not cmd:
        ap.error("give a command after --, or --check / --cleanup / --list")
    with Cluster(a.np // k, gbit, delay_ms=a.delay_ms, mtu=a.mtu, tag=a.tag,
                 ranks_per_machine=k) as c:
        print(f"cluster.py: {c.prefix}: {a.np} ranks"
              + (f" on {c.n} machines of {k}" if k > 1 else "") + ", "
              f"{'unlimited' if gbit is None else f'{gbit:g} Gbit/s'} per link", file=sys.stderr)
        before = c.link_bytes()
        rc, _ = c.run(cmd, timeout=a.timeout, stream=True)
        after = c.link_bytes()
        moved = {r: (after[r]["tx"] - before[r]["tx"], after[r]["rx"] - before[r]["rx"])
                 for r in after}
        print(f"cluster.py: bytes over each {'rank' if k == 1 else 'machine'}'s link "
              "(sent, received): "
              + ", ".join(f"{'r' if k == 1 else 'm'}{r}={s}/{v}" for r, (s, v) in moved.items()),
              file=sys.stderr)
    return rc


if __name__ == "__main__":
    sys.exit(main())
