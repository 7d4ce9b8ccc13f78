"""One cgroup per container, so a process can tell which container another one belongs to, as on a node.

Ephemeral containers that target the same container share its PID (and network) namespace, so a tap sees the
tcpdumps started in every other tap of the pod. What tells them apart on a node is the cgroup: each container
has its own, and /proc/PID/cgroup is readable by anyone. The test server puts every exec'd process in a cgroup
of its container (in the cgroup v2 hierarchy, where moving a process needs no controller), when it can.
"""

from __future__ import annotations

import os
import secrets
import time
from pathlib import Path


def _unified_root() -> Path | None:
    for root in (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/unified")):
        if (root / "cgroup.procs").exists() and (root / "cgroup.controllers").exists():
            return root
    return None


class ContainerCgroups:
    def __init__(self) -> None:
        self._root = _unified_root()
        self._tag = secrets.token_hex(3)
        self._dirs: dict[tuple[str, str, str], Path] = {}

    def procs_file(self, namespace: str, pod: str, container: str) -> str | None:
        """The cgroup.procs a process of this container joins; None where cgroups cannot be made (not root)."""
        key = (namespace, pod, container)
        path = self._dirs.get(key)
        if path is None:
            if self._root is None:
                return None
            path = self._root / f"km-{self._tag}-{len(self._dirs)}"
            try:
                path.mkdir()
            except OSError:
                return None
            self._dirs[key] = path
        return str(path / "cgroup.procs")

    def remove(self, timeout: float = 2.0) -> None:
        """Remove them all, once their processes are gone (a killed process leaves its cgroup a moment later)."""
        deadline = time.monotonic() + timeout
        for path in self._dirs.values():
            while True:
                try:
                    os.rmdir(path)
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    if time.monotonic() >= deadline:
                        break
                    time.sleep(0.02)
        self._dirs.clear()
