"""Incremental pcap / pcapng reader and a writer that keeps its file a valid capture at every flush.

The reader never holds more than one read chunk plus one record: live captures arrive over a pipe and can run for
days. Each record keeps its exact input bytes (`raw`) so it can be passed through to tshark or teed to a file
without re-encoding.
"""

from __future__ import annotations

import os
import struct
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import BinaryIO

from .decompress import MAGIC_LEN, Decompressed, compression
from .errors import InputError

CHUNK = 256 * 1024
MAX_CAPLEN = 262144  # tcpdump's and Wireshark's largest snap length: anything above is a corrupt length
MAX_BLOCK = 16 * 1024 * 1024  # pcapng blocks that are not packets (name tables, comments) are small

LINKTYPE_NULL = 0
LINKTYPE_EN10MB = 1
LINKTYPE_RAW = 101
LINKTYPE_LOOP = 108
LINKTYPE_LINUX_SLL = 113
LINKTYPE_LINUX_SLL2 = 276
LINKTYPE_IPV4 = 228
LINKTYPE_IPV6 = 229
# Link types whose IP header dissect.py finds itself (the fast path). Every other link type is read too: tshark
# says which of its frames carry TCP, and the payload is found from what it says (dissect.locate_payload).
# 12 and 14 are DLT_RAW as some BSDs number it in classic pcap files.
FAST_LINKTYPES = {0: "NULL", 1: "EN10MB", 12: "RAW", 14: "RAW", 101: "RAW", 108: "LOOP",
                  113: "LINUX_SLL", 228: "IPV4", 229: "IPV6", 276: "LINUX_SLL2"}
# Names of other link types a user may meet (tcpdump -L / pcap-linktype(7) spelling), for messages.
_OTHER_NAMES = {9: "PPP", 10: "FDDI", 50: "PPP_HDLC", 51: "PPP_ETHER", 104: "C_HDLC", 105: "IEEE802_11",
                119: "PRISM_HEADER", 127: "IEEE802_11_RADIOTAP", 163: "IEEE802_11_AVS", 192: "PPI",
                220: "USB_LINUX_MMAPPED", 249: "NETLINK", 253: "NETLINK"}


def linktype_name(linktype: int) -> str:
    """`105 (IEEE802_11)`, or the bare number for a link type without a known name."""
    name = FAST_LINKTYPES.get(linktype) or _OTHER_NAMES.get(linktype)
    if name is None and 147 <= linktype <= 162:
        name = f"USER{linktype - 147}"
    return f"{linktype} ({name})" if name else str(linktype)

_PCAP_MAGICS = {
    b"\xd4\xc3\xb2\xa1": ("<", 1e-6),
    b"\xa1\xb2\xc3\xd4": (">", 1e-6),
    b"\x4d\x3c\xb2\xa1": ("<", 1e-9),
    b"\xa1\xb2\x3c\x4d": (">", 1e-9),
}
_SHB = 0x0A0D0D0A
_IDB = 0x00000001
_PB = 0x00000002
_SPB = 0x00000003
# Smallest valid block of each type: header and trailer (12) plus the fixed fields.
_MIN_BLOCK = {0x0A0D0D0A: 28, 0x00000001: 20, 0x00000006: 32, 0x00000002: 32, _SPB: 16}
_EPB = 0x00000006
_BOM = 0x1A2B3C4D


@dataclass(slots=True)
class Record:
    """One captured packet."""

    ts: float
    linktype: int
    data: bytes
    orig_len: int
    raw: bytes  # the record (classic) or block (pcapng) exactly as in the input
    # The file header that makes `raw` meaningful: classic global header, or the current pcapng SHB followed by
    # every IDB seen so far in its section. The same object is shared by every record until it changes, so a
    # passthrough consumer compares by identity and re-emits only when it changed (see PcapWriter.write_record).
    header: bytes = b""
    frame: int = 0  # 1-based position in the input (PcapReader numbers them)
    # Where the TCP payload starts in `data`, once a reader of the headers has found it for certain (0: not known).
    # The dissector's feeder finds it to cut what tshark is handed; its reader then takes the payload from there.
    payload_at: int = 0


@dataclass(slots=True)
class _Interface:
    linktype: int
    snaplen: int
    tsunit: float  # seconds per timestamp unit
    tsoffset: int  # seconds added to every timestamp
    records: int = 0  # packets read on it


@dataclass
class _Section:
    order: str  # struct byte-order prefix
    header: bytes
    interfaces: list[_Interface] = field(default_factory=list)


def _hex(data: bytes) -> str:
    return " ".join(f"{b:02x}" for b in data[:8])


