"""Switches and records shared by the FakeCluster facade (test thread) and the server (its own thread)."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from .securitycontext import CONTAINERD_DEFAULT_CAPS


@dataclass
class Settings:
    token: str
    user: str
    # (verb, resource, subresource) answered with an RBAC 403.
    forbidden: set[tuple[str, str, str]] = field(default_factory=set)
    # None: everything allowed; else only these (verb, resource, subresource) rules, "*" matching anything.
    rbac_allow: list[tuple[str, str, str]] | None = None
    no_ephemeral_containers: bool = False
    image_pull_failure_prefix: str | None = None
    tap_start_delay: float = 0.3
    exec_kill_on_disconnect: bool = False
    # The kubelet's --streaming-connection-idle-timeout (4h by default): None never cuts.
    exec_idle_timeout: float | None = None
    # The RBAC verb a WebSocket exec (an HTTP GET upgrade) needs on pods/exec: "create" since Kubernetes 1.31
    # (the AuthorizePodWebsocketUpgradeCreatePermission gate), "get" on older API servers.
    exec_upgrade_verb: str = "create"
    # Directories put in front of PATH for exec'd commands: lets a test stand in its own binaries (a generator
    # named tcpdump) without touching the host's.
    exec_path_prepend: list[str] = field(default_factory=list)
    # The capabilities a container gets when it neither adds nor drops any (containerd's; CRIO_DEFAULT_CAPS
    # stands in a runtime that no longer grants NET_RAW).
    runtime_default_caps: tuple[str, ...] = CONTAINERD_DEFAULT_CAPS
    # (namespace, pod) -> network namespace name, or None for a pod whose runtime is unreachable.
    netns: dict[tuple[str, str], str | None] = field(default_factory=dict)
    requests: list[tuple[str, str]] = field(default_factory=list)
    request_urls: list[tuple[str, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def allowed(self, verb: str, resource: str, subresource: str) -> bool:
        if (verb, resource, subresource) in self.forbidden:
            return False
        if self.rbac_allow is None:
            return True
        return any(
            v in ("*", verb) and r in ("*", resource) and s in ("*", subresource) for v, r, s in self.rbac_allow
        )

    def record(self, method: str, path: str, path_qs: str) -> None:
        with self.lock:
            self.requests.append((method, path))
            self.request_urls.append((method, path_qs))
