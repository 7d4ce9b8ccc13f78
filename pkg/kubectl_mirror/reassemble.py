"""Reassembly core: captured TCP segments in, replay actions out.

Pure logic in the style of a sans-I/O protocol layer: no sockets, no files, no clock reads. Time only comes
from segment timestamps and from `tick(now)`, so a script of segments always yields the same actions.

One `FlowTable` tracks every TCP connection of the capture. For each inbound (client->server) connection it
emits `Open`, then `Send`s carrying the client's bytes exactly once and in order, then one end action:
`Close` after a clean FIN, or `Abort` (RESET, HOLE, GAP). A flow is never handed bytes past a hole.

With `FlowConfig.server_stream` it also emits the server's bytes of each mirrored flow as `Reply` actions, with
the same guarantees. A hole there only stops that flow's Replies (FlowRecord.reply_complete); the client side
goes on exactly as without the option. A client FIN no longer ends the flow's tracking at once: the server
usually answers a half-closed connection, so its direction is followed alone (a "draining" flow) until it
finishes; the client's strays meanwhile meet the same tombstone as without the option.

Sequence numbers are raw 32-bit values on the wire; internally every flow also keeps an unbounded "stream
position" (bytes delivered so far) so the out-of-order buffer never has to think about wrap-around.
"""

from __future__ import annotations

import enum
from bisect import bisect_left, bisect_right, insort
from collections import OrderedDict
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from typing import Protocol, cast

from .h2frames import CapturedStreamEnds, is_server_start
from .model import (
    ACK,
    FIN,
    RST,
    SYN,
    Abort,
    AbortReason,
    Action,
    Close,
    DeliveryFailed,
    EndOfInput,
    Endpoint,
    EndReason,
    FlowRecord,
    Interrupt,
    Open,
    Outcome,
    Reply,
    Segment,
    Send,
    Tick,
    Turn,
)

_MASK = 0xFFFFFFFF
# How long a hole the server has already acknowledged may wait for its bytes: capture order across CPUs.
ACK_GRACE = 0.25
_HALF = 0x80000000
_WRAP = 0x100000000
_CTRL = SYN | FIN | RST
# Ports below this are "well known / registered"; ephemeral client ports are above it on every common OS.
_EPHEMERAL = 32768

Key = tuple[str, int, str, int]  # (src host, src port, dst host, dst port) of one direction


def _signed(delta: int) -> int:
    """A 32-bit sequence difference as a signed distance (serial number arithmetic, RFC 1982)."""
    delta &= _MASK
    return delta - _WRAP if delta >= _HALF else delta


@dataclass
class FlowConfig:
    server_port: int | None = None  # --port: inbound means "to this port"; None: learn it from the SYN
    skip_partial: bool = False  # connections joined mid-stream are tracked but never mirrored
    hole_timeout: float = 2.0  # capture seconds a gap may stay open without progress before HOLE
    idle_timeout: float = 300.0  # capture seconds without any segment before a flow is closed; <= 0: never
    max_ooo_bytes: int = 8 << 20  # out-of-order bytes buffered per flow before it is given up as HOLE
    tombstone_ttl: float = 120.0  # how long an ended connection still absorbs its stray segments
    max_tombstones: int = 65536
    server_stream: bool = False  # also reassemble server->client bytes into Reply actions
    turns: bool = False  # emit a Turn before client bytes (or an end) that came after production had answered


@dataclass
class ReassemblyStats:
    segments: int = 0  # every segment fed
    ignored: int = 0  # not inbound to --port, pure ACKs/RSTs of unknown connections, strays of ended ones
    dup_bytes: int = 0  # retransmitted or duplicated client bytes trimmed before delivery
    ooo_segments: int = 0  # client segments that arrived ahead of a gap and were buffered
    reused_tuples: int = 0  # a new SYN on a 4-tuple that already had a flow
    flows: int = 0  # flows created (mirrored, skipped or later given up)


@dataclass(frozen=True, slots=True)
class Tracking:
    """What a FlowTable holds: every figure is bounded (by open connections, or by max_tombstones)."""

    flows: int  # connections being followed (mirrored, skipped or given up)
    index: int  # direction keys of those: two per connection, one per draining one
    holes: int  # flows with a client-side gap pending
    tombstones: int  # ended connections still absorbing their strays
    reply_holes: int = 0  # server_stream: flows with a server-side gap pending
    draining: int = 0  # server_stream: client-closed flows whose server side is still followed


TableEvent = Segment | Tick | Interrupt | EndOfInput | DeliveryFailed
TableCommand = Action | FlowRecord


class _Mode(enum.Enum):
    ACTIVE = "active"  # mirrored: actions are emitted
    SKIPPED = "skipped"  # partial flow under skip_partial: tracked so it ends properly, never mirrored
    MUTED = "muted"  # the replayer gave up: tracked only so its segments open nothing new
    DRAINING = "draining"  # server_stream: client closed (Close emitted), only the server's bytes are followed


