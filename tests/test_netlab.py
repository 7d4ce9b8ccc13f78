"""The lab itself: if these fail, the end-to-end replay tests prove nothing."""

from __future__ import annotations

import socket
import struct
import subprocess
from pathlib import Path

import pytest

from tests.netlab import traffic
from tests.netlab.capture import (
    LINKTYPE_EN10MB,
    LINKTYPE_LINUX_SLL2,
    LINKTYPE_RAW,
    Capture,
    pcap_linktype,
    tshark_count,
)
from tests.netlab.lab import NsRecorder, contents
from tests.netlab.netns import netns, sh, veth_lab
from tests.netlab.recorder import Recorder
from tests.netlab.tunlink import Impairment, tcp_payload_len, tun_between


def _namespaces() -> set[str]:
    return {line.split()[0] for line in sh(["ip", "netns", "list"]).stdout.splitlines() if line.strip()}


def test_recorder_answers_http_keepalive_and_records_raw_bytes() -> None:
    rec = Recorder("127.0.0.1", 0).start()
    try:
        base = f"http://127.0.0.1:{rec.port}"
        out = subprocess.run(["curl", "--http1.1", "-sS", "--max-time", "10", f"{base}/one", f"{base}/two?x=1"],
                             capture_output=True, text=True, timeout=20, check=True).stdout
        assert "ok GET /one" in out and "ok GET /two?x=1" in out
        with socket.create_connection(("127.0.0.1", rec.port), timeout=10) as s:
            s.sendall(b"\x00binary\xffnot http")
            s.shutdown(socket.SHUT_WR)
            assert s.recv(100) == b""
        assert rec.wait_idle(2, timeout=10)
    finally:
        records = rec.stop()
    http = [r for r in records if r.http]
    assert len(http) == 1, "curl with two URLs must reuse one connection"
    assert http[0].requests == ["GET /one", "GET /two?x=1"]
    assert bytes(http[0].data).count(b"GET /") == 2
    raw = [r for r in records if not r.http]
    assert [bytes(r.data) for r in raw] == [b"\x00binary\xffnot http"]
    assert all(r.end == "eof" for r in records)


def test_recorder_tells_reset_from_eof() -> None:
    rec = Recorder("127.0.0.1", 0, http=False).start()
    try:
        s = socket.create_connection(("127.0.0.1", rec.port), timeout=10)
        s.sendall(b"before the reset")
        # SO_LINGER 0: close() sends RST, as the replayer does when it aborts a flow with a hole.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()
        assert rec.wait_idle(1, timeout=10)
    finally:
        records = rec.stop()
    assert [(bytes(r.data), r.end) for r in records] == [(b"before the reset", "reset")]


def test_tcp_payload_len_of_raw_packets() -> None:
    syn4 = bytes([0x45, 0, 0, 40]) + bytes(5) + b"\x06" + bytes(10) + bytes(12) + bytes([0x50]) + bytes(7)
    assert tcp_payload_len(syn4) == 0
    data6 = bytes([0x60, 0, 0, 0, 0, 25, 6, 64]) + bytes(32) + bytes(12) + bytes([0x50]) + bytes(7) + b"hello"
    assert tcp_payload_len(data6) == 5
    udp4 = bytes([0x45, 0, 0, 28]) + bytes(5) + b"\x11" + bytes(18)
    assert tcp_payload_len(udp4) == -1


@pytest.mark.netns
def test_namespaces_are_removed_even_on_failure() -> None:
    names: list[str] = []
    with pytest.raises(RuntimeError), netns() as ns:
        names.append(ns.name)
        assert ns.name in _namespaces()
        raise RuntimeError("boom")
    assert names and names[0] not in _namespaces()


@pytest.mark.netns
def test_veth_lab_ipv4_ipv6_and_link_types(tmp_path: Path) -> None:
    with veth_lab() as link:
        server = NsRecorder(link.server, tmp_path / "srv.json").start()
        caps = [Capture(link.server, link.server_if, tmp_path / "veth.pcap"),
                Capture(link.server, "any", tmp_path / "any.pcap")]
        try:
            with caps[0], caps[1]:
                traffic.raw_conns(link.client, link.server_ip4, 8080, 3, 2000, tag="v4")
                traffic.raw_conns(link.client, link.server_ip6, 8080, 2, 2000, tag="v6")
        finally:
            records = server.stop()
    assert all(cap.counts()[0] > 0 for cap in caps)
    assert contents(records) == sorted(
        [traffic.payload("v4", i, 2000) for i in range(3)] + [traffic.payload("v6", i, 2000) for i in range(2)]
    )
    assert any(r.client.startswith("[fd00:") for r in records)
    assert pcap_linktype(tmp_path / "veth.pcap") == LINKTYPE_EN10MB
    assert pcap_linktype(tmp_path / "any.pcap") == LINKTYPE_LINUX_SLL2
    for name in ("veth.pcap", "any.pcap"):
        assert tshark_count(tmp_path / name, "tcp.flags.syn==1 && tcp.flags.ack==0") == 5
        assert tshark_count(tmp_path / name, "ipv6 && tcp.flags.fin==1") >= 2


@pytest.mark.netns
def test_impaired_tun_link_causes_real_retransmissions_but_tcp_delivers(tmp_path: Path) -> None:
    imp = Impairment(loss=0.04, dup=0.03, reorder=0.04, seed=11)
    with netns() as c, netns() as s, tun_between(c, s, imp) as tl:
        server = NsRecorder(s, tmp_path / "srv.json").start()
        try:
            with Capture(s, tl.link.server_if, tmp_path / "tun.pcap"):
                traffic.raw_conns(c, tl.link.server_ip4, 8080, 6, 120_000, tag="imp")
        finally:
            records = server.stop()
        stats = tl.stop()
    assert stats.lost > 0 and stats.duplicated > 0 and stats.reordered > 0
    assert contents(records) == sorted(traffic.payload("imp", i, 120_000) for i in range(6))
    pcap = tmp_path / "tun.pcap"
    assert pcap_linktype(pcap) == LINKTYPE_RAW
    assert tshark_count(pcap, "tcp.analysis.retransmission || tcp.analysis.fast_retransmission") > 0
    assert tshark_count(pcap, "tcp.analysis.out_of_order || tcp.analysis.lost_segment") > 0


@pytest.mark.netns
def test_two_phase_clients_split_around_capture_start(tmp_path: Path) -> None:
    with veth_lab() as link:
        server = NsRecorder(link.server, tmp_path / "srv.json").start()
        clients = traffic.TwoPhase(link.client, link.server_ip4, 8080, 3, 4000, tag="mid")
        try:
            clients.wait_phase1()
            with Capture(link.server, link.server_if, tmp_path / "mid.pcap"):
                clients.finish()
        finally:
            clients.kill()
            records = server.stop()
    for r in records:
        data = bytes(r.data)
        assert data.index(traffic.EARLY) < data.index(traffic.LATE)
    # The capture holds no SYN and none of the early bytes: the flows really are joined mid-stream.
    assert tshark_count(tmp_path / "mid.pcap", "tcp.flags.syn==1") == 0
    assert tshark_count(tmp_path / "mid.pcap", 'tcp.payload contains "|EARLY|"') == 0
