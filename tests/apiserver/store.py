"""Thread-safe object storage with resourceVersions and watch fan-out.

The test thread (FakeCluster.add_*) and the server's event loop both write here, so every mutation
happens under one lock and watchers are fed with call_soon_threadsafe, which keeps event order.
"""

from __future__ import annotations

import asyncio
import copy
import threading
import uuid
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from .resources import Resource
from .status import conflict, gone, not_found

Obj = dict[str, Any]
Key = tuple[str, str, str]  # resource name, namespace ("" when cluster-scoped), object name

HISTORY = 5000  # events kept for watches that resume from a resourceVersion


def now_rfc3339() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Watcher:
    resource: str
    namespace: str
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[Obj | None] = field(default_factory=asyncio.Queue)


class Store:
    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._objects: dict[Key, Obj] = {}
        self._rv = 100
        self._history: deque[tuple[int, str, str, str, Obj]] = deque(maxlen=HISTORY)
        self._watchers: list[Watcher] = []

    @property
    def lock(self) -> threading.RLock:
        return self._lock

    def _next_rv(self) -> str:
        self._rv += 1
        return str(self._rv)

    def current_rv(self) -> str:
        with self._lock:
            return str(self._rv)

    def _emit(self, res: Resource, event_type: str, obj: Obj) -> None:
        ns = obj["metadata"].get("namespace", "")
        rv = int(obj["metadata"]["resourceVersion"])
        snapshot = copy.deepcopy(obj)
        self._history.append((rv, event_type, res.name, ns, snapshot))
        event = {"type": event_type, "object": snapshot}
        for w in self._watchers:
            if w.resource == res.name and (not w.namespace or w.namespace == ns):
                w.loop.call_soon_threadsafe(w.queue.put_nowait, copy.deepcopy(event))

    def create(self, res: Resource, obj: Obj) -> Obj:
        meta = obj.setdefault("metadata", {})
        key = (res.name, meta.get("namespace", "") if res.namespaced else "", meta["name"])
        with self._lock:
            if key in self._objects:
                raise ValueError(f"{res.name} {key[1]}/{key[2]} already exists")
            obj["apiVersion"], obj["kind"] = res.api_version, res.kind
            meta.setdefault("uid", str(uuid.uuid4()))
            meta.setdefault("creationTimestamp", now_rfc3339())
            meta["resourceVersion"] = self._next_rv()
            self._objects[key] = copy.deepcopy(obj)
            self._emit(res, "ADDED", obj)
            return copy.deepcopy(obj)

    def get(self, res: Resource, namespace: str, name: str) -> Obj:
        with self._lock:
            obj = self._objects.get((res.name, namespace if res.namespaced else "", name))
            if obj is None:
                raise not_found(res.name, name, res.group)
            return copy.deepcopy(obj)

    def list(self, res: Resource, namespace: str) -> tuple[list[Obj], str]:
        with self._lock:
            items = [
                copy.deepcopy(o)
                for (r, ns, _), o in sorted(self._objects.items())
                if r == res.name and (not namespace or ns == namespace)
            ]
            return items, str(self._rv)

    def update(self, res: Resource, obj: Obj, expect_rv: str | None = None) -> Obj:
        """Replace an object; expect_rv, when given, must match the stored one (optimistic concurrency)."""
        meta = obj["metadata"]
        key = (res.name, meta.get("namespace", "") if res.namespaced else "", meta["name"])
        with self._lock:
            old = self._objects.get(key)
            if old is None:
                raise not_found(res.name, meta["name"], res.group)
            if expect_rv and expect_rv != old["metadata"]["resourceVersion"]:
                raise conflict(res.name, meta["name"], res.group)
            for immutable in ("uid", "creationTimestamp", "namespace", "name"):
                if immutable in old["metadata"]:
                    meta[immutable] = old["metadata"][immutable]
            if obj == old:
                return copy.deepcopy(old)  # a no-op write does not bump the resourceVersion
            meta["resourceVersion"] = self._next_rv()
            self._objects[key] = copy.deepcopy(obj)
            self._emit(res, "MODIFIED", obj)
            return copy.deepcopy(obj)

    def delete(self, res: Resource, namespace: str, name: str) -> Obj:
        with self._lock:
            obj = self._objects.pop((res.name, namespace if res.namespaced else "", name), None)
            if obj is None:
                raise not_found(res.name, name, res.group)
            obj["metadata"]["resourceVersion"] = self._next_rv()
            self._emit(res, "DELETED", obj)
            return copy.deepcopy(obj)

    def watch(self, res: Resource, namespace: str, since_rv: str | None, loop: asyncio.AbstractEventLoop) -> Watcher:
        """Register a watcher and pre-load it with the events it must see first.

        No resourceVersion (or "0"): synthetic ADDED events for the current state, like a real server.
        A resourceVersion: every change after it, or 410 Expired if it is older than the history kept.
        """
        w = Watcher(res.name, namespace, loop)
        with self._lock:
            if not since_rv or since_rv == "0":
                for obj in self.list(res, namespace)[0]:
                    w.queue.put_nowait({"type": "ADDED", "object": obj})
            else:
                rv = int(since_rv) if since_rv.isdigit() else -1
                oldest = self._history[0][0] if self._history else self._rv + 1
                if rv < 0 or (rv < oldest - 1 and rv < self._rv):
                    raise gone(f"too old resource version: {since_rv} ({oldest - 1})")
                for ev_rv, ev_type, r, ns, obj in self._history:
                    if ev_rv > rv and r == res.name and (not namespace or ns == namespace):
                        w.queue.put_nowait({"type": ev_type, "object": copy.deepcopy(obj), "replayed": True})
            self._watchers.append(w)
        return w

    def unwatch(self, w: Watcher) -> None:
        with self._lock:
            if w in self._watchers:
                self._watchers.remove(w)

    def compact(self) -> str:
        """Forget the event history, as etcd compaction does: resuming from any older resourceVersion is 410."""
        with self._lock:
            self._history.clear()
            return str(self._rv)

    def expire_watchers(self, message: str) -> int:
        """End every open watch with an ERROR event (410 Expired), as a server whose watch fell behind does."""
        event = {"type": "ERROR", "object": gone(message).status()}
        with self._lock:
            watchers, self._watchers = self._watchers, []
            for w in watchers:
                w.loop.call_soon_threadsafe(w.queue.put_nowait, copy.deepcopy(event))
            return len(watchers)

    def close_watchers(self) -> None:
        with self._lock:
            for w in self._watchers:
                w.loop.call_soon_threadsafe(w.queue.put_nowait, None)
            self._watchers.clear()
