"""The tshark dissector, with real tshark on real loopback captures and on synthetic captures."""

from __future__ import annotations

import io
import os
import selectors
import socket
import stat
import struct
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kubectl_mirror.dissect import Dissector, TsharkInfo, find_tshark, locate_payload, tcp_payload
from kubectl_mirror.errors import InputError, ToolError
from kubectl_mirror.model import ACK, PSH, SYN, Endpoint, Segment
from kubectl_mirror.pcap import PcapReader, PcapWriter, classic_header, classic_pcap, classic_record
from kubectl_mirror.shard import deal
from tests.dissect_helpers import (
    client_bytes,
    epb,
    ethernet,
    ethernet_mpls,
    ethernet_pppoe,
    idb,
    ipv4,
    listener,
    loop,
    loopback_traffic,
    null,
    ppp,
    shb,
    sll,
    sll2,
    tcp_ip,
    tcpdump,
    wlan,
    wlan_fragments,
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
        (108, loop),
        (228, lambda p: p),
        (229, lambda p: p),
        # no fast path: the payload is found from what tshark says (dissect.locate_payload)
        (105, wlan),
        (9, ppp),
        (1, ethernet_mpls),
        (1, ethernet_pppoe),
    ],
    ids=["raw101", "raw12", "raw14", "eth", "eth-vlan", "eth-qinq", "sll", "sll2", "null", "loop", "ipv4", "ipv6",
         "wlan", "ppp", "eth-mpls", "eth-pppoe"],
)
@pytest.mark.parametrize("addrs", [V4, V6], ids=["v4", "v6"])
def test_synthetic_link_types(tshark: TsharkInfo, linktype: int, wrap: object, addrs: tuple[str, str]) -> None:
    if linktype == 228 + (addrs == V4):
        pytest.skip("raw IPv4 carries IPv4 only, raw IPv6 IPv6 only")
    packets, payloads = frames(addrs, wrap)
    segments, d = dissect(classic_pcap(linktype, packets), tshark)
    assert d.stats.warnings() == []
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


# ---- link types from real captures: tcpdump's own, and what editcap (or a re-wrap) makes of them ----------------


@pytest.fixture(scope="module")
def lo_captures(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, int, list[bytes]]]:
    """A real loopback capture (Ethernet) per IP version: (file, server port, what the clients sent)."""
    tmp = tmp_path_factory.mktemp("linktypes")
    out = {}
    for version, host in (("v4", "127.0.0.1"), ("v6", "::1")):
        path = tmp / f"lo-{version}.pcap"
        chunks = chunks_for(version.encode(), 30)
        srv, port = listener(host)
        with srv, tcpdump(path, "lo", f"tcp port {port}") as cap:
            loopback_traffic(srv, chunks, connections=2)
        assert "0 packets dropped by kernel" in cap.stderr_lines, "tcpdump itself lost packets: rerun"
        out[version] = (path, port, chunks)
    return out


def _editcap(src: Path, dst: Path, *args: str) -> Path:
    subprocess.run(["editcap", *args, str(src), str(dst)], check=True, capture_output=True, timeout=60)
    return dst


def _rewrap(src: Path, dst: Path, linktype: int, wrap: Callable[[bytes], bytes]) -> Path:
    """Each Ethernet frame's IP packet in another encapsulation (what tcpdump on this Linux cannot make)."""
    with open(src, "rb") as f:
        records = list(PcapReader(f))
    dst.write_bytes(classic_pcap(linktype, [(r.ts, wrap(r.data[14:])) for r in records]))
    return dst


def _header_linktype(src: Path, dst: Path, linktype: int) -> Path:
    data = bytearray(src.read_bytes())
    data[20:24] = struct.pack("<I", linktype)  # tcpdump writes host (little-endian) order here
    dst.write_bytes(bytes(data))
    return dst


def _convert(kind: str, src: Path, tmp: Path) -> Path:
    # strip the Ethernet header: raw IP (101); editcap writes pcapng unless told
    raw = _editcap(src, tmp / "raw.pcap", "-F", "pcap", "-C", "14", "-T", "rawip")
    conversions: dict[str, Callable[[], Path]] = {
        "raw": lambda: raw,
        "ipv4": lambda: _editcap(raw, tmp / "ipv4.pcap", "-F", "pcap", "-T", "rawip4"),
        "ipv6": lambda: _editcap(raw, tmp / "ipv6.pcap", "-F", "pcap", "-T", "rawip6"),
        "raw12": lambda: _header_linktype(raw, tmp / "raw12.pcap", 12),
        "raw14": lambda: _header_linktype(raw, tmp / "raw14.pcap", 14),
        "null": lambda: _rewrap(src, tmp / "null.pcap", 0, null),
        "loop": lambda: _rewrap(src, tmp / "loop.pcap", 108, loop),
        "pcapng-raw": lambda: _editcap(raw, tmp / "raw.pcapng", "-F", "pcapng"),
        "vlan": lambda: _rewrap(src, tmp / "vlan.pcap", 1, lambda p: ethernet(p, vlans=[42])),
        "qinq": lambda: _rewrap(src, tmp / "qinq.pcap", 1, lambda p: ethernet(p, vlans=[100, 42])),
        "wlan": lambda: _rewrap(src, tmp / "wlan.pcap", 105, wlan),
        "ppp": lambda: _rewrap(src, tmp / "ppp.pcap", 9, ppp),
    }
    return conversions[kind]()


