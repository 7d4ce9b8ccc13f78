"""Bytes -> a script of segments, ticks, give-ups and interrupts for a FlowTable, and the checks every run must pass.

Shared by tests/test_fuzz_sequencer.py (hypothesis) and tests/fuzz/fuzz_sequencer.py (atheris), so both search the
same space and hold the table to the same invariants. Payload bytes are a fixed function of (direction, sequence
number), the way TCP retransmissions repeat the same bytes; so whatever the table delivers can be checked against
what the "stream" holds at those sequence numbers, whatever the order, overlap or flags of the segments.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kubectl_mirror.model import ACK, RST, SYN, Abort, Action, Close, Endpoint, Open, Segment, Send
from kubectl_mirror.reassemble import FlowConfig, FlowTable

MASK = 0xFFFFFFFF
ENDPOINTS = [
    Endpoint("10.0.0.1", 40000),
    Endpoint("10.0.0.1", 40001),
    Endpoint("10.0.0.2", 8080),
    Endpoint("10.0.0.3", 8080),
    Endpoint("fd00::1", 50000),
    Endpoint("fd00::2", 443),
]


def stream_byte(src: Endpoint, dst: Endpoint, seq: int) -> int:
    """The byte at sequence number `seq` of the src->dst stream (any fixed mixing will do)."""
    x = (seq & MASK) * 2654435761 + src.port * 40503 + dst.port
    return (x >> 13) & 0xFF


def stream_bytes(src: Endpoint, dst: Endpoint, seq: int, n: int) -> bytes:
    return bytes(stream_byte(src, dst, seq + i) for i in range(n))


@dataclass
class Feed:
    seg: Segment


@dataclass
class Tick:
    now: float


@dataclass
class GiveUp:
    nth: int  # index into the flows opened so far


@dataclass
class Interrupt:
    now: float
    servers: list[str] | None


Op = Feed | Tick | GiveUp | Interrupt


class _Bytes:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def more(self) -> bool:
        return self.pos < len(self.data)

    def u8(self) -> int:
        b = self.data[self.pos] if self.pos < len(self.data) else 0
        self.pos += 1
        return b

    def u32(self) -> int:
        return self.u8() | self.u8() << 8 | self.u8() << 16 | self.u8() << 24


def decode(data: bytes, max_ops: int = 400) -> tuple[FlowConfig, list[Op]]:
    """Any bytes are a valid script: the fuzzer's mutations always reach the table."""
    r = _Bytes(data)
    c = r.u8()
    cfg = FlowConfig(
        server_port=[None, 8080, 443, 40000][c & 3],
        skip_partial=bool(c & 4),
        hole_timeout=[0.5, 2.0, 1000.0, 0.0][(c >> 3) & 3],
        idle_timeout=[300.0, 3.0, 0.0, -1.0][(c >> 5) & 3],
    )
    d = r.u8()
    cfg.max_ooo_bytes = [8 << 20, 64, 16, 0][d & 3]
    cfg.max_tombstones = [65536, 0, 1, 2][(d >> 2) & 3]
    cfg.tombstone_ttl = [120.0, 0.5, 0.0, 5.0][(d >> 4) & 3]
    # ISNs near the 32-bit wrap unless the byte says otherwise: wrap-around bugs hide there
    isn_base = (0xFFFFFF00 + r.u8() * 0x01000193) & MASK if d & 0x40 else r.u32()
    ops: list[Op] = []
    follow: dict[tuple[Endpoint, Endpoint], int] = {}  # where each direction's last segment ended
    ts = 1000.0
    while r.more() and len(ops) < max_ops:
        kind = r.u8()
        if kind < 0xE0:
            src = ENDPOINTS[kind % len(ENDPOINTS)]
            dst = ENDPOINTS[(kind // len(ENDPOINTS)) % len(ENDPOINTS)]
            flags = r.u8() if kind & 1 else [ACK, ACK | 0x08, SYN, SYN | ACK, ACK | 0x01, RST, 0x01, 0x18][r.u8() & 7]
            isn = (isn_base + src.port * 7919 + dst.port) & MASK
            how = r.u8()
            if how < 0x80 and (src, dst) in follow:  # right after (or about) the last segment: in-order runs
                seq = (follow[(src, dst)] + [0, 0, 0, 0, 0, -1, 1, -8, 8, -40, 40, 0, 0, 0, 2, -2][how & 15]) & MASK
            else:  # near the direction's ISN, so segments of one connection meet; now and then anywhere
                seq = (isn + (how | (r.u8() & 1) << 8) - 8) & MASK if how < 0xF0 else r.u32()
            a = r.u8()
            ack = (isn_base + dst.port * 7919 + src.port + a - 4) & MASK if a < 0xF0 else r.u32()
            n = r.u8() % 48
            whole = bool(r.u8() & 0x0F)  # cut by the snap length now and then
            step = r.u8()
            ts += 0.0 if step < 0x40 else 0.001 if step < 0xF0 else (step - 0xF0) * 0.7  # sometimes seconds jump
            start = (seq + 1) & MASK if flags & SYN else seq  # data on a SYN starts after the SYN's number
            payload = stream_bytes(src, dst, start, n)
            if not whole:
                payload = payload[: r.u8() % (n + 1)]
            ops.append(Feed(Segment(ts, src, dst, seq, ack, flags, payload, whole)))
            follow[(src, dst)] = (start + n) & MASK
        elif kind < 0xF0:
            ops.append(Tick(ts + (kind - 0xE0) * 0.4))
        elif kind < 0xFA:
            ops.append(GiveUp(r.u8()))
        else:
            ops.append(Interrupt(ts, None if kind & 1 else [ENDPOINTS[r.u8() % len(ENDPOINTS)].host]))
    return cfg, ops


@dataclass
class _FlowLog:
    client: Endpoint
    server: Endpoint
    data: bytearray = field(default_factory=bytearray)
    end: Action | None = None
    given_up: bool = False


def run(cfg: FlowConfig, ops: list[Op]) -> None:
    """Run the script and check the table's invariants; raises AssertionError (or the table's bug) on a violation."""
    table = FlowTable(cfg)
    flows: dict[int, _FlowLog] = {}
    opened: list[int] = []
    starts: dict[tuple[Endpoint, Endpoint], set[int]] = {}  # where a client stream may legitimately begin

    def apply(actions: list[Action]) -> None:
        for a in actions:
            if isinstance(a, Open):
                assert a.flow not in flows, f"flow {a.flow} opened twice"
                flows[a.flow] = _FlowLog(a.client, a.server)
                opened.append(a.flow)
                continue
            log = flows.get(a.flow)
            assert log is not None, f"{a} for a flow never opened"
            assert log.end is None, f"{a} after the flow ended with {log.end}"
            assert not log.given_up, f"{a} after give_up"
            if isinstance(a, Send):
                assert a.data, "empty Send"
                log.data += a.data
            else:
                assert isinstance(a, Close | Abort)
                log.end = a

    for op in ops:
        if isinstance(op, Feed):
            seg = op.seg
            base = (seg.seq + 1) & MASK if seg.flags & SYN else seg.seq
            starts.setdefault((seg.src, seg.dst), set()).add(base)
            if seg.flags & SYN and seg.flags & ACK:  # the client's stream starts at the SYN+ACK's ack
                starts.setdefault((seg.dst, seg.src), set()).add(seg.ack)
            apply(table.feed(seg))
        elif isinstance(op, Tick):
            apply(table.tick(op.now))
        elif isinstance(op, GiveUp):
            if opened:
                fid = opened[op.nth % len(opened)]
                log = flows[fid]
                if log.end is None:
                    log.given_up = True
                table.give_up(fid)
        else:
            apply(table.interrupt(op.now, op.servers))
    apply(table.finish())

    for fid, log in flows.items():
        assert log.end is not None or log.given_up, f"flow {fid} never ended"
        if log.data:
            # the bytes delivered are the client's stream from one of the places it can start, never others
            cands = starts.get((log.client, log.server), set())
            got = bytes(log.data)
            assert any(stream_bytes(log.client, log.server, s, len(got)) == got for s in cands), (
                f"flow {fid} delivered bytes that are not its stream"
            )
    assert table.open_flows == 0
    left = table.tracking()
    assert not left.flows and not left.index and not left.holes and not left.tombstones, "memory left after finish"
    records = table.pop_finished()
    assert len(records) == table.stats.flows == len({r.flow for r in records}), "one record per flow"
    for rec in records:
        seen = flows.get(rec.flow)
        if seen is not None:
            assert rec.bytes_delivered == len(seen.data)
