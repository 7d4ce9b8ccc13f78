"""Pure pieces of live mode: reading tcpdump's exit counters."""

from __future__ import annotations

from kubectl_mirror.live import kernel_drops


def test_counts_what_the_kernel_dropped() -> None:
    text = "listening on any\n5 packets captured\n8 packets received by filter\n3 packets dropped by kernel\n"
    assert kernel_drops(text) == 3


def test_counts_what_was_still_queued_when_stopped() -> None:
    # Nothing "dropped", but 12 packets were received and never written: lost all the same.
    assert kernel_drops("800 packets captured\n812 packets received by filter\n0 packets dropped by kernel\n") == 12


def test_nothing_lost_and_no_counters() -> None:
    assert kernel_drops("40 packets captured\n40 packets received by filter\n0 packets dropped by kernel\n") == 0
    assert kernel_drops("tcpdump: listening on any, link-type LINUX_SLL2\n") == 0
