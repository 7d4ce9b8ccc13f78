"""Bench traffic processes: a discard server and a client that opens connections from a plan.

Both are run as separate processes (`python tests/bench/benchnet.py server|client ...`), the server side also as
the replay target of the benchmark, so neither ever shares a GIL with the process being measured.

    server --host H --port P           prints `listening PORT`, reads and discards until SIGTERM/SIGINT, then
                                       prints one JSON line {"conns": N, "bytes": B}
    client --host H --port P --plan F  F is JSON: [[size, chunk_min, chunk_max], ...] one entry per connection;
                                       prints one JSON line {"conns": N, "bytes": B, "errors": [...]}
"""

from __future__ import annotations

import argparse
import contextlib
import json
import queue
import random
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator

RECV_SIZE = 256 * 1024
POOL_SIZE = 8 << 20  # incompressible bytes every connection's payload is sliced from


@contextlib.contextmanager
def server_process(host: str, port: int, max_seconds: float, what: str,
                   wrap: Callable[[list[str]], list[str]] = list) -> Iterator[int]:
    """This module's discard server as a process of its own (`wrap` puts it in a network namespace): yields its
    port once it listens; SIGTERM on the way out, SIGKILL if it lingers."""
    argv = [sys.executable, __file__, "server", "--host", host, "--port", str(port), "--max-seconds", str(max_seconds)]
    srv = subprocess.Popen(wrap(argv), stdout=subprocess.PIPE, text=True)
    try:
        assert srv.stdout is not None
        line = srv.stdout.readline()  # EOF if it dies: never hangs
        if not line.startswith("listening"):
            raise RuntimeError(f"{what} did not start: {line!r}")
        yield int(line.split()[1])
    finally:
        if srv.poll() is None:
            srv.send_signal(signal.SIGTERM)
        try:
            srv.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            srv.kill()
            srv.communicate(timeout=10)


def serve(host: str, port: int, max_seconds: float) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    lsock = socket.socket(family, socket.SOCK_STREAM)
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        lsock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # "::" takes IPv4 too
    lsock.bind((host, port))
    lsock.listen(4096)
    lsock.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(lsock, selectors.EVENT_READ, None)
    stop = threading.Event()
    # The signal only sets a flag; the select timeout below makes the loop notice it promptly.
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    print(f"listening {lsock.getsockname()[1]}", flush=True)
    buf = bytearray(RECV_SIZE)
    view = memoryview(buf)
    conns = total = 0
    deadline = time.monotonic() + max_seconds
    while not stop.is_set() and time.monotonic() < deadline:
        for key, _ in sel.select(timeout=0.2):
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            if key.data is None:
                for _ in range(256):  # bounded burst of accepts per wakeup
                    try:
                        conn, _addr = lsock.accept()
                    except (BlockingIOError, InterruptedError):
                        break
                    conn.setblocking(False)
                    sel.register(conn, selectors.EVENT_READ, True)
                    conns += 1
                continue
            try:
                n = sock.recv_into(view)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                n = 0  # reset by the peer: the connection is over either way
            if n:
                total += n
            else:
                sel.unregister(sock)
                sock.close()
    print(json.dumps({"conns": conns, "bytes": total}), flush=True)
    return 0


def _client_worker(host: str, port: int, jobs: queue.Queue[tuple[int, int, int, int]], pool: memoryview,
                   nodelay: bool, timeout: float, rate: float, totals: list[int], errors: list[str],
                   lock: threading.Lock) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # Paced on a schedule (not a fixed sleep per write), so the rate holds however long each send takes.
    gap = 1.0 / rate if rate > 0 else 0.0
    due = time.monotonic()
    writes = 0
    for _ in range(1_000_000):  # bounded: one turn per connection in the plan
        try:
            idx, size, cmin, cmax = jobs.get_nowait()
        except queue.Empty:
            return
        rnd = random.Random(idx)
        try:
            with socket.socket(family, socket.SOCK_STREAM) as s:
                s.settimeout(timeout)
                if nodelay:
                    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                s.connect((host, port))
                head = b"bench-%08d\n" % idx
                s.sendall(head)
                sent = len(head)
                for _turn in range(10_000_000):
                    if sent >= size:
                        break
                    n = min(size - sent, rnd.randint(cmin, cmax))
                    off = rnd.randrange(0, len(pool) - n)
                    if gap:
                        due += gap
                        ahead = due - time.monotonic()
                        if ahead > 0.001:
                            time.sleep(ahead)
                        elif ahead < -0.1:
                            due = time.monotonic()  # fell far behind (a busy machine): do not burst to catch up
                    s.sendall(pool[off : off + n])
                    sent += n
                    writes += 1
                s.shutdown(socket.SHUT_WR)
                for _turn in range(1000):  # the server sends nothing: EOF comes at once
                    if not s.recv(65536):
                        break
            with lock:
                totals[0] += 1
                totals[1] += sent
                totals[2] += writes
            writes = 0
        except OSError as exc:
            with lock:
                errors.append(f"conn {idx}: {exc!r}")


def client(host: str, port: int, plan_path: str, workers: int, nodelay: bool, timeout: float, rate: float) -> int:
    with open(plan_path) as f:
        plan = json.load(f)
    pool = memoryview(random.Random(0).randbytes(POOL_SIZE))
    jobs: queue.Queue[tuple[int, int, int, int]] = queue.Queue()
    for idx, (size, cmin, cmax) in enumerate(plan):
        jobs.put((idx, int(size), int(cmin), int(cmax)))
    totals = [0, 0, 0]
    errors: list[str] = []
    lock = threading.Lock()
    threads = [threading.Thread(target=_client_worker, daemon=True,
                                args=(host, port, jobs, pool, nodelay, timeout, rate / max(1, workers), totals, errors,
                                      lock))
               for _ in range(max(1, min(workers, len(plan))))]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout * 20
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    if any(t.is_alive() for t in threads):
        errors.append("clients still running at the deadline")
    print(json.dumps({"conns": totals[0], "bytes": totals[1], "writes": totals[2], "errors": errors[:20]}), flush=True)
    return 1 if errors else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["server", "client"])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--plan")
    p.add_argument("--workers", type=int, default=64)
    p.add_argument("--nodelay", action="store_true")
    p.add_argument("--timeout", type=float, default=60.0)
    p.add_argument("--rate", type=float, default=0.0, help="writes per second over all workers (0: unpaced)")
    p.add_argument("--max-seconds", type=float, default=3600.0)
    a = p.parse_args(argv)
    if a.mode == "server":
        return serve(a.host, a.port, a.max_seconds)
    if not a.plan:
        p.error("client needs --plan")
    return client(a.host, a.port, a.plan, a.workers, a.nodelay, a.timeout, a.rate)


if __name__ == "__main__":
    # Line-buffered JSON even when stdout is a pipe.
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    sys.exit(main())