def _read_chunk(stream: BinaryIO) -> bytes:
    # read1 returns what a pipe has right now instead of waiting for a full chunk: keeps live streams responsive.
    read1 = getattr(stream, "read1", None)
    data = read1(CHUNK) if read1 is not None else stream.read(CHUNK)
    return bytes(data) if data else b""


class PcapReader:
    """Reads classic pcap or pcapng from a stream, record by record; gzip, zstd or lz4 compressed too.

    `read_batch()` returns every whole record already buffered (reading the stream at most until one record is
    whole), which lets a feeder forward everything available now without waiting for more. Damage raises
    InputError, but only once every whole record before it has been returned.
    """

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream
        self._buf = b""
        self._pos = 0
        self._eof = False
        self._error: InputError | None = None
        self._started = False
        self._classic: tuple[str, float, int, bytes] | None = None  # order, ts unit, linktype, header
        self._section: _Section | None = None
        self.count = 0  # records returned so far
        self.compression: str | None = None  # "gzip", "zstd" or "lz4" when the input is compressed
        self._done_counts: dict[int, int] = {}  # records per link type in pcapng sections already ended

    # ---- public ---------------------------------------------------------------------------------------------

    def header_bytes(self) -> bytes:
        """What a fresh consumer needs before the next record."""
        if self._classic is not None:
            return self._classic[3]
        if self._section is not None:
            return self._section.header
        return b""

    def linktype_counts(self) -> dict[int, int]:
        """Records read so far per link type (counted per interface, so reading costs nothing per record)."""
        if self._classic is not None:
            return {self._classic[2]: self.count} if self.count else {}
        counts = dict(self._done_counts)
        for iface in self._section.interfaces if self._section is not None else []:
            if iface.records:
                counts[iface.linktype] = counts.get(iface.linktype, 0) + iface.records
        return counts

    def __iter__(self) -> Iterator[Record]:
        while True:
            batch = self.read_batch()
            if not batch:
                return
            yield from batch

    def read_batch(self) -> list[Record]:
        """Whole records available now; [] at the end of the input. Raises InputError after the good records."""
        if self._error is not None:
            raise self._error
        out: list[Record] = []
        try:
            if not self._started:
                self._start()
            while True:
                if self._classic is not None:
                    self._parse_classic(out)
                else:
                    self._parse_pcapng(out)
                if out:
                    return out
                if self._eof:
                    self._at_eof()
                    return out
                self._fill()
        except (InputError, struct.error) as exc:
            # struct.error means a field ran past its block: the length checks below should have said so first,
            # but whatever a damaged capture looks like, the user gets the one-line message.
            err = exc if isinstance(exc, InputError) else InputError(
                f"corrupt capture: a block before packet {self.count + 1} is too short for its fields; everything "
                "before it was used, capture again")
            if out:
                self._error = err
                return out
            raise err from None

    # ---- buffer ---------------------------------------------------------------------------------------------

    def _avail(self) -> int:
        return len(self._buf) - self._pos

    def _fill(self) -> None:
        chunk = _read_chunk(self._stream)
        if not chunk:
            self._eof = True
            return
        if self._pos:
            self._buf = self._buf[self._pos :] + chunk
            self._pos = 0
        else:
            self._buf += chunk

    def _need(self, n: int) -> bool:
        """Buffer at least n bytes; False if the input ends first."""
        while self._avail() < n and not self._eof:
            self._fill()
        return self._avail() >= n

    def _at_eof(self) -> None:
        left = self._avail()
        if left:
            raise InputError(
                f"truncated: the capture ends in the middle of packet {self.count + 1} ({left} bytes of it); "
                f"everything before it was used"
            )

    # ---- start ----------------------------------------------------------------------------------------------

    def _start(self) -> None:
        self._need(4)
        if self._avail() == 0:
            raise InputError("the capture is empty: capture with tcpdump -w FILE or kubectl mirror -w FILE")
        kind = compression(self._buf[self._pos : self._pos + MAGIC_LEN])
        if kind is not None:
            # From here on the stream is the decompressed capture; what was read so far is its start.
            self._stream = Decompressed(kind, self._stream, self._buf[self._pos :], CHUNK)  # type: ignore[assignment]
            self._buf, self._pos, self._eof = b"", 0, False
            self.compression = kind
            self._need(4)
            if self._avail() == 0:
                raise InputError(f"the {kind}-compressed capture is empty: capture with tcpdump -w FILE or "
                                 "kubectl mirror -w FILE")
        head = self._buf[self._pos : self._pos + 4]
        if len(head) < 4:
            raise InputError(f"not a pcap or pcapng capture: only {len(head)} bytes; capture with tcpdump -w FILE "
                             "or kubectl mirror -w FILE")
        if head in _PCAP_MAGICS:
            if not self._need(24):
                raise InputError(
                    f"truncated pcap header ({self._avail()} of 24 bytes): the file was cut short, capture it again"
                )
            order, unit = _PCAP_MAGICS[head]
            hdr = self._buf[self._pos : self._pos + 24]
            network = struct.unpack_from(order + "I", hdr, 20)[0]
            linktype = network & 0x03FFFFFF  # upper bits carry FCS information
            self._classic = (order, unit, linktype, hdr)
            self._pos += 24
        elif struct.unpack_from("<I", head)[0] == _SHB:
            if not self._need(12):
                raise InputError("truncated pcapng header: the file was cut short, capture it again")
        else:
            shown = self._buf[self._pos : self._pos + 8]
            text = "".join(chr(b) if 32 <= b < 127 else "." for b in shown)
            raise InputError(
                f"not a pcap or pcapng capture (starts with {_hex(shown)} {text!r}): is it a text file? "
                f"capture with tcpdump -w FILE or kubectl mirror -w FILE"
            )
        self._started = True

    # ---- classic pcap ---------------------------------------------------------------------------------------

    def _parse_classic(self, out: list[Record]) -> None:
        assert self._classic is not None
        order, unit, linktype, header = self._classic
        hdr = struct.Struct(order + "IIII")
        buf, pos, end = self._buf, self._pos, len(self._buf)
        count = self.count
        try:
            while pos + 16 <= end:
                sec, frac, caplen, origlen = hdr.unpack_from(buf, pos)
                if caplen > MAX_CAPLEN:
                    raise InputError(
                        f"corrupt capture: packet {count + 1} claims {caplen} captured bytes (more than "
                        f"{MAX_CAPLEN}); everything before it was used, capture again"
                    )
                stop = pos + 16 + caplen
                if stop > end:
                    break
                raw = buf[pos:stop]
                out.append(Record(sec + frac * unit, linktype, raw[16:], origlen, raw, header, count + 1))
                pos = stop
                count += 1
        finally:
            self._pos = pos
            self.count = count

    # ---- pcapng ---------------------------------------------------------------------------------------------

    def _parse_pcapng(self, out: list[Record]) -> None:
        while self._avail() >= 12:
            buf, pos = self._buf, self._pos
            btype_le = struct.unpack_from("<I", buf, pos)[0]
            if btype_le == _SHB:
                bom = buf[pos + 8 : pos + 12]
                if bom == b"\x4d\x3c\x2b\x1a":
                    order = "<"
                elif bom == b"\x1a\x2b\x3c\x4d":
                    order = ">"
                else:
                    raise InputError(f"corrupt pcapng section header (byte-order magic {_hex(bom)}): capture again")
            else:
                if self._section is None:
                    raise InputError("corrupt pcapng: the file does not start with a section header block")
                order = self._section.order
            btype, blen = struct.unpack_from(order + "II", buf, pos)
            limit = MAX_CAPLEN + 4096 if btype in (_EPB, _PB, _SPB) else MAX_BLOCK
            if blen < _MIN_BLOCK.get(btype, 12) or blen % 4 or blen > limit:
                raise InputError(
                    f"corrupt pcapng: block before packet {self.count + 1} claims a length of {blen} bytes; "
                    f"everything before it was used, capture again"
                )
            if self._avail() < blen:
                return
            block = buf[pos : pos + blen]
            if struct.unpack_from(order + "I", block, blen - 4)[0] != blen:
                raise InputError(
                    f"corrupt pcapng: block lengths disagree before packet {self.count + 1}; "
                    f"everything before it was used, capture again"
                )
            self._pos = pos + blen
            if btype == _SHB:
                if self._section is not None:  # a stream of many sections must not keep them all
                    self._done_counts = self.linktype_counts()
                self._section = _Section(order, block)
            elif btype == _IDB:
                self._add_interface(block, order)
            elif btype in (_EPB, _PB, _SPB):
                rec = self._packet(btype, block, order)
                out.append(rec)
                self.count += 1
            # every other block type (statistics, name resolution, comments, secrets) is not needed

    def _add_interface(self, block: bytes, order: str) -> None:
        assert self._section is not None
        linktype, _, snaplen = struct.unpack_from(order + "HHI", block, 8)
        unit, offset = 1e-6, 0
        pos, end = 16, len(block) - 4
        while pos + 4 <= end:
            code, length = struct.unpack_from(order + "HH", block, pos)
            if code == 0:
                break
            if pos + 4 + length > end:
                raise InputError(f"corrupt pcapng: an interface option runs past its block before packet "
                                 f"{self.count + 1}; capture again")
            value = block[pos + 4 : pos + 4 + length]
            if code == 9 and length >= 1:  # if_tsresol
                v = value[0]
                unit = 2.0 ** -(v & 0x7F) if v & 0x80 else 10.0 ** -v
            elif code == 14 and length >= 8:  # if_tsoffset
                offset = struct.unpack_from(order + "q", value)[0]
            pos += 4 + length + (-length % 4)
        self._section.interfaces.append(_Interface(linktype, snaplen, unit, offset))
        # a new bytes object on purpose: consumers detect header changes by identity
        self._section.header = self._section.header + block

    def _interface(self, ifid: int) -> _Interface:
        assert self._section is not None
        if ifid >= len(self._section.interfaces):
            raise InputError(
                f"corrupt pcapng: packet {self.count + 1} refers to interface {ifid}, which was never described; "
                f"capture again"
            )
        iface = self._section.interfaces[ifid]
        iface.records += 1
        return iface

    def _packet(self, btype: int, block: bytes, order: str) -> Record:
        assert self._section is not None
        blen = len(block)
        if btype == _EPB:
            ifid, hi, lo, caplen, origlen = struct.unpack_from(order + "IIIII", block, 8)
            start = 28
        elif btype == _PB:
            ifid, _, hi, lo, caplen, origlen = struct.unpack_from(order + "HHIIII", block, 8)
            start = 28
        else:  # SPB: always interface 0, captured length is implied by the block and the snap length
            (origlen,) = struct.unpack_from(order + "I", block, 8)
            ifid, hi, lo, start = 0, 0, 0, 12
            caplen = min(origlen, blen - 16)
        iface = self._interface(ifid)
        if btype == _SPB and iface.snaplen:
            caplen = min(caplen, iface.snaplen)
        if caplen > MAX_CAPLEN or start + caplen > blen - 4:
            raise InputError(
                f"corrupt pcapng: packet {self.count + 1} claims {caplen} captured bytes in a {blen}-byte block; "
                f"everything before it was used, capture again"
            )
        ts = ((hi << 32) | lo) * iface.tsunit + iface.tsoffset if btype != _SPB else 0.0
        return Record(ts, iface.linktype, block[start : start + caplen], origlen, block, self._section.header,
                      self.count + 1)


