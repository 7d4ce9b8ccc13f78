"""A small JSONPath subset: which JSON values a comparison leaves out (--ignore-json-path)."""

from __future__ import annotations

import enum
import json
import re

from .errors import UsageError

JsonKey = str | int


def format_path(path: tuple[JsonKey, ...]) -> str:
    parts = ["$"]
    for key in path:
        if isinstance(key, int):
            parts.append(f"[{key}]")
        elif _NAME.fullmatch(key):
            parts.append(f".{key}")
        else:
            parts.append(f"[{json.dumps(key)}]")
    return "".join(parts)



_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")


class _Seg(enum.Enum):
    KEY = "key"  # one named member
    INDEX = "index"  # one array element
    ANY = "any"  # `*`: any one member or element
    DEEP = "deep"  # `..`: zero or more levels, then the next step


class JsonPath:
    """A small JSONPath subset naming JSON values to leave out of a comparison (with everything below them).

    Syntax: an optional `$`, then steps: `.name` or `["name"]` (a member; the first `.` may be left out:
    `data.meta.requestId` is `$.data.meta.requestId`), `[3]` (an array element), `.*` or `[*]` (any member or
    element), and `..` (any depth: `$..id` is every `id` anywhere). Names may hold any character but `.`, `[`
    and `]`; quote them in brackets otherwise.
    """

    def __init__(self, text: str) -> None:
        self.text = text
        self._steps = _parse_path(text)

    def matches(self, path: tuple[JsonKey, ...]) -> bool:
        """Whether the value at `path` (member names and element indexes from the root) is named."""
        return _match(self._steps, 0, path, 0)

    def __repr__(self) -> str:
        return f"JsonPath({self.text!r})"


_Step = tuple[_Seg, JsonKey]


def _parse_path(text: str) -> list[_Step]:
    bad = UsageError(f"invalid JSON path {text!r}: expected e.g. $.timestamp, $.items[*].id, data.meta.requestId")
    s = text.strip()
    if s.startswith("$"):
        s = s[1:]
    elif s and s[0] not in ".[":
        s = "." + s
    steps: list[_Step] = []
    i = 0
    while i < len(s):
        if s.startswith("..", i):
            steps.append((_Seg.DEEP, ""))
            i += 2
            if i < len(s) and s[i] == "[":
                continue
            i, name = _read_name(s, i)
            if not name:
                raise bad
            steps.append((_Seg.ANY, "") if name == "*" else (_Seg.KEY, name))
        elif s[i] == ".":
            i, name = _read_name(s, i + 1)
            if not name:
                raise bad
            steps.append((_Seg.ANY, "") if name == "*" else (_Seg.KEY, name))
        elif s[i] == "[":
            end = s.find("]", i)
            if end < 0:
                raise bad
            inner = s[i + 1 : end].strip()
            if inner == "*":
                steps.append((_Seg.ANY, ""))
            elif inner.isdigit():
                steps.append((_Seg.INDEX, int(inner)))
            elif len(inner) >= 2 and inner[0] == inner[-1] and inner[0] in "'\"":
                steps.append((_Seg.KEY, inner[1:-1]))
            else:
                raise bad
            i = end + 1
        else:
            raise bad
    if not steps or steps[-1][0] is _Seg.DEEP:
        raise bad
    return steps


def _read_name(s: str, i: int) -> tuple[int, str]:
    j = i
    while j < len(s) and s[j] not in ".[]":
        j += 1
    return j, s[i:j]


def _match(steps: list[_Step], i: int, path: tuple[JsonKey, ...], j: int) -> bool:
    if i == len(steps):
        return j == len(path)
    seg, key = steps[i]
    if seg is _Seg.DEEP:
        return any(_match(steps, i + 1, path, k) for k in range(j, len(path)))
    if j == len(path):
        return False
    here = path[j]
    if seg is _Seg.KEY:
        ok = isinstance(here, str) and here == key
    elif seg is _Seg.INDEX:
        ok = isinstance(here, int) and here == key
    else:
        ok = True
    return ok and _match(steps, i + 1, path, j + 1)
