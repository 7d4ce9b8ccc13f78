"""atheris harness: dissect.tcp_payload(linktype, frame, tcp_len), and the slow path locate_payload given the
frame's own first TCP ports and sequence number, never raise and return None or exactly tcp_len bytes cut from
the frame."""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    from kubectl_mirror.dissect import locate_payload, tcp_payload

from tests.fuzz.seeds import LINKTYPES


def split(data: bytes) -> tuple[int, int, bytes]:
    """Input layout: link type selector (1 byte), tcp_len (2 bytes, big-endian), the frame."""
    linktype = LINKTYPES[data[0] % len(LINKTYPES)] if data else 1
    tcp_len = int.from_bytes(data[1:3], "big")
    return linktype, tcp_len, data[3:]


def test_one_input(data: bytes) -> None:
    test_locate(data)
    linktype, tcp_len, frame = split(data)
    out = tcp_payload(linktype, frame, tcp_len)
    check(out, tcp_len, frame)


def check(out: bytes | None, tcp_len: int, frame: bytes) -> None:
    if out is None:
        return
    if len(out) != tcp_len or (out and frame.find(out) < 0):
        raise AssertionError(f"returned {len(out)} bytes for tcp_len {tcp_len}, frame {len(frame)} bytes")


def test_locate(data: bytes) -> None:
    linktype, tcp_len, frame = split(data)
    # the 8 bytes tshark would report: taken from somewhere in the frame, so the search has something to find
    at = frame[0] % max(1, len(frame)) if frame else 0
    sig = frame[at : at + 8].ljust(8, b"\0")
    sport, dport, seq = int.from_bytes(sig[:2], "big"), int.from_bytes(sig[2:4], "big"), int.from_bytes(sig[4:], "big")
    out, _ = locate_payload(linktype, frame, sport, dport, seq, tcp_len)
    check(out, tcp_len, frame)


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
