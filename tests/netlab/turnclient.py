"""Clients that take turns (or pipeline), run inside the client namespace for turn-taking captures.

`http`: each connection sends `--requests` HTTP/1.1 GETs one at a time, reading each whole response before the
next (1 request: a one-request connection). `pipeline`: all requests at once, then the responses. `line`: the
opaque `PING n` / `PONG n` protocol, one at a time. The end is a FIN, or with `--rst` a reset (SO_LINGER 0) after
the last answer, as connection pools and proxies do. Prints `{"errors": [...]}` and exits non-zero on any.
"""

from __future__ import annotations

import argparse
import json
import socket
import struct
import sys
import threading


def _request(i: int, j: int, host: str) -> bytes:
    return f"GET /c{i}/r{j} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: turnclient\r\n\r\n".encode()


def _one(a: argparse.Namespace, i: int, errors: list[str]) -> None:
    try:
        # create_connection resolves an IPv6 literal itself (getaddrinfo); it takes (host, port) for both families.
        sock = socket.create_connection((a.host, a.port), timeout=a.timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if a.mode == "line":
            buf = b""
            for j in range(a.requests):
                sock.sendall(b"PING %d-%d\n" % (i, j))
                while b"\n" not in buf:
                    data = sock.recv(4096)
                    if not data:
                        raise RuntimeError("server closed")
                    buf += data
                buf = buf[buf.index(b"\n") + 1 :]
        elif a.mode == "pipeline":
            sock.sendall(b"".join(_request(i, j, a.host) for j in range(a.requests)))
            _read_responses(sock, a.requests)
        else:
            for j in range(a.requests):
                sock.sendall(_request(i, j, a.host))
                _read_responses(sock, 1)
        if a.rst:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()
            return
        sock.shutdown(socket.SHUT_WR)
        while sock.recv(65536):
            pass
        sock.close()
    except Exception as exc:  # reported to the test, which fails on it
        errors.append(f"conn {i}: {exc!r}")


def _read_responses(sock: socket.socket, count: int) -> None:
    """Count whole responses of the fixed shape the test servers send (Content-Length framed)."""
    buf = b""
    done = 0
    while done < count:
        head_end = buf.find(b"\r\n\r\n")
        if head_end >= 0:
            head = buf[:head_end].lower()
            length = int(head.split(b"content-length:")[1].split(b"\r\n")[0])
            if len(buf) >= head_end + 4 + length:
                buf = buf[head_end + 4 + length :]
                done += 1
                continue
        data = sock.recv(65536)
        if not data:
            raise RuntimeError(f"server closed after {done} of {count} responses")
        buf += data


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("mode", choices=["http", "pipeline", "line"])
    p.add_argument("--host", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--conns", type=int, default=1)
    p.add_argument("--requests", type=int, default=1)
    p.add_argument("--rst", action="store_true")
    p.add_argument("--timeout", type=float, default=30.0)
    a = p.parse_args(argv)
    errors: list[str] = []
    threads = [threading.Thread(target=_one, args=(a, i, errors), daemon=True) for i in range(min(a.conns, 500))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(a.timeout)
    print(json.dumps({"errors": errors}), flush=True)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
