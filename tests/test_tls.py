"""TLS anywhere: connections that open with a ClientHello are not replayed to a plaintext --to.

Unit tests of the sans-I/O detector and gate on real ClientHello bytes (Python ssl over memory BIOs), and
end to end: curl speaking HTTPS to a real TLS server in a "pod" namespace, captured with tcpdump, replayed
into a stock Node.js HTTP server, and with --tls-passthrough into a real local TLS server.
"""

from __future__ import annotations

import json
import signal
import ssl
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme

from kubectl_mirror.model import Abort, AbortReason, Action, Close, Endpoint, Open, Reply, Send, Turn
from kubectl_mirror.tlsgate import KubeletProbe, TlsFlow, TlsGate, client_hello
from tests.netlab.capture import Capture
from tests.netlab.lab import REPO, NsRecorder, run_cli
from tests.netlab.netns import Link, Netns, veth_lab
from tests.netlab.recorder import ConnRecord
from tests.netlab.tlsterm import TlsRecord, TlsServer

TLS_PORT = 8443
PLAIN_PORT = 8080
CLIENT = Endpoint("198.18.0.1", 40000)
SERVER = Endpoint("198.18.0.2", TLS_PORT)


def real_client_hello(version: ssl.TLSVersion | None = None) -> bytes:
    """The first flight of a real TLS client, as it would go on the wire."""
    ctx = ssl.create_default_context()
    if version is not None:
        ctx.minimum_version = ctx.maximum_version = version
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname="web.example")
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


# ---- the detector --------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", [None, ssl.TLSVersion.TLSv1_2])
def test_a_real_client_hello_is_tls(version: ssl.TLSVersion | None) -> None:
    hello = real_client_hello(version)
    assert client_hello(hello) is True
    assert client_hello(hello[:6]) is True
    for n in range(6):
        assert client_hello(hello[:n]) is None  # a prefix of a ClientHello cannot tell yet


@pytest.mark.parametrize("data", [
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    b"SSH-2.0-OpenSSH_9.2\r\n",
    b"\x16\x03\x01\x00\x05\x02\x00\x00\x01\x00",  # a handshake record, but a ServerHello
    b"\x17\x03\x03\x00\x20" + bytes(32),  # application data: a connection joined mid-stream
    b"\x16\x03\x09\x00\x40\x01",  # no TLS version 3.9
    b"\x16\x03\x01\x00\x00\x01",  # an empty record cannot hold a ClientHello
    b"\x16\x02",
    b"*1\r\n$4\r\nPING\r\n",
])
def test_other_first_bytes_are_not_tls(data: bytes) -> None:
    assert client_hello(data) is False


# ---- the gate ------------------------------------------------------------------------------------------


def opened(flow: int) -> Open:
    return Open(flow, Endpoint(CLIENT.host, CLIENT.port + flow), SERVER, False, 1.0)


class Gate:
    """A TlsGate driven only through `handle_all` (tests/playbook.py's shape): `process` returns the actions that came
    out and keeps the TLS flows and kubelet probes it named for `pop_tls` / `pop_probes`."""

    def __init__(self, drop_tls: bool = True) -> None:
        self.gate = TlsGate(drop_tls=drop_tls)
        self._tls: list[TlsFlow] = []
        self._probes: list[int] = []

    def process(self, actions: list[Action], flows_created: int) -> list[Action]:
        out: list[Action] = []
        for command in self.gate.handle_all(actions, flows_created):
            if isinstance(command, TlsFlow):
                self._tls.append(command)
            elif isinstance(command, KubeletProbe):
                self._probes.append(command.flow)
            else:
                out.append(command)
        return out

    def pop_tls(self) -> list[TlsFlow]:
        out, self._tls = self._tls, []
        return out

    def pop_probes(self) -> list[int]:
        out, self._probes = self._probes, []
        return out

    @property
    def holding(self) -> int:
        return self.gate.holding


def test_gate_drops_a_tls_flow_and_names_it() -> None:
    gate = Gate()
    hello = real_client_hello()
    out = gate.process([opened(1), Send(1, hello, 1.1), Send(1, b"more", 1.2), Close(1, 1.3)], 1)
    assert out == []
    found = gate.pop_tls()
    assert [(t.flow, t.server) for t in found] == [(1, SERVER)]
    assert gate.pop_tls() == []
    assert gate.process([Send(2, b"x", 2.0)], 1) == [Send(2, b"x", 2.0)]  # nothing held: passes untouched


