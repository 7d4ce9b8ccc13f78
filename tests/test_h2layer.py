"""The HTTP/2 layer as playbooks: events in, the exact commands out. The captured client and the local server are
the `h2` library's own state machines (real HTTP/2 bytes, no hand-made frames)."""

from __future__ import annotations

from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.settings
import pytest

from kubectl_mirror.h2layer import (
    MAX_RETRIES,
    MAX_WAITING_STREAMS,
    UPGRADE_WAIT,
    Direct,
    Fate,
    H2Layer,
    H2Options,
    StreamDone,
    StreamSeen,
)
from kubectl_mirror.model import Close, EndOfInput, Endpoint, LocalData, Open, Send, Suppressed, Tick
from tests.playbook import of_type, play, playbook

OPEN = Open(1, Endpoint("10.0.0.1", 40000), Endpoint("10.0.0.2", 8080), False, 0.0)


def client(*requests: tuple[str, bytes]) -> bytes:
    """What a real HTTP/2 client sends: preface, SETTINGS, then each (path, body) as one stream (1, 3, 5, ...)."""
    c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    c.initiate_connection()
    for path, body in requests:
        sid = c.get_next_available_stream_id()
        c.send_headers(sid, [(":method", "POST" if body else "GET"), (":scheme", "http"), (":authority", "prod"),
                             (":path", path)], end_stream=not body)
        if body:
            c.increment_flow_control_window(len(body) + 1)  # a client of a server with big windows
            c.send_data(sid, body[:16384], end_stream=len(body) <= 16384)
            for i in range(16384, len(body), 16384):
                c.max_outbound_frame_size = 16384
                c.outbound_flow_control_window = 1 << 30
                c.streams[sid].outbound_flow_control_window = 1 << 30
                c.send_data(sid, body[i:i + 16384], end_stream=i + 16384 >= len(body))
    return c.data_to_send()


class Local:
    """A real HTTP/2 server state machine fed what the layer delivers; it answers 200 to each request."""

    def __init__(self, settings: dict[h2.settings.SettingCodes, int] | None = None) -> None:
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding="utf-8"))
        self.conn.local_settings = h2.settings.Settings(client=False, initial_values=settings or {})
        self.conn.initiate_connection()
        self.requests: list[tuple[int, str]] = []
        self.bodies: dict[int, int] = {}  # body bytes received per stream
        self.unacked: dict[int, int] = {}
        self.trailers: dict[int, dict[str, str]] = {}
        self.answer = True

    def feed(self, commands: list[Any]) -> bytes:
        for c in commands:
            if isinstance(c, Direct) and isinstance(c.action, Send):
                for ev in self.conn.receive_data(c.action.data):
                    if isinstance(ev, h2.events.RequestReceived):
                        self.requests.append((ev.stream_id, dict(ev.headers)[":path"]))  # type: ignore[arg-type, index]
                    elif isinstance(ev, h2.events.DataReceived):
                        self.bodies[ev.stream_id] = self.bodies.get(ev.stream_id, 0) + len(ev.data)
                        self.unacked[ev.stream_id] = self.unacked.get(ev.stream_id, 0) + ev.flow_controlled_length
                    elif isinstance(ev, h2.events.TrailersReceived):
                        self.trailers[ev.stream_id] = dict(ev.headers)  # type: ignore[arg-type]
                    elif isinstance(ev, h2.events.StreamEnded) and self.answer:
                        self.conn.send_headers(ev.stream_id, [(":status", "200")], end_stream=True)
        return self.conn.data_to_send()


def test_http1_and_binary_connections_pass_on_unchanged() -> None:
    layer = H2Layer(H2Options(match_path=["^/a"]))
    get = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n"
    playbook(layer, [
        (OPEN, []),
        (Send(1, get, 0.1), [OPEN, Send(1, get, 0.1)]),
        (Close(1, 0.2), [Close(1, 0.2)]),
    ])
    tls = Open(2, OPEN.client, OPEN.server, False, 0.0)
    assert play(layer, tls, Send(2, b"\x16\x03\x01\x00\x05", 0.1)) == [tls, Send(2, b"\x16\x03\x01\x00\x05", 0.1)]
    assert layer.stats.connections == 0


