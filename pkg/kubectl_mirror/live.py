"""`kubectl mirror TYPE/NAME [--to :PORT]`: resolve, tap, capture, and feed the replay engine live.

The order matters for the user's cluster: `--to` is checked and tshark found before the pod is touched, so a
typo never leaves an ephemeral container behind (they cannot be removed).
"""

from __future__ import annotations

import functools
import logging
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import BinaryIO, cast

from .capture import LiveCapture, PodCapture
from .dissect import TsharkInfo, dissector_count, find_tshark
from .errors import ClusterError, MirrorError, TargetGoneError, ToolError, UsageError
from .execstream import ExecProcess, start_capture, stop_remote
from .follow import Follower
from .following import Following
from .kubeconfig import Connection, ConnectionFlags, connect_with
from .mesh import ANY, LOOPBACK, announcement
from .output import notice_printer, report, status_line
from .pcap import PcapReader, PcapWriter
from .pipeline import (
    Engine,
    EngineOptions,
    StopFlag,
    flow_config,
    replay_config,
    shadow_options,
    turn_options,
)
from .progress import StatusLine
from .replay import destination
from .settings import Destination, LiveTarget, Settings
from .summary import PodFigures, Summary, SummaryBuilder, exit_code, finished
from .tap import DEFAULT_IMAGE, Tap, ensure_tap, tap_ended
from .target import Pod, PodTarget, resolve_selection, target_for
from .tcpdump_failure import PrivilegeDropError

log = logging.getLogger(__name__)


