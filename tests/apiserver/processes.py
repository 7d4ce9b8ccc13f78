"""Commands started through exec, tracked so tests can see what a disconnect left running."""

from __future__ import annotations

import asyncio
import os
import signal
import threading

from .cgroups import ContainerCgroups


class ProcessTable:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._procs: dict[int, tuple[list[str], asyncio.subprocess.Process]] = {}
        self._owners: dict[int, tuple[str, str]] = {}
        self._containers: dict[int, str] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.cgroups = ContainerCgroups()

    def add(self, argv: list[str], proc: asyncio.subprocess.Process, pod: tuple[str, str],
            container: str = "") -> None:
        with self._lock:
            self._procs[proc.pid] = (argv, proc)
            self._owners[proc.pid] = pod
            self._containers[proc.pid] = container
        task = asyncio.get_running_loop().create_task(self._reap(proc))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def keep(self, task: asyncio.Task[None]) -> None:
        """Hold a reference to a background pump that must outlive its request handler."""
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _reap(self, proc: asyncio.subprocess.Process) -> None:
        await proc.wait()
        with self._lock:
            self._procs.pop(proc.pid, None)
            self._owners.pop(proc.pid, None)
            self._containers.pop(proc.pid, None)

    def running(self) -> list[tuple[int, list[str]]]:
        with self._lock:
            return [(pid, list(argv)) for pid, (argv, proc) in self._procs.items() if proc.returncode is None]

    @staticmethod
    def kill_group(pid: int) -> None:
        # Each exec runs in its own session, so the group also holds anything the command forked.
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def kill_pod(self, pod: tuple[str, str]) -> None:
        """A deleted or stopped pod takes its containers' processes with it."""
        with self._lock:
            pids = [pid for pid, owner in self._owners.items() if owner == pod]
        for pid in pids:
            self.kill_group(pid)

    def kill_containers(self, pod: tuple[str, str], containers: set[str]) -> None:
        """A restarted container takes its processes, and those sharing its PID namespace, with it."""
        with self._lock:
            pids = [pid for pid, owner in self._owners.items()
                    if owner == pod and self._containers.get(pid) in containers]
        for pid in pids:
            self.kill_group(pid)

    def kill_all(self) -> None:
        for pid, _ in self.running():
            self.kill_group(pid)

    async def drain(self, timeout: float) -> None:
        """Wait (bounded) for every reaper and pump to finish after kill_all."""
        pending = [t for t in self._tasks if not t.done()]
        if pending:
            await asyncio.wait(pending, timeout=timeout)
        self.cgroups.remove()
