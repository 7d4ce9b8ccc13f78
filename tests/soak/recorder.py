"""The soak's local target: hashes what each connection delivered instead of keeping it (1 GB must not sit here).

    python tests/soak/recorder.py [--host 127.0.0.1] [--port 0]

Prints `listening PORT`, then one line per ended connection: `ID LENGTH SHA256 END` where ID is the soak's
connection id read from the first bytes (-1 if they do not carry one) and END is `eof` or `reset`. Lines are
flushed in batches. SIGTERM/SIGINT: connections still open are reported with END `open`, then it exits.

A separate process, so reading and hashing never compete with the runner's threads for a GIL; one epoll loop,
because 100,000 connections must not mean 100,000 threads.
"""

from __future__ import annotations

import argparse
import hashlib
import selectors
import signal
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # tests.soak, when run as a script

from tests.soak.plan import ID_LEN

READ_SIZE = 256 << 10
FLUSH_EVERY = 0.2


class Conn:
    __slots__ = ("head", "length", "sha", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sha = hashlib.sha256()
        self.length = 0
        self.head = b""

    def line(self, end: str) -> str:
        cid = int(self.head[4:ID_LEN]) if self.head[:4] == b"SOAK" and self.head[4:ID_LEN].isdigit() else -1
        return f"{cid} {self.length} {self.sha.hexdigest()} {end}\n"


def serve(host: str, port: int) -> int:
    stop = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    lsock = socket.create_server((host, port), backlog=4096)
    lsock.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(lsock, selectors.EVENT_READ, None)
    print(f"listening {lsock.getsockname()[1]}", flush=True)
    conns: dict[int, Conn] = {}
    out: list[str] = []
    last_flush = time.monotonic()
    buf = bytearray(READ_SIZE)
    view = memoryview(buf)

    def finish(c: Conn, end: str) -> None:
        sel.unregister(c.sock)
        conns.pop(c.sock.fileno(), None)
        c.sock.close()
        out.append(c.line(end))

    while not stop:
        for key, _ in sel.select(0.1):
            if key.data is None:
                for _ in range(256):  # accept what is queued, bounded so reads are not starved
                    try:
                        sock, _addr = lsock.accept()
                    except (BlockingIOError, InterruptedError):
                        break
                    sock.setblocking(False)
                    c = Conn(sock)
                    conns[sock.fileno()] = c
                    sel.register(sock, selectors.EVENT_READ, c)
                continue
            c = key.data
            try:
                n = c.sock.recv_into(buf)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                finish(c, "reset")
                continue
            if n == 0:
                finish(c, "eof")
                continue
            if len(c.head) < ID_LEN:
                c.head += bytes(view[: min(n, ID_LEN - len(c.head))])
            c.sha.update(view[:n])
            c.length += n
        now = time.monotonic()
        if out and now - last_flush >= FLUSH_EVERY:
            sys.stdout.write("".join(out))
            sys.stdout.flush()
            out.clear()
            last_flush = now
    for c in list(conns.values()):
        finish(c, "open")
    sys.stdout.write("".join(out))
    sys.stdout.flush()
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    args = ap.parse_args()
    return serve(args.host, args.port)


if __name__ == "__main__":
    raise SystemExit(main())
