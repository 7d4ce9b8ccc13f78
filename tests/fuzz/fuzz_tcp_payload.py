"""atheris harness: dissect.tcp_payload(linktype, frame, tcp_len) never raises and returns None or exactly
tcp_len bytes cut from the frame."""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    from kubectl_mirror.dissect import tcp_payload

from tests.fuzz.seeds import LINKTYPES


def split(data: bytes) -> tuple[int, int, bytes]:
    """Input layout: link type selector (1 byte), tcp_len (2 bytes, big-endian), the frame."""
    linktype = LINKTYPES[data[0] % len(LINKTYPES)] if data else 1
    tcp_len = int.from_bytes(data[1:3], "big")
    return linktype, tcp_len, data[3:]


def test_one_input(data: bytes) -> None:
    linktype, tcp_len, frame = split(data)
    out = tcp_payload(linktype, frame, tcp_len)
    if out is None:
        return
    if len(out) != tcp_len or (out and frame.find(out) < 0):
        raise AssertionError(f"tcp_payload returned {len(out)} bytes for tcp_len {tcp_len}, frame {len(frame)} bytes")


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
