"""The one playbook helper for every sans-I/O layer: events in, the exact commands out.

A layer is anything with `handle(event) -> list[command]` (FlowTable, HttpLayer, TurnTaker, ...). A test plays
events and compares what came out with the commands it expects, in order; it never looks inside the layer.

    assert play(table, c.syn(0.0), c.synack(0.01)) == [Open(1, CLIENT, SERVER, False, 0.0)]

    playbook(layer, [
        (Tick(10.0), []),
        (Send(1, REQ1, 0.0), [Send(1, REQ1, 0.0)]),
    ])

`playbook` checks step by step, so a failure names the first step whose commands differ.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Protocol


class Layer(Protocol):
    def handle(self, event: Any) -> Sequence[Any]: ...


def play(layer: Layer, *events: object) -> list[Any]:
    """Every event through `layer.handle`, in order: all the commands that came out, in order."""
    out: list[Any] = []
    for event in events:
        out += layer.handle(event)
    return out


def playbook(layer: Layer, steps: Iterable[tuple[object | Sequence[object], Sequence[object]]]) -> None:
    """Each step is (an event or a list of events, the exact commands expected from them)."""
    for number, (events, expected) in enumerate(steps, 1):
        batch = list(events) if isinstance(events, list | tuple) else [events]
        got = play(layer, *batch)
        assert got == list(expected), f"step {number} ({batch!r}):\n  got      {got!r}\n  expected {list(expected)!r}"


def of_type(commands: Iterable[object], *types: type) -> list[Any]:
    """The commands of these types, in order (e.g. the records among a layer's actions)."""
    return [c for c in commands if isinstance(c, types)]
