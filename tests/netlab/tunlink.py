"""A user-space impaired link: two TUN devices, one per namespace, and a forwarder between them.

The kernel has no netem here, so loss, duplication, reordering and delay are applied in this process. The
impairment happens *before* packets reach the server's TUN device, so a capture there sees exactly what a
capture in a real pod would: the real client TCP stack's retransmissions, segments out of order, duplicates.

Run as `python -m tests.netlab.tunlink --client-ns A --server-ns B ...`; it prints `ready` once both devices
exist, forwards until SIGTERM/SIGINT (or --max-seconds), then prints a JSON line of what it did.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import fcntl
import heapq
import json
import os
import random
import select
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .netns import Link, Netns, add_addresses

CLONE_NEWNET = 0x40000000
TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
REPO = Path(__file__).resolve().parents[2]


def enter_netns(name: str) -> None:
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({name}): {os.strerror(err)}")
    finally:
        os.close(fd)


def open_tun(ifname: str) -> int:
    """A TUN device in the calling thread's current network namespace, raw IP packets (no PI header)."""
    fd = os.open("/dev/net/tun", os.O_RDWR)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", ifname.encode(), IFF_TUN | IFF_NO_PI))
    return fd


def tcp_payload_len(pkt: bytes) -> int:
    """TCP payload bytes of a raw IPv4/IPv6 packet; -1 for anything that is not TCP."""
    if not pkt:
        return -1
    version = pkt[0] >> 4
    if version == 4 and len(pkt) >= 20:
        ihl = (pkt[0] & 0x0F) * 4
        if pkt[9] != 6 or len(pkt) < ihl + 13:
            return -1
        total = struct.unpack_from("!H", pkt, 2)[0]
        return total - ihl - (pkt[ihl + 12] >> 4) * 4
    if version == 6 and len(pkt) >= 40 + 13:
        if pkt[6] != 6:  # extension headers never appear in the lab's traffic
            return -1
        plen = struct.unpack_from("!H", pkt, 4)[0]
        return plen - (pkt[40 + 12] >> 4) * 4
    return -1


@dataclass
class Impairment:
    loss: float = 0.0
    dup: float = 0.0
    reorder: float = 0.0
    hold: int = 3  # a reordered packet waits until this many later packets went past it...
    hold_ms: float = 30.0  # ...or this long, whichever comes first
    delay_ms: float = 0.0
    seed: int = 1
    # Only packets carrying TCP payload are impaired: losing handshakes would only add fixed 1 s waits.
    data_only: bool = True


@dataclass
class Stats:
    forwarded: int = 0
    lost: int = 0
    duplicated: int = 0
    reordered: int = 0


@dataclass
class Direction:
    out_fd: int
    held: list[list[object]] = field(default_factory=list)  # [remaining, deadline, packet]


class Forwarder:
    def __init__(self, client_fd: int, server_fd: int, imp: Impairment) -> None:
        self.imp = imp
        self.rng = random.Random(imp.seed)
        self.stats = Stats()
        self.dirs = {client_fd: Direction(server_fd), server_fd: Direction(client_fd)}
        self.queue: list[tuple[float, int, int, bytes]] = []  # (due, tiebreak, out fd, packet)
        self.counter = 0

    def _schedule(self, out_fd: int, pkt: bytes, now: float) -> None:
        self.counter += 1
        heapq.heappush(self.queue, (now + self.imp.delay_ms / 1000, self.counter, out_fd, pkt))

    def _pass(self, d: Direction, pkt: bytes, now: float) -> None:
        self._schedule(d.out_fd, pkt, now)
        self.stats.forwarded += 1
        for h in d.held:
            h[0] = int(h[0]) - 1  # type: ignore[call-overload]
        self._release(d, now)

    def _release(self, d: Direction, now: float) -> None:
        due = [h for h in d.held if int(h[0]) <= 0 or float(h[1]) <= now]  # type: ignore[call-overload, arg-type]
        for h in due:
            d.held.remove(h)
            self._schedule(d.out_fd, h[2], now)  # type: ignore[arg-type]

    def incoming(self, in_fd: int, pkt: bytes, now: float) -> None:
        d = self.dirs[in_fd]
        imp, rng = self.imp, self.rng
        if imp.data_only and tcp_payload_len(pkt) <= 0:
            self._pass(d, pkt, now)
            return
        if rng.random() < imp.loss:
            self.stats.lost += 1
            return
        if rng.random() < imp.reorder:
            self.stats.reordered += 1
            d.held.append([imp.hold, now + imp.hold_ms / 1000, pkt])
            return
        self._pass(d, pkt, now)
        if rng.random() < imp.dup:
            self.stats.duplicated += 1
            self._schedule(d.out_fd, pkt, now)

    def flush_due(self, now: float) -> float | None:
        for d in self.dirs.values():
            self._release(d, now)
        while self.queue and self.queue[0][0] <= now:
            _, _, out_fd, pkt = heapq.heappop(self.queue)
            with contextlib.suppress(OSError):  # device not up yet, or going away
                os.write(out_fd, pkt)
        deadlines = [q[0] for q in self.queue[:1]] + [float(h[1]) for d in self.dirs.values() for h in d.held]  # type: ignore[arg-type]
        return max(0.0, min(deadlines) - now) if deadlines else None


