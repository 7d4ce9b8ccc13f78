"""Sharding dissection over several tsharks: which dissector a record goes to, and one capture-ordered stream back.

Records are dealt by a hash of their TCP 4-tuple that is the same in both directions, so every segment of a
connection goes to the same tshark and comes back in capture order. The N segment streams are merged back by
frame number: a segment leaves only once no dissector can still produce an earlier one. A dissector can only
produce a segment for a record it was given and has not answered yet, and a TCP record always gets a line, so
the merge waits only for TCP records (`expect`); a line for a record answers it and every earlier record of
that dissector (tshark keeps its input order). Records that are not TCP cost nothing here: they go to dissector
0 and nobody waits for them. The flow table thus sees exactly the capture's order, across flows too: idle
timers, --speed pacing and stream gaps (which compare frame numbers) behave as with one tshark.

Nothing here does I/O: the feeder thread calls `expect`, the reading thread the rest (deque appends and pops are
atomic, and frames only ever grow).
"""

from __future__ import annotations

from collections import deque
from operator import attrgetter

from .model import Segment

# Fibonacci hashing: the product's high bits mix every input bit. Linux hands out ephemeral ports of one parity
# first (connect() prefers even ones), so the low bits of a plain sum or XOR would put every flow on one side.
_GOLDEN = 0x9E3779B97F4A7C15
_MASK = (1 << 64) - 1
_VLAN_TYPES = (0x8100, 0x88A8, 0x9100)
# IPv6 extension headers whose length is (byte 1 + 1) * 8: hop-by-hop, routing, destination options.
_IPV6_EXT = (0, 43, 60)
_FRAME = attrgetter("frame")


def ip_start(linktype: int, data: bytes) -> int:
    """Where the IP header starts, or -1 when the frame is not IP (or of a link type without a fast path)."""
    if linktype == 1:
        off = 12
        etype = (data[12] << 8) | data[13]
        while etype in _VLAN_TYPES:  # 802.1Q and QinQ tags
            off += 4
            etype = (data[off] << 8) | data[off + 1]
        return off + 2 if etype in (0x0800, 0x86DD) else -1
    if linktype == 276:  # LINUX_SLL2: the protocol type comes first
        return 20 if ((data[0] << 8) | data[1]) in (0x0800, 0x86DD) else -1
    if linktype == 113:  # LINUX_SLL: the protocol type is the last field
        return 16 if ((data[14] << 8) | data[15]) in (0x0800, 0x86DD) else -1
    if linktype in (101, 12, 14, 228, 229):
        return 0
    if linktype in (0, 108):
        return 4
    return -1


def deal(linktype: int, data: bytes, shards: int) -> int:
    """Which dissector a record goes to, and whether a tshark line is certain for it.

    Returns the dissector's index (0 to shards - 1) for a TCP segment whose whole header is in the frame: tshark
    prints a line for it. Returns -(index + 1) when no line is expected: not TCP, an IP fragment after the first,
    a header cut by the snap length, a link type without a fast path. Those go to dissector 0, except a cut TCP
    header whose ports are readable: it stays with its flow, so a line tshark might still print keeps its place.
    """
    return route(linktype, data, shards)[0]


def route(linktype: int, data: bytes, shards: int) -> tuple[int, int]:
    """`deal` and `headers_end` together, from one reading of the headers: the feeder's per-record question."""
    size = len(data)
    certain = True  # the payload's start is known: not a fragment, no IPv6 extension header (as headers_end)
    try:
        off = ip_start(linktype, data)
        if off < 0:
            return -1, size
        version = data[off] >> 4
        if version == 4:
            ihl = (data[off] & 0x0F) * 4
            frag = ((data[off + 6] << 8) | data[off + 7]) & 0x3FFF
            if ihl < 20 or data[off + 9] != 6 or frag & 0x1FFF:
                return -1, size  # not TCP, or a fragment without the TCP header
            certain = not frag
            tcp = off + ihl
            a = int.from_bytes(data[off + 12 : off + 16], "big")
            b = int.from_bytes(data[off + 16 : off + 20], "big")
        elif version == 6:
            nxt, tcp = data[off + 6], off + 40
            certain = nxt == 6
            for _ in range(8):  # bounded: a chain of extension headers
                if nxt in _IPV6_EXT:
                    nxt, tcp = data[tcp], tcp + (data[tcp + 1] + 1) * 8
                elif nxt == 44:  # fragment header: only the first fragment holds the TCP header
                    if ((data[tcp + 2] << 8) | data[tcp + 3]) & 0xFFF8:
                        return -1, size
                    nxt, tcp = data[tcp], tcp + 8
                elif nxt == 51:  # authentication header, in 4-byte units
                    nxt, tcp = data[tcp], tcp + (data[tcp + 1] + 2) * 4
                else:
                    break
            if nxt != 6:
                return -1, size
            a = int.from_bytes(data[off + 8 : off + 24], "big")
            b = int.from_bytes(data[off + 24 : off + 40], "big")
        else:
            return -1, size
        if tcp + 4 > size:
            return -1, size
        ports = ((data[tcp] << 8) | data[tcp + 1]) ^ ((data[tcp + 2] << 8) | data[tcp + 3])
    except IndexError:
        return -1, size
    # XOR is the same both ways round; folding the addresses keeps IPv6's 128 bits cheap to multiply.
    x = a ^ b
    x = (x ^ (x >> 64) ^ (ports << 32) ^ ports) & _MASK
    index = (((x * _GOLDEN) & _MASK) >> 32) % shards
    if tcp + 20 > size or data[tcp + 12] >> 4 < 5:
        return -index - 1, size  # its header is not all there: tshark may say nothing about it
    end = tcp + (data[tcp + 12] >> 4) * 4
    return index, end if certain and end <= size else size


