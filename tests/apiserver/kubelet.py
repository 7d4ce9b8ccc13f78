"""A simulated kubelet for ephemeral containers: status moves from absent to waiting to running (or to an
image-pull failure), each step a MODIFIED event, like a real node reporting back after a sync."""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any

from .probes import Prober
from .resources import BY_KIND
from .settings import Settings
from .status import ApiError
from .store import Store, now_rfc3339

Obj = dict[str, Any]
PODS = BY_KIND["Pod"]
BACKOFF_AFTER = 0.2  # seconds between ErrImagePull and ImagePullBackOff


class Kubelet:
    def __init__(self, store: Store, settings: Settings) -> None:
        self._store = store
        self._settings = settings
        self._tasks: set[asyncio.Task[None]] = set()
        self.prober = Prober()

    def started(self, ns: str, pod: str, names: list[str]) -> None:
        """Called on the server loop after new ephemeral containers were stored."""
        for name in names:
            task = asyncio.get_running_loop().create_task(self._run(ns, pod, name))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run(self, ns: str, pod: str, name: str) -> None:
        await asyncio.sleep(0)  # the PATCH response goes out before the kubelet has reported anything
        self._set(ns, pod, name, {"waiting": {"reason": "ContainerCreating"}}, running=False)
        spec = self._spec(ns, pod, name)
        if spec is None:
            return
        prefix = self._settings.image_pull_failure_prefix
        await asyncio.sleep(max(0.0, self._settings.tap_start_delay))
        image = spec.get("image", "")
        if prefix is not None and image.startswith(prefix):
            msg = (f'failed to pull and unpack image "{image}": failed to resolve reference "{image}": '
                   f"{image}: not found")
            self._set(ns, pod, name, {"waiting": {"reason": "ErrImagePull", "message": f"rpc error: code = NotFound "
                                                  f"desc = {msg}"}}, running=False)
            await asyncio.sleep(BACKOFF_AFTER)
            self._set(ns, pod, name, {"waiting": {"reason": "ImagePullBackOff",
                                                  "message": f'Back-off pulling image "{image}"'}}, running=False)
            return
        self._set(ns, pod, name, {"running": {"startedAt": now_rfc3339()}}, running=True)

    def _spec(self, ns: str, pod: str, name: str) -> Obj | None:
        try:
            obj = self._store.get(PODS, ns, pod)
        except ApiError:
            return None
        return next((c for c in obj["spec"].get("ephemeralContainers", []) if c.get("name") == name), None)

    def _set(self, ns: str, pod: str, name: str, state: Obj, running: bool) -> None:
        # Read-modify-write under the store lock so a concurrent PATCH cannot interleave.
        with self._store.lock:
            try:
                obj = self._store.get(PODS, ns, pod)
            except ApiError:
                return
            spec = next((c for c in obj["spec"].get("ephemeralContainers", []) if c.get("name") == name), None)
            if spec is None:
                return
            status: Obj = {"name": name, "image": spec.get("image", ""), "imageID": "", "ready": False,
                           "restartCount": 0, "state": state, "lastState": {}}
            if running:
                digest = hashlib.sha256(f"{ns}/{pod}/{name}".encode()).hexdigest()
                status["containerID"] = f"containerd://{digest}"
                status["imageID"] = f"{spec.get('image', '')}@sha256:{'0' * 64}"
            statuses = [s for s in obj["status"].get("ephemeralContainerStatuses", []) if s["name"] != name]
            obj["status"]["ephemeralContainerStatuses"] = [*statuses, status]
            self._store.update(PODS, obj)

    async def stop(self) -> None:
        await self.prober.stop()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
