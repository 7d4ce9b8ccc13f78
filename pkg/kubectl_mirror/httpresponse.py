"""HTTP/1.x responses parsed from a connection's server bytes with h11: one `ResponseRecord` per response.

`ResponseParser` is told each request's method as it goes out (a HEAD answer has no body, an Upgrade or CONNECT
answer ends HTTP/1.x), then fed the bytes; bodies are kept up to `max_body` for comparison.
"""

from __future__ import annotations

from dataclasses import dataclass

import h11

# ---- responses ----------------------------------------------------------------------------------------------

MAX_BODY = 1 << 20  # response body bytes kept for comparison; the rest is counted, not stored


@dataclass(frozen=True, slots=True)
class ResponseRecord:
    flow: int
    index: int  # position among this connection's final (non-1xx) responses, 0-based
    status: int
    headers: list[tuple[str, str]]  # as received, names in their own case
    body: bytes  # the first max_body bytes, transfer coding removed
    ts_first_byte: float
    ts_end: float
    body_size: int = 0  # the whole body's size
    truncated: bool = False  # body holds only the first max_body bytes


class ResponseParser:
    """One connection's response bytes -> ResponseRecords (h11 in the client role, fed what the server sent).

    Whether a response has a body depends on the request (HEAD, CONNECT), so call `expect(method)` for every
    request sent on the connection, in order, before its response bytes are fed. `feed(b"", ts)` only
    processes what is held; the server's end of stream is `close(ts)`, which completes a body delimited by it.
    """

    def __init__(self, flow: int, *, max_body: int = MAX_BODY) -> None:
        self.flow = flow
        self.max_body = max_body
        self.error: str | None = None  # why parsing stopped (not HTTP, or the connection switched protocols)
        self._conn = h11.Connection(h11.CLIENT)
        self._methods: list[tuple[bytes, bool]] = []  # requests whose response has not started, in order
        self._waiting = False  # a dummy request was sent to h11 and its response is not complete
        self._index = 0
        self._first_ts: float | None = None
        self._status = 0
        self._headers: list[tuple[str, str]] = []
        self._body = bytearray()
        self._size = 0
        self._done = False

    def expect(self, method: str, *, upgrade: bool = False) -> None:
        """A request with this method went out on the connection (upgrade: it asked to switch protocols)."""
        self._methods.append((method.encode("ascii", "replace"), upgrade))

    def feed(self, data: bytes, ts: float) -> list[ResponseRecord]:
        if self._done:
            return []
        if data:
            if self._first_ts is None:
                self._first_ts = ts
            self._conn.receive_data(data)
        return self._run(ts)

    def close(self, ts: float) -> list[ResponseRecord]:
        if self._done:
            return []
        self._conn.receive_data(b"")
        out = self._run(ts)
        self._done = True
        return out

    def _run(self, ts: float) -> list[ResponseRecord]:
        out: list[ResponseRecord] = []
        while not self._done:
            if not self._waiting:
                rest, closed = self._conn.trailing_data
                if not self._methods or not (rest or closed):
                    return out  # nothing to parse, or no request to pair it with yet
                self._send_dummy()
            try:
                event = self._conn.next_event()
            except h11.ProtocolError as exc:
                self._stop(f"not an HTTP/1.x response: {exc}")
                return out
            if event is h11.NEED_DATA or isinstance(event, h11.ConnectionClosed):
                if isinstance(event, h11.ConnectionClosed):
                    self._done = True
                return out
            if event is h11.PAUSED or (isinstance(event, h11.InformationalResponse) and event.status_code == 101):
                # 101 Switching Protocols or an accepted CONNECT: what follows is not HTTP/1.x any more.
                if isinstance(event, h11.InformationalResponse):
                    self._status, self._headers = 101, _str_headers(event)
                if self._status:
                    out.append(self._finish(ts))
                self._stop("the connection switched protocols")
                return out
            if isinstance(event, h11.InformationalResponse):
                continue  # 100 Continue and friends precede the real response
            if isinstance(event, h11.Response):
                self._status, self._headers = event.status_code, _str_headers(event)
            elif isinstance(event, h11.Data):
                self._size += len(event.data)
                room = self.max_body - len(self._body)
                if room > 0:
                    self._body += event.data[:room]
            elif isinstance(event, h11.EndOfMessage):
                out.append(self._finish(ts))
                self._next_cycle()
        return out

    def _send_dummy(self) -> None:
        # h11 decides body framing from the request it thinks it sent: give it one with the real method.
        method, upgrade = self._methods.pop(0)
        headers = [("Host", "mirror")]
        if upgrade and method != b"CONNECT":
            headers += [("Connection", "upgrade"), ("Upgrade", "mirror")]
        self._conn.send(h11.Request(method=method, target="/" if method != b"CONNECT" else "mirror:1",
                                    headers=headers))
        self._conn.send(h11.EndOfMessage())
        self._waiting = True

    def _finish(self, ts: float) -> ResponseRecord:
        record = ResponseRecord(
            self.flow, self._index, self._status, self._headers, bytes(self._body),
            self._first_ts if self._first_ts is not None else ts, ts, self._size, self._size > len(self._body),
        )
        self._index += 1
        self._body = bytearray()
        self._size = 0
        self._headers = []
        self._status = 0
        self._waiting = False
        # Bytes already held belong to the next response: it started no later than now.
        self._first_ts = ts if self._conn.trailing_data[0] else None
        return record

    def _next_cycle(self) -> None:
        conn = self._conn
        if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
            conn.start_next_cycle()
            return
        # The server will close (Connection: close, HTTP/1.0): a server that goes on anyway gets a fresh parser.
        rest, closed = conn.trailing_data
        self._conn = h11.Connection(h11.CLIENT)
        if rest:
            self._conn.receive_data(rest)
        if closed:
            self._conn.receive_data(b"")

    def _stop(self, why: str) -> None:
        self.error = why
        self._done = True
        self._waiting = False


def _str_headers(event: h11.Response | h11.InformationalResponse) -> list[tuple[str, str]]:
    return [(n.decode("latin-1"), v.decode("latin-1")) for n, v in event.headers.raw_items()]
