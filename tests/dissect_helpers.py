"""Test helpers for the pcap reader and the dissector: synthetic frames and pcapng blocks, real loopback captures."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import selectors
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from kubectl_mirror.model import SYN, Segment

# ---- synthetic frames -----------------------------------------------------------------------------------------


def tcp_header(sport: int, dport: int, seq: int, ack: int, flags: int) -> bytes:
    return struct.pack(">HHIIBBHHH", sport, dport, seq, ack, 5 << 4, flags, 65535, 0, 0)


def ipv4(src: str, dst: str, l4: bytes, *, proto: int = 6, frag: int = 0) -> bytes:
    return struct.pack(">BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), 1, frag, 64, proto, 0,
                       ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed) + l4


def ipv6(src: str, dst: str, l4: bytes, *, proto: int = 6) -> bytes:
    return struct.pack(">IHBB16s16s", 6 << 28, len(l4), proto, 64,
                       ipaddress.IPv6Address(src).packed, ipaddress.IPv6Address(dst).packed) + l4


def tcp_ip(src: str, dst: str, sport: int, dport: int, seq: int, ack: int, flags: int, payload: bytes) -> bytes:
    """An IPv4 or IPv6 packet (chosen by the address) carrying one TCP segment."""
    l4 = tcp_header(sport, dport, seq, ack, flags) + payload
    return ipv6(src, dst, l4) if ":" in src else ipv4(src, dst, l4)


def ethernet(packet: bytes, *, vlans: Iterable[int] = (), pad_to: int = 60) -> bytes:
    ethertype = 0x86DD if packet[0] >> 4 == 6 else 0x0800
    head = b"\x02\x00\x00\x00\x00\x02\x02\x00\x00\x00\x00\x01"
    tags = vlans = list(vlans)
    for i, vid in enumerate(tags):
        tpid = 0x88A8 if i == 0 and len(vlans) > 1 else 0x8100
        head += struct.pack(">HH", tpid, vid)
    frame = head + struct.pack(">H", ethertype) + packet
    return frame + b"\xee" * max(0, pad_to - len(frame))  # non-zero padding so a leak is visible


def sll(packet: bytes) -> bytes:
    ethertype = 0x86DD if packet[0] >> 4 == 6 else 0x0800
    return struct.pack(">HHH8sH", 0, 772, 6, b"\0" * 8, ethertype) + packet


def sll2(packet: bytes) -> bytes:
    ethertype = 0x86DD if packet[0] >> 4 == 6 else 0x0800
    return struct.pack(">HHIHBB8s", ethertype, 0, 1, 772, 0, 6, b"\0" * 8) + packet


def null(packet: bytes) -> bytes:
    family = 24 if packet[0] >> 4 == 6 else 2  # written in host (little-endian) order, as BSD does
    return struct.pack("<I", family) + packet


def loop(packet: bytes) -> bytes:
    family = 24 if packet[0] >> 4 == 6 else 2  # OpenBSD's loopback: the family in network order
    return struct.pack(">I", family) + packet


def _ethertype(packet: bytes) -> bytes:
    return b"\x86\xdd" if packet[0] >> 4 == 6 else b"\x08\x00"


def _wlan_header(seq: int, frag: int = 0, more: bool = False) -> bytes:
    # data frame, from the AP (FromDS), addresses 1-3, sequence control: no QoS, no protection, no FCS
    flags = 0x02 | (0x04 if more else 0)
    return (bytes([0x08, flags]) + b"\0\0" + bytes.fromhex("020000000001020000000002020000000003")
            + struct.pack("<H", (seq << 4) | frag))


def wlan(packet: bytes, seq: int = 0) -> bytes:
    """802.11 data frame (link type 105) carrying the packet behind LLC/SNAP: no fast path knows it."""
    return _wlan_header(seq) + b"\xaa\xaa\x03\0\0\0" + _ethertype(packet) + packet


def wlan_fragments(packet: bytes, seq: int, cut: int) -> list[bytes]:
    """The same, fragmented by the 802.11 layer: tshark reassembles it and reports the TCP segment on the last
    fragment, which does not hold the TCP header."""
    body = b"\xaa\xaa\x03\0\0\0" + _ethertype(packet) + packet
    return [_wlan_header(seq, 0, more=True) + body[:cut], _wlan_header(seq, 1) + body[cut:]]


def ppp(packet: bytes) -> bytes:
    """PPP in HDLC-like framing (link type 9)."""
    return b"\xff\x03" + (b"\x00\x57" if packet[0] >> 4 == 6 else b"\x00\x21") + packet


def ethernet_mpls(packet: bytes) -> bytes:
    """Ethernet carrying one MPLS label, then the packet: an Ethernet frame the fast path cannot see into."""
    label = struct.pack(">I", (1000 << 12) | (1 << 8) | 64)  # label 1000, bottom of stack, TTL 64
    return b"\x02\0\0\0\0\x02\x02\0\0\0\0\x01\x88\x47" + label + packet


def ethernet_pppoe(packet: bytes) -> bytes:
    """Ethernet carrying a PPPoE session (DSL links)."""
    proto = b"\x00\x57" if packet[0] >> 4 == 6 else b"\x00\x21"
    return (b"\x02\0\0\0\0\x02\x02\0\0\0\0\x01\x88\x64" + struct.pack(">BBHH", 0x11, 0, 7, len(packet) + 2)
            + proto + packet)


# ---- pcapng blocks --------------------------------------------------------------------------------------------


def _block(btype: int, body: bytes, order: str) -> bytes:
    body += b"\0" * (-len(body) % 4)
    total = 12 + len(body)
    return struct.pack(order + "II", btype, total) + body + struct.pack(order + "I", total)


def _option(code: int, value: bytes, order: str) -> bytes:
    return struct.pack(order + "HH", code, len(value)) + value + b"\0" * (-len(value) % 4)


def shb(order: str = "<") -> bytes:
    return _block(0x0A0D0D0A, struct.pack(order + "IHHq", 0x1A2B3C4D, 1, 0, -1), order)


def idb(linktype: int, *, snaplen: int = 262144, tsresol: int | None = None, tsoffset: int | None = None,
        order: str = "<") -> bytes:
    opts = b""
    if tsresol is not None:
        opts += _option(9, bytes([tsresol]), order)
    if tsoffset is not None:
        opts += _option(14, struct.pack(order + "q", tsoffset), order)
    if opts:
        opts += _option(0, b"", order)
    return _block(1, struct.pack(order + "HHI", linktype, 0, snaplen) + opts, order)


def epb(ifid: int, ts_units: int, data: bytes, *, orig_len: int | None = None, order: str = "<") -> bytes:
    head = struct.pack(order + "IIIII", ifid, ts_units >> 32, ts_units & 0xFFFFFFFF, len(data),
                       len(data) if orig_len is None else orig_len)
    return _block(6, head + data, order)


def spb(data: bytes, *, order: str = "<") -> bytes:
    return _block(3, struct.pack(order + "I", len(data)) + data, order)


def obsolete_pb(ifid: int, ts_units: int, data: bytes, *, order: str = "<") -> bytes:
    head = struct.pack(order + "HHIIII", ifid, 0, ts_units >> 32, ts_units & 0xFFFFFFFF, len(data), len(data))
    return _block(2, head + data, order)


def other_block(order: str = "<") -> bytes:
    return _block(5, struct.pack(order + "IIII", 0, 0, 0, 0), order)  # interface statistics: to be skipped


# ---- reading dissected traffic ---------------------------------------------------------------------------------


def client_bytes(segments: Iterable[Segment], server_port: int) -> dict[tuple[str, int], bytes]:
    """Client->server payload per client endpoint, rebuilt from sequence numbers (duplicates fold away)."""
    flows: dict[tuple[str, int], dict[int, bytes]] = {}
    isn: dict[tuple[str, int], int] = {}
    for seg in segments:
        if seg.dst.port != server_port:
            continue
        key = (seg.src.host, seg.src.port)
        if seg.flags & SYN:
            isn[key] = seg.seq + 1
        assert seg.whole, f"frame {seg.frame} unexpectedly cut"
        if seg.payload:
            flows.setdefault(key, {})[seg.seq] = seg.payload
    out: dict[tuple[str, int], bytes] = {}
    for key, chunks in flows.items():
        start = isn[key]
        data = bytearray()
        for seq in sorted(chunks, key=lambda s: (s - start) % (1 << 32)):
            offset = (seq - start) % (1 << 32)
            piece = chunks[seq]
            if offset + len(piece) > len(data):
                assert offset <= len(data), f"hole before offset {offset}"
                data += piece[len(data) - offset :]
        out[key] = bytes(data)
    return out


# ---- real captures --------------------------------------------------------------------------------------------


@dataclass
class Capture:
    path: Path
    proc: subprocess.Popen[bytes]
    stderr_lines: list[str] = field(default_factory=list)


@contextlib.contextmanager
def tcpdump(path: Path, iface: str, bpf: str, *, extra: Iterable[str] = ()) -> Iterator[Capture]:
    """Run tcpdump until the block ends; waits (bounded) until it is really listening."""
    # -Z root: tcpdump would otherwise drop to a user that cannot write into pytest's tmp dirs;
    # --immediate-mode: without it the last packets can sit in the kernel ring when tcpdump is stopped.
    cmd = ["tcpdump", "-i", iface, "-U", "-s", "0", "-n", "-Z", "root", "--immediate-mode", "-B", "16384", *extra,
           "-w", str(path), bpf]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    cap = Capture(path, proc)
    assert proc.stderr is not None
    deadline = time.monotonic() + 15
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stderr, selectors.EVENT_READ)
        buf = b""
        while b"listening on" not in buf:
            left = deadline - time.monotonic()
            if left <= 0 or proc.poll() is not None:
                proc.kill()
                raise RuntimeError(f"tcpdump did not start: {buf.decode(errors='replace')}")
            if sel.select(timeout=left):
                chunk = os.read(proc.stderr.fileno(), 4096)
                if not chunk:
                    continue
                buf += chunk
    try:
        yield cap
    finally:
        time.sleep(0.3)  # let the last packets reach the capture buffer (-U writes each one at once)
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        cap.stderr_lines = proc.stderr.read().decode(errors="replace").splitlines()
        proc.stderr.close()


def loopback_traffic(srv: socket.socket, chunks: list[bytes], *, connections: int = 1) -> None:
    """Send `chunks` (one write each, TCP_NODELAY) over `connections` connections to a sink listening on srv."""
    host, port = srv.getsockname()[:2]
    received: list[int] = []

    def sink() -> None:
        for _ in range(connections):
            srv.settimeout(10)
            conn, _ = srv.accept()
            conn.settimeout(10)
            total = 0
            with conn:
                while True:
                    data = conn.recv(65536)
                    if not data:
                        break
                    total += len(data)
            received.append(total)

    t = threading.Thread(target=sink, daemon=True)
    t.start()
    for _ in range(connections):
        with socket.create_connection((host, port), timeout=10) as c:
            c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for chunk in chunks:
                c.sendall(chunk)
                time.sleep(0.001)  # a busy test machine: let tcpdump keep up rather than drop
    t.join(timeout=20)
    assert not t.is_alive(), "sink did not finish"
    assert received == [sum(map(len, chunks))] * connections


def listener(host: str) -> tuple[socket.socket, int]:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    s.bind((host, 0))
    s.listen(16)
    return s, s.getsockname()[1]
