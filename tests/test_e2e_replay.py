"""Acceptance: real traffic captured with tcpdump in a "pod" namespace, replayed by the real CLI.

Ground truth is what the real server's application received. Every replayed connection must carry exactly
those bytes (connections matched by content), and the JSON summary must count what happened.
"""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from kubectl_mirror.pcap import PcapReader, classic_pcap
from tests.dissect_helpers import wlan, wlan_fragments
from tests.netlab import traffic
from tests.netlab.capture import (
    LINKTYPE_EN10MB,
    LINKTYPE_LINUX_SLL2,
    LINKTYPE_RAW,
    Capture,
    pcap_linktype,
    tshark_count,
)
from tests.netlab.lab import NsRecorder, ReplayResult, contents, replay, run_cli
from tests.netlab.netns import Link, netns, veth_lab
from tests.netlab.recorder import ConnRecord
from tests.netlab.tunlink import Impairment, tun_between

PORT = 8080
Drive = Callable[[Link], None]


@pytest.fixture
def veth() -> Iterator[Link]:
    with veth_lab() as link:
        yield link


def capture(link: Link, pcap: Path, drive: Drive, iface: str | None = None, attempts: int = 3,
            extra: list[str] | None = None) -> list[ConnRecord]:
    """Run `drive` against a recorder in the server namespace while tcpdump captures there.

    The replay must be compared with a capture that holds everything the server received; when tcpdump
    itself reports lost packets (an overloaded machine), that capture proves nothing, so the scenario is
    run again, a bounded number of times.
    """
    for _ in range(attempts):
        server = NsRecorder(link.server, pcap.with_suffix(".server.json"), PORT).start()
        try:
            with Capture(link.server, iface or link.server_if, pcap, extra=extra) as cap:
                drive(link)
        finally:
            records = server.stop()
        assert records, "the scenario produced no traffic"
        if cap.dropped() == 0:
            return records
    pytest.fail(f"tcpdump dropped packets in {attempts} captures in a row: {cap.stderr[-3:]}")


def assert_replayed(result: ReplayResult, truth: list[ConnRecord]) -> None:
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert contents(result.records) == contents(truth)
    assert all(r.end == "eof" for r in result.records), [r.end for r in result.records]
    conns = result.connections
    assert conns["seen"] == len(truth)
    assert conns["complete"] == len(truth)
    for key in ("incomplete", "dropped", "failed", "skipped"):
        assert conns[key] == 0, (key, conns)
    assert result.summary["bytes_delivered"] == sum(len(r.data) for r in truth)
    assert result.summary["packets"] > 0


# Every byte-exact replay runs with one tshark and with records dealt among 2 and 4 (--dissectors).
SHARDS = (1, 2, 4)


def assert_replayed_each(pcap: Path, truth: list[ConnRecord], extra: list[str] | None = None,
                         **kwargs: object) -> list[ReplayResult]:
    """The capture replayed with 1, 2 and 4 dissectors: each run byte-exact on its own."""
    results = []
    for n in SHARDS:
        result = replay(pcap, [*(extra or []), "--dissectors", str(n)], **kwargs)  # type: ignore[arg-type]
        assert_replayed(result, truth)
        results.append(result)
    return results


def assert_one_line_error(proc: subprocess.CompletedProcess[str] | ReplayResult) -> None:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert lines and lines[-1].startswith("error:"), proc.stderr
    assert len(lines) == 1, proc.stderr


def keepalive_and_raw(host: str, tag: str) -> Drive:
    def drive(link: Link) -> None:
        base = f"http://{traffic.url_host(host)}:{PORT}"
        out = traffic.curl(link.client, [f"{base}/", f"{base}/api/items?page=2", f"{base}/static/app.js"])
        assert out.count("ok GET") == 3
        traffic.raw_conns(link.client, host, PORT, 3, 5000, tag=tag)

    return drive


