"""A container restart as a node does it, and what it does to the ephemeral containers that target it.

An ephemeral container with targetContainerName joins that container's PID namespace. When the container's
process exits, the kernel kills every process left in its PID namespace: the ephemeral container's own process
among them, so it terminates (137) and, like every ephemeral container, is never restarted. The container itself
is restarted: restartCount goes up, lastState holds how it ended.
"""

from __future__ import annotations

from typing import Any

from .processes import ProcessTable
from .resources import BY_KIND
from .store import Store, now_rfc3339

Obj = dict[str, Any]
PODS = BY_KIND["Pod"]
KILLED = {"exitCode": 137, "reason": "Error"}


def restart_container(store: Store, processes: ProcessTable, ns: str, pod: str, container: str) -> None:
    with store.lock:
        obj = store.get(PODS, ns, pod)
        tapping = {ec["name"] for ec in obj["spec"].get("ephemeralContainers") or []
                   if ec.get("targetContainerName") == container}
        processes.kill_containers((ns, pod), {container, *tapping})
        now = now_rfc3339()
        for cs in obj["status"].get("containerStatuses") or []:
            if cs["name"] == container:
                started = (cs.get("state") or {}).get("running", {}).get("startedAt", now)
                cs["lastState"] = {"terminated": {**KILLED, "startedAt": started, "finishedAt": now}}
                cs["restartCount"] = int(cs.get("restartCount") or 0) + 1
                cs["state"] = {"running": {"startedAt": now}}
        for es in obj["status"].get("ephemeralContainerStatuses") or []:
            if es["name"] in tapping and "running" in es.get("state", {}):
                es["state"] = {"terminated": {**KILLED, "startedAt": es["state"]["running"].get("startedAt", now),
                                              "finishedAt": now}}
        store.update(PODS, obj)