def test_nothing_set_passes_the_captured_bytes_and_reports_each_stream() -> None:
    layer = H2Layer(H2Options())
    data = client(("/a", b""), ("/b", b""))
    playbook(layer, [
        (OPEN, []),
        (Send(1, data, 0.1), [
            Direct(OPEN),
            StreamSeen(1, 1, "GET", "/a", "prod", None, Fate.FORWARDED, 0.1),
            StreamSeen(1, 3, "GET", "/b", "prod", None, Fate.FORWARDED, 0.1),
            Direct(Send(1, data, 0.1)),
        ]),
        (Close(1, 0.2), [Direct(Close(1, 0.2))]),
    ])


def test_a_filter_reoriginates_only_the_matching_streams_renumbered() -> None:
    layer = H2Layer(H2Options(match_path=["^/b"]))
    local = Local()
    out = play(layer, Tick(5.0), OPEN, Send(1, client(("/a", b""), ("/b", b""), ("/c", b"")), 0.1))
    assert of_type(out, StreamSeen) == [
        StreamSeen(1, 1, "GET", "/a", "prod", None, Fate.FILTERED, 0.1),
        StreamSeen(1, 3, "GET", "/b", "prod", None, Fate.FORWARDED, 0.1),
        StreamSeen(1, 5, "GET", "/c", "prod", None, Fate.FILTERED, 0.1),
    ]
    assert next(c.action for c in out if isinstance(c, Direct)) == OPEN
    settings = local.feed(out)
    answer = local.feed(play(layer, LocalData(1, settings, 5.1)))  # its SETTINGS: the stream starts
    assert local.requests == [(1, "/b")]  # its own stream 1, not the captured 3
    [result] = of_type(play(layer, LocalData(1, answer, 5.5)), StreamDone)
    assert (result.stream, result.seen.path, result.local and result.local.status) == (3, "/b", 200)
    # The captured end waits for nothing more: GOAWAY, then the FIN.
    end = play(layer, Close(1, 0.3))
    assert [type(c.action) for c in end if isinstance(c, Direct)] == [Send, Close]


def test_a_connection_whose_streams_all_fail_the_filter_never_opens() -> None:
    layer = H2Layer(H2Options(match_grpc=["shop.Cart"]))
    data = client(("/a", b""))
    playbook(layer, [
        (OPEN, []),
        (Send(1, data, 0.1), [StreamSeen(1, 1, "GET", "/a", "prod", None, Fate.FILTERED, 0.1)]),
        (Close(1, 0.2), [Suppressed(1)]),
    ])
    assert (layer.stats.streams, layer.stats.filtered, layer.tracked_flows) == (1, 1, 0)


def test_flow_control_holds_a_large_body_until_the_local_server_opens_its_window() -> None:
    body = b"x" * 200_000
    layer = H2Layer(H2Options(set_header=[("x-mirror", "1")]))
    local = Local()
    settings = local.feed(play(layer, OPEN, Send(1, client(("/up", body)), 0.1)))
    local.feed(play(layer, LocalData(1, settings, 0.5)))  # its SETTINGS: the stream starts
    assert local.bodies[1] <= 65535  # the local server's initial window: the rest waits in the layer
    for _ in range(50):  # bounded: each round trip opens the windows a little further
        for sid, n in local.unacked.items():
            local.conn.acknowledge_received_data(n, sid)
        local.unacked.clear()
        answer = local.conn.data_to_send()
        if not answer or local.bodies[1] == len(body):
            break
        local.feed(play(layer, LocalData(1, answer, 1.0)))
    assert local.bodies[1] == len(body)
    assert local.requests == [(1, "/up")]


