"""Replay against real loopback servers: what the target receives is the truth, never a mock."""

from __future__ import annotations

import functools
import os
import random
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest

from kubectl_mirror.errors import TargetError, UsageError
from kubectl_mirror.model import Abort, AbortReason, Action, Close, Endpoint, Open, Outcome, Send
from kubectl_mirror.replay import Delivery, ReplayConfig, Replayer, check_target
from kubectl_mirror.settings import Destination, parse_to

CLIENT = Endpoint("10.0.0.1", 40000)
SERVER = Endpoint("10.0.0.2", 80)
LIMIT = 30.0  # liveness bound for every wait: a hang fails the test instead of blocking the suite


# ---- a real target on loopback -------------------------------------------------------------------


@dataclass
class Peer:
    """One connection as the target saw it."""

    index: int
    sock: socket.socket
    data: bytearray = field(default_factory=bytearray)
    eof: bool = False  # saw a clean end after the data
    reset: bool = False  # saw ECONNRESET
    response_sent: int = 0
    response_error: str | None = None
    kill: threading.Event = field(default_factory=threading.Event)
    hangup: threading.Event = field(default_factory=threading.Event)  # a stalled peer half-closes, still not reading
    done: threading.Event = field(default_factory=threading.Event)


Mode = str  # "read" | "stall" | "rst" | "flood"


