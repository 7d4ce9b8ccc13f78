"""Helpers for the fault tests: synthetic captures with known contents, a local target that misbehaves on
purpose, and the CLI as a watched subprocess (its children, its peak memory).
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.cli_run import CliRun, wait_for
from tests.dissect_helpers import ethernet, tcp_ip
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


# ---- processes ------------------------------------------------------------------------------------------


def processes_of_run(comm: str, marker: str) -> set[int]:
    """Processes with this comm that one CLI run started (its `CliRun.marker` is in their environment).

    Other tests may run their own tsharks on the same machine at the same time; only this run's count.
    """
    found: set[int] = set()
    needle = marker.encode() + b"\0"
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/comm") as f:
                    if f.read().strip() != comm:
                        continue
                with open(f"/proc/{entry}/environ", "rb") as env:
                    if needle in env.read() + b"\0":
                        found.add(int(entry))
            except OSError:
                continue
    return found


@contextlib.contextmanager
def cli(args: Sequence[str], **kwargs: Any) -> Iterator[CliRun]:
    """The CLI, watched (peak memory, tshark children); killed on the way out if a test failed half-way."""
    run = CliRun(args, watch=True, **kwargs)
    try:
        yield run
    finally:
        run.kill()


def gone(pids: set[int], timeout: float = 5.0) -> bool:
    """Every one of these processes has exited (bounded wait: a killed child may take a moment to be reaped)."""
    return wait_for(lambda: not any(os.path.exists(f"/proc/{p}") and _alive(p) for p in pids), timeout)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
