"""`kubectl exec` as a subprocess-shaped object, reading the exec WebSocket's frames directly.

The python client's stream() keeps a copy of every byte and grows one buffer per frame, which is slow and
unbounded for a capture that runs for hours. Here each frame is read once: stdout bytes go straight to the
reader, stderr keeps a bounded tail, channel 3 carries the exit status.
"""

from __future__ import annotations

import io
import json
import ssl
import subprocess
import time
from collections import deque
from collections.abc import Sequence
from http import HTTPStatus
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

import websocket

from .cluster import Call, status_error, transport_error
from .errors import ClusterError, MirrorError, NotFound, UsageError
from .kubeconfig import Connection
from .tap import Tap
from .target import PodTarget
from .tcpdump_failure import diagnose, failure

V5 = "v5.channel.k8s.io"
V4 = "v4.channel.k8s.io"
STDOUT, STDERR, STATUS, CLOSE = 1, 2, 3, 255
STDERR_TAIL = 64 << 10  # stderr is for diagnostics: keep the last 64 KiB, never more

# The capture wrapper: reports its PID on stderr, then becomes tcpdump (exec keeps the PID). The script is a
# constant and the argv follows as positional parameters, so no user text is ever parsed by the shell.
PID_MARK = "mirror-capture-pid "
_WRAPPER = ['sh', '-c', f'echo "{PID_MARK}$$" >&2; exec "$@"', "mirror-capture"]
# Alive-check and signal for one PID, only if it still is our tcpdump: PIDs get reused, and the tap shares the
# target container's PID namespace, so a bare `kill PID` could hit the application.
_KILL_REFUSED = 3
_IS_TCPDUMP = 'tr "\\0" " " </proc/"$1"/cmdline 2>/dev/null | grep -q "^tcpdump "'
# Exit 3 when kill itself fails: tcpdump has switched to its own user and the tap may not signal it.
_SIGNAL_SCRIPT = f'{_IS_TCPDUMP} || exit 1; kill -s "$2" "$1" || exit {_KILL_REFUSED}'


def capture_argv(port: int, user_filter: str | None, interface: str = "any") -> list[str]:
    """tcpdump writing a packet-buffered pcap to stdout: inbound and outbound TCP on `port`, on `interface`
    (every interface by default; loopback in a service mesh, where only the proxy's hop to the app is plaintext)."""
    if not 1 <= port <= 65535:
        raise UsageError(f"port {port} is out of range: expected 1 to 65535")
    expression = f"tcp port {port}"
    if user_filter and user_filter.strip():
        expression += f" and ({user_filter.strip()})"
    # --immediate-mode: otherwise libpcap hands packets over in blocks up to a second late (latency), and the
    # ring's last block is lost when tcpdump is stopped. -B 32768 (KiB): with immediate mode the default ring
    # holds a handful of packets, and a burst of 20 new connections lost most of them.
    return ["tcpdump", "--immediate-mode", "-B", "32768", "-p", "-i", interface, "-U", "-s", "0", "-w", "-",
            expression]


def exec_url(host: str, namespace: str, pod: str, container: str, argv: Sequence[str]) -> str:
    parts = urlsplit(host)
    scheme = {"https": "wss", "http": "ws"}.get(parts.scheme, parts.scheme)
    path = f"{parts.path.rstrip('/')}/api/v1/namespaces/{quote(namespace, safe='')}/pods/{quote(pod, safe='')}/exec"
    query = urlencode([*(("command", a) for a in argv), ("container", container), ("stdin", "false"),
                       ("stdout", "true"), ("stderr", "true"), ("tty", "false")])
    return f"{scheme}://{parts.netloc}{path}?{query}"


def _sslopt(cfg: Any) -> dict[str, Any]:
    opts: dict[str, Any] = {}
    if cfg.verify_ssl:
        opts["cert_reqs"] = ssl.CERT_REQUIRED
        if cfg.ssl_ca_cert:
            opts["ca_certs"] = cfg.ssl_ca_cert
    else:
        opts["cert_reqs"] = ssl.CERT_NONE
        opts["check_hostname"] = False
    if cfg.cert_file:
        opts["certfile"] = cfg.cert_file
    if cfg.key_file:
        opts["keyfile"] = cfg.key_file
    if cfg.tls_server_name:
        opts["server_hostname"] = cfg.tls_server_name
    return opts


