"""A small HTTP/2 cleartext server on the `h2` state machine: prior knowledge and the HTTP/1.1 `Upgrade: h2c`.

nghttpd (the tests' other HTTP/2 server) speaks prior knowledge only; curl's `--http2` on an http:// URL asks for
the upgrade, which this server grants with 101. Every request is answered `200` with a JSON body naming the method,
the path, the request body's size and `--variant` (so a comparison can see two servers differ), and it records
what it served: `python -m tests.netlab.h2server --port P [--variant V]` prints `listening PORT`, serves until
SIGTERM, then prints `{"requests": ["METHOD PATH SIZE", ...]}`.
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import sys
import threading

import h2.config
import h2.connection
import h2.events

READ = 65536


class Served:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: list[str] = []

    def add(self, line: str) -> None:
        with self.lock:
            self.requests.append(line)


def _read_upgrade(sock: socket.socket, first: bytes) -> tuple[bytes, bytes, bytes, bytes] | None:
    """An HTTP/1.1 request asking for h2c: (method, path, HTTP2-Settings, the bytes after its head); else None."""
    data = first
    for _ in range(1000):
        if b"\r\n\r\n" in data:
            break
        more = sock.recv(READ)
        if not more:
            return None
        data += more
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    method, path, _ = lines[0].split(b" ", 2)
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(b":") for line in lines[1:])}
    if headers.get(b"upgrade", b"").lower() != b"h2c" or b"http2-settings" not in headers:
        return None
    return method, path, headers[b"http2-settings"], rest


def serve_conn(sock: socket.socket, variant: str, served: Served) -> None:
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding="utf-8"))
    requests: dict[int, list[str]] = {}  # stream -> [method, path]
    sizes: dict[int, int] = {}
    first = sock.recv(READ)
    if not first.startswith(b"PRI * HTTP/2.0"):
        upgrade = _read_upgrade(sock, first)
        if upgrade is None:
            sock.close()
            return
        method, path, settings, first = upgrade
        sock.sendall(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n")
        conn.initiate_upgrade_connection(settings)
        requests[1], sizes[1] = [method.decode(), path.decode()], 0
        _answer(conn, 1, requests, sizes, variant, served)
    else:
        conn.initiate_connection()
    sock.sendall(conn.data_to_send())
    data = first or sock.recv(READ)  # after a 101 the client's preface comes in its own time
    for _ in range(10_000_000):  # bounded: each turn reads a chunk, the connection ends long before
        if not data:
            break
        for ev in conn.receive_data(data):
            if isinstance(ev, h2.events.RequestReceived):
                hdrs = {_text(k): _text(v) for k, v in ev.headers or []}
                requests[ev.stream_id] = [hdrs.get(":method", ""), hdrs.get(":path", "")]
                sizes[ev.stream_id] = 0
            elif isinstance(ev, h2.events.DataReceived):
                sizes[ev.stream_id] = sizes.get(ev.stream_id, 0) + len(ev.data)
                conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif isinstance(ev, h2.events.StreamEnded) and ev.stream_id in requests:
                _answer(conn, ev.stream_id, requests, sizes, variant, served)
            elif isinstance(ev, h2.events.ConnectionTerminated):
                sock.sendall(conn.data_to_send())
                sock.close()
                return
        sock.sendall(conn.data_to_send())
        data = sock.recv(READ)
    sock.close()


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _answer(conn: h2.connection.H2Connection, stream: int, requests: dict[int, list[str]], sizes: dict[int, int],
            variant: str, served: Served) -> None:
    method, path = requests.pop(stream)
    size = sizes.pop(stream, 0)
    served.add(f"{method} {path} {size}")
    body = json.dumps({"method": method, "path": path, "size": size, "variant": variant}).encode()
    conn.send_headers(stream, [(":status", "200"), ("content-type", "application/json"),
                               ("content-length", str(len(body))), ("x-variant", variant)])
    conn.send_data(stream, body, end_stream=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--variant", default="a")
    a = p.parse_args(argv)
    served = Served()
    listener = socket.create_server((a.host, a.port), reuse_port=False)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())

    def accept() -> None:
        while not stop.is_set():
            try:
                sock, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=serve_conn, args=(sock, a.variant, served), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    print(f"listening {listener.getsockname()[1]}", flush=True)
    stop.wait(300)
    listener.close()
    print(json.dumps({"requests": served.requests}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