def serve(client_ns: str, server_ns: str, ifname: str, imp: Impairment, max_seconds: float) -> Stats:
    home = os.open("/proc/self/ns/net", os.O_RDONLY)
    enter_netns(client_ns)
    client_fd = open_tun(ifname)
    enter_netns(server_ns)
    server_fd = open_tun(ifname)
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.setns(home, CLONE_NEWNET)
    os.close(home)
    fwd = Forwarder(client_fd, server_fd, imp)
    stop = False

    def on_signal(_sig: int, _frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    print("ready", flush=True)
    end = time.monotonic() + max_seconds
    wait: float | None = None
    while not stop and time.monotonic() < end:
        try:
            ready, _, _ = select.select([client_fd, server_fd], [], [], min(wait if wait is not None else 0.5, 0.5))
        except InterruptedError:
            continue
        now = time.monotonic()
        for fd in ready:
            for _ in range(64):  # drain a burst, bounded so the other direction is not starved
                try:
                    pkt = os.read(fd, 65536)
                except BlockingIOError:
                    break
                except OSError:
                    break
                fwd.incoming(fd, pkt, now)
                if not select.select([fd], [], [], 0)[0]:
                    break
        wait = fwd.flush_due(time.monotonic())
    return fwd.stats


@dataclass
class TunLink:
    link: Link
    proc: subprocess.Popen[str]
    stats: Stats | None = None

    def stop(self) -> Stats:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            out, _ = self.proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate(timeout=10)
        for line in reversed((out or "").splitlines()):
            if line.startswith("{"):
                self.stats = Stats(**json.loads(line))
                break
        return self.stats or Stats()


@contextlib.contextmanager
def tun_between(client: Netns, server: Netns, imp: Impairment | None = None, ifname: str = "tunk",
                max_seconds: float = 300.0) -> Iterator[TunLink]:
    """A point-to-point TUN link between two namespaces; captures on the server side are LINKTYPE RAW."""
    from .netns import ADDR4, ADDR6

    imp = imp or Impairment()
    args = [sys.executable, "-m", "tests.netlab.tunlink", "--client-ns", client.name, "--server-ns", server.name,
            "--ifname", ifname, "--loss", str(imp.loss), "--dup", str(imp.dup), "--reorder", str(imp.reorder),
            "--hold", str(imp.hold), "--hold-ms", str(imp.hold_ms), "--delay-ms", str(imp.delay_ms),
            "--seed", str(imp.seed), "--max-seconds", str(max_seconds)]
    if not imp.data_only:
        args.append("--all")
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    tl = TunLink(Link(client, server, ifname, ifname, ADDR4[0], ADDR4[1], ADDR6[0], ADDR6[1]), proc)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # the forwarder exits (EOF) if it cannot start: never hangs
        if line.strip() != "ready":
            err = proc.stderr.read() if proc.stderr else ""
            raise RuntimeError(f"tunlink did not start: {line!r} {err[-2000:]}")
        add_addresses(client, ifname, ADDR4[0], ADDR6[0], peer4=ADDR4[1], peer6=ADDR6[1])
        add_addresses(server, ifname, ADDR4[1], ADDR6[1], peer4=ADDR4[0], peer6=ADDR6[0])
        yield tl
    finally:
        tl.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--client-ns", required=True)
    p.add_argument("--server-ns", required=True)
    p.add_argument("--ifname", default="tunk")
    p.add_argument("--loss", type=float, default=0.0)
    p.add_argument("--dup", type=float, default=0.0)
    p.add_argument("--reorder", type=float, default=0.0)
    p.add_argument("--hold", type=int, default=3)
    p.add_argument("--hold-ms", type=float, default=30.0)
    p.add_argument("--delay-ms", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--all", action="store_true", help="impair handshakes and pure ACKs too")
    p.add_argument("--max-seconds", type=float, default=300.0)
    a = p.parse_args(argv)
    imp = Impairment(a.loss, a.dup, a.reorder, a.hold, a.hold_ms, a.delay_ms, a.seed, not a.all)
    stats = serve(a.client_ns, a.server_ns, a.ifname, imp, a.max_seconds)
    print(json.dumps(stats.__dict__), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
