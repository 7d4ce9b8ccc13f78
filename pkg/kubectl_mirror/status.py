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
from .target import list_pods, mesh_of, select_pods

# Names the interface of each tcpdump process of this tap, one line each. Every tap of a pod shares the target
# container's PID namespace, so each sees the others' tcpdumps; what tells a container's own processes apart is
# their cgroup (each container has its own; /proc/PID/cgroup is readable by anyone, unlike its namespaces once
# tcpdump has dropped root). A constant script: nothing the user typed reaches the shell.
_LIST_TCPDUMP = (
    'me=$(cat /proc/self/cgroup); '
    'for p in /proc/[0-9]*; do '
    'c=$(tr "\\0" " " <"$p/cmdline" 2>/dev/null); '
    'case "$c" in "tcpdump "*) ;; *) continue ;; esac; '
    '[ "$(cat "$p/cgroup" 2>/dev/null)" = "$me" ] || continue; '
    'i=${c#* -i }; [ "$i" = "$c" ] && i=any; '
    'echo "tcpdump ${i%% *}"; '
    'done; echo end'
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
    mesh: str = ""  # the service mesh the pod is in ("Istio sidecar"), "" for none
    interface: str = ""  # where the running captures listen (",": several), "" when none runs or it is unknown
    # False for a tap of an earlier version (NET_RAW only): a tcpdump that drops root cannot run in it, and a
    # run that met such a tcpdump there added a new tap, used from then on.
    can_switch_user: bool = True


def capture_interfaces(conn: Connection, namespace: str, pod: str, tap: str) -> list[str] | None:
    """The interface of each tcpdump running in the tap's pod; None when the tap could not be asked."""
    try:
        with open_exec(conn, namespace, pod, tap, ["sh", "-c", _LIST_TCPDUMP], connect_timeout=10.0) as proc:
            out = proc.stdout.read()
            proc.wait(10.0)
    except (MirrorError, OSError, TimeoutError):
        return None
    lines = out.decode(errors="replace").split("\n")
    if "end" not in lines:  # cut short: an answer without its end says nothing reliable
        return None
    return [line.split(" ", 1)[1] for line in lines if line.startswith("tcpdump ")]


def count_captures(conn: Connection, namespace: str, pod: str, tap: str) -> int | None:
    found = capture_interfaces(conn, namespace, pod, tap)
    return None if found is None else len(found)


def tap_rows(conn: Connection, ref: str | None, selector: str | None) -> list[TapRow]:
    namespace = conn.namespace
    pods = select_pods(conn, ref or "", selector).pods if ref or selector else list_pods(conn, namespace, "")
    rows: list[TapRow] = []
    for pod in pods:
        if not any(str(c.get("name", "")).startswith(DEFAULT_NAME) for c in pod.spec.ephemeral_containers):
            continue
        infos: list[TapInfo] = find_taps(conn, namespace, pod.metadata.name)
        mesh = mesh_of(pod)
        for info in infos:
            found = capture_interfaces(conn, namespace, pod.metadata.name, info.name) if info.state == "running" else []
            capturing = None if found is None else len(found)
            rows.append(TapRow(namespace, pod.metadata.name, info.name, info.image, info.state, info.detail,
                               capturing, info.fallback, mesh.label() if mesh is not None else "",
                               ",".join(dict.fromkeys(found or [])), info.can_switch_user))
    return rows


def render_rows(rows: list[TapRow]) -> str:
    """A kubectl-style table: upper-case headers, columns padded to the widest cell."""
    header = ("NAMESPACE", "POD", "TAP", "IMAGE", "STATE", "MESH", "CAPTURING")
    cells = [header] + [
        (r.namespace, r.pod, r.tap, r.image, r.state + (f" ({r.detail})" if r.detail else "")
         + ("" if r.can_switch_user else ", NET_RAW only (earlier version)"), r.mesh or "-",
         "unknown" if r.capturing is None else ("yes" if r.capturing else "no") + (
             f" ({r.capturing} tcpdump)" if r.capturing and r.capturing > 1 else "") + (
             f" on {r.interface}" if r.capturing and r.interface else ""))
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
