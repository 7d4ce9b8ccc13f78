"""The pods a target stands for, kept current from a Kubernetes list + watch: sans-I/O.

Events in (a list's items, then watch events), changes out (a pod became Ready, stopped being Ready, is gone),
and which request the edge should make next. The protocol, as kube-apiserver speaks it: list, then watch from the
list's resourceVersion; every event (and every BOOKMARK, which carries nothing else) moves the resourceVersion on,
so a dropped watch resumes from the last one seen without missing or repeating anything; a resourceVersion the
server no longer has (`410 Expired`, at the watch's start or as an ERROR event in it) means relist, and the new
list is compared with what was known so nothing that happened in between is lost.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from .target import Pod

TEMPLATE_LABELS = ("pod-template-hash", "controller-revision-hash")


class ChangeKind(str, enum.Enum):
    READY = "ready"  # Ready now, and was not (or was not known)
    UNREADY = "unready"  # was Ready, still exists and runs, is not Ready now
    GONE = "gone"  # deleted, being deleted, or finished (Succeeded/Failed): it will not serve again


@dataclass(frozen=True, slots=True)
class Change:
    kind: ChangeKind
    pod: Pod
    why: str  # for messages: "deleted", "terminating", "evicted", "failed", "not ready", ...

    @property
    def name(self) -> str:
        return self.pod.metadata.name


@dataclass(frozen=True, slots=True)
class ListPods:
    """The edge should list the pods (first, and after a 410)."""


@dataclass(frozen=True, slots=True)
class WatchPods:
    """The edge should watch from this resourceVersion."""

    resource_version: str


Request = ListPods | WatchPods


class WatchFailed(Exception):
    """The server sent an ERROR event that is not 410 Expired (the watch cannot go on as it is)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


def is_gone(pod: Pod) -> bool:
    return pod.metadata.deletion_timestamp is not None or pod.status.phase in ("Succeeded", "Failed")


def gone_why(pod: Pod | None) -> str:
    """Why a pod left, in the words a user knows from kubectl get pods."""
    if pod is None:
        return "deleted"
    if pod.status.reason == "Evicted":
        return "evicted"
    if pod.metadata.deletion_timestamp is not None:
        return "terminating"
    if pod.status.phase in ("Succeeded", "Failed"):
        return pod.status.phase.lower()
    return "not ready"


def template_of(pod: Pod) -> str | None:
    """The pod template revision (a Deployment's pod-template-hash, a StatefulSet/DaemonSet's revision)."""
    labels = pod.metadata.labels
    return next((labels[k] for k in TEMPLATE_LABELS if k in labels), None)


class PodWatch:
    """What is known of the selected pods, and the resourceVersion to resume from."""

    def __init__(self) -> None:
        self.pods: dict[str, Pod] = {}
        self.resource_version = ""
        self._ready: set[str] = set()
        self.relists = 0  # lists after the first: each follows a 410
        self._listed = False

    def seed(self, pods: list[Pod]) -> None:
        """Pods known before the first list (the ones the run started on): a pod gone by the time of that list
        comes out of it as gone, not as never seen."""
        for pod in pods:
            self.pods[pod.metadata.name] = pod
            if pod.ready:
                self._ready.add(pod.metadata.name)

    def next_request(self) -> Request:
        return WatchPods(self.resource_version) if self.resource_version else ListPods()

    @property
    def ready(self) -> list[Pod]:
        """Ready pods, by name (the order a user reads them in kubectl get pods)."""
        return [self.pods[name] for name in sorted(self._ready)]

    def listed(self, items: list[dict[str, Any]], resource_version: str) -> list[Change]:
        """A list's answer: the whole selection as of `resource_version`."""
        if self.resource_version or self.relists or self._listed:
            self.relists += 1
        self._listed = True
        seen: dict[str, Pod] = {}
        for item in items:
            pod = _pod(item)
            if pod is not None:
                seen[pod.metadata.name] = pod
        changes: list[Change] = []
        for name in sorted(set(self.pods) - set(seen)):
            changes += self._remove(name, None)
        for name in sorted(seen):
            changes += self._upsert(seen[name])
        self.resource_version = resource_version
        return changes

    def event(self, event: dict[str, Any]) -> list[Change]:
        """One watch event (a decoded line of the stream)."""
        kind = event.get("type")
        obj = event.get("object") or {}
        if kind == "ERROR":
            code = int(obj.get("code") or 0)
            if code == 410:
                self.resource_version = ""  # relist: what happened since is no longer in the server's history
                return []
            raise WatchFailed(code, str(obj.get("message") or f"watch error {code}"))
        rv = str((obj.get("metadata") or {}).get("resourceVersion") or "")
        if kind == "BOOKMARK":
            if rv:
                self.resource_version = rv
            return []
        pod = _pod(obj)
        if pod is None or kind not in ("ADDED", "MODIFIED", "DELETED"):
            return []
        changes = self._remove(pod.metadata.name, pod) if kind == "DELETED" else self._upsert(pod)
        if rv:
            self.resource_version = rv
        return changes

    def expired(self) -> None:
        """The watch's start was refused with 410 (servers without a watch cache say it that way)."""
        self.resource_version = ""

    def _upsert(self, pod: Pod) -> list[Change]:
        name = pod.metadata.name
        old = self.pods.get(name)
        if old is not None and old.metadata.uid and pod.metadata.uid and old.metadata.uid != pod.metadata.uid:
            # Same name, new pod (a StatefulSet's replacement): the old one is gone first.
            changes = self._remove(name, None)
            return changes + self._upsert(pod)
        self.pods[name] = pod
        was = name in self._ready
        if is_gone(pod):
            self._ready.discard(name)
            # Said once: later events of a Terminating pod change nothing for us.
            if old is not None and is_gone(old):
                return []
            return [Change(ChangeKind.GONE, pod, gone_why(pod))]
        if pod.ready and not was:
            self._ready.add(name)
            return [Change(ChangeKind.READY, pod, "ready")]
        if was and not pod.ready:
            self._ready.discard(name)
            return [Change(ChangeKind.UNREADY, pod, "not ready")]
        return []

    def _remove(self, name: str, last: Pod | None) -> list[Change]:
        old = self.pods.pop(name, None)
        self._ready.discard(name)
        pod = last or old
        if pod is None or (old is not None and is_gone(old)):
            return []  # never known, or its going was already said
        why = gone_why(last) if last is not None and last.status.reason == "Evicted" else "deleted"
        return [Change(ChangeKind.GONE, pod, why)]


def _pod(obj: dict[str, Any]) -> Pod | None:
    try:
        return Pod.model_validate(obj)
    except ValidationError:
        return None
