"""The tshark dissector, with real tshark on real loopback captures and on synthetic captures."""

from __future__ import annotations

import io
import os
import selectors
import socket
import stat
import time
from pathlib import Path

import pytest

from kubectl_mirror.dissect import Dissector, TsharkInfo, find_tshark, tcp_payload
from kubectl_mirror.errors import InputError, ToolError
from kubectl_mirror.model import ACK, PSH, SYN, Endpoint, Segment
from kubectl_mirror.pcap import PcapReader, PcapWriter, classic_header, classic_pcap, classic_record
from tests.dissect_helpers import (
    client_bytes,
    epb,
    ethernet,
    idb,
    ipv4,
    listener,
    loopback_traffic,
    null,
    shb,
    sll,
    sll2,
    tcp_ip,
    tcpdump,
)


@pytest.fixture(scope="module")
def tshark() -> TsharkInfo:
    return find_tshark(None)


def dissect(data: bytes | Path, tshark: TsharkInfo, **kwargs: object) -> tuple[list[Segment], Dissector]:
    stream = io.BytesIO(data) if isinstance(data, bytes) else open(data, "rb")  # noqa: SIM115
    with stream, Dissector(stream, tshark, **kwargs) as d:  # type: ignore[arg-type]
        return list(d.iter_segments()), d


def chunks_for(tag: bytes, count: int) -> list[bytes]:
    # varied sizes, including ones larger than the loopback MSS would allow in one segment on a real NIC
    return [tag + b"%05d:" % i + bytes([65 + i % 26]) * (1 + (i * 37) % 1500) for i in range(count)]


# ---- real captures --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "iface", "extra", "linktype"),
    [
        ("127.0.0.1", "lo", [], 1),
        ("::1", "lo", [], 1),
        ("127.0.0.1", "any", [], 276),
        ("::1", "any", ["-y", "LINUX_SLL"], 113),
    ],
    ids=["ipv4-lo", "ipv6-lo", "any-sll2", "any-sll"],
)
def test_real_loopback_capture(tmp_path: Path, tshark: TsharkInfo, host: str, iface: str, extra: list[str],
                               linktype: int) -> None:
    path = tmp_path / "cap.pcap"
    chunks = chunks_for(b"c", 40)
    srv, port = listener(host)
    with srv, tcpdump(path, iface, f"tcp port {port}", extra=extra) as cap:
        loopback_traffic(srv, chunks, connections=2)
    assert "0 packets dropped by kernel" in cap.stderr_lines, "tcpdump itself lost packets: rerun on a quieter box"
    with open(path, "rb") as f:
        assert next(iter(PcapReader(f))).linktype == linktype
    segments, d = dissect(path, tshark)
    flows = client_bytes(segments, port)
    assert list(flows.values()) == [b"".join(chunks)] * 2
    assert {seg.dst for seg in segments if seg.dst.port == port} == {Endpoint(host, port)}
    assert d.stats.tcp_segments == len(segments) == d.stats.packets
    assert d.stats.bytes_captured == path.stat().st_size - 24 - 16 * d.stats.packets
    assert [s.frame for s in segments] == list(range(1, len(segments) + 1))


def test_handover_gives_the_same_segments(tmp_path: Path, tshark: TsharkInfo) -> None:
    path = tmp_path / "mixed.pcap"
    srv, port = listener("127.0.0.1")
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    uport = udp.getsockname()[1]
    with srv, udp, tcpdump(path, "lo", f"tcp port {port} or udp port {uport}"):
        for i in range(15):  # non-TCP records between TCP ones: frame numbers must stay aligned
            udp.sendto(b"u%d" % i, ("127.0.0.1", uport))
        loopback_traffic(srv, chunks_for(b"h", 60), connections=1)
        for i in range(5):
            udp.sendto(b"v%d" % i, ("127.0.0.1", uport))
    whole, d1 = dissect(path, tshark)
    assert len(whole) >= 120
    handed, d7 = dissect(path, tshark, handover_every=7)
    assert handed == whole
    assert d7.stats.tshark_restarts == (d7.stats.packets - 1) // 7
    assert d7.stats.non_tcp == d1.stats.non_tcp == 20
    assert d7.stats.packets == d1.stats.packets == len(whole) + 20


