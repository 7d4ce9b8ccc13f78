"""HTTP/2 cleartext, decoded passively from both directions of a captured connection (sans-I/O).

A connection is HTTP/2 when its client opens with the connection preface (prior knowledge), or when its first
request is an HTTP/1.1 `Upgrade: h2c` that the server accepted with 101 (RFC 7540 3.2; the client's preface then
follows its request, so the client's bytes alone tell it too). TLS is never looked into here.

Frames are read with `hyperframe` and header blocks with `hpack`, one HPACK decoder per direction: each side's
encoder keeps a dynamic table only the bytes from the connection's very start can rebuild, so a connection joined
mid-stream is never decoded (`Direction.state` says UNDECODABLE) and no header is ever guessed. An HPACK or
framing error stops the direction for good (BROKEN), for the same reason.

`Direction.feed(bytes)` returns `Frame2`s: the header blocks decoded, DATA, RST_STREAM, GOAWAY. `Exchanges` puts
both directions together into one `Exchange` per stream: request and response headers, bodies (up to a bound),
trailers, and for gRPC (`content-type: application/grpc...`) the status and the length-prefixed messages.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import hpack
import hpack.exceptions
import hyperframe.exceptions
import hyperframe.frame as hf

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
MAX_BODY = 1 << 20  # body bytes kept per message for comparison; the rest is counted, not stored
_MAX_HEAD = 64 << 10  # an HTTP/1.1 upgrade request head larger than this is not one
_MAX_HEADER_LIST = 1 << 20
_SETTINGS_HEADER_TABLE_SIZE = 0x1
# Headers of HTTP/1.1 that say how that connection is used: not carried over into the HTTP/2 request.
_H1_ONLY = frozenset({"connection", "upgrade", "http2-settings", "keep-alive", "proxy-connection", "te",
                      "transfer-encoding", "host"})

Headers = list[tuple[str, str]]


class State(enum.Enum):
    START = "start"  # nothing seen yet
    UPGRADE = "upgrade"  # inside the HTTP/1.1 request (client) or response (server) of an h2c upgrade
    FRAMES = "frames"  # decoding frames
    NOT_H2 = "not-h2"  # the connection is not HTTP/2 cleartext
    UNDECODABLE = "undecodable"  # joined mid-stream: the HPACK tables are unknown
    BROKEN = "broken"  # a framing or HPACK error: nothing after it can be trusted


class Kind(enum.Enum):
    HEADERS = "headers"
    DATA = "data"
    RESET = "reset"
    GOAWAY = "goaway"


@dataclass(slots=True)
class Frame2:
    """What one frame (or one HEADERS + CONTINUATION block) of a direction meant."""

    kind: Kind
    stream: int
    headers: Headers | None = None  # HEADERS: decoded, names lower-case as on the wire
    data: bytes = b""  # DATA: the payload, padding removed
    end_stream: bool = False
    code: int = 0  # RESET / GOAWAY: the error code; GOAWAY: `stream` is the last stream id


class Direction:
    """One direction of one connection: bytes in, `Frame2`s out."""

    def __init__(self, client: bool, partial: bool = False) -> None:
        self.client = client
        self.state = State.UNDECODABLE if partial else State.START
        self.error: str | None = None
        self.decoder = hpack.Decoder()
        self.decoder.max_header_list_size = _MAX_HEADER_LIST
        self.peer: Direction | None = None  # the other direction: SETTINGS here bound the HPACK table there
        self.upgraded = False  # the connection began with an HTTP/1.1 Upgrade: h2c
        self._buf = bytearray()
        self._pos = 0
        self._block: bytearray | None = None  # a header block waiting for its CONTINUATIONs
        self._block_stream = 0
        self._block_end = False
        self._block_push = False
        self._upgrade_body = 0  # client: bytes of the upgrade request's body still to come

    @property
    def decoding(self) -> bool:
        return self.state in (State.START, State.UPGRADE, State.FRAMES)

    def feed(self, data: bytes) -> list[Frame2]:
        if not data or not self.decoding:
            return []
        self._buf += data
        out: list[Frame2] = []
        try:
            if self.state is State.START:
                self._start(out)
            if self.state is State.UPGRADE:
                self._upgrade(out)
            if self.state is State.FRAMES:
                self._frames(out)
        except (hpack.exceptions.HPACKError, hyperframe.exceptions.HyperframeError, ValueError) as exc:
            self._stop(State.BROKEN, f"{type(exc).__name__}: {exc}")
        if self._pos > 65536 or self._pos == len(self._buf):
            del self._buf[:self._pos]
            self._pos = 0
        return out

    def _stop(self, state: State, why: str | None = None) -> None:
        self.state = state
        self.error = why
        self._buf = bytearray()
        self._pos = 0

    # -- before the frames ---------------------------------------------------------------------------------

    def _start(self, out: list[Frame2]) -> None:
        buf = self._buf
        if self.client:
            n = min(len(buf), len(PREFACE))
            if buf[:n] == PREFACE[:n]:
                if n == len(PREFACE):
                    self._pos = n
                    self.state = State.FRAMES
                return
            self.state = State.UPGRADE  # an HTTP/1.1 request that may ask for h2c
        else:
            # The server speaks frames at once (prior knowledge), or a 101 after an upgrade request.
            peer = self.peer
            if buf[:1] == b"H" or (peer is not None and peer.upgraded):
                self.state = State.UPGRADE
            else:
                self.state = State.FRAMES

    def _upgrade(self, out: list[Frame2]) -> None:
        buf = self._buf
        if self._upgrade_body:
            take = min(self._upgrade_body, len(buf) - self._pos)
            self._upgrade_body -= take
            out.append(Frame2(Kind.DATA, 1, data=bytes(buf[self._pos:self._pos + take]),
                              end_stream=not self._upgrade_body))
            self._pos += take
            if self._upgrade_body:
                return
        elif not self.upgraded or not self.client:
            end = buf.find(b"\r\n\r\n", self._pos)
            if end < 0:
                if len(buf) - self._pos > _MAX_HEAD or (self.client and not buf[:1].isalpha()):
                    self._stop(State.NOT_H2)
                return
            head = bytes(buf[self._pos:end]).decode("latin-1")
            self._pos = end + 4
            if self.client:
                request = _upgrade_request(head)
                if request is None:
                    self._stop(State.NOT_H2)
                    return
                headers, self._upgrade_body = request
                self.upgraded = True
                out.append(Frame2(Kind.HEADERS, 1, headers, end_stream=self._upgrade_body == 0))
                if self._upgrade_body:
                    body = min(self._upgrade_body, len(buf) - self._pos)
                    out.append(Frame2(Kind.DATA, 1, data=bytes(buf[self._pos:self._pos + body]),
                                      end_stream=body == self._upgrade_body))
                    self._upgrade_body -= body
                    self._pos += body
                    if self._upgrade_body:
                        return
            else:
                if not head.startswith(("HTTP/1.1 101", "HTTP/1.0 101")):
                    self._stop(State.NOT_H2)
                    return
                self.upgraded = True
                self.state = State.FRAMES
                return
        # Client: after its upgrade request (and body) comes the preface, once the 101 came back.
        n = min(len(buf) - self._pos, len(PREFACE))
        if bytes(buf[self._pos:self._pos + n]) != PREFACE[:n]:
            self._stop(State.NOT_H2)
            return
        if n == len(PREFACE):
            self._pos += n
            self.state = State.FRAMES

    # -- frames ----------------------------------------------------------------------------------------------

    def _frames(self, out: list[Frame2]) -> None:
        buf = self._buf
        mv = memoryview(buf)
        try:
            while len(buf) - self._pos >= 9:
                pos = self._pos
                frame, length = hf.Frame.parse_frame_header(mv[pos:pos + 9])
                if len(buf) - pos - 9 < length:
                    return
                frame.parse_body(mv[pos + 9:pos + 9 + length])
                self._pos = pos + 9 + length
                self._frame(frame, out)
                if self.state is not State.FRAMES:
                    return
        finally:
            mv.release()

    def _frame(self, frame: hf.Frame, out: list[Frame2]) -> None:
        if self._block is not None:
            if not isinstance(frame, hf.ContinuationFrame) or frame.stream_id != self._block_stream:
                raise ValueError("a header block was interrupted by another frame")
            self._block += frame.data
            if len(self._block) > _MAX_HEADER_LIST:
                # A header block no peer would accept (every decoder bounds it): not worth holding in memory.
                raise ValueError(f"a header block over {_MAX_HEADER_LIST} bytes")
            if "END_HEADERS" in frame.flags:
                self._end_block(out)
            return
        if isinstance(frame, hf.DataFrame):
            out.append(Frame2(Kind.DATA, frame.stream_id, data=bytes(frame.data),
                              end_stream="END_STREAM" in frame.flags))
        elif isinstance(frame, (hf.HeadersFrame, hf.PushPromiseFrame)):
            self._block = bytearray(frame.data)
            self._block_stream = frame.stream_id
            self._block_end = "END_STREAM" in frame.flags
            self._block_push = isinstance(frame, hf.PushPromiseFrame)
            if "END_HEADERS" in frame.flags:
                self._end_block(out)
        elif isinstance(frame, hf.RstStreamFrame):
            out.append(Frame2(Kind.RESET, frame.stream_id, code=frame.error_code))
        elif isinstance(frame, hf.GoAwayFrame):
            out.append(Frame2(Kind.GOAWAY, frame.last_stream_id, code=frame.error_code))
        elif isinstance(frame, hf.SettingsFrame) and "ACK" not in frame.flags:
            size = frame.settings.get(_SETTINGS_HEADER_TABLE_SIZE)
            if size is not None and self.peer is not None:
                # What this side allows bounds the other side's encoder. Lenient on timing (the limit applies
                # once ACKed): a passive reader must not reject what the real peer accepted.
                peer = self.peer.decoder
                peer.max_allowed_table_size = max(peer.max_allowed_table_size, size)

    def _end_block(self, out: list[Frame2]) -> None:
        block, self._block = self._block, None
        assert block is not None
        headers = self.decoder.decode(bytes(block), raw=False)
        if not self._block_push:  # a pushed request only keeps the table in step; nothing was asked
            out.append(Frame2(Kind.HEADERS, self._block_stream, [(str(n), str(v)) for n, v in headers],
                              end_stream=self._block_end))


def _upgrade_request(head: str) -> tuple[Headers, int] | None:
    """An HTTP/1.1 request head asking for h2c -> (its headers as HTTP/2 stream 1's, its body's length)."""
    lines = head.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        return None
    fields: Headers = []
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep:
            return None
        fields.append((name.strip().lower(), value.strip()))
    upgrade = ",".join(v for n, v in fields if n == "upgrade").lower()
    if "h2c" not in [t.strip() for t in upgrade.split(",")]:
        return None
    length = next((v for n, v in fields if n == "content-length"), "0")
    if not length.isdigit() or any(n == "transfer-encoding" for n, _ in fields):
        return None  # RFC 9113 3.2 (and every server) wants the upgrade request's body whole and sized
    host = next((v for n, v in fields if n == "host"), "")
    headers = [(":method", parts[0]), (":scheme", "http"), (":authority", host), (":path", parts[1])]
    headers += [(n, v) for n, v in fields if n not in _H1_ONLY]
    return headers, int(length)


def connection(partial: bool = False) -> tuple[Direction, Direction]:
    """The two directions of one connection, (client, server), linked for SETTINGS and the upgrade."""
    client, server = Direction(True, partial), Direction(False, partial)
    client.peer, server.peer = server, client
    return client, server


# ---- exchanges: one per stream ---------------------------------------------------------------------------------


@dataclass(slots=True)
class Message:
    """One side of one stream: the request, or the response."""

    headers: Headers = field(default_factory=list)
    trailers: Headers = field(default_factory=list)
    body: bytearray = field(default_factory=bytearray)  # the first MAX_BODY bytes
    body_size: int = 0
    ended: bool = False
    reset: int | None = None  # RST_STREAM's error code, when this side reset the stream
    first_ts: float | None = None
    end_ts: float | None = None

    def header(self, name: str) -> str | None:
        return next((v for n, v in self.headers if n == name), None)

    def trailer(self, name: str) -> str | None:
        """A trailer; for gRPC, a response without data carries its status in its headers (Trailers-Only)."""
        value = next((v for n, v in self.trailers if n == name), None)
        return value if value is not None else self.header(name)


@dataclass(slots=True)
class Exchange:
    stream: int
    request: Message = field(default_factory=Message)
    response: Message = field(default_factory=Message)

    @property
    def method(self) -> str:
        return self.request.header(":method") or ""

    @property
    def path(self) -> str:
        return self.request.header(":path") or ""

    @property
    def status(self) -> int | None:
        s = self.response.header(":status")
        return int(s) if s is not None and s.isdigit() else None

    @property
    def grpc(self) -> bool:
        return is_grpc(self.request.header("content-type"))

    @property
    def grpc_method(self) -> str | None:
        """`package.Service/Method` of a gRPC call (its :path without the leading slash)."""
        return self.path.lstrip("/") if self.grpc else None

    @property
    def grpc_status(self) -> int | None:
        s = self.response.trailer("grpc-status")
        return int(s) if s is not None and s.strip().isdigit() else None

    @property
    def grpc_message(self) -> str | None:
        return self.response.trailer("grpc-message")

    @property
    def done(self) -> bool:
        req, resp = self.request, self.response
        return (req.ended or req.reset is not None or resp.reset is not None) and (
            resp.ended or resp.reset is not None or req.reset is not None)


def is_grpc(content_type: str | None) -> bool:
    return content_type is not None and content_type.lower().startswith("application/grpc")


def grpc_messages(body: bytes) -> list[tuple[bool, bytes]] | None:
    """A gRPC body -> its length-prefixed messages as (compressed, bytes); None when the framing does not add up."""
    out: list[tuple[bool, bytes]] = []
    i, n = 0, len(body)
    while i < n:
        if n - i < 5 or body[i] > 1:
            return None
        length = int.from_bytes(body[i + 1:i + 5], "big")
        if n - i - 5 < length:
            return None
        out.append((body[i] == 1, body[i + 5:i + 5 + length]))
        i += 5 + length
    return out


class Exchanges:
    """Both directions of one connection -> one `Exchange` per stream, handed out once both sides are over."""

    def __init__(self, partial: bool = False, max_body: int = MAX_BODY) -> None:
        self.client, self.server = connection(partial)
        self.max_body = max_body
        self._open: dict[int, Exchange] = {}
        self._highest = 0  # the highest stream the client opened: a lower one is never opened again
        self.streams = 0  # streams the client opened (request headers seen)

    @property
    def state(self) -> State:
        """The client direction's: whether the connection is (still) decoded as HTTP/2."""
        return self.client.state

    def client_bytes(self, data: bytes, ts: float) -> list[Exchange]:
        return self._apply(self.client.feed(data), True, ts)

    def client_frames(self, data: bytes, ts: float, assemble: bool = True) -> tuple[list[Frame2], list[Exchange]]:
        """The client's frames too, for a layer that acts on them; `assemble` false: only decoded (no Exchange
        is kept, so a connection whose answers are never fed costs no memory)."""
        frames = self.client.feed(data)
        return frames, self._apply(frames, True, ts) if assemble else []

    def server_bytes(self, data: bytes, ts: float) -> list[Exchange]:
        return self._apply(self.server.feed(data), False, ts)

    def pending(self) -> list[Exchange]:
        """Streams not over yet (the connection ended first), oldest first; they are forgotten."""
        out = [self._open[s] for s in sorted(self._open)]
        self._open.clear()
        return out

    def forget(self, stream: int) -> None:
        """Stop assembling this stream (its reader gave up on it); later frames of it are ignored."""
        self._open.pop(stream, None)

    def _apply(self, frames: list[Frame2], client: bool, ts: float) -> list[Exchange]:
        done: list[Exchange] = []
        for f in frames:
            if f.kind is Kind.GOAWAY or f.stream == 0:
                continue
            ex = self._open.get(f.stream)
            if ex is None:
                if not client or f.kind is not Kind.HEADERS or f.stream <= self._highest:
                    continue  # a stream this reader never saw opened (or already handed out, or forgotten)
                self._highest = f.stream
                ex = self._open[f.stream] = Exchange(f.stream)
                self.streams += 1
            msg = ex.request if client else ex.response
            if msg.first_ts is None:
                msg.first_ts = ts
            if f.kind is Kind.HEADERS:
                assert f.headers is not None
                if not msg.headers:
                    msg.headers = f.headers
                elif not client and _informational(msg):
                    msg.headers = f.headers  # 1xx, then the real response
                else:
                    msg.trailers = f.headers
            elif f.kind is Kind.DATA:
                msg.body_size += len(f.data)
                room = self.max_body - len(msg.body)
                if room > 0:
                    msg.body += f.data[:room]
            else:
                msg.reset = f.code
            if f.end_stream:
                msg.ended = True
            if f.end_stream or f.kind is Kind.RESET:
                msg.end_ts = ts
            if ex.done:
                del self._open[f.stream]
                done.append(ex)
        return done


def _informational(msg: Message) -> bool:
    status = msg.header(":status")
    return status is not None and status.startswith("1") and not msg.body_size