class KubePodCapture:
    """tcpdump in one pod's tap, over the exec WebSocket."""

    def __init__(self, conn: Connection, target: PodTarget, tap: Tap, user_filter: str | None,
                 interface: str | None = None, *, new_tap: Callable[..., Tap] | None = None,
                 on_note: Callable[[str], None] | None = None) -> None:
        self.conn, self.target, self.tap, self.user_filter = conn, target, tap, user_filter
        # --interface, else the pod's mesh decides (its plaintext hop), else every interface.
        self.interface = interface or (target.mesh.interface_for(target.port) if target.mesh is not None else ANY)
        # A running tap for this pod (ensure_tap): when `tap` has terminated, or, with avoid_legacy=True, one that
        # can run a privilege-dropping tcpdump when `tap` is one of an earlier version.
        self._new_tap = new_tap
        self._tap_of: dict[ExecProcess, Tap] = {}  # each capture is stopped through the tap it runs in
        # Said once: by on_note at once, else kept for the caller to say before the run starts.
        self.notes: list[str] = []
        self._on_note = on_note
        self.name = f"{target.namespace}/{target.pod}"
        hosts = {target.pod_ip} if target.pod_ip else set()
        if self.interface == LOOPBACK:
            hosts |= {"127.0.0.1", "::1"}  # a mesh proxy may hand the app its plaintext on a loopback address
        self.server_hosts = frozenset(hosts)
        self._proc: ExecProcess | None = None
        self._lock = threading.Lock()
        self.stop_errors: list[MirrorError] = []
        self.warnings: list[str] = []
        # Captures whose tcpdump could not be stopped yet (the API server was unreachable): retried later, since
        # a kubelet leaves them running otherwise.
        self._orphans: list[ExecProcess] = []
        self._finished = False  # the final stop has begun: a start still under way must undo itself
        self._last: ExecProcess | None = None  # the latest capture, kept after its stop for its exit counters
        self._unconfirmed: set[int] = set()  # remote tcpdump PIDs not yet seen stopped

    def start(self) -> BinaryIO:
        try:
            proc = start_capture(self.conn, self.target, self.tap, user_filter=self.user_filter,
                                 interface=self.interface)
        except PrivilegeDropError:
            if self.tap.can_switch_user or self._new_tap is None:
                raise
            proc = self._start_in_new_tap()
        except ClusterError:
            ended = tap_ended(self.conn, self.tap) if self._new_tap is not None else None
            if ended is None:
                raise
            proc = self._start_after_tap_ended(ended)
        with self._lock:
            self._tap_of[proc] = self.tap
            if proc.remote_pid is not None:
                self._unconfirmed.add(proc.remote_pid)
            finished = self._finished
            if not finished:
                self._proc = self._last = proc
        if finished:
            # The run ended while this (re)start waited for tcpdump: the final stop found nothing to stop, so
            # this one is stopped here or it would run on in the pod.
            self._stop_capture(proc, gap=False)
            raise ClusterError(f"the capture in {self.name} started after the run had ended; it was stopped")
        self._stop_orphans(final=False)  # the API server answers again: finish what a drop left behind
        log.info("capturing in %s on %s (tap %s, tcpdump pid %s, %s)", self.name, self.interface, self.tap.name,
                 proc.remote_pid, proc.protocol)
        return cast(BinaryIO, proc.stdout)

    def _start_in_new_tap(self) -> ExecProcess:
        """The tap of an earlier version (NET_RAW only) cannot run this image's tcpdump, and ephemeral containers
        can be neither changed nor removed: add one that can, once; later runs choose it over the old one."""
        assert self._new_tap is not None
        old = self.tap
        self.tap = self._new_tap(avoid_legacy=True)
        note = (f"tap {old.name} in pod {self.name} was added by an earlier kubectl-mirror without SETUID and SETGID, "
                f"which this image's tcpdump needs to drop root after opening the capture: added tap {self.tap.name} "
                f"with them; {old.name} stays (ephemeral containers cannot be removed) and is no longer used")
        if self._on_note is not None:
            self._on_note(note)
        else:
            self.notes.append(note)
        log.info("tap %s replaces %s in %s", self.tap.name, old.name, self.name)
        return start_capture(self.conn, self.target, self.tap, user_filter=self.user_filter, interface=self.interface)

    def _start_after_tap_ended(self, how: str) -> ExecProcess:
        """The tap terminated (as one does when the container it targets restarts: the kernel ends every process
        of that PID namespace) and ephemeral containers never restart: capture in a new tap."""
        assert self._new_tap is not None
        old = self.tap
        with self._lock:
            # Whatever ran in the old tap ended with it: nothing is left to stop there.
            gone = [p for p in self._orphans if self._tap_of.get(p) == old]
            self._orphans = [p for p in self._orphans if p not in gone]
            for p in gone:
                self._unconfirmed.discard(p.remote_pid or -1)
        self.tap = self._new_tap()
        log.warning("%s: tap %s terminated (%s; a tap ends when the container it targets restarts): capturing in "
                    "tap %s", self.name, old.name, how, self.tap.name)
        self.warnings.append(f"tap {old.name} in pod {self.name} terminated during the run ({how}); the capture "
                             f"went on in tap {self.tap.name}")
        return start_capture(self.conn, self.target, self.tap, user_filter=self.user_filter, interface=self.interface)

    def leftover_hints(self) -> list[str]:
        """How to stop, by hand, each tcpdump of this pod not yet seen stopped (for an exit that cannot wait)."""
        with self._lock:
            pids = sorted(self._unconfirmed)
        t = self.target
        return [f"tcpdump (pid {pid}) may still run in pod {self.name}: stop it with kubectl exec -n {t.namespace} "
                f"{t.pod} -c {self.tap.name} -- kill {pid}" for pid in pids]

    def _stop_remote(self, proc: ExecProcess) -> None:
        # Raises when it cannot tell the process is gone.
        stop_remote(self.conn, self.target, self._tap_of.get(proc, self.tap), proc)
        with self._lock:
            self._unconfirmed.discard(proc.remote_pid or -1)

    def lost_packets(self) -> int:
        # Called by the thread that read the stream to its end: tcpdump's exit counters came before that end.
        with self._lock:
            last = self._last
        return kernel_drops(last.stderr_text()) if last is not None else 0

    def _stop_orphans(self, *, final: bool) -> None:
        with self._lock:
            orphans, self._orphans = self._orphans, []
        for proc in orphans:
            try:
                self._stop_remote(proc)
            except MirrorError as exc:
                if final:
                    self.stop_errors.append(exc)
                else:
                    with self._lock:
                        self._orphans.append(proc)

    def stop(self, *, gap: bool = False) -> None:
        """Stop the running capture. `gap`: its stream just dropped and the run goes on (a new one follows)."""
        with self._lock:
            proc, self._proc = self._proc, None
            self._finished = self._finished or not gap
        if proc is not None:
            self._stop_capture(proc, gap)
        if not gap:
            self._stop_orphans(final=True)

    def _stop_capture(self, proc: ExecProcess, gap: bool) -> None:
        try:
            try:
                # Closing the stream is not enough: kubelets leave exec'd processes running.
                self._stop_remote(proc)
            except MirrorError:
                if gap:
                    # The API server is unreachable (that is likely why the stream dropped): the next start, or
                    # the final stop, tries again.
                    with self._lock:
                        self._orphans.append(proc)
                    return
                raise
            # tcpdump prints its counters as it exits; the capture thread reads them with the end of the stream
            # (unless that stream is already gone: a dropped connection has nothing more to tell).
            deadline = time.monotonic() + 3.0
            while proc.returncode is None and not proc.ended and time.monotonic() < deadline:
                time.sleep(0.05)
            said = proc.stderr_text()
            log.debug("tcpdump in %s (exit %s) said: %s", self.name, proc.returncode,
                      " | ".join(said.splitlines()[-4:]))
            dropped = kernel_drops(said)
            if dropped:
                self.warnings.append(
                    f"tcpdump in pod {self.name} lost {dropped} packets (its buffer was full or still held them when "
                    "it stopped): connections that lost them are counted incomplete; narrow the capture with --filter")
        except MirrorError as exc:
            self.stop_errors.append(exc)
        finally:
            proc.close()


