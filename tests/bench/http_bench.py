"""HTTP mode's throughput for `make bench`: requests/s with --http, and its wall time against byte mode.

One real capture of many small keep-alive HTTP/1.1 requests (pipelined ten at a time, as a busy API gets them) is
made once in a veth namespace pair and cached beside the other captures; both modes then replay that same file
to the same discard server, interleaved, best run kept (wall time on a shared machine is noisy).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.netlab.capture import Capture
from tests.netlab.netns import veth_lab

REPO = Path(__file__).resolve().parents[2]
HTTP_GEN_VERSION = "1"
CONNS, REQUESTS = 40, 1000  # 40,000 requests
PORT = 8080


@dataclass
class HttpBench:
    path: Path
    requests: int
    bytes_wall: float
    http_wall: float
    http_summary: dict[str, Any]

    @property
    def rps(self) -> float:
        return self.requests / self.http_wall

    @property
    def ratio(self) -> float:
        """HTTP mode's wall time over byte mode's on the same capture: the price of parsing every request."""
        return self.http_wall / self.bytes_wall


def ensure_http_capture(cache: Path, regenerate: bool, log: Callable[[str], None]) -> Path:
    path = cache / f"http-v{HTTP_GEN_VERSION}.pcap"
    if path.exists() and not regenerate:
        return path
    cache.mkdir(parents=True, exist_ok=True)
    part = path.with_suffix(".part")
    for attempt in range(1, 4):
        log(f"generating {path.name} (attempt {attempt}) ...")
        with veth_lab() as link:
            out_json = cache / "http-prod.json"
            server = subprocess.Popen(link.server.argv([sys.executable, "-m", "tests.http_target", "--role", "prod",
                                                        "--port", str(PORT), "--out", str(out_json)]), cwd=REPO,
                                      stdout=subprocess.PIPE, text=True)
            try:
                assert server.stdout is not None
                if not server.stdout.readline().startswith("listening"):
                    raise SystemExit("http bench server did not start")
                with Capture(link.server, link.server_if, part, bpf=f"tcp port {PORT}") as cap:
                    run = link.client.run([sys.executable, "-m", "tests.http_target", "load", link.server_ip4,
                                           str(PORT), str(CONNS), str(REQUESTS)], timeout=600, check=False)
            finally:
                server.terminate()
                server.communicate(timeout=60)
                out_json.unlink(missing_ok=True)
        if run.returncode == 0 and cap.dropped() == 0:
            part.rename(path)
            return path
        log(f"  retrying: client rc {run.returncode}, tcpdump {cap.stderr[-2:]}")
    raise SystemExit("could not make a clean HTTP capture in 3 attempts")


def measure(path: Path, port: int, runs: int, timed: Callable[..., Any], cli: Path,
            log: Callable[[str], None]) -> HttpBench:
    bytes_walls: list[float] = []
    http_walls: list[float] = []
    summary: dict[str, Any] = {}
    for i in range(runs):
        for mode in ("bytes", "http"):
            log(f"http run {i + 1}/{runs}: {mode} mode ...")
            extra = ["--http"] if mode == "http" else []
            # --no-wait: the discard server never answers, and this measures throughput, not turn-taking.
            r = timed([str(cli), "replay", str(path), "--to", f"127.0.0.1:{port}", "--json", "-q", "--no-wait",
                       *extra], 600, capture=True)
            if r.returncode != 0:
                raise SystemExit(f"{mode}-mode replay failed ({r.returncode}): {r.stderr[-2000:]}")
            (http_walls if mode == "http" else bytes_walls).append(r.wall)
            if mode == "http":
                summary = json.loads(r.stdout.splitlines()[-1])
    requests = int(summary["http"]["requests"])
    if requests != CONNS * REQUESTS:
        log(f"warning: the capture holds {requests} requests, {CONNS * REQUESTS} were sent")
    return HttpBench(path, requests, min(bytes_walls), min(http_walls), summary)


def report(b: HttpBench, repo: Path) -> None:
    print(f"\nHTTP mode on {b.path.relative_to(repo)}: {b.requests:,} keep-alive requests (pipelined by 10) in "
          f"{CONNS} connections, replayed to the discard server, best of the runs")
    print(f"  byte mode {b.bytes_wall:.2f} s ({b.requests / b.bytes_wall:,.0f} requests/s carried); --http "
          f"{b.http_wall:.2f} s: {b.rps:,.0f} requests/s sustained")
    print(f"  --http / byte mode wall time = {b.ratio:.2f} (no target)")
