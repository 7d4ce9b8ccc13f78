"""Following the workload during a live run: the pod watch, the follow policy and the capture, wired together.

The watch thread turns pod changes into the follower's decisions; one worker thread carries them out in order
(tapping a pod and starting its capture takes seconds, and must not hold up the watch). Stopping a pod's capture
is handed to the capture itself, which does it on a thread of its own.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable

from .capture import LiveCapture, PodCapture
from .errors import MirrorError
from .follow import Decision, End, Follower, Mode, Say, Start, Stop
from .kubeconfig import Connection
from .podwatch import Change, PodWatch
from .target import Pod, PodSelection
from .watchloop import WatchLoop, selection_query

log = logging.getLogger(__name__)

# How long the run's end waits for a start under way (a tap being added, tcpdump starting) to finish and undo
# itself: past it, that pod's tcpdump could be left running, so this is generous.
START_BOUND = 120.0
# Pods started at once (a scale-up, --all-pods): each start is mostly waiting (tap image, tcpdump), so a few run
# side by side instead of one after another, without opening an exec stream per pod at once on a big scale-up.
PARALLEL_STARTS = 4


class Following:
    """Keeps the capture on the pods the follower picks, for as long as the run lasts."""

    def __init__(self, conn: Connection, selection: PodSelection, follower: Follower, capture: LiveCapture,
                 make_capture: Callable[[Pod], PodCapture], *, say: Callable[[str], None],
                 on_end: Callable[[str], None]) -> None:
        self.conn, self.selection, self.follower, self.capture = conn, selection, follower, capture
        self.make_capture = make_capture
        self.say, self.on_end = say, on_end
        self._lock = threading.Lock()  # the follower is driven from the watch, the worker and capture threads
        self._queue: queue.Queue[Decision | None] = queue.Queue()
        self._ready_now: list[Pod] = []  # the Ready pods as of the latest change: a snapshot for other threads
        self._stopping = threading.Event()
        pod_name = selection.pods[0].metadata.name if selection.query is None else None
        state = PodWatch()
        state.seed([p for p in selection.pods if p.metadata.name in follower.active])
        self.watch = WatchLoop(conn, conn.namespace, selection_query(selection.query, pod_name), self._changes,
                               self._watch_failed, state)
        self._worker = threading.Thread(target=self._work, name="follow", daemon=True)
        self._starts: list[threading.Thread] = []
        self._start_slots = threading.Semaphore(PARALLEL_STARTS)

    @staticmethod
    def mode_for(selection: PodSelection, all_pods: bool) -> Mode:
        if selection.query is None:
            return Mode.NAMED
        return Mode.ALL if all_pods else Mode.ONE

    def start(self) -> None:
        self._worker.start()
        self.watch.start()

    def stop(self) -> None:
        """Stop following; a start under way is waited for (it undoes itself once the capture is stopping)."""
        self._stopping.set()
        self.watch.stop()
        self._queue.put(None)
        deadline = time.monotonic() + START_BOUND
        self._worker.join(START_BOUND)
        with self._lock:
            starts = list(self._starts)
        for t in starts:
            t.join(max(0.0, deadline - time.monotonic()))

    # ---- the watch's side ---------------------------------------------------------------------------

    def _changes(self, changes: list[Change], state: PodWatch) -> None:
        for c in changes:
            log.info("pod %s: %s (%s)", c.name, c.kind.value, c.why)
        ready = state.ready  # on the watch's thread, the only one that changes `state`
        with self._lock:
            self._ready_now = ready
            decisions = self.follower.changes(changes, ready)
        self._post(decisions)

    def _watch_failed(self, err: MirrorError) -> None:
        self.say(f"warning: {err.message}; the run goes on without following pod changes")

    def lost(self, pod: PodCapture, message: str) -> None:
        """The capture gave up restarting a pod (LiveCapture's on_lost)."""
        name = pod.name.split("/", 1)[-1]
        with self._lock:
            decisions = self.follower.capture_lost(name, message, self._ready())
        self._post(decisions)

    def _ready(self) -> list[Pod]:
        return self._ready_now  # callers hold self._lock

    def _post(self, decisions: list[Decision]) -> None:
        for d in decisions:
            self._queue.put(d)

    # ---- the worker ---------------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            decision = self._queue.get()
            if decision is None:
                return
            try:
                self._carry_out(decision)
            except Exception as exc:  # a bug here must not end following silently: say it and go on
                log.exception("following: %s failed", decision)
                self.say(f"warning: {type(exc).__name__}: {exc}")

    def _carry_out(self, decision: Decision) -> None:
        if isinstance(decision, Say):
            self.say(decision.text)
        elif isinstance(decision, End):
            self.on_end(decision.message)
        elif isinstance(decision, Stop):
            ns = self.conn.namespace
            if self.capture.retire(f"{ns}/{decision.name}", decision.why) is None:
                log.info("pod %s: nothing to stop (its start had not finished)", decision.name)
        elif isinstance(decision, Start):
            t = threading.Thread(target=self._start, args=(decision.pod,), name=f"start {decision.name}",
                                 daemon=True)
            with self._lock:
                self._starts = [s for s in self._starts if s.is_alive()] + [t]
            t.start()

    def _start(self, pod: Pod) -> None:
        with self._start_slots:
            try:
                self._start_one(pod)
            except Exception as exc:  # a bug here must not pass unnoticed: say it and go on
                log.exception("following: starting %s failed", pod.metadata.name)
                self.say(f"warning: {type(exc).__name__}: {exc}")

    def _start_one(self, pod: Pod) -> None:
        name = pod.metadata.name
        if self._stopping.is_set() or self.capture.stopping:
            return
        try:
            self.capture.add(self.make_capture(pod))
        except MirrorError as exc:
            if self._stopping.is_set() or self.capture.stopping:
                return
            with self._lock:
                if name not in self.follower.active:
                    return  # it left while it was being started: its start was undone, nothing failed
                decisions = self.follower.start_failed(name, exc.message, self._ready())
            self._post(decisions)
            return
        with self._lock:
            decisions = self.follower.started(name)
            gone = name not in self.follower.active
        if gone:
            # It left while it was being started (the Stop found nothing to stop): stop it now.
            self.capture.retire(f"{self.conn.namespace}/{name}", "gone")
        self._post(decisions)

