"""The pcap/pcapng reader and writer, on synthetic captures and on real tcpdump output."""

from __future__ import annotations

import io
import os
import stat
import struct
import subprocess
import threading
from pathlib import Path

import pytest

from kubectl_mirror.errors import InputError
from kubectl_mirror.pcap import (
    PcapReader,
    PcapWriter,
    Record,
    classic_header,
    classic_pcap,
    classic_record,
    linktype_name,
)
from tests.dissect_helpers import (
    epb,
    ethernet,
    idb,
    listener,
    loopback_traffic,
    obsolete_pb,
    other_block,
    shb,
    spb,
    tcp_ip,
    tcpdump,
)

FRAMES = [ethernet(tcp_ip("10.0.0.1", "10.0.0.2", 1000 + i, 80, i, 0, 0x18, b"p%d" % i)) for i in range(5)]


def read_all(data: bytes) -> list[Record]:
    return list(PcapReader(io.BytesIO(data)))


class Trickle(io.RawIOBase):
    """A stream that returns at most `step` bytes per read, like a slow pipe."""

    def __init__(self, data: bytes, step: int) -> None:
        self._data, self._pos, self._step = data, 0, step

    def readable(self) -> bool:
        return True

    def readinto(self, buf: bytearray | memoryview) -> int:  # type: ignore[override]
        n = min(self._step, len(buf), len(self._data) - self._pos)
        buf[:n] = self._data[self._pos : self._pos + n]
        self._pos += n
        return n


@pytest.mark.parametrize("nanosecond", [False, True])
@pytest.mark.parametrize("big_endian", [False, True])
def test_classic_both_orders_and_resolutions(nanosecond: bool, big_endian: bool) -> None:
    packets = [(1700000000.123456 + i, f) for i, f in enumerate(FRAMES)]
    data = classic_pcap(1, packets, nanosecond=nanosecond, big_endian=big_endian)
    reader = PcapReader(io.BytesIO(data))
    recs = list(reader)
    assert [r.data for r in recs] == FRAMES
    assert all(r.linktype == 1 for r in recs)
    assert recs[2].ts == pytest.approx(1700000002.123456, abs=1e-6)
    assert b"".join(r.raw for r in recs) == data[24:]
    assert reader.header_bytes() == data[:24]


def test_nanosecond_timestamp_keeps_nanoseconds() -> None:
    data = classic_header(101, nanosecond=True) + struct.pack("<IIII", 10, 999_999_999, 3, 3) + b"abc"
    (rec,) = read_all(data)
    assert rec.ts == pytest.approx(10.999999999, abs=1e-9)


@pytest.mark.parametrize("step", [1, 7, 4096])
def test_short_reads(step: int) -> None:
    data = classic_pcap(1, [(float(i), f) for i, f in enumerate(FRAMES)])
    recs = list(PcapReader(io.BufferedReader(Trickle(data, step), buffer_size=step)))
    assert [r.data for r in recs] == FRAMES


def test_real_pipe_yields_each_record_before_the_next_is_written() -> None:
    rfd, wfd = os.pipe()
    reader = PcapReader(os.fdopen(rfd, "rb"))
    with os.fdopen(wfd, "wb", buffering=0) as w:
        w.write(classic_header(1))
        for i, frame in enumerate(FRAMES):
            w.write(classic_record(float(i), frame))
            got: list[Record] = []
            t = threading.Thread(target=lambda out=got: out.extend(reader.read_batch()), daemon=True)
            t.start()
            t.join(timeout=10)
            assert not t.is_alive(), "reader waited for more than what was written"
            assert [r.data for r in got] == [frame]
    assert reader.read_batch() == []