def kernel_drops(stderr: str) -> int:
    """Packets tcpdump saw but never wrote, from the counters it prints as it exits.

    "N packets dropped by kernel/interface" is what its buffer could not hold; "received by filter" minus
    "captured" also counts what was still queued when it was stopped. The larger of the two is what was lost.
    """
    dropped = received = captured = 0
    for line in stderr.splitlines():
        words = line.split()
        if len(words) < 3 or not words[0].isdigit() or words[1] != "packets":
            continue
        n = int(words[0])
        if words[2:4] == ["dropped", "by"]:
            dropped += n
        elif words[2:5] == ["received", "by", "filter"]:
            received = n
        elif words[2] == "captured":
            captured = n
    return max(dropped, received - captured)


def describe(targets: list[PodTarget]) -> str:
    first = targets[0]
    more = f" (+{len(targets) - 1} more)" if len(targets) > 1 else ""
    return f"{first.namespace}/{first.pod}:{first.port}{more}"


def default_capture_file(targets: list[PodTarget]) -> str:
    return f"mirror-{targets[0].pod}-{time.strftime('%Y%m%d-%H%M%S')}.pcapng"


def run_live(flags: ConnectionFlags, args: LiveTarget, settings: Settings) -> int:
    """The live command: `flags` say which cluster, `args` name the target and the tap, `settings` the run."""
    if not args.ref and not args.selector:
        raise UsageError("name what to mirror: TYPE/NAME (for example deploy/web) or -l SELECTOR")
    dest: Destination | None = None
    tshark: TsharkInfo | None = None
    if settings.to:
        # Before the pod is touched: ephemeral containers cannot be removed, so fail on a typo first.
        dest = destination(settings.to, allow_remote=settings.allow_remote)
        tshark = find_tshark(settings.tshark)
    conn = connect_with(flags)
    try:
        targets, selection, chosen = resolve_selection(conn, args.ref or "", selector=args.selector,
                                                       container=args.container, port=args.port,
                                                       all_pods=args.all_pods)
        pods = [KubePodCapture(conn, t, _tap(conn, t, args, settings.quiet), args.filter,
                               capture_interface(t, args, quiet=settings.quiet),
                               new_tap=functools.partial(_tap, conn, t, args, settings.quiet)) for t in targets]
        follower = Follower(Following.mode_for(selection, args.all_pods), selection.source)
        follower.seed(chosen)
        following: Following | None = None

        def on_lost(pod: PodCapture, why: str) -> None:
            if following is not None:
                following.lost(pod, why)
            else:  # gave up before following ran: the run's own failure, as without following
                capture.errors.append(ClusterError(why))

        capture = LiveCapture(pods, follow=True, on_lost=on_lost)
        capture.start()
        if not settings.quiet:
            for note in (note for pod in pods for note in pod.notes):
                print(f"note: {note}", file=sys.stderr)
        # Installed before the "mirroring" line: a Ctrl-C from then on is the graceful stop it announces.
        stop = StopFlag(on_force=lambda: _leftover_warnings(_kube_pods(capture)))
        stop.install()
        failure: MirrorError | None = None
        status = status_line(settings) if dest is not None else None
        ended: list[str] = []

        def say(text: str) -> None:
            if status is not None:
                status.clear()
            if not settings.quiet or text.startswith("warning:"):
                print(text, file=sys.stderr, flush=True)

        def target_gone(message: str) -> None:
            ended.append(message)
            stop.request("target gone")
            _begin_stop(capture, interrupted=False, quiet=True)

        def make_capture(pod: Pod) -> KubePodCapture:
            target = target_for(conn, pod, selection, args.container, args.port)
            # Said through `say`: the status line may be on screen by now.
            return KubePodCapture(conn, target, _tap(conn, target, args, settings.quiet), args.filter,
                                  capture_interface(target, args, say),
                                  new_tap=functools.partial(_tap, conn, target, args, settings.quiet),
                                  on_note=lambda text: say(f"note: {text}"))

        following = Following(conn, selection, follower, capture, make_capture, say=say, on_end=target_gone)
        try:
            if not settings.quiet:
                where = str(dest) if dest else f"capture only, {_capture_path(settings, targets)}"
                print(f"mirroring {describe(targets)} -> {where} (Ctrl-C to stop)", file=sys.stderr, flush=True)
            following.start()
            if dest is not None and tshark is not None:
                summary, failure = _mirror(capture, stop, args, settings, targets, dest, tshark, status,
                                           lambda s: _following_now(s, follower))
            else:
                summary = _capture_only(capture, stop, args, settings, targets)
        finally:
            try:
                try:
                    capture.stop(reader_done=True)
                finally:
                    # After the capture's stop: a start still under way sees it and undoes itself; waited for here.
                    following.stop()
                    capture.stop(reader_done=True)  # a pod that slipped in while following stopped
            finally:
                stop.uninstall()  # only now: a second Ctrl-C while tcpdump is being stopped still says what it left
        all_pods = _kube_pods(capture)
        meshes = sorted({f"{pod.target.mesh.label()}, captured on {pod.interface}" for pod in all_pods
                         if pod.target.mesh is not None})
        if meshes:
            summary = summary.model_copy(update={"mesh": "; ".join(meshes)})
            if summary.packets == 0 and any(pod.interface == LOOPBACK for pod in all_pods):
                # Either no traffic came, or this mesh delivers the plaintext elsewhere: never stay silent on it.
                summary.warnings.append(
                    "nothing arrived on lo, where this mesh's proxy hands the app its plaintext; if traffic did reach "
                    "the pod, the mesh delivers it elsewhere (Istio ambient before 1.21: eth0): pass --interface")
        summary = summary.model_copy(update={"pods": _pod_figures(all_pods, capture, summary)})
        summary.warnings.extend(warning for pod in all_pods for warning in pod.warnings)
        summary.warnings.extend(err.message for pod in all_pods for err in pod.stop_errors)
        summary.warnings.extend(err.message for err in capture.errors)
    finally:
        conn.close()
    gone = TargetGoneError(ended[0]) if ended else None
    report(finished(summary, failure or gone), settings)  # -o json says which error ends the run, and its exit code
    if failure is not None:
        raise failure  # after the summary: what was delivered before it is still reported
    if gone is not None:
        raise gone
    return exit_code(summary)


