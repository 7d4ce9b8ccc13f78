"""The live status line on stderr: one line redrawn in place on a terminal, plain periodic lines otherwise."""

from __future__ import annotations

import time
from typing import TextIO

from .summary import Summary

# On a terminal the line is redrawn every second; in a log file a line every 10 s is plenty.
TTY_EVERY = 1.0
PLAIN_EVERY = 10.0


def _mb(n: float) -> str:
    return f"{n / 1e6:,.1f} MB"


class StatusLine:
    """Callable given a Summary snapshot; keeps its own previous figures for the current rate."""

    def __init__(self, stream: TextIO, *, tty: bool | None = None) -> None:
        self.stream = stream
        self.tty = stream.isatty() if tty is None else tty
        self.every = TTY_EVERY if self.tty else PLAIN_EVERY
        self._last_bytes = 0
        self._last_requests = 0
        self._request_rate: float | None = None  # HTTP mode: requests (HTTP/1.x and HTTP/2 streams) per second
        self._last_time = time.monotonic()
        self._drawn = False

    def render(self, s: Summary, rate: float) -> str:
        c = s.connections
        elapsed = int(s.duration_seconds)
        clock = f"{elapsed // 3600:02d}:{elapsed // 60 % 60:02d}:{elapsed % 60:02d}"
        open_now = s.open_flows if s.open_flows is not None else 0
        line = (f"{clock}  {s.packets:,} packets  {_mb(s.bytes_captured)}  "
                f"connections: {open_now:,} open, {c.complete:,} replayed, {c.incomplete:,} incomplete, "
                f"{c.dropped:,} dropped, {c.failed:,} failed  {_mb(rate)}/s")
        if self._request_rate is not None:
            line += f"  {self._request_rate:,.0f} req/s"
        if s.pods_now is not None:
            # Live runs that follow a workload: how many pods feed the mirror now, and the latest change.
            line += f"  pods: {s.pods_now}" + (f" (latest: {s.latest_move})" if s.latest_move else "")
        return line

    def __call__(self, s: Summary) -> None:
        now = time.monotonic()
        span = max(now - self._last_time, 1e-6)
        rate = max(0, s.bytes_captured - self._last_bytes) / span
        if s.protocols is not None:
            requests = s.protocols.get("http/1.x", 0) + s.protocols.get("h2", 0)
            self._request_rate = max(0, requests - self._last_requests) / span
            self._last_requests = requests
        self._last_bytes, self._last_time = s.bytes_captured, now
        line = self.render(s, rate)
        if self.tty:
            # \r + clear-to-end: redraw in place without leaving stale characters behind.
            self.stream.write("\r\x1b[2K" + line)
            self._drawn = True
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def clear(self) -> None:
        """Remove the in-place line before the final summary is printed."""
        if self.tty and self._drawn:
            self.stream.write("\r\x1b[2K")
            self.stream.flush()
            self._drawn = False
