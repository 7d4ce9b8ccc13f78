"""Faults: a local target that is down, dies, stalls or resets; a capture stream that is cut; tshark killed; a
full disk under -w; the exec stream dropped; Ctrl-C in every phase.

Whatever goes wrong, the contract holds: no byte reaches the target out of place (every connection there is a
prefix of a real one, and only whole ones end with a clean FIN), every flow is counted, the run ends by itself
in bounded time with a one-line error or the documented exit code, and nothing it started is left running.
Replay tests use synthetic captures whose every byte is known; live tests use the FakeCluster with a pod
namespace serving for real.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from kubectl_mirror.dissect import MAX_AHEAD_BYTES, MAX_BATCH_BYTES
from tests.apiserver import FakeCluster, PodNetns
from tests.cli_run import CliRun, Finished, wait_for
from tests.fault_helpers import (
    Conn,
    Received,
    Target,
    cli,
    gone,
    payload,
    processes_of_run,
    target,
    write_pcap,
)
from tests.netlab.lab import NsRecorder
from tests.netlab.netns import Netns

# ---- shared checks ---------------------------------------------------------------------------------------


def assert_no_traceback(result: Finished) -> None:
    assert "Traceback" not in result.stderr, result.stderr


def assert_one_error_line(result: Finished, *words: str) -> str:
    """Exactly one `error:` line on stderr, naming every one of `words`, and no traceback."""
    assert_no_traceback(result)
    errors = result.error_lines()
    assert len(errors) == 1, result.stderr
    for word in words:
        assert word in errors[0], (word, errors[0])
    return errors[0]


def assert_only_prefixes(received: Sequence[Received], sent: Sequence[bytes],
                         strict_end: bool = True) -> tuple[list[bytes], list[bytes]]:
    """No byte out of place: each connection carries a prefix of one sent, only whole ones end cleanly.

    `strict_end=False` lets a connection cut short end with a FIN: for checks that a bug would otherwise hide.

    Returns (whole, cut): the payloads delivered whole, and the prefixes of the ones cut short.
    """
    whole: list[bytes] = []
    cut: list[bytes] = []
    for r in received:
        data = bytes(r.data)
        owners = [p for p in sent if p.startswith(data)] if data else list(sent)
        assert owners, f"bytes no connection sent reached the target: {data[:40]!r}"
        if data in sent and r.end == "eof":
            whole.append(data)
        else:
            assert not strict_end or r.end != "eof", \
                f"a connection cut short ended with a clean FIN ({len(data)} bytes, {data[:20]!r})"
            cut.append(data)
    assert len(whole) == len(set(whole)), "a connection was delivered whole twice"
    return whole, cut


def tshark_leftovers(result: Finished) -> None:
    assert result.tshark_pids, "the run never started tshark: the scenario did not happen"
    assert gone(result.tshark_pids), f"tshark outlived the run: {result.tshark_pids}"


def replay_args(pcap: Path | str, port: int, *extra: str) -> list[str]:
    return ["replay", str(pcap), "--to", f"127.0.0.1:{port}", "--json", *extra]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---- the local target ----------------------------------------------------------------------------------


def test_replay_target_down_at_start_starts_nothing(tmp_path: Path) -> None:
    pcap = tmp_path / "x.pcap"
    write_pcap(pcap, [Conn(payload("one", 3000), 0.0)])
    # A tshark that leaves a mark when run: the refusal must come before any tshark, even `tshark --version`.
    marker = tmp_path / "tshark-ran"
    fake = tmp_path / "tshark"
    fake.write_text(f"#!/bin/sh\necho \"$@\" >> {marker}\nexec tshark \"$@\"\n")
    fake.chmod(0o755)
    with cli([*replay_args(pcap, free_port()), "--tshark", str(fake)]) as run:
        result = run.finish(30.0)
    assert result.returncode == 1
    assert_one_error_line(result, "cannot connect to", "connection refused")
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert result.stdout == ""
    assert not marker.exists(), marker.read_text()
    assert not result.tshark_pids


def sequential(name: str, count: int, every: float, size: int, gap: float) -> list[Conn]:
    return [Conn(payload(f"{name}-{i:03d}", size), i * every, gap=gap) for i in range(count)]


def test_replay_target_dies_and_comes_back(tmp_path: Path) -> None:
    pcap = tmp_path / "seq.pcap"
    # 16 connections over 4 s, each sending for ~0.2 s: whenever the target dies, one is likely in flight.
    conns = sequential("back", 16, 0.25, 7000, 0.04)
    write_pcap(pcap, conns)
    sent = [c.payload for c in conns]
    first = Target()
    port = first.port
    second: Target | None = None
    try:
        with cli(replay_args(pcap, port, "--speed", "1")) as run:
            assert wait_for(lambda: len(first.records(0)) >= 1, 20.0), run.stderr
            time.sleep(1.5)
            first.kill()
            time.sleep(1.0)
            second = Target(port)
            result = run.finish(60.0)
    finally:
        first.kill()
        if second is not None:
            second.kill()
    assert_no_traceback(result)
    assert result.returncode == 3, result.stderr
    c = result.connections
    assert c["seen"] == 16, c
    assert c["failed"] >= 1, c
    assert c["complete"] + c["failed"] == c["seen"], c
    assert c["dropped"] == c["incomplete"] == 0, c
    before, after = first.records(), second.records()
    whole_before, _ = assert_only_prefixes(before, sent)
    whole_after, cut_after = assert_only_prefixes(after, sent)
    # Once it is back, every later connection arrives byte-exact.
    assert whole_after and not cut_after, [(len(r.data), r.end) for r in after]
    assert not set(whole_before) & set(whole_after)
    assert c["complete"] == len(whole_before) + len(whole_after), (c, len(whole_before), len(whole_after))


def stall_named(head: bytes) -> str:
    return "stall" if head.startswith(b"stall") else "read"


def test_replay_target_that_never_reads_drops_and_stays_bounded(tmp_path: Path) -> None:
    pcap = tmp_path / "stall.pcap"
    big = 40 << 20
    max_buffer = 1 << 20
    # Three huge connections the target accepts and then never reads, among small ones it serves; 60 KB
    # segments keep the capture to a few thousand packets. Paced (--speed 1, ~2 s), so each stalled connection
    # is open and read from before its bytes pile up: the drop must come from the target not reading.
    stalls = [Conn(payload(f"stall-{i}", big), 0.1 + i * 0.01, gap=0.003, segment=60000) for i in range(3)]
    good = [Conn(payload(f"good-{i:02d}", 20000), i * 0.2, gap=0.01) for i in range(10)]
    write_pcap(pcap, [*stalls, *good])
    with target(policy=stall_named) as t:
        with cli(replay_args(pcap, t.port, "--speed", "1", "--flow-buffer", "256KiB",
                             "--max-buffer", f"{max_buffer}")) as run:
            result = run.finish(90.0)
        records = t.records(5.0)
    assert_no_traceback(result)
    assert result.returncode == 3, result.stderr
    c = result.connections
    assert (c["seen"], c["complete"], c["dropped"], c["failed"]) == (13, 10, 3, 0), c
    good_got = sorted(bytes(r.data) for r in records if bytes(r.data).startswith(b"good"))
    assert good_got == sorted(g.payload for g in good)
    assert all(r.end == "eof" for r in records if bytes(r.data).startswith(b"good"))
    stalled = [r for r in records if bytes(r.data).startswith(b"stall")]
    # A stalled connection the plugin dropped before the target's own thread (starved on a busy box) accepted it
    # and read its head: the reset discards what the kernel held for it, so the target sees a reset with no bytes.
    unread = [r for r in t.received if not r.data and r.end == "reset"]
    assert stalled and len(stalled) + len(unread) == 3, [(len(r.data), r.end) for r in t.received]
    assert all(r.end == "stalled" for r in stalled), [(len(r.data), r.end) for r in records]
    # The same replay to a target that reads everything: what the plugin holds anyway (interpreter, paced
    # segments). Whether the dissector's read-ahead window is full at the peak depends on which process a busy CPU
    # serves, not on the target, so the bound grants it explicitly (window and one batch) on top of --max-buffer
    # and allocator slack; buffering the stalled flows instead of dropping them would add ~120 MB. The reference
    # only measures memory: on a loaded box its reading target may fall behind and a flow be dropped (exit 3).
    with target() as t2, cli(replay_args(pcap, t2.port, "--speed", "1", "--flow-buffer", "256KiB",
                         "--max-buffer", f"{max_buffer}")) as run:
        reference = run.finish(90.0)
    assert reference.returncode in (0, 3) and reference.peak_rss > 0, reference.stderr
    assert_no_traceback(reference)
    bound = reference.peak_rss + MAX_AHEAD_BYTES + MAX_BATCH_BYTES + max_buffer + (16 << 20)
    assert 0 < result.peak_rss <= bound, (result.peak_rss >> 20, reference.peak_rss >> 20, bound >> 20)


def test_replay_target_resets_every_connection(tmp_path: Path) -> None:
    pcap = tmp_path / "reset.pcap"
    # Paced, so each connection still has bytes to send when the target's reset arrives.
    conns = sequential("reset", 6, 0.1, 20000, 0.02)
    write_pcap(pcap, conns)
    with target(policy=lambda head: "reset") as t:
        with cli(replay_args(pcap, t.port, "--speed", "1")) as run:
            result = run.finish(60.0)
        records = t.records(5.0)
    assert_no_traceback(result)
    assert result.returncode == 3, result.stderr
    c = result.connections
    assert (c["seen"], c["failed"], c["complete"]) == (6, 6, 0), c
    assert len(records) == 6 and all(r.end == "reset-by-target" for r in records), [r.end for r in records]
    assert "reset" in result.stderr or c["failed"] == 6


# ---- the capture stream --------------------------------------------------------------------------------


def cut_capture(tmp_path: Path) -> tuple[bytes, list[bytes], int]:
    """Eight sequential connections, cut inside a data record of the sixth: (the cut bytes, payloads, whole)."""
    conns = sequential("cut", 8, 0.5, 6000, 0.01)
    full = tmp_path / "full.pcap"
    ends = write_pcap(full, conns)
    data = full.read_bytes()
    # Each connection is 3 handshake records, 5 data records, 3 closing records: the sixth's third data record.
    record = 5 * 11 + 3 + 2
    start, end = ends[record - 1], ends[record]
    return data[: (start + end) // 2], [c.payload for c in conns], 5


def assert_cut_delivery(result: Finished, records: list[Received], sent: list[bytes], whole: int) -> None:
    assert result.returncode == 1, result.stderr
    assert_one_error_line(result)
    got_whole, cut = assert_only_prefixes(records, sent)
    # Everything before the cut arrives whole; the connection the cut went through is not passed off as whole.
    assert sorted(got_whole) == sorted(sent[:whole]), [len(w) for w in got_whole]
    assert len(cut) == 1 and sent[whole].startswith(cut[0]), [len(x) for x in cut]
    c = result.connections
    assert (c["seen"], c["complete"]) == (whole + 1, whole), c


def test_replay_file_cut_mid_packet(tmp_path: Path) -> None:
    cut, sent, whole = cut_capture(tmp_path)
    pcap = tmp_path / "cut.pcap"
    pcap.write_bytes(cut)
    with target() as t:
        with cli(replay_args(pcap, t.port)) as run:
            result = run.finish(60.0)
        records = t.records(5.0)
    assert_cut_delivery(result, records, sent, whole)


def test_replay_stdin_cut_mid_packet(tmp_path: Path) -> None:
    cut, sent, whole = cut_capture(tmp_path)
    part = tmp_path / "part.bin"
    part.write_bytes(cut)
    # A producer that writes half a record and exits, as a crashed `tcpdump -w -` would.
    feeder = subprocess.Popen([sys.executable, "-c", f"import sys; sys.stdout.buffer.write(open({str(part)!r}, "
                               "'rb').read()); sys.stdout.flush()"], stdout=subprocess.PIPE)
    try:
        with target() as t:
            with cli(replay_args("-", t.port), stdin=feeder.stdout) as run:
                assert feeder.stdout is not None
                feeder.stdout.close()  # the CLI holds the only read end: it must see EOF when the feeder exits
                result = run.finish(60.0)
            records = t.records(5.0)
    finally:
        feeder.kill()
        feeder.wait(10)
    assert_cut_delivery(result, records, sent, whole)


def many_packets(tmp_path: Path) -> tuple[Path, list[bytes]]:
    """~10k packets over 6 s: paced at --speed 1, tshark still has output to hand over for seconds."""
    conns = [Conn(payload(f"tsk-{i:03d}", 4000), i * 0.03, gap=0.002, segment=100) for i in range(200)]
    pcap = tmp_path / "many.pcap"
    write_pcap(pcap, conns)
    return pcap, [c.payload for c in conns]


def kill_tshark_mid_run(tmp_path: Path) -> tuple[Finished, list[Received], list[bytes]]:
    pcap, sent = many_packets(tmp_path)
    with target() as t:
        with cli(replay_args(pcap, t.port, "--speed", "1")) as run:
            assert wait_for(lambda: len(t.records(0)) >= 5 and bool(run.tsharks()), 30.0), run.stderr
            for pid in run.tsharks():
                os.kill(pid, signal.SIGKILL)
            result = run.finish(60.0)
        records = t.records(5.0)
    return result, records, sent


def test_replay_tshark_killed_mid_run(tmp_path: Path) -> None:
    result, records, sent = kill_tshark_mid_run(tmp_path)
    assert result.returncode == 1, result.stderr
    assert_one_error_line(result, "tshark")
    tshark_leftovers(result)
    whole, _ = assert_only_prefixes(records, sent, strict_end=False)
    assert whole and len(whole) < len(sent)
    if result.stdout.strip():  # a summary, when there is one, agrees with what the target saw
        assert result.connections["complete"] == len(whole), (result.connections, len(whole))


def test_replay_tshark_killed_flows_in_flight_are_reset(tmp_path: Path) -> None:
    _, records, sent = kill_tshark_mid_run(tmp_path)
    assert_only_prefixes(records, sent)


def interrupt_replay(tmp_path: Path) -> tuple[Finished, list[Received], list[bytes]]:
    pcap, sent = many_packets(tmp_path)
    with target() as t:
        with cli(replay_args(pcap, t.port, "--speed", "1")) as run:
            assert wait_for(lambda: len(t.records(0)) >= 5, 30.0), run.stderr
            run.interrupt()
            result = run.finish(30.0)
        records = t.records(5.0)
    return result, records, sent


def test_replay_ctrl_c(tmp_path: Path) -> None:
    result, records, sent = interrupt_replay(tmp_path)
    assert_no_traceback(result)
    assert result.returncode == 0, result.stderr
    assert result.summary["interrupted"] is True
    whole, _ = assert_only_prefixes(records, sent, strict_end=False)
    c = result.connections
    assert whole and c["seen"] < len(sent), c
    # Whatever the plugin ended with a FIN it counts complete, and nothing else.
    assert c["complete"] == sum(1 for r in records if r.end == "eof"), (c, [(len(r.data), r.end) for r in records])
    tshark_leftovers(result)


def test_replay_ctrl_c_flows_in_flight_are_reset(tmp_path: Path) -> None:
    _, records, sent = interrupt_replay(tmp_path)
    assert_only_prefixes(records, sent)


def test_replay_second_ctrl_c_exits_130(tmp_path: Path) -> None:
    # A stalled flow holds the end-of-run drain for its whole timeout: only the second Ctrl-C ends it early.
    # 12 MB: more than the kernel's socket buffers take, less than --flow-buffer, so it waits queued.
    with target(policy=lambda head: "stall") as t:
        stall = tmp_path / "stall.pcap"
        write_pcap(stall, [Conn(payload("stall-x", 12 << 20), 0.0, segment=60000),
                           *[Conn(payload(f"later-{i}", 1000), 1.0 + i) for i in range(20)]])
        with cli(replay_args(stall, t.port, "--speed", "1", "--flow-buffer", "32MiB")) as run:
            assert wait_for(lambda: len(t.records(0)) >= 1, 30.0), run.stderr
            time.sleep(0.5)  # the stalled flow's bytes reach the plugin's queue
            run.interrupt()
            time.sleep(0.3)
            assert run.proc.poll() is None, run.stderr  # still draining: the second Ctrl-C has work to cut short
            run.interrupt()
            twice = run.finish(30.0)
    assert twice.returncode == 130, twice.stderr
    assert_no_traceback(twice)
    assert gone(twice.tshark_pids)


# ---- live --------------------------------------------------------------------------------------------------

POD = "web-1"
CONTAINERS: list[dict[str, Any]] = [{"name": "web", "image": "nginx:1.27",
                                     "ports": [{"name": "http", "containerPort": 80}]}]


class Live:
    """A FakeCluster with one pod whose namespace serves on port 80 (a recorder), and a local target."""

    def __init__(self, fc: FakeCluster, pod: PodNetns, local: Target) -> None:
        self.fc, self.pod, self.local = fc, pod, local

    def args(self, *extra: str) -> list[str]:
        return [f"pod/{POD}", "--to", f"127.0.0.1:{self.local.port}", "--kubeconfig", str(self.fc.kubeconfig),
                *extra]

    def tcpdumps(self) -> list[int]:
        return [pid for pid, argv in self.fc.exec_processes() if "tcpdump" in argv]

    def send(self, name: str, count: int, size: int = 3000) -> list[bytes]:
        """Real connections to the pod, one after the other: each sends, half-closes, reads to the end."""
        out = []
        for i in range(count):
            data = payload(f"{name}-{i:03d}", size)
            with socket.create_connection((self.pod.ip, 80), timeout=20) as s:
                s.sendall(data)
                s.shutdown(socket.SHUT_WR)
                while s.recv(65536):
                    pass
            out.append(data)
            time.sleep(0.02)
        return out


@pytest.fixture
def live(tmp_path: Path) -> Iterator[Live]:
    with contextlib.ExitStack() as stack:
        pod = stack.enter_context(PodNetns())
        server = NsRecorder(Netns(pod.name), tmp_path / "pod.json", 80, raw=True).start()
        stack.callback(_stop, server)
        fc = FakeCluster(tmp_path)
        fc.start()
        stack.callback(fc.stop)  # before the namespace goes: kills whatever a failed run left exec'd there
        fc.tap_start_delay = 0.05
        fc.add_pod("default", POD, labels={"app": "web"}, containers=[dict(c) for c in CONTAINERS], netns=pod.name)
        local = stack.enter_context(target())
        yield Live(fc, pod, local)


def _stop(server: NsRecorder) -> None:
    if server.proc is not None and server.proc.poll() is None:
        server.proc.kill()
        server.proc.wait(10)


def ephemeral(fc: FakeCluster) -> list[dict[str, Any]]:
    return list(fc.get_pod("default", POD)["spec"].get("ephemeralContainers") or [])


def test_live_target_down_at_start_adds_no_tap(tmp_path: Path) -> None:
    with FakeCluster(tmp_path) as fc:
        fc.add_pod("default", POD, containers=[dict(c) for c in CONTAINERS])
        with cli([f"pod/{POD}", "--to", f"127.0.0.1:{free_port()}", "--kubeconfig", str(fc.kubeconfig)]) as run:
            result = run.finish(30.0)
        assert result.returncode == 1
        assert_one_error_line(result, "cannot connect to", "connection refused")
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert ephemeral(fc) == []
        assert not result.tshark_pids


@contextlib.contextmanager
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(small)], check=True, timeout=10)
    try:
        yield small
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False, timeout=10)


def fill_disk_live(live: Live, out: Path) -> Finished:
    with cli(live.args("-w", str(out), "--json")) as run:
        assert run.wait_line("mirroring", 60.0), run.stderr
        # Well over 64 KiB of packets, sent until the run gives up on its own (bounded).
        deadline = time.monotonic() + 60.0
        i = 0
        while run.proc.poll() is None and time.monotonic() < deadline:
            live.send(f"fill{i}", 10, 4000)
            i += 1
        run.interrupt()  # a no-op when it already ended, as it should have
        return run.finish(30.0)


def tshark_read(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["tshark", "-n", "-r", str(path), "-T", "fields", "-e", "frame.number"],
                          capture_output=True, text=True, timeout=60, check=False)


@pytest.mark.netns
def test_live_disk_full_under_w(live: Live, tmp_path: Path) -> None:
    with tiny_disk(tmp_path) as small:
        out = small / "cap.pcapng"
        result = fill_disk_live(live, out)
        assert result.returncode == 1, result.stderr
        line = assert_one_error_line(result, "-w")
        assert "space" in line, line
        # The packets written before the disk filled up are readable.
        assert len(tshark_read(out).stdout.split()) > 10
        assert wait_for(lambda: not live.tcpdumps(), 10.0), live.fc.exec_processes()
        assert gone(result.tshark_pids)


@pytest.mark.netns
def test_live_disk_full_leaves_whole_records(live: Live, tmp_path: Path) -> None:
    with tiny_disk(tmp_path) as small:
        out = small / "cap.pcapng"
        fill_disk_live(live, out)
        check = tshark_read(out)
        assert check.returncode == 0, check.stderr


def mirror_across(live: Live, disrupt: Callable[[CliRun, int], None]) -> tuple[Finished, int]:
    """A live run that mirrors 5 connections, goes through `disrupt(run, first tcpdump's pid)` (which returns once
    the plugin says it captures again), then mirrors 5 more. Every connection arrives whole and a gap is
    counted. Returns the result and the first tcpdump's pid."""
    with cli(live.args("--json")) as run:
        assert run.wait_line("mirroring", 60.0), run.stderr
        before = live.send("before", 5)
        assert wait_for(lambda: len(live.local.records(0)) >= 5, 20.0), run.stderr
        [old] = live.tcpdumps()
        disrupt(run, old)
        after = live.send("after", 5)
        assert wait_for(lambda: len(live.local.records(0)) >= 10, 20.0), run.stderr
        run.interrupt()
        result = run.finish(60.0)
    assert_no_traceback(result)
    assert result.returncode == 0, result.stderr
    assert result.summary["stream_gaps"] >= 1
    # No connection with a hole: each one delivered is byte-exact, or a prefix that did not end with a clean FIN.
    whole, cut = assert_only_prefixes(live.local.records(), [*before, *after])
    assert sorted(whole) == sorted([*before, *after]) and not cut
    return result, old