def test_gate_releases_plain_flows_in_order_and_decides_on_split_bytes() -> None:
    gate = Gate()
    hello = real_client_hello()
    actions: list[Action] = [opened(1), opened(2), Send(2, hello[:2], 1.0), Send(1, b"GET / HTTP/1.1\r\n", 1.0)]
    out = gate.process(actions, 2)
    assert out == [opened(1), Send(1, b"GET / HTTP/1.1\r\n", 1.0)]
    assert gate.holding == 1  # flow 2 has sent two bytes that a ClientHello also starts with
    assert gate.process([Send(2, hello[2:], 1.1), Abort(2, AbortReason.RESET, 1.2)], 2) == []
    assert [t.flow for t in gate.pop_tls()] == [2]
    assert gate.holding == 0


@pytest.mark.parametrize("ending", [
    [Close(1, 1.1)],  # no bytes at all
    [Send(1, b"\x16\x03", 1.1), Close(1, 1.2)],  # too short to be a ClientHello
    [Reply(1, b"220 smtp ready\r\n", 1.1), Send(1, b"\x16\x03\x01\x00\x40\x01", 1.2)],  # the server spoke first
    [Turn(1, 16, 0.01, 1.1), Send(1, b"\x16\x03\x01\x00\x40\x01", 1.2)],  # ... as the flow table's turns say
])
def test_gate_releases_what_cannot_be_tls(ending: list[Close | Send | Reply | Turn]) -> None:
    gate = Gate()
    out = gate.process([opened(1), *ending], 1)
    assert out == [opened(1), *ending]
    assert gate.pop_tls() == [] and gate.holding == 0


# ---- end to end: a real capture of HTTPS, replayed ------------------------------------------------------


@dataclass
class TlsCapture:
    pcap: Path
    tls: list[TlsRecord]  # what the pod's TLS server received: ground truth
    plain: list[ConnRecord]  # what the pod's plaintext server received
    ca: Path
    chain: Path


@pytest.fixture(scope="module")
def https_capture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsCapture]:
    """Five curl HTTPS connections to a real TLS server and two plain HTTP ones, captured in the "pod"."""
    tmp = tmp_path_factory.mktemp("tls")
    ca = trustme.CA()
    chain = tmp / "server.pem"
    ca.issue_cert("198.18.0.2", "web").private_key_and_cert_chain_pem.write_to_path(str(chain))
    ca_file = tmp / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    pcap = tmp / "https.pcap"
    with veth_lab() as link:
        tls_out = tmp / "tls.json"
        tls = start_tlsterm(link.server, TLS_PORT, chain, tls_out)
        plain = NsRecorder(link.server, tmp / "plain.json", PLAIN_PORT).start()
        try:
            with Capture(link.server, link.server_if, pcap):
                for i in range(5):
                    curl(link, f"https://{link.server_ip4}:{TLS_PORT}/secure/{i}", ca_file)
                for i in range(2):
                    curl(link, f"http://{link.server_ip4}:{PLAIN_PORT}/plain/{i}")
        finally:
            plain_records = plain.stop()
            tls_records = stop_tlsterm(tls, tls_out)
    assert len(tls_records) == 5 and all(r.handshake for r in tls_records), tls_records
    assert [r.requests for r in plain_records] == [["GET /plain/0"], ["GET /plain/1"]]
    yield TlsCapture(pcap, tls_records, plain_records, ca_file, chain)


def start_tlsterm(ns: Netns, port: int, chain: Path, out: Path, extra: list[str] | None = None,
                  ) -> subprocess.Popen[str]:
    args = [sys.executable, "-m", "tests.netlab.tlsterm", "--port", str(port), "--cert", str(chain),
            "--out", str(out), *(extra or [])]
    proc = subprocess.Popen(ns.argv(args), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("listening"):
        proc.kill()
        raise RuntimeError(f"TLS server did not start: {line!r} {proc.communicate(timeout=10)[1][-2000:]}")
    return proc


def stop_tlsterm(proc: subprocess.Popen[str], out: Path) -> list[TlsRecord]:
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=20)
    return [TlsRecord.from_json(d) for d in json.loads(out.read_text())]


def curl(link: Link, url: str, ca: Path | None = None) -> None:
    args = ["curl", "--http1.1", "-sS", "--max-time", "20", url] + (["--cacert", str(ca)] if ca else [])
    out = link.client.run(args, timeout=30, check=False)
    assert out.returncode == 0 and out.stdout == ("ok\n" if ca else out.stdout), out.stderr


