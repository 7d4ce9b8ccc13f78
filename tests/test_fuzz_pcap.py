"""Fuzzing the pcap/pcapng reader: arbitrary bytes and damaged valid captures, read whole or a few bytes at a time.

The reader's contract (pcap.py): it yields records and ends, or raises InputError with a one-line message, and only
after every whole record before the damage was returned. These properties hold it to that for every input, because
live input is whatever a pod's tcpdump, a broken exec stream or a user's file hands us.
"""

from __future__ import annotations

import gzip
import io
import random
import signal
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import FrameType

import lz4.frame
import pytest
from backports import zstd
from hypothesis import event, given, settings
from hypothesis import strategies as st

from kubectl_mirror.errors import InputError
from kubectl_mirror.pcap import FAST_LINKTYPES, MAX_CAPLEN, PcapReader, Record, classic_pcap
from tests.fuzz.known import known_pcap_bug

SHB, IDB, PB, SPB, EPB = 0x0A0D0D0A, 1, 2, 3, 6
LINKTYPES = [*sorted(FAST_LINKTYPES), 105, 147]  # the fast path's, and two that tshark reads for us


# ---- building captures ----------------------------------------------------------------------------------------


def block(btype: int, body: bytes, order: str = "<") -> bytes:
    body += b"\0" * (-len(body) % 4)
    total = 12 + len(body)
    return struct.pack(order + "II", btype, total) + body + struct.pack(order + "I", total)


def option(code: int, value: bytes, order: str) -> bytes:
    return struct.pack(order + "HH", code, len(value)) + value + b"\0" * (-len(value) % 4)


def shb_block(order: str) -> bytes:
    return block(SHB, struct.pack(order + "IHHq", 0x1A2B3C4D, 1, 0, -1), order)


@dataclass
class Capture:
    """A valid capture and where each of its parts ends, so damage at an offset says which records must survive."""

    data: bytes
    header_len: int  # bytes before the first record (classic) or 0 (pcapng: every block counts as a unit)
    packets: list[tuple[int, bytes]] = field(default_factory=list)  # (end offset of the record, its data)
    boundaries: list[int] = field(default_factory=list)  # offsets where a truncation leaves a valid capture


@st.composite
def classic_captures(draw: st.DrawFn) -> Capture:
    linktype = draw(st.sampled_from(LINKTYPES))
    packets = draw(st.lists(st.tuples(st.integers(0, 2**31), st.binary(max_size=64)), max_size=8))
    data = classic_pcap(linktype, [(float(t), d) for t, d in packets], nanosecond=draw(st.booleans()),
                        big_endian=draw(st.booleans()))
    cap = Capture(data, 24)
    end = 24
    cap.boundaries.append(end)
    for _, d in packets:
        end += 16 + len(d)
        cap.packets.append((end, d))
        cap.boundaries.append(end)
    assert end == len(data)
    return cap


@st.composite
def pcapng_captures(draw: st.DrawFn) -> Capture:
    """One or two sections of interfaces, packets of every kind (EPB, obsolete PB, SPB) and blocks to skip."""
    parts: list[bytes] = []
    packets: list[tuple[int, bytes]] = []
    boundaries: list[int] = []
    end = 0

    def add(blk: bytes, packet: bytes | None = None) -> None:
        nonlocal end
        parts.append(blk)
        end += len(blk)
        boundaries.append(end)
        if packet is not None:
            packets.append((end, packet))

    for _ in range(draw(st.integers(1, 2))):
        order = draw(st.sampled_from("<>"))
        add(shb_block(order))
        ifaces = 0
        for _ in range(draw(st.integers(0, 8))):
            kind = draw(st.sampled_from(["idb", "epb", "pb", "spb", "other"] if ifaces else ["idb", "other"]))
            if kind == "idb":
                opts = b""
                if draw(st.booleans()):
                    opts += option(9, bytes([draw(st.sampled_from([3, 6, 9, 0x80 | 20]))]), order)
                if draw(st.booleans()):
                    opts += option(14, struct.pack(order + "q", draw(st.integers(-(2**40), 2**40))), order)
                if opts:
                    opts += option(0, b"", order)
                linktype = draw(st.sampled_from(LINKTYPES))
                snaplen = draw(st.sampled_from([0, MAX_CAPLEN]))  # never cuts: the data stays as written
                add(block(IDB, struct.pack(order + "HHI", linktype, 0, snaplen) + opts, order))
                ifaces += 1
                continue
            d = draw(st.binary(max_size=64))
            ts = draw(st.integers(0, 2**64 - 1))
            if kind == "epb":
                ifid = draw(st.integers(0, ifaces - 1))
                head = struct.pack(order + "IIIII", ifid, ts >> 32, ts & 0xFFFFFFFF, len(d), len(d))
                add(block(EPB, head + d, order), d)
            elif kind == "pb":
                ifid = draw(st.integers(0, ifaces - 1))
                head = struct.pack(order + "HHIIII", ifid, 0, ts >> 32, ts & 0xFFFFFFFF, len(d), len(d))
                add(block(PB, head + d, order), d)
            elif kind == "spb":
                add(block(SPB, struct.pack(order + "I", len(d)) + d, order), d)
            else:  # name resolution, statistics, custom...: skipped by the reader
                add(block(draw(st.sampled_from([4, 5, 0xBAD, 0x40000BAD])), d, order))
    return Capture(b"".join(parts), 0, packets, boundaries)


