"""Plain data shared by the stages of the data path.

dissect produces `Segment`s; reassemble turns them into `Action`s; replay executes actions on sockets.
Nothing here does I/O.
"""

from __future__ import annotations

import enum
from collections.abc import Collection
from dataclasses import dataclass

# Log level below DEBUG for payload bytes: only `-v=9` shows them (captured traffic holds secrets).
PAYLOAD = 5

# TCP header flag bits, as in the header (and in tshark's `tcp.flags` hex value).
FIN = 0x01
SYN = 0x02
RST = 0x04
PSH = 0x08
ACK = 0x10


@dataclass(frozen=True, slots=True)
class Endpoint:
    host: str  # textual IP address ("10.1.2.3", "fd00::1"), as tshark prints it
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(slots=True)
class Segment:
    """One captured TCP segment."""

    ts: float  # capture timestamp, seconds since the epoch
    src: Endpoint
    dst: Endpoint
    seq: int  # raw 32-bit sequence number
    ack: int  # raw 32-bit acknowledgement number (meaningful only with the ACK flag)
    flags: int  # TCP flag bits (FIN, SYN, RST, PSH, ACK, ...)
    payload: bytes
    # False when the frame was cut by the capture's snap length: the payload bytes are unknown and the
    # segment must be treated as lost (a hole), never delivered.
    whole: bool = True
    frame: int = 0  # 1-based frame number in the input, for diagnostics only


class Outcome(str, enum.Enum):
    """How one mirrored connection ended, worst first wins when several apply."""

    COMPLETE = "complete"  # every captured client byte delivered, in order
    INCOMPLETE = "incomplete"  # the capture has a hole that never filled: aborted at the hole
    DROPPED = "dropped"  # the local target was too slow: buffer overflowed, aborted
    FAILED = "failed"  # the local target refused or reset the connection
    SKIPPED = "skipped"  # not replayed (joined mid-stream with --skip-partial)
    TLS = "tls"  # not replayed: it opened with a TLS ClientHello and --to is plaintext (no --tls-passthrough)


# ---- actions: what the flow table asks the replayer to do ---------------------------------------
# Not frozen: actions are built once per packet on the hot path, and a frozen dataclass's __init__
# (object.__setattr__ per field) measured about 5x slower to construct. Treat them as immutable anyway.


@dataclass(slots=True)
class Open:
    """A new mirrored connection: open one local connection for it."""

    flow: int  # flow id, unique for the whole run (a reused 4-tuple gets a new id)
    client: Endpoint
    server: Endpoint
    partial: bool  # joined mid-stream (no SYN seen)
    ts: float


@dataclass(slots=True)
class Send:
    """Client->server bytes, in order, exactly once."""

    flow: int
    data: bytes
    ts: float


@dataclass(slots=True)
class Close:
    """The client half-closed (FIN) after every byte before it: shut down the local write side."""

    flow: int
    ts: float


class AbortReason(str, enum.Enum):
    RESET = "reset"  # RST seen in the capture
    HOLE = "hole"  # capture lost bytes that never came: the flow is incomplete
    GAP = "gap"  # the live stream itself was interrupted (reconnect): the flow is incomplete


@dataclass(slots=True)
class Abort:
    """Abort the local connection (RST): never let the target see a clean end after a hole."""

    flow: int
    reason: AbortReason
    ts: float


@dataclass(slots=True)
class Reply:
    """Server->client bytes, in order, exactly once (FlowConfig.server_stream only).

    What production answered, for comparison with the local target's answer; the replayer has nothing to do
    with it. After a hole in the server's bytes a flow's Replies stop for good (FlowRecord.reply_complete).
    """

    flow: int
    data: bytes
    ts: float


@dataclass(slots=True)
class Turn:
    """The client's next bytes, or its end, came only after production had answered (FlowConfig.turns only).

    It precedes the Send, Close or Abort it belongs to. Delivery that takes turns holds what follows until the
    local service has answered too; `answer_bytes` and `answer_time` say how production answered.
    """

    flow: int
    answer_bytes: int  # server payload bytes production sent since the client's previous bytes
    answer_time: float  # capture seconds from the client's previous bytes to production's last answer byte
    ts: float
    # HTTP/2: the streams production's answer ended (END_STREAM, RST_STREAM); None when not HTTP/2 or not known.
    answer_streams: tuple[int, ...] | None = None


