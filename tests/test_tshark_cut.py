"""What tshark is handed: each TCP record only up to the end of its TCP header, its fields unchanged.

The payload is cut from the record the plugin holds; tshark is asked for header fields only, so the bytes past
the TCP header are copied through its pipe for nothing. These tests check where the cut falls, that the cut
record is still a valid record of its format, and, with the real tshark, that every field is the same.
"""

from __future__ import annotations

import io
import subprocess
from pathlib import Path

import pytest

from kubectl_mirror.dissect import (
    DISPLAY_FILTER,
    FIELDS,
    PREFERENCES,
    find_tshark,
    tcp_payload,
    tshark_command,
    tshark_environment,
)
from kubectl_mirror.model import ACK, PSH
from kubectl_mirror.pcap import PcapReader, Record, classic_header, classic_record, cut_record
from kubectl_mirror.shard import deal, headers_end, route
from tests.dissect_helpers import (
    epb,
    ethernet,
    ethernet_mpls,
    ethernet_pppoe,
    idb,
    ipv4,
    ipv6,
    shb,
    sll2,
    tcp_header,
    tcp_ip,
)

BODY = bytes(range(256)) * 8


def tcp_with_options(payload: bytes) -> bytes:
    head = bytearray(tcp_header(40000, 8080, 7, 9, ACK | PSH) + b"\x01\x01\x08\x0a" + b"\0" * 8)  # NOP NOP TS
    head[12] = (len(head) // 4) << 4
    return bytes(head) + payload


@pytest.mark.parametrize(("linktype", "frame", "end"), [
    (1, ethernet(tcp_ip("10.0.0.1", "10.0.0.2", 40000, 8080, 7, 9, ACK | PSH, BODY)), 14 + 20 + 20),
    (1, ethernet(ipv4("10.0.0.1", "10.0.0.2", tcp_with_options(BODY)), vlans=[7]), 18 + 20 + 32),
    (276, sll2(tcp_ip("fd00::1", "fd00::2", 40000, 8080, 7, 9, ACK | PSH, BODY)), 20 + 40 + 20),
])
def test_the_cut_falls_at_the_end_of_the_tcp_header(linktype: int, frame: bytes, end: int) -> None:
    assert headers_end(linktype, frame) == end


@pytest.mark.parametrize("frame", [
    ethernet(ipv4("10.0.0.1", "10.0.0.2", BODY, proto=17)),  # UDP
    ethernet(ipv4("10.0.0.1", "10.0.0.2", tcp_header(1, 2, 3, 4, ACK) + BODY, frag=0x2000)),  # a first fragment
    ethernet(ipv6("fd00::1", "fd00::2", b"\x06\x00" + b"\0" * 6 + tcp_header(1, 2, 3, 4, ACK) + BODY, proto=0)),
    ethernet(ipv4("10.0.0.1", "10.0.0.2", tcp_header(1, 2, 3, 4, ACK)))[:30],  # the TCP header is cut already
])
def test_frames_whose_header_end_is_not_certain_go_whole(frame: bytes) -> None:
    assert headers_end(1, frame) == len(frame)


def records(raw: bytes) -> list[Record]:
    return [rec for batch in iter(PcapReader(io.BytesIO(raw)).read_batch, []) for rec in batch]


@pytest.mark.parametrize("form", ["classic-le", "classic-be", "classic-ns", "pcapng-le", "pcapng-be"])
def test_a_cut_record_is_a_valid_record_of_its_format(form: str) -> None:
    frames = [ethernet(tcp_ip("10.0.0.1", "10.0.0.2", 40000, 8080, i, 9, ACK | PSH, BODY[: 300 + i]))
              for i in range(3)]
    if form.startswith("classic"):
        ns, be = form == "classic-ns", form == "classic-be"
        raw = classic_header(1, nanosecond=ns, big_endian=be) + b"".join(
            classic_record(1.5 + i, f, nanosecond=ns, big_endian=be) for i, f in enumerate(frames))
    else:
        order = "<" if form == "pcapng-le" else ">"
        raw = shb(order) + idb(1, order=order) + b"".join(
            epb(0, 1_000_000 * (i + 1), f, order=order) for i, f in enumerate(frames))
    whole = records(raw)
    cut = [cut_record(rec, 54) for rec in whole]
    again = records(whole[0].header + b"".join(cut))
    assert [(r.ts, r.linktype, r.data, r.orig_len) for r in again] == [
        (r.ts, r.linktype, r.data[:54], r.orig_len) for r in whole]


def test_tshark_gives_the_same_fields_for_cut_records() -> None:
    tshark = find_tshark()
    frames = [ethernet(tcp_ip("10.0.0.1", "10.0.0.2", 40000, 8080, 1000 + 2048 * i, 9, ACK | PSH, BODY))
              for i in range(20)]
    frames += [ethernet(ipv4("10.0.0.1", "10.0.0.2", tcp_with_options(BODY[:500]))),
               ethernet(tcp_ip("fd00::1", "fd00::2", 40000, 8080, 5, 6, ACK, BODY[:999]))]
    raw = classic_header(1) + b"".join(classic_record(2.0 + i, f) for i, f in enumerate(frames))
    whole = records(raw)
    cut = whole[0].header + b"".join(cut_record(r, headers_end(r.linktype, r.data)) for r in whole)
    assert len(cut) < len(raw) // 3

    def fields(capture: bytes) -> str:
        out = subprocess.run(tshark_command(tshark), input=capture, capture_output=True, timeout=60, check=True)
        return out.stdout.decode()

    lines = fields(raw)
    assert lines.count("\n") == len(frames) and "\t2048\t" in lines  # tcp.len of the full segments
    assert fields(cut) == lines


def _shapes() -> list[tuple[int, bytes, int]]:
    """Frames of every shape the feeder meets, with the TCP length their IP header gives (what tshark reports),
    each also cut at every length (snap lengths, damage)."""
    whole = [
        (1, ethernet(tcp_ip("10.0.0.1", "10.0.0.2", 40000, 8080, 7, 9, ACK | PSH, BODY[:300])), 300),
        (1, ethernet(ipv4("10.0.0.1", "10.0.0.2", tcp_with_options(BODY[:250])), vlans=[7, 8]), 250),
        (1, ethernet(tcp_ip("10.0.0.1", "10.0.0.2", 40000, 8080, 7, 9, ACK, b"")), 0),  # padded to 60 bytes
        (1, ethernet(ipv4("10.0.0.1", "10.0.0.2", BODY[:200], proto=17)), 0),
        (1, ethernet(ipv4("10.0.0.1", "10.0.0.2", tcp_header(1, 2, 3, 4, ACK) + BODY[:200], frag=0x2000)), 200),
        (1, ethernet(ipv4("10.0.0.1", "10.0.0.2", BODY[:200], frag=0x0010)), 0),  # a later fragment
        (1, ethernet(ipv6("fd00::1", "fd00::2", b"\x06\x00" + b"\0" * 6 + tcp_header(1, 2, 3, 4, ACK) + BODY[:200],
                          proto=0)), 200),
        (276, sll2(tcp_ip("fd00::1", "fd00::2", 40000, 8080, 7, 9, ACK | PSH, BODY[:400])), 400),
        (276, sll2(tcp_ip("10.0.0.1", "10.0.0.2", 40000, 8080, 7, 9, ACK | PSH, BODY[:400])), 400),
    ]
    return [(lt, frame[:n], tcp_len) for lt, frame, tcp_len in whole for n in range(len(frame) + 1)]


def test_route_answers_deal_and_headers_end_from_one_reading() -> None:
    for linktype, frame, _ in _shapes():
        for shards in (1, 2, 4):
            assert route(linktype, frame, shards) == (deal(linktype, frame, shards), headers_end(linktype, frame))


def test_the_payload_from_where_the_feeder_found_it_is_tcp_payloads() -> None:
    """The reader takes the payload at `payload_at` when the feeder found it (dissect._Lane._parse): it must be
    tcp_payload's bytes, and where the payload is not all there it falls back to tcp_payload (a hole, None)."""
    fast = 0
    for linktype, frame, tcp_len in _shapes():
        index, at = route(linktype, frame, 2)
        if index < 0 or at >= len(frame):
            continue  # not found: the reader asks tcp_payload
        expected = tcp_payload(linktype, frame, tcp_len)
        if at + tcp_len <= len(frame):
            assert frame[at : at + tcp_len] == expected
            fast += 1
        else:
            assert expected is None
    assert fast >= 5  # the whole TCP frames whose header end is certain, and the padded one at each length


def _as_fields(out: bytes) -> list[list[str]]:
    """tshark's lines as values: frame numbers without the padding some versions give them, flags as numbers."""
    rows = []
    for line in out.decode().splitlines():
        f = line.split("\t")
        f[0] = f[0].strip()
        f[-1] = str(int(f[-1], 16)) if f[-1] else ""
        rows.append(f)
    return rows


def test_the_summary_columns_are_the_fields_tshark_would_print(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The plugin asks for its fields as columns of tshark's summary line (-T tabs), half the CPU of -T fields
    (dissect.COLUMNS). Both must give the same values on every frame shape, whole and cut at every length:
    first occurrences in tunnels, empty IPv4 columns for IPv6, nothing for what the filter drops. And a user's
    own preferences hiding a column (gui.column.hidden) must not shift the line."""
    tshark = find_tshark()
    fields_cmd = [tshark.path, "-n", "-r", "-", "-T", "fields", "-E", "separator=/t", "-E", "occurrence=f",
                  "-Y", DISPLAY_FILTER]
    for pref in PREFERENCES:
        fields_cmd += ["-o", pref]
    for name in FIELDS:
        fields_cmd += ["-e", name]
    inner = tcp_ip("10.9.0.1", "10.9.0.2", 41000, 9090, 70, 90, ACK | PSH, BODY[:100])
    extra = [
        (1, ethernet(ipv4("10.0.0.1", "10.0.0.2", inner, proto=4))),  # IPv4 in IPv4: the outer addresses first
        (1, ethernet(ipv6("fd00::1", "fd00::2", inner, proto=4))),
        (1, ethernet_mpls(tcp_ip("10.0.0.1", "10.0.0.2", 40000, 8080, 7, 9, ACK, BODY[:64]))),
        (1, ethernet_pppoe(tcp_ip("10.0.0.1", "10.0.0.2", 40000, 8080, 7, 9, ACK, BODY[:64]))),
        (1, ethernet(ipv4("10.0.0.1", "10.0.0.2", b"\x03\x03\0\0\0\0\0\0" + inner[:48], proto=1))),  # ICMP
    ]
    own = tmp_path / "home" / ".config" / "wireshark"
    own.mkdir(parents=True)
    (own / "preferences").write_text("gui.column.hidden: %Cus:frame.number:1:U,%Cus:ip.src:1:U\n")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "home" / ".config"))
    (tmp_path / "empty").mkdir()
    env = tshark_environment(str(tmp_path / "empty"))
    one = classic_header(1) + classic_record(1.0, ethernet(inner))
    hidden = subprocess.run(tshark_command(tshark), input=one, capture_output=True, timeout=60, check=True)
    assert hidden.stdout.count(b"\t") == len(FIELDS) - 3  # the user's preferences do hide two columns
    compared = 0
    for linktype in (1, 276):
        frames = [f for lt, f, _ in _shapes() if lt == linktype] + [f for lt, f in extra if lt == linktype]
        capture = classic_header(linktype) + b"".join(classic_record(1.0 + i, f) for i, f in enumerate(frames))
        plain = subprocess.run(fields_cmd, input=capture, capture_output=True, timeout=60, check=True)
        ours = subprocess.run(tshark_command(tshark), input=capture, capture_output=True, timeout=60, check=True,
                              env=env)
        assert _as_fields(ours.stdout) == _as_fields(plain.stdout)
        compared += plain.stdout.count(b"\n")
    assert compared > 500  # most shapes at most lengths are TCP to tshark