class Target:
    """A threaded TCP server whose behaviour per connection (by accept order) is chosen by the test."""

    def __init__(
        self,
        mode: Mode | Callable[[int], Mode] = "read",
        *,
        response: bytes = b"",
        rcvbuf: int | None = None,
        port: int = 0,
        host: str = "127.0.0.1",
    ) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.mode = mode
        self.response = response
        self.listener = socket.socket(family, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if rcvbuf is not None:  # small and fixed: a target that does not read fills up fast
            self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.listener.bind((host, port))
        self.listener.listen(256)
        self.listener.settimeout(0.05)
        self.port: int = self.listener.getsockname()[1]
        self.dest = Destination(host, self.port, family)
        self.peers: list[Peer] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._acceptor = threading.Thread(target=self._accept_loop, daemon=True)
        self._acceptor.start()

    def _accept_loop(self) -> None:
        try:
            while not self._stop.is_set():
                try:
                    sock, _ = self.listener.accept()
                except TimeoutError:
                    continue
                with self._lock:
                    peer = Peer(len(self.peers), sock)
                    self.peers.append(peer)
                t = threading.Thread(target=self._serve, args=(peer,), daemon=True)
                self._threads.append(t)
                t.start()
        finally:
            self.listener.close()

    def _serve(self, peer: Peer) -> None:
        mode = self.mode(peer.index) if callable(self.mode) else self.mode
        sock = peer.sock
        sock.settimeout(0.05)
        flood: threading.Thread | None = None
        try:
            if mode == "stall":
                deadline = time.monotonic() + LIMIT
                while not peer.kill.wait(0.01) and time.monotonic() < deadline:
                    if peer.hangup.is_set():
                        peer.hangup.clear()
                        sock.shutdown(socket.SHUT_WR)
                return
            if mode == "flood":
                flood = threading.Thread(target=self._respond, args=(peer,), daemon=True)
                flood.start()
            deadline = time.monotonic() + LIMIT
            while time.monotonic() < deadline and not peer.kill.is_set():
                try:
                    chunk = sock.recv(1 << 16)
                except TimeoutError:
                    continue
                except ConnectionResetError:
                    peer.reset = True
                    return
                if not chunk:
                    peer.eof = True
                    break
                peer.data += chunk
                if mode == "rst":
                    return
            if flood is not None:
                flood.join(LIMIT)
            elif peer.eof and self.response:
                self._respond(peer)
        finally:
            # Stalled, killed or "rst" peers end with a reset; the others close cleanly.
            if mode in ("stall", "rst") or peer.kill.is_set():
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()
            peer.done.set()

    def _respond(self, peer: Peer) -> None:
        view = memoryview(self.response)
        deadline = time.monotonic() + LIMIT
        try:
            while view and time.monotonic() < deadline and not peer.kill.is_set():
                try:
                    n = peer.sock.send(view[: 1 << 16])
                except TimeoutError:
                    continue
                peer.response_sent += n
                view = view[n:]
        except OSError as exc:
            peer.response_error = str(exc)

    def peer_count(self) -> int:
        with self._lock:
            return len(self.peers)

    def stop(self) -> None:
        """Stop listening and reset every connection still open (a crashing target)."""
        self._stop.set()
        self._acceptor.join(LIMIT)
        with self._lock:
            peers = list(self.peers)
        for peer in peers:
            peer.kill.set()
        for t in self._threads:
            t.join(LIMIT)


@pytest.fixture
def targets() -> Iterator[list[Target]]:
    started: list[Target] = []
    yield started
    for t in started:
        t.stop()


def start(targets: list[Target], *args: object, **kwargs: object) -> Target:
    t = Target(*args, **kwargs)  # type: ignore[arg-type]
    targets.append(t)
    return t


# ---- driving the replayer ------------------------------------------------------------------------


def pump(r: Replayer, until: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + LIMIT
    while not until():
        assert time.monotonic() < deadline, f"never happened: {what}"
        r.poll(0.02)


def bounded(fn: Callable[[], None]) -> None:
    """Run fn in a thread: if it blocks (the bug we test for), fail instead of hanging the suite."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            fn()
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(LIMIT)
    assert not t.is_alive(), "blocked"
    if errors:
        raise errors[0]


def opened(flow: int, partial: bool = False) -> Open:
    return Open(flow, CLIENT, SERVER, partial, 0.0)


def sends(flow: int, data: bytes, chunk: int) -> list[Action]:
    return [Send(flow, data[i : i + chunk], 0.0) for i in range(0, len(data), chunk)]


def fast(**kw: float) -> ReplayConfig:
    cfg = {"connect_backoff": 0.01, "drain_timeout": 10.0, "linger_timeout": 10.0}
    cfg.update(kw)
    return ReplayConfig(**cfg)  # type: ignore[arg-type]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


# ---- --to parsing and the up-front check ---------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "host", "port", "shown"),
    [
        (":8080", "127.0.0.1", 8080, "127.0.0.1:8080"),
        ("8080", "127.0.0.1", 8080, "127.0.0.1:8080"),
        ("127.0.0.2:9", "127.0.0.2", 9, "127.0.0.2:9"),
        ("[::1]:8080", "::1", 8080, "[::1]:8080"),
        ("[0:0:0:0:0:0:0:1]:443", "::1", 443, "[::1]:443"),
        ("localhost:65535", "127.0.0.1", 65535, "127.0.0.1:65535"),
        (" :1 ", "127.0.0.1", 1, "127.0.0.1:1"),
    ],
)
def test_parse_to_accepts(text: str, host: str, port: int, shown: str) -> None:
    dest = parse_to(text)
    assert (dest.host, dest.port, str(dest)) == (host, port, shown)
    assert dest.family == (socket.AF_INET6 if ":" in host else socket.AF_INET)
    assert dest.is_loopback


def test_parse_to_other_hosts_are_not_loopback() -> None:
    assert not parse_to("192.0.2.7:80").is_loopback
    assert not parse_to("[2001:db8::1]:80").is_loopback


@pytest.mark.parametrize("text", ["", "x", ":", "host", "::1:8080", "[::1]8080", "[]:80", "[::1:80", ":http", ":-1",
                                  ":80x", ":\uff18\uff10"])
def test_parse_to_rejects_malformed(text: str) -> None:
    with pytest.raises(UsageError) as info:
        parse_to(text)
    assert info.value.message == (
        f"invalid --to {text!r}: expected [HOST]:PORT, for example :8080 or 127.0.0.1:8080"
    )
    assert info.value.exit_code == 2


@pytest.mark.parametrize("text", [":0", ":65536", "127.0.0.1:99999"])
def test_parse_to_rejects_port_out_of_range(text: str) -> None:
    with pytest.raises(UsageError, match=r"port \d+ is out of range, expected 1 to 65535"):
        parse_to(text)


def test_check_target_refused_says_what_to_do() -> None:
    port = free_port()
    with pytest.raises(TargetError) as info:
        check_target(parse_to(f":{port}"))
    assert info.value.message == (
        f"cannot connect to 127.0.0.1:{port} (--to): connection refused; start your local service first or fix --to"
    )


def test_check_target_accepts_a_listening_service(targets: list[Target]) -> None:
    target = start(targets)
    check_target(target.dest)
    pump_until = time.monotonic() + LIMIT
    while target.peer_count() < 1:  # it really connected
        assert time.monotonic() < pump_until
        time.sleep(0.01)


# ---- delivery ------------------------------------------------------------------------------------


def test_many_concurrent_flows_arrive_byte_exact(targets: list[Target]) -> None:
    target = start(targets)
    rng = random.Random(7)
    payloads = {flow: f"flow{flow:04d}".encode() + rng.randbytes(rng.randrange(0, 300_000)) for flow in range(40)}
    # Interleave the flows' segments the way a capture does, with Open/Send/Close in the same batch.
    pending = {flow: deque(sends(flow, data, rng.choice([7, 100, 1460, 65536]))) for flow, data in payloads.items()}
    actions: list[Action] = [opened(flow) for flow in payloads]
    while pending:
        flow = rng.choice(list(pending))
        actions.append(pending[flow].popleft())
        if not pending[flow]:
            del pending[flow]
            actions.append(Close(flow, 0.0))
    with Replayer(target.dest, fast()) as r:
        for i in range(0, len(actions), 50):
            r.execute(actions[i : i + 50])
            r.poll(0)
        r.drain()
        results = r.results()
        assert r.pop_gave_up() == []
        assert r.stats.open_sockets == 0
        assert r.stats.connects_ok == len(payloads)
    pump_peers(target, len(payloads))
    received = {bytes(p.data[:8]).decode(): p for p in target.peers}
    for flow, data in payloads.items():
        peer = received[f"flow{flow:04d}"]
        assert peer.data == data
        assert peer.eof and not peer.reset
        assert results[flow].outcome is None
        assert results[flow].bytes_sent == len(data)


def pump_peers(target: Target, count: int) -> None:
    deadline = time.monotonic() + LIMIT
    while target.peer_count() < count or not all(p.done.is_set() for p in target.peers):
        assert time.monotonic() < deadline, "target never finished"
        time.sleep(0.01)


def test_half_close_target_sees_eof_after_every_byte_and_can_still_answer(targets: list[Target]) -> None:
    response = b"HTTP/1.1 200 OK\r\ncontent-length: 5000\r\n\r\n" + b"x" * 5000
    target = start(targets, response=response)
    request = b"POST / HTTP/1.1\r\n\r\n" + bytes(range(256)) * 400
    with Replayer(target.dest, fast()) as r:
        r.execute([opened(1), *sends(1, request, 1000), Close(1, 0.0)])
        pump(r, lambda: r.live_flows == 0, "flow finished after the target closed")
        assert r.stats.bytes_discarded == len(response)
        assert r.results()[1].outcome is None
    pump_peers(target, 1)
    peer = target.peers[0]
    assert peer.data == request and peer.eof
    assert peer.response_sent == len(response) and peer.response_error is None


def test_abort_resets_the_target_connection(targets: list[Target]) -> None:
    target = start(targets)
    with Replayer(target.dest, fast()) as r:
        r.execute([opened(1), Send(1, b"first half", 0.0)])
        pump(r, lambda: target.peer_count() == 1 and target.peers[0].data == b"first half", "data arrived")
        r.execute([Abort(1, AbortReason.HOLE, 0.0), Send(1, b"after the hole", 0.0), Close(1, 0.0)])
        assert r.live_flows == 0 and r.stats.open_sockets == 0
        assert r.pop_gave_up() == []  # the flow table's decision, not a delivery failure
        assert r.results()[1].outcome is None
    pump_peers(target, 1)
    assert target.peers[0].reset and not target.peers[0].eof
    assert target.peers[0].data == b"first half"


def test_a_reset_never_overtakes_queued_bytes(targets: list[Target]) -> None:
    target = start(targets)
    with Replayer(target.dest, fast()) as r:
        # Sent while the connect is still under way: queued, then the capture's RST. All of it arrives first.
        r.execute([opened(1), Send(1, b"the whole request", 0.0), Abort(1, AbortReason.RESET, 0.0)])
        pump(r, lambda: r.live_flows == 0, "flow finished")
        assert r.pop_gave_up() == []
        assert r.results()[1] == Delivery(1, None, len(b"the whole request"), None)
    pump_peers(target, 1)
    assert target.peers[0].data == b"the whole request" and target.peers[0].reset


def test_a_target_that_never_reads_drops_only_its_flow(targets: list[Target]) -> None:
    target = start(targets, lambda i: "stall" if i == 0 else "read", rcvbuf=16 << 10)
    big = b"s" * (1 << 16)
    healthy = random.Random(1).randbytes(512 << 10)  # under --flow-buffer even if the target reads slowly
    with Replayer(target.dest, fast(flow_buffer=1 << 20)) as r:
        r.execute([opened(1)])
        pump(r, lambda: target.peer_count() == 1, "stalled flow accepted")
        r.execute([opened(2)])
        pump(r, lambda: target.peer_count() == 2, "healthy flow accepted")

        def flood_both() -> None:
            # 64 MiB to a target that never reads: execute must shed it, not wait for it.
            for i in range(1024):
                r.execute([Send(1, big, 0.0)])
                if i < len(healthy) // len(big):
                    r.execute([Send(2, healthy[i * len(big) : (i + 1) * len(big)], 0.0)])
                r.poll(0)

        bounded(flood_both)
        assert r.pop_gave_up() == [1]
        r.execute([Close(2, 0.0), Close(1, 0.0)])
        r.drain()
        results = r.results()
    assert results[1].outcome is Outcome.DROPPED
    assert "--flow-buffer" in (results[1].error or "")
    assert results[2].outcome is None and results[2].bytes_sent == len(healthy)
    healthy_peer = target.peers[1]
    healthy_peer.done.wait(LIMIT)
    assert healthy_peer.data == healthy and healthy_peer.eof


def test_global_cap_drops_the_largest_queue(targets: list[Target]) -> None:
    target = start(targets, "stall", rcvbuf=16 << 10)
    chunk = b"q" * (1 << 16)
    # Far above what the kernel buffers per connection, so the queues, not the kernel, hold the bytes.
    sizes = {1: 40 << 20, 2: 24 << 20, 3: 12 << 20}
    cap = 48 << 20
    with Replayer(target.dest, fast(flow_buffer=64 << 20, max_buffer=cap)) as r:
        for flow in sizes:
            r.execute([opened(flow)])
            pump(r, functools.partial(lambda n: target.peer_count() == n, flow), "accepted")

        def fill() -> None:
            for flow, size in sizes.items():
                r.execute([Send(flow, chunk, 0.0)] * (size // len(chunk)))

        bounded(fill)
        assert r.pop_gave_up() == [1]
        assert r.results()[1].outcome is Outcome.DROPPED
        assert "--max-buffer" in (r.results()[1].error or "")
        assert r.live_flows == 2
        assert r.stats.peak_queued <= cap + len(chunk)
        assert r.queued_bytes <= cap


def test_twenty_megabytes_of_responses_are_read_and_discarded(targets: list[Target]) -> None:
    response = b"r" * (20 << 20)
    target = start(targets, "flood", response=response)
    request = b"GET /big HTTP/1.1\r\n\r\n"
    with Replayer(target.dest, fast(linger_timeout=LIMIT)) as r:
        r.execute([opened(1), Send(1, request, 0.0), Close(1, 0.0)])
        pump(r, lambda: r.live_flows == 0, "response read to its end")
        assert r.stats.bytes_discarded == len(response)
        assert r.results()[1].outcome is None
    pump_peers(target, 1)
    assert target.peers[0].data == request and target.peers[0].response_sent == len(response)


def test_target_reset_fails_the_flow(targets: list[Target]) -> None:
    target = start(targets, "rst")
    with Replayer(target.dest, fast()) as r:
        r.execute([opened(1), Send(1, b"hello", 0.0)])
        pump(r, lambda: r.live_flows == 0, "reset noticed")
        assert r.pop_gave_up() == [1]
        delivery = r.results()[1]
        r.execute([Send(1, b"more", 0.0), Close(1, 0.0)])  # ignored: the flow was given up
        assert r.results()[1] == delivery
    assert delivery.outcome is Outcome.FAILED
    assert delivery.error == "the target reset the connection"


def test_target_closing_with_bytes_still_queued_fails_the_flow(targets: list[Target]) -> None:
    target = start(targets, "stall", rcvbuf=16 << 10)
    with Replayer(target.dest, fast()) as r:
        r.execute([opened(1), *sends(1, b"w" * (4 << 20), 1 << 16)])
        pump(r, lambda: target.peer_count() == 1, "accepted")
        assert r.queued_bytes > 0
        target.peers[0].hangup.set()
        pump(r, lambda: r.live_flows == 0, "hang-up noticed")
        assert r.pop_gave_up() == [1]
        delivery = r.results()[1]
    assert delivery.outcome is Outcome.FAILED
    assert (delivery.error or "").startswith("the target closed the connection with ")


def test_send_after_the_target_closed_fails_the_flow(targets: list[Target]) -> None:
    target = start(targets, "stall")  # half-closes but would still accept bytes into its buffer
    with Replayer(target.dest, fast()) as r:
        r.execute([opened(1), Send(1, b"request", 0.0)])
        pump(r, lambda: target.peer_count() == 1, "accepted")
        target.peers[0].hangup.set()

        def client_keeps_talking() -> bool:
            r.execute([Send(1, b".", 0.0)])
            return r.live_flows == 0

        pump(r, client_keeps_talking, "the flow failed once the target's FIN was seen")
        assert r.pop_gave_up() == [1]
        assert r.results()[1].error == "the target closed the connection before every byte was sent"


def test_refused_connect_retries_then_fails() -> None:
    dest = parse_to(f":{free_port()}")
    with Replayer(dest, fast(connect_attempts=3)) as r:
        r.execute([opened(1), Send(1, b"queued while connecting", 0.0), Close(1, 0.0)])
        pump(r, lambda: r.live_flows == 0, "gave up connecting")
        assert r.pop_gave_up() == [1]
        assert r.stats.connect_failures == 3 and r.stats.connects_ok == 0
        assert r.queued_bytes == 0
        delivery = r.results()[1]
    assert delivery.outcome is Outcome.FAILED
    assert delivery.error == f"cannot connect to {dest}: connection refused (3 attempts)"


def test_target_dies_mid_run_then_comes_back(targets: list[Target]) -> None:
    first = start(targets)
    dest = first.dest
    with Replayer(dest, fast(connect_attempts=2)) as r:
        r.execute([a for flow in (1, 2, 3) for a in (opened(flow), Send(flow, b"before the crash", 0.0))])
        pump(r, lambda: first.peer_count() == 3 and all(p.data for p in first.peers), "delivered before crash")
        first.stop()
        pump(r, lambda: r.live_flows == 0, "live flows failed")
        assert sorted(r.pop_gave_up()) == [1, 2, 3]
        r.execute([opened(4), Send(4, b"while down", 0.0), Close(4, 0.0)])
        pump(r, lambda: r.live_flows == 0, "new flow failed to connect")
        assert r.pop_gave_up() == [4]

        second = start(targets, port=dest.port)
        r.execute([opened(5), Send(5, b"after the restart", 0.0), Close(5, 0.0)])
        r.drain()
        results = r.results()
    assert all(results[f].outcome is Outcome.FAILED for f in (1, 2, 3, 4))
    assert "connection refused" in (results[4].error or "")
    assert results[5].outcome is None
    pump_peers(second, 1)
    assert second.peers[0].data == b"after the restart" and second.peers[0].eof


def test_ipv6_destination(targets: list[Target]) -> None:
    try:
        target = start(targets, host="::1")
    except OSError:
        pytest.skip("no IPv6 loopback")
    with Replayer(parse_to(f"[::1]:{target.port}"), fast()) as r:
        r.execute([opened(1), Send(1, b"over v6", 0.0), Close(1, 0.0)])
        r.drain()
        assert r.results()[1].outcome is None
    pump_peers(target, 1)
    assert target.peers[0].data == b"over v6" and target.peers[0].eof


def test_poll_reports_the_pipeline_fd_and_waits_on_it() -> None:
    read_fd, write_fd = os.pipe()
    try:
        with Replayer(parse_to(f":{free_port()}"), fast()) as r:
            assert r.poll(0, read_fd) is False
            os.write(write_fd, b"x")
            assert r.poll(LIMIT, read_fd) is True
            assert r.poll(0) is False  # no longer watched
    finally:
        os.close(read_fd)
        os.close(write_fd)


def test_drain_drops_what_a_stalled_target_never_took(targets: list[Target]) -> None:
    target = start(targets, "stall", rcvbuf=16 << 10)
    with Replayer(target.dest, fast()) as r:
        r.execute([opened(1), *sends(1, b"z" * (8 << 20), 1 << 16), Close(1, 0.0)])
        r.drain(0.2)
        assert r.pop_gave_up() == [1]
        assert r.results()[1].outcome is Outcome.DROPPED
        assert "drain timeout" in (r.results()[1].error or "")
        assert r.stats.open_sockets == 0


def test_no_descriptor_leaks(targets: list[Target]) -> None:
    before = fd_count()
    target = Target()
    r = Replayer(target.dest, fast(connect_attempts=1))
    for round_ in range(5):
        base = round_ * 100
        actions: list[Action] = []
        for flow in range(base, base + 100):
            actions += [opened(flow), Send(flow, b"payload %d" % flow, 0.0)]
            actions.append(Close(flow, 0.0) if flow % 3 else Abort(flow, AbortReason.RESET, 0.0))
        r.execute(actions)
        pump(r, lambda: r.live_flows == 0, "round finished")
        assert r.stats.open_sockets == 0
        assert len(r.pop_finished()) == 100
    assert r.results() == {}
    target.stop()
    r.execute([opened(10_000), Send(10_000, b"refused", 0.0)])  # a refused connect must not leak either
    pump(r, lambda: r.live_flows == 0, "refused")
    r.close()
    assert fd_count() == before