@pytest.mark.netns
def test_curl_keepalive(veth: Link, tmp_path: Path) -> None:
    pcap = tmp_path / "keepalive.pcap"
    base = f"http://{veth.server_ip4}:{PORT}"
    urls = [f"{base}/r{i}?q={'x' * i}" for i in range(6)]

    def drive(link: Link) -> None:
        traffic.curl(link.client, urls)

    truth = capture(veth, pcap, drive)
    assert len(truth) == 1 and len(truth[0].requests) == 6
    for result in assert_replayed_each(pcap, truth, expect_conns=1):
        assert result.records[0].requests == truth[0].requests


# VLAN tags: this kernel has no 802.1Q devices; test_dissect re-tags real frames instead.
LINK_KINDS = ["veth-en10mb", "any-sll2", "any-sll", "tun-raw", "tun-rawip4"]


@pytest.mark.netns
@pytest.mark.parametrize("kind", LINK_KINDS)
def test_link_types(kind: str, tmp_path: Path) -> None:
    pcap = tmp_path / f"{kind}.pcap"
    if kind.startswith("tun-"):
        with netns() as c, netns() as s, tun_between(c, s) as tl:
            truth = capture(tl.link, pcap, keepalive_and_raw(tl.link.server_ip4, kind))
        if kind == "tun-rawip4":  # every packet is IPv4: the header can say so (link type 228)
            raw, pcap = pcap, tmp_path / "rawip4.pcap"
            subprocess.run(["editcap", "-F", "pcap", "-T", "rawip4", str(raw), str(pcap)], check=True, timeout=60)
    else:
        with veth_lab() as link:
            iface = "any" if kind.startswith("any-") else None
            extra = ["-y", "LINUX_SLL"] if kind == "any-sll" else []
            truth = capture(link, pcap, keepalive_and_raw(link.server_ip4, kind), iface=iface, extra=extra)
    expected = {"veth-en10mb": LINKTYPE_EN10MB, "any-sll2": LINKTYPE_LINUX_SLL2, "any-sll": 113,
                "tun-raw": LINKTYPE_RAW, "tun-rawip4": 228}[kind]
    assert pcap_linktype(pcap) == expected
    assert_replayed_each(pcap, truth, expect_conns=len(truth))


@pytest.mark.netns
def test_200_concurrent_short_connections(veth: Link, tmp_path: Path) -> None:
    pcap = tmp_path / "many.pcap"

    def drive(link: Link) -> None:
        traffic.raw_conns(link.client, link.server_ip4, PORT, 200, 700, tag="many")

    truth = capture(veth, pcap, drive)
    assert contents(truth) == sorted(traffic.payload("many", i, 700) for i in range(200))
    assert_replayed_each(pcap, truth, expect_conns=200, http=False)


@pytest.mark.netns
def test_multi_megabyte_upload(veth: Link, tmp_path: Path) -> None:
    pcap = tmp_path / "upload.pcap"
    body = tmp_path / "body.bin"
    body.write_bytes(os.urandom(8 << 20))

    def drive(link: Link) -> None:
        traffic.curl_upload(link.client, f"http://{link.server_ip4}:{PORT}/upload", body)

    truth = capture(veth, pcap, drive)
    assert len(truth) == 1 and len(truth[0].data) > 8 << 20
    for result in assert_replayed_each(pcap, truth, expect_conns=1):
        assert result.records[0].requests == ["PUT /upload"]


@pytest.mark.netns
def test_ipv6(veth: Link, tmp_path: Path) -> None:
    pcap = tmp_path / "v6.pcap"
    truth = capture(veth, pcap, keepalive_and_raw(veth.server_ip6, "v6"))
    assert all(r.client.startswith("[fd00:") for r in truth)
    assert_replayed_each(pcap, truth, expect_conns=len(truth))


