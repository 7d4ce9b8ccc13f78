"""An HTTP/1.1 service for shadow-comparison tests, in two roles that answer alike except where told to differ.

Both answer `ok METHOD TARGET body=N` (text/plain), except:
* `/json...`: a JSON body whose `ts` field is the role's own (a volatile field: --ignore-json-path hides it);
* `/diff...`: the `local` role answers 500 with another body, the `prod` role as usual.
Each connection's raw bytes and request heads are recorded (rewrites are checked on what arrived).

In-process: `HttpTarget(role).start()` ... `.stop()`; in a namespace: `python -m tests.http_target --role prod
--port P --out FILE` (prints `listening P`, records until SIGTERM, then writes FILE).
`python -m tests.http_target midclient HOST PORT` is a client that starts a request, prints `phase1`, waits
for a line on stdin, then finishes it and pipelines two more: a connection a capture can join mid-stream.
"""

from __future__ import annotations

import argparse
import base64
import json
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import h11

from tests.netlab.listener import close_listener

MID_BODY = 20_000  # the mid-stream client's first request body, half before the capture, half after
MID_LATE = b"GET /late1 HTTP/1.1\r\nHost: mid\r\n\r\nGET /diff/late2 HTTP/1.1\r\nHost: mid\r\n\r\n"


@dataclass
class Conn:
    data: bytearray = field(default_factory=bytearray)
    heads: list[dict[str, Any]] = field(default_factory=list)  # {"method", "target", "headers": [[n, v]], "body"}

    def to_json(self) -> dict[str, Any]:
        return {"data": base64.b64encode(bytes(self.data)).decode(), "heads": self.heads}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Conn:
        return cls(bytearray(base64.b64decode(d["data"])), list(d["heads"]))


def answer(role: str, method: str, target: str, body: int) -> tuple[int, str, bytes]:
    if target.startswith("/json"):
        doc = {"path": target, "ts": 1000 if role == "prod" else 2000, "items": [1, 2, 3]}
        return 200, "application/json", json.dumps(doc).encode()
    if target.startswith("/diff") and role == "local":
        return 500, "text/plain", f"broken {method} {target}\n".encode()
    return 200, "text/plain", f"ok {method} {target} body={body}\n".encode()


