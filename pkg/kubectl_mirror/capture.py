"""The live capture: every tapped pod's tcpdump stream, merged into one pcapng byte stream.

One interface per pod (its `if_name` is `namespace/pod`), so `-w` files say where each packet came from and
pods whose tcpdump writes different link types can share one stream. When a pod's exec stream drops, a new
capture is started with backoff and the gap is reported, so the engine can end that pod's open flows as
incomplete: bytes may have been lost in between.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import struct
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import BinaryIO, Protocol

from .errors import InputError, MirrorError
from .pcap import PcapReader, Record

log = logging.getLogger(__name__)

# Before tcpdump is told to stop: wait until nothing arrived for SETTLE_QUIET s, SETTLE_MAX s at most.
SETTLE_QUIET = 0.3
SETTLE_MAX = 3.0
# How long a pod's stop may take at most: stop_remote's SIGINT wait, its SIGKILL fallback and the exec round trips
# around them, with room to spare. Past it the stop is abandoned (the run must end).
STOPPER_BOUND = 60.0
# Following a workload, a capture whose stream ends waits this long for the watch to say its pod went (a deleted
# pod's processes die a moment before the DELETED event arrives) before it reopens the stream as a drop.
RETIRE_GRACE = 1.0

# ---- pcapng blocks (section header, interface description, enhanced packet) -----------------------------

_SHB, _IDB, _EPB = 0x0A0D0D0A, 0x00000001, 0x00000006
_BYTE_ORDER_MAGIC = 0x1A2B3C4D
_OPT_END, _IF_NAME, _IF_TSRESOL = 0, 2, 9
MAX_SNAPLEN = 262144


def _pad4(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % 4)


def _option(code: int, value: bytes) -> bytes:
    return struct.pack("<HH", code, len(value)) + _pad4(value)


def _block(kind: int, body: bytes) -> bytes:
    total = 12 + len(body)
    return struct.pack("<II", kind, total) + body + struct.pack("<I", total)


def section_header() -> bytes:
    # Section length -1: unknown, as for any stream written before its end is known.
    return _block(_SHB, struct.pack("<IHHq", _BYTE_ORDER_MAGIC, 1, 0, -1))


def interface_block(linktype: int, name: str) -> bytes:
    options = _option(_IF_NAME, name.encode()) + _option(_IF_TSRESOL, bytes([9])) + _option(_OPT_END, b"")
    return _block(_IDB, struct.pack("<HHI", linktype, 0, MAX_SNAPLEN) + options)


def packet_block(interface: int, ts_ns: int, data: bytes, orig_len: int) -> bytes:
    head = struct.pack("<IIIII", interface, ts_ns >> 32, ts_ns & 0xFFFFFFFF, len(data), orig_len)
    return _block(_EPB, head + _pad4(data))


# ---- one pod's capture ---------------------------------------------------------------------------------


class PodCapture(Protocol):
    """What the merger needs of one pod: a way to (re)start its capture and to stop it for good."""

    @property
    def name(self) -> str:
        """`namespace/pod`, the interface name in the merged stream."""

    @property
    def server_hosts(self) -> frozenset[str]:
        """The pod's addresses: flows to them end when this pod's stream has a gap."""

    def start(self) -> BinaryIO:
        """Start tcpdump and return its pcap stdout. Raises MirrorError when it cannot."""

    def lost_packets(self) -> int:
        """Packets the capture whose stream just ended saw but never wrote (tcpdump's exit counters)."""

    def stop(self, *, gap: bool = False) -> None:
        """Make sure the remote tcpdump is gone and close the stream. Safe to call twice.

        `gap`: the stream dropped and a new capture follows; a tcpdump that cannot be reached now is stopped later.
        """


@dataclass(frozen=True, slots=True)
class Gap:
    """A pod's stream dropped after `after_frame` records of the merged stream had been written.

    Or, with `lost` > 0, its capture ended having lost that many packets: the stream itself did not drop, but a
    flow still open at its end may have lost its last bytes (its FIN among them) without a hole to show it.
    """

    pod: str
    servers: frozenset[str]
    after_frame: int
    reason: str
    lost: int = 0
    # The pod left the run (deleted, replaced, not Ready): its capture ended for good, and a flow still open may
    # never see its end in this capture. Not a drop: nothing is reopened.
    retired: bool = False

    @property
    def dropped(self) -> bool:
        """The stream dropped (and was reopened), as opposed to a loss reported at the end or a pod that left."""
        return self.lost == 0 and not self.retired


@dataclass
class CaptureStats:
    records: int = 0
    reconnects: int = 0
    failed_pods: list[str] = field(default_factory=list)
    records_by_pod: dict[str, int] = field(default_factory=dict)


@dataclass
class _Slot:
    """One pod in the merged capture: its thread, and the event that ends it (retired, or the run stopping)."""

    pod: PodCapture
    halt: threading.Event = field(default_factory=threading.Event)
    retired: str | None = None  # why it left the run
    thread: threading.Thread | None = None


class LiveCapture:
    """Merges the pods' captures into `self.stream` (the read end of a pipe), in arrival order."""

    def __init__(self, pods: Sequence[PodCapture], *, reconnect_attempts: int = 5, backoff: float = 0.5,
                 max_backoff: float = 8.0, sleep: Callable[[float], None] = time.sleep, follow: bool = False,
                 on_lost: Callable[[PodCapture, str], None] | None = None) -> None:
        self._slots: list[_Slot] = [_Slot(pod) for pod in pods]
        # follow: pods come and go during the run (the workload is watched), so the stream ends only when the run
        # stops, not when the last pod's capture does; on_lost hears of a pod whose capture could not restart.
        self._follow = follow
        self._on_lost = on_lost
        self._attempts = reconnect_attempts
        self._backoff = backoff
        self._max_backoff = max_backoff
        self._sleep = sleep
        read_fd, self._write_fd = os.pipe()
        self.stream: BinaryIO = os.fdopen(read_fd, "rb", buffering=0)
        # Two locks: _write serialises blocks into the pipe (and interface ids); _lock guards gaps and counters.
        # The engine's loop takes _lock (pop_gaps) and is also what drains the pipe, so _lock must never be
        # held across a write that can block on a full pipe.
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._interfaces: dict[tuple[str, int], int] = {}
        self._gaps: list[Gap] = []
        self._written_records = 0  # under _write_lock: the merged stream's record count, for ordering gaps
        self._last_write = time.monotonic()
        self._stopping = threading.Event()
        self._stop_started = False
        self._stop_done = threading.Event()
        self._threads: list[threading.Thread] = []
        self._retiring: list[threading.Thread] = []  # stoppers of retired pods, joined before the run ends
        self._alive = 0
        self.stats = CaptureStats()
        self.errors: list[MirrorError] = []

    # ---- public ------------------------------------------------------------------------------------

    @property
    def _pods(self) -> list[PodCapture]:
        with self._lock:
            return [slot.pod for slot in self._slots]

    def pods(self) -> list[PodCapture]:
        """Every pod the run has captured (or is starting to), retired ones included."""
        return self._pods

    def start(self) -> None:
        """Start every pod's capture; the first start of each must succeed, or the run does not begin."""
        streams: list[BinaryIO] = []
        slots = list(self._slots)
        try:
            for slot in slots:
                streams.append(slot.pod.start())
        except BaseException:
            for slot in slots[: len(streams)]:
                slot.pod.stop()
            raise
        self._write(section_header())
        with self._lock:
            self._alive = len(slots)
        for slot, stream in zip(slots, streams, strict=True):
            self._spawn(slot, stream)

    def _spawn(self, slot: _Slot, stream: BinaryIO) -> None:
        t = threading.Thread(target=self._run_pod, args=(slot, stream), name=f"capture {slot.pod.name}", daemon=True)
        slot.thread = t
        with self._lock:
            self._threads.append(t)
        t.start()

    def add(self, pod: PodCapture) -> None:
        """Start capturing one more pod while the run goes on (a pod the watch saw become Ready).

        Registered before its start, so a stop that comes meanwhile reaches it (its start then undoes itself).
        Raises MirrorError when it cannot start, or when the run is stopping.
        """
        slot = _Slot(pod)
        with self._lock:
            if self._stop_started:
                raise MirrorError(f"not starting a capture in {pod.name}: the run is stopping")
            self._slots.append(slot)
        try:
            stream = pod.start()
        except BaseException:
            with self._lock:
                self._slots.remove(slot)
            raise
        with self._lock:
            late = self._stop_started
            if not late:
                self._alive += 1
        if late:
            pod.stop()
            raise MirrorError(f"the capture in {pod.name} started as the run was stopping; it was stopped")
        self._spawn(slot, stream)

    def retire(self, name: str, why: str) -> PodCapture | None:
        """End one pod's capture for good (it left the workload): its tcpdump is stopped if the pod still runs,
        and its open flows end as incomplete once its last packets are in. Returns the pod, or None if unknown.

        The stop runs on a thread of its own: the caller (the watch) must not wait for exec round trips.
        """
        with self._lock:
            slot = next((s for s in self._slots if s.pod.name == name and s.retired is None), None)
            if slot is None:
                return None
            slot.retired = why
        slot.halt.set()
        stopper = threading.Thread(target=slot.pod.stop, name=f"retire {name}", daemon=True)
        with self._lock:
            self._retiring.append(stopper)
        stopper.start()
        return slot.pod

    def _settle(self) -> None:
        deadline = time.monotonic() + SETTLE_MAX
        while time.monotonic() < deadline:
            with self._write_lock:
                quiet = time.monotonic() - self._last_write
            if quiet >= SETTLE_QUIET or self._alive == 0:
                return
            time.sleep(0.05)

    def pop_gaps(self) -> list[Gap]:
        with self._lock:
            gaps, self._gaps = self._gaps, []
        return gaps

    def stop(self, timeout: float = 15.0, *, reader_done: bool = False) -> None:
        """Stop every remote tcpdump (they flush and exit, so the stream ends cleanly), then wait for the readers.

        tcpdump leaves whatever is still in its kernel buffer behind when it is signalled, and after a burst that
        can be many packets queued behind a slower exec stream: so first let the stream run dry (quiet for
        SETTLE_QUIET seconds, SETTLE_MAX at most).
        """
        if reader_done:
            # Nobody reads the merged stream any more: unblock writers now instead of waiting for them.
            self.stream.close()
        with self._lock:
            first, self._stop_started = not self._stop_started, True
        if not first:
            # Someone else is stopping (the engine's Ctrl-C hook): its results (tcpdump's counters, warnings) must
            # be in before the summary is printed, so wait for it rather than return at once.
            # Bounded by what the first stop can take: settling, then the stoppers (STOPPER_BOUND at most) and
            # the exit counters. Returning early would let the process exit and kill that thread
            # half-way, leaving a tcpdump in the pod.
            self._stop_done.wait(timeout + SETTLE_MAX + STOPPER_BOUND)
            return
        try:
            self._stop(timeout)
        finally:
            self._stop_done.set()

    def _stop(self, timeout: float) -> None:
        if not self._stopping.is_set() and not self.stream.closed:
            self._settle()
        self._stopping.set()
        with self._lock:
            slots = list(self._slots)
            retiring = list(self._retiring)
        for slot in slots:
            slot.halt.set()
        # Retired pods were stopped already (or are being): stopping them again is a no-op, and harmless.
        stoppers = [threading.Thread(target=slot.pod.stop, daemon=True) for slot in slots]
        for t in stoppers:
            t.start()
        # The stoppers bound their own time (stop_remote gives up with an error); returning before they are done
        # would let the process exit half-way through one and leave its tcpdump running in the pod.
        for t in stoppers + retiring:
            t.join(STOPPER_BOUND)
        deadline = time.monotonic() + timeout
        with self._lock:
            threads = list(self._threads)
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        if any(t.is_alive() for t in threads) and not self.stream.closed:
            # A reader still blocked writing into a pipe nobody drains any more (the engine has finished):
            # closing the read end turns its write into EPIPE, so it lets go of the write lock.
            self.stream.close()
            for t in threads:
                t.join(2.0)
        self._close_write()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    # ---- the pod threads ---------------------------------------------------------------------------

    def _run_pod(self, slot: _Slot, stream: BinaryIO) -> None:
        pod = slot.pod
        try:
            while True:
                reason = self._pump(pod, stream)
                if slot.retired is not None:
                    # Whatever it sent is in: its flows still open end here (incomplete), not at the run's end.
                    self._add_gap(Gap(pod.name, pod.server_hosts, 0, f"pod {slot.retired}", retired=True))
                    return
                if self._stopping.is_set():
                    lost = pod.lost_packets()
                    if lost:
                        self._add_gap(Gap(pod.name, pod.server_hosts, 0, f"tcpdump lost {lost} packets", lost))
                    return
                if self._follow and slot.halt.wait(RETIRE_GRACE) and slot.retired is not None:
                    # The pod was deleted: its processes went with it, a moment before the watch said so. That is
                    # the pod leaving, not a stream to reopen.
                    self._add_gap(Gap(pod.name, pod.server_hosts, 0, f"pod {slot.retired}", retired=True))
                    return
                if self._stopping.is_set():
                    continue  # the run stopped meanwhile: the stream has ended, so the next pump returns at once
                log.warning("%s: %s; starting a new capture", pod.name, reason)
                self._add_gap(Gap(pod.name, pod.server_hosts, 0, reason))
                pod.stop(gap=True)
                restarted = self._restart(slot)
                if restarted is None:
                    if slot.retired is not None:
                        self._add_gap(Gap(pod.name, pod.server_hosts, 0, f"pod {slot.retired}", retired=True))
                    return
                stream = restarted
        finally:
            with self._lock:
                self._alive -= 1
                last = self._alive == 0 and (not self._follow or self._stopping.is_set())
            if last:
                self._close_write()

    def _add_gap(self, gap: Gap) -> None:
        with self._write_lock:
            after = self._written_records  # every record of this pod before the gap is in the pipe
        with self._lock:
            self._gaps.append(dataclasses.replace(gap, after_frame=after))

    def _pump(self, pod: PodCapture, stream: BinaryIO) -> str:
        """Copy one capture's records into the merged stream until it ends; return why it ended."""
        reader = PcapReader(stream)
        try:
            # Read to the end even when stopping: tcpdump flushes its last packets when it is told to stop.
            while True:
                batch = reader.read_batch()
                if not batch:
                    return "the exec stream ended"
                self._write_records(pod, batch)
        except InputError as exc:
            return f"the capture stream broke: {exc.message}"
        except MirrorError as exc:
            return f"the exec stream failed: {exc.message}"
        except Exception as exc:  # the WebSocket library's own errors: a dropped stream, whatever the cause
            return f"the exec stream failed: {exc.__class__.__name__}: {exc}"

    def _restart(self, slot: _Slot) -> BinaryIO | None:
        pod = slot.pod
        delay = self._backoff
        last: MirrorError | None = None
        for _ in range(self._attempts):
            if slot.halt.wait(delay) or self._stopping.is_set():
                return None
            try:
                stream = pod.start()
            except MirrorError as exc:
                last = exc
                delay = min(delay * 2, self._max_backoff)
                continue
            if slot.halt.is_set():
                # Retired (or the run stopped) while this start waited for tcpdump: undo it, the stop missed it.
                pod.stop()
                return None
            with self._lock:
                self.stats.reconnects += 1
            # Said at the default level like the drop itself: the user should see it recovered.
            log.warning("%s: capturing again", pod.name)
            return stream
        log.warning("%s: could not capture again after %d attempts; its traffic is no longer mirrored",
                    pod.name, self._attempts)
        with self._lock:
            self.stats.failed_pods.append(pod.name)
            if last is not None and self._on_lost is None:
                self.errors.append(last)
        if self._on_lost is not None:
            self._on_lost(pod, last.message if last is not None else "the capture could not be restarted")
        return None

    def _write_records(self, pod: PodCapture, batch: list[Record]) -> None:
        blocks: list[bytes] = []
        with self._write_lock:
            for rec in batch:
                key = (pod.name, rec.linktype)
                iface = self._interfaces.get(key)
                if iface is None:
                    # Interface ids are the order of their blocks in the section: assign under the write lock.
                    iface = self._interfaces[key] = len(self._interfaces)
                    blocks.append(interface_block(rec.linktype, pod.name))
                blocks.append(packet_block(iface, round(rec.ts * 1e9), rec.data, rec.orig_len))
            # Written under the write lock so blocks of two pods never interleave and ids stay in order.
            self._write(b"".join(blocks))
            self._written_records += len(batch)
            self._last_write = time.monotonic()
        with self._lock:
            self.stats.records += len(batch)
            self.stats.records_by_pod[pod.name] = self.stats.records_by_pod.get(pod.name, 0) + len(batch)

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                n = os.write(self._write_fd, view)
            except BrokenPipeError:
                self._stopping.set()  # the engine stopped reading: nothing more to deliver
                return
            except OSError:
                return
            view = view[n:]

    def _close_write(self) -> None:
        with self._write_lock:
            fd, self._write_fd = self._write_fd, -1
        if fd >= 0:
            try:
                os.close(fd)
            except OSError:
                pass