def test_pcapng_sections_interfaces_and_block_kinds() -> None:
    pkt = tcp_ip("10.0.0.1", "10.0.0.2", 1, 2, 3, 4, 0x18, b"hello")
    section1 = (shb() + idb(1) + idb(101, tsresol=9, tsoffset=100) + other_block()
                + epb(0, 1_500_000, ethernet(pkt)) + epb(1, 2_000_000_000, pkt))
    section1 += obsolete_pb(0, 3_000_000, ethernet(pkt)) + spb(ethernet(pkt))
    section2 = shb(">") + idb(276, tsresol=0x80 | 10, order=">") + epb(0, 5 * 1024, b"\0" * 20 + pkt, order=">")
    reader = PcapReader(io.BytesIO(section1 + section2))
    recs = list(reader)
    assert [r.linktype for r in recs] == [1, 101, 1, 1, 276]
    assert recs[0].ts == pytest.approx(1.5)
    assert recs[1].ts == pytest.approx(102.0)  # nanoseconds plus the interface's offset
    assert recs[2].ts == pytest.approx(3.0)
    assert recs[4].ts == pytest.approx(5.0)  # 2^-10 resolution
    assert recs[1].data == pkt
    assert recs[3].data == ethernet(pkt)  # simple packet block
    # a fresh consumer of any record gets its section header and every interface so far
    assert recs[0].header == shb() + idb(1) + idb(101, tsresol=9, tsoffset=100)
    assert recs[4].header == section2[: len(recs[4].header)]
    assert recs[4].header.startswith(shb(">"))
    assert reader.header_bytes() == recs[4].header
    assert b"".join(r.raw for r in recs[:2]) == epb(0, 1_500_000, ethernet(pkt)) + epb(1, 2_000_000_000, pkt)


def test_interface_added_mid_section_reaches_passthrough(tmp_path: Path) -> None:
    pkt = tcp_ip("10.0.0.1", "10.0.0.2", 1, 2, 3, 4, 0x18, b"x")
    data = shb() + idb(1) + epb(0, 1, ethernet(pkt)) + idb(101) + epb(1, 2, pkt) + shb() + idb(101) + epb(0, 3, pkt)
    out = tmp_path / "copy.pcapng"
    with PcapWriter(out) as w:
        for rec in PcapReader(io.BytesIO(data)):
            w.write_record(rec)
    assert out.read_bytes() == data
    assert [r.data for r in read_all(out.read_bytes())] == [ethernet(pkt), pkt, pkt]


def test_writer_passthrough_and_mode(tmp_path: Path) -> None:
    data = classic_pcap(113, [(1.0, b"\0" * 16 + b"abc"), (2.0, b"\0" * 16 + b"defg")], nanosecond=True)
    out = tmp_path / "tee.pcap"
    w = PcapWriter(out, flush_bytes=1 << 30, flush_seconds=3600)
    recs = read_all(data)
    w.write_record(recs[0])
    w.flush()
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o600
    assert [r.data for r in read_all(out.read_bytes())] == [recs[0].data]  # valid after every flush
    w.write_record(recs[1])
    assert out.read_bytes() == data[: 24 + len(recs[0].raw)]  # nothing half-written before the flush
    w.close()
    w.close()
    assert out.read_bytes() == data


def test_writer_continues_one_file_across_streams(tmp_path: Path) -> None:
    first = classic_pcap(1, [(1.0, FRAMES[0])])
    second = classic_pcap(1, [(2.0, FRAMES[1])])  # a reconnected stream: a new reader, the same header
    out = tmp_path / "tee.pcap"
    with PcapWriter(out) as w:
        for data in (first, second):
            for rec in PcapReader(io.BytesIO(data)):
                w.write_record(rec)
        with pytest.raises(InputError, match="format changed mid-stream"):
            for rec in PcapReader(io.BytesIO(classic_pcap(101, [(3.0, b"\x45")]))):
                w.write_record(rec)
    assert out.read_bytes() == first + second[24:]


def test_writer_builds_classic_pcaps(tmp_path: Path) -> None:
    out = tmp_path / "synthetic.pcap"
    with PcapWriter(out, linktype=101) as w:
        w.write_packet(5.25, b"\x45abc")
        w.write_packet(6.5, b"\x45de", orig_len=100)
    recs = read_all(out.read_bytes())
    assert [(r.ts, r.linktype, r.data, r.orig_len) for r in recs] == [(5.25, 101, b"\x45abc", 4),
                                                                       (6.5, 101, b"\x45de", 100)]


def test_writer_reports_unwritable_path(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="cannot write"):
        PcapWriter(tmp_path / "missing-dir" / "x.pcap")


# ---- damage ---------------------------------------------------------------------------------------------------


def test_empty_input() -> None:
    with pytest.raises(InputError, match="empty"):
        read_all(b"")


def test_text_file() -> None:
    with pytest.raises(InputError, match=r"not a pcap.*text file.*tcpdump -w") as exc:
        read_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert "47 45 54" in str(exc.value)  # shows the first bytes
    assert "\n" not in str(exc.value)