def capture_interface(target: PodTarget, args: LiveTarget, say: Callable[[str], None] | None = None,
                      quiet: bool = False) -> str:
    """Where tcpdump listens in the pod: --interface, else loopback in a mesh (its plaintext hop), else any.

    Said once per meshed pod, before the tap is added: in a mesh, capturing every interface would mirror each
    request twice, once as the mesh's ciphertext and once as the proxy's plaintext copy.
    """
    chosen = args.interface or (target.mesh.interface_for(target.port) if target.mesh is not None else ANY)
    if target.mesh is not None:
        log.info("pod %s: %s mesh (%s)", target.pod, target.mesh.label(), target.mesh.evidence)
        line = announcement(target.pod, target.mesh, chosen, overridden=bool(args.interface), port=target.port)
        if say is not None:
            say(line)
        elif not quiet:
            print(line, file=sys.stderr, flush=True)
    return chosen


def _tap(conn: Connection, target: PodTarget, args: LiveTarget, quiet: bool, *, avoid_legacy: bool = False) -> Tap:
    log.info("target: pod %s/%s, container %s, port %d (%s)", target.namespace, target.pod, target.container,
             target.port, target.port_name or "by number")
    tap = ensure_tap(conn, target, image=args.image or DEFAULT_IMAGE, pull_policy=args.image_pull_policy,
                     timeout=args.tap_timeout, avoid_legacy=avoid_legacy)
    log.info("tap %s in %s: %s%s", tap.name, target.pod, "reused" if tap.reused else "added",
             " (no NET_RAW: Pod Security fallback)" if tap.fallback else "")
    if tap.fallback and not quiet:
        print(f"note: Pod Security refused adding NET_RAW in namespace {target.namespace}; tap {tap.name} keeps the "
              "container runtime's own NET_RAW instead", file=sys.stderr)
    return tap