# ---- writing ----------------------------------------------------------------------------------------------------


def cut_record(rec: Record, cut: int) -> bytes:
    """`rec.raw` holding only the first `cut` bytes of the packet (captured length cut, original length kept), in
    the record's own format and byte order; the whole record where that format cannot say so (PB, SPB)."""
    if cut >= len(rec.data):
        return rec.raw
    header, raw = rec.header, rec.raw
    magic = _PCAP_MAGICS.get(header[:4])
    if magic is not None:
        order = magic[0]
        return raw[:8] + struct.pack(order + "II", cut, rec.orig_len) + rec.data[:cut]
    order = "<" if header[8:12] == b"\x4d\x3c\x2b\x1a" else ">"
    (btype,) = struct.unpack_from(order + "I", raw, 0)
    if btype != _EPB:
        return raw
    pad = -cut % 4
    total = 32 + cut + pad
    # Options (comments, flags, hashes) are left out: they would describe the whole packet.
    return (struct.pack(order + "II", _EPB, total) + raw[8:20] + struct.pack(order + "II", cut, rec.orig_len)
            + rec.data[:cut] + b"\0" * pad + struct.pack(order + "I", total))


def classic_header(linktype: int, *, nanosecond: bool = False, snaplen: int = MAX_CAPLEN, big_endian: bool = False
                   ) -> bytes:
    order = ">" if big_endian else "<"
    magic = 0xA1B23C4D if nanosecond else 0xA1B2C3D4
    return struct.pack(order + "IHHiIII", magic, 2, 4, 0, 0, snaplen, linktype)


