"""Server-side printing: kubectl get asks for meta.k8s.io Table and prints the cells it gets."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

Obj = dict[str, Any]


def wants_table(accept: str) -> bool:
    return "as=Table" in accept


def _age(ts: str) -> str:
    try:
        then = datetime.strptime(ts, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
    except ValueError:
        return "<unknown>"
    secs = max(0, int((datetime.now(timezone.utc) - then).total_seconds()))
    if secs < 120:
        return f"{secs}s"
    if secs < 3600:
        return f"{secs // 60}m"
    return f"{secs // 3600}h"


def _col(name: str, typ: str, priority: int = 0, fmt: str = "") -> Obj:
    return {"name": name, "type": typ, "format": fmt, "description": name, "priority": priority}


def _pod_cells(pod: Obj) -> list[Any]:
    statuses = pod.get("status", {}).get("containerStatuses", [])
    ready = sum(1 for s in statuses if s.get("ready"))
    reason = pod.get("status", {}).get("phase", "Unknown")
    for s in statuses:
        waiting = s.get("state", {}).get("waiting")
        if waiting and waiting.get("reason"):
            reason = waiting["reason"]
    restarts = sum(int(s.get("restartCount", 0)) for s in statuses)
    return [
        pod["metadata"]["name"],
        f"{ready}/{len(pod['spec']['containers'])}",
        reason,
        restarts,
        _age(pod["metadata"].get("creationTimestamp", "")),
        pod.get("status", {}).get("podIP", "<none>"),
        pod["spec"].get("nodeName", "<none>"),
        "<none>",
        "<none>",
    ]


def to_table(kind: str, items: list[Obj], resource_version: str, include_object: str) -> Obj:
    if kind == "Pod":
        columns = [_col("Name", "string", fmt="name"), _col("Ready", "string"), _col("Status", "string"),
                   _col("Restarts", "string"), _col("Age", "string"), _col("IP", "string", 1),
                   _col("Node", "string", 1), _col("Nominated Node", "string", 1), _col("Readiness Gates", "string", 1)]
        cells = [_pod_cells(o) for o in items]
    else:
        columns = [_col("Name", "string", fmt="name"), _col("Created At", "date")]
        cells = [[o["metadata"]["name"], o["metadata"].get("creationTimestamp", "")] for o in items]
    rows = []
    for obj, row_cells in zip(items, cells, strict=True):
        if include_object == "Object":
            embedded = obj
        elif include_object == "None":
            embedded = None
        else:
            embedded = {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": obj["metadata"]}
        row: Obj = {"cells": row_cells}
        if embedded is not None:
            row["object"] = embedded
        rows.append(row)
    return {"kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": {"resourceVersion": resource_version},
            "columnDefinitions": columns, "rows": rows}
