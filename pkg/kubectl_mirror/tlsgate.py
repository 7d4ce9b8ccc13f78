"""TLS detection: a mirrored connection that opens with a TLS ClientHello is held back from a plaintext --to.

Replaying a ClientHello to a plaintext server only makes it log a client error per connection (and the mirror
blame the service), so by default such connections are not replayed and are counted as `tls`. No I/O here: the
gate sits between the flow table and the replayer, takes actions and returns the ones to execute.

A flow's Open is held until its first client bytes tell: a ClientHello is a TLS record of type handshake
(0x16), a version 3.x, and a handshake message of type client_hello (1), so six bytes decide. A flow that ends,
or whose server speaks first (a Reply or a Turn: TLS clients always speak first), before six bytes came is not
TLS. Looking at each flow's first bytes anyway, the gate also names the flows that open with a kubelet probe.
"""

from __future__ import annotations

from dataclasses import dataclass

from .model import Abort, Action, Close, Endpoint, Open, Send

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
class KubeletProbe:
    """A command: this flow opened with a kubelet probe (counted in the summary)."""

    flow: int


TlsCommand = Action | TlsFlow | KubeletProbe

_PROBE_AGENT = b"\r\nuser-agent: kube-probe/"
_PROBE_HEAD = 2048  # a probe's request head is a few hundred bytes, in the connection's first segment


def kubelet_probe(first: bytes) -> bool:
    """Whether a connection's first bytes are an HTTP probe of the kubelet's (User-Agent kube-probe/...).

    Istio's agent answers the kubelet's rewritten probes (port 15020) by asking the app itself, forwarding the
    kubelet's headers: in a mesh those show up on the app port as connections from 127.0.0.6 like this one.
    """
    return first.startswith(b"GET ") and _PROBE_AGENT in first[:_PROBE_HEAD].lower()


class TlsGate:
    """Holds each new flow until its first bytes say whether it is TLS; TLS flows are dropped, others released.

    After `process`, `pop_tls()` names the flows it dropped: the caller tells the flow table to stop emitting
    for them (give_up) and counts them. Everything else passes through unchanged and in order. With
    `drop_tls` False (--tls-passthrough) TLS flows are released like the others. On the way, flows whose first
    bytes are a kubelet probe are named by `pop_probes()`.
    """

    def __init__(self, drop_tls: bool = True) -> None:
        self._drop_tls = drop_tls
        # Per held flow: its Open, then its later actions in order (a list, not a dataclass: this runs per flow).
        self._held: dict[int, list[Action]] = {}
        self._dropping: set[int] = set()  # decided TLS: their later actions in the same batches are dropped
        self._found: list[TlsFlow] = []
        self._probes: list[int] = []
        self._flows_seen = 0

    @property
    def holding(self) -> int:
        """Flows whose Open is held until their first bytes arrive."""
        return len(self._held)

    def handle(self, event: Action) -> list[TlsCommand]:
        return self.handle_all([event])

    def handle_all(self, actions: list[Action], flows_created: int | None = None) -> list[TlsCommand]:
        """A batch of the flow table's actions: the actions to execute, then a `KubeletProbe` for each flow that
        opened with a kubelet probe and a `TlsFlow` for each flow held back as TLS. The flow table must be told
        to give those up (it would go on emitting for them); the gate itself forgets them.

        `flows_created` (the flow table's running count) lets a batch without a new flow and with nothing held
        pass untouched, at no per-action cost; None: look at every action.
        """
        out: list[TlsCommand] = self.process(actions, flows_created)  # type: ignore[assignment]
        if self._probes or self._found:
            found = self.pop_tls()
            self.forget([t.flow for t in found])
            out = [*out, *(KubeletProbe(flow) for flow in self.pop_probes()), *found]
        return out

    def process(self, actions: list[Action], flows_created: int | None = None) -> list[Action]:
        """The actions to execute. `flows_created` (the flow table's running count) lets a batch without a new
        flow and with nothing held pass untouched, at no per-action cost."""
        held, dropping = self._held, self._dropping
        if flows_created is not None and flows_created == self._flows_seen and not held and not dropping:
            return actions
        if flows_created is None:
            flows_created = self._flows_seen
        self._flows_seen = flows_created
        out: list[Action] = []
        emit = out.append
        for a in actions:
            kind = type(a)
            if kind is Open:
                held[a.flow] = [a]
                continue
            flow = a.flow
            h = held.get(flow)
            if h is None:
                if not dropping or flow not in dropping:
                    emit(a)
                elif kind is Close or kind is Abort:
                    dropping.discard(flow)
                continue
            if kind is Send and len(h) == 1 and a.data[:1] != b"\x16":  # type: ignore[union-attr]
                # The commonest case by far: the first bytes are not a handshake record (HTTP, gRPC, ...).
                del held[flow]
                emit(h[0])
                emit(a)
                if a.data[:1] == b"G" and kubelet_probe(a.data):  # type: ignore[union-attr]
                    self._probes.append(flow)
                continue
            h.append(a)
            verdict = self._verdict(h)
            if verdict is None:
                continue
            del held[flow]
            if verdict and self._drop_tls:
                first = h[0]
                assert type(first) is Open
                self._found.append(TlsFlow(flow, first.client, first.server))
                if kind is not Close and kind is not Abort:
                    dropping.add(flow)
            else:
                out += h
                if not verdict and kubelet_probe(self._first_bytes(h)):
                    self._probes.append(flow)
        return out

    @staticmethod
    def _first_bytes(held: list[Action]) -> bytes:
        return b"".join(a.data for a in held if type(a) is Send)[:_PROBE_HEAD]  # type: ignore[union-attr]

    @staticmethod
    def _verdict(held: list[Action]) -> bool | None:
        """TLS, not TLS, or undecided, for a held flow's actions so far (its Open first)."""
        prefix = b""
        for a in held[1:]:
            kind = type(a)
            if kind is Send:
                prefix += a.data[: DECIDING_BYTES - len(prefix)]  # type: ignore[union-attr]
                verdict = client_hello(prefix)
                if verdict is not None:
                    return verdict
            else:
                # The server spoke first (a Reply, or a Turn: TLS clients never wait for the server), or the flow
                # ended before six bytes: not a ClientHello.
                return False
        return None

    def pop_probes(self) -> list[int]:
        """Flows that opened with a kubelet probe, since the last call."""
        found, self._probes = self._probes, []
        return found

    def pop_tls(self) -> list[TlsFlow]:
        found, self._found = self._found, []
        return found

    def forget(self, flows: list[int]) -> None:
        """The flow table will emit nothing more for these (given up): no need to watch for their end."""
        for flow in flows:
            self._dropping.discard(flow)
            self._held.pop(flow, None)


__all__ = ["DECIDING_BYTES", "KubeletProbe", "TlsCommand", "TlsFlow", "TlsGate", "client_hello", "kubelet_probe"]
