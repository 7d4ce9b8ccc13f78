"""Compressed captures read as a stream: gzip, zstd and lz4, the compressions tshark itself opens.

Users keep long captures compressed, and `zcat x.pcap.gz | ...` loses the file name in error messages, so the
reader recognises the compression by its magic bytes and decompresses on the fly: never to disk, never more than
one read chunk of output at a time (a small compressed input can expand enormously). Concatenated streams
(`cat a.gz b.gz`, zstd's and lz4's multi-frame files) are read to their end, as tshark does.
"""

from __future__ import annotations

import zlib
from typing import BinaryIO, Protocol

from .errors import InputError, MirrorError, ToolError

# Magic numbers at the start of each format (RFC 1952, RFC 8878, the LZ4 frame format).
_MAGICS = {
    b"\x1f\x8b": "gzip",
    b"\x28\xb5\x2f\xfd": "zstd",
    b"\x04\x22\x4d\x18": "lz4",
}
MAGIC_LEN = 4


def compression(head: bytes) -> str | None:
    """The compression whose magic starts `head` (its first MAGIC_LEN bytes), or None."""
    for magic, name in _MAGICS.items():
        if head.startswith(magic):
            return name
    return None


class _Codec(Protocol):
    """One compressed member/frame: the interface of bz2/lzma/compression.zstd decompressor objects."""

    @property
    def eof(self) -> bool: ...

    @property
    def needs_input(self) -> bool: ...

    @property
    def unused_data(self) -> bytes: ...

    def decompress(self, data: bytes, max_length: int = -1) -> bytes: ...


class _Gzip:
    """zlib's decompressobj behind the needs_input interface (its leftovers come back in unconsumed_tail)."""

    def __init__(self) -> None:
        self._d = zlib.decompressobj(16 + zlib.MAX_WBITS)  # gzip header and trailer, checked
        self._tail = b""

    @property
    def eof(self) -> bool:
        return self._d.eof

    @property
    def needs_input(self) -> bool:
        return not self._tail

    @property
    def unused_data(self) -> bytes:
        return self._d.unused_data

    def decompress(self, data: bytes, max_length: int = -1) -> bytes:
        out = self._d.decompress(self._tail + data if self._tail else data, max(max_length, 0))
        self._tail = self._d.unconsumed_tail
        return out


def _codec(kind: str) -> _Codec:
    if kind == "gzip":
        return _Gzip()
    if kind == "zstd":
        try:
            from compression import zstd  # type: ignore[import-not-found]  # Python 3.14+
        except ImportError:
            try:
                from backports import zstd  # the same module, for older Pythons
            except ImportError:
                raise ToolError("reading a zstd-compressed capture needs the Python package backports.zstd: "
                                "reinstall kubectl-mirror, or decompress it first (zstd -d FILE)") from None
        codec: _Codec = zstd.ZstdDecompressor()
        return codec
    try:
        import lz4.frame
    except ImportError:
        raise ToolError("reading an lz4-compressed capture needs the Python package lz4: reinstall kubectl-mirror, "
                        "or decompress it first (lz4 -d FILE)") from None
    lz4_codec: _Codec = lz4.frame.LZ4FrameDecompressor()
    return lz4_codec


class Decompressed:
    """The decompressed bytes of `stream`, whose first bytes (already read by the caller) are `head`.

    Offers what PcapReader uses of a stream: read1 (and read) returning at most `n` bytes, b"" only at the end.
    A stream cut short or damaged raises InputError once everything before the damage has been returned.
    """

    def __init__(self, kind: str, stream: BinaryIO, head: bytes, chunk: int = 256 * 1024) -> None:
        self.kind = kind
        self._stream = stream
        self._pending = head  # compressed bytes read but not yet given to a codec
        self._chunk = chunk
        self._codec = _codec(kind)
        self._fed = False  # the current codec has been given input: it is a member that must end properly
        self._raw_eof = False
        self._done = False
        self.compressed_read = len(head)

    def _raw(self) -> bytes:
        if self._pending:
            data, self._pending = self._pending, b""
            return data
        if self._raw_eof:
            return b""
        read1 = getattr(self._stream, "read1", None)
        data = read1(self._chunk) if read1 is not None else self._stream.read(self._chunk)
        if not data:
            self._raw_eof = True
            return b""
        self.compressed_read += len(data)
        return bytes(data)

    def read1(self, n: int = -1) -> bytes:
        if self._done:
            return b""
        limit = n if n > 0 else self._chunk
        try:
            while True:
                codec = self._codec
                if codec.eof:
                    # A member ended: another may follow (concatenated files), or this is the end.
                    left = codec.unused_data or self._raw()
                    if not left:
                        self._done = True
                        return b""
                    self._codec, self._fed = _codec(self.kind), False
                    self._pending = left
                    continue
                data = b""
                if codec.needs_input:
                    data = self._raw()
                    if not data:
                        out = codec.decompress(b"", limit)  # whatever it still holds
                        if out:
                            return out
                        if self._fed and not codec.eof:
                            raise InputError(f"truncated: the {self.kind}-compressed capture is cut short "
                                             f"(after {self.compressed_read} compressed bytes); everything "
                                             f"before it was used")
                        self._done = True
                        return b""
                    self._fed = True
                out = codec.decompress(data, limit)
                if out:
                    return out
        except (MirrorError, OSError):  # OSError: reading the input itself failed, which is no damage to it
            self._done = True
            raise
        except Exception as exc:
            # Each library has its own error class (zlib.error, ZstdError, lz4's RuntimeError): all mean damage.
            self._done = True
            raise InputError(f"corrupt {self.kind} data in the capture ({exc}); everything before it was used, "
                             f"capture again") from None

    # PcapReader only ever asks for a bounded amount; read(-1) gives one chunk, not the whole (maybe huge) rest.
    read = read1
