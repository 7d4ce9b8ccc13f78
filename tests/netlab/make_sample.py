"""Make samples/web.pcap: a small real capture for `make demo` (`python -m tests.netlab.make_sample OUT`).

Real curl keep-alive requests and a few raw TCP connections, captured with tcpdump on the server side of a
veth pair between two throwaway namespaces. Needs root.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from . import traffic
from .capture import Capture
from .lab import NsRecorder
from .netns import veth_lab

PORT = 8080


def make(out: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp, veth_lab() as link:
        server = NsRecorder(link.server, Path(tmp) / "server.json", PORT).start()
        base = f"http://{link.server_ip4}:{PORT}"
        try:
            with Capture(link.server, link.server_if, out):
                traffic.curl(link.client, [f"{base}/", f"{base}/api/items?page=1", f"{base}/static/app.js"])
                traffic.curl(link.client, [f"{base}/api/orders"], ["-H", "Content-Type: application/json",
                                                                   "--data", '{"item": 42, "quantity": 2}'])
                traffic.raw_conns(link.client, link.server_ip4, PORT, 3, 400, tag="sample", sequential=True)
        finally:
            server.stop()


if __name__ == "__main__":
    make(Path(sys.argv[1] if len(sys.argv) > 1 else "samples/web.pcap").resolve())