@pytest.mark.netns
def test_live_exec_websocket_dropped_reconnects(live: Live) -> None:
    port = live.fc.url.rsplit(":", 1)[1]

    def drop_connections(run: CliRun, old: int) -> None:
        # Tear down the plugin's TCP connections to the API server (the exec WebSocket among them), as a load
        # balancer's idle cut or an API server restart would; the server side is left to notice by itself.
        subprocess.run(["ss", "-K", "dst", "127.0.0.1", "dport", "=", f":{port}"], capture_output=True,
                       timeout=10, check=True)
        assert wait_for(lambda: any(p != old for p in live.tcpdumps()), 30.0), run.stderr
        # The new tcpdump exists before it captures: send only once the plugin says it captures again.
        assert run.wait_line("capturing again", 30.0), run.stderr

    mirror_across(live, drop_connections)
    # The first tcpdump does not outlive the stream it fed: a kubelet would leave it running forever.
    assert wait_for(lambda: not live.tcpdumps(), 10.0), live.fc.exec_processes()


# ---- Ctrl-C in every phase of a live run ---------------------------------------------------------------


def black_hole_kubeconfig(fc: FakeCluster, tmp_path: Path, port: int) -> Path:
    """The cluster's kubeconfig, pointed at a server that accepts connections and never answers."""
    text = fc.kubeconfig.read_text().replace(fc.url, f"https://127.0.0.1:{port}")
    path = tmp_path / "slow-kubeconfig"
    path.write_text(text)
    return path


