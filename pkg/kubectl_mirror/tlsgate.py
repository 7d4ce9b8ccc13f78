"""TLS detection: a mirrored connection that opens with a TLS ClientHello is held back from a plaintext --to.

Replaying a ClientHello to a plaintext server only makes it log a client error per connection (and the mirror
blame the service), so by default such connections are not replayed and are counted as `tls`. No I/O here: the
gate sits between the flow table and the replayer, takes actions and returns the ones to execute.

A flow's Open is held until its first client bytes tell: a ClientHello is a TLS record of type handshake
(0x16), a version 3.x, and a handshake message of type client_hello (1), so six bytes decide. A flow that ends,
or whose server speaks first (a Reply: TLS clients always speak first), before six bytes came is not TLS.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .model import Abort, Action, Close, Endpoint, Open, Reply, Send

_RECORD_HANDSHAKE = 0x16
_CLIENT_HELLO = 0x01
# The record header's version: 3.0 (SSL 3) to 3.4; TLS 1.3 still writes 3.1 or 3.3 there. Anything past 3.4
# is not a TLS version any stack sends.
_MAX_MINOR = 0x04
# The largest TLS plaintext record (2^14) plus what a compressed/protected record may add: a longer one is not TLS.
_MAX_RECORD = (1 << 14) + 2048
DECIDING_BYTES = 6


def client_hello(prefix: bytes) -> bool | None:
    """Whether a client's first bytes are a TLS ClientHello: True, False, or None when too few to tell."""
    checks = len(prefix)
    if checks >= 1 and prefix[0] != _RECORD_HANDSHAKE:
        return False
    if checks >= 2 and prefix[1] != 0x03:
        return False
    if checks >= 3 and prefix[2] > _MAX_MINOR:
        return False
    if checks >= 5:
        length = (prefix[3] << 8) | prefix[4]
        if not 4 <= length <= _MAX_RECORD:  # a ClientHello's handshake header alone takes 4 bytes
            return False
    if checks >= DECIDING_BYTES:
        return prefix[5] == _CLIENT_HELLO
    return None


@dataclass(slots=True)
class TlsFlow:
    """A connection recognized as TLS and held back."""

    flow: int
    client: Endpoint
    server: Endpoint


@dataclass(slots=True)
class _Held:
    open: Open
    actions: list[Action] = field(default_factory=list)  # the flow's actions after its Open, in order
    prefix: bytes = b""


class TlsGate:
    """Holds each new flow until its first bytes say whether it is TLS; TLS flows are dropped, others released.

    After `process`, `pop_tls()` names the flows it dropped: the caller tells the flow table to stop emitting
    for them (give_up) and counts them. Everything else passes through unchanged and in order.
    """

    def __init__(self) -> None:
        self._held: dict[int, _Held] = {}
        self._dropping: set[int] = set()  # decided TLS: their later actions in the same batches are dropped
        self._found: list[TlsFlow] = []
        self._flows_seen = 0

    @property
    def holding(self) -> int:
        """Flows whose Open is held until their first bytes arrive."""
        return len(self._held)

    def process(self, actions: list[Action], flows_created: int = -1) -> list[Action]:
        """The actions to execute. `flows_created` (the flow table's running count) lets a batch without a new
        flow and with nothing held pass untouched, at no per-action cost."""
        if flows_created == self._flows_seen and not self._held and not self._dropping:
            return actions
        self._flows_seen = flows_created
        out: list[Action] = []
        held, dropping = self._held, self._dropping
        for a in actions:
            flow = a.flow
            if type(a) is Open:
                held[flow] = _Held(a)
                continue
            h = held.get(flow)
            if h is None:
                if flow not in dropping:
                    out.append(a)
                elif type(a) is Close or type(a) is Abort:
                    dropping.discard(flow)
                continue
            h.actions.append(a)
            verdict: bool | None
            if type(a) is Send:
                if len(h.prefix) < DECIDING_BYTES:
                    h.prefix += a.data[: DECIDING_BYTES - len(h.prefix)]
                verdict = client_hello(h.prefix)
            elif type(a) is Reply:
                verdict = False  # the server spoke first: TLS clients never wait for the server
            else:
                verdict = False  # ended before six bytes: too short for a ClientHello
            if verdict is None:
                continue
            del held[flow]
            if verdict:
                self._found.append(TlsFlow(flow, h.open.client, h.open.server))
                if type(a) is not Close and type(a) is not Abort:
                    dropping.add(flow)
            else:
                out.append(h.open)
                out += h.actions
        return out

    def pop_tls(self) -> list[TlsFlow]:
        found, self._found = self._found, []
        return found

    def forget(self, flows: list[int]) -> None:
        """The flow table will emit nothing more for these (given up): no need to watch for their end."""
        for flow in flows:
            self._dropping.discard(flow)
            self._held.pop(flow, None)


__all__ = ["DECIDING_BYTES", "TlsFlow", "TlsGate", "client_hello"]