def test_memory_driven_handover_gives_the_same_segments(tshark: TsharkInfo) -> None:
    # 10,000 segments of one connection; a 1-byte memory budget makes every RSS check (each 4096 records)
    # hand over, so the result must not depend on where tshark was replaced.
    packets = [(1.0 + i / 1000, tcp_ip(V4[0], V4[1], 40000, 8080, 1000 + 4 * i, 77, ACK | PSH, b"%04d" % (i % 10000)))
               for i in range(10_000)]
    data = classic_pcap(101, packets)
    whole, d0 = dissect(data, tshark)
    handed, d1 = dissect(data, tshark, handover_rss=1)
    assert d0.stats.tshark_restarts == 0
    assert d1.stats.tshark_restarts >= 2
    assert handed == whole and len(whole) == 10_000


def test_tee_writes_an_identical_private_copy(tmp_path: Path, tshark: TsharkInfo) -> None:
    data = classic_pcap(101, [(float(i), tcp_ip("10.0.0.1", "10.0.0.2", 5, 80, i, 0, PSH, b"%d" % i))
                              for i in range(20)])
    out = tmp_path / "tee.pcap"
    with PcapWriter(out) as tee:
        segments, _ = dissect(data, tshark, tee=tee, handover_every=6)
    assert len(segments) == 20
    assert out.read_bytes() == data
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o600


# ---- synthetic link types -------------------------------------------------------------------------------------

V4 = ("10.1.2.3", "10.9.8.7")
V6 = ("fd00::1", "fd00::2")


def frames(addrs: tuple[str, str], wrap: object) -> tuple[list[tuple[float, bytes]], list[bytes]]:
    payloads = [b"", b"GET / HTTP/1.1\r\n", b"x", b"y" * 1400]
    out = []
    for i, p in enumerate(payloads):
        pkt = tcp_ip(addrs[0], addrs[1], 40000, 8080, 1000 + i, 77, (SYN if i == 0 else ACK | PSH), p)
        out.append((1.0 + i, wrap(pkt)))  # type: ignore[operator]
    return out, payloads


@pytest.mark.parametrize(
    ("linktype", "wrap"),
    [
        (101, lambda p: p),
        (12, lambda p: p),
        (14, lambda p: p),
        (1, lambda p: ethernet(p)),
        (1, lambda p: ethernet(p, vlans=[42])),
        (1, lambda p: ethernet(p, vlans=[7, 42])),
        (113, sll),
        (276, sll2),
        (0, null),
        (108, lambda p: b"\0\0\0\x02" + p if p[0] >> 4 == 4 else b"\0\0\0\x18" + p),
    ],
    ids=["raw101", "raw12", "raw14", "eth", "eth-vlan", "eth-qinq", "sll", "sll2", "null", "loop"],
)
@pytest.mark.parametrize("addrs", [V4, V6], ids=["v4", "v6"])
def test_synthetic_link_types(tshark: TsharkInfo, linktype: int, wrap: object, addrs: tuple[str, str]) -> None:
    packets, payloads = frames(addrs, wrap)
    segments, _ = dissect(classic_pcap(linktype, packets), tshark)
    assert [s.payload for s in segments] == payloads  # Ethernet padding (0xee) never leaks in
    assert all(s.whole for s in segments)
    assert {(s.src, s.dst) for s in segments} == {(Endpoint(addrs[0], 40000), Endpoint(addrs[1], 8080))}
    assert [(s.seq, s.ack, s.flags, s.ts, s.frame) for s in segments] == [
        (1000, 77, SYN, 1.0, 1), (1001, 77, ACK | PSH, 2.0, 2), (1002, 77, ACK | PSH, 3.0, 3),
        (1003, 77, ACK | PSH, 4.0, 4),
    ]


def test_snaplen_cut_frames_are_not_whole(tshark: TsharkInfo) -> None:
    full = ethernet(tcp_ip(*V4, 40000, 8080, 1, 0, ACK, b"z" * 300))
    small = ethernet(tcp_ip(*V4, 40000, 8080, 301, 0, ACK, b"ok"))  # padded to 60 bytes
    data = (classic_header(1) + classic_record(1.0, full[:96], orig_len=len(full))
            + classic_record(2.0, small[:56], orig_len=60)  # only padding was cut: still whole
            + classic_record(3.0, full))
    segments, _ = dissect(data, tshark)
    assert [(s.whole, s.payload) for s in segments] == [(False, b""), (True, b"ok"), (True, b"z" * 300)]


