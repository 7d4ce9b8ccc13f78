"""The watch protocol as kube-apiserver speaks it: chunked JSON lines, bookmarks, and 410 Expired as an event.

A watch answers 200 at once and streams `{"type": ..., "object": ...}` lines. A resourceVersion older than the
history kept (after compaction) is not an HTTP 410 but an `ERROR` event carrying a 410 Expired Status, followed by
the end of the stream: that is what the python client and client-go's reflector see from a real server. With
`allowWatchBookmarks=true` the server sends `BOOKMARK` events (an object with only kind, apiVersion and
metadata.resourceVersion) so a client watching a quiet selection can resume from a recent resourceVersion.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from .resources import Resource
from .selectors import field_selector, label_selector
from .status import ApiError, bad_request, gone
from .store import Store

Obj = dict[str, Any]
WATCH_DEFAULT_TIMEOUT = 300.0  # a real server picks 30-60 min; tests never need that long


@dataclass
class WatchSettings:
    # A real server sends a bookmark about once a minute (and just before a watch times out); tests need it sooner.
    bookmark_every: float = 1.0


def dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"))


def expired_event(message: str) -> Obj:
    """The ERROR event a real server sends when a watch's resourceVersion has been compacted away."""
    return {"type": "ERROR", "object": gone(message).status()}


def bookmark_event(res: Resource, rv: str) -> Obj:
    return {"type": "BOOKMARK", "object": {"kind": res.kind, "apiVersion": res.api_version,
                                           "metadata": {"resourceVersion": rv}}}


def filter_event(event: Obj, matches: bool, shown: set[str]) -> Obj | None:
    """A selector watch sees objects enter (ADDED) and leave (DELETED) its selection, like the watch cache does."""
    uid = event["object"]["metadata"]["uid"]
    # Replayed history (a resume from a resourceVersion) keeps its type: the client already knows what matched.
    replayed = event.pop("replayed", False)
    if event["type"] == "DELETED" or not matches:
        if uid not in shown and not (replayed and matches):
            return None
        shown.discard(uid)
        return {"type": "DELETED", "object": event["object"]}
    if event["type"] == "MODIFIED" and uid not in shown and not replayed:
        event = {"type": "ADDED", "object": event["object"]}
    shown.add(uid)
    return event


async def serve_watch(request: web.Request, store: Store, settings: WatchSettings, res: Resource,
                      ns: str) -> web.StreamResponse:
    match_l = label_selector(request.query.get("labelSelector"))
    match_f = field_selector(request.query.get("fieldSelector"), res.kind)
    try:
        timeout = float(request.query.get("timeoutSeconds", WATCH_DEFAULT_TIMEOUT))
    except ValueError as exc:
        raise bad_request(f"invalid timeoutSeconds: {request.query.get('timeoutSeconds')}") from exc
    bookmarks = request.query.get("allowWatchBookmarks", "") in ("1", "true", "True")
    loop = asyncio.get_running_loop()
    expired: Obj | None = None
    try:
        watcher = store.watch(res, ns, request.query.get("resourceVersion"), loop)
    except ApiError as err:
        if err.code != 410:
            raise
        watcher, expired = None, {"type": "ERROR", "object": err.status()}
    resp = web.StreamResponse(headers={"Content-Type": "application/json", "Cache-Control": "no-cache"})
    resp.enable_chunked_encoding()
    await resp.prepare(request)
    deadline = loop.time() + max(0.0, min(timeout, WATCH_DEFAULT_TIMEOUT))
    shown: set[str] = set()  # uids this watcher has been shown as matching its selectors
    since = request.query.get("resourceVersion")
    if watcher is not None and since and since != "0":
        # The client listed up to `since` and knows what matched then: a later DELETED, or a change that takes an
        # object out of the selection, must reach it (a real server checks the object's previous state).
        shown = {o["metadata"]["uid"] for o in store.list(res, ns)[0] if match_l(o) and match_f(o)}
    try:
        if expired is not None:
            await resp.write((dumps(expired) + "\n").encode())
        while watcher is not None:
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            wait = min(remaining, settings.bookmark_every) if bookmarks else remaining
            try:
                event = await asyncio.wait_for(watcher.queue.get(), wait)
            except asyncio.TimeoutError:
                if bookmarks and deadline - loop.time() > 0:
                    await resp.write((dumps(bookmark_event(res, store.current_rv())) + "\n").encode())
                continue
            if event is None:
                break
            if event["type"] == "ERROR":
                await resp.write((dumps(event) + "\n").encode())
                break
            event = filter_event(event, match_l(event["object"]) and match_f(event["object"]), shown)
            if event is not None:
                await resp.write((dumps(event) + "\n").encode())
    except (ConnectionError, RuntimeError):
        pass  # the client went away
    finally:
        if watcher is not None:
            store.unwatch(watcher)
    try:
        await resp.write_eof()
    except (ConnectionError, RuntimeError):
        pass
    return resp
