"""The resource types the fake server serves, with what discovery and routing need to know about each."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Resource:
    name: str  # plural, as in URLs
    singular: str
    kind: str
    group: str
    version: str
    namespaced: bool
    short_names: tuple[str, ...] = ()
    subresources: tuple[str, ...] = ()

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def prefix(self) -> str:
        return f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"


RESOURCES: tuple[Resource, ...] = (
    Resource("namespaces", "namespace", "Namespace", "", "v1", False, ("ns",)),
    Resource("nodes", "node", "Node", "", "v1", False, ("no",)),
    Resource("pods", "pod", "Pod", "", "v1", True, ("po",), ("ephemeralcontainers", "exec", "status", "log")),
    Resource("services", "service", "Service", "", "v1", True, ("svc",)),
    Resource("deployments", "deployment", "Deployment", "apps", "v1", True, ("deploy",)),
    Resource("replicasets", "replicaset", "ReplicaSet", "apps", "v1", True, ("rs",)),
    Resource("statefulsets", "statefulset", "StatefulSet", "apps", "v1", True, ("sts",)),
    Resource("daemonsets", "daemonset", "DaemonSet", "apps", "v1", True, ("ds",)),
    Resource("jobs", "job", "Job", "batch", "v1", True, ()),
)

BY_PATH: dict[tuple[str, str, str], Resource] = {(r.group, r.version, r.name): r for r in RESOURCES}
BY_KIND: dict[str, Resource] = {r.kind: r for r in RESOURCES}
GROUP_VERSIONS: tuple[tuple[str, str], ...] = (("apps", "v1"), ("batch", "v1"))