def test_truncated_global_header() -> None:
    with pytest.raises(InputError, match="truncated pcap header"):
        read_all(classic_header(1)[:10])


def test_cut_mid_record_yields_everything_before() -> None:
    data = classic_pcap(1, [(float(i), f) for i, f in enumerate(FRAMES)])
    cut = data[: len(data) - 5]
    reader = PcapReader(io.BytesIO(cut))
    got: list[bytes] = []
    with pytest.raises(InputError, match=r"middle of packet 5.*everything before it was used"):
        for rec in reader:
            got.append(rec.data)
    assert got == FRAMES[:4]


def test_pcapng_cut_mid_block() -> None:
    pkt = tcp_ip("10.0.0.1", "10.0.0.2", 1, 2, 3, 4, 0x18, b"hello")
    data = shb() + idb(101) + epb(0, 1, pkt) + epb(0, 2, pkt)
    got: list[bytes] = []
    with pytest.raises(InputError, match="middle of packet 2"):
        for rec in PcapReader(io.BytesIO(data[:-3])):
            got.append(rec.data)
    assert got == [pkt]


def test_corrupt_record_length() -> None:
    data = classic_pcap(1, [(0.0, FRAMES[0])]) + struct.pack("<IIII", 1, 0, 10_000_000, 10_000_000) + b"x" * 64
    got: list[bytes] = []
    with pytest.raises(InputError, match=r"corrupt capture: packet 2 claims 10000000"):
        for rec in PcapReader(io.BytesIO(data)):
            got.append(rec.data)
    assert got == [FRAMES[0]]


def test_corrupt_pcapng_block_length() -> None:
    data = shb() + idb(1) + struct.pack("<II", 6, 7) + b"\0" * 40
    with pytest.raises(InputError, match=r"corrupt pcapng.*length of 7"):
        read_all(data)


def test_every_link_type_is_read_and_counted() -> None:
    # which of them carry TCP is tshark's to say (dissect.py); the reader passes every one on
    reader = PcapReader(io.BytesIO(classic_pcap(105, [(0.0, b"x"), (1.0, b"y")])))
    assert [(r.linktype, r.data) for r in reader] == [(105, b"x"), (105, b"y")]
    assert reader.linktype_counts() == {105: 2}


def test_link_types_of_pcapng_interfaces_and_sections_are_counted() -> None:
    pkt = tcp_ip("10.0.0.1", "10.0.0.2", 1, 2, 3, 4, 0x18, b"hello")
    data = (shb() + idb(101) + idb(147) + idb(1) + epb(0, 1, pkt) + epb(1, 2, b"usb") + epb(1, 3, b"usb")
            + shb() + idb(147) + epb(0, 4, b"usb"))
    reader = PcapReader(io.BytesIO(data))
    assert [r.linktype for r in reader] == [101, 147, 147, 147]
    assert reader.linktype_counts() == {101: 1, 147: 3}


def test_link_type_names() -> None:
    assert linktype_name(105) == "105 (IEEE802_11)"
    assert linktype_name(228) == "228 (IPV4)"
    assert linktype_name(150) == "150 (USER3)"
    assert linktype_name(4242) == "4242"


# ---- real captures --------------------------------------------------------------------------------------------


def test_reads_real_tcpdump_capture_through_a_pipe(tmp_path: Path) -> None:
    path = tmp_path / "lo.pcap"
    srv, port = listener("127.0.0.1")
    with srv, tcpdump(path, "lo", f"tcp port {port}"):
        loopback_traffic(srv, [b"a" * 100, b"b" * 3000])
    data = path.read_bytes()
    rfd, wfd = os.pipe()

    def writer() -> None:
        with os.fdopen(wfd, "wb") as w:
            for i in range(0, len(data), 1000):  # odd-sized writes: records straddle pipe reads
                w.write(data[i : i + 1000])

    t = threading.Thread(target=writer, daemon=True)
    t.start()
    with os.fdopen(rfd, "rb") as r:
        reader = PcapReader(r)
        recs = list(reader)
    t.join(timeout=10)
    assert len(recs) >= 6  # handshake, data, fin exchange
    assert reader.header_bytes() + b"".join(r.raw for r in recs) == data
    assert all(r.linktype == 1 and len(r.data) == r.orig_len for r in recs)


# ---- compressed captures (what tshark opens: gzip, zstd, lz4), compressed by the real tools --------------------