def headers_end(linktype: int, data: bytes) -> int:
    """Where a TCP segment's payload starts in its frame (the end of its TCP header), or len(data) when that is
    not certain: not TCP, IPv6 with extension headers, a fragment, a link type without a fast path.

    tshark is asked only for header fields; what it is handed past this point is bytes it copies for nothing.
    """
    try:
        off = ip_start(linktype, data)
        if off < 0:
            return len(data)
        version = data[off] >> 4
        if version == 4:
            ihl = (data[off] & 0x0F) * 4
            if ihl < 20 or data[off + 9] != 6 or ((data[off + 6] << 8) | data[off + 7]) & 0x3FFF:
                return len(data)
            tcp = off + ihl
        elif version == 6 and data[off + 6] == 6:
            tcp = off + 40
        else:
            return len(data)
        end = tcp + (data[tcp + 12] >> 4) * 4
    except IndexError:
        return len(data)
    return end if tcp + 20 <= end <= len(data) else len(data)


class Merger:
    """N per-dissector segment streams, each in capture order, back into one stream in capture order."""

    def __init__(self, shards: int) -> None:
        self._shards = shards
        # Frames of TCP records dealt to each dissector and not answered yet: the feeder appends, the reader pops.
        self._expected: list[deque[int]] = [deque() for _ in range(shards)]
        self._held: list[deque[Segment]] = [deque() for _ in range(shards)]
        self.held = 0  # segments parsed but not released yet
        self.held_bytes = 0  # their payload bytes

    def expect(self, shard: int, frame: int) -> None:
        """A TCP record is on its way to this dissector: nothing after it leaves before its line is read."""
        self._expected[shard].append(frame)

    def answered(self, shard: int, frame: int) -> None:
        """This dissector's lines are read up to this frame: every record of it up to there is answered."""
        expected = self._expected[shard]
        while expected and expected[0] <= frame:
            expected.popleft()

    def expected_head(self, shard: int) -> int | None:
        """The oldest record of this dissector the merge waits for."""
        expected = self._expected[shard]
        return expected[0] if expected else None

    def skip(self, shard: int) -> int | None:
        """Stop waiting for this dissector's oldest expected record (its tshark said nothing for it and is idle);
        the frame given up, if any."""
        expected = self._expected[shard]
        return expected.popleft() if expected else None

    def add(self, shard: int, segments: list[Segment]) -> None:
        if segments:
            self._held[shard].extend(segments)
            self.held += len(segments)
            self.held_bytes += sum(len(s.payload) for s in segments)

    def waiting_on(self) -> int | None:
        """The dissector whose unanswered record holds segments back, or None when nothing is held back."""
        if not self.held:
            return None
        best: int | None = None
        low = 0
        for i, expected in enumerate(self._expected):
            if expected and (best is None or expected[0] < low):
                best, low = i, expected[0]
        return best

    def pop(self) -> list[Segment]:
        """Every held segment no dissector can still precede, in frame order."""
        if not self.held:
            return []
        bound = min((e[0] for e in self._expected if e), default=None)
        out: list[Segment] = []
        runs = 0
        for held in self._held:
            if not held:
                continue
            before = len(out)
            if bound is None or held[-1].frame < bound:
                out.extend(held)  # all of it: the common case when every dissector has caught up
                held.clear()
            else:
                while held and held[0].frame < bound:
                    out.append(held.popleft())
            runs += len(out) > before
        if runs > 1:
            out.sort(key=_FRAME)  # stable: a dissector's own segments never share a frame with another's
        self.held -= len(out)
        self.held_bytes -= sum(len(s.payload) for s in out)
        return out