@dataclass(slots=True)
class PendingBytes:
    """Out-of-order client bytes waiting for a gap: non-overlapping chunks keyed by stream position."""

    starts: list[int] = field(default_factory=list)
    chunks: dict[int, bytes] = field(default_factory=dict)
    size: int = 0

    def add(self, pos: int, data: bytes) -> int:
        """Keep the parts of `data` not held yet (first-received bytes win). Returns how many were kept."""
        end = pos + len(data)
        starts, chunks = self.starts, self.chunks
        i = bisect_right(starts, pos) - 1
        cur = pos
        if i >= 0:
            cur = max(cur, starts[i] + len(chunks[starts[i]]))
        i += 1
        pieces: list[tuple[int, bytes]] = []
        while cur < end:
            if i < len(starts) and starts[i] < end:
                s = starts[i]
                if s > cur:
                    pieces.append((cur, data[cur - pos : s - pos]))
                cur = max(cur, s + len(chunks[s]))
                i += 1
            else:
                pieces.append((cur, data[cur - pos :]))
                cur = end
        kept = 0
        for s, piece in pieces:
            insort(starts, s)
            chunks[s] = piece
            kept += len(piece)
        self.size += kept
        return kept

    def take(self, pos: int) -> list[bytes]:
        """Remove and return the chunks that continue the stream at `pos`, in order."""
        out: list[bytes] = []
        starts, chunks = self.starts, self.chunks
        while starts and starts[0] == pos:
            chunk = chunks.pop(starts.pop(0))
            out.append(chunk)
            pos += len(chunk)
            self.size -= len(chunk)
        return out

    def cut(self, limit: int) -> None:
        """Forget every byte at or after `limit` (nothing after a FIN belongs to the stream)."""
        starts, chunks = self.starts, self.chunks
        i = bisect_left(starts, limit)
        for s in starts[i:]:
            self.size -= len(chunks.pop(s))
        del starts[i:]
        if i:
            s = starts[i - 1]
            chunk = chunks[s]
            if s + len(chunk) > limit:
                chunks[s] = chunk[: limit - s]
                self.size -= s + len(chunk) - limit


@dataclass(slots=True, eq=False)
class _Reply:
    """The server->client direction of one flow under server_stream; positions as for the client's."""

    known: bool = False  # `nxt` is set: from the SYN+ACK, else from the first server byte seen
    nxt: int = 0  # raw seq of the next server byte to deliver
    delivered: int = 0  # stream position of `nxt`: bytes handed out as Reply
    need: int = 0  # stream position up to which server bytes are known to exist
    fin: int | None = None  # stream position of the server's FIN
    done: bool = False  # every server byte up to its FIN was delivered
    lost: bool = False  # a hole stopped the Replies for good
    hole_since: float | None = None
    pending: PendingBytes | None = None


@dataclass(slots=True, eq=False)
class _Flow:
    id: int
    client: Endpoint
    server: Endpoint
    ckey: Key  # client->server direction
    skey: Key  # server->client direction
    partial: bool
    guessed: bool
    isn: int | None  # client ISN when the handshake was seen, to tell a retransmitted SYN from a new one
    start: int  # seq of the first byte this flow can deliver
    nxt: int  # raw seq of the next client byte to deliver
    first_ts: float
    last_ts: float
    mode: _Mode = _Mode.ACTIVE
    clean: bool = True  # fast path allowed: mirrored, nothing pending, no FIN seen
    delivered: int = 0  # stream position of `nxt`: bytes handed out as Send
    need: int = 0  # stream position up to which bytes are known to exist; beyond `delivered` = a gap
    fin: int | None = None  # stream position of the client's FIN
    hole_since: float | None = None  # capture time of the last progress while a gap was pending
    pending: PendingBytes | None = None
    reply: _Reply | None = None  # server_stream, mirrored flows only
    # Turn-taking: server payload bytes since the client's last bytes, the last one's time, and the time of the
    # segment before the first of them (the request's end, near enough; kept off the client's fast path).
    # Counted whether or not FlowConfig.turns is set: cheaper than asking on every segment.
    ans: int = 0
    ans_ts: float = 0.0
    asked_ts: float = 0.0
    # HTTP/2 (told by the server's first bytes): its frames followed for the streams an answer ends. None until
    # the first server byte, False when not HTTP/2 or no longer followed in order.
    h2: CapturedStreamEnds | bool | None = None
    ans_streams: list[int] = field(default_factory=list)


@dataclass(slots=True)
class _Tomb:
    isn: int | None
    expires: float


class _Stream(Protocol):
    """One direction's sequencing state: the client's lives in _Flow, the server's in _Reply."""

    nxt: int  # raw seq of the next byte to deliver
    delivered: int  # stream position of `nxt`
    need: int  # stream position up to which bytes are known to exist
    fin: int | None  # stream position of the FIN
    pending: PendingBytes | None  # out-of-order bytes


def _deliver(s: _Stream, data: bytes) -> None:
    n = len(data)
    s.delivered += n
    s.nxt = (s.nxt + n) & _MASK