def assert_clean_interrupt(result: Finished, live: Live, marker: str) -> None:
    assert_no_traceback(result)
    assert result.returncode in (0, 130), result.stderr
    assert not result.error_lines(), result.stderr
    assert wait_for(lambda: not live.tcpdumps(), 10.0), live.fc.exec_processes()
    assert gone(result.tshark_pids)
    assert gone(processes_of_run("tshark", marker))


@pytest.mark.netns
@pytest.mark.parametrize("phase", ["resolving", "waiting-for-tap", "capturing"])
def test_live_ctrl_c(live: Live, tmp_path: Path, phase: str) -> None:
    sent: list[bytes] = []
    with contextlib.ExitStack() as stack:
        args = live.args("--json", "-v")
        if phase == "resolving":
            hole = stack.enter_context(target(policy=lambda head: "stall"))
            args = [*args, "--kubeconfig", str(black_hole_kubeconfig(live.fc, tmp_path, hole.port))]
        elif phase == "waiting-for-tap":
            live.fc.tap_start_delay = 60.0
        with cli(args) as run:
            if phase == "resolving":
                # Only the --to probe has connected to the local target; the API call hangs in the TLS handshake.
                assert wait_for(lambda: len(hole.received) >= 1, 30.0), run.stderr
                time.sleep(0.5)
            elif phase == "waiting-for-tap":
                assert run.wait_line("target: pod", 30.0), run.stderr
                assert wait_for(lambda: bool(ephemeral(live.fc)), 10.0), run.stderr
            else:
                assert run.wait_line("mirroring", 60.0), run.stderr
                sent = live.send("cc", 5)
                assert wait_for(lambda: len(live.local.records(0)) >= 5, 20.0), run.stderr
                # The run's tsharks are found by its marker: the check after the run can see one left behind.
                assert processes_of_run("tshark", run.marker), run.stderr
            run.interrupt()
            result = run.finish(40.0)
    assert_clean_interrupt(result, live, run.marker)
    if phase == "capturing":
        assert result.returncode == 0, result.stderr
        assert result.summary["interrupted"] is True
        assert result.connections["complete"] == 5
        whole, cut = assert_only_prefixes(live.local.records(), sent)
        assert sorted(whole) == sorted(sent) and not cut
    else:
        assert not live.tcpdumps()