def classic_record(ts: float, data: bytes, *, orig_len: int | None = None, nanosecond: bool = False,
                   big_endian: bool = False) -> bytes:
    order = ">" if big_endian else "<"
    scale = 1_000_000_000 if nanosecond else 1_000_000
    units = round(ts * scale)
    sec, frac = divmod(units, scale)
    return struct.pack(order + "IIII", sec, frac, len(data), len(data) if orig_len is None else orig_len) + data


def classic_pcap(linktype: int, packets: Iterable[tuple[float, bytes]], *, nanosecond: bool = False,
                 big_endian: bool = False) -> bytes:
    """A whole classic pcap in memory: for building synthetic captures in tests."""
    parts = [classic_header(linktype, nanosecond=nanosecond, big_endian=big_endian)]
    parts += [classic_record(ts, data, nanosecond=nanosecond, big_endian=big_endian) for ts, data in packets]
    return b"".join(parts)


class PcapWriter:
    """Writes whole records only, so the output is a valid capture whenever it has been flushed.

    For `-w FILE`: `write_record()` passes input records through byte for byte (re-emitting headers when a pcapng
    input starts a new section or adds an interface). With `linktype=`, starts a classic pcap of its own and
    accepts `write_packet()`. Files are created 0600: captures hold secrets.
    """

    def __init__(self, target: str | os.PathLike[str] | BinaryIO, *, linktype: int | None = None,
                 nanosecond: bool = False, flush_bytes: int = 1 << 20, flush_seconds: float = 1.0) -> None:
        if isinstance(target, (str, os.PathLike)):
            try:
                fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                # The mode above applies only to a new file: an existing one keeps its own, maybe world-readable.
                os.fchmod(fd, 0o600)
            except OSError as exc:
                raise InputError(f"cannot write {os.fspath(target)}: {exc.strerror}; choose another -w path") from None
            self._out: BinaryIO = os.fdopen(fd, "wb", buffering=0)
            self._owned = True
        else:
            self._out = target
            self._owned = False
        self._pending: list[bytes] = []
        self._pending_len = 0
        self._flush_bytes = flush_bytes
        self._flush_seconds = flush_seconds
        self._last_flush = time.monotonic()
        self._header: bytes | None = None
        self._nanosecond = nanosecond
        self._closed = False
        self._whole = 0  # bytes of whole records written so far
        if linktype is not None:
            self._header = classic_header(linktype, nanosecond=nanosecond)
            self._append(self._header)

    def write_header(self, header: bytes) -> None:
        """Start the output with this header (classic global header or pcapng SHB+IDBs)."""
        self._header = header
        self._append(header)

    def write_record(self, rec: Record) -> None:
        if rec.header is not self._header:
            old = self._header
            if old is None:
                self._append(rec.header)
            elif rec.header.startswith(old):
                self._append(rec.header[len(old) :])  # interfaces added to the same pcapng section
            elif rec.header[:4] in _PCAP_MAGICS or old[:4] in _PCAP_MAGICS:
                # A classic pcap has one header for the whole file (e.g. a reconnected live stream):
                # continuing is only right if the records keep their meaning.
                if rec.header[:4] != old[:4] or rec.header[20:24] != old[20:24]:
                    raise InputError("the capture format changed mid-stream, so -w cannot continue one file: "
                                     "restart with a new -w path")
            else:
                self._append(rec.header)  # a new pcapng section
            self._header = rec.header
        self._append(rec.raw)

    def write_packet(self, ts: float, data: bytes, orig_len: int | None = None) -> None:
        self._append(classic_record(ts, data, orig_len=orig_len, nanosecond=self._nanosecond))

    def _append(self, data: bytes) -> None:
        self._pending.append(data)
        self._pending_len += len(data)
        if self._pending_len >= self._flush_bytes or time.monotonic() - self._last_flush >= self._flush_seconds:
            self.flush()

    def flush(self) -> None:
        if self._pending:
            # one write of whole records: a reader of the file never sees half a record after this returns
            data = b"".join(self._pending)
            self._pending.clear()
            self._pending_len = 0
            view = memoryview(data)
            try:
                while view:
                    n = self._out.write(view)
                    view = view[n if n is not None else len(view) :]
                self._out.flush()
            except OSError:
                self._trim()
                raise
            self._whole += len(data)
        self._last_flush = time.monotonic()

    def _trim(self) -> None:
        """After a failed write (disk full), cut our file back to its last whole record: it stays readable."""
        if not self._owned:
            return  # a pipe or stdout: what went out cannot be taken back
        try:
            os.ftruncate(self._out.fileno(), self._whole)
        except OSError:
            pass

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self.flush()
        finally:
            if self._owned:
                self._out.close()

    def __enter__(self) -> PcapWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_capture(path: str, stack: ExitStack) -> BinaryIO:
    """The capture to read, unbuffered (`-` is stdin); `stack` closes it. Errors say what to do."""
    if path == "-":
        return sys.stdin.buffer
    try:
        return stack.enter_context(open(path, "rb", buffering=0))
    except FileNotFoundError:
        raise InputError(f"cannot read {path}: no such file") from None
    except IsADirectoryError:
        raise InputError(f"cannot read {path}: it is a directory, not a pcap file") from None
    except PermissionError:
        raise InputError(f"cannot read {path}: permission denied") from None
