"""Turn-taking for `make bench`: the HTTP bench's keep-alive capture replayed into a slow Node.js server.

The capture (tests/bench/http_bench.py: 40 connections, 1,000 requests each, pipelined ten at a time) goes to a
stock Node.js `http.createServer` whose handler takes 20 ms, with turn-taking (the default): each connection's
next ten requests wait for the answers to the previous ten. The figure is the wall time, with how many requests
Node answered and abandoned; at --no-wait Node would abandon most (the mirror's FIN overtakes the work).
"""

from __future__ import annotations

import json
import signal
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
NODE = "/usr/bin/node"
DELAY_MS = 20


@dataclass
class TurnBench:
    path: Path
    wall: float
    counts: dict[str, int]  # Node's own: requests, answered, abandoned
    turns: dict[str, Any]  # the summary's turns


def measure(path: Path, runs: int, timed: Callable[..., Any], cli: Path, log: Callable[[str], None]) -> TurnBench:
    best: TurnBench | None = None
    for i in range(runs):
        log(f"turns run {i + 1}/{runs}: keep-alive capture into Node ({DELAY_MS} ms handler) ...")
        node = subprocess.Popen([NODE, str(REPO / "tests/servers/slow_http.js"), "0", str(DELAY_MS)],
                                stdout=subprocess.PIPE, text=True)
        try:
            assert node.stdout is not None
            port = int(node.stdout.readline().split()[1])
            r = timed([str(cli), "replay", str(path), "--to", f"127.0.0.1:{port}", "--json", "-q"], 900, capture=True)
        finally:
            node.send_signal(signal.SIGTERM)
            out, _ = node.communicate(timeout=30)
        if r.returncode != 0:
            raise SystemExit(f"replay into Node failed ({r.returncode}): {r.stderr[-2000:]}")
        result = TurnBench(path, r.wall, dict(json.loads(out.strip().splitlines()[-1])),
                           dict(json.loads(r.stdout)["turns"]))
        if best is None or result.wall < best.wall:
            best = result
    assert best is not None
    return best


def report(b: TurnBench, repo: Path) -> None:
    c, t = b.counts, b.turns
    print(f"\nTurn-taking: {b.path.relative_to(repo)} replayed into Node.js ({DELAY_MS} ms handler), best of the runs")
    print(f"  wall {b.wall:.2f} s; Node answered {c['answered']:,} of {c['requests']:,} requests, abandoned "
          f"{c['abandoned']:,}; turns {t['answered']:,} answered, {t['unanswered']:,} unanswered")
    if t.get("local_p99_ms") is not None:
        print(f"  answer time: local p50 {t['local_p50_ms']:.1f} ms, p99 {t['local_p99_ms']:.1f} ms; production p50 "
              f"{t['production_p50_ms']:.1f} ms, p99 {t['production_p99_ms']:.1f} ms")
