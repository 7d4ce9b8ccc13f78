"""A real TLS server (Python ssl) that also records the raw bytes each connection sent it.

Three uses in the tests:
- the "pod"'s own TLS server: terminates TLS and answers each HTTP/1.x request (ground truth: the raw bytes);
- a local TLS server for `--tls-passthrough`: the same, so the mirrored ClientHello meets a real handshake;
- a mesh sidecar: terminates TLS and forwards the plaintext to the app over loopback from a chosen source
  address (127.0.0.6, as Istio's proxy does), relaying the app's answers back.

TLS runs over memory BIOs, so every byte the client sent is recorded exactly as it came off the socket.
`python -m tests.netlab.tlsterm --port P --cert CHAIN --out FILE [--forward HOST:PORT --source ADDR]`: prints
`listening PORT`, serves until SIGTERM/SIGINT, then writes the records (base64) as JSON to FILE.
"""

from __future__ import annotations

import argparse
import base64
import json
import signal
import socket
import ssl
import sys
import threading
from dataclasses import dataclass, field
from typing import Any

from tests.netlab.listener import close_listener

READ_SIZE = 65536
ANSWER = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 3\r\n\r\nok\n"


@dataclass
class TlsRecord:
    client: str
    raw: bytearray = field(default_factory=bytearray)  # what came off the socket: the TLS records
    plain: bytearray = field(default_factory=bytearray)  # what TLS decrypted
    handshake: bool = False  # the TLS handshake completed

    def to_json(self) -> dict[str, Any]:
        return {"client": self.client, "raw": base64.b64encode(bytes(self.raw)).decode(),
                "plain": base64.b64encode(bytes(self.plain)).decode(), "handshake": self.handshake}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> TlsRecord:
        return cls(d["client"], bytearray(base64.b64decode(d["raw"])), bytearray(base64.b64decode(d["plain"])),
                   bool(d["handshake"]))


class TlsServer:
    def __init__(self, cert_chain: str, host: str = "0.0.0.0", port: int = 0,
                 forward: tuple[str, int] | None = None, source: str | None = None) -> None:
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(cert_chain)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.sock.listen(256)
        self.port: int = self.sock.getsockname()[1]
        self.forward, self.source = forward, source
        self.records: list[TlsRecord] = []
        self.lock = threading.Lock()
        self.accepter = threading.Thread(target=self._accept, daemon=True)

    def start(self) -> TlsServer:
        self.accepter.start()
        return self

    def stop(self) -> list[TlsRecord]:
        close_listener(self.sock, self.accepter)
        with self.lock:
            return list(self.records)

    def _accept(self) -> None:
        while True:
            try:
                conn, addr = self.sock.accept()
            except OSError:
                return
            rec = TlsRecord(f"{addr[0]}:{addr[1]}")
            with self.lock:
                self.records.append(rec)
            threading.Thread(target=self._serve, args=(conn, rec), daemon=True).start()

    def _serve(self, conn: socket.socket, rec: TlsRecord) -> None:
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = self.ctx.wrap_bio(incoming, outgoing, server_side=True)
        lock = threading.Lock()  # the SSLObject is shared with the upstream reader in forward mode
        upstream: socket.socket | None = None
        pending = b""  # answer mode: plaintext not yet cut into requests
        broken = False  # TLS failed (a replayed handshake does): keep recording raw bytes only

        def flush() -> None:
            out = outgoing.read()
            if out:
                conn.sendall(out)

        try:
            while True:
                try:
                    data = conn.recv(READ_SIZE)
                except OSError:
                    return
                if not data:
                    return
                rec.raw += data
                if broken:
                    continue
                with lock:
                    incoming.write(data)
                    plain = b""
                    try:
                        if not rec.handshake:
                            tls.do_handshake()
                            rec.handshake = True
                        while True:
                            try:
                                chunk = tls.read(READ_SIZE)
                            except ssl.SSLWantReadError:
                                break
                            if not chunk:
                                break
                            plain += chunk
                    except ssl.SSLWantReadError:
                        pass
                    except (ssl.SSLError, ssl.SSLZeroReturnError):
                        broken = True
                    try:
                        flush()
                    except OSError:
                        return
                if not plain:
                    continue
                rec.plain += plain
                if self.forward is not None:
                    if upstream is None:
                        upstream = self._connect_upstream()
                        threading.Thread(target=self._relay, args=(upstream, tls, lock, flush), daemon=True).start()
                    upstream.sendall(plain)
                else:
                    pending += plain
                    while b"\r\n\r\n" in pending:  # GETs without bodies: what the tests' clients send
                        _, pending = pending.split(b"\r\n\r\n", 1)
                        with lock:
                            tls.write(ANSWER)
                            flush()
        finally:
            if upstream is not None:
                try:
                    upstream.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
            conn.close()

    def _connect_upstream(self) -> socket.socket:
        assert self.forward is not None
        up = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if self.source is not None:
            up.bind((self.source, 0))
        up.connect(self.forward)
        return up

    @staticmethod
    def _relay(up: socket.socket, tls: ssl.SSLObject, lock: threading.Lock, flush: Any) -> None:
        try:
            while True:
                data = up.recv(READ_SIZE)
                if not data:
                    return
                with lock:
                    tls.write(data)
                    flush()
        except OSError:
            return
        finally:
            up.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--cert", required=True, help="PEM with the key and the certificate chain")
    p.add_argument("--out", required=True)
    p.add_argument("--forward", help="HOST:PORT to forward the plaintext to")
    p.add_argument("--source", help="source address of the forwarded connections")
    p.add_argument("--max-seconds", type=float, default=300.0)
    args = p.parse_args(argv)
    forward = None
    if args.forward:
        host, _, port = args.forward.rpartition(":")
        forward = (host, int(port))
    server = TlsServer(args.cert, port=args.port, forward=forward, source=args.source).start()
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    print(f"listening {server.port}", flush=True)
    done.wait(args.max_seconds)
    records = server.stop()
    with open(args.out, "w") as f:
        json.dump([r.to_json() for r in records], f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
