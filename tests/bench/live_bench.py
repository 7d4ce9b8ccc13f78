"""`make bench`'s live-mode figures: exec channel throughput, mirrored-segment latency, the one-file binary's start-up.

run.py calls measure_exec, measure_latency and measure_binary; each returns its figures (or why it could not
measure) and never raises for a slow result. The latency client runs as its own process so its sends never wait
for the receiver's GIL:

    python tests/bench/live_bench.py client --host IP --port P --messages N --conns C --rate R --seed S
        prints one JSON line {"sent": N, "errors": [...]}

Every message is `<id> <send CLOCK_MONOTONIC ns> <padding>\\n`: CLOCK_MONOTONIC is one clock for all processes on
the host, so the receiver (in the bench process) subtracts the client's send time from its own arrival time.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import random
import selectors
import signal
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # tests.apiserver, when run as a script

from tests.bench import benchnet  # noqa: E402

CLI = REPO / "kubectl-mirror"
BUILD_SCRIPT = REPO / "krew" / "build.py"
KUBECTL = "/usr/bin/kubectl"

EXEC_MIB = 500
POD_PORT = 80
MESSAGES, CONNS, RATE = 2000, 20, 200.0  # "moderate load": 200 msg/s over 20 connections for ~10 s
MSG_MIN, MSG_MAX = 100, 500
START_TIMEOUT = 60.0  # until the plugin's "mirroring" line
WARM_TIMEOUT = 30.0  # until a first segment went all the way through
DRAIN_TIMEOUT = 15.0  # after the client is done, for the last segments to arrive
STOP_TIMEOUT = 60.0  # from SIGINT to the plugin's exit
BUILD_TIMEOUT = 900.0
MS = 1e6  # ns per ms


def now_ns() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---- 1) exec channel throughput -------------------------------------------------------------------------------


@dataclass
class ExecResult:
    mib: int  # N: each client moved N and 2N MiB
    rounds: int
    ours: float = 0.0  # MB/s of the channel (exec_bench.Throughput.rate)
    kubectl: float = 0.0
    walls: dict[tuple[str, int], float] = field(default_factory=dict)
    kubectl_version: str = "?"
    error: str = ""


def _kubectl_version() -> str:
    try:
        out = subprocess.run([KUBECTL, "version", "--client", "-o", "json"], capture_output=True, text=True,
                             timeout=30, check=False)
        return str(json.loads(out.stdout)["clientVersion"]["gitVersion"])
    except (OSError, ValueError, KeyError, subprocess.TimeoutExpired):
        return "?"


def measure_exec(mib: int = EXEC_MIB) -> ExecResult:
    """exec_bench's measurement: both clients as processes of their own, throughput from two sizes."""
    # Imported here: exec_bench pulls in the test API server, which --skip-exec need not load.
    from tests.apiserver import FakeCluster, PodNetns
    from tests.bench import exec_bench

    res = ExecResult(mib, exec_bench.ROUNDS, kubectl_version=_kubectl_version())
    if not Path(KUBECTL).is_file():
        res.error = f"{KUBECTL} not found"
        return res
    with tempfile.TemporaryDirectory() as tmp, PodNetns() as pod, FakeCluster(Path(tmp)) as fc:
        # exec_bench's clients exec into default/web-1, container app.
        fc.add_pod("default", "web-1", containers=[{"name": "app", "image": "nginx"}], netns=pod.name)
        try:
            t = exec_bench.measure(fc.kubeconfig, mib, log=log)
        except SystemExit as exc:  # exec_bench reports a failed exec this way
            res.error = str(exc)
            return res
    res.walls, res.ours, res.kubectl = t.walls, t.rate("ours"), t.rate("kubectl")
    return res


# ---- 2) live latency ------------------------------------------------------------------------------------------


