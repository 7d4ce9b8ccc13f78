"""The plugin's CLI with one workaround, for `run.py --workaround-gap-lock` only; never what `make soak` runs.

kubectl_mirror.capture.LiveCapture writes the merged stream while holding `_lock`, and `pop_gaps()` (called by
the engine's loop, the thread that also reads tshark's output) takes the same lock. Once the stream's pipe is
full, the capture thread blocks in write() holding the lock, the loop blocks in pop_gaps(), tshark blocks on
its full stdout, the feeder on tshark's stdin: nothing drains the pipe again (reported to the lead). Here
pop_gaps() skips a turn when the lock is busy, so the soak can still measure everything else.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "pkg"))

from kubectl_mirror import capture
from kubectl_mirror.cli import main


def pop_gaps(self: capture.LiveCapture) -> list[capture.Gap]:
    if not self._lock.acquire(blocking=False):
        return []  # a write is in progress: the gaps are taken on a later turn
    try:
        gaps: list[capture.Gap] = self._gaps
        self._gaps = []
    finally:
        self._lock.release()
    return gaps


setattr(capture.LiveCapture, "pop_gaps", pop_gaps)  # noqa: B010  (a patch, on purpose)

if __name__ == "__main__":
    sys.exit(main(sys.argv))
