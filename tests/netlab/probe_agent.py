"""Istio's probe rewrite, for real: an HTTP server on 15020 in the pod that answers the kubelet's rewritten probe by
asking the app itself, from 127.0.0.6 and with the kubelet's headers, as pilot-agent does.

`python -m tests.netlab.probe_agent --port 15020 --app HOST:PORT --path /app-health/web/readyz=/healthz`: prints
`listening PORT`, serves until SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import http.client
import signal
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

SOURCE = "127.0.0.6"  # pilot-agent's UpstreamLocalAddressIPv4
SKIP = {"host", "connection", "content-length"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, default=15020)
    p.add_argument("--app", required=True, help="HOST:PORT of the app")
    p.add_argument("--path", action="append", required=True, help="REWRITTEN=ORIGINAL probe path")
    p.add_argument("--max-seconds", type=float, default=300.0)
    args = p.parse_args(argv)
    host, _, port = args.app.rpartition(":")
    paths = dict(item.split("=", 1) for item in args.path)

    class Agent(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            original = paths.get(self.path)
            if original is None:
                self.send_error(400, "app prober config does not exist")
                return
            conn = http.client.HTTPConnection(host, int(port), timeout=10, source_address=(SOURCE, 0))
            try:
                # Forward the kubelet's headers to the app, as pilot-agent does.
                headers = {k: v for k, v in self.headers.items() if k.lower() not in SKIP}
                conn.request("GET", original, headers=headers)
                status = conn.getresponse().status
            except OSError:
                status = 500
            finally:
                conn.close()
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *a: object) -> None:
            pass

    server = ThreadingHTTPServer(("0.0.0.0", args.port), Agent)
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    threading.Thread(target=server.serve_forever, daemon=True).start()
    print(f"listening {server.server_address[1]}", flush=True)
    done.wait(args.max_seconds)
    server.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