Action = Open | Send | Close | Abort | Reply | Turn




class EndReason(str, enum.Enum):
    FIN = "fin"  # client half-closed after its last byte
    RESET = "reset"  # RST seen
    IDLE = "idle"  # no traffic for --idle-timeout
    END_OF_CAPTURE = "end-of-capture"  # still open when the input ended
    HOLE = "hole"  # a lost segment never came
    GAP = "gap"  # the live stream was interrupted
    GAVE_UP = "gave-up"  # the replayer stopped delivering it (target failed or too slow)


@dataclass(slots=True)
class FlowRecord:
    """What the flow table knows of one mirrored connection once it has ended."""

    flow: int
    client: Endpoint
    server: Endpoint
    partial: bool  # joined mid-stream
    outcome: Outcome  # COMPLETE, INCOMPLETE or SKIPPED (delivery failures are the replayer's to add)
    end: EndReason
    bytes_delivered: int  # client->server payload bytes handed over as Send actions
    first_ts: float
    last_ts: float
    direction_guessed: bool = False  # no SYN and no --port: the server side is a guess
    # server_stream only: no server byte the capture showed to exist went missing before the Replies ended.
    # Always True without server_stream.
    reply_complete: bool = True


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """One HTTP request a layer parsed from a connection's client bytes (a command: "request seen")."""

    flow: int
    index: int  # position among this connection's captured requests, 0-based (pairs with production responses)
    method: str
    target: str  # as captured (path and query, or absolute form)
    host: str | None  # the captured Host header
    ts: float  # capture time of the segment that completed the request head
    forwarded: bool
    # Position among the requests actually sent on the local connection (pairs with ResponseParser's index).
    sent_index: int | None = None
    upgrade: bool = False  # Upgrade or CONNECT: what follows on the connection is not HTTP/1.x any more
    partial: bool = False  # the connection was joined mid-stream: production's answers cannot be lined up


# ---- the layers' protocol ------------------------------------------------------------------------------------
# Every layer of the core (flow table, TLS gate, HTTP layer, shadow compare, turn-taking) is sans-I/O with one
# entry point, `handle(event) -> list[command]`: the events below (and `Segment`s, and the actions of the layer
# before it) go in, the actions for the next layer and the commands below come out. Time enters only as an event.


@dataclass(slots=True)
class Tick:
    """The clock moved: timers up to `now` fire (capture time for the flow table, wall time for delivery)."""

    now: float


@dataclass(slots=True)
class EndOfInput:
    """The input is over: every flow still open ends now."""


@dataclass(slots=True)
class Interrupt:
    """The capture stream had a gap at `now`: open flows (of these server addresses; None: all) cannot be trusted."""

    now: float
    servers: Collection[str] | None = None


@dataclass(slots=True)
class DeliveryFailed:
    """Delivery gave the flow up (target failed or too slow): the layers send nothing more for it."""

    flow: int


@dataclass(slots=True)
class Delivered:
    """Delivery of the flow is over (the local connection is closed): nothing more will come for it."""

    flow: int


@dataclass(slots=True)
class LocalData:
    """The local service sent these bytes on the flow's connection."""

    flow: int
    data: bytes
    at: float


@dataclass(slots=True)
class LocalClosed:
    """The local service closed its side of the flow's connection."""

    flow: int
    at: float


@dataclass(slots=True)
class GiveUp:
    """A command for delivery from a layer above the flow table: stop delivering the flow (reset it, DROPPED)."""

    flow: int
    reason: str


@dataclass(slots=True)
class Suppressed:
    """A command: the flow ended without delivery ever hearing of it (sampled out, or nothing of it matched)."""

    flow: int


@dataclass(slots=True)
class BrokenOff:
    """A command: a layer aborted the flow because a request broke off mid-stream while filtering (incomplete)."""

    flow: int
