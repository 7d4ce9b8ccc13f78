"""Label and field selectors as the API server parses them (the subset clients use)."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from .status import bad_request

Obj = dict[str, Any]
Predicate = Callable[[Obj], bool]

_SET_RE = re.compile(r"^\s*([A-Za-z0-9_./-]+)\s+(in|notin)\s+\(([^)]*)\)\s*$")


def _split_top_level(text: str) -> list[str]:
    # Commas inside "in (a,b)" belong to the requirement, not the list of requirements.
    parts: list[str] = []
    cur: list[str] = []
    depth = 0
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return [p.strip() for p in parts if p.strip()]


def _label_requirement(req: str) -> Predicate:
    m = _SET_RE.match(req)
    if m:
        key, op, values = m.group(1), m.group(2), {v.strip() for v in m.group(3).split(",") if v.strip()}
        if op == "in":
            return lambda labels: labels.get(key) in values
        return lambda labels: labels.get(key) not in values
    for op in ("!=", "==", "="):
        if op in req:
            key, _, value = (s.strip() for s in req.partition(op))
            if not key:
                break
            if op == "!=":
                return lambda labels: labels.get(key) != value
            return lambda labels: labels.get(key) == value
    if req.startswith("!") and _is_key(req[1:].strip()):
        key = req[1:].strip()
        return lambda labels: key not in labels
    if _is_key(req):
        return lambda labels: req in labels
    raise bad_request(f"unable to parse requirement: found '{req}', expected: in, notin, =, ==, !=, gt, lt")


def _is_key(text: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z0-9_./-]+", text))


def label_selector(text: str | None) -> Predicate:
    """Predicate over a whole object, matching metadata.labels."""
    if not text:
        return lambda obj: True
    reqs = [_label_requirement(r) for r in _split_top_level(text)]

    def match(obj: Obj) -> bool:
        labels = obj.get("metadata", {}).get("labels") or {}
        return all(r(labels) for r in reqs)

    return match


def _field_value(obj: Obj, path: str) -> str:
    cur: Any = obj
    for part in path.split("."):
        if not isinstance(cur, dict):
            return ""
        cur = cur.get(part)
    return "" if cur is None else str(cur)


# Field selectors are per-kind on a real server; these are the ones the pods/workloads storage supports.
_FIELD_LABELS = {
    "metadata.name", "metadata.namespace", "status.phase", "spec.nodeName", "status.podIP", "spec.restartPolicy",
}


def field_selector(text: str | None, kind: str) -> Predicate:
    if not text:
        return lambda obj: True
    preds: list[Predicate] = []
    for req in _split_top_level(text):
        for op in ("!=", "==", "="):
            if op in req:
                key, _, value = (s.strip() for s in req.partition(op))
                break
        else:
            raise bad_request(f"invalid selector: '{text}'; can't understand '{req}'")
        allowed = _FIELD_LABELS if kind == "Pod" else {"metadata.name", "metadata.namespace"}
        if key not in allowed:
            raise bad_request(f"field label not supported: {key}")
        preds.append(_field_predicate(key, value, negate=op == "!="))
    return lambda obj: all(p(obj) for p in preds)


def _field_predicate(key: str, value: str, negate: bool) -> Predicate:
    return lambda obj: (_field_value(obj, key) == value) != negate
