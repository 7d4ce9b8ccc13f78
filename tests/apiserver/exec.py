"""pods/exec over WebSocket: channel protocols v4/v5 (and v4.base64), with the command really run inside the
pod's network namespace.

Like a kubelet, a client that goes away does not take the process with it unless the switch says so: the
output keeps being drained (as a runtime's shim would) and the process runs until it exits or is killed. The
same holds when the API server itself restarts: the process never belonged to it, only the relay did.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
from typing import Any

from aiohttp import WSMsgType, web

from .processes import ProcessTable
from .securitycontext import ProcessContext, process_context
from .settings import Settings
from .status import ApiError, bad_request

Obj = dict[str, Any]

V5 = "v5.channel.k8s.io"
V4 = "v4.channel.k8s.io"
V4_B64 = "v4.base64.channel.k8s.io"
SUPPORTED = (V5, V4, V4_B64)
STDIN, STDOUT, STDERR, ERROR, RESIZE, CLOSE = 0, 1, 2, 3, 4, 255
CHUNK = 1 << 20
PIPE_LIMIT = 4 << 20
EXIT_IO_GRACE = 5.0  # seconds to wait for output after the process exited (a forked child may hold the pipe)
_TRUE = {"1", "t", "T", "true", "TRUE", "True"}


def flag(query: Any, name: str) -> bool:
    return query.get(name, "") in _TRUE


def pick_container(pod: Obj, requested: str) -> tuple[Obj, bool]:
    """The container spec and whether it is ephemeral; the API server's errors otherwise."""
    spec = pod["spec"]
    name = pod["metadata"]["name"]
    if not requested:
        if len(spec["containers"]) == 1:
            return spec["containers"][0], False
        names = " ".join(c["name"] for c in spec["containers"])
        raise bad_request(f"a container name must be specified for pod {name}, choose one of: [{names}]")
    for c in spec["containers"] + spec.get("initContainers", []):
        if c["name"] == requested:
            return c, False
    for c in spec.get("ephemeralContainers", []):
        if c["name"] == requested:
            return c, True
    raise bad_request(f"container {requested} is not valid for pod {name}")


def is_running(pod: Obj, container: str, ephemeral: bool) -> bool:
    key = "ephemeralContainerStatuses" if ephemeral else "containerStatuses"
    for s in pod.get("status", {}).get(key, []):
        if s["name"] == container:
            return "running" in s.get("state", {})
    return False


def negotiate(request: web.Request) -> str | None:
    offered = [p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",") if p.strip()]
    return next((p for p in offered if p in SUPPORTED), None)


def exit_status(argv: list[str], code: int) -> Obj:
    if code == 0:
        return {"metadata": {}, "status": "Success"}
    return {
        "metadata": {},
        "status": "Failure",
        "message": f"command terminated with non-zero exit code: error executing command {argv}, exit code {code}",
        "reason": "NonZeroExitCode",
        "details": {"causes": [{"reason": "ExitCode", "message": str(code)}]},
    }


def start_failure(argv: list[str]) -> Obj:
    msg = (f"error executing command in container: failed to exec in container: failed to start exec: OCI runtime "
           f'exec failed: exec failed: unable to start container process: exec: "{argv[0]}": executable file not '
           "found in $PATH: unknown")
    return {"metadata": {}, "status": "Failure", "message": f"Internal error occurred: {msg}",
            "reason": "InternalError", "details": {"causes": [{"message": msg}]}, "code": 500}