class Receiver(threading.Thread):
    """The developer's local port: accepts the plugin's connections and stamps every complete message's arrival."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(256)
        self.lsock.setblocking(False)
        self.port: int = self.lsock.getsockname()[1]
        self.arrivals: dict[str, int] = {}  # message id -> arrival ns (first complete sighting)
        self.sent_at: dict[str, int] = {}  # message id -> send ns, as carried in the message
        self.conns = 0
        self.bytes = 0
        self.bad_lines = 0
        self.last_arrival = 0
        self._lock = threading.Lock()
        self._halt = threading.Event()

    def run(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self.lsock, selectors.EVENT_READ, None)
        pending: dict[socket.socket, bytes] = {}
        try:
            while not self._halt.is_set():
                for key, _ in sel.select(timeout=0.1):
                    if key.data is None:
                        with contextlib.suppress(BlockingIOError):
                            conn, _addr = self.lsock.accept()
                            conn.setblocking(False)
                            sel.register(conn, selectors.EVENT_READ, True)
                            pending[conn] = b""
                            self.conns += 1
                        continue
                    sock = key.fileobj
                    assert isinstance(sock, socket.socket)
                    try:
                        data = sock.recv(65536)
                    except BlockingIOError:
                        continue
                    except OSError:
                        data = b""
                    if not data:
                        sel.unregister(sock)
                        sock.close()
                        pending.pop(sock, None)
                        continue
                    # Stamped before parsing: the figure is when the bytes were readable, not our parse speed.
                    t = now_ns()
                    self.bytes += len(data)
                    *lines, rest = (pending[sock] + data).split(b"\n")
                    pending[sock] = rest
                    self._record(lines, t)
        finally:
            for sock in pending:
                sock.close()
            sel.close()
            self.lsock.close()

    def _record(self, lines: list[bytes], t: int) -> None:
        with self._lock:
            for line in lines:
                parts = line.split(b" ", 2)
                if len(parts) < 2 or not parts[1].isdigit():
                    self.bad_lines += 1
                    continue
                mid = parts[0].decode()
                if mid not in self.arrivals:
                    self.arrivals[mid] = t
                    self.sent_at[mid] = int(parts[1])
                    self.last_arrival = t

    def seen(self, prefix: str) -> int:
        with self._lock:
            return sum(1 for k in self.arrivals if k.startswith(prefix))

    def latencies_ms(self, prefix: str) -> list[float]:
        with self._lock:
            return [(self.arrivals[k] - self.sent_at[k]) / MS for k in self.arrivals if k.startswith(prefix)]

    def stop(self) -> None:
        self._halt.set()
        self.join(5)


def message(mid: str, size: int) -> bytes:
    head = b"%s %d " % (mid.encode(), now_ns())
    return head + b"x" * max(0, size - len(head) - 1) + b"\n"


def client(host: str, port: int, messages: int, conns: int, rate: float, seed: int, size: int = 0,
           prefix: str = "m") -> int:
    """`conns` connections opened first, then `messages` sent round-robin on a fixed schedule of `rate` per second
    (each of `size` bytes, or MSG_MIN-MSG_MAX when 0; ids start with `prefix`)."""
    rnd = random.Random(seed)
    errors: list[str] = []
    socks: list[socket.socket] = []
    sent = 0
    try:
        for _ in range(conns):
            s = socket.create_connection((host, port), timeout=10)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # one segment per message, sent at once
            socks.append(s)
        gap = 1.0 / rate
        due = time.monotonic()
        for i in range(messages):
            due += gap
            ahead = due - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)
            # The id carries the connection so a mis-ordered delivery would show up when reading the figures.
            socks[i % conns].sendall(message(f"{prefix}{i}c{i % conns}", size or rnd.randint(MSG_MIN, MSG_MAX)))
            sent += 1
    except OSError as exc:
        errors.append(repr(exc))
    finally:
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_WR)
            s.close()
    print(json.dumps({"sent": sent, "errors": errors}), flush=True)
    return 1 if errors else 0


@dataclass
class LatencyResult:
    messages: int = MESSAGES
    conns: int = CONNS
    rate: float = RATE
    sent: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    send_seconds: float = 0.0
    first_segment_s: float = 0.0  # from the "mirroring" line to the first warm-up message at the local port
    start_s: float = 0.0  # from starting the plugin to its "mirroring" line
    receiver_conns: int = 0
    bad_lines: int = 0
    exit_code: int | None = None
    stop_s: float = 0.0
    stderr_tail: str = ""
    error: str = ""

    def pct(self, q: float) -> float:
        """Nearest-rank percentile: the value at or below which q of the delivered messages' latencies lie."""
        xs = sorted(self.latencies_ms)
        return xs[min(len(xs) - 1, max(0, math.ceil(q * len(xs)) - 1))] if xs else float("nan")