def _handshake_error(exc: Any, namespace: str, pod: str, container: str, conn: Connection) -> MirrorError:
    """The refused WebSocket upgrade as the boundary types it (401, RBAC on pods/exec, ...); exec's own wording
    for the rest. Kubernetes 1.31+ authorizes the upgrade as "create", older servers as "get": the Forbidden names
    the verb the server itself says it denied."""
    code = int(getattr(exc, "status_code", 0) or 0)
    try:
        phrase = HTTPStatus(code).phrase
    except ValueError:  # a code no standard names (or none: the proxy closed the connection)
        phrase = ""
    err = status_error(code, getattr(exc, "resp_body", None), Call("create", "pods/exec", namespace, pod),
                       context=conn.context, as_user=dict(conn.impersonation).get("Impersonate-User"),
                       http_reason=phrase)
    if err.status in (401, 403):
        return err
    if isinstance(err, NotFound):
        return ClusterError(f'cannot exec in pod "{pod}" (container {container}) in namespace "{namespace}": '
                            f"{err.server_message}")
    return ClusterError(f"exec in pod {pod} (container {container}) failed: {err.server_message}")


class ExecStdout(io.BufferedIOBase):
    """The remote process's stdout as a binary, read-only, blocking file (like Popen.stdout)."""

    def __init__(self, proc: ExecProcess) -> None:
        super().__init__()
        self._proc = proc
        self._chunk: bytes = b""
        self._pos = 0

    def readable(self) -> bool:
        return True

    def fileno(self) -> int:
        # The socket carries WebSocket frames, not the stdout bytes: handing it out would corrupt the stream.
        raise io.UnsupportedOperation("exec stdout is a WebSocket stream and has no file descriptor")

    def _fill(self) -> bool:
        """Make sure some unread bytes are buffered; False at end of stream."""
        for _ in range(1 << 30):  # bounded: each round reads one frame, empty frames are rare
            if self._pos < len(self._chunk):
                return True
            data = self._proc._next_stdout()
            if data is None:
                return False
            self._chunk, self._pos = data, 0
        return False

    def read1(self, size: int = -1) -> bytes:
        if self.closed:
            raise ValueError("read of closed file")
        if not self._fill():
            return b""
        end = len(self._chunk) if size is None or size < 0 else min(len(self._chunk), self._pos + size)
        # The whole frame is handed over without a copy.
        out = self._chunk if self._pos == 0 and end == len(self._chunk) else self._chunk[self._pos:end]
        self._pos = end
        return out

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            parts = []
            for _ in range(1 << 40):
                piece = self.read1()
                if not piece:
                    break
                parts.append(piece)
            return b"".join(parts)
        parts, got = [], 0
        while got < size:
            piece = self.read1(size - got)
            if not piece:
                break
            parts.append(piece)
            got += len(piece)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def readinto1(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        if not self._fill():
            return 0
        n = min(len(view), len(self._chunk) - self._pos)
        view[:n] = self._chunk[self._pos:self._pos + n]
        self._pos += n
        return n

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        got = 0
        while got < len(view):
            n = self.readinto1(view[got:])
            if n == 0:
                break
            got += n
        return got

    def close(self) -> None:
        if not self.closed:
            super().close()
            self._proc.close()


class ExecProcess:
    """A command running in a container, reached over one exec WebSocket.

    One reader at a time: stdout reads and wait() read the same socket.
    """

    def __init__(self, ws: Any, argv: list[str], description: str) -> None:
        self._ws = ws
        self.args = argv
        self.description = description  # "pod web-1 (container mirror-tap)", for messages
        self.protocol: str = ws.subprotocol or ""
        self.returncode: int | None = None
        self.status_message: str | None = None  # the failure message of a non-zero exit status
        self.remote_pid: int | None = None  # set by start_capture
        self._stderr: deque[bytes] = deque()
        self._stderr_len = 0
        self._pending: deque[bytes] = deque()  # stdout that arrived while waiting for something else
        self._eof = False
        self._closed = False
        self.stdout = ExecStdout(self)

    # ---- frames ------------------------------------------------------------------------------------

    def _recv(self) -> tuple[int, bytes] | None:
        """Next (channel, payload) frame; None once the stream has ended."""
        if self._eof:
            return None
        try:
            opcode, frame = self._ws.recv_data_frame(False)
        except (websocket.WebSocketConnectionClosedException, ConnectionError, OSError) as exc:
            if isinstance(exc, (TimeoutError, websocket.WebSocketTimeoutException)):
                raise
            self._eof = True
            return None
        if opcode == websocket.ABNF.OPCODE_CLOSE:
            self._eof = True
            return None
        data: bytes = frame.data if isinstance(frame.data, bytes) else bytes(frame.data)
        if not data:
            return (0, b"")
        return data[0], data[1:]

    def _handle(self, channel: int, payload: bytes) -> bytes | None:
        """Act on a non-stdout frame; return stdout payloads for the caller."""
        if channel == STDOUT:
            return payload
        if channel == STDERR:
            self._stderr.append(payload)
            self._stderr_len += len(payload)
            while self._stderr_len > STDERR_TAIL and len(self._stderr) > 1:
                self._stderr_len -= len(self._stderr.popleft())
        elif channel == STATUS:
            self._set_status(payload)
        # CLOSE (v5) and unknown channels carry nothing for a reader of stdout.
        return None

    def _set_status(self, payload: bytes) -> None:
        try:
            doc = json.loads(payload or b"{}")
        except ValueError:
            doc = {}
        if doc.get("status") == "Success":
            self.returncode = 0
            return
        self.status_message = str(doc.get("message") or "unknown failure")
        causes = (doc.get("details") or {}).get("causes") or []
        code = next((c.get("message") for c in causes if c.get("reason") == "ExitCode"), None)
        try:
            self.returncode = int(code) if code is not None else 1
        except ValueError:
            self.returncode = 1

    def _next_stdout(self) -> bytes | None:
        if self._pending:
            return self._pending.popleft()
        for _ in range(1 << 40):
            frame = self._recv()
            if frame is None:
                return None
            data = self._handle(*frame)
            if data:
                return data
        return None

    def _pump(self, until: Any, deadline: float) -> bool:
        """Read frames, keeping stdout aside, until `until()` holds (True) or the stream ends (False)."""
        for _ in range(1 << 30):
            if until():
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise subprocess.TimeoutExpired(self.args, 0)
            self._ws.settimeout(remaining)
            try:
                frame = self._recv()
            except (TimeoutError, websocket.WebSocketTimeoutException):
                raise subprocess.TimeoutExpired(self.args, 0) from None
            finally:
                if not self._eof:
                    self._ws.settimeout(None)
            if frame is None:
                return bool(until())
            data = self._handle(*frame)
            if data:
                self._pending.append(data)
        return False

    # ---- subprocess-like face ----------------------------------------------------------------------

    def stderr_text(self) -> str:
        """What the process wrote to stderr so far (the last 64 KiB), decoded leniently."""
        return b"".join(self._stderr).decode("utf-8", "replace")

    def poll(self) -> int | None:
        return self.returncode

    @property
    def ended(self) -> bool:
        """The stream is over (end of output, a lost connection, or closed): nothing more will arrive."""
        return self._eof

    def wait(self, timeout: float | None = None) -> int:
        """Exit code, from the status channel. Unread stdout is discarded. TimeoutExpired after `timeout`."""
        deadline = time.monotonic() + (timeout if timeout is not None else 365 * 86400.0)
        self._pending.clear()
        self.stdout._chunk, self.stdout._pos = b"", 0
        ended = self._pump(lambda: self.returncode is not None, deadline)
        if not ended or self.returncode is None:
            raise ClusterError(f"the exec stream to {self.description} ended without an exit status; "
                               "the connection to the API server was lost")
        return self.returncode

    def close(self) -> None:
        """Close the stream. The remote process is NOT stopped by this (kubelets let it run): see stop_remote."""
        if self._closed:
            return
        self._closed = True
        self._eof = True
        try:
            self._ws.close(timeout=1.0)
        except Exception:  # closing a broken socket has nothing left to report
            self._ws.shutdown()

    def __enter__(self) -> ExecProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_exec(conn: Connection, namespace: str, pod: str, container: str, argv: list[str], *,
              connect_timeout: float | None = 30.0, protocols: Sequence[str] = (V5, V4)) -> ExecProcess:
    """Start `argv` (no shell) in the container; stdout/stderr stream back, stdin is closed.

    The server picks the first of `protocols` it speaks: v5 on Kubernetes >= 1.30, else v4.
    """
    cfg = conn.api_client.configuration
    url = exec_url(cfg.host, namespace, pod, container, argv)
    headers = [f"{k}: {v}" for k, v in conn.auth_headers()]
    timeout = conn.request_timeout or connect_timeout
    try:
        ws = websocket.create_connection(url, header=headers, subprotocols=list(protocols), sslopt=_sslopt(cfg),
                                         timeout=timeout, skip_utf8_validation=True, enable_multithread=False)
    except websocket.WebSocketBadStatusException as exc:
        raise _handshake_error(exc, namespace, pod, container, conn) from None
    except (websocket.WebSocketException, OSError) as exc:
        err = transport_error(exc, cfg.host)
        if err is None:
            raise ClusterError(f"cannot open an exec stream to pod {pod}: {str(exc).splitlines()[0]}") from None
        raise err from None
    if ws.subprotocol not in (V5, V4):
        ws.close()
        raise ClusterError(f"the API server offered exec protocol {ws.subprotocol!r}; {V5} or {V4} is needed "
                           "(Kubernetes >= 1.4)")
    ws.settimeout(None)  # reads block like a pipe; wait() and start_capture bound their own time
    return ExecProcess(ws, argv, f"pod {pod} (container {container})")


# ---- the capture ---------------------------------------------------------------------------------------


def _capture_failure(proc: ExecProcess, tap: Tap, interface: str) -> MirrorError:
    lines = [ln for ln in proc.stderr_text().splitlines() if not ln.startswith(PID_MARK)]
    return failure(diagnose(lines, proc.status_message, proc.returncode), tap, interface)


def start_capture(conn: Connection, target: PodTarget, tap: Tap, *, user_filter: str | None = None,
                  ready_timeout: float = 30.0, interface: str = "any") -> ExecProcess:
    """Run tcpdump in the tap and return once it captures; its failures come back as one-line errors."""
    argv = [*_WRAPPER, *capture_argv(target.port, user_filter, interface)]
    proc = open_exec(conn, tap.namespace, tap.pod, tap.name, argv)
    try:
        # tcpdump says "listening on" once the capture is live: packets after this moment are not missed.
        proc._pump(lambda: "listening on" in proc.stderr_text(), time.monotonic() + ready_timeout)
    except subprocess.TimeoutExpired:
        _read_pid(proc)
        proc.close()
        # It may still come up: a tcpdump nobody reads would run on in the pod (kubelets keep exec'd processes).
        _kill_quietly(conn, tap, proc.remote_pid)
        raise ClusterError(f"tcpdump in pod {target.pod} did not start capturing within {ready_timeout:g}s; "
                           f"stderr: {proc.stderr_text().strip()[-200:] or 'empty'}") from None
    _read_pid(proc)
    if "listening on" not in proc.stderr_text():
        if proc.returncode is None and proc._eof:
            proc.close()
            raise ClusterError(f"the exec stream to pod {target.pod} closed before tcpdump started")
        err = _capture_failure(proc, tap, interface)
        proc.close()
        raise err
    return proc


def _read_pid(proc: ExecProcess) -> None:
    for line in proc.stderr_text().splitlines():
        if line.startswith(PID_MARK) and line[len(PID_MARK):].strip().isdigit():
            proc.remote_pid = int(line[len(PID_MARK):].strip())
            return


def _kill_quietly(conn: Connection, tap: Tap, pid: int | None) -> None:
    if pid is None:
        return
    try:
        _signal(conn, tap, pid, "KILL", 5.0)
    except MirrorError:
        pass  # the failure being reported says more than this one would


def _signal(conn: Connection, tap: Tap, pid: int, signal: str, timeout: float) -> bool:
    """Signal `pid` if it still is tcpdump; True if it was (exit status of the remote check)."""
    argv = ["sh", "-c", _SIGNAL_SCRIPT if signal else _IS_TCPDUMP, "mirror-stop", str(pid), signal or "0"]
    with open_exec(conn, tap.namespace, tap.pod, tap.name, argv) as proc:
        try:
            code = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            # A MirrorError like any other failed stop: callers keep the capture as an orphan and try again.
            raise ClusterError(f"pod {tap.pod} did not answer within {timeout:g}s when asked to stop tcpdump "
                               f"(pid {pid})") from None
        if signal and code == _KILL_REFUSED:
            said = proc.stderr_text().strip().splitlines()
            head = f"tap {tap.name} in pod {tap.pod} may not stop tcpdump (pid {pid}): kill says "
            if "not permitted" not in " ".join(said):
                raise ClusterError(head + f"{(said or ['nothing'])[-1]}; it captures until the pod is deleted")
            raise ClusterError(head + "Operation not permitted, since tcpdump switched to its own user and the tap "
                               "lacks KILL; it captures until the pod is deleted")
        return code == 0


def stop_remote(conn: Connection, target: PodTarget, tap: Tap, proc: ExecProcess, *, timeout: float = 10.0) -> bool:
    """Make sure the capture's tcpdump is gone: SIGINT (it flushes and exits), then SIGKILL if it lingers.

    Closing the exec stream does not do it: kubelets leave exec'd processes running when the client goes.
    Returns True when a remote process had to be signalled. Safe to call more than once.
    """
    pid = proc.remote_pid
    if pid is None or (proc.returncode is not None):
        return False  # never started, or it already reported its exit
    deadline = time.monotonic() + timeout
    signalled = _signal(conn, tap, pid, "INT", timeout)
    if not signalled:
        return False
    for _ in range(200):  # poll until gone; each poll is one exec round trip
        if not _signal(conn, tap, pid, "", max(1.0, deadline - time.monotonic())):
            return True
        if time.monotonic() >= deadline:
            break
        time.sleep(0.1)
    _signal(conn, tap, pid, "KILL", 5.0)
    if _signal(conn, tap, pid, "", 5.0):
        raise ClusterError(f"tcpdump (pid {pid}) in pod {target.pod} would not stop; remove it with kubectl exec "
                           f"{target.pod} -n {target.namespace} -c {tap.name} -- kill -9 {pid}")
    return True