LINKTYPE_CASES = [("raw", "v4", 101), ("raw", "v6", 101), ("ipv4", "v4", 228), ("ipv6", "v6", 229),
                  ("raw12", "v4", 12), ("raw14", "v6", 14), ("null", "v4", 0), ("loop", "v6", 108),
                  ("pcapng-raw", "v6", 101), ("vlan", "v4", 1), ("qinq", "v6", 1), ("wlan", "v4", 105),
                  ("ppp", "v6", 9)]


@pytest.mark.parametrize(("kind", "version", "linktype"), LINKTYPE_CASES,
                         ids=[f"{k}-{v}" for k, v, _ in LINKTYPE_CASES])
def test_real_capture_in_each_link_type_gives_the_same_bytes(
    lo_captures: dict[str, tuple[Path, int, list[bytes]]], tmp_path: Path, tshark: TsharkInfo, kind: str,
    version: str, linktype: int,
) -> None:
    original, port, chunks = lo_captures[version]
    path = _convert(kind, original, tmp_path)
    with open(path, "rb") as f:
        assert {r.linktype for r in PcapReader(f)} == {linktype}
    segments, d = dissect(path, tshark)
    assert client_bytes(segments, port) == client_bytes(dissect(original, tshark)[0], port)
    assert dissect(path, tshark, dissectors=3)[0] == segments  # dealt by connection, merged back in order
    assert list(client_bytes(segments, port).values()) == [b"".join(chunks)] * 2
    assert d.stats.tcp_segments == d.stats.packets and d.stats.warnings() == []


def test_tcp_the_reader_cannot_reach_is_counted_per_link_type(
    lo_captures: dict[str, tuple[Path, int, list[bytes]]], tshark: TsharkInfo,
) -> None:
    """802.11 fragments: tshark reassembles them and reports the TCP segment on the last fragment, where its
    header is not: said once, with the count, and those segments are holes (never invented bytes)."""
    original, _, _ = lo_captures["v4"]
    with open(original, "rb") as f:
        records = list(PcapReader(f))
    packets: list[tuple[float, bytes]] = []
    cut = 0
    for seq, rec in enumerate(records):
        packet = rec.data[14:]
        if len(packet) > 400:
            cut += 1
            packets += [(rec.ts, frame) for frame in wlan_fragments(packet, seq % 4096, 60)]
        else:
            packets.append((rec.ts, wlan(packet, seq % 4096)))
    assert cut > 5
    segments, d = dissect(classic_pcap(105, packets), tshark)
    assert d.stats.not_understood == {105: cut}
    assert d.stats.warnings() == [f"{cut} frames: link type 105 (IEEE802_11) not understood (their TCP payload "
                                  f"could not be found: their connections are incomplete)"]
    assert sum(not s.whole for s in segments) == cut
    sent = {r.data[14:][-40:] for r in records}
    assert all(s.payload[-40:] in sent for s in segments if s.whole and len(s.payload) >= 40)


def test_link_type_tshark_does_not_know_is_one_error_naming_it(tshark: TsharkInfo) -> None:
    packet = tcp_ip(*V4, 40000, 8080, 1, 0, ACK, b"data")
    with pytest.raises(InputError, match=r"^link type 999 is not one kubectl-mirror or tshark [\d.]+ can read: "):
        dissect(classic_pcap(999, [(1.0, packet)]), tshark)
    # in pcapng tshark reads the frames but finds nothing in them
    with pytest.raises(InputError, match=r"^link type 147 \(USER0\) is not one kubectl-mirror or tshark can use: "
                                         r"tshark found no TCP in its 2 frames"):
        dissect(shb() + idb(147) + epb(0, 1, packet) + epb(0, 2, packet), tshark)


def test_frames_of_an_unknown_link_type_beside_good_ones_are_a_warning(tshark: TsharkInfo) -> None:
    packet = tcp_ip(*V4, 40000, 8080, 1, 0, ACK, b"data")
    segments, d = dissect(shb() + idb(101) + idb(147) + epb(0, 1, packet) + epb(1, 2, b"usb") + epb(1, 3, b"usb"),
                          tshark)
    assert [s.payload for s in segments] == [b"data"]
    assert d.stats.warnings() == ["2 frames: link type 147 (USER0) not understood (tshark found no TCP in them)"]