def _capture_path(settings: Settings, targets: list[PodTarget]) -> str:
    return str(settings.write) if settings.write else default_capture_file(targets)


def _writer(path: str, quiet: bool = False) -> PcapWriter:
    if path == "-":
        return PcapWriter(sys.stdout.buffer)
    if not quiet:
        print(f"warning: {path} will hold the captured traffic as it is, secrets included (tokens, passwords); "
              "it is created readable by you only (0600)", file=sys.stderr)
    return PcapWriter(path)


def _begin_stop(capture: LiveCapture, *, interrupted: bool, quiet: bool) -> None:
    if interrupted and not quiet:
        print("stopping: tcpdump in the pod sends what it still holds (Ctrl-C again to quit at once)",
              file=sys.stderr, flush=True)
    threading.Thread(target=capture.stop, daemon=True).start()


def _following_now(summary: Summary, follower: Follower) -> Summary:
    """The status line's view: how many pods feed the mirror now, and the latest move."""
    return summary.model_copy(update={"pods_now": follower.capturing, "latest_move": follower.latest_move})


def _pod_figures(pods: list[KubePodCapture], capture: LiveCapture, summary: Summary) -> list[PodFigures]:
    """Each pod mirrored over the run, in the order it was started: its packets, and the connections to it."""
    out: list[PodFigures] = []
    records = dict(capture.stats.records_by_pod)
    # One entry per pod, even when the run came back to it (each start is a capture of its own).
    first: dict[str, KubePodCapture] = {}
    for pod in pods:
        first.setdefault(pod.name, pod)
    pods = list(first.values())
    # A mesh proxy may hand the app its plaintext on a loopback address (Linkerd: 127.0.0.1): those connections
    # are the pod's when it is the only pod captured on lo, else they cannot be told apart by address.
    on_lo = [pod for pod in pods if pod.interface == LOOPBACK]
    for pod in pods:
        hosts = pod.server_hosts if on_lo == [pod] else {pod.target.pod_ip}
        tallies = [t for t in (summary.by_server.get(host) for host in hosts) if t is not None]
        out.append(PodFigures(pod=pod.name, packets=records.get(pod.name, 0),
                              connections=sum(t.connections for t in tallies),
                              bytes_delivered=sum(t.bytes_delivered for t in tallies),
                              incomplete=sum(t.incomplete for t in tallies)))
    return out