class ExecSession:
    def __init__(
        self, ws: web.WebSocketResponse, protocol: str, settings: Settings, table: ProcessTable, pod: tuple[str, str]
    ) -> None:
        self.pod = pod
        self.ws = ws
        self.b64 = protocol == V4_B64
        self.v5 = protocol == V5
        self.settings = settings
        self.table = table
        self.connected = True
        self.gone = asyncio.Event()
        self.last_data = asyncio.get_running_loop().time()  # either direction: what the kubelet's idle timer sees

    async def send(self, channel: int, data: bytes) -> None:
        if not self.connected:
            return
        try:
            if self.b64:
                await self.ws.send_str(str(channel) + base64.b64encode(data).decode())
            else:
                await self.ws.send_bytes(bytes((channel,)) + data)
            self.last_data = asyncio.get_running_loop().time()
        except (ConnectionError, RuntimeError):
            self.connected = False
            self.gone.set()

    async def pump(self, stream: asyncio.StreamReader, channel: int) -> None:
        while True:
            chunk = await stream.read(CHUNK)
            if not chunk:
                return
            await self.send(channel, chunk)

    async def read_client(self, proc: asyncio.subprocess.Process) -> None:
        try:
            async for msg in self.ws:
                if msg.type == WSMsgType.BINARY:
                    data: bytes = msg.data
                elif msg.type == WSMsgType.TEXT and self.b64 and msg.data:
                    data = bytes((int(msg.data[0]),)) + base64.b64decode(msg.data[1:])
                else:
                    continue
                if not data:
                    continue
                self.last_data = asyncio.get_running_loop().time()
                if data[0] == STDIN and proc.stdin is not None and not proc.stdin.is_closing():
                    proc.stdin.write(data[1:])
                    await proc.stdin.drain()
                elif data[0] == CLOSE and self.v5 and data[1:2] == bytes((STDIN,)) and proc.stdin is not None:
                    proc.stdin.close()
                # RESIZE only matters with a TTY, which this server does not allocate.
        except (ConnectionError, RuntimeError):
            pass
        finally:
            self.connected = False
            self.gone.set()
            if proc.stdin is not None and not proc.stdin.is_closing():
                proc.stdin.close()  # the runtime sees EOF on stdin once the stream is gone

    async def idle_cut(self, timeout: float) -> None:
        """The kubelet's --streaming-connection-idle-timeout: a stream with no data either way for that long is
        closed, without an exit status; the process is left to run, as after any disconnect."""
        loop = asyncio.get_running_loop()
        while self.connected:
            idle = loop.time() - self.last_data
            if idle >= timeout:
                self.connected = False
                await self.ws.close()
                self.gone.set()
                return
            await asyncio.sleep(timeout - idle)

    async def run(self, netns: str, container: str, argv: list[str], context: ProcessContext, stdin: bool,
                  stdout: bool, stderr: bool) -> None:
        env = exec_env(self.settings.exec_path_prepend)
        if shutil.which(argv[0], path=env["PATH"]) is None:
            await self.send(ERROR, json.dumps(start_failure(argv)).encode())
            await self.ws.close()
            return
        pipe, null = asyncio.subprocess.PIPE, asyncio.subprocess.DEVNULL
        # `ip netns exec` keeps the environment, so the PATH given here is the one the command resolves with.
        # Each step execs the next (ip, sh, setpriv, the command): the PID is the command's from the start.
        # The process joins its container's cgroup first (before `ip netns exec` remounts /sys).
        cgroup = self.table.cgroups.procs_file(*self.pod, container)
        join = ["sh", "-c", 'echo $$ >"$0" 2>/dev/null; exec "$@"', cgroup] if cgroup else []
        proc = await asyncio.create_subprocess_exec(
            *join, "ip", "netns", "exec", netns, *context.wrap(argv),
            stdin=pipe if stdin else null, stdout=pipe if stdout else null, stderr=pipe if stderr else null,
            start_new_session=True, limit=PIPE_LIMIT, env=env,
        )
        self.table.add(argv, proc, self.pod, container)
        pumps = [asyncio.ensure_future(self.pump(s, ch)) for s, ch in ((proc.stdout, STDOUT), (proc.stderr, STDERR))
                 if s is not None]
        for task in pumps:
            self.table.keep(task)
        reader = asyncio.ensure_future(self.read_client(proc))
        idle_timeout = self.settings.exec_idle_timeout
        watchdog = asyncio.ensure_future(self.idle_cut(idle_timeout)) if idle_timeout else None
        exited = asyncio.ensure_future(proc.wait())
        gone = asyncio.ensure_future(self.gone.wait())
        try:
            await asyncio.wait({exited, gone}, return_when=asyncio.FIRST_COMPLETED)
            if exited.done():
                if pumps:
                    await asyncio.wait(pumps, timeout=EXIT_IO_GRACE)
                await self.send(ERROR, json.dumps(exit_status(argv, _exit_code(proc.returncode))).encode())
                if self.connected:
                    await self.ws.close()
            elif self.settings.exec_kill_on_disconnect:
                ProcessTable.kill_group(proc.pid)
            # Otherwise the process stays, its output drained by the pumps, like after a real kubectl disconnect.
        except asyncio.CancelledError:
            # The API server went away under this handler (a restart): the relay is gone, but the process is
            # the kubelet's. It keeps running; the pumps keep reading its output and drop it, so it never
            # blocks on a full pipe.
            self.connected = False
            raise
        finally:
            gone.cancel()
            if watchdog is not None:
                watchdog.cancel()
            if not exited.done():
                self.table.keep(exited)  # type: ignore[arg-type]
            reader.cancel()


def exec_env(path_prepend: list[str]) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([*path_prepend, env.get("PATH", os.defpath)])
    return env


def _exit_code(returncode: int | None) -> int:
    if returncode is None:
        return 0
    return 128 - returncode if returncode < 0 else returncode  # killed by signal N: a runtime reports 128+N


async def handle(
    request: web.Request, pod: Obj, netns: str | None, settings: Settings, table: ProcessTable
) -> web.StreamResponse:
    q = request.query
    argv = q.getall("command", [])
    name = pod["metadata"]["name"]
    if not argv:
        raise bad_request("you must specify at least 1 command")
    stdin, stdout, stderr = flag(q, "stdin"), flag(q, "stdout"), flag(q, "stderr")
    if not (stdin or stdout or stderr):
        raise bad_request("you must specify at least one of stdin, stdout, stderr")
    container, ephemeral = pick_container(pod, q.get("container", ""))
    if not pod["spec"].get("nodeName"):
        raise bad_request(f"pod {name} does not have a host assigned")
    if request.headers.get("Upgrade", "").lower() != "websocket":
        raise bad_request("Upgrade request required")
    if netns is None:
        host = pod.get("status", {}).get("hostIP", "172.18.0.2")
        msg = f"error dialing backend: dial tcp {host}:10250: connect: connection refused"
        raise ApiError(500, "InternalError", msg)
    if not is_running(pod, container["name"], ephemeral):
        # The kubelet answers this one itself, as plain text, and the API server relays it.
        return web.Response(status=500, text=f'container not found ("{container["name"]}")')
    protocol = negotiate(request)
    if protocol is None:
        return web.Response(status=400, text=f"requested protocol(s) are not supported; supports {list(SUPPORTED)}")
    ws = web.WebSocketResponse(protocols=[protocol], compress=False, max_msg_size=16 << 20, autoping=True)
    await ws.prepare(request)
    pod_key = (pod["metadata"]["namespace"], name)
    # The command runs as the container's processes do: its user, capabilities, no_new_privs, read-only root.
    context = process_context(pod, container, settings.runtime_default_caps)
    await ExecSession(ws, protocol, settings, table, pod_key).run(netns, container["name"], argv, context, stdin,
                                                                         stdout, stderr)
    return ws