COMPRESSORS = {"gzip": ["gzip", "-c"], "zstd": ["zstd", "-q", "-c"], "lz4": ["lz4", "-q", "-c"]}


@pytest.fixture(scope="module")
def real_captures(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """One real loopback capture, as tcpdump wrote it (pcap) and as pcapng (editcap -F pcapng)."""
    tmp = tmp_path_factory.mktemp("compressed")
    path = tmp / "lo.pcap"
    srv, port = listener("127.0.0.1")
    with srv, tcpdump(path, "lo", f"tcp port {port}"):
        loopback_traffic(srv, [b"c%04d" % i * (1 + i * 7) for i in range(60)], connections=2)
    subprocess.run(["editcap", "-F", "pcapng", str(path), str(tmp / "lo.pcapng")], check=True, timeout=60)
    return {"pcap": path.read_bytes(), "pcapng": (tmp / "lo.pcapng").read_bytes()}


def compress(kind: str, data: bytes) -> bytes:
    return subprocess.run(COMPRESSORS[kind], input=data, capture_output=True, check=True, timeout=60).stdout


@pytest.mark.parametrize("fmt", ["pcap", "pcapng"])
@pytest.mark.parametrize("kind", sorted(COMPRESSORS))
def test_compressed_capture_reads_as_the_uncompressed_one(real_captures: dict[str, bytes], kind: str,
                                                          fmt: str) -> None:
    plain = real_captures[fmt]
    packed = compress(kind, plain)
    assert packed[:2] != plain[:2] and len(packed) < len(plain)
    want = PcapReader(io.BytesIO(plain))
    expected = [(r.ts, r.linktype, r.data, r.raw) for r in want]
    # through a pipe-like stream that hands over 1000 bytes at a time, so frames straddle reads
    reader = PcapReader(io.BufferedReader(Trickle(packed, 1000), buffer_size=1000))
    got = list(reader)
    assert len(got) >= 12
    assert [(r.ts, r.linktype, r.data, r.raw) for r in got] == expected
    assert reader.header_bytes() == want.header_bytes()
    assert reader.compression == kind


@pytest.mark.parametrize("kind", sorted(COMPRESSORS))
def test_concatenated_compressed_streams_read_to_their_end(real_captures: dict[str, bytes], kind: str) -> None:
    # `cat a.gz b.gz`: the second member continues the same capture (here: a second pcapng section)
    plain = real_captures["pcapng"]
    got = read_all(compress(kind, plain) + compress(kind, plain))
    assert b"".join(r.raw for r in got) == 2 * b"".join(r.raw for r in read_all(plain))


@pytest.mark.parametrize("kind", sorted(COMPRESSORS))
def test_compressed_capture_cut_short_keeps_the_good_records(real_captures: dict[str, bytes], kind: str) -> None:
    plain = real_captures["pcap"]
    packed = compress(kind, plain)
    good: list[Record] = []
    with pytest.raises(InputError, match=rf"truncated.*{kind}|truncated: the capture ends"):
        for rec in PcapReader(io.BytesIO(packed[: len(packed) * 3 // 4])):
            good.append(rec)
    whole = read_all(plain)
    assert good == whole[: len(good)]


@pytest.mark.parametrize("kind", sorted(COMPRESSORS))
def test_corrupt_compressed_capture_is_one_input_error(real_captures: dict[str, bytes], kind: str) -> None:
    packed = bytearray(compress(kind, real_captures["pcap"]))
    middle = len(packed) // 2
    packed[middle : middle + 64] = bytes(64)
    with pytest.raises(InputError, match=rf"corrupt {kind} data|corrupt capture|truncated"):
        read_all(bytes(packed))


@pytest.mark.parametrize("kind", sorted(COMPRESSORS))
def test_compressed_bomb_is_read_a_chunk_at_a_time(kind: str) -> None:
    # 64 MiB of zeros after a pcap header compress to a few KiB; read as empty 16-byte records. Decompressed all at
    # once, the first batch would be 4 million records: one read chunk's worth is all it may hold.
    data = classic_header(101) + bytes(64 << 20)
    reader = PcapReader(io.BytesIO(compress(kind, data)))
    batch = reader.read_batch()
    assert 0 < len(batch) <= 256 * 1024 // 16


def test_empty_gzip_capture() -> None:
    with pytest.raises(InputError, match="gzip-compressed capture is empty"):
        read_all(compress("gzip", b""))
