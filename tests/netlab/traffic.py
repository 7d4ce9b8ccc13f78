"""Real clients, run inside the client namespace: curl, and Python socket clients with recognisable bytes.

Every raw connection's bytes start with `conn-TAG-NNNN` so a replayed connection can be matched with the
one the real server saw by content alone. `python -m tests.netlab.traffic conns ...` is the client process.
"""

from __future__ import annotations

import argparse
import json
import random
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from .netns import Netns

REPO = Path(__file__).resolve().parents[2]
EARLY, LATE = b"|EARLY|", b"|LATE|"


def payload(tag: str, i: int, size: int) -> bytes:
    """The bytes raw connection `i` sends: a header naming it, then seeded random bytes (incompressible)."""
    head = f"conn-{tag}-{i:04d}\n".encode()
    rnd = random.Random(f"{tag}/{i}")
    return head + rnd.randbytes(max(0, size - len(head)))


def url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


# ---- the client process ---------------------------------------------------------------------------------------


def _connect(host: str, port: int, timeout: float) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.connect((host, port))
    return s


def _send_chunks(s: socket.socket, data: bytes, chunks: int, pause: float) -> None:
    step = max(1, -(-len(data) // max(1, chunks)))
    for off in range(0, len(data), step):
        s.sendall(data[off : off + step])
        if pause and off + step < len(data):
            time.sleep(pause)  # separate segments on the wire, so a test can remove one of several


def _finish(s: socket.socket, timeout: float) -> None:
    s.shutdown(socket.SHUT_WR)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and s.recv(65536):
        pass
    s.close()


def _one(
    a: argparse.Namespace, i: int, errors: list[str], go: threading.Event | None, ready: threading.Barrier | None
) -> None:
    try:
        data = payload(a.tag, i, a.size)
        s = _connect(a.host, a.port, a.timeout)
        if go is not None and ready is not None:
            # Two phases: the early part is on the server before the capture starts, the late part after.
            s.sendall(data[: len(data) // 2] + EARLY)
            ready.wait(a.timeout)
            go.wait(a.timeout)
            _send_chunks(s, LATE + data[len(data) // 2 :], a.chunks, a.pause)
        else:
            _send_chunks(s, data, a.chunks, a.pause)
        _finish(s, a.timeout)
    except Exception as exc:  # reported to the test, which fails on it
        errors.append(f"conn {i}: {exc!r}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("mode", choices=["conns"])
    p.add_argument("--host", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--count", type=int, default=1)
    p.add_argument("--first", type=int, default=0, help="number of the first connection")
    p.add_argument("--size", type=int, default=1000)
    p.add_argument("--chunks", type=int, default=1)
    p.add_argument("--pause", type=float, default=0.0)
    p.add_argument("--tag", default="t")
    p.add_argument("--two-phase", action="store_true", help="send half, print 'phase1', wait for 'go' on stdin")
    p.add_argument("--sequential", action="store_true")
    p.add_argument("--timeout", type=float, default=30.0)
    a = p.parse_args(argv)
    a.count = min(a.count, 2000)
    errors: list[str] = []
    go = threading.Event() if a.two_phase else None
    ready = threading.Barrier(a.count + 1) if a.two_phase else None
    threads = []
    for i in range(a.first, a.first + a.count):
        t = threading.Thread(target=_one, args=(a, i, errors, go, ready), daemon=True)
        t.start()
        if a.sequential:
            t.join(a.timeout)
        threads.append(t)
    if go is not None and ready is not None:
        try:
            ready.wait(a.timeout)
        except threading.BrokenBarrierError:
            errors.append("not every connection finished its first phase")
        print("phase1", flush=True)
        sys.stdin.readline()
        go.set()
    deadline = time.monotonic() + a.timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    print(json.dumps({"errors": errors}), flush=True)
    return 1 if errors else 0


# ---- drivers, called by tests ----------------------------------------------------------------------------------


def _client_argv(ns: Netns, host: str, port: int, count: int, size: int, tag: str, extra: Sequence[str]) -> list[str]:
    return ns.argv([sys.executable, "-m", "tests.netlab.traffic", "conns", "--host", host, "--port", str(port),
                    "--count", str(count), "--size", str(size), "--tag", tag, *extra])


def raw_conns(ns: Netns, host: str, port: int, count: int, size: int, tag: str = "t", chunks: int = 1,
              pause: float = 0.0, sequential: bool = False, first: int = 0, timeout: float = 60.0) -> None:
    """`count` concurrent (or sequential) connections, each sending `payload(tag, i, size)` then closing."""
    extra = ["--chunks", str(chunks), "--pause", str(pause), "--first", str(first)]
    if sequential:
        extra.append("--sequential")
    out = subprocess.run(_client_argv(ns, host, port, count, size, tag, extra), cwd=REPO, capture_output=True,
                         text=True, timeout=timeout, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"clients failed ({out.returncode}): {out.stdout[-2000:]} {out.stderr[-2000:]}")


class TwoPhase:
    """Connections opened and half-sent before a capture starts; `finish()` sends the rest."""

    def __init__(self, ns: Netns, host: str, port: int, count: int, size: int, tag: str = "mid",
                 timeout: float = 60.0) -> None:
        self.timeout = timeout
        argv = _client_argv(ns, host, port, count, size, tag, ["--two-phase", "--timeout", str(timeout)])
        self.proc = subprocess.Popen(argv, cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)

    def wait_phase1(self) -> None:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()  # EOF if the client dies: never hangs
        if line.strip() != "phase1":
            self.proc.kill()
            raise RuntimeError(f"clients did not finish phase 1: {line!r}")

    def finish(self) -> None:
        out, err = self.proc.communicate("go\n", timeout=self.timeout)
        if self.proc.returncode != 0:
            raise RuntimeError(f"clients failed: {out[-2000:]} {err[-2000:]}")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def curl(ns: Netns, urls: Sequence[str], extra: Sequence[str] = (), timeout: float = 60.0) -> str:
    """One curl process; several URLs on one command line reuse one keep-alive connection."""
    args = ["curl", "--http1.1", "-sS", "-g", "--max-time", str(int(timeout)), *extra, *urls]
    out = ns.run(args, timeout=timeout + 5, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"curl failed ({out.returncode}): {out.stderr.strip()}")
    return out.stdout


def curl_upload(ns: Netns, url: str, path: Path, timeout: float = 60.0) -> str:
    """`curl -T`: a PUT with the whole file as body (curl asks for 100-continue first; the recorder answers)."""
    return curl(ns, [url], ["-T", str(path)], timeout=timeout)


if __name__ == "__main__":
    sys.exit(main())
