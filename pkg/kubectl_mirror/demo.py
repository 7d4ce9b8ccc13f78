"""`make demo`: replay the bundled sample capture to a small local server, no cluster needed.

The server prints what arrives on each mirrored connection; the replay runs through the real CLI.
"""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "samples" / "web.pcap"
CLI = REPO / "kubectl-mirror"
REQUEST_LINE = re.compile(rb"^[A-Z]{3,7} \S+ HTTP/1\.[01]$")
REPLAY_TIMEOUT = 120.0


class DemoServer:
    """Accepts connections on loopback and reports, per connection, its request lines and byte count."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.sock.getsockname()[1]
        self.lock = threading.Lock()
        self.count = 0
        self.threads: list[threading.Thread] = []

    def serve(self) -> None:
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with self.lock:
                self.count += 1
                number = self.count
            t = threading.Thread(target=self._read, args=(conn, number), daemon=True)
            self.threads.append(t)
            t.start()

    def _read(self, conn: socket.socket, number: int) -> None:
        data = bytearray()
        ended = "closed"
        conn.settimeout(30)
        with conn:
            while len(data) < 1 << 24:
                try:
                    chunk = conn.recv(65536)
                except (ConnectionResetError, TimeoutError):
                    ended = "reset"
                    break
                if not chunk:
                    break
                data += chunk
        lines = [ln.rstrip(b"\r") for ln in bytes(data).split(b"\n")]
        requests = [ln.decode("ascii", "replace") for ln in lines if REQUEST_LINE.match(ln)]
        first = requests or [repr(bytes(lines[0][:40]))[2:-1] if lines else ""]
        with self.lock:
            if number == 1 and not data:
                # kubectl mirror connects once before anything else, so a typo in --to fails fast.
                print("  [server] connection 1: reachability check from kubectl mirror (no data)", flush=True)
                return
            print(f"  [server] connection {number}: {len(data)} bytes, {ended}", flush=True)
            for line in first:
                print(f"  [server]   {line}", flush=True)

    def close(self) -> None:
        for t in self.threads:
            t.join(5)
        self.sock.close()


def main() -> int:
    if not SAMPLE.exists():
        print(f"error: the sample capture {SAMPLE} is missing", file=sys.stderr)
        return 1
    server = DemoServer()
    server.serve()
    print(f"Replaying {SAMPLE.relative_to(REPO)} to a demo server on 127.0.0.1:{server.port}", flush=True)
    print(f"$ kubectl mirror replay {SAMPLE.relative_to(REPO)} --to 127.0.0.1:{server.port}", flush=True)
    try:
        proc = subprocess.run([sys.executable, str(CLI), "replay", str(SAMPLE), "--to", f"127.0.0.1:{server.port}"],
                              capture_output=True, text=True, timeout=REPLAY_TIMEOUT, check=False,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        print(f"error: the replay did not finish within {REPLAY_TIMEOUT:.0f}s", file=sys.stderr)
        return 1
    finally:
        server.close()
    print("Summary:", flush=True)
    sys.stdout.write(proc.stdout)
    sys.stderr.write(proc.stderr)
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
