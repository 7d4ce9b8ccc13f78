"""`make soak`: 100,000 connections and 1 GB through the LIVE path, with memory, fds and every byte checked.

    .venv/bin/python tests/soak/run.py [--quick] [--conns N] [--bytes B] [--seed S] [--linktype 276|1]
                                       [--dissectors N]

The plugin runs as a subprocess (`kubectl-mirror pod/soak --to 127.0.0.1:PORT --kubeconfig K -o json`) against
the in-repo test API server. The pod's "tcpdump", reached through exec like the real one, is tests/soak/
generator.py: a generated capture of the plan's connections. The local target is tests/soak/recorder.py, which
hashes each connection's bytes; the checker regenerates the expected hashes from the same seeded plan.

The generator writes a few warm-up connections, then waits: once the plugin has delivered them all, the plugin's
fd count is sampled while it is idle (the baseline), and compared with the idle count after the last connection.

Targets (printed as met / NOT met; the exit status is 1 when any is missed): the volume (full run only), peak RSS
of the plugin < 200 MB and of each tshark < 300 MB (VmHWM, MB = 10**6 bytes), no fd growth, every connection
complete and every complete connection byte-exact, a clean exit that stopped the remote capture. Needs root (a
network namespace stands for the pod). Wall-clock figures are from a shared machine: noisy.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # tests.*, when run as a script

from tests.apiserver import FakeCluster, PodNetns  # noqa: E402
from tests.proctable import is_dissecting_tshark, memory, proc_table, tree  # noqa: E402
from tests.soak.plan import SoakConfig, expected  # noqa: E402

HERE = Path(__file__).resolve().parent
CLI = REPO / "kubectl-mirror"
PORT = 8080
SAMPLE_EVERY = 0.5
MB = 1_000_000
TARGET_PLUGIN_MB, TARGET_TSHARK_MB = 200, 300
FULL_CONNS, FULL_BYTES = 100_000, 1_000_000_000


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def mark(ok: bool) -> str:
    return "met" if ok else "NOT met"


# ---- sampling the plugin's process tree ------------------------------------------------------------------


def cpu_seconds(pid: int | str) -> float | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            rest = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(rest[11]) + int(rest[12])) / os.sysconf("SC_CLK_TCK")


def fd_kinds(pid: int) -> dict[str, str]:
    """fd number -> what it is (pipe:[inode], socket:[inode], a path): to name what grew."""
    out: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                out[fd] = os.readlink(f"/proc/{pid}/fd/{fd}")
    return out


def fd_count(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def tshark_fds(pid: int) -> int:
    """How many of the plugin's fds are the other ends of a running dissector's stdin, stdout and stderr.

    Each tshark costs the plugin three fds while it runs, and with several dissectors each may hold a standby
    started ahead of its hand-over, so the count at the end can be higher than the baseline's without a leak.
    What must not grow is the rest.
    """
    table = proc_table()
    ends: set[str] = set()
    for child in tree(pid, table)[1:]:
        if not is_dissecting_tshark(child):
            continue
        for fd in ("0", "1", "2"):
            with contextlib.suppress(OSError):
                ends.add(os.readlink(f"/proc/{child}/fd/{fd}"))
    return sum(1 for what in fd_kinds(pid).values() if what in ends)


class Sampler(threading.Thread):
    """Every SAMPLE_EVERY: the plugin's RSS peak and fd count, and every dissecting tshark below it."""

    def __init__(self, root: int) -> None:
        super().__init__(daemon=True, name="sampler")
        self.root = root
        self.plugin_hwm = 0
        self.plugin_rss = 0
        self.fds: list[int] = []
        self.tsharks: dict[int, int] = {}  # dissecting tshark pid -> peak VmHWM
        self.total_peak = 0  # the largest sum of plugin + dissecting tsharks' RSS seen in one sample
        self.cpu: dict[int, float] = {}  # pid -> CPU seconds last seen (plugin, its tsharks)
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            self.sample()
            self._halt.wait(SAMPLE_EVERY)

    def sample(self) -> None:
        table = proc_table()
        tick = os.sysconf("SC_CLK_TCK")
        total = 0
        for pid in tree(self.root, table):
            st = memory(pid)
            if st is None:
                continue
            name, hwm, rss = st
            if pid in table and (pid == self.root or pid in self.tsharks or name.startswith("tshark")):
                self.cpu[pid] = table[pid].cpu_ticks / tick
            if pid == self.root:
                total += rss
                self.plugin_hwm, self.plugin_rss = max(self.plugin_hwm, hwm), rss
                n = fd_count(pid)
                if n is not None:
                    self.fds.append(n)
            elif name.startswith("tshark"):
                if pid not in self.tsharks and not is_dissecting_tshark(pid):
                    continue
                self.tsharks[pid] = max(self.tsharks.get(pid, 0), hwm)
                total += rss
        self.total_peak = max(self.total_peak, total)

    def stop(self) -> None:
        self._halt.set()
        self.join(5)


