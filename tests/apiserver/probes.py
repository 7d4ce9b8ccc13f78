"""Readiness and liveness probes as a kubelet sends them: real connections from the node to the pod's IP.

They reach the pod's port like any client's, so a live capture on that port sees them, and a mirror replays
them. The request is what the kubelet's Go HTTP client writes (kube-probe/<version>, Accept */*, no
keep-alive); a tcpSocket probe connects and closes. The period is taken as given (fractions of a second
allowed here, unlike a real API server), starting after initialDelaySeconds.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

Obj = dict[str, Any]
USER_AGENT = "kube-probe/1.36"
KINDS = ("startupProbe", "readinessProbe", "livenessProbe")


def _port(container: Obj, port: Any) -> int | None:
    if isinstance(port, int):
        return port
    for p in container.get("ports") or []:
        if p.get("name") == port:
            return int(p["containerPort"])
    return int(port) if str(port).isdigit() else None


def http_request(ip: str, port: int, probe: Obj) -> bytes:
    get = probe["httpGet"]
    extra = [(str(h.get("name", "")), str(h.get("value", ""))) for h in get.get("httpHeaders") or []]
    host = next((v for k, v in extra if k.lower() == "host"), f"{ip}:{port}")
    lines = [f"GET {get.get('path') or '/'} HTTP/1.1", f"Host: {host}", f"User-Agent: {USER_AGENT}", "Accept: */*",
             *(f"{k}: {v}" for k, v in extra if k.lower() != "host"), "Connection: close"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def _once(ip: str, port: int, probe: Obj) -> None:
    timeout = float(probe.get("timeoutSeconds", 1))
    with contextlib.suppress(OSError, asyncio.TimeoutError):
        reader, writer = await asyncio.wait_for(asyncio.open_connection(ip, port), timeout)
        try:
            if "httpGet" in probe:
                writer.write(http_request(ip, port, probe))
                await writer.drain()
                await asyncio.wait_for(reader.read(), timeout)  # the answer, to the server's close
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


class Prober:
    """The probes of every pod added with a network namespace, until the pod is gone or probing paused."""

    def __init__(self) -> None:
        self._tasks: dict[tuple[str, str], list[asyncio.Task[None]]] = {}
        self.paused = False  # tests: hold the probes (no such switch on a node) to end a run between two

    def start(self, ns: str, pod: str, ip: str, containers: list[Obj]) -> None:
        """On the server loop."""
        loop = asyncio.get_running_loop()
        for c in containers:
            for kind in KINDS:
                probe = c.get(kind) or {}
                action = probe.get("httpGet") or probe.get("tcpSocket")
                port = _port(c, action.get("port")) if action else None
                if port is not None:
                    self._tasks.setdefault((ns, pod), []).append(loop.create_task(self._run(ip, port, probe)))

    async def _run(self, ip: str, port: int, probe: Obj) -> None:
        await asyncio.sleep(float(probe.get("initialDelaySeconds", 0)))
        period = max(0.05, float(probe.get("periodSeconds", 10)))
        while True:
            if not self.paused:
                await _once(ip, port, probe)
            await asyncio.sleep(period)

    def stop_pod(self, ns: str, pod: str) -> None:
        for task in self._tasks.pop((ns, pod), []):
            task.cancel()

    async def stop(self) -> None:
        tasks = [t for ts in self._tasks.values() for t in ts]
        self._tasks.clear()
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
