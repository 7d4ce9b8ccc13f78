"""HttpLayer, ResponseParser and compare: scripts of actions in, actions out, with real HTTP bytes."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kubectl_mirror.errors import UsageError
from kubectl_mirror.httpdiff import Absent, compare
from kubectl_mirror.httpflow import HttpLayer, HttpStats
from kubectl_mirror.httpopts import HttpOptions, parse_header_match, parse_sample, parse_set_header
from kubectl_mirror.httpresponse import ResponseParser, ResponseRecord
from kubectl_mirror.jsonpath import JsonPath
from kubectl_mirror.model import (
    Abort,
    AbortReason,
    Action,
    BrokenOff,
    Close,
    DeliveryFailed,
    Endpoint,
    Open,
    RequestRecord,
    Send,
    Suppressed,
)
from kubectl_mirror.stack import coalesce

CLIENT = Endpoint("10.0.0.1", 40000)
SERVER = Endpoint("10.0.0.2", 8080)

GET = b"GET /api/items?x=1 HTTP/1.1\r\nHost: shop.local\r\nUser-Agent: curl/8.5.0\r\nAccept: */*\r\n\r\n"
GET2 = b"GET /health HTTP/1.1\r\nHost: shop.local\r\n\r\n"
DELETE = b"DELETE /api/items/7 HTTP/1.1\r\nHost: shop.local\r\nX-Tenant: acme-prod\r\n\r\n"
POST = (
    b"POST /api/items HTTP/1.1\r\nHost: shop.local\r\nContent-Type: application/json\r\nContent-Length: 13\r\n\r\n"
    b'{"name":"ab"}'
)
CHUNKED_HEAD = b"PUT /upload HTTP/1.1\r\nHost: shop.local\r\nTransfer-Encoding: chunked\r\nX-Trace: 1\r\n\r\n"
CHUNKED_BODY = b"5\r\nhello\r\n1;ext=1\r\n \r\n6\r\nworld!\r\n0\r\nX-Sum: 9\r\n\r\n"
CHUNKED = CHUNKED_HEAD + CHUNKED_BODY


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Played:
    """An HttpLayer driven only through `handle_all` / `handle` (tests/playbook.py's shape): `process` returns the
    actions that came out and keeps the records (requests seen, flows suppressed or broken off) for the `pop_*`
    questions, so a test asks about each apart. Nothing inside the layer is read."""

    def __init__(self, layer: HttpLayer) -> None:
        self.layer = layer
        self._requests: list[RequestRecord] = []
        self._suppressed: list[int] = []
        self._aborted: list[int] = []

    def process(self, actions: list[Action]) -> list[Action]:
        out: list[Action] = []
        for command in self.layer.handle_all(actions):
            if isinstance(command, RequestRecord):
                self._requests.append(command)
            elif isinstance(command, Suppressed):
                self._suppressed.append(command.flow)
            elif isinstance(command, BrokenOff):
                self._aborted.append(command.flow)
            else:
                out.append(command)
        return out

    def forget(self, flow: int) -> None:
        assert self.layer.handle(DeliveryFailed(flow)) == []

    def pop_requests(self) -> list[RequestRecord]:
        out, self._requests = self._requests, []
        return out

    def pop_suppressed(self) -> list[int]:
        out, self._suppressed = self._suppressed, []
        return out

    def pop_aborted(self) -> list[int]:
        out, self._aborted = self._aborted, []
        return out

    @property
    def stats(self) -> HttpStats:
        return self.layer.stats

    @property
    def tracked_flows(self) -> int:
        return self.layer.tracked_flows


def layer(**kw: object) -> Played:
    return Played(HttpLayer(HttpOptions(**kw), Clock()))  # type: ignore[arg-type]


def script(*chunks: bytes, flow: int = 1, partial: bool = False, end: str = "close") -> list[Action]:
    actions: list[Action] = [Open(flow, CLIENT, SERVER, partial, 0.0)]
    actions += [Send(flow, c, float(i + 1)) for i, c in enumerate(chunks)]
    if end == "close":
        actions.append(Close(flow, 99.0))
    elif end == "abort":
        actions.append(Abort(flow, AbortReason.HOLE, 99.0))
    return actions


def sent(actions: list[Action], flow: int = 1) -> bytes:
    return b"".join(a.data for a in actions if isinstance(a, Send) and a.flow == flow)


def kinds(actions: list[Action]) -> list[str]:
    return [type(a).__name__ for a in actions]


def feed_each(hl: Played, actions: list[Action]) -> list[Action]:
    """One action per call, as the paced engine does: state must carry across calls."""
    out: list[Action] = []
    for a in actions:
        out += hl.process([a])
    return out


# ---- observing ---------------------------------------------------------------------------------------


def test_inactive_layer_passes_actions_unchanged_and_records_requests() -> None:
    hl = layer()
    actions = script(GET, POST[:30], POST[30:] + GET2)
    out = hl.process(actions)
    assert out == actions and all(a is b for a, b in zip(out, actions, strict=True))
    records = hl.pop_requests()
    assert [(r.index, r.method, r.target, r.host, r.forwarded, r.sent_index) for r in records] == [
        (0, "GET", "/api/items?x=1", "shop.local", True, 0),
        (1, "POST", "/api/items", "shop.local", True, 1),
        (2, "GET", "/health", "shop.local", True, 2),
    ]
    assert [r.ts for r in records] == [1.0, 3.0, 3.0]
    s = hl.stats
    assert (s.requests, s.forwarded, s.filtered) == (3, 3, 0)
    assert hl.pop_requests() == []


def test_inactive_layer_keeps_partial_and_binary_flows_byte_exact() -> None:
    hl = layer()
    actions = script(b"ody-tail}" + GET, partial=True) + script(b"\x16\x03\x01\x00\xa5\x01\x00", flow=2)
    assert hl.process(actions) == actions
    assert hl.stats.skipped_bytes == 0  # observed only: nothing was actually left out
    assert hl.stats.non_http_connections == 1
    assert [r.target for r in hl.pop_requests()] == ["/api/items?x=1"]


# ---- splitting (an active layer, so the bytes go through the splitter) -----------------------------------

# A method filter that lets everything through: the output must then be the input, byte for byte.
ALL = ["GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS"]


def test_keep_alive_three_requests_pass_whole() -> None:
    hl = layer(match_method=ALL)
    out = hl.process(script(GET, POST, GET2))
    assert kinds(coalesce(out)) == ["Open", "Send", "Close"]
    assert [a.ts for a in out if isinstance(a, Send)] == [1.0, 2.0, 2.0, 3.0]  # POST: head, then body
    assert sent(out) == GET + POST + GET2
    assert hl.stats.forwarded == 3


def test_pipelined_requests_in_one_send_are_split_and_filtered() -> None:
    hl = layer(match_method=["get"])
    out = hl.process(script(GET + POST + DELETE + GET2))
    assert sent(out) == GET + GET2
    assert [(r.method, r.forwarded, r.sent_index) for r in hl.pop_requests()] == [
        ("GET", True, 0), ("POST", False, None), ("DELETE", False, None), ("GET", True, 1)
    ]
    s = hl.stats
    assert (s.requests, s.forwarded, s.filtered) == (4, 2, 2)


def test_chunked_upload_at_every_split_point() -> None:
    stream = CHUNKED + GET2
    for cut in range(1, len(stream)):
        hl = layer(match_method=["PUT"])
        out = feed_each(hl, script(stream[:cut], stream[cut:]))
        assert sent(out) == CHUNKED, cut
        assert (hl.stats.forwarded, hl.stats.filtered) == (1, 1), cut


def test_chunked_upload_at_every_pair_of_split_points() -> None:
    stream = b"PUT /u HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n" + CHUNKED_BODY
    for a in range(1, len(stream)):
        for b in range(a, len(stream)):
            hl = layer(match_method=["PUT"])
            out = hl.process(script(stream[:a], stream[a:b], stream[b:]))
            assert sent(out) == stream, (a, b)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=len(GET + CHUNKED + POST + DELETE)), max_size=12))
def test_any_segmentation_gives_the_same_bytes(cuts: list[int]) -> None:
    stream = GET + CHUNKED + POST + DELETE
    points = sorted(set(cuts))
    chunks = [stream[i:j] for i, j in zip([0, *points], [*points, len(stream)], strict=True) if j > i]
    hl = layer(match_method=["PUT", "DELETE"], set_header=[("X-Mirror", "1")])
    out = hl.process(script(*chunks))
    expected_put = CHUNKED_HEAD.replace(b"X-Trace: 1\r\n", b"X-Trace: 1\r\nX-Mirror: 1\r\n") + CHUNKED_BODY
    expected_delete = DELETE.replace(b"\r\n\r\n", b"\r\nX-Mirror: 1\r\n\r\n")
    assert sent(out) == expected_put + expected_delete


def test_expect_100_continue_body_follows_later() -> None:
    head = b"POST /big HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 10\r\n\r\n"
    hl = layer(match_path=["^/big"])
    out = feed_each(hl, script(head, b"01234", b"56789" + GET2))
    # The head goes out as soon as it is complete: the target must be able to answer 100 Continue.
    assert [a.data for a in out if isinstance(a, Send)] == [head, b"01234", b"56789"]
    assert hl.stats.filtered == 1


def test_head_http10_keepalive_and_connection_close_then_more() -> None:
    head_req = b"HEAD /x HTTP/1.1\r\nHost: h\r\n\r\n"
    old = b"GET /old HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"
    closing = b"GET /bye HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n"
    hl = layer(match_method=ALL)
    out = hl.process(script(head_req + old + old + closing + GET2))
    assert sent(out) == head_req + old + old + closing + GET2
    assert [r.target for r in hl.pop_requests()] == ["/x", "/old", "/old", "/bye", "/health"]


def test_blank_lines_between_requests_travel_with_the_next_request() -> None:
    hl = layer(match_path=["^/health"])
    out = hl.process(script(POST + b"\r\n" + GET2 + b"\r\n\r\n" + GET))
    assert sent(out) == b"\r\n" + GET2
    assert hl.stats.requests == 3 and hl.stats.parse_errors == 0


# ---- mid-stream joins ------------------------------------------------------------------------------------


def test_mid_stream_join_inside_a_body_starts_at_the_next_request() -> None:
    tail = b'tems":[1,2,3]}\r\n'  # the end of a body whose head was never captured
    hl = layer(set_header=[("X-Mirror", "1")])
    out = feed_each(hl, script(tail[:5], tail[5:] + GET[:10], GET[10:], partial=True))
    assert sent(out) == GET.replace(b"\r\n\r\n", b"\r\nX-Mirror: 1\r\n\r\n")
    assert hl.stats.skipped_bytes == len(tail)
    assert kinds(out)[0] == "Open" and out[0].partial  # type: ignore[union-attr]


def test_mid_stream_candidate_that_h11_refuses_is_skipped() -> None:
    # A body line that looks like a request line, but what follows is no header block.
    fake = b"chunk of text\nPOST /not-really HTTP/1.1\r\nthis is no header\r\n\r\n"
    hl = layer(match_method=ALL)
    out = hl.process(script(fake + DELETE, partial=True))
    assert sent(out) == DELETE
    assert hl.stats.skipped_bytes == len(fake)
    assert hl.stats.parse_errors == 0


def test_mid_stream_join_on_a_boundary_loses_nothing() -> None:
    hl = layer(match_method=ALL)
    out = hl.process(script(GET2 + GET, partial=True))
    assert sent(out) == GET2 + GET and hl.stats.skipped_bytes == 0


def test_mid_stream_join_that_never_finds_a_request_sends_nothing() -> None:
    hl = layer(set_header=[("X-Mirror", "1")])
    out = hl.process(script(b"no request here\n", b"nor here", partial=True))
    assert kinds(out) == ["Open", "Close"]  # no filter: the connection is opened as captured
    assert hl.stats.skipped_bytes == len(b"no request here\nnor here")


# ---- filters ---------------------------------------------------------------------------------------------


def test_filters_by_path_and_header_are_anded() -> None:
    hl = layer(match_path=[r"^/api/", r"items"], match_header=[("x-tenant", r"^acme-")])
    tenant_get = GET.replace(b"Accept", b"X-TENANT: acme-dev\r\nAccept")
    other = GET.replace(b"Accept", b"X-Tenant: globex\r\nAccept")
    out = hl.process(script(GET + DELETE + tenant_get + other + GET2))
    assert sent(out) == DELETE + tenant_get
    assert (hl.stats.forwarded, hl.stats.filtered) == (2, 3)


def test_repeated_header_matches_when_any_value_does() -> None:
    req = b"GET / HTTP/1.1\r\nHost: h\r\nX-Role: reader\r\nX-Role: admin\r\n\r\n"
    hl = layer(match_header=[("X-Role", "^admin$")])
    assert sent(hl.process(script(req))) == req


def test_connection_with_no_matching_request_is_never_opened() -> None:
    hl = layer(match_method=["DELETE"])
    out = hl.process(script(GET, GET2) + script(DELETE, flow=2))
    assert kinds(out) == ["Open", "Send", "Close"] and all(a.flow == 2 for a in out)
    assert hl.pop_suppressed() == [1]


def test_open_is_held_until_the_first_matching_request_and_keeps_its_fields() -> None:
    hl = layer(match_method=["DELETE"])
    out = hl.process(script(GET, DELETE))
    assert isinstance(out[0], Open) and out[0].ts == 0.0 and out[0].client == CLIENT
    assert [a.ts for a in out[1:]] == [2.0, 99.0]


def test_filtered_request_body_is_not_sent_but_the_next_request_is() -> None:
    hl = layer(match_method=["GET"])
    out = feed_each(hl, script(CHUNKED[:70], CHUNKED[70:] + GET2))
    assert sent(out) == GET2


# ---- rewrites --------------------------------------------------------------------------------------------


def test_set_header_and_rewrite_host_keep_a_chunked_body_byte_exact() -> None:
    hl = layer(set_header=[("x-trace", "mirror"), ("X-Mirror", "yes")], rewrite_host="127.0.0.1:8080")
    out = hl.process(script(CHUNKED[:60], CHUNKED[60:]))
    assert sent(out) == (
        b"PUT /upload HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nTransfer-Encoding: chunked\r\nX-Trace: mirror\r\n"
        b"X-Mirror: yes\r\n\r\n" + CHUNKED_BODY
    )
    assert hl.pop_requests()[0].host == "shop.local"  # the record keeps what production saw


def test_rewrite_host_adds_a_missing_host_and_drops_duplicates() -> None:
    old = b"GET /old HTTP/1.0\r\n\r\n"
    dup = b"GET / HTTP/1.1\r\nHost: a\r\nX-A: 1\r\nX-A: 2\r\n\r\n"
    hl = layer(rewrite_host="local", set_header=[("X-A", "3")])
    out = hl.process(script(old + dup))
    assert sent(out) == (
        b"GET /old HTTP/1.0\r\nHost: local\r\nX-A: 3\r\n\r\n" b"GET / HTTP/1.1\r\nHost: local\r\nX-A: 3\r\n\r\n"
    )


# ---- sampling and rate ----------------------------------------------------------------------------------


def _sampled_flows(seed: int, sample: float) -> list[int]:
    hl = layer(sample=sample, seed=seed)
    actions: list[Action] = []
    for flow in range(1, 401):
        actions += script(GET, flow=flow)
    out = hl.process(actions)
    flows = sorted({a.flow for a in out})
    for flow in flows:  # a sampled connection is complete; an unsampled one has nothing at all
        assert kinds([a for a in out if a.flow == flow]) == ["Open", "Send", "Close"]
    assert hl.stats.sampled_out_connections == 400 - len(flows)
    assert sorted(hl.pop_suppressed()) == sorted(set(range(1, 401)) - set(flows))
    return flows


def test_sampling_is_deterministic_per_seed_and_flow() -> None:
    first = _sampled_flows(7, 0.25)
    assert first == _sampled_flows(7, 0.25)
    assert first != _sampled_flows(8, 0.25)
    assert 60 <= len(first) <= 140  # 100 expected; a binomial this far off is a broken hash
    assert set(first) <= set(_sampled_flows(7, 0.5))  # raising the rate only adds connections
    assert _sampled_flows(7, 0.0) == [] and len(_sampled_flows(7, 1.0)) == 400


def test_max_rps_token_bucket_with_a_fake_clock() -> None:
    clock = Clock()
    hl = Played(HttpLayer(HttpOptions(max_rps=2.0), clock))
    out = hl.process(script(GET, GET, GET, end="none"))
    clock.now = 0.4  # 0.8 token: still not enough
    out += hl.process([Send(1, GET2, 4.0)])
    clock.now = 0.5
    out += hl.process([Send(1, GET2, 5.0), Send(1, GET2, 5.0)])
    assert sent(out) == GET + GET + GET2
    s = hl.stats
    assert (s.requests, s.forwarded, s.rate_limited) == (6, 3, 3)
    assert [r.forwarded for r in hl.pop_requests()] == [True, True, False, False, True, False]


def test_rate_limit_spares_tokens_for_filtered_requests() -> None:
    hl = Played(HttpLayer(HttpOptions(max_rps=1.0, match_method=["DELETE"]), Clock()))
    out = hl.process(script(GET, GET, DELETE))
    assert sent(out) == DELETE and hl.stats.rate_limited == 0


# ---- what is not HTTP ------------------------------------------------------------------------------------

TLS_HELLO = bytes.fromhex("16030100a5010000a10303") + bytes(range(256)) * 2


def test_binary_protocol_passes_byte_exact_without_filters() -> None:
    hl = layer(set_header=[("X-Mirror", "1")], max_rps=1.0)
    out = hl.process(script(TLS_HELLO[:3], TLS_HELLO[3:], b"more"))
    # Judged non-HTTP from its first byte: nothing is held back, each Send goes out as it came.
    assert out == script(TLS_HELLO[:3], TLS_HELLO[3:], b"more")
    assert hl.stats.non_http_connections == 1 and hl.stats.requests == 0


def test_http2_prior_knowledge_is_not_http1() -> None:
    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x12\x04"
    hl = layer(set_header=[("X-Mirror", "1")])
    assert sent(hl.process(script(preface))) == preface
    assert hl.stats.non_http_connections == 1


def test_binary_protocol_with_a_filter_is_not_mirrored() -> None:
    hl = layer(match_method=["GET"])
    assert hl.process(script(TLS_HELLO)) == []
    assert hl.stats.non_http_connections == 1 and hl.pop_suppressed() == [1]


def test_upgrade_tunnel_follows_its_request() -> None:
    ws = b"GET /ws HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
    frames = b"\x81\x85\x37\xfa\x21\x3d\x7f\x9f\x4d\x51\x58"
    kept = layer(match_path=["^/ws"])
    assert sent(kept.process(script(ws + frames[:4], frames[4:]))) == ws + frames
    dropped = layer(match_path=["^/other"])
    assert dropped.process(script(ws + frames[:4], frames[4:])) == []
    assert kept.pop_requests()[0].upgrade and kept.stats.parse_errors == 0



def test_a_declined_upgrade_goes_on_with_the_next_request() -> None:
    # The server answered the Upgrade on HTTP/1.1: the client's next bytes are its next request, not a tunnel.
    up = b"GET /one HTTP/1.1\r\nHost: h\r\nUpgrade: h2c\r\nConnection: Upgrade, HTTP2-Settings\r\n\r\n"
    two = b"GET /two HTTP/1.1\r\nHost: h\r\n\r\n"
    hl = layer(match_path=["^/two"])
    assert sent(hl.process(script(up, two[:6], two[6:]))) == two
    assert [(r.target, r.forwarded) for r in hl.pop_requests()] == [("/one", False), ("/two", True)]


BAD_HEAD = b"PUT /u HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
BAD_BODY = b"5\r\nhello\r\nzz\r\n"  # "zz" is no chunk size


def test_garbage_mid_stream_without_filters_passes_the_rest_unchanged() -> None:
    hl = layer(set_header=[("X-Mirror", "1")])
    bad_chunk = BAD_HEAD + BAD_BODY
    out = hl.process(script(GET2 + bad_chunk[:40], bad_chunk[40:], b"\x00\x01"))
    rewritten = [h.replace(b"\r\n\r\n", b"\r\nX-Mirror: 1\r\n\r\n") for h in (GET2, BAD_HEAD)]
    assert sent(out) == rewritten[0] + rewritten[1] + BAD_BODY + b"\x00\x01"
    assert kinds(out)[-1] == "Close"
    assert hl.stats.parse_errors == 1


def test_garbage_at_a_request_boundary_without_filters() -> None:
    hl = layer(rewrite_host="x")
    out = hl.process(script(GET2 + b"\x00garbage\r\n\r\n" + GET2))
    assert sent(out) == GET2.replace(b"shop.local", b"x") + b"\x00garbage\r\n\r\n" + GET2
    assert hl.stats.parse_errors == 1 and hl.stats.requests == 1


def test_garbage_mid_stream_with_filters_aborts_the_flow() -> None:
    hl = layer(match_method=["PUT", "GET"])
    out = hl.process(script(GET2, BAD_HEAD + BAD_BODY, GET2))
    assert kinds(out) == ["Open", "Send", "Send", "Send", "Abort"]  # the Close after it is not passed on
    assert isinstance(out[-1], Abort) and out[-1].ts == 2.0
    assert hl.pop_aborted() == [1] and hl.stats.parse_errors == 1


def test_garbage_before_anything_was_sent_with_filters_leaves_no_trace() -> None:
    hl = layer(match_method=["DELETE"])
    assert hl.process(script(GET2 + b"\x00\x01\x02\r\n\r\n")) == []
    assert hl.stats.parse_errors == 1 and hl.pop_aborted() == [1] and hl.pop_suppressed() == [1]


def test_client_finishing_inside_a_head() -> None:
    half = GET[:30]
    assert sent(layer(rewrite_host="x").process(script(GET2 + half))) == GET2.replace(b"shop.local", b"x") + half
    assert sent(layer(match_method=ALL).process(script(GET2 + half))) == GET2


def test_abort_from_the_flow_table_passes_and_flow_state_is_freed() -> None:
    hl = layer(match_method=ALL)
    out = hl.process(script(GET2 + GET[:30], end="abort"))
    assert kinds(out) == ["Open", "Send", "Abort"]
    assert hl.tracked_flows == 0


def test_forget_drops_the_state_of_a_given_up_flow() -> None:
    hl = layer(match_method=ALL)
    hl.process(script(GET[:10], end="none"))
    hl.forget(1)
    assert hl.tracked_flows == 0


# ---- options ---------------------------------------------------------------------------------------------


def test_option_parsers() -> None:
    assert parse_header_match("X-Tenant: ^acme: prod$") == ("X-Tenant", "^acme: prod$")
    assert parse_set_header(" X-Mirror :  1 ") == ("X-Mirror", "1")
    assert parse_sample("10%") == pytest.approx(0.1) and parse_sample("0.25") == 0.25 and parse_sample("100%") == 1
    for bad in ("no colon", ": x", "Bad Name: x"):
        with pytest.raises(UsageError):
            parse_set_header(bad)
    with pytest.raises(UsageError):
        parse_header_match("X-A: (unclosed")
    with pytest.raises(UsageError, match="byte-exact"):
        parse_set_header("Content-Length: 5")
    for bad in ("150%", "-0.1", "often"):
        with pytest.raises(UsageError):
            parse_sample(bad)


def test_options_active_and_validation() -> None:
    assert not HttpOptions().active
    assert HttpOptions(sample=0.5).active and HttpOptions(max_rps=3).active
    assert HttpOptions(rewrite_host="h").active and HttpOptions(match_path=["/"]).active
    with pytest.raises(UsageError):
        HttpOptions(max_rps=0)
    with pytest.raises(UsageError):
        HttpOptions(match_path=["("])
    with pytest.raises(UsageError):
        HttpOptions(rewrite_host="a\r\nX: y")


# ---- responses ------------------------------------------------------------------------------------------


def test_response_keep_alive_split_and_timestamps() -> None:
    p = ResponseParser(5)
    p.expect("GET")
    p.expect("POST")
    one = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\nhello"
    two = b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok"
    assert p.feed(one[:20], 1.0) == []
    r1 = p.feed(one[20:] + two[:10], 2.0)
    r2 = p.feed(two[10:], 3.0)
    assert [(r.index, r.status, r.body, r.ts_first_byte, r.ts_end) for r in r1 + r2] == [
        (0, 200, b"hello", 1.0, 2.0), (1, 201, b"ok", 2.0, 3.0)
    ]
    assert r1[0].headers == [("Content-Type", "text/plain"), ("Content-Length", "5")]


def test_response_chunked_head_204_304_and_100_continue() -> None:
    p = ResponseParser(1)
    for method in ("POST", "HEAD", "GET", "GET", "GET"):
        p.expect(method)
    stream = (
        b"HTTP/1.1 100 Continue\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n"  # HEAD: no body despite the length
        b"HTTP/1.1 204 No Content\r\n\r\n"
        b"HTTP/1.1 304 Not Modified\r\nContent-Length: 50\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nz"
    )
    records = [r for i in range(len(stream)) for r in p.feed(stream[i : i + 1], float(i))]
    assert [(r.status, r.body) for r in records] == [(200, b"abcde"), (200, b""), (204, b""), (304, b""), (200, b"z")]
    assert p.error is None


def test_response_waits_for_its_request_and_close_delimited_body() -> None:
    p = ResponseParser(1)
    early = p.feed(b"HTTP/1.0 200 OK\r\n\r\nuntil the", 1.0)
    assert early == []  # no request known yet: held, not guessed
    p.expect("GET")
    assert p.feed(b" end", 2.0) == []
    [record] = p.close(3.0)
    assert (record.body, record.ts_first_byte, record.ts_end) == (b"until the end", 1.0, 3.0)


def test_response_body_is_bounded() -> None:
    p = ResponseParser(1, max_body=4)
    p.expect("GET")
    [r] = p.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n0123456789", 1.0)
    assert (r.body, r.body_size, r.truncated) == (b"0123", 10, True)


def test_response_garbage_stops_parsing() -> None:
    p = ResponseParser(1)
    p.expect("GET")
    assert p.feed(b"\x00\x01 not http\r\n\r\n", 1.0) == []
    assert p.error is not None and p.feed(b"HTTP/1.1 200 OK\r\n\r\n", 2.0) == []


def test_response_switching_protocols() -> None:
    p = ResponseParser(1)
    p.expect("GET", upgrade=True)
    p.expect("GET")
    [r] = p.feed(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n\x81\x00", 1.0)
    assert r.status == 101 and p.error == "the connection switched protocols"


# ---- comparing ------------------------------------------------------------------------------------------


def rec(status: int = 200, body: bytes = b"", headers: list[tuple[str, str]] | None = None) -> ResponseRecord:
    return ResponseRecord(3, 0, status, headers or [], body, 1.0, 2.0, len(body), False)


def test_compare_same_and_status_and_headers() -> None:
    h = [("Content-Type", "application/json"), ("Set-Cookie", "a=1"), ("Set-Cookie", "b=2")]
    assert compare(rec(body=b"x", headers=h), rec(body=b"x", headers=h), headers=["content-type"],
                   ignore_json_paths=[]) is None
    d = compare(rec(200, headers=h), rec(500, headers=[("content-type", "text/html")]),
                headers=["Content-Type", "SET-COOKIE", "X-Absent"], ignore_json_paths=[])
    assert d is not None
    assert [(i.field, i.prod, i.local) for i in d.items] == [
        ("status", 200, 500),
        ("header:content-type", "application/json", "text/html"),
        ("header:set-cookie", "a=1, b=2", Absent.ABSENT),
    ]
    line = json.loads(json.dumps(d.to_json()))
    assert line["differences"][2] == {"field": "header:set-cookie", "prod": "a=1, b=2"}
    assert (line["flow"], line["index"]) == (3, 0)


def test_compare_json_with_ignore_paths() -> None:
    prod = {"timestamp": 1, "items": [{"id": "a", "n": 1}, {"id": "b", "n": 2}],
            "data": {"meta": {"requestId": "r1", "v": 1}}, "deep": {"x": {"trace": "t1"}}}
    local = {"items": [{"n": 1, "id": "z"}, {"id": "y", "n": 2}], "timestamp": 2,
             "data": {"meta": {"requestId": "r2", "v": 1}}, "deep": {"x": {"trace": "t2"}}}
    ignore = ["$.timestamp", "$.items[*].id", "data.meta.requestId", "$..trace"]
    assert compare(rec(body=json.dumps(prod).encode()), rec(body=json.dumps(local).encode()), headers=[],
                   ignore_json_paths=ignore) is None
    d = compare(rec(body=json.dumps(prod).encode()), rec(body=json.dumps(local).encode()), headers=[],
                ignore_json_paths=ignore[:2])
    assert d is not None
    assert [(i.field, i.prod, i.local) for i in d.items] == [
        ("body:$.data.meta.requestId", "r1", "r2"), ("body:$.deep.x.trace", "t1", "t2")
    ]


def test_compare_json_types_lengths_and_missing_keys() -> None:
    d = compare(rec(body=b'{"a": true, "b": [1, 2], "c": 1, "odd key": 1}'),
                rec(body=b'{"a": 1, "b": [1], "c": 1.0, "d": null}'), headers=[], ignore_json_paths=[])
    assert d is not None
    assert [(i.field, i.prod, i.local) for i in d.items] == [
        ("body:$.a", True, 1), ("body:$.b[1]", 2, Absent.ABSENT), ('body:$["odd key"]', 1, Absent.ABSENT),
        ("body:$.d", Absent.ABSENT, None),
    ]


def test_compare_non_json_bodies() -> None:
    assert compare(rec(body=b"<html>a</html>"), rec(body=b"<html>a</html>"), headers=[], ignore_json_paths=[]) is None
    d = compare(rec(body=b"<html>a</html>"), rec(body=b"{}"), headers=[], ignore_json_paths=["$.x"])
    assert d is not None and [(i.field, i.prod, i.local) for i in d.items] == [("body", "<html>a</html>", "{}")]
    big = rec(body=b"x" * 1000)
    d = compare(big, rec(body=b"y"), headers=[], ignore_json_paths=[])
    assert d is not None and d.items[0].prod == "x" * 200 + "... (1000 bytes)"


def test_compare_truncated_bodies_use_the_prefix_and_size() -> None:
    a = ResponseRecord(1, 0, 200, [], b'{"a":', 0.0, 0.0, 100, True)
    b = ResponseRecord(1, 0, 200, [], b'{"a":', 0.0, 0.0, 120, True)
    assert compare(a, a, headers=[], ignore_json_paths=[]) is None
    assert compare(a, b, headers=[], ignore_json_paths=[]) is not None


def test_compare_lists_at_most_a_bounded_number_of_differences() -> None:
    d = compare(rec(body=json.dumps(list(range(500))).encode()), rec(body=json.dumps([-1] * 500).encode()),
                headers=[], ignore_json_paths=[])
    assert d is not None and d.truncated and len(d.items) == 50


def test_json_path_syntax() -> None:
    assert JsonPath("$.a.b").matches(("a", "b")) and not JsonPath("$.a.b").matches(("a",))
    assert JsonPath("a.b").matches(("a", "b"))
    assert JsonPath("$.items[*].id").matches(("items", 3, "id"))
    assert not JsonPath("$.items[*].id").matches(("items", "x", "id", "y"))
    assert JsonPath("$.items[2]").matches(("items", 2)) and not JsonPath("$.items[2]").matches(("items", 1))
    assert JsonPath("$['a.b'][\"c\"]").matches(("a.b", "c"))
    assert JsonPath("$..id").matches(("id",)) and JsonPath("$..id").matches(("x", 0, "id"))
    assert JsonPath("$.*.id").matches(("q", "id"))
    assert JsonPath("$..[0]").matches(("a", "b", 0))
    for bad in ("$", "$.", "$.a[", "$.a[x]", "$..", "$a"):
        with pytest.raises(UsageError):
            JsonPath(bad)


def test_mid_line_after_a_join_only_standard_methods_start_requests() -> None:
    # "FGHPURGE /x HTTP/1.1" is a body's capitals glued to a method-like word: not a request to forward.
    hl = layer(match_method=[*ALL, "FGHPURGE", "PURGE"])
    out = feed_each(hl, script(b"lowercase body text ABCDEFGHPURGE", b" /x HTTP/1.1\r\nHost: h\r\n\r\n" + GET2,
                               partial=True))
    assert sent(out) == GET2


def test_connect_tunnel_follows_its_request() -> None:
    connect = b"CONNECT db.local:5432 HTTP/1.1\r\nHost: db.local:5432\r\n\r\n"
    hl = layer(match_method=["CONNECT"])
    assert sent(hl.process(script(connect + b"\x00\x00\x00\x08\x04\xd2\x16\x2f"))) == connect + bytes.fromhex(
        "0000000804d2162f"
    )


@dataclass
class ServerBytes:
    """Stands for any action that is not the client's (the flow table may pass production's answers on)."""

    flow: int
    data: bytes
    ts: float


def test_other_actions_pass_and_do_not_end_the_flow() -> None:
    reply = ServerBytes(1, b"HTTP/1.1 200 OK\r\n\r\n", 1.5)
    for hl in (layer(), layer(match_method=ALL)):
        actions: list[Any] = [*script(GET, end="none"), reply, Send(1, GET2, 2.0), Close(1, 3.0)]
        out = hl.process(actions)
        assert reply in out and sent(out) == GET + GET2 and hl.stats.requests == 2
    sampled_out = layer(sample=0.0)
    with_reply: list[Any] = [*script(GET, end="none"), reply]
    assert sampled_out.process(with_reply) == []
