"""Replay stage: one local connection per mirrored connection, bytes in order, never stalling the capture.

Everything here is non-blocking and driven by the pipeline's single-threaded loop through `execute()` and
`poll()`. A flow that cannot be delivered whole (target too slow, refused, reset) is given up: its socket is
closed with a RST so the target never mistakes a truncated stream for a clean one.
"""

from __future__ import annotations

import errno
import heapq
import itertools
import os
import selectors
import socket
import struct
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from types import TracebackType

from .errors import TargetError
from .model import Abort, Action, Close, GiveUp, Open, Outcome, Send
from .settings import Destination, allowed, parse_to

# Buffers handed to one sendmsg(): enough to empty a backlog of small segments in few syscalls, well under IOV_MAX.
_IOV_BATCH = 64
_RECV_SIZE = 256 << 10
_LINGER_RST = struct.pack("ii", 1, 0)

_READ = selectors.EVENT_READ
_WRITE = selectors.EVENT_WRITE

# Flow states.
_WAITING = 0  # no socket: waiting to (re)try the connect
_CONNECTING = 1  # non-blocking connect in progress
_OPEN = 2  # connected; bytes flow
_SHUT = 3  # every byte written and FIN sent; reading the target's last response until it closes
_DONE = 4


# ---- the --to destination: parsed in settings, checked here ------------------------------------


def check_target(dest: Destination, timeout: float = 3.0) -> None:
    """Fail fast, before any capture starts, when nothing listens at --to."""
    prefix = f"cannot connect to {dest} (--to)"
    try:
        with socket.socket(dest.family, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(dest.address)
    except ConnectionRefusedError:
        raise TargetError(f"{prefix}: connection refused; start your local service first or fix --to") from None
    except TimeoutError:
        raise TargetError(
            f"{prefix}: no answer within {timeout:g}s; check the host is up and the port is not firewalled, or fix --to"
        ) from None
    except OSError as exc:
        if exc.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH, errno.EADDRNOTAVAIL, errno.ENETDOWN):
            raise TargetError(f"{prefix}: host unreachable; fix --to") from None
        raise TargetError(f"{prefix}: {_reason(exc)}; fix --to") from None


def _reason(exc: OSError) -> str:
    if exc.errno == errno.ECONNRESET:
        return "the target reset the connection"
    if exc.errno == errno.EPIPE:
        return "the target closed the connection"
    if exc.errno is not None:
        return os.strerror(exc.errno).lower()
    return str(exc) or type(exc).__name__


# ---- the replayer --------------------------------------------------------------------------------


@dataclass(slots=True)
class ReplayConfig:
    flow_buffer: int = 8 << 20  # bytes queued for one flow before it is dropped
    max_buffer: int = 128 << 20  # bytes queued over all flows before the largest flow is dropped
    connect_attempts: int = 3
    connect_backoff: float = 0.2  # seconds before the 2nd attempt, doubled each time
    drain_timeout: float = 5.0
    connect_timeout: float = 3.0  # one attempt; a filtered port never answers
    linger_timeout: float = 2.0  # after our FIN: how long to wait for the target's last response and its close
    # Called with each chunk of the target's response bytes (flow, data, monotonic time), and b"" at its end of
    # stream; None (the default) reads and discards them, which keeps byte mode's read path as cheap as before.
    on_response: Callable[[int, bytes, float], None] | None = None

    def __post_init__(self) -> None:
        if self.flow_buffer <= 0 or self.max_buffer <= 0:
            raise ValueError("flow_buffer and max_buffer must be positive")
        if self.connect_attempts < 1:
            raise ValueError("connect_attempts must be at least 1")


@dataclass(frozen=True, slots=True)
class Delivery:
    """What happened to one flow at the target. outcome is None when the replayer delivered all it was given."""

    flow: int
    outcome: Outcome | None  # FAILED, DROPPED or None
    bytes_sent: int  # bytes the kernel accepted for the target
    error: str | None