@settings(max_examples=2000, deadline=None)
@given(st.sampled_from([1, 9, 101, 105, 113, 228]), st.binary(max_size=200), st.integers(0, 300),
       st.integers(0, 199), st.booleans())
def test_locate_payload_never_raises_and_cuts_only_from_the_frame(linktype: int, frame: bytes, tcp_len: int,
                                                                   at: int, plant_ip: bool) -> None:
    if plant_ip and len(frame) > 60:  # an IPv4 header right before the searched TCP header, with its own length
        frame = frame[:20] + ipv4(*V4, frame[40:])[:20] + frame[40:]
        at = 40
    sig = frame[at : at + 8].ljust(8, b"\0")
    out, found = locate_payload(linktype, frame, int.from_bytes(sig[:2], "big"), int.from_bytes(sig[2:4], "big"),
                                int.from_bytes(sig[4:], "big"), tcp_len)
    assert out is None or (len(out) == tcp_len and frame.find(out) >= 0 and found)


# ---- several dissectors ----------------------------------------------------------------------------------------


def _interleaved_capture() -> bytes:
    """60 connections whose segments interleave, answers among them, and UDP between: one Ethernet capture."""
    packets: list[tuple[float, bytes]] = []
    t = 0.0
    for step in range(20):
        for c in range(60):
            sport = 30000 + 2 * c  # one parity, as Linux hands them out
            t += 0.001
            payload = b"c%02d-%02d" % (c, step)
            packets.append((t, ethernet(tcp_ip("10.0.0.1", "10.0.0.2", sport, 8080, 1000 + 5 * step, 7, ACK | PSH,
                                               payload))))
            if c % 7 == 0:
                packets.append((t, ethernet(tcp_ip("10.0.0.2", "10.0.0.1", 8080, sport, 7, 1005 + 5 * step, ACK,
                                                   b""))))
        packets.append((t, ethernet(ipv4("10.0.0.1", "10.0.0.9", bytes(8) + b"dns", proto=17))))
    return classic_pcap(1, packets)


@pytest.mark.parametrize("dissectors", [2, 3, 4])
def test_several_dissectors_give_exactly_the_segments_of_one(tshark: TsharkInfo, dissectors: int) -> None:
    data = _interleaved_capture()
    one, d1 = dissect(data, tshark)
    many, d = dissect(data, tshark, dissectors=dissectors, handover_every=300)
    assert len(one) == 20 * (60 + 9)
    assert many == one  # every field, frame numbers included: the capture's own order, across connections too
    assert (d.stats.packets, d.stats.tcp_segments, d.stats.non_tcp) == (d1.stats.packets, len(one), 20)
    assert len(d._instances) > dissectors  # each handed over on its own


def test_a_tcp_record_tshark_prints_nothing_for_does_not_hold_the_others_back(tshark: TsharkInfo) -> None:
    """An IPv4 length shorter than its header: the dealer sees TCP, tshark stops at IP. The merge waits for that
    record's line, then gives it up once its tshark has read everything and sleeps (live: the pipe stays open)."""
    bogus = bytearray(tcp_ip("10.0.0.1", "10.0.0.2", 41000, 8080, 1, 0, ACK, b"lost"))
    bogus[2:4] = (10).to_bytes(2, "big")
    mine = deal(101, bytes(bogus), 2)
    assert mine >= 0
    other = next(p for p in range(42000, 42100) if deal(101, tcp_ip("10.0.0.1", "10.0.0.2", p, 8080, 1, 0, ACK,
                                                                      b""), 2) == 1 - mine)
    rfd, wfd = os.pipe()
    source = os.fdopen(rfd, "rb")
    writer = os.fdopen(wfd, "wb", buffering=0)
    d = Dissector(source, tshark, live=True, dissectors=2)
    try:
        d.start()
        writer.write(classic_header(101) + classic_record(1.0, bytes(bogus)))
        writer.write(b"".join(classic_record(2.0 + i, tcp_ip("10.0.0.1", "10.0.0.2", other, 8080, i, 0, ACK,
                                                              b"next%d" % i)) for i in range(5)))
        got: list[Segment] = []
        with selectors.DefaultSelector() as sel:
            deadline = time.monotonic() + 30  # bounded wait, not a timing assertion
            while len(got) < 5 and time.monotonic() < deadline:
                fd = d.fileno()
                sel.register(fd, selectors.EVENT_READ)
                sel.select(timeout=0.2)
                sel.unregister(fd)
                got += d.read_segments()
                d.raise_if_failed()
        assert [s.payload for s in got] == [b"next%d" % i for i in range(5)]
        assert [s.frame for s in got] == [2, 3, 4, 5, 6]
    finally:
        writer.close()
        d.close()
        source.close()