captures = st.one_of(classic_captures(), pcapng_captures())

ABSURD = [0, 1, 4, 8, 11, 12, 13, 16, 28, MAX_CAPLEN, MAX_CAPLEN + 1, 0x7FFFFFFF, 0x80000000, 0xFFFFFFF0, 0xFFFFFFFF]
MAGICS = [b"\x4d\x3c\x2b\x1a", b"\x1a\x2b\x3c\x4d", b"\xd4\xc3\xb2\xa1", b"\xa1\xb2\xc3\xd4", b"\x0a\x0d\x0d\x0a"]


def weird_block(draw: st.DrawFn, order: str) -> bytes:
    """A block built to hit one of the reader's checks: odd lengths, unknown types, lying caplens, bad magic."""
    kind = draw(st.sampled_from(["type", "zero", "len", "caplen", "bom", "short", "spb", "opt"]))
    d = draw(st.binary(max_size=24))
    if kind == "type":
        return block(draw(st.integers(0, 2**32 - 1)), d, order)
    if kind == "zero":  # a zero-length block: the reader must not spin on it
        return struct.pack(order + "II", draw(st.sampled_from([IDB, EPB, SPB, 5])), 0) + d
    if kind == "len":  # declared length disagrees with the body or the trailer
        blk = bytearray(block(draw(st.sampled_from([IDB, EPB, SPB, 5, SHB])), d, order))
        where = draw(st.sampled_from([4, len(blk) - 4]))
        blk[where : where + 4] = struct.pack(order + "I", draw(st.sampled_from(ABSURD)))
        return bytes(blk)
    if kind == "caplen":  # a packet claiming more captured bytes than its block or MAX_CAPLEN
        caplen = draw(st.sampled_from(ABSURD))
        return block(EPB, struct.pack(order + "IIIII", 0, 0, 0, caplen, caplen) + d, order)
    if kind == "bom":
        bom = draw(st.sampled_from([b"\0\0\0\0", b"\x4d\x3c\x2b\x1b", *MAGICS]))
        return block(SHB, bom + d, order)
    if kind == "short":  # fixed fields cut short: an IDB under 16 bytes, an EPB/PB under 28
        return block(draw(st.sampled_from([IDB, EPB, PB])), d[: draw(st.integers(0, 12))], order)
    if kind == "spb":
        return block(SPB, d[:4], order)
    # an interface whose option header claims more value than the block holds
    opt = struct.pack(order + "HH", draw(st.sampled_from([9, 14, 2])), draw(st.sampled_from([1, 8, 0xFFFF])))
    return block(IDB, struct.pack(order + "HHI", 1, 0, 0) + opt, order)


@st.composite
def mutations(draw: st.DrawFn, cap: Capture) -> bytes:
    """The capture with one to four byte-level or block-level injuries."""
    data = bytearray(cap.data)
    order = "<"
    if data[:4] in (b"\xa1\xb2\xc3\xd4", b"\xa1\xb2\x3c\x4d") or data[8:12] == b"\x1a\x2b\x3c\x4d":
        order = ">"
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "cut", "insert", "delete", "u32", "block", "magic"]))
        at = draw(st.integers(0, len(data)))
        if kind == "flip" and at < len(data):
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "cut":
            del data[at:]
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "delete":
            del data[at : at + draw(st.integers(1, 16))]
        elif kind == "u32":  # an absurd length or caplen, in either byte order
            data[at : at + 4] = struct.pack(draw(st.sampled_from("<>")) + "I", draw(st.sampled_from(ABSURD)))
        elif kind == "block":  # at a record boundary, so the damage does not hide inside a payload
            at = draw(st.sampled_from(cap.boundaries)) if cap.boundaries and at <= len(cap.data) else at
            data[at:at] = weird_block(draw, order)
        elif kind == "magic":  # the wrong magic or byte-order magic at the start
            data[: min(len(data), 4) if draw(st.booleans()) else 0] = draw(st.sampled_from(MAGICS))
            if len(data) >= 12 and draw(st.booleans()):
                data[8:12] = draw(st.sampled_from(MAGICS))
    return bytes(data)


