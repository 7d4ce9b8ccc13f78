"""Writes the seed corpora for `make fuzz`: samples/web.pcap, small synthetic captures of every kind, frames for
tcp_payload and a few well-formed sequencer scripts. Usage: python -m tests.fuzz.seeds DIR"""

from __future__ import annotations

import io
import sys
from pathlib import Path

from kubectl_mirror.pcap import PcapReader, classic_pcap
from tests.dissect_helpers import (
    epb,
    ethernet,
    idb,
    ipv4,
    ipv6,
    null,
    obsolete_pb,
    other_block,
    shb,
    sll,
    sll2,
    spb,
    tcp_header,
    tcp_ip,
)

ROOT = Path(__file__).resolve().parents[2]
# tcp_payload harness: the input's first byte picks one of these; every fast-path link type, and one without (147)
LINKTYPES = [0, 1, 12, 14, 101, 108, 113, 228, 229, 276, 147]


def frames() -> list[tuple[int, bytes, int]]:
    """(link type, frame, tcp payload length) of a few encapsulations."""
    out: list[tuple[int, bytes, int]] = []
    for payload in (b"", b"GET / HTTP/1.1\r\n\r\n"):
        v4 = tcp_ip("10.0.0.1", "10.0.0.2", 40000, 80, 1, 2, 0x18, payload)
        v6 = tcp_ip("fd00::1", "fd00::2", 40000, 80, 1, 2, 0x18, payload)
        n = len(payload)
        out += [(1, ethernet(v4), n), (1, ethernet(v6), n), (1, ethernet(v4, vlans=[5, 6]), n), (101, v4, n),
                (113, sll(v4), n), (276, sll2(v6), n), (0, null(v4), n)]
    out.append((101, ipv4("10.0.0.1", "10.0.0.2", tcp_header(1, 2, 3, 4, 0x18) + b"frag", frag=0x2000), 4))
    out.append((101, ipv6("fd00::1", "fd00::2", b"not tcp", proto=17), 0))
    return out


def pcap_seeds() -> dict[str, bytes]:
    web = (ROOT / "samples" / "web.pcap").read_bytes()
    fr = [f for linktype, f, _ in frames() if linktype == 1]
    seeds = {"web.pcap": web, "web-head.pcap": web[:600]}
    for big in (False, True):
        for ns in (False, True):
            seeds[f"classic-{big}-{ns}.pcap"] = classic_pcap(1, [(1.5, f) for f in fr[:3]], nanosecond=ns,
                                                             big_endian=big)
    for order in "<>":
        name = "le" if order == "<" else "be"
        seeds[f"ng-{name}.pcapng"] = (shb(order) + idb(1, tsresol=9, tsoffset=5, order=order)
                                      + epb(0, 123456789, fr[0], order=order) + other_block(order)
                                      + spb(fr[1], order=order) + obsolete_pb(0, 7, fr[2], order=order))
    seeds["ng-two-sections.pcapng"] = shb() + idb(101) + epb(0, 1, b"\x45" + b"\0" * 19) + shb(">") + idb(1, order=">")
    return seeds


def tcp_payload_seeds() -> dict[str, bytes]:
    seeds: dict[str, bytes] = {}
    for i, (linktype, frame, n) in enumerate(frames()):
        seeds[f"frame-{i}"] = bytes([LINKTYPES.index(linktype)]) + n.to_bytes(2, "big") + frame
    web = (ROOT / "samples" / "web.pcap").read_bytes()
    for i, rec in enumerate(list(PcapReader(io.BytesIO(web)))[:20]):
        seeds[f"web-{i}"] = bytes([LINKTYPES.index(rec.linktype)]) + max(0, len(rec.data) - 66).to_bytes(2, "big") \
            + rec.data
    return seeds


def sequencer_seeds() -> dict[str, bytes]:
    """Scripts in tests/fuzz/sequencer_ops.decode's format: client 40000 -> server 8080, SYN, data, FIN."""
    # kind 12: ENDPOINTS[0] -> ENDPOINTS[2] with a flags-table index; kind 2: the reverse direction
    def seg(kind: int, flag_index: int, offset: int, n: int, step: int = 0x80) -> bytes:
        return bytes([kind, flag_index, 8 + offset if offset < 248 else 0xF0, 0, 4, n, 0xFF, step])

    syn = seg(12, 2, 0, 0)
    synack = bytes([2 + 6 * 0, 3, 8, 0, 5, 0, 0xFF, 0x80])
    data = [seg(12, 1, 1 + 40 * i, 40) for i in range(4)]
    fin = seg(12, 4, 161, 0)
    ack = bytes([2, 0, 8, 0, 4 + 81, 0, 0xFF, 0x80])
    return {
        "in-order": bytes([0, 0x40, 3]) + syn + synack + b"".join(data) + fin,
        "reordered": bytes([1, 0x41, 9]) + syn + synack + data[1] + data[0] + data[3] + ack + data[2] + fin,
        "lost": bytes([0x0A, 0x40, 0]) + syn + data[0] + data[2] + ack + bytes([0xE5]) + fin,
        "partial": bytes([0, 0, 1, 2, 3, 4]) + data[1] + data[2] + bytes([0xF1, 0]) + data[3],
    }


def main() -> None:
    base = Path(sys.argv[1])
    for name, seeds in (("pcap", pcap_seeds()), ("tcp_payload", tcp_payload_seeds()),
                        ("sequencer", sequencer_seeds())):
        d = base / "seeds" / name
        d.mkdir(parents=True, exist_ok=True)
        for fname, data in seeds.items():
            (d / fname).write_bytes(data)


if __name__ == "__main__":
    main()
