"""How a production response and the local one differ: status, chosen headers, and bodies, JSON-aware.

JSON bodies are compared value by value, leaving out what `--ignore-json-path` names (jsonpath); other bodies
byte for byte, with a preview.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass

from .httpresponse import ResponseRecord
from .jsonpath import JsonKey, JsonPath, format_path

# ---- comparing a production response with the local one -------------------------------------------------

MAX_DIFFERENCES = 50  # items listed per response pair; a rewrite that breaks everything needs no 10,000 lines
_PREVIEW = 200  # characters of a non-JSON body shown in a difference


class Absent(enum.Enum):
    """A side of a difference that has no value at all (a JSON key or a header that is not there)."""

    ABSENT = "absent"


@dataclass(frozen=True, slots=True)
class DiffItem:
    field: str  # "status", "header:<name>", "body", or "body:<JSON path>" such as "body:$.items[0].id"
    prod: object  # a JSON value, or Absent.ABSENT
    local: object


@dataclass(frozen=True, slots=True)
class Difference:
    flow: int
    index: int
    items: list[DiffItem]
    truncated: bool = False  # more than MAX_DIFFERENCES items differed; only the first are listed

    def to_json(self) -> dict[str, object]:
        """One `--compare-report` line (json.dumps it). An absent side is left out of its item."""
        items: list[dict[str, object]] = []
        for item in self.items:
            entry: dict[str, object] = {"field": item.field}
            if item.prod is not Absent.ABSENT:
                entry["prod"] = item.prod
            if item.local is not Absent.ABSENT:
                entry["local"] = item.local
            items.append(entry)
        return {"flow": self.flow, "index": self.index, "differences": items, "truncated": self.truncated}


def compare(
    prod: ResponseRecord, local: ResponseRecord, *, headers: list[str], ignore_json_paths: list[str]
) -> Difference | None:
    """How `local` differs from `prod`: status, the named headers (case-insensitive), then the body.

    Bodies that both parse as JSON are compared structurally, skipping `ignore_json_paths` (syntax in
    `JsonPath`); any other bodies must be byte-equal. A body cut at max_body is compared as far as it was kept,
    plus its full size. None when nothing differs.
    """
    items: list[DiffItem] = []
    if prod.status != local.status:
        items.append(DiffItem("status", prod.status, local.status))
    for name in headers:
        p, loc = _header(prod.headers, name), _header(local.headers, name)
        if p != loc:
            items.append(DiffItem(f"header:{name.lower()}", p, loc))
    items += _diff_bodies(prod, local, [JsonPath(p) for p in ignore_json_paths])
    if not items:
        return None
    return Difference(prod.flow, prod.index, items[:MAX_DIFFERENCES], len(items) > MAX_DIFFERENCES)


def _header(headers: list[tuple[str, str]], name: str) -> object:
    lower = name.lower()
    values = [v for n, v in headers if n.lower() == lower]
    # Repeated headers compare as their comma-joined list, which is what they mean (RFC 9110 5.3).
    return ", ".join(values) if values else Absent.ABSENT


def _diff_bodies(prod: ResponseRecord, local: ResponseRecord, ignore: list[JsonPath]) -> list[DiffItem]:
    if not prod.truncated and not local.truncated:
        p_json, l_json = _json(prod.body), _json(local.body)
        if p_json is not Absent.ABSENT and l_json is not Absent.ABSENT:
            items: list[DiffItem] = []
            diff_json(p_json, l_json, (), ignore, items)
            return items
    if prod.body == local.body and prod.body_size == local.body_size:
        return []
    return [DiffItem("body", _preview(prod), _preview(local))]


def _json(body: bytes) -> object:
    # Parsing decides, not Content-Type: a JSON API that labels itself text/plain is still compared as JSON,
    # and a body labelled JSON that does not parse is compared byte for byte.
    if not body.strip():
        return Absent.ABSENT
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        return Absent.ABSENT


def _preview(record: ResponseRecord) -> str:
    text = record.body[: _PREVIEW * 4].decode("utf-8", "replace")
    if len(text) > _PREVIEW or record.body_size > len(text.encode()):
        return f"{text[:_PREVIEW]}... ({record.body_size} bytes)"
    return text




def diff_json(p: object, loc: object, path: tuple[JsonKey, ...], ignore: list[JsonPath], out: list[DiffItem]) -> None:
    if len(out) > MAX_DIFFERENCES or any(i.matches(path) for i in ignore):
        return
    if isinstance(p, dict) and isinstance(loc, dict):
        for key in list(p) + [k for k in loc if k not in p]:
            diff_json(p.get(key, Absent.ABSENT), loc.get(key, Absent.ABSENT), (*path, key), ignore, out)
    elif isinstance(p, list) and isinstance(loc, list):
        for i in range(max(len(p), len(loc))):
            a = p[i] if i < len(p) else Absent.ABSENT
            b = loc[i] if i < len(loc) else Absent.ABSENT
            diff_json(a, b, (*path, i), ignore, out)
    elif not _same(p, loc):
        out.append(DiffItem("body:" + format_path(path), p, loc))


def _same(p: object, loc: object) -> bool:
    # JSON true and 1 are different values, though Python finds them equal; 1 and 1.0 are the same number.
    if isinstance(p, bool) or isinstance(loc, bool):
        return type(p) is type(loc) and p == loc
    if isinstance(p, int | float) and isinstance(loc, int | float):
        return p == loc
    return type(p) is type(loc) and p == loc
