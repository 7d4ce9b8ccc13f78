"""Micro-benchmark of FlowTable.feed on its hot path: in-order 1448-byte segments over 1000 interleaved flows.

Run: .venv/bin/python tests/bench/reassemble_bench.py [--segments N] [--acks]
Prints segments/s; never part of the test suite (timings are not asserted anywhere).
"""

from __future__ import annotations

import argparse
import time

from kubectl_mirror.model import ACK, PSH, SYN, Endpoint, Segment
from kubectl_mirror.reassemble import FlowConfig, FlowTable

MSS = 1448
MASK = 0xFFFFFFFF


def build(flows: int, segments: int, acks: bool) -> tuple[list[Segment], list[Segment]]:
    """SYNs, then round-robin data segments (and, with acks, one server ACK after each)."""
    server = Endpoint("10.0.0.2", 8080)
    clients = [Endpoint(f"10.1.{i >> 8}.{i & 255}", 30000 + i) for i in range(flows)]
    isns = [(i * 2654435761) & MASK for i in range(flows)]
    syns = [Segment(0.0, c, server, isn, 0, SYN, b"") for c, isn in zip(clients, isns, strict=True)]
    payload = bytes(MSS)
    stream: list[Segment] = []
    for k in range(segments // flows):
        ts = k * 0.001
        for c, isn in zip(clients, isns, strict=True):
            seq = (isn + 1 + k * MSS) & MASK
            stream.append(Segment(ts, c, server, seq, 1, ACK | PSH, payload))
            if acks:
                stream.append(Segment(ts, server, c, 1, (seq + MSS) & MASK, ACK, b""))
    return syns, stream


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--flows", type=int, default=1000)
    ap.add_argument("--segments", type=int, default=1_000_000)
    ap.add_argument("--acks", action="store_true", help="interleave a server ACK after every data segment")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    syns, stream = build(args.flows, args.segments, args.acks)
    best = 0.0
    for _ in range(args.rounds):
        table = FlowTable(FlowConfig())
        for s in syns:
            table.feed(s)
        feed = table.feed
        sent = 0
        t0 = time.perf_counter()
        for s in stream:
            sent += len(feed(s))
        elapsed = time.perf_counter() - t0
        assert sent == args.segments // args.flows * args.flows, sent  # every data segment became one Send
        best = max(best, len(stream) / elapsed)
    what = "segments (data + ACK)" if args.acks else "data segments"
    print(f"{best:,.0f} {what}/s fed over {args.flows} interleaved flows ({len(stream):,} per round, best of "
          f"{args.rounds}); {best * MSS / (1 << 20) / (2 if args.acks else 1):,.0f} MiB/s of payload")


if __name__ == "__main__":
    main()