@pytest.mark.netns
def test_impaired_link_loss_reorder_duplication(tmp_path: Path) -> None:
    pcap = tmp_path / "impaired.pcap"
    imp = Impairment(loss=0.03, dup=0.03, reorder=0.04, delay_ms=1.0, seed=7)

    def drive(link: Link) -> None:
        traffic.raw_conns(link.client, link.server_ip4, PORT, 12, 100_000, tag="imp", chunks=4, pause=0.01)
        keepalive_and_raw(link.server_ip6, "imp6")(link)

    with netns() as c, netns() as s, tun_between(c, s, imp) as tl:
        truth = capture(tl.link, pcap, drive)
        stats = tl.stop()
    assert stats.lost > 0 and stats.duplicated > 0 and stats.reordered > 0
    # Not vacuous: the capture really holds what the replay engine must clean up.
    assert tshark_count(pcap, "tcp.analysis.retransmission || tcp.analysis.fast_retransmission") > 0
    assert tshark_count(pcap, "tcp.analysis.out_of_order || tcp.analysis.lost_segment") > 0
    assert_replayed_each(pcap, truth, expect_conns=len(truth))


@pytest.mark.netns
def test_capture_started_mid_connection(veth: Link, tmp_path: Path) -> None:
    pcap = tmp_path / "mid.pcap"
    server = NsRecorder(veth.server, tmp_path / "mid.server.json", PORT).start()
    clients = traffic.TwoPhase(veth.client, veth.server_ip4, PORT, 4, 6000, tag="mid")
    try:
        clients.wait_phase1()
        with Capture(veth.server, veth.server_if, pcap):
            clients.finish()
            traffic.raw_conns(veth.client, veth.server_ip4, PORT, 2, 3000, tag="fresh")
    finally:
        clients.kill()
        truth = server.stop()
    fresh = sorted(bytes(r.data) for r in truth if bytes(r.data).startswith(b"conn-fresh-"))
    # What the capture could see of a joined connection: the server's bytes from the first late byte on.
    mid = sorted(bytes(r.data)[bytes(r.data).index(traffic.LATE):] for r in truth if traffic.LATE in r.data)
    assert len(fresh) == 2 and len(mid) == 4

    for n in SHARDS:
        shards = ["--dissectors", str(n)]
        result = replay(pcap, ["--port", str(PORT), *shards], expect_conns=6, http=False)
        assert result.returncode == 0, result.stderr
        assert contents(result.records) == sorted(fresh + mid)
        conns = result.connections
        assert (conns["seen"], conns["partial"], conns["skipped"], conns["incomplete"]) == (6, 4, 0, 0), conns

        skipped = replay(pcap, ["--port", str(PORT), "--skip-partial", *shards], expect_conns=2, http=False)
        assert skipped.returncode == 0, skipped.stderr
        assert contents(skipped.records) == fresh
        conns = skipped.connections
        assert (conns["seen"], conns["partial"], conns["skipped"], conns["complete"]) == (6, 4, 4, 2), conns


