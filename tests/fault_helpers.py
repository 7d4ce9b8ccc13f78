"""Helpers for the fault tests: synthetic captures with known contents, a local target that misbehaves on
purpose, and the CLI as a watched subprocess (its children, its peak memory).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.dissect_helpers import ethernet, tcp_ip
from tests.netlab.lab import CLI, REPO
from tests.netlab.listener import close_listener

CLIENT_IP, SERVER_IP, SERVER_PORT = "192.0.2.10", "192.0.2.80", 80
SYN, FIN, RST, PSH, ACK = 0x02, 0x01, 0x04, 0x08, 0x10
MSS = 1400


# ---- synthetic captures ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Conn:
    """One client connection in a synthetic capture: `payload` sent from `start` on, one segment every `gap`."""

    payload: bytes
    start: float
    gap: float = 0.0
    segment: int = MSS


def payload(name: str, size: int) -> bytes:
    """Bytes that name their connection first (the misbehaving target decides on them) and are unique."""
    head = f"{name}\n".encode()
    body = (name.encode() * (size // max(1, len(name)) + 1))[: max(0, size - len(head))]
    return head + body


def pcap_frames(conns: Sequence[Conn]) -> list[tuple[float, bytes]]:
    frames: list[tuple[float, bytes]] = []
    for i, c in enumerate(conns):
        sport = 20000 + i
        cseq, sseq = 1000 + i * 7919, 5000 + i * 104729
        t = c.start

        def add(ts: float, client: bool, seq: int, ack: int, flags: int, data: bytes = b"", sport: int = sport) -> None:
            src, dst, sp, dp = (CLIENT_IP, SERVER_IP, sport, SERVER_PORT) if client else \
                (SERVER_IP, CLIENT_IP, SERVER_PORT, sport)
            frames.append((ts, ethernet(tcp_ip(src, dst, sp, dp, seq, ack, flags, data))))

        add(t, True, cseq, 0, SYN)
        add(t + 0.0001, False, sseq, cseq + 1, SYN | ACK)
        add(t + 0.0002, True, cseq + 1, sseq + 1, ACK)
        seq, t = cseq + 1, t + 0.0003
        for off in range(0, len(c.payload), c.segment):
            chunk = c.payload[off : off + c.segment]
            add(t, True, seq, sseq + 1, PSH | ACK, chunk)
            seq += len(chunk)
            t += c.gap if c.gap else 0.00001
        add(t, True, seq, sseq + 1, FIN | ACK)
        add(t + 0.0001, False, sseq + 1, seq + 1, FIN | ACK)
        add(t + 0.0002, True, seq + 1, sseq + 2, ACK)
    frames.sort(key=lambda f: f[0])
    return frames


def write_pcap(path: Path, conns: Sequence[Conn], t0: float = 1_700_000_000.0) -> list[int]:
    """A classic pcap (Ethernet, microseconds); returns each record's end offset, to cut it inside a record."""
    out = bytearray(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 262144, 1))
    ends: list[int] = []
    for ts, frame in pcap_frames(conns):
        whole = t0 + ts
        sec = int(whole)
        out += struct.pack("<IIII", sec, round((whole - sec) * 1e6), len(frame), len(frame)) + frame
        ends.append(len(out))
    path.write_bytes(bytes(out))
    return ends


# ---- a local target that misbehaves on purpose ---------------------------------------------------------


@dataclass
class Received:
    data: bytearray = field(default_factory=bytearray)
    end: str = "open"  # "eof", "reset", "stalled" (never read to the end) or "killed" (the server died)


# What the target does with a connection, decided on its first bytes: read it all, never read again, or reset.
Policy = Callable[[bytes], str]
HEAD = 5  # bytes read before the policy decides


def read_all(_: bytes) -> str:
    return "read"


class Target:
    """A TCP service on loopback: records what each connection delivered; `kill()` dies like a crashed process."""

    def __init__(self, port: int = 0, policy: Policy = read_all) -> None:
        self.policy = policy
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", port))
        self.sock.listen(512)
        self.port: int = self.sock.getsockname()[1]
        self.received: list[Received] = []
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._dead = threading.Event()
        self._acceptor = threading.Thread(target=self._accept, daemon=True)
        self._acceptor.start()

    def _accept(self) -> None:
        while not self._dead.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            rec = Received()
            with self._lock:
                if self._dead.is_set():
                    conn.close()
                    return
                self.received.append(rec)
                self._conns.append(conn)
            threading.Thread(target=self._serve, args=(conn, rec), daemon=True).start()

    def _serve(self, conn: socket.socket, rec: Received) -> None:
        decided = False
        try:
            while True:
                data = conn.recv(HEAD if not decided else 65536)
                if not data:
                    # After kill() the read ends because this side shut down, not because the client finished.
                    rec.end = "killed" if self._dead.is_set() else "eof"
                    conn.close()  # answer the FIN: the plugin waits for the service's own close
                    return
                rec.data += data
                if not decided and (len(rec.data) >= HEAD):
                    decided = True
                    action = self.policy(bytes(rec.data))
                    if action == "stall":
                        rec.end = "stalled"
                        self._dead.wait()  # holds the socket open, unread, until the test ends
                        return
                    if action == "reset":
                        rec.end = "reset-by-target"
                        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                        conn.close()
                        return
        except ConnectionResetError:
            rec.end = "reset"
        except OSError:
            if rec.end == "open":
                rec.end = "killed"

    def kill(self) -> None:
        """Die: stop listening and reset every connection, as the kernel does for a crashed server."""
        with self._lock:
            self._dead.set()
        close_listener(self.sock, self._acceptor)  # outside the lock: the acceptor takes it as it leaves
        with self._lock:
            for conn in self._conns:
                with contextlib.suppress(OSError):
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    conn.shutdown(socket.SHUT_RDWR)
                with contextlib.suppress(OSError):
                    conn.close()

    def records(self, settle: float = 10.0) -> list[Received]:
        """What arrived, once no connection is still being read (bounded); without the --to probe (empty)."""
        deadline = time.monotonic() + settle
        while time.monotonic() < deadline:
            with self._lock:
                if all(r.end != "open" for r in self.received):
                    break
            time.sleep(0.02)
        with self._lock:
            return [r for r in self.received if r.data or r.end not in ("eof", "reset")]