# ---- the recorder and the plugin as subprocesses -------------------------------------------------------------


@dataclass
class Delivered:
    """What the recorder reported, by connection id."""

    ended: dict[int, tuple[int, str, str]] = field(default_factory=dict)  # id -> (length, sha256, end)
    repeated: list[int] = field(default_factory=list)  # ids seen on more than one connection
    unnamed: list[int] = field(default_factory=list)  # lengths of connections whose first bytes carried no id
    count: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def feed(self, stream: IO[str]) -> None:
        for line in stream:
            parts = line.split()
            if len(parts) != 4:
                continue
            cid, length, digest, end = int(parts[0]), int(parts[1]), parts[2], parts[3]
            with self.lock:
                self.count += 1
                if cid < 0:
                    self.unnamed.append(length)
                elif cid in self.ended:
                    self.repeated.append(cid)
                else:
                    self.ended[cid] = (length, digest, end)

    def done(self) -> int:
        with self.lock:
            return self.count


def start_recorder() -> tuple[subprocess.Popen[str], int]:
    rec = subprocess.Popen([sys.executable, str(HERE / "recorder.py"), "--port", "0"], stdout=subprocess.PIPE,
                           text=True)
    assert rec.stdout is not None
    line = rec.stdout.readline()
    if not line.startswith("listening "):
        rec.kill()
        raise SystemExit(f"recorder did not start: {line!r}")
    return rec, int(line.split()[1])


def stop_process(proc: subprocess.Popen[Any], sig: int, timeout: float) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def fake_tcpdump(bindir: Path, config: Path) -> None:
    """`tcpdump` on the pod's PATH: bash's `exec -a` keeps the PID the plugin was told and makes the process's
    cmdline start with "tcpdump ", which is what the plugin checks before it signals a PID."""
    script = bindir / "tcpdump"
    # With argv[0] "tcpdump", Python looks for its own prefix beside the tcpdump on PATH (/usr/bin when Debian's
    # is installed) and finds another Python's standard library: PYTHONHOME names the right one, in the script
    # because the pod's exec does not pass the caller's environment on.
    script.write_text(f'#!/bin/bash\nexport PYTHONHOME={sys.base_prefix}\n'
                      f'exec -a tcpdump {sys.executable} {HERE / "generator.py"} --config {config} "$@"\n')
    script.chmod(0o755)