def _data_frames(pcap: Path) -> list[tuple[int, int, int, int]]:
    """(frame, stream, relative seq, length) of every client->server data segment."""
    out = subprocess.run(["tshark", "-n", "-r", str(pcap), "-Y", f"tcp.dstport=={PORT} && tcp.len>0", "-T", "fields",
                          "-e", "frame.number", "-e", "tcp.stream", "-e", "tcp.seq", "-e", "tcp.len"],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    return [tuple(int(x) for x in line.split("\t")) for line in out.splitlines() if line.strip()]  # type: ignore[misc]


@pytest.mark.netns
def test_segment_removed_from_capture_aborts_that_flow(veth: Link, tmp_path: Path) -> None:
    pcap, holed = tmp_path / "whole.pcap", tmp_path / "holed.pcap"
    truth = capture(veth, pcap, lambda link: traffic.raw_conns(
        link.client, link.server_ip4, PORT, 4, 20_000, tag="hole", chunks=5, pause=0.02, sequential=True))
    frames = _data_frames(pcap)
    victim_stream = 1
    seg = [f for f in frames if f[1] == victim_stream]
    assert len(seg) >= 3, frames
    frame, _, seq, _ = seg[len(seg) // 2]
    subprocess.run(["editcap", str(pcap), str(holed), str(frame)], capture_output=True, timeout=60, check=True)
    hole_at = seq - 1  # tshark's relative seq counts the SYN as 1

    for n in SHARDS:
        result = replay(holed, ["--dissectors", str(n)], expect_conns=4, http=False)
        assert "Traceback" not in result.stderr
        conns = result.connections
        assert (conns["seen"], conns["complete"], conns["incomplete"]) == (4, 3, 1), conns
        originals = {bytes(r.data) for r in truth}
        reset = [r for r in result.records if r.end == "reset"]
        clean = [r for r in result.records if r.end == "eof"]
        assert len(reset) == 1 and len(clean) == 3, [(r.end, len(r.data)) for r in result.records]
        assert {bytes(r.data) for r in clean} <= originals
        got = bytes(reset[0].data)
        assert len(got) <= hole_at, "bytes after the hole reached the target"
        assert any(o.startswith(got) and len(o) > hole_at for o in originals - {bytes(r.data) for r in clean})


# ---- bad input through the CLI ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_pcap(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[ConnRecord]]:
    if os.geteuid() != 0:
        pytest.skip("needs root for network namespaces")
    pcap = tmp_path_factory.mktemp("small") / "small.pcap"
    with veth_lab() as link:
        truth = capture(link, pcap, lambda lk: traffic.raw_conns(
            lk.client, lk.server_ip4, PORT, 8, 6000, tag="seq", sequential=True))
    return pcap, truth


@pytest.mark.netns
@pytest.mark.parametrize(("kind", "fmt", "stdin"), [
    ("gzip", "pcap", False), ("gzip", "pcapng", True), ("zstd", "pcapng", False), ("zstd", "pcap", True),
    ("lz4", "pcap", False), ("lz4", "pcapng", True),
])
def test_compressed_capture_replays_byte_exact(small_pcap: tuple[Path, list[ConnRecord]], tmp_path: Path, kind: str,
                                               fmt: str, stdin: bool) -> None:
    """What tshark opens compressed, replay opens too, from a file or from stdin."""
    pcap, truth = small_pcap
    source = pcap
    if fmt == "pcapng":
        source = tmp_path / "small.pcapng"
        subprocess.run(["editcap", "-F", "pcapng", str(pcap), str(source)], check=True, timeout=60)
    packed = tmp_path / f"small.{fmt}.{kind}"
    with open(packed, "wb") as out:
        subprocess.run([kind, "-c", str(source)], stdout=out, check=True, timeout=60)
    assert subprocess.run(["tshark", "-r", str(packed), "-c", "1"], capture_output=True, timeout=60).returncode == 0
    result = replay(packed, ["--dissectors", "2"], expect_conns=len(truth), http=False, stdin=stdin)
    assert_replayed(result, truth)
    with open(source, "rb") as f:
        assert result.summary["packets"] == len(list(PcapReader(f)))


@pytest.mark.netns
def test_tcp_the_reader_cannot_reach_is_a_warning_with_its_count(small_pcap: tuple[Path, list[ConnRecord]],
                                                                   tmp_path: Path) -> None:
    """802.11 fragments (the real capture's IP packets re-framed): tshark reports those segments on frames that do
    not hold their TCP header. The flows they belong to are incomplete, and the run says why, once."""
    pcap, truth = small_pcap
    with open(pcap, "rb") as f:
        records = list(PcapReader(f))
    frames: list[tuple[float, bytes]] = []
    victims = 0
    for seq, rec in enumerate(records):
        packet = rec.data[14:]
        if len(packet) > 1000 and victims < 3:
            victims += 1
            frames += [(rec.ts, frame) for frame in wlan_fragments(packet, seq, 80)]
        else:
            frames.append((rec.ts, wlan(packet, seq)))
    wifi = tmp_path / "wifi.pcap"
    wifi.write_bytes(classic_pcap(105, frames))
    result = replay(wifi, expect_conns=len(truth), http=False)
    assert result.returncode == 0, result.stderr
    assert result.summary["warnings"] == [f"{victims} frames: link type 105 (IEEE802_11) not understood (their TCP "
                                          f"payload could not be found: their connections are incomplete)"]
    conns = result.connections
    assert conns["incomplete"] >= 1 and conns["complete"] + conns["incomplete"] == len(truth), conns
    originals = {bytes(r.data) for r in truth}
    assert all(any(o.startswith(bytes(r.data)) for o in originals) for r in result.records), "nothing invented"
    assert result.summary["error"] is None and result.summary["exit_code"] == 0


def test_link_type_nobody_reads_is_one_error_also_in_json(tmp_path: Path) -> None:
    odd = tmp_path / "odd.pcap"
    odd.write_bytes(classic_pcap(999, [(1.0, b"\x45" + bytes(59))]))
    result = replay(odd)
    assert_one_line_error(result)
    assert "link type 999 is not one kubectl-mirror or tshark" in result.stderr
    assert result.summary["error"] == result.stderr.strip().removeprefix("error: ")
    assert result.summary["exit_code"] == result.returncode == 1


def test_empty_file(tmp_path: Path) -> None:
    empty = tmp_path / "empty.pcap"
    empty.write_bytes(b"")
    result = replay(empty)
    assert_one_line_error(result)
    assert result.records == []


def test_text_file_is_not_a_capture(tmp_path: Path) -> None:
    text = tmp_path / "notes.pcap"
    text.write_text("this is not a capture\n" * 20)
    result = replay(text)
    assert_one_line_error(result)
    assert result.records == []


@pytest.mark.netns
def test_truncated_capture_replays_the_good_part(small_pcap: tuple[Path, list[ConnRecord]], tmp_path: Path) -> None:
    pcap, truth = small_pcap
    data = pcap.read_bytes()
    cut = tmp_path / "cut.pcap"
    cut.write_bytes(data[: len(data) * 2 // 3])
    check = subprocess.run(["tshark", "-n", "-r", str(cut)], capture_output=True, text=True, timeout=60, check=False)
    assert "cut short in the middle of a packet" in check.stderr, "the cut must land inside a packet"

    result = replay(cut, http=False)
    assert_one_line_error(result)
    # -o json carries the error and the exit code, beside what was replayed before it
    assert result.summary["error"] == result.stderr.strip().removeprefix("error: ")
    assert result.summary["exit_code"] == result.returncode == 1
    assert result.summary["connections"]["seen"] >= 3
    originals = {bytes(r.data) for r in truth}
    delivered = [bytes(r.data) for r in result.records]
    assert sum(1 for d in delivered if d in originals) >= 3, "connections before the cut must arrive whole"
    assert all(any(o.startswith(d) for o in originals) for d in delivered), "nothing invented, no holes"


@pytest.mark.netns
def test_unreachable_target(small_pcap: tuple[Path, list[ConnRecord]]) -> None:
    pcap, _ = small_pcap
    with socket.socket() as s:  # a port nobody listens on: bound, never listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        proc = run_cli(["replay", str(pcap), "--to", f"127.0.0.1:{port}", "--json"], timeout=60)
    assert_one_line_error(proc)
    assert proc.stdout == ""


def test_port_out_of_range_is_a_usage_error(tmp_path: Path) -> None:
    empty = tmp_path / "x.pcap"
    empty.write_bytes(b"")
    proc = run_cli(["replay", str(empty), "--to", "127.0.0.1:9", "--port", "70000"], timeout=60)
    assert proc.returncode == 2
    assert_one_line_error(proc)