class PluginRun:
    """The source CLI in live mode; stderr read as it comes, so the bench can wait for "mirroring"."""

    def __init__(self, argv: list[str]) -> None:
        self.proc = subprocess.Popen(argv, cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE)
        self.lines: list[str] = []
        self.out: list[bytes] = []
        self.mirroring = threading.Event()
        self._readers = [threading.Thread(target=self._read_err, daemon=True),
                         threading.Thread(target=self._drain_out, daemon=True)]
        for t in self._readers:
            t.start()

    def _read_err(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            line = raw.decode(errors="replace")
            self.lines.append(line)
            if line.startswith("mirroring "):
                self.mirroring.set()
        self.mirroring.set()  # EOF: ended without the line; the caller looks at returncode

    def _drain_out(self) -> None:
        stdout = self.proc.stdout
        assert isinstance(stdout, io.BufferedReader)  # a binary, buffered pipe (Popen's default bufsize)
        for chunk in iter(lambda: stdout.read1(65536), b""):
            self.out.append(chunk)

    def summary(self) -> dict[str, Any]:
        """The `-o json` summary on stdout (read after exit), or {}."""
        text = b"".join(self.out).decode(errors="replace").strip()
        for candidate in (text, *text.splitlines()[-1:]):  # one JSON document, or JSON lines (the summary last)
            try:
                return dict(json.loads(candidate))
            except (ValueError, TypeError):
                continue
        return {}

    def tail(self, n: int = 15) -> str:
        return "".join(self.lines[-n:]).rstrip()

    def stop(self, timeout: float) -> int | None:
        """SIGINT (a user's Ctrl-C), then wait; SIGKILL only if it hangs (None is returned then)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            code: int | None = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            code = None
        for t in self._readers:
            t.join(5)
        return code


def pod_server(netns: str) -> contextlib.AbstractContextManager[int]:
    """The pod's application: benchnet's discard server inside the pod's namespace, on the declared port."""
    return benchnet.server_process("0.0.0.0", POD_PORT, 600, "pod server",
                                   wrap=lambda argv: ["ip", "netns", "exec", netns, *argv])


def _warm_up(rec: Receiver, pod_ip: str) -> bool:
    """A fresh one-message connection every 200 ms until one reaches the local port: the whole path is live.

    Fresh connections because one opened before tcpdump listened would be mid-stream to the plugin."""
    deadline = time.monotonic() + WARM_TIMEOUT
    for i in range(10_000):
        if rec.seen("w") or time.monotonic() > deadline:
            break
        with contextlib.suppress(OSError), socket.create_connection((pod_ip, POD_PORT), timeout=5) as s:
            s.sendall(message(f"w{i}", 100))
        time.sleep(0.2)
    return rec.seen("w") > 0


def measure_latency(messages: int = MESSAGES, conns: int = CONNS, rate: float = RATE) -> LatencyResult:
    from tests.apiserver import FakeCluster, PodNetns

    res = LatencyResult(messages, conns, rate)
    rec = Receiver()
    rec.start()
    try:
        with tempfile.TemporaryDirectory() as tmp, PodNetns() as pod, FakeCluster(Path(tmp)) as fc:
            fc.tap_start_delay = 0.05
            fc.add_pod("default", "lat-1", containers=[{"name": "web", "image": "nginx:1.27",
                                                         "ports": [{"name": "http", "containerPort": POD_PORT}]}],
                       netns=pod.name)
            with pod_server(pod.name):
                _run_latency(res, rec, pod.ip, fc.kubeconfig)
    finally:
        rec.stop()
    return res


def _run_latency(res: LatencyResult, rec: Receiver, pod_ip: str, kubeconfig: Path) -> None:
    t0 = time.monotonic()
    plugin = PluginRun([str(CLI), "pod/lat-1", "--to", f"127.0.0.1:{rec.port}", "--kubeconfig", str(kubeconfig)])
    try:
        if not plugin.mirroring.wait(START_TIMEOUT) or plugin.proc.poll() is not None:
            res.error = f"no 'mirroring' line within {START_TIMEOUT:.0f} s (exit {plugin.proc.poll()})"
            return
        t_mirroring = time.monotonic()
        res.start_s = t_mirroring - t0
        log("latency: plugin mirroring; warming up ...")
        if not _warm_up(rec, pod_ip):
            res.error = f"no warm-up message reached the local port within {WARM_TIMEOUT:.0f} s"
            return
        res.first_segment_s = time.monotonic() - t_mirroring
        log(f"latency: {messages_desc(res)} ...")
        t_send = time.monotonic()
        done = subprocess.run([sys.executable, __file__, "client", "--host", pod_ip, "--port", str(POD_PORT),
                               "--messages", str(res.messages), "--conns", str(res.conns), "--rate", str(res.rate),
                               "--seed", "1"], capture_output=True, text=True, timeout=res.messages / res.rate * 5 + 60,
                              check=False)
        res.send_seconds = time.monotonic() - t_send
        out = done.stdout.strip().splitlines()
        report: dict[str, Any] = json.loads(out[-1]) if out else {"sent": 0, "errors": [done.stderr[-500:]]}
        res.sent = int(report["sent"])
        if report["errors"]:
            res.error = f"client: {report['errors'][:3]}"
        # Until every message arrived, or nothing new came for a while (the rest is lost or far too late).
        deadline = time.monotonic() + DRAIN_TIMEOUT
        while time.monotonic() < deadline and rec.seen("m") < res.sent:
            time.sleep(0.05)
    finally:
        t_stop = time.monotonic()
        res.exit_code = plugin.stop(STOP_TIMEOUT)
        res.stop_s = time.monotonic() - t_stop
        res.stderr_tail = plugin.tail()
    res.latencies_ms = rec.latencies_ms("m")
    res.receiver_conns = rec.conns
    res.bad_lines = rec.bad_lines


# ---- the live path's sustainable rate ---------------------------------------------------------------------------

SUSTAIN_SECONDS = 30.0
# Offered MB/s, one step after the other while every message arrives.
SUSTAIN_STEPS = (5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 40.0, 60.0, 80.0)
SUSTAIN_MSG = 16384  # bytes per message
SUSTAIN_CONNS = 16


@dataclass
class SustainStep:
    offered: float  # MB/s asked of the client
    seconds: float  # the client's wall for the step
    sent: int
    delivered: int
    packets: int  # through the pod's interface (both ways), what tcpdump captures

    @property
    def ok(self) -> bool:
        return self.sent > 0 and self.delivered == self.sent

    @property
    def mb_s(self) -> float:
        return self.sent * SUSTAIN_MSG / 1e6 / max(self.seconds, 1e-9)


@dataclass
class SustainResult:
    seconds: float = SUSTAIN_SECONDS
    flags: list[str] = field(default_factory=list)  # given to the plugin besides the target
    steps: list[SustainStep] = field(default_factory=list)
    exit_code: int | None = None
    summary: dict[str, Any] = field(default_factory=dict)
    error: str = ""
    stderr_tail: str = ""

    def best(self) -> SustainStep | None:
        """The highest step with every message delivered, if every step below it was clean too."""
        good = None
        for step in self.steps:
            if not step.ok:
                break
            good = step
        return good


def _pod_packets(netns: str) -> int:
    out = subprocess.run(["ip", "netns", "exec", netns, "sh", "-c",
                          "cat /sys/class/net/*/statistics/rx_packets /sys/class/net/*/statistics/tx_packets"],
                         capture_output=True, text=True, timeout=30, check=False).stdout
    return sum(int(x) for x in out.split() if x.isdigit())


def measure_sustained(seconds: float = SUSTAIN_SECONDS, steps: tuple[float, ...] = SUSTAIN_STEPS,
                      extra: list[str] | None = None) -> SustainResult:
    """The live path (test API server exec -> tcpdump in the pod -> the plugin's tsharks -> a local port) at rising
    offered rates, `seconds` each, until a step loses a message: the last clean step is the figure."""
    from tests.apiserver import FakeCluster, PodNetns

    res = SustainResult(seconds, list(extra or []))
    rec = Receiver()
    rec.start()
    try:
        with tempfile.TemporaryDirectory() as tmp, PodNetns() as pod, FakeCluster(Path(tmp)) as fc:
            fc.tap_start_delay = 0.05
            fc.add_pod("default", "lat-1", containers=[{"name": "web", "image": "nginx:1.27",
                                                         "ports": [{"name": "http", "containerPort": POD_PORT}]}],
                       netns=pod.name)
            with pod_server(pod.name):
                _run_sustained(res, rec, pod, fc.kubeconfig, steps, extra or [])
    finally:
        rec.stop()
    return res


def _run_sustained(res: SustainResult, rec: Receiver, pod: Any, kubeconfig: Path, steps: tuple[float, ...],
                   extra: list[str]) -> None:
    plugin = PluginRun([str(CLI), "pod/lat-1", "--to", f"127.0.0.1:{rec.port}", "--kubeconfig", str(kubeconfig),
                        "-o", "json", *extra])
    try:
        if not plugin.mirroring.wait(START_TIMEOUT) or plugin.proc.poll() is not None:
            res.error = f"no 'mirroring' line within {START_TIMEOUT:.0f} s (exit {plugin.proc.poll()})"
            return
        if not _warm_up(rec, pod.ip):
            res.error = f"no warm-up message reached the local port within {WARM_TIMEOUT:.0f} s"
            return
        for k, offered in enumerate(steps):
            rate = offered * 1e6 / SUSTAIN_MSG
            messages = int(rate * res.seconds)
            prefix = f"s{k}-"
            log(f"sustained rate: step {k + 1}/{len(steps)}, {offered:g} MB/s offered for {res.seconds:.0f} s ...")
            before = _pod_packets(pod.name)
            t0 = time.monotonic()
            done = subprocess.run([sys.executable, __file__, "client", "--host", pod.ip, "--port", str(POD_PORT),
                                   "--messages", str(messages), "--conns", str(SUSTAIN_CONNS), "--rate", str(rate),
                                   "--seed", str(k + 1), "--size", str(SUSTAIN_MSG), "--prefix", prefix],
                                  capture_output=True, text=True, timeout=res.seconds * 5 + 60, check=False)
            wall = time.monotonic() - t0
            out = done.stdout.strip().splitlines()
            report: dict[str, Any] = json.loads(out[-1]) if out else {"sent": 0, "errors": [done.stderr[-500:]]}
            sent = int(report["sent"])
            deadline = time.monotonic() + DRAIN_TIMEOUT
            while time.monotonic() < deadline and rec.seen(prefix) < sent:
                time.sleep(0.1)
            step = SustainStep(offered, wall, sent, rec.seen(prefix), _pod_packets(pod.name) - before)
            res.steps.append(step)
            if report["errors"] or not step.ok:
                break
    finally:
        res.exit_code = plugin.stop(STOP_TIMEOUT)
        res.stderr_tail = plugin.tail()
        res.summary = plugin.summary()


def messages_desc(res: LatencyResult) -> str:
    return (f"{res.messages:,} messages of {MSG_MIN}-{MSG_MAX} B over {res.conns} connections at "
            f"{res.rate:.0f} msg/s")


# ---- 3) the one-file binary's start-up ------------------------------------------------------------------------


@dataclass
class BinaryResult:
    archive: str = ""
    built: str = ""  # "built" or "up to date", as krew/build.py says
    startup: float = 0.0  # median seconds
    error: str = ""


def help_startup(argv0: list[str], runs: int = 5) -> float:
    """Median wall time of `<argv0> --help` over `runs` runs."""
    walls = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run([*argv0, "--help"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60,
                       check=True)
        walls.append(time.perf_counter() - t0)
    return statistics.median(walls)


def build_binary() -> BinaryResult:
    """This machine's krew archive: krew/build.py rebuilds it only when something that goes into it changed."""
    res = BinaryResult()
    log("binary: krew/build.py dist (a no-op when current; about a minute otherwise) ...")
    try:
        done = subprocess.run([sys.executable, str(BUILD_SCRIPT), "dist"], cwd=REPO, capture_output=True, text=True,
                              timeout=BUILD_TIMEOUT, check=False, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        res.error = f"krew/build.py dist did not finish in {BUILD_TIMEOUT:.0f} s"
        return res
    if done.returncode != 0:
        lines = [x for x in done.stderr.strip().splitlines() if x.strip()]
        res.error = f"krew/build.py dist failed (exit {done.returncode}): {' | '.join(lines[-3:])}"
        return res
    res.archive = done.stdout.strip().splitlines()[-1]
    res.built = "built" if "built:" in done.stderr else "up to date"
    return res


def measure_binary(res: BinaryResult) -> BinaryResult:
    """`--help` of the binary as krew installs it: unpacked from the archive, run from its own directory."""
    if res.error:
        return res
    with tempfile.TemporaryDirectory(prefix="kubectl-mirror-bin-") as tmp:
        try:
            with tarfile.open(res.archive, "r:gz") as tar:
                tar.extractall(tmp, filter="data")
            res.startup = help_startup([str(Path(tmp) / "kubectl-mirror")])
        except (OSError, tarfile.TarError, subprocess.SubprocessError) as exc:
            res.error = f"could not run the binary from {res.archive}: {exc}"
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["client"])
    p.add_argument("--host", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--messages", type=int, default=MESSAGES)
    p.add_argument("--conns", type=int, default=CONNS)
    p.add_argument("--rate", type=float, default=RATE)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--size", type=int, default=0)
    p.add_argument("--prefix", default="m")
    a = p.parse_args(argv)
    return client(a.host, a.port, a.messages, a.conns, a.rate, a.seed, a.size, a.prefix)


if __name__ == "__main__":
    raise SystemExit(main())
