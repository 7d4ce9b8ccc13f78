"""atheris harness: bytes -> a script of segments of a few flows (tests/fuzz/sequencer_ops.py) -> FlowTable.

feed, tick, give_up, interrupt and finish must never raise, and every flow's Sends must be its stream's bytes from
a place the stream can start, with one end action, and nothing left in memory after finish().
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    from kubectl_mirror import reassemble  # noqa: F401  (instrumented for coverage before sequencer_ops uses it)

from tests.fuzz.sequencer_ops import decode, run


def test_one_input(data: bytes) -> None:
    cfg, ops = decode(data)
    run(cfg, ops)


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
