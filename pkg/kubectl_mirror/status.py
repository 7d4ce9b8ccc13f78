"""`kubectl mirror status [TYPE/NAME]`: which pods carry a tap, with what image, and whether a capture runs now."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass

from .errors import MirrorError
from .execstream import open_exec
from .kubeconfig import Connection, connect
from .tap import DEFAULT_NAME, TapInfo, find_taps
from .target import list_pods, select_pods

# Counts tcpdump processes in the tap's network namespace (the pod's). The tap shares the target container's
# process namespace when the runtime allows it; a process whose namespace cannot be read still counts. A
# constant script: nothing the user typed reaches the shell.
_COUNT_TCPDUMP = (
    'me=$(readlink /proc/self/ns/net); n=0; '
    'for p in /proc/[0-9]*; do '
    'tr "\\0" " " <"$p/cmdline" 2>/dev/null | grep -q "^tcpdump " || continue; '
    'ns=$(readlink "$p/ns/net" 2>/dev/null); '
    '[ -z "$ns" ] || [ "$ns" = "$me" ] && n=$((n+1)); '
    'done; echo "$n"'
)


@dataclass(frozen=True, slots=True)
class TapRow:
    namespace: str
    pod: str
    tap: str
    image: str
    state: str
    detail: str
    capturing: int | None  # tcpdump processes running in the tap now; None when it could not be asked
    fallback: bool


def count_captures(conn: Connection, namespace: str, pod: str, tap: str) -> int | None:
    try:
        with open_exec(conn, namespace, pod, tap, ["sh", "-c", _COUNT_TCPDUMP], connect_timeout=10.0) as proc:
            out = proc.stdout.read()
            proc.wait(10.0)
    except (MirrorError, OSError, TimeoutError):
        return None
    text = out.decode(errors="replace").strip()
    return int(text) if text.isdigit() else None


def tap_rows(conn: Connection, ref: str | None, selector: str | None) -> list[TapRow]:
    namespace = conn.namespace
    pods = select_pods(conn, ref or "", selector).pods if ref or selector else list_pods(conn, namespace, "")
    rows: list[TapRow] = []
    for pod in pods:
        if not any(str(c.get("name", "")).startswith(DEFAULT_NAME) for c in pod.spec.ephemeral_containers):
            continue
        infos: list[TapInfo] = find_taps(conn, namespace, pod.metadata.name)
        for info in infos:
            capturing = count_captures(conn, namespace, pod.metadata.name, info.name) if info.state == "running" else 0
            rows.append(TapRow(namespace, pod.metadata.name, info.name, info.image, info.state, info.detail,
                               capturing, info.fallback))
    return rows


def render_rows(rows: list[TapRow]) -> str:
    """A kubectl-style table: upper-case headers, columns padded to the widest cell."""
    header = ("NAMESPACE", "POD", "TAP", "IMAGE", "STATE", "CAPTURING")
    cells = [header] + [
        (r.namespace, r.pod, r.tap, r.image, r.state + (f" ({r.detail})" if r.detail else ""),
         "unknown" if r.capturing is None else ("yes" if r.capturing else "no") + (
             f" ({r.capturing} tcpdump)" if r.capturing and r.capturing > 1 else ""))
        for r in rows
    ]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return "\n".join("   ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
                     for row in cells) + "\n"


def run_status(args: argparse.Namespace) -> int:
    conn = connect(args)
    try:
        rows = tap_rows(conn, args.ref, args.selector)
    finally:
        conn.close()
    if args.output == "json":
        print(json.dumps([asdict(r) for r in rows], indent=2))
    elif rows:
        sys.stdout.write(render_rows(rows))
    else:
        print(f'No taps in namespace "{conn.namespace}".', file=sys.stderr)
    return 0
