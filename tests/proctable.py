"""A process tree read from /proc (Linux): who descends from whom, CPU time, memory peaks.

Shared by the CLI-run wrapper (tshark children, peak memory), the bench and the soak samplers.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Proc:
    ppid: int
    comm: str
    state: str  # "Z": a zombie, which holds no memory any more
    cpu_ticks: int  # utime + stime, in clock ticks


def proc_table() -> dict[int, Proc]:
    """Every process on the machine, by pid (ones that exit while it is read are left out)."""
    table: dict[int, Proc] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # comm may hold spaces and parentheses: the fields after it start after the last ")".
        rest = stat[stat.rindex(")") + 2 :].split()
        table[int(entry)] = Proc(int(rest[1]), stat[stat.index("(") + 1 : stat.rindex(")")], rest[0],
                                 int(rest[11]) + int(rest[12]))
    return table


def tree(root: int, table: dict[int, Proc], limit: int = 10_000) -> list[int]:
    """`root` first, then every descendant (below zombies too), at most `limit` pids."""
    kids: dict[int, list[int]] = {}
    for pid, proc in table.items():
        kids.setdefault(proc.ppid, []).append(pid)
    todo = [root]
    out: list[int] = []
    while todo and len(out) < limit:
        pid = todo.pop()
        out.append(pid)
        todo.extend(kids.get(pid, []))
    return out


def memory(pid: int) -> tuple[str, int, int] | None:
    """(name, VmHWM bytes, VmRSS bytes); None once the process is gone or a zombie."""
    try:
        with open(f"/proc/{pid}/status") as f:
            text = f.read()
    except OSError:
        return None
    vals = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    if "VmHWM" not in vals:
        return None
    return (vals["Name"].strip(), int(vals["VmHWM"].split()[0]) * 1024,
            int(vals.get("VmRSS", "0 kB").split()[0]) * 1024)


def is_dissecting_tshark(pid: int) -> bool:
    """A tshark reading records on its stdin: the plugin's dissector, not its `tshark -v` version check."""
    with contextlib.suppress(OSError), open(f"/proc/{pid}/cmdline", "rb") as f:
        return b"\0-r\0-\0" in f.read()
    return False