# ---- reading --------------------------------------------------------------------------------------------------


class ShortReads(io.RawIOBase):
    """A pipe: every read returns 1..max_step bytes, however much was asked for; counts the reads."""

    def __init__(self, data: bytes, rnd: random.Random, max_step: int) -> None:
        self._data, self._pos, self._rnd, self._max = data, 0, rnd, max_step
        self.reads = 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        self.reads += 1
        n = self._rnd.randint(1, self._max)
        if size >= 0:
            n = min(n, size)
        out = self._data[self._pos : self._pos + n]
        self._pos += len(out)
        return out


class Counting(io.BytesIO):
    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.reads = 0

    def read1(self, size: int | None = -1) -> bytes:
        self.reads += 1
        return super().read1(size)


class Hung(Exception):
    pass


@contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """A reader that loops without consuming input would hang `make test`; fail the example instead."""

    def alarm(signum: int, frame: FrameType | None) -> None:
        raise Hung(f"the reader did not finish within {seconds} s")

    old = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@dataclass
class Outcome:
    records: list[Record]
    error: str | None  # the InputError's message
    known_bug: bool = False  # ended in a struct.error already reported (tests/fuzz/known.py)


def read(data: bytes, stream: Counting | ShortReads) -> Outcome:
    reader = PcapReader(stream)  # type: ignore[arg-type]
    records: list[Record] = []
    out = Outcome(records, None)
    with time_limit(10.0):
        try:
            for rec in reader:
                records.append(rec)
                assert len(records) <= len(data) // 12, "more records than the input can hold"
        except InputError as exc:
            out.error = str(exc)
        except struct.error as exc:
            site = known_pcap_bug(exc, data)  # reported bugs (tests/fuzz/known.py): anything else fails
            if site is None:
                raise
            out.known_bug = True
            event(f"known bug: struct.error in {site}")
    # Progress: every read but the final empty one returns at least one byte, so reads are bounded by the size.
    assert stream.reads <= len(data) + 2
    assert reader.count == len(records) or out.known_bug  # the bug loses the batch that was being read
    return out


def check(data: bytes, out: Outcome) -> None:
    """What holds for any input, valid or not."""
    if out.error is not None:
        assert out.error and "\n" not in out.error and "\r" not in out.error, repr(out.error)
    cursor = 0
    for rec in out.records:
        assert len(rec.data) <= len(rec.raw) <= len(data)
        # each record's bytes come from the input, in input order, without overlapping the previous record
        at = data.find(rec.raw, cursor)
        assert at >= 0, "a record's raw bytes are not in the input after the previous record"
        cursor = at + len(rec.raw)
        assert rec.data in rec.raw
        assert 0 <= rec.linktype <= 0x03FFFFFF  # classic pcap: 26 bits (the rest is FCS information)
        caplen = declared_caplen(rec)
        assert len(rec.data) <= caplen <= MAX_CAPLEN or (caplen == -1 and len(rec.data) <= len(rec.raw) - 16)


def declared_caplen(rec: Record) -> int:
    """The caplen field of the record's own header, in the order its length fields say; -1 for SPB (none)."""
    raw = rec.raw
    if rec.header[:4] != struct.pack("<I", SHB):  # classic: 16-byte record header
        order = {b"\xd4\xc3\xb2\xa1": "<", b"\x4d\x3c\xb2\xa1": "<"}.get(rec.header[:4], ">")
        caplen = struct.unpack_from(order + "I", raw, 8)[0]
        assert len(rec.data) == caplen == len(raw) - 16
        return int(caplen)
    order = "<" if struct.unpack_from("<I", raw, 4)[0] == len(raw) else ">"
    btype = struct.unpack_from(order + "I", raw)[0]
    assert struct.unpack_from(order + "I", raw, 4)[0] == len(raw)
    if btype == SPB:
        return -1
    assert btype in (EPB, PB)
    caplen = struct.unpack_from(order + "I", raw, 20)[0]
    assert len(rec.data) == caplen
    return int(caplen)


