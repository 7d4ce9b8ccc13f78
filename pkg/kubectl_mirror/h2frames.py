"""HTTP/2 frame headers, walked for the streams a direction's frames end (sans-I/O; payloads are skipped).

Turn-taking needs to know which streams an HTTP/2 answer finished, in production's capture and from the local
server, on every connection and at capture speed: only the 9-byte frame headers are read here, never HPACK or
bodies (h2wire does that, where headers matter).
"""

from __future__ import annotations

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"  # what an HTTP/2 client sends first (RFC 9113, 3.4)
_DATA, _HEADERS, _RST_STREAM, _SETTINGS = 0, 1, 3, 4
_END_STREAM = 0x1
_MASK = 0xFFFFFFFF
_HALF = 1 << 31


def is_server_start(data: bytes) -> bool:
    """Do a server's first bytes open as HTTP/2 does: a SETTINGS frame (not an ACK) on stream 0?"""
    return (len(data) >= 9 and data[3] == _SETTINGS and data[4] == 0 and data[5:9] == b"\0\0\0\0"
            and int.from_bytes(data[0:3], "big") % 6 == 0)


class StreamEnds:
    """The frames of one direction, fed in order: which streams each piece of bytes ended.

    A stream ends with END_STREAM on DATA or HEADERS, or with RST_STREAM.
    """

    __slots__ = ("_head", "_skip")

    def __init__(self) -> None:
        self._head = b""
        self._skip = 0

    def feed(self, data: bytes) -> list[int]:
        ended: list[int] = []
        i, n = 0, len(data)
        while i < n:
            if self._skip:
                step = min(self._skip, n - i)
                self._skip -= step
                i += step
                continue
            need = 9 - len(self._head)
            self._head += data[i:i + need]
            i += need
            if len(self._head) < 9:
                break
            head, self._head = self._head, b""
            kind, flags = head[3], head[4]
            stream = int.from_bytes(head[5:9], "big") & 0x7FFFFFFF
            if stream and (kind == _RST_STREAM or (kind in (_DATA, _HEADERS) and flags & _END_STREAM)):
                ended.append(stream)
            self._skip = int.from_bytes(head[0:3], "big")
        return ended


class CapturedStreamEnds:
    """`StreamEnds` over captured segments, which may come again (retransmissions) or early (after a loss).

    `feed(seq, payload)` returns the streams ended, or None once the direction cannot be followed in order:
    bytes after a gap are never guessed at, and the caller stops asking.
    """

    __slots__ = ("_ends", "_nxt")

    def __init__(self, seq: int) -> None:
        self._ends = StreamEnds()
        self._nxt = seq

    def feed(self, seq: int, payload: bytes) -> list[int] | None:
        ahead = (seq - self._nxt) & _MASK
        if ahead == 0:
            data = payload
        elif ahead >= _HALF:  # starts before what was read: a retransmission, perhaps with new bytes after
            seen = (self._nxt - seq) & _MASK
            if seen >= len(payload):
                return []
            data = payload[seen:]
        else:
            return None
        self._nxt = (self._nxt + len(data)) & _MASK
        return self._ends.feed(data)