def test_the_local_limit_on_concurrent_streams_is_kept() -> None:
    layer = H2Layer(H2Options(set_header=[("x-mirror", "1")]))
    local = Local({h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 1})
    local.answer = False
    settings = local.feed(play(layer, OPEN, Send(1, client(("/a", b""), ("/b", b"")), 0.1)))
    assert local.requests == []  # no stream before the local server's SETTINGS
    local.feed(play(layer, LocalData(1, settings, 1.0)))  # its SETTINGS: one stream at a time
    assert local.requests == [(1, "/a")]
    local.conn.send_headers(1, [(":status", "200")], end_stream=True)
    local.feed(play(layer, LocalData(1, local.conn.data_to_send(), 1.1)))
    assert local.requests == [(1, "/a"), (3, "/b")]


def test_a_local_ping_is_answered_and_goaway_refuses_later_streams() -> None:
    layer = H2Layer(H2Options(match_path=["/"]))
    local = Local()
    one, two = client(("/a", b"")), client(("/a", b""), ("/b", b""))
    assert two.startswith(one)
    settings = local.feed(play(layer, OPEN, Send(1, one, 0.1)))
    local.feed(play(layer, LocalData(1, settings, 0.5)))
    local.conn.ping(b"12345678")
    out = play(layer, LocalData(1, local.conn.data_to_send(), 1.0))
    assert out == [Direct(Send(1, b"\x00\x00\x08\x06\x01\x00\x00\x00\x0012345678", 1.0))]  # PING, ACK
    local.conn.close_connection(last_stream_id=1)
    assert play(layer, LocalData(1, local.conn.data_to_send(), 1.1)) == []
    assert play(layer, Send(1, two[len(one):], 0.2)) == [
        StreamSeen(1, 3, "GET", "/b", "prod", None, Fate.REFUSED, 0.2)]
    assert (layer.stats.forwarded, layer.stats.refused) == (1, 1)


def reoriginated_to_silent_local(*requests: tuple[str, bytes]) -> tuple[H2Layer, Local]:
    """A re-originated connection whose requests reached a local server that has not answered them yet."""
    layer = H2Layer(H2Options(set_header=[("x-mirror", "1")]))
    local = Local()
    local.answer = False
    settings = local.feed(play(layer, OPEN, Send(1, client(*requests), 0.1)))
    local.feed(play(layer, LocalData(1, settings, 0.5)))
    return layer, local


def refuse_all(layer: H2Layer, local: Local, at: float) -> list[Any]:
    """The local server refuses every stream it has not answered (RST_STREAM REFUSED_STREAM), as grpcio does with
    the streams it counts over its limit; what the layer does next."""
    for sid in [sid for sid, _ in local.requests if local.conn.streams.get(sid) is not None
                and not local.conn.streams[sid].closed]:
        local.conn.reset_stream(sid, h2.errors.ErrorCodes.REFUSED_STREAM)
    return play(layer, LocalData(1, local.conn.data_to_send(), at))


def test_a_stream_the_local_server_refuses_unprocessed_is_sent_again() -> None:
    layer, local = reoriginated_to_silent_local(("/up", b"hello"))
    assert local.requests == [(1, "/up")] and local.bodies == {1: 5}
    local.answer = True
    answer = local.feed(refuse_all(layer, local, 0.6))
    assert local.requests == [(1, "/up"), (3, "/up")] and local.bodies == {1: 5, 3: 5}  # the same request again
    done = of_type(play(layer, LocalData(1, answer, 0.7)), StreamDone)
    assert [(d.stream, d.local.status if d.local else None) for d in done] == [(1, 200)]
    assert (layer.stats.forwarded, layer.stats.refused, layer.stats.retried) == (1, 0, 1)


def test_a_stream_refused_again_and_again_is_given_up_after_the_retries() -> None:
    layer, local = reoriginated_to_silent_local(("/a", b""))
    done: list[StreamDone] = []
    for i in range(MAX_RETRIES + 3):  # bounded: the layer stops sending it after MAX_RETRIES
        out = refuse_all(layer, local, 1.0 + i)
        done += of_type(out, StreamDone)
        local.feed(out)
    assert [path for _, path in local.requests] == ["/a"] * (1 + MAX_RETRIES)
    assert layer.stats.retried == MAX_RETRIES
    done += of_type(play(layer, EndOfInput()), StreamDone)
    assert [(d.stream, d.local.status if d.local else None) for d in done] == [(1, None)]  # reported once, unanswered


