"""Real HTTP/2 captures for the HTTP/2 and gRPC tests, made in network namespaces (tcpdump on the "pod" side).

Each scenario runs a real server in the pod namespace and real clients in the other one:

* `h2load`: nghttpd and h2load, 400 requests over 2 connections, 100 streams at a time, on /a and /b.
* `curl`: tests/netlab/h2server.py and `curl --http2-prior-knowledge`: a GET, then a 10 MB POST on another
  connection (flow control: the body is far beyond the 64 KiB initial windows). curl 7.88 fails with "Error in
  the HTTP2 framing layer" when given two URLs for one connection, so each curl makes one request.
* `upgrade`: the same server (nghttpd has no h2c upgrade) and `curl --http2`: HTTP/1.1 `Upgrade: h2c`, answered
  101.
* `declined`: a stock Node.js HTTP server (tests/netlab/node_counter.js), which declines h2c: it answers curl's
  `Upgrade: h2c` with 200, and curl goes on in HTTP/1.1 on the same connection (three requests).
* `grpc`: the grpcio peer: 301 unary calls, 100 at a time, each with its own 120-byte metadata value (the HPACK
  dynamic tables evict many times over), then one call of each streaming kind.
* `proto`: the grpcio peer's protobuf service (tests/netlab/protoitems.py): five calls of mirror.Items/Get, whose
  answers carry a timestamp.

`make(kind, root)` returns the pcap; the tests call it from module-scoped fixtures, so each is made once.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.netlab.capture import Capture
from tests.netlab.lab import REPO
from tests.netlab.netns import Link, veth_lab

PORT = 8080
BIG = 10_000_000  # the POST body of the `curl` scenario


def _docroot(root: Path) -> Path:
    www = root / "www"
    www.mkdir(exist_ok=True)
    (www / "a").write_bytes(b"hello from /a\n")
    (www / "b").write_bytes(bytes(range(256)) * 40)  # 10 KiB of binary
    return www


def _server(kind: str, root: Path) -> list[str]:
    if kind == "h2load":
        return ["nghttpd", "--no-tls", "-d", str(_docroot(root)), str(PORT)]
    if kind == "declined":
        return ["node", str(REPO / "tests/netlab/node_counter.js"), str(root / "declined.json"), str(PORT), "0.0.0.0"]
    if kind in ("curl", "upgrade"):
        return [sys.executable, "-m", "tests.netlab.h2server", "--port", str(PORT)]
    return [sys.executable, "-m", "tests.netlab.grpcpeer", "server", "--port", str(PORT)]


def _clients(kind: str, ip: str, root: Path) -> list[list[str]]:
    url = f"http://{ip}:{PORT}"
    if kind == "h2load":
        return [["h2load", "-n", "400", "-c", "2", "-m", "100", f"{url}/a", f"{url}/b"]]
    if kind == "curl":
        big = root / "big.bin"
        big.write_bytes(b"z" * BIG)
        return [["curl", "-sS", "-o", "/dev/null", "--http2-prior-knowledge", f"{url}/a"],
                ["curl", "-sS", "-o", "/dev/null", "--http2-prior-knowledge", "--data-binary", f"@{big}", f"{url}/big"]]
    if kind == "upgrade":
        return [["curl", "-sS", "-o", "/dev/null", "--http2", f"{url}/up"]]
    if kind == "declined":
        return [["curl", "-sS", "-o", "/dev/null", "-o", "/dev/null", "-o", "/dev/null", "--http2", f"{url}/one",
                 f"{url}/two", f"{url}/three"]]
    if kind == "proto":
        return [[sys.executable, "-m", "tests.netlab.grpcpeer", "client", "--proto", "--host", ip, "--port", str(PORT)]]
    return [[sys.executable, "-m", "tests.netlab.grpcpeer", "client", "--metadata", "--host", ip, "--port", str(PORT)]]


def _wait_listening(link: Link, deadline: float) -> None:
    while time.monotonic() < deadline:
        out = link.server.run(["ss", "-Hltn", f"sport = :{PORT}"], check=False).stdout
        if out.strip():
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {PORT} in the pod namespace")


def _once(link: Link, kind: str, root: Path, pcap: Path) -> bool:
    server = subprocess.Popen(link.server.argv(_server(kind, root)), cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    failed: list[object] = []
    try:
        _wait_listening(link, time.monotonic() + 15)
        with Capture(link.server, link.server_if, pcap, bpf=f"tcp port {PORT}") as cap:
            for argv in _clients(kind, link.server_ip4, root):
                out = subprocess.run(link.client.argv(argv), cwd=REPO, capture_output=True, text=True, timeout=120,
                                     check=False)
                if out.returncode != 0:
                    failed = [argv, out.stdout, out.stderr]
                    break
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            _, err = server.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            _, err = server.communicate(timeout=5)
    assert not failed, (*failed, err)
    return cap.dropped() == 0


def make(kind: str, root: Path, attempts: int = 3) -> Path:
    """A capture of scenario `kind` under `root` (made anew; a capture with dropped packets is made again)."""
    pcap = root / f"{kind}.pcap"
    with veth_lab() as link:
        for _ in range(attempts):
            if _once(link, kind, root, pcap):
                return pcap
    pytest.fail(f"tcpdump dropped packets in {attempts} captures of {kind} in a row")


def cut_head(pcap: Path, frames: int, out: Path) -> Path:
    """The capture without its first `frames` frames: every connection in it is joined mid-stream."""
    subprocess.run(["editcap", "-r", str(pcap), str(out), f"{frames + 1}-{1 << 30}"], check=True, capture_output=True,
                   timeout=60)
    return out


def flows(pcap: Path, port: int = PORT) -> list[tuple[bool, list[tuple[bool, bytes, float]]]]:
    """Each connection of a capture, through the real tshark and the flow table: (joined mid-stream, its bytes in
    capture order as (from the client, bytes, time))."""
    from kubectl_mirror.dissect import Dissector, find_tshark
    from kubectl_mirror.model import Open, Reply, Send
    from kubectl_mirror.reassemble import FlowConfig, FlowTable

    table = FlowTable(FlowConfig(server_port=port, server_stream=True))
    out: dict[int, tuple[bool, list[tuple[bool, bytes, float]]]] = {}
    with open(pcap, "rb") as stream, Dissector(stream, find_tshark(None)) as d:
        actions = [a for seg in d.iter_segments() for a in table.feed(seg)] + table.finish()
    for a in actions:
        if isinstance(a, Open):
            out[a.flow] = (a.partial, [])
        elif isinstance(a, (Send, Reply)):
            out[a.flow][1].append((isinstance(a, Send), a.data, a.ts))
    return [out[f] for f in sorted(out)]
