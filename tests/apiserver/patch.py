"""The three PATCH flavours the API server accepts for built-in types.

Strategic merge patch only knows the merge keys of the fields that matter for pods; lists without a
known key are replaced, which is also what the real server does for atomic lists.
"""

from __future__ import annotations

import copy
from typing import Any

from .status import ApiError, bad_request

Obj = dict[str, Any]

# Field name -> patchMergeKey from the core/v1 Go struct tags.
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "ephemeralContainers": "name",
    "ports": "containerPort",
    "env": "name",
    "volumeMounts": "mountPath",
    "volumes": "name",
    "conditions": "type",
    "ownerReferences": "uid",
    "imagePullSecrets": "name",
}

JSON_PATCH = "application/json-patch+json"
MERGE_PATCH = "application/merge-patch+json"
STRATEGIC = "application/strategic-merge-patch+json"
APPLY = "application/apply-patch+yaml"


def apply_patch(content_type: str, target: Obj, patch: Any) -> Obj:
    ctype = content_type.split(";")[0].strip()
    if ctype == JSON_PATCH:
        if not isinstance(patch, list):
            raise bad_request("json: cannot unmarshal object into Go value of type jsonpatch.Patch")
        return json_patch(target, patch)
    if not isinstance(patch, dict):
        raise bad_request("json: cannot unmarshal array into Go value of type map[string]interface {}")
    if ctype == MERGE_PATCH:
        merged: Obj = merge_patch(target, patch)
        return merged
    if ctype == STRATEGIC:
        strategic: Obj = strategic_merge(target, patch)
        return strategic
    raise ApiError(415, "UnsupportedMediaType", f"the body of the request was in an unknown format - accepted media "
                   f"types include: {JSON_PATCH}, {MERGE_PATCH}, {STRATEGIC}, {APPLY}")


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


def strategic_merge(target: Any, patch: Any, field: str = "") -> Any:
    if isinstance(patch, list) and isinstance(target, list) and field in MERGE_KEYS:
        return _merge_list(target, patch, MERGE_KEYS[field])
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    if patch.get("$patch") == "replace":
        return {k: v for k, v in copy.deepcopy(patch).items() if k != "$patch"}
    out = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if key.startswith("$"):
            continue  # directives ($setElementOrder, $retainKeys) only affect ordering and pruning
        if value is None:
            out.pop(key, None)
        else:
            out[key] = strategic_merge(out.get(key), value, key)
    return out


def _merge_list(target: list[Any], patch: list[Any], key: str) -> list[Any]:
    out = copy.deepcopy(target)
    for item in patch:
        if not isinstance(item, dict) or key not in item:
            raise bad_request(f"map: {item} does not contain declared merge key: {key}")
        idx = next((i for i, cur in enumerate(out) if isinstance(cur, dict) and cur.get(key) == item[key]), None)
        if item.get("$patch") == "delete":
            if idx is not None:
                out.pop(idx)
        elif idx is None:
            out.append({k: v for k, v in item.items() if not k.startswith("$")})
        else:
            out[idx] = strategic_merge(out[idx], item)
    return out


def _pointer(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise bad_request(f'the server rejected our request due to an error in our request: invalid path "{path}"')
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _resolve(doc: Any, parts: list[str], path: str) -> Any:
    cur = doc
    for p in parts:
        if isinstance(cur, dict) and p in cur:
            cur = cur[p]
        elif isinstance(cur, list) and p.isdigit() and int(p) < len(cur):
            cur = cur[int(p)]
        else:
            raise ApiError(422, "Invalid", f"doc is missing path: \"{path}\": missing value")
    return cur


def json_patch(target: Obj, ops: list[Any]) -> Obj:
    """RFC 6902."""
    doc: Any = copy.deepcopy(target)
    for op in ops:
        if not isinstance(op, dict) or "op" not in op or "path" not in op:
            raise bad_request("invalid JSON patch operation")
        kind, path = op["op"], op["path"]
        parts = _pointer(path)
        if kind == "test":
            if _resolve(doc, parts, path) != op.get("value"):
                raise ApiError(422, "Invalid", f"testing value {path} failed: test failed")
            continue
        if kind in ("move", "copy"):
            src = _pointer(op["from"])
            value = copy.deepcopy(_resolve(doc, src, op["from"]))
            if kind == "move":
                doc = _remove(doc, src, op["from"])
            doc = _add(doc, parts, value, path)
        elif kind == "add":
            doc = _add(doc, parts, copy.deepcopy(op.get("value")), path)
        elif kind == "remove":
            doc = _remove(doc, parts, path)
        elif kind == "replace":
            _resolve(doc, parts, path)
            doc = _add(_remove(doc, parts, path), parts, copy.deepcopy(op.get("value")), path)
        else:
            raise bad_request(f"Unexpected kind: {kind}")
    return doc  # type: ignore[no-any-return]


def _add(doc: Any, parts: list[str], value: Any, path: str) -> Any:
    if not parts:
        return value
    parent = _resolve(doc, parts[:-1], path)
    last = parts[-1]
    if isinstance(parent, dict):
        parent[last] = value
    elif isinstance(parent, list):
        if last == "-":
            parent.append(value)
        elif last.isdigit() and int(last) <= len(parent):
            parent.insert(int(last), value)
        else:
            raise ApiError(422, "Invalid", f"add operation does not apply: doc is missing path: \"{path}\"")
    else:
        raise ApiError(422, "Invalid", f"add operation does not apply: doc is missing path: \"{path}\"")
    return doc


def _remove(doc: Any, parts: list[str], path: str) -> Any:
    if not parts:
        return None
    parent = _resolve(doc, parts[:-1], path)
    last = parts[-1]
    if isinstance(parent, dict) and last in parent:
        del parent[last]
    elif isinstance(parent, list) and last.isdigit() and int(last) < len(parent):
        parent.pop(int(last))
    else:
        raise ApiError(422, "Invalid", f"remove operation does not apply: doc is missing path: \"{path}\"")
    return doc
