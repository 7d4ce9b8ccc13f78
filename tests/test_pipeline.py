"""The engine's pure pieces: batching of actions."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from kubectl_mirror.model import Abort, AbortReason, Action, Close, Endpoint, Open, Send
from kubectl_mirror.stack import coalesce

C, S = Endpoint("10.0.0.1", 4000), Endpoint("10.0.0.2", 80)


def test_consecutive_sends_of_a_flow_become_one() -> None:
    acts: list[Action] = [Open(1, C, S, False, 0.0), Send(1, b"ab", 0.1), Send(2, b"x", 0.1), Send(1, b"cd", 0.2),
                          Send(1, b"e", 0.3), Close(1, 0.4), Send(2, b"y", 0.5)]
    assert coalesce(acts) == [Open(1, C, S, False, 0.0), Send(1, b"abcde", 0.1), Send(2, b"xy", 0.1), Close(1, 0.4)]


def test_nothing_merges_across_another_action_of_the_same_flow() -> None:
    acts: list[Action] = [Send(1, b"a", 0.0), Abort(1, AbortReason.RESET, 0.1), Open(1, C, S, False, 0.2),
                          Send(1, b"b", 0.3)]
    assert coalesce(acts) == acts


def per_flow(actions: list[Action]) -> dict[int, list[tuple[str, bytes]]]:
    """Each flow's actions with Sends' bytes concatenated between its other actions: what its socket sees."""
    out: dict[int, list[tuple[str, bytes]]] = {}
    for a in actions:
        seq = out.setdefault(a.flow, [])
        if isinstance(a, Send):
            if seq and seq[-1][0] == "send":
                seq[-1] = ("send", seq[-1][1] + a.data)
            else:
                seq.append(("send", a.data))
        else:
            seq.append((type(a).__name__, b""))
    return out


action = st.one_of(
    st.builds(Send, st.integers(1, 3), st.binary(min_size=1, max_size=4), st.just(0.0)),
    st.builds(Close, st.integers(1, 3), st.just(0.0)),
    st.builds(Abort, st.integers(1, 3), st.just(AbortReason.HOLE), st.just(0.0)),
)


@given(st.lists(action, max_size=40))
def test_every_socket_sees_the_same_bytes_and_events(actions: list[Action]) -> None:
    merged = coalesce(actions)
    assert per_flow(merged) == per_flow(actions)
    assert len(merged) <= len(actions)