def test_max_rps_counts_streams_on_the_bucket_it_is_given() -> None:
    budget = [2]

    def admit() -> bool:  # the HTTP/1.x layer's bucket, shared: two requests left in this second
        budget[0] -= 1
        return budget[0] >= 0

    layer = H2Layer(H2Options(max_rps=2.0), admit=admit)
    out = play(layer, OPEN, Send(1, client(("/a", b""), ("/b", b""), ("/c", b"")), 0.1))
    assert [(s.path, s.fate) for s in of_type(out, StreamSeen)] == [
        ("/a", Fate.FORWARDED), ("/b", Fate.FORWARDED), ("/c", Fate.RATE_LIMITED)]
    assert (layer.stats.forwarded, layer.stats.rate_limited) == (2, 1)


def test_request_trailers_follow_a_body_held_back_by_flow_control() -> None:
    c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    c.initiate_connection()
    c.send_headers(1, [(":method", "POST"), (":scheme", "http"), (":authority", "prod"), (":path", "/up")])
    c.increment_flow_control_window(1 << 20)
    c.outbound_flow_control_window = c.streams[1].outbound_flow_control_window = 1 << 30
    for i in range(0, 100_000, 16384):
        c.send_data(1, b"y" * min(16384, 100_000 - i))
    c.send_headers(1, [("x-checksum", "abc")], end_stream=True)
    layer = H2Layer(H2Options(set_header=[("x-mirror", "1")]))
    local = Local()
    settings = local.feed(play(layer, OPEN, Send(1, c.data_to_send(), 0.1)))
    local.feed(play(layer, LocalData(1, settings, 0.5)))
    assert local.bodies[1] <= 65535 and local.trailers == {}  # the trailers wait behind the body
    for _ in range(50):  # bounded: each round trip opens the windows a little further
        for sid, n in local.unacked.items():
            local.conn.acknowledge_received_data(n, sid)
        local.unacked.clear()
        answer = local.conn.data_to_send()
        if not answer:
            break
        local.feed(play(layer, LocalData(1, answer, 1.0)))
    assert local.bodies[1] == 100_000 and local.trailers == {1: {"x-checksum": "abc"}}


UPGRADE = (b"GET /one HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
           b"HTTP2-Settings: \r\n\r\n")


def test_an_upgrade_request_alone_decides_nothing_and_a_declined_one_goes_on_in_http1() -> None:
    layer = H2Layer(H2Options(match_path=["^/"]))
    two = b"GET /two HTTP/1.1\r\nHost: x\r\n\r\n"
    playbook(layer, [
        (OPEN, []),
        (Send(1, UPGRADE, 0.1), []),  # held: the server may take it or not
        # The client's next bytes are an HTTP/1.1 request: the server declined; every request goes on.
        (Send(1, two, 0.3), [OPEN, Send(1, UPGRADE, 0.1), Send(1, two, 0.3)]),
        (Close(1, 0.4), [Close(1, 0.4)]),
    ])
    assert (layer.stats.connections, layer.tracked_flows) == (0, 0)


def test_production_answering_an_upgrade_with_200_decides_at_once() -> None:
    from kubectl_mirror.model import Reply

    layer = H2Layer(H2Options(match_path=["^/"]), comparing=True)
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n"
    playbook(layer, [
        (OPEN, []),
        (Send(1, UPGRADE, 0.1), []),
        (Reply(1, answer, 0.2), [OPEN, Send(1, UPGRADE, 0.1), Reply(1, answer, 0.2)]),
    ])