@contextlib.contextmanager
def target(port: int = 0, policy: Policy = read_all) -> Iterator[Target]:
    t = Target(port, policy)
    try:
        yield t
    finally:
        t.kill()


# ---- the CLI as a watched subprocess ---------------------------------------------------------------------


def cli_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}


def children(pid: int) -> list[tuple[int, str]]:
    """(pid, comm) of every live descendant of `pid`, from /proc (zombies left out: they hold nothing)."""
    table: dict[int, tuple[int, str, str]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        rest = stat[stat.rindex(")") + 2 :].split()
        table[int(entry)] = (int(rest[1]), comm, rest[0])
    out: list[tuple[int, str]] = []
    todo = [pid]
    while todo:
        parent = todo.pop()
        for child, (ppid, comm, state) in table.items():
            if ppid == parent:
                todo.append(child)
                if state != "Z":
                    out.append((child, comm))
    return out


def processes_named(comm: str) -> set[int]:
    """Every process on the machine with this comm: to check that none of ours outlived a run."""
    found: set[int] = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/comm") as f:
                    if f.read().strip() == comm:
                        found.add(int(entry))
            except OSError:
                continue
    return found


def vm_hwm(pid: int) -> int | None:
    """Peak resident memory of a process in bytes (VmHWM), None once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str
    peak_rss: int = 0
    tshark_pids: set[int] = field(default_factory=set)

    @property
    def summary(self) -> dict[str, Any]:
        return dict(json.loads(self.stdout))

    @property
    def connections(self) -> dict[str, int]:
        return dict(self.summary["connections"])

    def error_lines(self) -> list[str]:
        return [ln for ln in self.stderr.splitlines() if ln.startswith("error:")]


class Run:
    """The CLI in the background, watched: stderr lines as they come, its tshark children, its peak RSS."""

    def __init__(self, args: Sequence[str], *, stdin: Any = subprocess.DEVNULL) -> None:
        self.proc = subprocess.Popen([sys.executable, str(CLI), *args], cwd=REPO, stdin=stdin,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=cli_env())
        self.pid = self.proc.pid
        self._lines: list[str] = []
        self._out = bytearray()
        self._lock = threading.Lock()
        self.peak_rss = 0
        self.tshark_pids: set[int] = set()
        self._watching = True
        self._threads = [threading.Thread(target=self._read_err, daemon=True),
                         threading.Thread(target=self._read_out, daemon=True),
                         threading.Thread(target=self._watch, daemon=True)]
        for t in self._threads:
            t.start()

    def _read_err(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            with self._lock:
                self._lines.append(raw.decode(errors="replace"))

    def _read_out(self) -> None:
        assert self.proc.stdout is not None
        for chunk in iter(lambda: self.proc.stdout.read1(65536) if self.proc.stdout else b"", b""):
            with self._lock:
                self._out += chunk

    def _watch(self) -> None:
        # VmHWM only grows, so the last value read before the process ends is its peak (to within one poll).
        while self._watching and self.proc.poll() is None:
            hwm = vm_hwm(self.pid)
            if hwm is not None:
                self.peak_rss = max(self.peak_rss, hwm)
            self.tshark_pids |= {p for p, comm in children(self.pid) if comm == "tshark"}
            time.sleep(0.05)

    @property
    def stderr(self) -> str:
        with self._lock:
            return "".join(self._lines)

    def wait_line(self, text: str, timeout: float) -> bool:
        """Until a stderr line contains `text` (bounded); False if it never came or the run ended first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.stderr:
                return True
            if self.proc.poll() is not None:
                time.sleep(0.2)  # let the reader catch the last lines
                return text in self.stderr
            time.sleep(0.02)
        return False

    def tsharks(self) -> list[int]:
        return [p for p, comm in children(self.pid) if comm == "tshark"]

    def interrupt(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)

    def finish(self, timeout: float = 60.0) -> Result:
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"the CLI did not exit within {timeout:g}s; stderr:\n{self.stderr}") from None
        self._watching = False
        for t in self._threads:
            t.join(10.0)
        with self._lock:
            out = bytes(self._out)
        return Result(self.proc.returncode, out.decode(errors="replace"), self.stderr, self.peak_rss,
                      set(self.tshark_pids))

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@contextlib.contextmanager
def cli(args: Sequence[str], **kwargs: Any) -> Iterator[Run]:
    run = Run(args, **kwargs)
    try:
        yield run
    finally:
        run.kill()  # a failing test never leaves the CLI behind


def wait_for(predicate: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def gone(pids: set[int], timeout: float = 5.0) -> bool:
    """Every one of these processes has exited (bounded wait: a killed child may take a moment to be reaped)."""
    return wait_for(lambda: not any(os.path.exists(f"/proc/{p}") and _alive(p) for p in pids), timeout)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
