"""The HTTP edge of podwatch: list and watch the selected pods on a thread, hand each batch of changes on.

A watch ends for ordinary reasons (the server's timeout, a load balancer, an API server restart): it is resumed
from the last resourceVersion seen, with backoff while the server cannot be reached. 410 Expired relists.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from collections.abc import Callable, Sequence

from .cluster import Watch, call, watch
from .errors import ApiError, Forbidden, MirrorError
from .kubeconfig import Connection
from .podwatch import Change, ListPods, PodWatch, WatchFailed

log = logging.getLogger(__name__)

PODS_PATH = "/api/v1/namespaces/{namespace}/pods"
# Asked of the server per watch request; it ends the watch then, and the loop resumes.
WATCH_SECONDS = 290
# A connection that dies silently (no RST: a NAT or load balancer forgot it) is noticed when nothing came for this
# long; servers send a bookmark about once a minute, so a healthy quiet watch rarely hits it, and resuming is cheap.
READ_TIMEOUT = 150.0
BACKOFF_FIRST, BACKOFF_MAX = 0.5, 8.0


def selection_query(label_selector: str | None, pod_name: str | None) -> list[tuple[str, str]]:
    if pod_name is not None:
        return [("fieldSelector", f"metadata.name={pod_name}")]
    return [("labelSelector", label_selector)] if label_selector else []


class WatchLoop:
    """Runs list + watch until stopped; `on_changes(changes, state)` is called on this loop's thread."""

    def __init__(self, conn: Connection, namespace: str, query: Sequence[tuple[str, str]],
                 on_changes: Callable[[list[Change], PodWatch], None],
                 on_fatal: Callable[[MirrorError], None], state: PodWatch | None = None) -> None:
        self.conn, self.namespace, self.query = conn, namespace, list(query)
        self.on_changes, self.on_fatal = on_changes, on_fatal
        self.state = state or PodWatch()
        self._stop = threading.Event()
        self._resp: Watch | None = None
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="pod watch", daemon=True)
        self.watches = 0  # watch requests made: resumes are the ones after the first
        self.drops = 0  # watches that ended in an error (not the server's own timeout)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        with self._lock:
            resp = self._resp
        if resp is not None:
            try:
                resp.shutdown()  # wakes the blocked read
            except Exception:  # the response may be half-closed already; any failure here means it ended
                pass
        self._thread.join(timeout)

    # ---- the loop -----------------------------------------------------------------------------------

    def _run(self) -> None:
        delay = BACKOFF_FIRST
        while not self._stop.is_set():
            began = time.monotonic()
            try:
                if isinstance(self.state.next_request(), ListPods):
                    self._list()
                    continue
                self._watch()
                delay = BACKOFF_FIRST
                if time.monotonic() - began < 1.0:
                    # A watch that a proxy ends at once, again and again, must not turn into a busy loop.
                    self._stop.wait(BACKOFF_FIRST)
                continue
            except ApiError as err:
                if err.status == 410:
                    log.info("pod watch: resourceVersion expired (410): listing again")
                    self.state.expired()
                    continue
                if isinstance(err, Forbidden) or err.status == 401:
                    self.on_fatal(err)
                    return
                log.warning("pod watch: %s; retrying", err.message)
            except WatchFailed as exc:
                log.warning("pod watch: the server ended the watch with error %d (%s); listing again",
                            exc.code, exc.message)
                self.state.expired()
            except MirrorError as exc:
                if self._stop.is_set():
                    return
                self.drops += 1
                log.info("pod watch dropped (%s); resuming from resourceVersion %s", exc.message,
                         self.state.resource_version or "(relist)")
            except Exception as exc:  # a cut stream mid-line (not JSON), whatever else the boundary did not type
                if self._stop.is_set():
                    return
                self.drops += 1
                log.info("pod watch dropped (%s: %s); resuming from resourceVersion %s", type(exc).__name__, exc,
                         self.state.resource_version or "(relist)")
            if self._stop.wait(delay * (0.5 + random.random())):
                return
            delay = min(delay * 2, BACKOFF_MAX)

    def _list(self) -> None:
        body = call(self.conn, "GET", PODS_PATH, {"namespace": self.namespace}, query=self.query, timeout=60.0)
        rv = str((body.get("metadata") or {}).get("resourceVersion") or "")
        changes = self.state.listed(list(body.get("items") or []), rv)
        if not rv:
            raise MirrorError("the pod list carried no resourceVersion")
        self.on_changes(changes, self.state)

    def _watch(self) -> None:
        rv = self.state.resource_version
        query = [*self.query, ("watch", "true"), ("resourceVersion", rv), ("allowWatchBookmarks", "true"),
                 ("timeoutSeconds", str(WATCH_SECONDS))]
        self.watches += 1
        resp = watch(self.conn, PODS_PATH, {"namespace": self.namespace}, query, timeout=(30.0, READ_TIMEOUT))
        with self._lock:
            self._resp = resp
        log.debug("pod watch: watching from resourceVersion %s", rv)
        try:
            if self._stop.is_set():
                return
            for line in resp.lines():
                if self._stop.is_set():
                    return
                event = json.loads(line)
                log.debug("pod watch: %s %s", event.get("type"),
                          ((event.get("object") or {}).get("metadata") or {}).get("name"))
                changes = self.state.event(event)
                if changes:
                    self.on_changes(changes, self.state)
                if not self.state.resource_version:
                    log.info("pod watch: resourceVersion expired (410): listing again")
                    return
        finally:
            with self._lock:
                self._resp = None
            resp.close()