def _kube_pods(capture: LiveCapture) -> list[KubePodCapture]:
    return [pod for pod in capture.pods() if isinstance(pod, KubePodCapture)]


def _leftover_warnings(pods: Sequence[KubePodCapture]) -> None:
    """The second Ctrl-C leaves now: say which tcpdump may be left running, and how to stop it."""
    for pod in pods:
        for hint in pod.leftover_hints():
            print(f"warning: {hint}", file=sys.stderr, flush=True)


def _mirror(capture: LiveCapture, stop: StopFlag, args: LiveTarget, settings: Settings,
            targets: list[PodTarget],
            dest: Destination, tshark: TsharkInfo, status: StatusLine | None,
            now: Callable[[Summary], Summary]) -> tuple[Summary, MirrorError | None]:
    """Run the engine on the live stream; the error that stopped it comes back beside the summary."""
    tee = _writer(settings.write, settings.quiet) if settings.write else None
    options = EngineOptions(
        dest=dest,
        flow=flow_config(settings, targets[0].port),
        replay=replay_config(settings),
        tshark=tshark,
        live=True,
        dissectors=dissector_count(settings.dissectors),
        tee=tee,
        duration=args.duration,
        max_packets=args.count,
        gaps=capture.pop_gaps,
        # Called from the loop: only start the stop, the loop reads what still comes.
        on_stop=lambda: _begin_stop(capture, interrupted=stop.interrupted, quiet=settings.quiet),
        stop=stop,
        http=shadow_options(settings),
        tls_passthrough=settings.tls_passthrough,
        turns=turn_options(settings),
    )
    if status is not None:
        shown = status
        options.progress, options.progress_every = (lambda s: shown(now(s))), status.every
    options.notice = notice_printer(settings, status)
    engine = Engine(options, source_name=describe(targets))
    failure: MirrorError | None = None
    try:
        summary = engine.run([capture.stream])
        failure = engine.fatal_error or engine.input_error
    finally:
        if status is not None:
            status.clear()
        if tee is not None:
            try:
                tee.close()
            except OSError as exc:
                failure = failure or ToolError(f"cannot write the capture copy (-w): {exc.strerror or exc}; free "
                                               "some space or choose another path")
    return summary, failure


def _capture_only(capture: LiveCapture, stop: StopFlag, args: LiveTarget, settings: Settings,
                  targets: list[PodTarget]) -> Summary:
    """No --to: write the capture (what ksniff users expect) and count what went by."""
    path = _capture_path(settings, targets)
    quiet = settings.quiet
    writer = _writer(path, quiet)
    if stop.requested:  # Ctrl-C came before this loop
        _begin_stop(capture, interrupted=stop.interrupted, quiet=quiet)
    stop.on_first = lambda: _begin_stop(capture, interrupted=True, quiet=quiet)
    started = time.monotonic()
    timer: threading.Timer | None = None
    if args.duration is not None:
        # An idle pod sends nothing to wake the loop: the timer ends the capture, and with it the loop.
        def time_is_up() -> None:
            stop.request("duration")
            capture.stop()

        timer = threading.Timer(args.duration, time_is_up)
        timer.daemon = True
        timer.start()
    packets = captured = 0
    try:
        for rec in PcapReader(capture.stream):
            writer.write_record(rec)
            packets += 1
            captured += rec.orig_len
            over_count = args.count is not None and packets >= args.count
            if over_count or (args.duration is not None and time.monotonic() - started >= args.duration):
                stop.request("count" if over_count else "duration")
                _begin_stop(capture, interrupted=False, quiet=quiet)
                break
    finally:
        if timer is not None:
            timer.cancel()
        writer.close()
    if path != "-" and not quiet:
        print(f"wrote {packets} packets to {path}", file=sys.stderr)
    builder = SummaryBuilder(source=describe(targets), target=f"capture only: {path}")
    return builder.build(packets=packets, bytes_captured=captured, tcp_segments=packets,
                         stream_gaps=sum(gap.dropped for gap in capture.pop_gaps()),
                         duration_seconds=time.monotonic() - started, interrupted=stop.interrupted)