@pytest.mark.netns
def test_live_second_ctrl_c_exits_130(live: Live) -> None:
    live.local.policy = stall_named
    with cli(live.args("--json")) as run:
        assert run.wait_line("mirroring", 60.0), run.stderr
        # A connection still open at Ctrl-C whose local side never reads nor closes: the end-of-run drain
        # waits for the target's close, so the run is still busy when the second Ctrl-C comes.
        held = socket.create_connection((live.pod.ip, 80), timeout=20)
        held.sendall(payload("stall-open", 2000))
        assert wait_for(lambda: any(r.end == "stalled" for r in live.local.received), 20.0), run.stderr
        run.interrupt()
        time.sleep(0.5)  # apart, or the two signals merge into one
        assert run.proc.poll() is None, run.stderr
        run.interrupt()
        result = run.finish(20.0)
        held.close()
    assert result.returncode == 130, result.stderr
    assert_no_traceback(result)



class TcpdumpLeftBehind(AssertionError):
    """A tcpdump the run started is still capturing in the pod after the run ended."""


@pytest.mark.netns
def test_live_api_server_restart_mid_capture(live: Live) -> None:
    def restart_api_server(run: CliRun, old: int) -> None:
        # Every connection to the API server is cut (the exec WebSocket among them) and connecting is refused for
        # a second; the pod's tcpdump is the kubelet's and keeps running.
        live.fc.restart(1.0)
        assert old in live.tcpdumps()
        # Reconnecting is the plugin's own doing, within its backoff: at most 0.5 + 1 + 2 + 4 + 8 s of waits.
        assert run.wait_line("capturing again", 40.0), run.stderr

    result, old = mirror_across(live, restart_api_server)
    # Neither tcpdump outlives the run, the one from before the restart included: the plugin has to signal it
    # once it can reach the API server again; a kubelet would leave it capturing forever. (Its own exception
    # class, so that a leftover tcpdump reads as exactly that, not as a broken reconnect or delivery.)
    if not wait_for(lambda: not live.tcpdumps(), 10.0):
        raise TcpdumpLeftBehind(f"first tcpdump pid {old}; still running: {live.fc.exec_processes()}; "
                                f"warnings: {result.summary.get('warnings')}")