def _sequence(s: _Stream, seq: int, data: bytes, flags: int, whole: bool, stats: ReassemblyStats | None) -> list[bytes]:
    """Place one segment of a direction in its stream and return the bytes now deliverable in order.

    Duplicates and overlaps are trimmed (first-received bytes win), out-of-order bytes are buffered, a cut
    segment (`whole` False) counts as missing, and a FIN marks the stream's end. What a gap or the FIN means
    for the flow is the caller's to decide. `stats` counts duplicates and reordering (client direction only).
    """
    before = s.delivered
    out: list[bytes] = []
    pos = before + _signed(seq - s.nxt)
    fin_at = pos + len(data)
    if s.fin is not None and fin_at > s.fin:
        data = data[: max(0, s.fin - pos)]
    if not whole:
        # The bytes exist but are unknown: they count as missing until a retransmission brings them.
        missing = pos + max(len(data), 1)
        if s.fin is not None:
            missing = min(missing, s.fin)
        s.need = max(s.need, missing)
    elif data:
        end = pos + len(data)
        if end <= before:
            if stats is not None:
                stats.dup_bytes += len(data)
        else:
            if pos < before:
                if stats is not None:
                    stats.dup_bytes += before - pos
                data = data[before - pos :]
                pos = before
            s.need = max(s.need, end)
            if pos == before and s.pending is None:
                _deliver(s, data)
                out.append(data)
            else:
                if s.pending is None:
                    s.pending = PendingBytes()
                kept = s.pending.add(pos, data)
                if stats is not None:
                    if pos > before:
                        stats.ooo_segments += 1
                    stats.dup_bytes += len(data) - kept
    if flags & FIN and whole and s.fin is None and fin_at >= before:
        s.fin = fin_at
        s.need = fin_at
        if s.pending is not None:
            s.pending.cut(fin_at)
    pending = s.pending
    if pending is not None:
        if pending.starts and pending.starts[0] == s.delivered:
            chunks = pending.take(s.delivered)
            data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
            _deliver(s, data)
            out.append(data)
        if not pending.starts:
            s.pending = None
    return out