class HttpTarget:
    def __init__(self, role: str, host: str = "127.0.0.1", port: int = 0) -> None:
        self.role = role
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.sock.listen(256)
        self.port: int = self.sock.getsockname()[1]
        self.conns: list[Conn] = []
        self.open = 0
        self.lock = threading.Lock()

    def start(self) -> HttpTarget:
        self._acceptor = threading.Thread(target=self._accept, daemon=True)
        self._acceptor.start()
        return self

    def _accept(self) -> None:
        while True:
            try:
                s, _ = self.sock.accept()
            except OSError:
                return
            c = Conn()
            with self.lock:
                self.conns.append(c)
                self.open += 1
            threading.Thread(target=self._serve, args=(s, c), daemon=True).start()

    def _serve(self, s: socket.socket, c: Conn) -> None:
        h = h11.Connection(h11.SERVER)
        broken = False
        body = 0
        head: dict[str, Any] = {}
        try:
            while True:
                try:
                    data = s.recv(65536)
                except OSError:
                    return
                c.data += data
                h.receive_data(data)
                while not broken:
                    if h.they_are_waiting_for_100_continue:
                        s.sendall(h.send(h11.InformationalResponse(status_code=100, headers=[])) or b"")
                    try:
                        ev = h.next_event()
                    except h11.RemoteProtocolError:
                        broken = True
                        break
                    if ev is h11.NEED_DATA or isinstance(ev, h11.ConnectionClosed):
                        break
                    if ev is h11.PAUSED:
                        if h.our_state is h11.DONE and h.their_state is h11.DONE:
                            h.start_next_cycle()
                            continue
                        break
                    if isinstance(ev, h11.Request):
                        body = 0
                        head = {"method": ev.method.decode(), "target": ev.target.decode(),
                                "headers": [[n.decode(), v.decode()] for n, v in ev.headers.raw_items()]}
                    elif isinstance(ev, h11.Data):
                        body += len(ev.data)
                    elif isinstance(ev, h11.EndOfMessage):
                        head["body"] = body
                        c.heads.append(head)
                        status, ctype, reply = answer(self.role, head["method"], head["target"], body)
                        out = h.send(h11.Response(status_code=status, headers=[
                            ("content-type", ctype), ("content-length", str(len(reply)))]))
                        out = (out or b"") + (h.send(h11.Data(data=reply)) or b"") + (h.send(h11.EndOfMessage()) or b"")
                        s.sendall(out)
                if broken or not data:
                    # Not HTTP any more, or the client is done: read the rest raw, until its end.
                    while data:
                        data = s.recv(65536)
                        c.data += data
                    return
        except OSError:
            return
        finally:
            s.close()
            with self.lock:
                self.open -= 1

    def wait_idle(self, expected: int, timeout: float = 15.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if len(self.conns) >= expected and self.open == 0:
                    return True
            time.sleep(0.02)
        return False

    def stop(self) -> list[Conn]:
        close_listener(self.sock, self._acceptor)
        with self.lock:
            return [c for c in self.conns if c.data]  # the empty one is --to's reachability probe


def _read_answers(s: socket.socket, count: int) -> bytes:
    """Read until `count` responses have begun (or the server closes)."""
    got = b""
    while got.count(b"HTTP/1.1 ") < count:
        chunk = s.recv(65536)
        if not chunk:
            break
        got += chunk
    return got


def _midclient(host: str, port: int) -> int:
    s = socket.create_connection((host, port), timeout=30)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    head = f"POST /early HTTP/1.1\r\nHost: mid\r\nContent-Length: {MID_BODY}\r\n\r\n".encode()
    s.sendall(head + b"x" * (MID_BODY // 2))
    print("phase1", flush=True)
    sys.stdin.readline()
    s.sendall(b"x" * (MID_BODY - MID_BODY // 2))
    time.sleep(0.05)
    s.sendall(MID_LATE)
    got = _read_answers(s, 3)
    s.close()
    print("done", got.count(b"HTTP/1.1 "), flush=True)
    return 0


PIPELINED = (b"GET /p1 HTTP/1.1\r\nHost: pipe\r\n\r\n"
             b"GET /diff/p2 HTTP/1.1\r\nHost: pipe\r\n\r\n"
             b"POST /p3 HTTP/1.1\r\nHost: pipe\r\nTransfer-Encoding: chunked\r\n\r\n"
             b"5\r\nhello\r\n7\r\n, world\r\n0\r\n\r\n")


def _pipelined(host: str, port: int) -> int:
    """Three requests in one write (the last one chunked), then every answer read."""
    s = socket.create_connection((host, port), timeout=30)
    s.sendall(PIPELINED)
    got = _read_answers(s, 3)
    s.shutdown(socket.SHUT_WR)
    while s.recv(65536):
        pass
    s.close()
    return 0 if got.count(b"HTTP/1.1 ") == 3 else 1


def _load(host: str, port: int, conns: int, requests: int, batch: int = 10) -> int:
    """`conns` keep-alive connections at once, each `requests` small GETs, pipelined `batch` at a time."""
    errors: list[str] = []

    def one(i: int) -> None:
        try:
            s = socket.create_connection((host, port), timeout=60)
            got = 0
            for start in range(0, requests, batch):
                n = min(batch, requests - start)
                s.sendall(b"".join(f"GET /load/{i}/{start + k}?q=1 HTTP/1.1\r\nHost: bench\r\nUser-Agent: load\r\n"
                                   f"Accept: */*\r\n\r\n".encode() for k in range(n)))
                want, buf = got + n, b""
                while got < want:
                    chunk = s.recv(65536)
                    if not chunk:
                        raise ConnectionError("closed early")
                    buf += chunk
                    got = start + buf.count(b"HTTP/1.1 ")
            s.close()
        except OSError as exc:
            errors.append(f"conn {i}: {exc!r}")

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(conns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    print(json.dumps({"errors": errors}), flush=True)
    return 1 if errors else 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] == "load":
        return _load(args[1], int(args[2]), int(args[3]), int(args[4]))
    if args and args[0] == "midclient":
        return _midclient(args[1], int(args[2]))
    if args and args[0] == "pipelined":
        return _pipelined(args[1], int(args[2]))
    p = argparse.ArgumentParser()
    p.add_argument("--role", default="prod")
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--out", required=True)
    a = p.parse_args(args)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    target = HttpTarget(a.role, a.host, a.port).start()
    print(f"listening {target.port}", flush=True)
    stop.wait(600)
    target.wait_idle(0, 5.0)
    with open(a.out, "w") as f:
        json.dump([c.to_json() for c in target.stop()], f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