@dataclass(frozen=True, slots=True)
class ReplayStats:
    connects_ok: int
    connect_failures: int  # failed attempts (a flow may retry)
    open_sockets: int
    bytes_sent: int
    bytes_discarded: int  # response bytes read from the target and thrown away
    peak_queued: int  # most bytes waiting in user space at once, over all flows


@dataclass(eq=False, slots=True)
class _Flow:
    flow: int
    state: int = _WAITING
    sock: socket.socket | None = None
    # The fast path: connected, nothing queued, no close pending. Send then goes straight to the socket.
    direct: bool = False
    queue: deque[memoryview] = field(default_factory=deque)
    queued: int = 0
    events: int = 0  # what the selector watches for this socket now
    close_requested: bool = False
    abort_requested: bool = False  # the reset follows the last queued byte, as the FIN would
    peer_eof: bool = False
    attempts: int = 0
    timer: int = 0  # token of the flow's one live timer; 0 when none
    bytes_sent: int = 0
    outcome: Outcome | None = None
    error: str | None = None


class Replayer:
    """Executes flow-table actions on non-blocking sockets to one destination."""

    def __init__(self, dest: Destination, config: ReplayConfig | None = None) -> None:
        self.dest = dest
        self.config = config if config is not None else ReplayConfig()
        self._sel = selectors.DefaultSelector()
        self._flows: dict[int, _Flow] = {}
        self._finished: dict[int, Delivery] = {}
        self._gave_up: list[int] = []
        self._timers: list[tuple[float, int, _Flow]] = []
        self._tokens = itertools.count(1)
        self._backlog: set[_Flow] = set()  # flows with queued bytes, for the global cap
        self._queued_total = 0
        self._peak_queued = 0
        self._recv_buf = bytearray(_RECV_SIZE)
        self._extra_fd: int | None = None
        self._connects_ok = 0
        self._connect_failures = 0
        self._open_sockets = 0
        self._sent_finished = 0
        self._discarded = 0
        self._on_response = self.config.on_response
        self._closed = False

    # -- the pipeline's interface ------------------------------------------------------------------

    def execute(self, actions: Iterable[Action | GiveUp]) -> None:
        """Apply actions at once; never blocks. Bytes the target cannot take now are queued."""
        flows = self._flows
        for action in actions:
            if type(action) is Send:
                f = flows.get(action.flow)
                if f is None:  # unknown or already given up
                    continue
                sock = f.sock
                if f.direct and sock is not None:
                    data = action.data
                    try:
                        n = sock.send(data)
                    except BlockingIOError:
                        n = 0
                    except OSError as exc:
                        self._give_up(f, Outcome.FAILED, _reason(exc))
                        continue
                    f.bytes_sent += n
                    if n != len(data):
                        self._enqueue(f, memoryview(data)[n:])
                else:
                    self._send_slow(f, action.data)
            elif type(action) is Open:
                if action.flow not in flows and action.flow not in self._finished:
                    f = _Flow(action.flow)
                    flows[action.flow] = f
                    self._connect(f)
            elif type(action) is Close:
                f = flows.get(action.flow)
                if f is not None:
                    self._request_close(f)
            elif type(action) is Abort:
                f = flows.get(action.flow)
                if f is not None:
                    # The flow table decided (hole, reset in the capture): not a delivery failure.
                    self._request_abort(f)
            elif type(action) is GiveUp:
                self.drop(action.flow, action.reason)

    def poll(self, timeout: float, extra_fd: int | None = None) -> bool:
        """One selector round; True when extra_fd is readable."""
        self._watch(extra_fd)
        if self._timers:
            timeout = min(timeout, max(0.0, self._timers[0][0] - time.monotonic()))
        ready = False
        for key, mask in self._sel.select(max(0.0, timeout)):
            f = key.data
            if f is None:
                ready = True
                continue
            assert isinstance(f, _Flow)
            if f.sock is None:  # given up earlier in this round
                continue
            if f.state == _CONNECTING:
                self._on_connect(f)
                continue
            if mask & _READ:
                self._on_readable(f)
            if mask & _WRITE and f.state == _OPEN:
                self._flush(f)
        if self._timers:
            self._fire_timers(time.monotonic())
        return ready

    def drop(self, flow: int, why: str) -> None:
        """Give the flow up as DROPPED (a layer above held too much for it)."""
        f = self._flows.get(flow)
        if f is not None:
            self._give_up(f, Outcome.DROPPED, why)

    def pop_gave_up(self) -> list[int]:
        """Flows that became FAILED or DROPPED since the last call: stop sending for them."""
        gave_up, self._gave_up = self._gave_up, []
        return gave_up

    def pop_finished(self) -> list[Delivery]:
        """Deliveries of flows whose local connection is closed, since the last call; then forgotten.

        A long run should call this regularly (and feed the summary) so finished flows do not pile up.
        """
        done = list(self._finished.values())
        self._finished.clear()
        return done

    def results(self) -> dict[int, Delivery]:
        """Every flow not yet taken by pop_finished(); live flows as they stand now."""
        out = dict(self._finished)
        for f in self._flows.values():
            out[f.flow] = Delivery(f.flow, f.outcome, f.bytes_sent, f.error)
        return out

    def drain(self, timeout: float | None = None) -> None:
        """End of run: write every queue and half-close every flow, or drop what is left at the timeout."""
        limit = self.config.drain_timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        for f in list(self._flows.values()):
            # Still open when the input ended: every byte was delivered, so end it cleanly.
            self._request_close(f)
        while self._flows:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            self.poll(remaining)
        for f in list(self._flows.values()):
            if f.state == _SHUT:  # delivered; only the target's own close was still awaited
                self._finish(f, rst=False)
            else:
                why = f"not delivered within the {limit:g}s drain timeout ({f.queued} bytes left)"
                self._give_up(f, Outcome.DROPPED, why)

    def close(self) -> None:
        """Drop whatever is still live and release every descriptor, the selector's included."""
        if self._closed:
            return
        self.drain(0)
        self._watch(None)
        self._sel.close()
        self._closed = True

    def __enter__(self) -> Replayer:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    @property
    def stats(self) -> ReplayStats:
        live = sum(f.bytes_sent for f in self._flows.values())
        return ReplayStats(
            connects_ok=self._connects_ok,
            connect_failures=self._connect_failures,
            open_sockets=self._open_sockets,
            bytes_sent=self._sent_finished + live,
            bytes_discarded=self._discarded,
            peak_queued=self._peak_queued,
        )

    @property
    def queued_bytes(self) -> int:
        return self._queued_total

    @property
    def live_flows(self) -> int:
        return len(self._flows)

    # -- sending -----------------------------------------------------------------------------------

    def _send_slow(self, f: _Flow, data: bytes) -> None:
        if f.close_requested:  # nothing can follow the client's FIN
            return
        if f.peer_eof:
            self._give_up(f, Outcome.FAILED, "the target closed the connection before every byte was sent")
            return
        self._enqueue(f, memoryview(data))

    def _enqueue(self, f: _Flow, chunk: memoryview) -> None:
        n = len(chunk)
        if not n:
            return
        f.queue.append(chunk)
        f.queued += n
        self._queued_total += n
        self._peak_queued = max(self._peak_queued, self._queued_total)
        self._backlog.add(f)
        if f.direct:
            f.direct = False
            self._set_events(f, _READ | _WRITE)
        cfg = self.config
        if f.queued > cfg.flow_buffer:
            self._give_up(
                f,
                Outcome.DROPPED,
                f"the target read too slowly: more than {cfg.flow_buffer} bytes waiting (--flow-buffer)",
            )
        elif self._queued_total > cfg.max_buffer:
            self._shed()

    def _shed(self) -> None:
        cfg = self.config
        while self._queued_total > cfg.max_buffer and self._backlog:
            worst = max(self._backlog, key=lambda fl: fl.queued)
            self._give_up(
                worst,
                Outcome.DROPPED,
                f"all flows together buffered more than {cfg.max_buffer} bytes (--max-buffer); "
                f"this one held the most ({worst.queued} bytes)",
            )

    def _flush(self, f: _Flow) -> None:
        sock = f.sock
        assert sock is not None
        q = f.queue
        while q:
            try:
                if len(q) == 1:
                    offered = len(q[0])
                    n = sock.send(q[0])
                else:
                    batch = list(itertools.islice(q, _IOV_BATCH))
                    offered = sum(len(b) for b in batch)
                    n = sock.sendmsg(batch)
            except BlockingIOError:
                break
            except OSError as exc:
                self._give_up(f, Outcome.FAILED, _reason(exc))
                return
            f.bytes_sent += n
            f.queued -= n
            self._queued_total -= n
            while n:
                head = q[0]
                if n >= len(head):
                    q.popleft()
                    n -= len(head)
                else:
                    q[0] = head[n:]
                    n = 0
            if n < offered and q:  # the kernel buffer is full: the next try would only say EAGAIN
                break
        if q:
            self._set_events(f, _WRITE if f.peer_eof else _READ | _WRITE)
            return
        self._backlog.discard(f)
        if f.abort_requested:
            self._finish(f, rst=True)
        elif f.close_requested:
            self._shutdown(f)
        elif f.peer_eof:
            self._set_events(f, 0)
        else:
            f.direct = True
            self._set_events(f, _READ)

    def _request_close(self, f: _Flow) -> None:
        if f.close_requested:
            return
        f.close_requested = True
        f.direct = False
        if f.state == _OPEN and not f.queue:
            self._shutdown(f)
        # Otherwise the FIN follows the last queued byte (after connecting if need be).

    def _request_abort(self, f: _Flow) -> None:
        """A reset never overtakes data: every byte queued before it is written first (the kernel has the rest)."""
        if (f.state == _OPEN and not f.queue) or f.state == _SHUT:
            self._finish(f, rst=True)
            return
        f.abort_requested = f.close_requested = True
        f.direct = False

    def _shutdown(self, f: _Flow) -> None:
        sock = f.sock
        assert sock is not None
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            self._give_up(f, Outcome.FAILED, _reason(exc))
            return
        f.state = _SHUT
        f.direct = False
        if f.peer_eof:
            self._finish(f, rst=False)
            return
        # Keep reading: closing now would make the kernel reset the target while it writes its response.
        self._set_events(f, _READ)
        self._schedule(f, self.config.linger_timeout)

    # -- reading -----------------------------------------------------------------------------------

    def _on_readable(self, f: _Flow) -> None:
        sock = f.sock
        assert sock is not None
        try:
            n = sock.recv_into(self._recv_buf)
        except BlockingIOError:
            return
        except OSError as exc:
            self._give_up(f, Outcome.FAILED, _reason(exc))
            return
        if n:
            self._discarded += n
            if self._on_response is not None:
                self._on_response(f.flow, bytes(self._recv_buf[:n]), time.monotonic())
            return
        if self._on_response is not None:
            self._on_response(f.flow, b"", time.monotonic())
        f.peer_eof = True
        f.direct = False  # a later Send has nowhere to go
        if f.queue:
            self._give_up(
                f, Outcome.FAILED, f"the target closed the connection with {f.queued} bytes still to send"
            )
        elif f.state == _SHUT:
            self._finish(f, rst=False)
        else:
            self._set_events(f, 0)

    # -- connecting --------------------------------------------------------------------------------

    def _connect(self, f: _Flow) -> None:
        f.attempts += 1
        try:
            sock = socket.socket(self.dest.family, socket.SOCK_STREAM)
        except OSError as exc:  # out of descriptors, most likely
            self._give_up(f, Outcome.FAILED, f"cannot open a socket: {_reason(exc)}")
            return
        self._open_sockets += 1
        f.sock = sock
        sock.setblocking(False)
        # Mirrored requests are usually small and latency-bound; don't let Nagle hold them back.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        err = sock.connect_ex(self.dest.address)
        if err == 0:
            self._connected(f)
        elif err == errno.EINPROGRESS:
            f.state = _CONNECTING
            self._set_events(f, _WRITE)
            self._schedule(f, self.config.connect_timeout)
        else:
            self._connect_failed(f, os.strerror(err).lower())

    def _on_connect(self, f: _Flow) -> None:
        sock = f.sock
        assert sock is not None
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err == 0:
            self._connected(f)
        else:
            self._connect_failed(f, os.strerror(err).lower())

    def _connected(self, f: _Flow) -> None:
        self._connects_ok += 1
        f.state = _OPEN
        f.timer = 0
        if f.queue:
            self._set_events(f, _READ | _WRITE)
            self._flush(f)
        elif f.abort_requested:
            self._finish(f, rst=True)
        elif f.close_requested:
            self._shutdown(f)
        else:
            f.direct = True
            self._set_events(f, _READ)

    def _connect_failed(self, f: _Flow, reason: str) -> None:
        self._connect_failures += 1
        self._close_socket(f, rst=False)
        cfg = self.config
        if f.attempts < cfg.connect_attempts:
            f.state = _WAITING
            self._schedule(f, cfg.connect_backoff * (2 ** (f.attempts - 1)))
            return
        attempts = f"{f.attempts} attempt" + ("s" if f.attempts > 1 else "")
        self._give_up(f, Outcome.FAILED, f"cannot connect to {self.dest}: {reason} ({attempts})")

    # -- timers ------------------------------------------------------------------------------------

    def _schedule(self, f: _Flow, delay: float) -> None:
        token = next(self._tokens)
        f.timer = token
        heapq.heappush(self._timers, (time.monotonic() + delay, token, f))

    def _fire_timers(self, now: float) -> None:
        timers = self._timers
        while timers and timers[0][0] <= now:
            _, token, f = heapq.heappop(timers)
            if f.timer != token or f.state == _DONE:  # cancelled or superseded
                continue
            f.timer = 0
            if f.state == _WAITING:
                self._connect(f)
            elif f.state == _CONNECTING:
                self._connect_failed(f, "timed out")
            elif f.state == _SHUT:  # the target never closed after our FIN; every byte went out all the same
                self._finish(f, rst=False)

    # -- ending flows ------------------------------------------------------------------------------

    def _give_up(self, f: _Flow, outcome: Outcome, error: str) -> None:
        if f.state == _DONE:
            return
        f.outcome = outcome
        f.error = error
        self._gave_up.append(f.flow)
        self._finish(f, rst=True)

    def _finish(self, f: _Flow, *, rst: bool) -> None:
        if f.state == _DONE:
            return
        if f.queued:
            self._queued_total -= f.queued
            f.queue.clear()
            f.queued = 0
        self._backlog.discard(f)
        self._close_socket(f, rst=rst)
        f.state = _DONE
        f.direct = False
        f.timer = 0
        del self._flows[f.flow]
        self._sent_finished += f.bytes_sent
        self._finished[f.flow] = Delivery(f.flow, f.outcome, f.bytes_sent, f.error)

    def _close_socket(self, f: _Flow, *, rst: bool) -> None:
        sock = f.sock
        if sock is None:
            return
        self._set_events(f, 0)
        if rst:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
            except OSError:
                pass
        sock.close()
        f.sock = None
        self._open_sockets -= 1

    # -- selector bookkeeping ----------------------------------------------------------------------

    def _set_events(self, f: _Flow, events: int) -> None:
        if events == f.events:
            return
        sock = f.sock
        assert sock is not None
        if f.events == 0:
            if sock.fileno() == self._extra_fd:  # the pipeline closed its fd and the number came back to us
                self._watch(None)
            self._sel.register(sock, events, f)
        elif events == 0:
            self._sel.unregister(sock)
        else:
            self._sel.modify(sock, events, f)
        f.events = events

    def _watch(self, fd: int | None) -> None:
        if fd == self._extra_fd:
            return
        if self._extra_fd is not None:
            try:
                self._sel.unregister(self._extra_fd)
            except (KeyError, ValueError, OSError):
                pass
            self._extra_fd = None
        if fd is not None:
            self._sel.register(fd, _READ, None)
            self._extra_fd = fd


def destination(to: str, *, allow_remote: bool = False) -> Destination:
    """--to, parsed, allowed and reachable: checked before anything else starts, so a typo fails fast."""
    dest = allowed(parse_to(to), allow_remote)
    check_target(dest)
    return dest