class FlowTable:
    """Every TCP connection of one capture: `handle` events (segments, ticks, gaps, the end, delivery failures),
    execute the returned actions in order and count the records.

    `feed`, `tick`, `interrupt`, `finish`, `give_up` and `pop_finished` are what `handle` runs on; `feed` is also
    the per-segment hot path (`handle_all` runs it over a batch).
    """

    def __init__(self, config: FlowConfig) -> None:
        self._cfg = config
        # Both directions of a live connection map to (flow, segment-is-from-client): one lookup per packet.
        self._index: dict[Key, tuple[_Flow, bool]] = {}
        self._flows: dict[int, _Flow] = {}
        self._holes: dict[int, _Flow] = {}  # flows with a gap pending, so tick() need not scan them all
        self._tombs: OrderedDict[Key, _Tomb] = OrderedDict()  # keyed by the client->server direction
        self._finished: list[FlowRecord] = []
        self._stats = ReassemblyStats()
        self._fed = 0  # kept apart from _stats: it is bumped on the hot path
        self._next_id = 1
        self._open = 0
        self._next_idle_scan = float("-inf")
        self._reply_holes: dict[int, _Flow] = {}  # server_stream: flows with a server-side gap pending
        self._draining: dict[int, _Flow] = {}  # server_stream: DRAINING flows, indexed by their server key only
        # server_stream: the server's segments also carry Replies (a flag test per server segment in feed).
        self._replies = config.server_stream

    # ---- the interface ------------------------------------------------------------------------------

    def handle(self, event: TableEvent) -> list[TableCommand]:
        """One event in, the commands out: the actions for the layers above, then a FlowRecord for every flow
        that ended during the event (records always come last, so a caller finds them from the end)."""
        actions: list[Action]
        if isinstance(event, Segment):
            actions = self.feed(event)
        elif isinstance(event, Tick):
            actions = self.tick(event.now)
        elif isinstance(event, Interrupt):
            actions = self.interrupt(event.now, event.servers)
        elif isinstance(event, EndOfInput):
            actions = self.finish()
        elif isinstance(event, DeliveryFailed):
            self.give_up(event.flow)
            actions = []
        else:
            raise TypeError(f"the flow table takes no {type(event).__name__}")
        if self._finished:
            return [*actions, *self.pop_finished()]
        return cast(list[TableCommand], actions)  # a list of actions is a list of commands; no copy

    def handle_all(self, segments: Iterable[Segment]) -> list[TableCommand]:
        """`handle` over a batch of segments: the same commands as one call per segment, records moved last.

        The hot path: one bound `feed` per segment and nothing else, so a batch costs what bare `feed` calls do.
        """
        feed = self.feed
        out: list[TableCommand] = []
        for seg in segments:
            actions = feed(seg)
            if actions:
                out += actions
        if self._finished:
            out += self.pop_finished()
        return out

    def tracking(self) -> Tracking:
        """How much the table holds right now: what the memory bounds are checked on."""
        return Tracking(
            flows=len(self._flows), index=len(self._index), holes=len(self._holes), tombstones=len(self._tombs),
            reply_holes=len(self._reply_holes), draining=len(self._draining),
        )

    # ---- the entry points handle() runs on ----------------------------------------------------------

    @property
    def open_flows(self) -> int:
        """Flows being mirrored right now (Open emitted, no end action yet)."""
        return self._open

    @property
    def stats(self) -> ReassemblyStats:
        self._stats.segments = self._fed
        return self._stats

    def feed(self, seg: Segment) -> list[Action]:
        """One segment: the client side is the same path with or without server_stream; only the server's
        segments go another way under it (`_server_replies`), chosen by one flag test."""
        self._fed += 1
        src = seg.src
        dst = seg.dst
        key = (src.host, src.port, dst.host, dst.port)
        hit = self._index.get(key)
        if hit is None:
            return self._unknown_replies(key, seg) if self._replies else self._unknown(key, seg)
        f, from_client = hit
        if from_client:
            f.last_ts = seg.ts
            r = f.reply  # server_stream only: None without it
            if (
                r is not None and r.known and not r.lost and seg.flags & (ACK | RST) == ACK
                and 0 < (seg.ack - r.nxt) & _MASK < _HALF
            ):
                # The client acknowledged server bytes the capture never had: they will never be resent.
                self._lose_reply(f)
            # Fast path: the next in-order bytes of a flow with nothing pending.
            if f.clean and not seg.flags & _CTRL and seg.seq == f.nxt and seg.whole:
                data = seg.payload
                if not data:
                    return []
                n = len(data)
                f.nxt = (f.nxt + n) & _MASK
                f.delivered += n
                if f.ans:
                    return self._turn_then(f, Send(f.id, data, seg.ts))
                return [Send(f.id, data, seg.ts)]
            if f.mode is not _Mode.ACTIVE:
                return self._passive(f, True, seg)
            return self._client(f, seg)
        if self._replies:
            return self._server_replies(f, key, seg)
        flags = seg.flags
        # Fast path: a harmless server ACK (or answer bytes) of a flow with nothing pending.
        if f.clean and not flags & _CTRL and (not flags & ACK or not 0 < (seg.ack - f.nxt) & _MASK < _HALF):
            if seg.payload:
                if not f.ans:
                    f.asked_ts = f.last_ts
                f.ans += len(seg.payload)
                f.ans_ts = seg.ts
                if f.h2 is not False:
                    self._h2_answer(f, seg)
            f.last_ts = seg.ts
            return []
        if seg.payload and not flags & RST:
            if not f.ans:
                f.asked_ts = f.last_ts
            f.ans += len(seg.payload)
            f.ans_ts = seg.ts
            if f.h2 is not False:
                self._h2_answer(f, seg)
        f.last_ts = seg.ts
        if f.mode is not _Mode.ACTIVE:
            return self._passive(f, False, seg)
        return self._server(f, seg)

    def tick(self, now: float) -> list[Action]:
        """Hole timeouts, idle expiry and tombstone expiry against the capture clock `now`."""
        out: list[Action] = []
        timeout = self._cfg.hole_timeout
        for f in [f for f in self._holes.values() if f.hole_since is not None and now - f.hole_since >= timeout]:
            out += self._end(f, now, Abort(f.id, AbortReason.HOLE, now), EndReason.HOLE, Outcome.INCOMPLETE, True)
        if self._reply_holes:
            for f in [f for f in self._reply_holes.values() if self._reply_timed_out(f, now)]:
                self._lose_reply(f)
        idle = self._cfg.idle_timeout
        # A full scan per tick would be O(flows) at every call; a sixteenth of the timeout is precise enough.
        if idle > 0 and now >= self._next_idle_scan:
            self._next_idle_scan = now + idle / 16
            for f in [f for f in self._flows.values() if now - f.last_ts >= idle]:
                out += self._expire_idle(f, now)
            for f in [f for f in self._draining.values() if now - f.last_ts >= idle]:
                self._end_draining(f)
        tombs = self._tombs
        while tombs:
            t = next(iter(tombs.values()))
            if t.expires > now:
                break
            tombs.popitem(last=False)
        return out

    def finish(self) -> list[Action]:
        """End of input: every flow still open ends now; nothing is remembered afterwards."""
        out: list[Action] = []
        for f in list(self._flows.values()):
            ts = f.last_ts
            if f.need > f.delivered:
                out += self._end(f, ts, Abort(f.id, AbortReason.HOLE, ts), EndReason.HOLE, Outcome.INCOMPLETE, False)
            else:
                out += self._end(f, ts, Close(f.id, ts), EndReason.END_OF_CAPTURE, Outcome.COMPLETE, False)
        for f in list(self._draining.values()):
            self._end_draining(f)
        self._tombs.clear()
        self._next_idle_scan = float("-inf")
        return out

    def interrupt(self, now: float, servers: Collection[str] | None = None) -> list[Action]:
        """The live stream had a gap: no open flow can be trusted any more, and what follows starts afresh.

        `servers` limits it to flows whose server address is one of these (the pod whose stream dropped, when
        several pods feed one run); None means every flow.
        """
        out: list[Action] = []
        for f in list(self._flows.values()):
            if servers is not None and f.server.host not in servers:
                continue
            if f.reply is not None:
                f.reply.lost = True  # the server's bytes went through the same broken stream
            out += self._end(f, now, Abort(f.id, AbortReason.GAP, now), EndReason.GAP, Outcome.INCOMPLETE, False)
        for f in list(self._draining.values()):
            if servers is None or f.server.host in servers:
                assert f.reply is not None
                f.reply.lost = True
                self._end_draining(f)
        return out

    def give_up(self, flow: int) -> None:
        """The replayer cannot deliver `flow`: emit nothing more for it, but keep absorbing its segments."""
        f = self._flows.get(flow)
        if f is None or f.mode is not _Mode.ACTIVE:
            return
        outcome = Outcome.INCOMPLETE if f.need > f.delivered else Outcome.COMPLETE
        self._finished.append(self._record(f, outcome, EndReason.GAVE_UP))
        self._open -= 1
        f.mode = _Mode.MUTED
        f.clean = False
        f.pending = None
        f.hole_since = None
        self._holes.pop(f.id, None)
        if f.reply is not None:
            f.reply = None  # "emit nothing more" covers Replies too
            self._reply_holes.pop(f.id, None)

    def pop_finished(self) -> list[FlowRecord]:
        out, self._finished = self._finished, []
        return out

    # ---- segments of unknown connections ------------------------------------------------------------

    def _unknown(self, key: Key, seg: Segment) -> list[Action]:
        src, dst, flags = seg.src, seg.dst, seg.flags
        rkey = (dst.host, dst.port, src.host, src.port)
        if key == rkey:  # a socket talking to itself: both directions would share one index slot
            return self._ignore()
        syn_only = flags & (SYN | ACK) == SYN
        tomb = self._tombs.get(key)
        if tomb is not None and syn_only and seg.seq != tomb.isn:
            # A fresh SYN from the client of an ended connection: the 4-tuple is being reused.
            del self._tombs[key]
            self._stats.reused_tuples += 1
        else:
            if tomb is None:
                tomb = self._tombs.get(rkey)
                key_hit = rkey
            else:
                key_hit = key
            if tomb is not None:
                tomb.expires = seg.ts + self._cfg.tombstone_ttl
                self._tombs.move_to_end(key_hit)
                return self._ignore()
        direction = self._direction(seg)
        if direction is None or flags & RST:
            return self._ignore()
        client_is_src, guessed = direction
        if not client_is_src:
            if flags & (SYN | ACK) == SYN | ACK:
                # The capture missed the SYN but the SYN+ACK tells the client's ISN: still a whole stream.
                f = self._new(dst, src, rkey, key, seg, partial=False, guessed=False, isn=(seg.ack - 1) & _MASK)
                return [Open(f.id, f.client, f.server, False, seg.ts)]
            return self._ignore()
        if syn_only:
            f = self._new(src, dst, key, rkey, seg, partial=False, guessed=False, isn=seg.seq)
            return [Open(f.id, f.client, f.server, False, seg.ts), *self._client(f, seg)]
        if flags & SYN or not (seg.payload or flags & FIN or not seg.whole):
            return self._ignore()  # SYN+ACK from the client side, or a pure ACK: nothing to mirror
        f = self._new(src, dst, key, rkey, seg, partial=True, guessed=guessed, isn=None)
        if f.mode is _Mode.SKIPPED:
            return self._passive(f, True, seg)
        return [Open(f.id, f.client, f.server, True, seg.ts), *self._client(f, seg)]

    def _direction(self, seg: Segment) -> tuple[bool, bool] | None:
        """(the sender is the client, the direction is a guess), or None when the segment is not ours."""
        sport, dport, flags = seg.src.port, seg.dst.port, seg.flags
        port = self._cfg.server_port
        if port is not None:
            if dport == port and sport != port:
                return True, False
            if sport == port and dport != port:
                return False, False
            if dport != port:
                return None
        if flags & (SYN | ACK) == SYN:
            return True, False
        if flags & (SYN | ACK) == SYN | ACK:
            return False, False
        if sport < _EPHEMERAL <= dport:
            return False, True
        if dport < _EPHEMERAL <= sport:
            return True, True
        if seg.payload or flags & FIN:
            return True, True  # the receiver of the first bytes we see is most likely the server
        return None

    def _new(
        self, client: Endpoint, server: Endpoint, ckey: Key, skey: Key, seg: Segment, *,
        partial: bool, guessed: bool, isn: int | None,
    ) -> _Flow:
        nxt = seg.seq if isn is None else (isn + 1) & _MASK
        f = _Flow(self._next_id, client, server, ckey, skey, partial, guessed, isn, nxt, nxt, seg.ts, seg.ts)
        self._next_id += 1
        self._stats.flows += 1
        if partial and self._cfg.skip_partial:
            f.mode = _Mode.SKIPPED
            f.clean = False
        else:
            self._open += 1
            if self._cfg.server_stream:
                f.reply = _Reply()
                if seg.flags & (SYN | ACK) == SYN | ACK:  # the flow starts from the server's SYN+ACK
                    f.reply.known = True
                    f.reply.nxt = (seg.seq + 1) & _MASK
        self._flows[f.id] = f
        self._index[ckey] = (f, True)
        self._index[skey] = (f, False)
        return f

    def _ignore(self) -> list[Action]:
        self._stats.ignored += 1
        return []

    # ---- segments of mirrored flows -----------------------------------------------------------------

    def _client(self, f: _Flow, seg: Segment) -> list[Action]:
        flags, ts = seg.flags, seg.ts
        if flags & RST:
            return self._reset(f, ts)
        if flags & SYN:
            if flags & ACK:
                return self._ignore()
            if not self._same_syn(f, seg.seq):
                return self._reuse(f, seg)
            seq = (seg.seq + 1) & _MASK  # data on a SYN (TCP Fast Open) starts after the SYN's number
        else:
            seq = seg.seq
        if f.need < f.delivered:
            f.need = f.delivered  # `need` is not maintained on the fast path
        before = f.delivered
        out: list[Action] = [Send(f.id, d, ts) for d in _sequence(f, seq, seg.payload, flags, seg.whole, self._stats)]
        if out and f.ans:
            out = self._turn_then(f, *out)
        if f.pending is not None and f.pending.size > self._cfg.max_ooo_bytes:
            out += self._end(f, ts, Abort(f.id, AbortReason.HOLE, ts), EndReason.HOLE, Outcome.INCOMPLETE, True)
            return out
        if f.fin is not None and f.delivered == f.fin:
            f.nxt = (f.nxt + 1) & _MASK
            out += self._end(f, ts, Close(f.id, ts), EndReason.FIN, Outcome.COMPLETE, True)
            return out
        if f.need > f.delivered:
            f.clean = False
            if f.hole_since is None or f.delivered > before:
                f.hole_since = ts
                self._holes[f.id] = f
            if ts - f.hole_since >= self._cfg.hole_timeout:
                out += self._end(f, ts, Abort(f.id, AbortReason.HOLE, ts), EndReason.HOLE, Outcome.INCOMPLETE, True)
        else:
            f.clean = True
            if f.hole_since is not None:
                f.hole_since = None
                del self._holes[f.id]
        return out

    def _server(self, f: _Flow, seg: Segment) -> list[Action]:
        flags, ts = seg.flags, seg.ts
        if flags & RST:
            return self._reset(f, ts)
        if flags & ACK and 0 < (seg.ack - f.nxt) & _MASK < _HALF:
            # The server acknowledged client bytes the capture does not have (yet). Acknowledged bytes are never
            # retransmitted, so this is a hole -- unless the capture merely shows the ACK first: `tcpdump -i any`
            # on several CPUs can order an ACK a moment before the data it acknowledges. So the hole gets a short
            # grace (ACK_GRACE of capture time) instead of the full --hole-timeout.
            acked = f.delivered + ((seg.ack - f.nxt) & _MASK)
            if f.fin is not None:
                acked = min(acked, f.fin)  # the ACK of the FIN itself is one past the last byte
            f.need = max(f.need, f.delivered, acked)
            if f.need > f.delivered:
                f.clean = False
                shortened = ts - max(0.0, self._cfg.hole_timeout - ACK_GRACE)
                if f.hole_since is None or f.hole_since > shortened:
                    f.hole_since = shortened
                    self._holes[f.id] = f
        if f.hole_since is not None and ts - f.hole_since >= self._cfg.hole_timeout:
            return self._end(f, ts, Abort(f.id, AbortReason.HOLE, ts), EndReason.HOLE, Outcome.INCOMPLETE, True)
        return []

    # ---- server_stream: the server->client direction as Replies ------------------------------------

    def _server_replies(self, f: _Flow, key: Key, seg: Segment) -> list[Action]:
        """A server segment under server_stream: the client side's view of it as without the option, plus the
        server's bytes as Replies (tests/test_reassemble_reply.py checks the actions match apart from Replies)."""
        asked_ts, f.last_ts = f.last_ts, seg.ts
        mode = f.mode
        if mode is _Mode.DRAINING:
            return self._draining_server(f, key, seg)
        if mode is not _Mode.ACTIVE:
            return self._passive(f, False, seg)
        flags = seg.flags
        if seg.payload and not flags & RST:
            if not f.ans:
                f.asked_ts = asked_ts
            f.ans += len(seg.payload)
            f.ans_ts = seg.ts
            if f.h2 is not False:
                self._h2_answer(f, seg)
        if not f.clean or flags & _CTRL or (flags & ACK and 0 < (seg.ack - f.nxt) & _MASK < _HALF):
            out = self._server(f, seg)
            if out:  # _server only ever returns the flow's end
                return out
        return self._reply(f, seg)

    def _unknown_replies(self, key: Key, seg: Segment) -> list[Action]:
        """An unindexed segment under server_stream: maybe the client of a DRAINING flow, else as `_unknown`."""
        src, dst = seg.src, seg.dst
        hit = self._index.get((dst.host, dst.port, src.host, src.port))
        drained = hit[0] if hit is not None and hit[0].mode is _Mode.DRAINING else None
        if drained is not None:
            r = drained.reply
            assert r is not None
            drained.last_ts = seg.ts
            if seg.flags & RST:
                self._end_draining(drained)
                drained = None
            elif seg.flags & ACK and r.known and 0 < (seg.ack - r.nxt) & _MASK < _HALF:
                self._lose_reply(drained)  # ends the draining flow: nothing else is left to follow
                drained = None
        out = self._unknown(key, seg)
        if drained is not None and drained.id in self._draining:
            self._drop_if_displaced(drained)
        elif seg.payload and seg.flags & SYN:
            # Data on a SYN+ACK that just opened a flow: its first server bytes.
            hit = self._index.get(key)
            if hit is not None and not hit[1]:
                out += self._reply(hit[0], seg)
        return out

    def _draining_server(self, f: _Flow, key: Key, seg: Segment) -> list[Action]:
        if seg.flags & (RST | SYN):
            self._end_draining(f)  # the connection is over (or a new one starts): as if it had ended at Close
            return self._unknown(key, seg)
        # Through _unknown as well, as without server_stream: it keeps the client's tombstone fresh and counts
        # the stray; if the tombstone is gone it may even open a flow, which then takes this 4-tuple over.
        out = self._unknown(key, seg)
        if self._drop_if_displaced(f):
            return out
        return out + self._reply(f, seg)

    def _drop_if_displaced(self, f: _Flow) -> bool:
        """End a DRAINING flow whose 4-tuple a new flow took over (through `_unknown`)."""
        hit = self._index.get(f.skey)
        if hit is not None and hit[0] is f:
            return False
        self._end_draining(f)
        return True

    def _reply(self, f: _Flow, seg: Segment) -> list[Action]:
        """The server's side of `_client`: the same sequencing, but a hole only stops the Replies."""
        r = f.reply
        if r is None or r.lost or r.done:
            return []
        flags, ts = seg.flags, seg.ts
        seq = seg.seq
        if flags & SYN:
            seq = (seq + 1) & _MASK
            if not r.known:
                r.known = True
                r.nxt = seq
        elif not r.known:
            if not (seg.payload or flags & FIN or not seg.whole):
                return []  # a pure ACK says nothing about which bytes belong to this flow
            # Joined mid-stream or the SYN+ACK went missing: the first server byte seen starts the stream.
            r.known = True
            r.nxt = seq
        elif not seg.payload and not flags & FIN and seg.whole and r.hole_since is None:
            return []  # the server's pure ACKs, its most common segment: no bytes, and no gap to time out
        before = r.delivered
        out: list[Action] = [Reply(f.id, d, ts) for d in _sequence(r, seq, seg.payload, flags, seg.whole, None)]
        if r.pending is not None and r.pending.size > self._cfg.max_ooo_bytes:
            self._lose_reply(f)
            return out
        if r.fin is not None and r.delivered == r.fin:
            # Nothing to emit: HTTP framing tells where answers end. Just stop following, and expect the
            # client's ACK of the FIN (one past the last byte) to be no hole.
            r.nxt = (r.nxt + 1) & _MASK
            r.done = True
            r.hole_since = None
            self._reply_holes.pop(f.id, None)
            if f.mode is _Mode.DRAINING:
                self._end_draining(f)
            return out
        if r.need > r.delivered:
            if r.hole_since is None or r.delivered > before:
                r.hole_since = ts
                self._reply_holes[f.id] = f
            if ts - r.hole_since >= self._cfg.hole_timeout:
                self._lose_reply(f)
        elif r.hole_since is not None:
            r.hole_since = None
            del self._reply_holes[f.id]
        return out

    def _reply_timed_out(self, f: _Flow, now: float) -> bool:
        r = f.reply
        return r is not None and r.hole_since is not None and now - r.hole_since >= self._cfg.hole_timeout

    def _lose_reply(self, f: _Flow) -> None:
        """A server-side hole that will never fill: no more Replies for this flow, the client side goes on."""
        r = f.reply
        assert r is not None
        r.lost = True
        r.pending = None
        r.hole_since = None
        self._reply_holes.pop(f.id, None)
        if f.mode is _Mode.DRAINING:
            self._end_draining(f)

    def _end_draining(self, f: _Flow) -> None:
        """The server side of a client-closed flow is over: write the record its Close deferred."""
        del self._draining[f.id]
        self._reply_holes.pop(f.id, None)
        hit = self._index.get(f.skey)
        if hit is not None and hit[0] is f:
            del self._index[f.skey]
        self._finished.append(self._record(f, Outcome.COMPLETE, EndReason.FIN))

    def _passive(self, f: _Flow, from_client: bool, seg: Segment) -> list[Action]:
        """Skipped or given-up flows: only follow the connection's life so it ends and gets buried."""
        flags = seg.flags
        if flags & RST:
            return self._end(f, seg.ts, None, EndReason.RESET, Outcome.COMPLETE, True)
        if from_client and flags & (SYN | ACK) == SYN and not self._same_syn(f, seg.seq):
            return self._reuse(f, seg)
        if from_client and flags & FIN:
            return self._end(f, seg.ts, None, EndReason.FIN, Outcome.COMPLETE, True)
        return []

    def _same_syn(self, f: _Flow, seq: int) -> bool:
        """Whether a client SYN belongs to this flow (a retransmission) rather than starting a new one."""
        if f.isn is not None:
            return seq == f.isn
        return (seq + 1) & _MASK == f.start  # the handshake of a partial flow, captured late

    def _reuse(self, f: _Flow, seg: Segment) -> list[Action]:
        """A client SYN with a new ISN on a live 4-tuple: the old connection ended unseen."""
        self._stats.reused_tuples += 1
        ts = seg.ts
        if f.need > f.delivered:
            out = self._end(f, ts, Abort(f.id, AbortReason.HOLE, ts), EndReason.HOLE, Outcome.INCOMPLETE, False)
        else:
            # No EndReason says "reused"; the old connection went quiet for good, which is what IDLE means.
            out = self._end(f, ts, Close(f.id, ts), EndReason.IDLE, Outcome.COMPLETE, False)
        return out + self._unknown(f.ckey, seg)

    def _reset(self, f: _Flow, ts: float) -> list[Action]:
        outcome = Outcome.INCOMPLETE if f.need > f.delivered else Outcome.COMPLETE
        return self._end(f, ts, Abort(f.id, AbortReason.RESET, ts), EndReason.RESET, outcome, True)

    def _expire_idle(self, f: _Flow, now: float) -> list[Action]:
        if f.mode is _Mode.ACTIVE and f.need > f.delivered:
            return self._end(f, now, Abort(f.id, AbortReason.HOLE, now), EndReason.HOLE, Outcome.INCOMPLETE, True)
        # No tombstone: traffic resuming after this long is worth mirroring as a new (partial) flow.
        return self._end(f, now, Close(f.id, now), EndReason.IDLE, Outcome.COMPLETE, False)

    def _end(
        self, f: _Flow, ts: float, action: Action | None, end: EndReason, outcome: Outcome, bury: bool
    ) -> list[Action]:
        """Forget the flow (leaving a tombstone if asked), record how it ended, and emit its last action."""
        del self._index[f.ckey]
        del self._index[f.skey]
        del self._flows[f.id]
        self._holes.pop(f.id, None)
        if bury:
            self._bury(f.ckey, f.isn, ts)
        if f.mode is _Mode.MUTED:
            return []  # its record was written by give_up()
        if f.mode is _Mode.SKIPPED:
            self._finished.append(self._record(f, Outcome.SKIPPED, end))
            return []
        self._open -= 1
        r = f.reply
        if r is not None:
            if end is EndReason.FIN and not (r.done or r.lost):
                # Clients often half-close before the answer comes: keep following the server's side. The
                # client key stays buried as above, so its strays behave exactly as without server_stream.
                f.mode = _Mode.DRAINING
                f.clean = False
                self._index[f.skey] = (f, False)
                self._draining[f.id] = f
                return self._last(f, action)
            self._reply_holes.pop(f.id, None)
        self._finished.append(self._record(f, outcome, end))
        return self._last(f, action)

    def _last(self, f: _Flow, action: Action | None) -> list[Action]:
        """A mirrored flow's end action, after a Turn when production answered since the client's last bytes.

        A FIN or a RST must reach the local service only once it has answered what production answered before
        the client ended; an end for lost bytes (HOLE, GAP) has nothing to wait for.
        """
        if action is None:
            return []
        if f.ans and (type(action) is Close or (type(action) is Abort and action.reason is AbortReason.RESET)):
            return self._turn_then(f, action)
        return [action]

    def _turn_then(self, f: _Flow, *actions: Action) -> list[Action]:
        """`actions`, after a Turn when turn-taking is on; either way production's answer so far is used up."""
        n, f.ans = f.ans, 0
        first = actions[0]
        streams: tuple[int, ...] | None = None
        if f.h2:
            streams = tuple(f.ans_streams)
            f.ans_streams.clear()
        if not self._cfg.turns:
            return list(actions)
        return [Turn(f.id, n, max(0.0, f.ans_ts - f.asked_ts), first.ts, streams), *actions]

    @staticmethod
    def _h2_answer(f: _Flow, seg: Segment) -> None:
        """Follow an HTTP/2 server's frames: which streams production's answer ended (for turn-taking)."""
        ends = f.h2
        if ends is None:
            if f.partial or not is_server_start(seg.payload):
                f.h2 = False
                return
            ends = f.h2 = CapturedStreamEnds(seg.seq)
        assert isinstance(ends, CapturedStreamEnds)
        ended = ends.feed(seg.seq, seg.payload)
        if ended is None:  # a gap in the server's bytes: its frames cannot be followed any more
            f.h2 = False
            f.ans_streams.clear()
        elif ended:
            f.ans_streams += ended

    def _bury(self, key: Key, isn: int | None, ts: float) -> None:
        cfg = self._cfg
        if cfg.max_tombstones <= 0:
            return
        tombs = self._tombs
        tombs[key] = _Tomb(isn, ts + cfg.tombstone_ttl)
        tombs.move_to_end(key)
        while len(tombs) > cfg.max_tombstones:
            tombs.popitem(last=False)

    @staticmethod
    def _record(f: _Flow, outcome: Outcome, end: EndReason) -> FlowRecord:
        return FlowRecord(
            flow=f.id,
            client=f.client,
            server=f.server,
            partial=f.partial,
            outcome=outcome,
            end=end,
            bytes_delivered=f.delivered,
            first_ts=f.first_ts,
            last_ts=f.last_ts,
            direction_guessed=f.guessed,
            reply_complete=f.reply is None or (not f.reply.lost and f.reply.need <= f.reply.delivered),
        )


__all__ = ["FlowConfig", "FlowTable", "PendingBytes", "ReassemblyStats", "TableCommand", "TableEvent", "Tracking"]