def test_the_preface_after_an_upgrade_request_makes_it_http2() -> None:
    from kubectl_mirror.model import Reply

    layer = H2Layer(H2Options())
    switching = b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n"
    preface = client()
    out = play(layer, OPEN, Send(1, UPGRADE, 0.1), Reply(1, switching, 0.2))
    assert out == []  # a 101 alone: the client's preface is still to come
    out = play(layer, Send(1, preface, 0.3))
    assert out[0] == Direct(OPEN) and of_type(out, StreamSeen)[0].path == "/one"
    assert [c.action for c in out if isinstance(c, Direct) and isinstance(c.action, Send)] == [
        Send(1, UPGRADE, 0.1), Send(1, preface, 0.3)]
    assert (layer.stats.connections, layer.stats.upgraded) == (1, 1)


def test_an_upgrade_request_whose_connection_ends_without_a_101_is_http1() -> None:
    layer = H2Layer(H2Options(match_path=["^/"]))
    assert play(layer, OPEN, Send(1, UPGRADE, 0.1), Close(1, 0.2)) == [OPEN, Send(1, UPGRADE, 0.1), Close(1, 0.2)]


def many_streams(n: int) -> list[bytes]:
    """A real client's long-lived connection: n gRPC calls, one chunk of bytes per call (preface first)."""
    c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    c.initiate_connection()
    chunks = [c.data_to_send()]
    for _ in range(n):
        sid = c.get_next_available_stream_id()
        c.send_headers(sid, [(":method", "POST"), (":scheme", "http"), (":authority", "prod"),
                             (":path", "/shop.Cart/Get"), ("content-type", "application/grpc")])
        c.send_data(sid, b"\x00\x00\x00\x00\x02hi", end_stream=True)
        chunks.append(c.data_to_send())
        c.streams.pop(sid)  # the client side of this model only: a real client forgets its answered calls
    return chunks


@pytest.mark.parametrize("options", [H2Options(), H2Options(match_grpc=["shop.Cart"])])
@pytest.mark.parametrize("comparing", [False, True])
def test_streams_waiting_for_a_local_service_that_never_answers_stay_bounded(options: H2Options,
                                                                           comparing: bool) -> None:
    # The local service is a sink: it never answers (not even SETTINGS). Past MAX_WAITING_STREAMS waiting on
    # the connection, the oldest is reported unanswered and counted, so memory does not grow with the connection.
    n = MAX_WAITING_STREAMS + 500
    layer = H2Layer(options, comparing=comparing)
    layer.handle(OPEN)
    done: list[StreamDone] = []
    most = 0
    for i, chunk in enumerate(many_streams(n)):
        done += of_type(layer.handle(Send(1, chunk, 0.001 * i)), StreamDone)
        most = max(most, layer.waiting_streams)
    assert most == MAX_WAITING_STREAMS
    assert [d.stream for d in done] == [2 * i + 1 for i in range(500)]  # the oldest, in order
    assert all(d.local is None for d in done)
    assert (layer.stats.forwarded, layer.stats.abandoned) == (n, 500)
    end = of_type(layer.handle(EndOfInput()), StreamDone)
    assert len(end) == MAX_WAITING_STREAMS and layer.waiting_streams == 0


def test_an_upgrade_request_left_idle_goes_on_as_http1_after_the_wait() -> None:
    # A declined upgrade on a kept-alive connection: no next request, no end, no server bytes (no --compare).
    layer = H2Layer(H2Options(match_path=["^/"]))
    assert play(layer, Tick(5.0), OPEN, Send(1, UPGRADE, 5.0)) == []
    assert layer.holding and layer.next_deadline() == 5.0 + UPGRADE_WAIT
    assert play(layer, Tick(5.5)) == []
    assert play(layer, Tick(5.0 + UPGRADE_WAIT)) == [OPEN, Send(1, UPGRADE, 5.0)]
    assert not layer.holding and layer.next_deadline() is None
    two = b"GET /two HTTP/1.1\r\nHost: x\r\n\r\n"
    assert play(layer, Send(1, two, 9.0)) == [Send(1, two, 9.0)]
