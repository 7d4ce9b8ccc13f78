"""Servers that take turns, for turn-taking tests: they answer after a delay, and can abandon work.

`http`: HTTP/1.1 with h11, keep-alive and pipelining; each request is answered `delay` seconds after it arrived.
`line`: an opaque request/response protocol: each line `PING n` is answered `PONG n`.
`sink`: reads everything and never answers.

With `abandon`, a request whose client has closed its side (FIN or RST) before the answer is ready is dropped
unanswered, as Node.js, Go's net/http and grpc-core do. Every connection's bytes are recorded, with how many
whole requests had arrived before the first answer went out (a pipelined delivery shows more than one).

In-process: `TurnServer(mode, ...).start()` ... `.stop()`. In a namespace: `python -m tests.netlab.turnserver`
prints `listening PORT` and serves until SIGTERM.
"""

from __future__ import annotations

import argparse
import select
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field

import h11

from tests.netlab.listener import close_listener


@dataclass
class Conn:
    data: bytearray = field(default_factory=bytearray)
    requests: int = 0  # whole requests received
    answered: int = 0
    abandoned: int = 0
    before_first_answer: int = 0  # whole requests received when the first answer went out
    end: str = "open"  # eof, reset


class TurnServer:
    def __init__(self, mode: str = "http", delay: float = 0.0, abandon: bool = False, host: str = "127.0.0.1",
                 port: int = 0) -> None:
        self.mode, self.delay, self.abandon = mode, delay, abandon
        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.sock.listen(1024)
        self.port = self.sock.getsockname()[1]
        self.conns: list[Conn] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._acceptor: threading.Thread | None = None
        self._threads: list[threading.Thread] = []

    def start(self) -> TurnServer:
        self._acceptor = threading.Thread(target=self._accept, daemon=True)
        self._acceptor.start()
        return self

    def stop(self, grace: float = 5.0) -> list[Conn]:
        self._stop.set()
        close_listener(self.sock, self._acceptor)
        deadline = time.monotonic() + grace
        for t in list(self._threads):
            t.join(max(0.0, deadline - time.monotonic()))
        with self._lock:
            return list(self.conns)

    def totals(self) -> dict[str, int]:
        with self._lock:
            conns = [c for c in self.conns if c.data]  # not --to's reachability probe
            return {"conns": len(conns), "requests": sum(c.requests for c in conns),
                    "answered": sum(c.answered for c in conns), "abandoned": sum(c.abandoned for c in conns)}

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            rec = Conn()
            with self._lock:
                self.conns.append(rec)
            t = threading.Thread(target=self._serve, args=(conn, rec), daemon=True)
            self._threads.append(t)
            t.start()

    # -- one connection ----------------------------------------------------------------------------------

    def _serve(self, sock: socket.socket, rec: Conn) -> None:
        sock.settimeout(0.2)
        queue: list[tuple[float, bytes]] = []  # (due, answer) of whole requests not answered yet
        parser = h11.Connection(h11.SERVER) if self.mode == "http" else None
        line = bytearray()
        closed = False
        deadline = time.monotonic() + 60
        try:
            while time.monotonic() < deadline and not (closed and not queue):
                now = time.monotonic()
                if queue and queue[0][0] <= now:
                    due, answer = queue.pop(0)
                    if closed and self.abandon:
                        rec.abandoned += 1 + len(queue)
                        queue.clear()
                        break
                    if rec.answered == 0:
                        rec.before_first_answer = rec.requests
                    sock.sendall(answer)
                    rec.answered += 1
                    continue
                wait = max(0.0, queue[0][0] - now) if queue else 0.2
                if closed:
                    time.sleep(min(wait, 0.05))
                    continue
                if not select.select([sock], [], [], min(wait, 0.2))[0]:
                    continue
                try:
                    data = sock.recv(65536)
                except ConnectionResetError:
                    rec.end = "reset"
                    closed = True
                    continue
                if not data:
                    rec.end = "eof"
                    closed = True
                    continue
                rec.data += data
                if self.mode == "sink":
                    continue
                due = time.monotonic() + self.delay
                for answer in (self._http(parser, data) if parser is not None else self._lines(line, data)):
                    rec.requests += 1
                    queue.append((due, answer))
        except OSError:
            pass
        finally:
            sock.close()

    @staticmethod
    def _http(parser: h11.Connection, data: bytes) -> list[bytes]:
        parser.receive_data(data)
        out: list[bytes] = []
        while True:
            event = parser.next_event()
            if event is h11.NEED_DATA or event is h11.PAUSED or isinstance(event, h11.ConnectionClosed):
                return out
            if isinstance(event, h11.EndOfMessage):
                # Answered in h11's eyes now, so a pipelined request behind it is parsed; the bytes go out later.
                body = b"answered\n"
                out.append(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
                parser.send(h11.Response(status_code=200, headers=[("content-length", str(len(body)))]))
                parser.send(h11.Data(data=body))
                parser.send(h11.EndOfMessage())
                if parser.our_state is not h11.DONE or parser.their_state is not h11.DONE:
                    return out  # the client asked to close: nothing follows
                parser.start_next_cycle()

    @staticmethod
    def _lines(line: bytearray, data: bytes) -> list[bytes]:
        line += data
        out = []
        while b"\n" in line:
            i = line.index(b"\n")
            word = bytes(line[:i]).replace(b"PING", b"PONG")
            del line[: i + 1]
            out.append(word + b"\n")
        return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("mode", choices=["http", "line", "sink"])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--delay", type=float, default=0.0)
    a = p.parse_args(argv)
    server = TurnServer(a.mode, a.delay, host=a.host, port=a.port).start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    print(f"listening {server.port}", flush=True)
    stop.wait(300)
    server.stop(grace=2.0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