def test_icmp_quoted_tcp_is_not_a_segment(tshark: TsharkInfo) -> None:
    inner = tcp_ip(*V4, 40000, 8080, 5, 0, ACK, b"")[:28]
    icmp = ipv4(V4[1], V4[0], b"\x03\x03\x00\x00\x00\x00\x00\x00" + inner, proto=1)
    data = classic_pcap(101, [(1.0, icmp), (2.0, tcp_ip(*V4, 40000, 8080, 5, 0, ACK, b"a"))])
    segments, d = dissect(data, tshark)
    assert [s.payload for s in segments] == [b"a"]
    assert (d.stats.non_tcp, d.stats.tcp_segments, d.stats.packets) == (1, 1, 2)


def test_pcapng_two_interfaces_and_nanoseconds(tshark: TsharkInfo) -> None:
    a = tcp_ip(*V4, 40000, 8080, 1, 0, ACK, b"first")
    b = tcp_ip(*V6, 40001, 8080, 9, 0, ACK, b"second")
    data = (shb() + idb(1) + idb(101, tsresol=9) + epb(0, 1_000_001, ethernet(a))
            + epb(1, 2_000_000_123, b) + epb(0, 3_000_000, ethernet(a)))
    segments, _ = dissect(data, tshark, handover_every=2)
    assert [(s.payload, s.src.host) for s in segments] == [(b"first", V4[0]), (b"second", V6[0]), (b"first", V4[0])]
    assert segments[1].ts == pytest.approx(2.000000123, abs=1e-9)


def test_capture_without_packets(tshark: TsharkInfo) -> None:
    for data in (classic_header(1), shb() + idb(1)):
        segments, d = dissect(data, tshark)
        assert segments == []
        assert d.stats.packets == 0


def test_nanosecond_pcap(tshark: TsharkInfo) -> None:
    data = classic_pcap(101, [(1.000000007, tcp_ip(*V4, 1, 2, 3, 4, ACK, b"n"))], nanosecond=True)
    (seg,), _ = dissect(data, tshark)
    assert seg.ts == pytest.approx(1.000000007, abs=1e-9)
    assert seg.payload == b"n"


def test_payload_of_ip_fragment_is_not_whole() -> None:
    frag = ipv4(*V4, b"\0" * 28, frag=0x2000)  # more fragments follow
    assert tcp_payload(101, frag, 8) is None
    assert tcp_payload(101, ipv4(*V4, b"\0" * 28), 8) == b"\0" * 8


# ---- damaged input --------------------------------------------------------------------------------------------


def test_truncated_capture_keeps_everything_before(tshark: TsharkInfo) -> None:
    packets = [(float(i), tcp_ip(*V4, 40000, 8080, i, 0, ACK, b"%03d" % i)) for i in range(30)]
    data = classic_pcap(101, packets)[:-10]
    with io.BytesIO(data) as f, Dissector(f, tshark, handover_every=8) as d:
        got: list[bytes] = []
        with pytest.raises(InputError, match="middle of packet 30") as exc:
            for seg in d.iter_segments():
                got.append(seg.payload)
    assert got == [b"%03d" % i for i in range(29)]
    assert "\n" not in str(exc.value)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty"),
        (b"hello, this is text\n", "not a pcap"),
        (classic_header(1) + b"\0" * 8 + b"\xff\xff\xff\x7f" + b"\0" * 40, "corrupt capture"),
    ],
    ids=["empty", "text", "corrupt-length"],
)
def test_bad_input(tshark: TsharkInfo, data: bytes, message: str) -> None:
    with pytest.raises(InputError, match=message):
        dissect(data, tshark)


def test_tshark_missing() -> None:
    hint = r"tshark not found at /nonexistent: install it, version 3\.4 or newer .*--tshark PATH"
    with pytest.raises(ToolError, match=hint):
        find_tshark("/nonexistent")


def fake_tshark(tmp_path: Path, version: str, body: str) -> str:
    path = tmp_path / "tshark"
    path.write_text(f"#!/bin/sh\nif [ \"$1\" = --version ]; then echo 'TShark (Wireshark) {version}'; exit 0; fi\n"
                    f"{body}\n")
    path.chmod(0o755)
    return str(path)


def test_tshark_too_old(tmp_path: Path) -> None:
    with pytest.raises(ToolError, match=r"tshark 3\.2\.5 is too old: need 3\.4"):
        find_tshark(fake_tshark(tmp_path, "3.2.5", "exit 0"))


