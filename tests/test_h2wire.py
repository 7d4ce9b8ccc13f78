"""h2wire: HTTP/2 decoded passively from both directions of real captures (nghttp2, curl, grpcio)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kubectl_mirror.h2wire import PREFACE, Exchange, Exchanges, State, connection, grpc_messages
from tests import h2_captures
from tests.h2_captures import BIG


@pytest.fixture(scope="module")
def pcaps(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("h2wire")
    return {kind: h2_captures.make(kind, root) for kind in ("h2load", "curl", "upgrade", "grpc")}


def decode(pcap: Path) -> list[tuple[Exchanges, list[Exchange]]]:
    out = []
    for partial, chunks in h2_captures.flows(pcap):
        conn = Exchanges(partial)
        done: list[Exchange] = []
        for from_client, data, ts in chunks:
            done += conn.client_bytes(data, ts) if from_client else conn.server_bytes(data, ts)
        out.append((conn, done))
    return out


@pytest.mark.netns
def test_h2load_streams_all_decoded(pcaps: dict[str, Path]) -> None:
    conns = decode(pcaps["h2load"])
    assert len(conns) == 2
    exchanges = [ex for conn, done in conns for ex in done]
    assert all(conn.state is State.FRAMES and not conn.pending() for conn, _ in conns)
    assert len(exchanges) == 400
    assert Counter(ex.path for ex in exchanges) == {"/a": 200, "/b": 200}
    assert {ex.status for ex in exchanges} == {200}
    assert {bytes(ex.response.body) for ex in exchanges if ex.path == "/a"} == {b"hello from /a\n"}
    assert {ex.response.body_size for ex in exchanges if ex.path == "/b"} == {10240}


@pytest.mark.netns
def test_a_10mb_request_body_is_decoded_whole(pcaps: dict[str, Path]) -> None:
    (_, get), (_, post) = decode(pcaps["curl"])
    assert [(ex.method, ex.path, ex.status) for ex in get] == [("GET", "/a", 200)]
    assert [(ex.method, ex.path, ex.status) for ex in post] == [("POST", "/big", 200)]
    assert post[0].request.body_size == BIG
    assert json.loads(bytes(post[0].response.body))["size"] == BIG


@pytest.mark.netns
def test_an_h2c_upgrade_is_stream_1(pcaps: dict[str, Path]) -> None:
    [(conn, done)] = decode(pcaps["upgrade"])
    assert conn.client.upgraded and conn.server.upgraded and conn.state is State.FRAMES
    [ex] = done
    assert (ex.stream, ex.method, ex.path, ex.status) == (1, "GET", "/up", 200)
    assert ex.request.header(":authority") == f"198.18.0.2:{h2_captures.PORT}"
    assert json.loads(bytes(ex.response.body))["path"] == "/up"


@pytest.mark.netns
def test_grpc_calls_statuses_messages_and_evicted_hpack_entries(pcaps: dict[str, Path]) -> None:
    [(conn, done)] = decode(pcaps["grpc"])
    assert conn.state is State.FRAMES and not conn.pending()
    methods = Counter(ex.grpc_method for ex in done)
    assert methods == {"mirror.Test/Get": 301, "mirror.Test/List": 1, "mirror.Test/Put": 1, "mirror.Test/Chat": 1}
    assert {ex.grpc_status for ex in done} == {0}
    # Every call's own metadata value, though the dynamic tables evicted entries hundreds of times over.
    calls = sorted(ex.request.header("x-call") or "" for ex in done if ex.path.endswith("/Get"))
    assert calls == [f"{i:04d}-" + "v" * 115 for i in range(301)]
    gets = {ex.request.header("x-call"): ex for ex in done if ex.path.endswith("/Get")}
    ex = gets["0042-" + "v" * 115]
    assert grpc_messages(bytes(ex.request.body)) == [(False, b"42")]
    assert grpc_messages(bytes(ex.response.body)) == [(False, b"item:42")]
    [listed] = [ex for ex in done if ex.path.endswith("/List")]
    assert grpc_messages(bytes(listed.response.body)) == [(False, b"l-%d" % i) for i in range(5)]
    [chat] = [ex for ex in done if ex.path.endswith("/Chat")]
    assert grpc_messages(bytes(chat.request.body)) == [(False, b"x"), (False, b"y"), (False, b"z")]
    assert grpc_messages(bytes(chat.response.body)) == [(False, b"re:x"), (False, b"re:y"), (False, b"re:z")]


@pytest.mark.netns
def test_a_connection_joined_mid_stream_is_never_decoded(pcaps: dict[str, Path], tmp_path: Path) -> None:
    cut = h2_captures.cut_head(pcaps["grpc"], 12, tmp_path / "cut.pcap")
    [(conn, done)] = decode(cut)
    assert conn.state is State.UNDECODABLE and done == [] and conn.streams == 0


def test_not_http2() -> None:
    plain = Exchanges()
    assert plain.client_bytes(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", 0.0) == []
    assert plain.state is State.NOT_H2
    binary = Exchanges()
    binary.client_bytes(b"\x16\x03\x01\x02\x00", 0.0)  # a TLS ClientHello stays opaque
    assert binary.state is State.NOT_H2


def test_an_upgrade_the_server_declined_is_not_http2() -> None:
    conn = Exchanges()
    conn.client_bytes(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
                      b"HTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n", 0.0)
    conn.server_bytes(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", 0.1)
    conn.client_bytes(b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n", 0.2)
    assert conn.server.state is State.NOT_H2 and conn.state is State.NOT_H2


def test_grpc_framing_that_does_not_add_up() -> None:
    assert grpc_messages(b"\x00\x00\x00\x00\x05abc") is None
    assert grpc_messages(b"\x00\x00\x00\x00\x00") == [(False, b"")]


def test_an_upgrade_request_with_a_body_is_stream_1_with_its_data() -> None:
    conn = Exchanges()
    head = (b"POST /up HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
            b"HTTP2-Settings: AAMAAABkAAQAAP__\r\nContent-Length: 10\r\n\r\n")
    conn.client_bytes(head + b"01234", 0.0)
    conn.client_bytes(b"56789", 0.1)  # the rest of the body in a later segment
    frames = conn.client.feed(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
    assert frames == [] and conn.state is State.FRAMES and conn.client.upgraded
    [pending] = conn.pending()
    assert (pending.stream, pending.method, pending.path, bytes(pending.request.body)) == (1, "POST", "/up",
                                                                                          b"0123456789")
    assert pending.request.ended and pending.request.header(":authority") == "x"


def test_an_endless_header_block_stops_decoding_instead_of_growing() -> None:
    import hyperframe.frame as hf

    client, _ = connection()
    head = hf.HeadersFrame(1)
    head.data = b"\x82"  # :method GET, and no END_HEADERS: CONTINUATIONs follow
    more = hf.ContinuationFrame(1)
    more.data = b"\x00" * 16000
    stream = PREFACE + head.serialize() + more.serialize() * 80  # 1.28 MB of one header block
    assert client.feed(stream) == []
    assert client.state is State.BROKEN and "header block" in (client.error or "")


def _frames_of_a_real_client() -> bytes:
    import h2.config
    import h2.connection

    c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    c.initiate_connection()
    for i in range(3):
        sid = c.get_next_available_stream_id()
        c.send_headers(sid, [(":method", "POST"), (":scheme", "http"), (":authority", "a"), (":path", f"/p{i}"),
                             ("content-type", "application/grpc"), ("x-n", "v" * i * 40)])
        c.send_data(sid, b"\x00\x00\x00\x00\x02hi", end_stream=True)
    return c.data_to_send()


REAL = _frames_of_a_real_client()


@given(st.binary(max_size=400), st.integers(0, len(REAL)), st.integers(1, 64))
@settings(max_examples=300, deadline=None)
def test_damaged_bytes_never_raise_out_of_the_decoder(junk: bytes, at: int, chunk: int) -> None:
    # A capture holds whatever was on the wire: the decoder stops (BROKEN, NOT_H2) but never raises.
    data = REAL[:at] + junk + REAL[at:]
    for partial in (False, True):
        conn = Exchanges(partial)
        for i in range(0, len(data), chunk):
            conn.client_bytes(data[i:i + chunk], 0.0)
            conn.server_bytes(junk[:chunk], 0.0)
        assert conn.state in (State.FRAMES, State.BROKEN, State.NOT_H2, State.UNDECODABLE, State.UPGRADE, State.START)


@given(st.lists(st.tuples(st.integers(24, len(REAL) - 1), st.integers(1, 255)), min_size=1, max_size=6))
@settings(max_examples=400, deadline=None)
def test_flipped_bytes_never_raise_out_of_the_decoder(flips: list[tuple[int, int]]) -> None:
    data = bytearray(REAL)
    for at, xor in flips:
        data[at] ^= xor
    conn = Exchanges()
    done = conn.client_bytes(bytes(data), 0.0)
    assert conn.state in (State.FRAMES, State.BROKEN)
    assert done == []  # no answer was fed: nothing is whole
