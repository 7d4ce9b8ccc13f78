"""shard: dealing records to dissectors by connection, and merging their segments back (sans-I/O playbooks)."""

from __future__ import annotations

from collections import Counter

import pytest

from kubectl_mirror.model import ACK, Endpoint, Segment
from kubectl_mirror.shard import Merger, deal
from tests.dissect_helpers import ethernet, ipv4, ipv6, loop, null, sll, sll2, tcp_header, tcp_ip

C, S = Endpoint("10.0.0.1", 40000), Endpoint("10.0.0.2", 8080)


def seg(frame: int, payload: bytes = b"x") -> Segment:
    return Segment(float(frame), C, S, frame, 0, ACK, payload, True, frame)


def frames(segments: list[Segment]) -> list[int]:
    return [s.frame for s in segments]


# ---- deal ---------------------------------------------------------------------------------------------------


def test_both_directions_of_a_connection_go_to_the_same_dissector() -> None:
    for sport in range(30000, 30200):
        there = tcp_ip("10.1.0.5", "10.2.0.9", sport, 8080, 1, 0, ACK, b"q")
        back = tcp_ip("10.2.0.9", "10.1.0.5", 8080, sport, 1, 0, ACK, b"a")
        assert deal(101, there, 4) == deal(101, back, 4) >= 0


def test_ipv6_both_directions_and_extension_headers_keep_the_connection_together() -> None:
    plain = tcp_ip("fd00::1", "fd00::2", 50123, 443, 1, 0, ACK, b"x")
    back = tcp_ip("fd00::2", "fd00::1", 443, 50123, 1, 0, ACK, b"y")
    tcp = tcp_header(50123, 443, 1, 0, ACK) + b"x"
    hop_by_hop = bytes([6, 0]) + bytes(6)  # next header TCP, 8 bytes
    with_ext = ipv6("fd00::1", "fd00::2", hop_by_hop + tcp, proto=0)
    assert deal(101, plain, 4) == deal(101, back, 4) == deal(101, with_ext, 4) >= 0


def test_connections_spread_over_the_dissectors_even_with_ports_of_one_parity() -> None:
    # Linux gives connect() even ports first: the hash must not depend on the low bits alone.
    counts = Counter(deal(101, tcp_ip("10.1.0.5", "10.2.0.9", port, 8080, 1, 0, ACK, b""), 2)
                     for port in range(32768, 36768, 2))
    assert set(counts) == {0, 1}
    assert min(counts.values()) > 800, counts
    counts = Counter(deal(101, tcp_ip("10.1.0.5", "10.2.0.9", port, 8080, 1, 0, ACK, b""), 4)
                     for port in range(32768, 40768, 2))
    assert set(counts) == {0, 1, 2, 3} and min(counts.values()) > 700, counts


@pytest.mark.parametrize(("linktype", "frame"), [
    (1, ethernet), (1, lambda p: ethernet(p, vlans=[7, 8])), (113, sll), (276, sll2), (0, null), (108, loop),
    (101, lambda p: p), (228, lambda p: p),
], ids=["en10mb", "vlan", "sll", "sll2", "null", "loop", "raw", "ipv4"])
def test_every_fast_link_type_is_dealt_by_its_connection(linktype: int, frame: object) -> None:
    packet = tcp_ip("10.1.0.5", "10.2.0.9", 41000, 8080, 1, 0, ACK, b"payload")
    assert callable(frame)
    assert deal(linktype, frame(packet), 8) == deal(101, packet, 8) >= 0


def test_records_without_a_certain_line_go_to_dissector_zero_unawaited() -> None:
    udp = ipv4("10.1.0.5", "10.2.0.9", bytes(8) + b"dns", proto=17)
    later_fragment = ipv4("10.1.0.5", "10.2.0.9", bytes(24), frag=185)
    arp = bytes(12) + b"\x08\x06" + bytes(28)
    assert deal(101, udp, 4) == -1
    assert deal(101, later_fragment, 4) == -1
    assert deal(1, arp, 4) == -1
    assert deal(105, b"\x08\x01" + bytes(60), 4) == -1  # 802.11: no fast path, tshark decides
    assert deal(1, b"\x00" * 5, 4) == -1  # too short for anything


def test_a_tcp_header_cut_by_the_snap_length_stays_with_its_connection_but_is_not_awaited() -> None:
    whole = tcp_ip("10.1.0.5", "10.2.0.9", 41000, 8080, 1, 0, ACK, b"x")
    k = deal(101, whole, 4)
    assert k >= 0
    assert deal(101, whole[:20 + 6], 4) == -k - 1  # ports readable, the rest of the header cut


# ---- Merger ----------------------------------------------------------------------------------------------------


def test_nothing_leaves_before_every_earlier_tcp_record_is_answered() -> None:
    m = Merger(2)
    for frame, shard in ((1, 0), (2, 1), (3, 0), (4, 1)):
        m.expect(shard, frame)
    m.add(1, [seg(2)])
    m.answered(1, 2)
    assert m.pop() == []  # frame 1 (dissector 0) may still come first
    assert m.waiting_on() == 0
    m.add(0, [seg(1), seg(3)])
    m.answered(0, 3)
    assert frames(m.pop()) == [1, 2, 3]  # 4 is still unanswered but nobody holds anything after it
    m.add(1, [seg(4)])
    m.answered(1, 4)
    assert frames(m.pop()) == [4]
    assert (m.held, m.held_bytes) == (0, 0)


def test_a_line_answers_the_records_before_it_that_printed_nothing() -> None:
    m = Merger(2)
    m.expect(0, 1)
    m.expect(0, 2)  # tshark prints nothing for it after all
    m.expect(1, 3)
    m.expect(0, 4)
    m.add(1, [seg(3)])
    m.answered(1, 3)
    assert m.pop() == []
    m.add(0, [seg(1)])
    m.answered(0, 1)
    assert frames(m.pop()) == [1]
    assert m.waiting_on() == 0
    m.add(0, [seg(4)])
    m.answered(0, 4)  # its line also answers frame 2
    assert frames(m.pop()) == [3, 4]


def test_unawaited_segments_and_idle_dissectors_never_hold_the_merge() -> None:
    m = Merger(3)
    m.expect(2, 5)
    m.add(0, [seg(1)])  # a record nobody waited for (not TCP to the dealer) that tshark printed a line for
    assert frames(m.pop()) == [1]
    m.add(1, [seg(7)])
    assert m.pop() == []
    assert m.waiting_on() == 2


def test_a_record_given_up_stops_holding_the_merge() -> None:
    m = Merger(2)
    m.expect(0, 1)
    m.expect(1, 2)
    m.add(1, [seg(2, b"abc")])
    m.answered(1, 2)
    assert (m.held, m.held_bytes) == (1, 3)
    assert m.expected_head(0) == 1
    assert m.skip(0) == 1
    assert m.skip(0) is None
    assert frames(m.pop()) == [2]
    assert m.waiting_on() is None


def test_segments_of_several_dissectors_interleave_in_frame_order() -> None:
    m = Merger(4)
    dealt = {f: f % 4 for f in range(1, 41)}
    for f, k in dealt.items():
        m.expect(k, f)
    for k in range(4):
        mine = [f for f, kk in dealt.items() if kk == k]
        m.add(k, [seg(f) for f in mine])
        m.answered(k, mine[-1])
    assert frames(m.pop()) == list(range(1, 41))