class NodeCounter:
    """A stock Node.js http server on loopback that counts requests and client errors."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.proc = subprocess.Popen(["node", str(REPO / "tests/netlab/node_counter.js"), str(out)],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line.startswith("listening"), line
        self.port = int(line.split()[1])

    def stop(self) -> dict[str, object]:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.communicate(timeout=10)
        return dict(json.loads(self.out.read_text()))


def test_https_is_not_replayed_to_a_plaintext_service(https_capture: TlsCapture, tmp_path: Path) -> None:
    node = NodeCounter(tmp_path / "node.json")
    try:
        out = run_cli(["replay", str(https_capture.pcap), "--to", f"127.0.0.1:{node.port}", "-o", "json"])
    finally:
        counts = node.stop()
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    conns = summary["connections"]
    assert conns["tls"] == 5 and conns["complete"] == 2 and conns["seen"] == 7, conns
    # The plaintext requests arrived; not one ClientHello reached Node.
    assert counts["client_errors"] == 0, counts
    assert sorted(counts["paths"]) == ["GET /plain/0", "GET /plain/1"]  # type: ignore[call-overload]
    assert summary["bytes_delivered"] == sum(len(r.data) for r in https_capture.plain)
    # Named once, with what to do.
    warnings = [line for line in out.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1, out.stderr
    assert f":{TLS_PORT} opened with a TLS ClientHello" in warnings[0] and "--tls-passthrough" in warnings[0]
    assert "Traceback" not in out.stderr


def test_text_summary_names_tls_and_what_to_do(https_capture: TlsCapture, tmp_path: Path) -> None:
    node = NodeCounter(tmp_path / "node.json")
    try:
        out = run_cli(["replay", str(https_capture.pcap), "--to", f"127.0.0.1:{node.port}", "--port",
                       str(TLS_PORT)])
    finally:
        counts = node.stop()
    assert out.returncode == 0, out.stderr
    assert counts["requests"] == 0 and counts["client_errors"] == 0, counts
    assert "5 tls" in out.stderr and "--tls-passthrough for a TLS --to" in out.stderr, out.stderr


def test_tls_passthrough_reaches_a_local_tls_server_byte_exact(https_capture: TlsCapture) -> None:
    local = TlsServer(str(https_capture.chain), host="127.0.0.1").start()
    try:
        out = run_cli(["replay", str(https_capture.pcap), "--to", f"127.0.0.1:{local.port}", "--port",
                       str(TLS_PORT), "--tls-passthrough", "-o", "json"])
    finally:
        records = local.stop()
    assert out.returncode == 0, out.stderr
    conns = json.loads(out.stdout)["connections"]
    assert conns["tls"] == 0 and conns["complete"] == 5, conns
    replayed = sorted(bytes(r.raw) for r in records if r.raw)  # the reachability check of --to sends nothing
    assert replayed == sorted(bytes(r.raw) for r in https_capture.tls)
    assert all(client_hello(bytes(r.raw)) for r in records if r.raw)


# ---- kubelet probes, and --tls-passthrough's gate --------------------------------------------------------

KUBELET = b"GET /healthz HTTP/1.1\r\nHost: 10.0.0.2:80\r\nUser-Agent: kube-probe/1.30\r\nAccept: */*\r\n" \
          b"Connection: close\r\n\r\n"


def test_kubelet_probes_are_named_and_still_released() -> None:
    gate = Gate()
    browser = b"GET / HTTP/1.1\r\nHost: x\r\nUser-Agent: curl/8.5.0\r\n\r\n"
    actions: list[Action] = [
        opened(1), Send(1, KUBELET, 1.0), opened(2), Send(2, browser, 1.0), opened(3), Send(3, b"G", 1.0)]
    assert gate.process(actions, 3) == actions
    assert gate.pop_probes() == [1] and gate.pop_probes() == []
    # A flow decided the slow way (held, then not TLS) is looked at too.
    assert gate.process([opened(4), Send(4, b"\x16", 1.0), Close(4, 1.1)], 4)[0] == opened(4)
    assert gate.pop_probes() == []


def test_passthrough_gate_releases_tls_in_order() -> None:
    gate = Gate(drop_tls=False)
    hello = real_client_hello()
    actions: list[Action] = [opened(1), Send(1, hello[:3], 1.0), Send(1, hello[3:], 1.1), Close(1, 1.2)]
    assert gate.process(actions, 1) == actions
    assert gate.pop_tls() == [] and gate.holding == 0