def wait_for(pred: Any, timeout: float, what: str, plugin: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if plugin.poll() is not None:
            raise RuntimeError(f"the plugin exited ({plugin.returncode}) while waiting for {what}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.1)


# ---- the run -----------------------------------------------------------------------------------------------


@dataclass
class Result:
    cfg: SoakConfig
    wall: float = 0.0  # from go to the last connection delivered, plus the warm-up
    pause: float = 0.0
    summary: dict[str, Any] = field(default_factory=dict)
    returncode: int | None = None
    stderr: str = ""
    fd_base: int = 0
    fd_base_tshark: int = 0  # of those, held for running tsharks (see tshark_fds)
    fd_end_tshark: int = 0
    fd_peak: int = 0
    fd_end: int = 0
    plugin_hwm: int = 0
    tshark_hwms: list[int] = field(default_factory=list)
    total_peak: int = 0
    dissectors: int | None = None  # --dissectors given to the plugin (None: its default)
    remote_left: list[list[str]] = field(default_factory=list)
    generator: str = ""
    delivered: Delivered = field(default_factory=Delivered)
    error: str = ""
    workaround: bool = False
    fd_new: list[str] = field(default_factory=list)  # fds open at the end that the idle baseline did not have
    cpu_plugin: float = 0.0
    cpu_tshark: float = 0.0
    cpu_runner: float = 0.0  # this process: the test API server relaying exec output, sampling
    cpu_generator: float = 0.0


def soak(cfg: SoakConfig, work: Path, timeout: float, workaround: bool, dissectors: int | None = None) -> Result:
    res = Result(cfg, workaround=workaround, dissectors=dissectors)
    rec, rec_port = start_recorder()
    feeder = threading.Thread(target=res.delivered.feed, args=(rec.stdout,), daemon=True)
    feeder.start()
    bindir = work / "bin"
    bindir.mkdir()
    (work / "cluster").mkdir()
    cfg_path = work / "soak.json"
    try:
        with PodNetns() as pod, FakeCluster(work / "cluster") as fc:
            cfg = res.cfg = SoakConfig(**{**cfg.__dict__, "server_ip": pod.ip})
            cfg.save(cfg_path)
            fake_tcpdump(bindir, cfg_path)
            fc.tap_start_delay = 0.05
            fc.exec_path_prepend = [str(bindir)]
            app = {"name": "app", "image": "soak:1", "ports": [{"name": "http", "containerPort": PORT}]}
            fc.add_pod("default", "soak", labels={"app": "soak"}, netns=pod.name, containers=[app])
            run_plugin(cfg, fc, rec_port, res, timeout, workaround)
            res.remote_left = [argv for _, argv in fc.exec_processes()]
    finally:
        stop_process(rec, signal.SIGTERM, 30)
        feeder.join(30)
    with contextlib.suppress(OSError):
        res.generator = Path(cfg.marker).read_text().strip()
    return res


def run_plugin(cfg: SoakConfig, fc: FakeCluster, rec_port: int, res: Result, timeout: float,
               workaround: bool) -> None:
    err_path = Path(cfg.marker).with_name("plugin.stderr")
    out_path = Path(cfg.marker).with_name("plugin.json")
    entry = HERE / "gaplock_shim.py" if workaround else CLI
    argv = [sys.executable, str(entry), "pod/soak", "--to", f"127.0.0.1:{rec_port}", "--kubeconfig",
            str(fc.kubeconfig), "-o", "json", *(["--dissectors", str(res.dissectors)] if res.dissectors else [])]
    with open(err_path, "wb") as err, open(out_path, "wb") as out:
        plugin = subprocess.Popen(argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL, cwd=REPO)
    sampler = Sampler(plugin.pid)
    sampler.start()
    t_start = time.monotonic()
    try:
        # Warm-up: the engine is up (tshark running) and idle once these are delivered.
        wait_for(lambda: res.delivered.done() >= cfg.warmup, 300, "the warm-up connections", plugin)
        t_warm = time.monotonic()
        time.sleep(1.5)  # idle: nothing left in flight
        sampler.sample()
        res.fd_base = sampler.fds[-1]
        res.fd_base_tshark = tshark_fds(plugin.pid)
        base_kinds = fd_kinds(plugin.pid)
        t_go = time.monotonic()
        Path(cfg.go_file).touch()
        last_report = t_go
        last_count = -1
        stalled_since = t_go
        while res.delivered.done() < cfg.conns:
            if plugin.poll() is not None:
                raise RuntimeError(f"the plugin exited ({plugin.returncode}) before every connection was delivered")
            now = time.monotonic()
            n = res.delivered.done()
            if n != last_count:
                last_count, stalled_since = n, now
            elif now - stalled_since > 120:
                raise TimeoutError(f"no connection delivered for 120 s ({n} of {cfg.conns})")
            if now - t_start > timeout:
                raise TimeoutError(f"timed out after {timeout:.0f} s ({n} of {cfg.conns} connections)")
            if now - last_report >= 15:
                last_report = now
                tmax = max(sampler.tsharks.values(), default=0)
                log(f"  {now - t_go:6.0f} s: {n:,}/{cfg.conns:,} connections; plugin RSS {sampler.plugin_rss / MB:.0f}"
                    f" MB (peak {sampler.plugin_hwm / MB:.0f}), tshark peak {tmax / MB:.0f} MB, "
                    f"{len(sampler.tsharks)} tsharks so far, fds {sampler.fds[-1] if sampler.fds else '?'}")
            time.sleep(0.1)
        t_end = time.monotonic()
        res.pause = t_go - t_warm
        res.wall = (t_end - t_start) - (t_go - t_warm)
        time.sleep(1.5)  # idle again: the last connections' sockets closed
        sampler.sample()
        res.fd_end = sampler.fds[-1]
        res.fd_end_tshark = tshark_fds(plugin.pid)
        end_kinds = fd_kinds(plugin.pid)
        res.fd_new = sorted(f"{fd} -> {what}" for fd, what in end_kinds.items() if base_kinds.get(fd) != what)
    except (RuntimeError, TimeoutError) as exc:
        res.error = str(exc)
    finally:
        Path(cfg.go_file).touch()  # never leave the generator waiting
        stop_process(plugin, signal.SIGINT, 90)
        sampler.stop()
        res.returncode = plugin.returncode
    res.cpu_plugin = sampler.cpu.get(plugin.pid, 0.0)
    res.cpu_tshark = sum(c for pid, c in sampler.cpu.items() if pid != plugin.pid)
    res.cpu_runner = cpu_seconds("self") or 0.0
    res.fd_peak = max(sampler.fds, default=0)
    res.plugin_hwm = sampler.plugin_hwm
    res.tshark_hwms = list(sampler.tsharks.values())
    res.total_peak = sampler.total_peak
    res.stderr = err_path.read_text(errors="replace")
    text = out_path.read_text(errors="replace").strip()
    if text:
        try:
            res.summary = json.loads(text)
        except json.JSONDecodeError:
            res.error = res.error or f"the plugin's output is not JSON: {text[:300]!r}"


# ---- the report --------------------------------------------------------------------------------------------


def report(res: Result, full: bool) -> bool:
    cfg = res.cfg
    log("checking every connection against the regenerated plan ...")
    want = expected(cfg)
    total = sum(length for length, _ in want.values())
    d = res.delivered
    exact = mismatched = resets = 0
    bad: list[str] = []
    for cid, (length, digest, end) in d.ended.items():
        if end != "eof":
            resets += 1
            continue
        w = want.get(cid)
        if w is not None and w == (length, digest):
            exact += 1
        else:
            mismatched += 1
            if len(bad) < 10:
                bad.append(f"id {cid}: got {length} bytes, expected {w[0] if w else '?'}")
    missing = [cid for cid in want if cid not in d.ended]
    conns = res.summary.get("connections", {})
    complete = int(conns.get("complete", 0))
    delivered = int(res.summary.get("bytes_delivered", 0))
    tshark_peak = max(res.tshark_hwms, default=0)
    # Live, one tshark keeps a pre-spawned standby besides the active one; several start theirs near the limit.
    lanes = res.dissectors or len(os.sched_getaffinity(0))
    handovers = max(0, len(res.tshark_hwms) - (2 if lanes == 1 else lanes))

    print(f"kubectl-mirror soak (live path: test API server exec -> generated tcpdump stream -> local target); "
          f"{os.cpu_count()} CPUs, shared: wall-clock figures are noisy")
    if res.workaround:
        print("  NOTE: plugin run through tests/soak/gaplock_shim.py (capture.py deadlock worked around)")
    print(f"  plan: {cfg.conns:,} connections, {total / 1e9:.3f} GB client payload, seed {cfg.seed}, link type "
          f"{cfg.linktype}, {cfg.concurrency} interleaved; generator wrote: {res.generator or '?'} "
          "(packets, bytes, seconds, stopped early)")
    if res.error:
        print(f"  ERROR: {res.error}")
    wall = max(res.wall, 1e-9)
    print(f"  delivered: {len(d.ended):,} connections, {delivered / 1e9:.3f} GB in {res.wall:.1f} s wall (idle "
          f"pause of {res.pause:.1f} s for the fd baseline left out): {delivered / MB / wall:.1f} MB/s, "
          f"{len(d.ended) / wall:,.0f} conn/s, {int(res.summary.get('packets', 0)) / wall:,.0f} pkt/s")
    print(f"  summary: packets {int(res.summary.get('packets', 0)):,}, complete {complete:,}, incomplete "
          f"{conns.get('incomplete', '?')}, dropped {conns.get('dropped', '?')}, failed {conns.get('failed', '?')}, "
          f"skipped {conns.get('skipped', '?')}, stream gaps {res.summary.get('stream_gaps', '?')}, exit code "
          f"{res.returncode}")
    print(f"  byte-exact: {exact:,} checked equal; {mismatched} differ; {resets} reset/open at the target; "
          f"{len(missing)} never arrived; {len(d.repeated)} delivered twice; {len(d.unnamed)} without an id "
          f"({d.unnamed.count(0)} of them empty: "
          "the plugin's check that --to accepts connections)")
    for line in bad:
        print(f"    differs: {line}")
    print(f"  peak RSS: plugin {res.plugin_hwm / MB:.0f} MB, tshark {tshark_peak / MB:.0f} MB (largest of "
          f"{len(res.tshark_hwms)} dissecting tsharks; hand-overs about {handovers}); dissectors {lanes}; plugin + "
          f"tsharks together at most {res.total_peak / MB:.0f} MB (RSS, one sample)")
    print(f"  CPU seconds: plugin {res.cpu_plugin:.1f}, its tsharks {res.cpu_tshark:.1f}, runner (API server exec "
          f"relay) {res.cpu_runner:.1f}, generator {res.generator.split()[2] if res.generator else '?'} wall; "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"  fds of the plugin: {res.fd_base} idle after warm-up ({res.fd_base_tshark} of them for running tsharks), "
          f"{res.fd_peak} peak, {res.fd_end} idle at the end ({res.fd_end_tshark} for running tsharks)")
    if res.fd_new:
        print(f"    fds open at the end, not at the baseline: {', '.join(res.fd_new[:12])}")
    warnings = res.summary.get("warnings") or []
    for w in warnings[:5]:
        print(f"  plugin warning: {w}")
    left = [a for a in res.remote_left if any("tcpdump" in x for x in a)]

    checks = []
    if full:
        checks.append((f"volume >= {FULL_CONNS:,} connections and >= {FULL_BYTES / 1e9:.0f} GB",
                       len(d.ended) >= FULL_CONNS and delivered >= FULL_BYTES))
    checks += [
        (f"plugin peak RSS < {TARGET_PLUGIN_MB} MB", 0 < res.plugin_hwm < TARGET_PLUGIN_MB * MB),
        (f"tshark peak RSS < {TARGET_TSHARK_MB} MB", 0 < tshark_peak < TARGET_TSHARK_MB * MB),
        ("no fd growth (idle end <= idle baseline, leaving out fds for running tsharks)",
         0 < res.fd_end - res.fd_end_tshark <= res.fd_base - res.fd_base_tshark),
        (f"all {cfg.conns:,} connections complete, none incomplete/dropped/failed",
         complete == cfg.conns and not any(int(conns.get(k, 1)) for k in ("incomplete", "dropped", "failed"))),
        ("every complete connection byte-exact", exact == cfg.conns and mismatched == 0 and not missing
         and not d.repeated and not any(d.unnamed) and delivered == total),
        ("clean stop: exit 0, no error, remote capture gone", res.returncode == 0 and not res.error and not left),
    ]
    for name, ok in checks:
        print(f"  {name}: {mark(ok)}")
    if res.returncode != 0 or res.error:
        print("  plugin stderr (tail):\n    " + "\n    ".join(res.stderr.strip().splitlines()[-15:]))
    return all(ok for _, ok in checks)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="about 5,000 connections and 50 MB (for development)")
    ap.add_argument("--conns", type=int, help="connections (default 100,000; quick 5,000)")
    ap.add_argument("--bytes", type=float, help="client payload in bytes (default 1.05e9; quick 5e7)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--linktype", type=int, choices=(276, 1), default=276, help="276 LINUX_SLL2 (default), 1 EN10MB")
    ap.add_argument("--concurrency", type=int, default=64, help="connections interleaved in the stream")
    ap.add_argument("--timeout", type=float, default=1800, help="give up after this many seconds")
    ap.add_argument("--workaround-gap-lock", action="store_true",
                    help="run the plugin through gaplock_shim.py (a known deadlock worked around; see that file)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (plugin stderr, config)")
    ap.add_argument("--dissectors", type=int, help="the plugin's --dissectors (default: its own, the usable cores)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("the soak needs root: a network namespace stands for the pod")
    if shutil.which("tshark") is None:
        raise SystemExit("tshark is missing: run make system-deps")
    conns = args.conns or (5_000 if args.quick else FULL_CONNS)
    # 5% above the target: the volume check counts delivered bytes, and the plan's scaling rounds down.
    total = int(args.bytes or (5e7 if args.quick else 1.05e9))
    # The generator runs as the tap does, on a read-only root: the files it writes (its marker) must be on a mount
    # of their own, as a pod's emptyDir is. /dev/shm stays writable there; /tmp is the root filesystem here.
    shm = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    work = Path(tempfile.mkdtemp(prefix="kubectl-mirror-soak-", dir=shm))
    cfg = SoakConfig(conns=conns, total_bytes=total, seed=args.seed, server_ip="", marker=str(work / "generated"),
                     go_file=str(work / "go"), warmup=max(1, min(200, conns // 100)), concurrency=args.concurrency,
                     linktype=args.linktype)
    log(f"soak: {conns:,} connections, {total / 1e9:.2f} GB; work dir {work}")
    try:
        res = soak(cfg, work, args.timeout, args.workaround_gap_lock, args.dissectors)
        ok = report(res, full=not args.quick and conns >= FULL_CONNS)
    finally:
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(f"soak: {'all targets met' if ok else 'TARGET MISSED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
