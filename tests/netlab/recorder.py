"""The ground-truth server: records every byte each TCP connection delivered to the application.

HTTP/1.1 connections are answered properly (h11, keep-alive, 100-continue) so real clients like curl behave
as against a real service; anything else is read and discarded. Every byte read is recorded either way, raw.

In-process: `Recorder(host, port).start()` ... `.stop()` -> list of `ConnRecord`.
In a namespace: `python -m tests.netlab.recorder --port P --out FILE`: prints `listening PORT`, records until
SIGTERM/SIGINT, then writes the JSON record (bytes in base64) to FILE and exits.
"""

from __future__ import annotations

import argparse
import base64
import json
import re
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import h11

from tests.netlab.listener import close_listener

HTTP_START = re.compile(rb"(GET|HEAD|POST|PUT|DELETE|OPTIONS|PATCH) /")
READ_SIZE = 65536


@dataclass
class ConnRecord:
    client: str  # "addr:port" as the server saw it
    data: bytearray = field(default_factory=bytearray)
    end: str = "open"  # "eof", "reset" or still "open" when the recorder stopped
    http: bool = False
    requests: list[str] = field(default_factory=list)  # "METHOD target" of each HTTP request answered

    def to_json(self) -> dict[str, Any]:
        return {"client": self.client, "data": base64.b64encode(bytes(self.data)).decode(), "end": self.end,
                "http": self.http, "requests": self.requests}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ConnRecord:
        return cls(d["client"], bytearray(base64.b64decode(d["data"])), d["end"], d["http"], list(d["requests"]))


class _Http:
    """Feeds a copy of the connection's bytes to h11 and answers each request."""

    def __init__(self, sock: socket.socket, rec: ConnRecord) -> None:
        self.sock, self.rec = sock, rec
        self.conn = h11.Connection(h11.SERVER)
        self.body = 0
        self.target = ""

    def feed(self, data: bytes) -> bool:
        """False once the bytes stop being HTTP or the connection must close: go on as a plain reader."""
        self.conn.receive_data(data)
        for _ in range(100_000):  # bounded: each turn consumes an event
            if self.conn.they_are_waiting_for_100_continue:
                self._send(h11.InformationalResponse(status_code=100, headers=[]))
            ev = self.conn.next_event()
            if ev is h11.NEED_DATA:
                return True
            if ev is h11.PAUSED:
                if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
                    self.conn.start_next_cycle()
                    continue
                return self.conn.our_state is not h11.MUST_CLOSE
            if isinstance(ev, h11.Request):
                self.target = f"{ev.method.decode()} {ev.target.decode(errors='replace')}"
                self.body = 0
            elif isinstance(ev, h11.Data):
                self.body += len(ev.data)
            elif isinstance(ev, h11.EndOfMessage):
                self._answer()
                if self.conn.our_state is h11.MUST_CLOSE:
                    return False
            elif isinstance(ev, h11.ConnectionClosed):
                return False
        return True

    def _answer(self) -> None:
        self.rec.requests.append(self.target)
        reply = f"ok {self.target} body={self.body}\n".encode()
        headers = [("content-type", "text/plain"), ("content-length", str(len(reply)))]
        self._send(h11.Response(status_code=200, headers=headers))
        self._send(h11.Data(data=reply))
        self._send(h11.EndOfMessage())

    def _send(self, ev: h11.Event) -> None:
        out = self.conn.send(ev)
        if out:
            self.sock.sendall(out)


class Recorder:
    def __init__(self, host: str = "127.0.0.1", port: int = 0, http: bool = True) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            self.sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # "::" takes IPv4 too
        self.sock.bind((host, port))
        self.sock.listen(1024)
        self.port: int = self.sock.getsockname()[1]
        self.http = http
        self.records: list[ConnRecord] = []
        self.lock = threading.Lock()
        self.threads: list[threading.Thread] = []
        self.accepter = threading.Thread(target=self._accept, daemon=True)
        self.closing = False

    def start(self) -> Recorder:
        self.accepter.start()
        return self

    def _accept(self) -> None:
        while not self.closing:
            try:
                conn, addr = self.sock.accept()
            except OSError:
                return
            host = addr[0].removeprefix("::ffff:")
            rec = ConnRecord(f"[{host}]:{addr[1]}" if ":" in host else f"{host}:{addr[1]}")
            with self.lock:
                self.records.append(rec)
            t = threading.Thread(target=self._serve, args=(conn, rec), daemon=True)
            self.threads.append(t)
            t.start()

    def _serve(self, conn: socket.socket, rec: ConnRecord) -> None:
        http: _Http | None = None
        undecided = self.http
        try:
            while True:
                try:
                    data = conn.recv(READ_SIZE)
                except ConnectionResetError:
                    rec.end = "reset"
                    return
                if not data:
                    rec.end = "eof"
                    if http is not None:
                        http.feed(b"")
                    return
                rec.data += data
                if undecided and len(rec.data) >= 8:
                    undecided = False
                    if HTTP_START.match(rec.data):
                        rec.http = True
                        http = _Http(conn, rec)
                        data = bytes(rec.data)
                if http is not None:
                    try:
                        if not http.feed(data):
                            http = None
                    except (h11.RemoteProtocolError, h11.LocalProtocolError):
                        http = None  # not (or no longer) HTTP: keep recording what arrives
                    except OSError:
                        http = None  # the peer stopped reading answers; its bytes still count
        finally:
            conn.close()

    def open_count(self) -> int:
        with self.lock:
            return sum(1 for r in self.records if r.end == "open")

    def wait_idle(self, expected: int = 0, timeout: float = 10.0) -> bool:
        """Until at least `expected` connections arrived and none is still open; bounded by `timeout`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if len(self.records) >= expected and all(r.end != "open" for r in self.records):
                    return True
            time.sleep(0.02)
        return False

    def stop(self, grace: float = 5.0) -> list[ConnRecord]:
        self.wait_idle(0, grace)
        self.closing = True
        close_listener(self.sock, self.accepter if self.accepter.is_alive() else None)
        with self.lock:
            return list(self.records)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--host", default="::")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--out", required=True)
    p.add_argument("--raw", action="store_true", help="never answer HTTP: read and discard")
    p.add_argument("--max-seconds", type=float, default=600.0)
    p.add_argument("--grace", type=float, default=5.0)
    a = p.parse_args(argv)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    rec = Recorder(a.host, a.port, http=not a.raw).start()
    print(f"listening {rec.port}", flush=True)
    stop.wait(a.max_seconds)
    records = rec.stop(a.grace)
    with open(a.out, "w") as f:
        json.dump([r.to_json() for r in records], f)
    print("stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