def both_ways(data: bytes, rnd: random.Random) -> Outcome:
    """Read whole and through short reads; the way the bytes arrive must not change what is read."""
    whole = read(data, Counting(data))
    check(data, whole)
    trickled = read(data, ShortReads(data, rnd, rnd.choice([1, 3, 17, 4096])))
    check(data, trickled)
    a, b = [r.raw for r in trickled.records], [r.raw for r in whole.records]
    if whole.known_bug:  # the bug loses the batch it happens in, and batches depend on how the bytes arrived
        assert a[: len(b)] == b or b[: len(a)] == a
    else:
        assert a == b
    if whole.error is not None and whole.error.startswith("not a pcap"):
        # quotes the first bytes it has buffered, which short reads make fewer: only the verdict must agree
        assert trickled.error is not None and trickled.error.startswith("not a pcap")
    else:
        assert trickled.error == whole.error
    assert trickled.known_bug == whole.known_bug
    return whole


def damage_offset(original: bytes, mutated: bytes) -> int:
    n = min(len(original), len(mutated))
    for i in range(n):
        if original[i] != mutated[i]:
            return i
    return n


# ---- properties -----------------------------------------------------------------------------------------------

FAST = settings(max_examples=1000, deadline=None)


@FAST
@given(st.binary(max_size=300), st.randoms(use_true_random=False))
def test_arbitrary_bytes_yield_records_or_input_error(data: bytes, rnd: random.Random) -> None:
    both_ways(data, rnd)


@FAST
@given(st.sampled_from([b"\xd4\xc3\xb2\xa1", b"\xa1\xb2\xc3\xd4", b"\x4d\x3c\xb2\xa1", b"\x0a\x0d\x0d\x0a"]),
       st.binary(max_size=300), st.randoms(use_true_random=False))
def test_arbitrary_bytes_behind_a_valid_magic(magic: bytes, rest: bytes, rnd: random.Random) -> None:
    # Behind a magic the reader gets past _start, which random bytes alone almost never do.
    data = magic + rest
    if magic == b"\x0a\x0d\x0d\x0a" and len(rest) >= 8:
        data = magic + rest[:4] + b"\x4d\x3c\x2b\x1a" + rest[8:]
    elif magic != b"\x0a\x0d\x0d\x0a" and len(rest) >= 20:
        data = magic + rest[:16] + struct.pack("<I", rnd.choice(LINKTYPES)) + rest[20:]
    both_ways(data, rnd)


@settings(max_examples=300, deadline=None)
@given(captures, st.randoms(use_true_random=False))
def test_valid_captures_read_back_exactly(cap: Capture, rnd: random.Random) -> None:
    out = both_ways(cap.data, rnd)
    assert out.error is None and not out.known_bug
    assert [r.data for r in out.records] == [d for _, d in cap.packets]
    if cap.header_len:  # classic: the header and the records' raw bytes are the file, byte for byte
        assert out.records == [] or out.records[0].header == cap.data[:24]
        assert cap.data[:24] + b"".join(r.raw for r in out.records) == cap.data


@settings(max_examples=500, deadline=None)
@given(captures, st.data(), st.randoms(use_true_random=False))
def test_truncation_keeps_exactly_the_whole_records_before_the_cut(
    cap: Capture, data: st.DataObject, rnd: random.Random
) -> None:
    cut = data.draw(st.integers(0, len(cap.data)), label="cut")
    out = both_ways(cap.data[:cut], rnd)
    # a cut never makes a short block (the length check comes first); only 1-3 bytes hit the _start bug
    assert not out.known_bug or 0 < cut < 4
    assert [r.data for r in out.records] == [d for end, d in cap.packets if end <= cut]
    if out.known_bug:
        return
    if cut in cap.boundaries:
        assert out.error is None
    else:
        assert out.error is not None
    if cap.header_len and cut >= 24:
        whole = max([24] + [end for end, _ in cap.packets if end <= cut])
        assert cap.data[:24] + b"".join(r.raw for r in out.records) == cap.data[:whole]


