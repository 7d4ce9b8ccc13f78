"""atheris harness: PcapReader over arbitrary bytes, whole and in short reads; only InputError may come out.

Run by `make fuzz` as `python -m tests.fuzz.fuzz_pcap CORPUS_DIR -max_total_time=N`. FUZZ_STRICT=1 also fails on
the bugs already reported in tests/fuzz/known.py.
"""

from __future__ import annotations

import io
import os
import sys

import atheris

with atheris.instrument_imports():
    from kubectl_mirror.decompress import MAGIC_LEN, compression
    from kubectl_mirror.errors import InputError
    from kubectl_mirror.pcap import MAX_CAPLEN, PcapReader

from tests.fuzz.known import known_pcap_bug

STRICT = os.environ.get("FUZZ_STRICT") == "1"


class _Pipe(io.RawIOBase):
    """Short reads of a fixed size, as a pipe delivers them; the size comes from the input's first byte."""

    def __init__(self, data: bytes, step: int) -> None:
        self._data, self._pos, self._step = data, 0, step

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        n = self._step if size < 0 else min(size, self._step)
        out = self._data[self._pos : self._pos + n]
        self._pos += len(out)
        return out


# A compressed input can expand a thousandfold: its records are bounded by this, not by the input's size.
MAX_EXPANDED = 64 << 20


def _read(data: bytes, stream: io.RawIOBase | io.BytesIO) -> tuple[list[bytes], str | None]:
    raws: list[bytes] = []
    size = MAX_EXPANDED if compression(data[:MAGIC_LEN]) else len(data)
    try:
        for rec in PcapReader(stream):  # type: ignore[arg-type]
            if not len(rec.data) <= len(rec.raw) <= size or len(rec.data) > MAX_CAPLEN:
                raise AssertionError(f"record of {len(rec.data)} bytes in {len(rec.raw)} raw, input {len(data)}")
            raws.append(rec.raw)
            if len(raws) > size // 12:
                raise AssertionError("more records than the input can hold")
    except InputError as exc:
        msg = str(exc)
        if not msg or "\n" in msg or "\r" in msg:
            raise AssertionError(f"InputError message is not one line: {msg!r}") from None
        return raws, msg
    except Exception as exc:
        if STRICT or known_pcap_bug(exc, data) is None:
            raise
        return raws, "known bug"
    return raws, None


def test_one_input(data: bytes) -> None:
    if not data:
        return
    step = data[0] % 13 + 1
    body = data[1:]
    whole, err = _read(body, io.BytesIO(body))
    trickled, err2 = _read(body, _Pipe(body, step))
    # how the bytes arrive must not change what is read (the known bugs lose a batch, which depends on it)
    if "known bug" not in (err, err2) and (whole != trickled or (err is None) != (err2 is None)):
        raise AssertionError(f"whole read {len(whole)} records ({err}), short reads {len(trickled)} ({err2})")


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