def test_tshark_version_is_remembered_until_the_binary_changes(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    calls = tmp_path / "calls"
    exe = tmp_path / "tshark"
    exe.write_text(f"#!/bin/sh\necho x >> {calls}\necho 'TShark (Wireshark) 4.2.5.'\n")
    exe.chmod(0o755)
    assert find_tshark(str(exe)).version == (4, 2, 5)
    assert find_tshark(str(exe)).version == (4, 2, 5)
    assert calls.read_text().count("x") == 1  # the second answer came from the cache
    exe.write_text(f"#!/bin/sh\necho x >> {calls}\necho 'TShark (Wireshark) 3.2.1 (an older build).'\n")
    with pytest.raises(ToolError, match=r"3\.2\.1 is too old"):
        find_tshark(str(exe))
    assert calls.read_text().count("x") == 2


def test_tshark_dying_is_reported(tmp_path: Path) -> None:
    info = find_tshark(fake_tshark(tmp_path, "4.0.1", "cat >/dev/null; echo 'tshark: boom in dissector' >&2; exit 3"))
    data = classic_pcap(101, [(1.0, tcp_ip(*V4, 1, 2, 3, 4, ACK, b"n"))])
    with pytest.raises(ToolError, match=r"tshark exited unexpectedly \(code 3\): tshark: boom in dissector"):
        dissect(data, info)


# ---- live feed ------------------------------------------------------------------------------------------------


def test_live_pipe_each_segment_before_the_next_record(tshark: TsharkInfo) -> None:
    rfd, wfd = os.pipe()
    source = os.fdopen(rfd, "rb")
    writer = os.fdopen(wfd, "wb", buffering=0)
    d = Dissector(source, tshark, live=True, handover_every=4)
    try:
        d.start()
        writer.write(classic_header(101))
        with selectors.DefaultSelector() as sel:
            for i in range(10):
                writer.write(classic_record(float(i), tcp_ip(*V4, 40000, 8080, i, 0, ACK, b"live%d" % i)))
                got: list[Segment] = []
                deadline = time.monotonic() + 20  # bounded wait, not a timing assertion
                while not got and time.monotonic() < deadline:
                    fd = d.fileno()
                    sel.register(fd, selectors.EVENT_READ)
                    sel.select(timeout=0.5)
                    sel.unregister(fd)
                    got = d.read_segments()
                    d.raise_if_failed()
                assert [s.payload for s in got] == [b"live%d" % i]
                assert got[0].frame == i + 1
        assert not d.done
        writer.close()
        deadline = time.monotonic() + 20
        while not d.done and time.monotonic() < deadline:
            assert d.read_segments() == []
            time.sleep(0.05)
        assert d.done
        d.raise_if_failed()
        assert d.stats.tshark_restarts == 2
    finally:
        if not writer.closed:
            writer.close()
        d.close()
        d.close()
        source.close()


def test_close_while_the_live_source_is_silent(tshark: TsharkInfo) -> None:
    rfd, wfd = os.pipe()
    with os.fdopen(rfd, "rb") as source, os.fdopen(wfd, "wb") as writer:
        writer.write(classic_header(101))
        writer.flush()
        d = Dissector(source, tshark, live=True)
        d.start()
        assert d.read_segments() == []  # nothing there: returns at once instead of waiting
        procs = [inst.proc for inst in d._instances]
        d.close()
        assert all(p.poll() is not None for p in procs)
        assert not d.done


def test_read_segments_respects_max_items(tshark: TsharkInfo) -> None:
    data = classic_pcap(101, [(float(i), tcp_ip(*V4, 40000, 8080, i, 0, ACK, b"%02d" % i)) for i in range(30)])
    with io.BytesIO(data) as f, Dissector(f, tshark, handover_every=11) as d, selectors.DefaultSelector() as sel:
        d.start()
        got: list[Segment] = []
        deadline = time.monotonic() + 30
        while not d.done and time.monotonic() < deadline:
            batch = d.read_segments(max_items=4)
            assert len(batch) <= 4
            got += batch
            if not batch and not d.done:
                fd = d.fileno()
                sel.register(fd, selectors.EVENT_READ)
                sel.select(timeout=0.5)
                sel.unregister(fd)
        d.raise_if_failed()
    assert [s.payload for s in got] == [b"%02d" % i for i in range(30)]
    assert (d.stats.tcp_segments, d.stats.tshark_restarts) == (30, 2)