@settings(max_examples=1500, deadline=None)
@given(captures.flatmap(lambda c: st.tuples(st.just(c), mutations(c))), st.randoms(use_true_random=False))
def test_damage_keeps_every_whole_record_before_it(case: tuple[Capture, bytes], rnd: random.Random) -> None:
    cap, data = case
    out = both_ways(data, rnd)
    at = damage_offset(cap.data, data)
    before = [d for end, d in cap.packets if end <= at]
    if out.known_bug:
        # the struct.error loses the batch it happened in, so only a bound holds
        assert [r.data for r in out.records] == before[: len(out.records)]
        return
    assert [r.data for r in out.records[: len(before)]] == before, "a whole record before the damage was lost"


def _compress(kind: str, data: bytes) -> bytes:
    if kind == "gzip":
        return gzip.compress(data)
    if kind == "zstd":
        return zstd.compress(data)
    return lz4.frame.compress(data)


@settings(max_examples=300, deadline=None)
@given(captures, st.sampled_from(["gzip", "zstd", "lz4"]), st.data(), st.randoms(use_true_random=False))
def test_compressed_captures_damaged_or_cut_keep_the_whole_records_before_it(
    cap: Capture, kind: str, data: st.DataObject, rnd: random.Random
) -> None:
    """Compressed: the records are those of the plain capture; damage or a cut anywhere is one InputError after
    records that are a prefix of them, whole or through short reads."""
    packed = _compress(kind, cap.data)
    plain = [d for _, d in cap.packets]
    records: list[list[bytes]] = []
    for stream in (io.BytesIO(packed), ShortReads(packed, rnd, rnd.choice([1, 3, 17, 4096]))):
        with time_limit(10.0):
            got = [r.data for r in PcapReader(stream)]  # type: ignore[arg-type]
        assert got == plain
        records.append(got)
    cut = data.draw(st.integers(0, len(packed) - 1), label="cut")
    truncate = data.draw(st.booleans(), label="truncate")
    damaged = bytearray(packed[:cut] if truncate else packed)
    if not truncate:
        damaged[cut] ^= data.draw(st.integers(1, 255), label="xor")
    got = []
    error = None
    with time_limit(10.0):
        try:
            for rec in PcapReader(io.BytesIO(bytes(damaged))):
                got.append(rec.data)
        except InputError as exc:  # anything else fails the test
            error = str(exc)
    assert error is None or (error and "\n" not in error)
    if truncate:  # the stream ends early: the records before are the capture's own, and it is said
        assert got == plain[: len(got)]
        assert error is not None


# ---- regression tests for bugs found by fuzzing (pkg/kubectl_mirror/pcap.py) -----------------------------------

@pytest.mark.parametrize("data", [b"\0", b"\xd4\xc3", b"\n\r\r"])
def test_input_of_one_to_three_bytes_is_an_input_error(data: bytes) -> None:
    with pytest.raises(InputError):
        list(PcapReader(io.BytesIO(data)))


_SHB_LE = shb_block("<")
_IDB_EN10MB = block(IDB, struct.pack("<HHI", 1, 0, 0))
_GOOD_EPB = block(EPB, struct.pack("<IIIII", 0, 0, 0, 4, 4) + b"good")


@pytest.mark.parametrize("bad", [
    pytest.param(block(IDB, b""), id="idb-12-bytes"),
    pytest.param(block(EPB, b""), id="epb-12-bytes"),
    pytest.param(block(EPB, b"\0" * 12), id="epb-24-bytes"),
    pytest.param(block(PB, b"\0" * 4), id="pb-16-bytes"),
    pytest.param(block(IDB, struct.pack("<HHI", 1, 0, 0) + struct.pack("<HH", 14, 8)), id="idb-tsoffset-cut"),
])
def test_short_pcapng_block_is_an_input_error_after_the_good_records(bad: bytes) -> None:
    data = _SHB_LE + _IDB_EN10MB + _GOOD_EPB + bad
    reader = PcapReader(io.BytesIO(data))
    assert [r.data for r in reader.read_batch()] == [b"good"]
    with pytest.raises(InputError):
        reader.read_batch()


def test_simple_packet_block_without_its_length_field_is_an_input_error() -> None:
    data = _SHB_LE + _IDB_EN10MB + _GOOD_EPB + block(SPB, b"")
    reader = PcapReader(io.BytesIO(data))
    assert [r.data for r in reader.read_batch()] == [b"good"]
    with pytest.raises(InputError):
        reader.read_batch()
