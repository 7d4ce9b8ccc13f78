"""The soak's "tcpdump": writes a generated capture of the plan's connections to stdout as a classic pcap.

Started in the pod through the test API server's exec (run.py puts a `tcpdump` wrapper in front of PATH that
execs this file with argv[0] "tcpdump", so the plugin's /proc/PID/cmdline check accepts it). Like tcpdump it
says "listening on ..." on stderr, writes packets until told to stop (SIGINT/SIGTERM: the batch being written
is finished, so the stream ends on a record boundary, as tcpdump's flush does), then exits 0.

Only the first run generates: the plugin restarts the capture when an exec stream ends, and a soak that
replayed its traffic twice would check nothing. Later runs write a pcap header and idle until stopped.

Every connection: SYN, SYN-ACK, ACK; client payload in MSS-sized and small segments with some reordering,
duplicates and overlapping retransmissions; server ACKs and a short response; FIN both ways.
"""

from __future__ import annotations

import os
import random
import signal
import struct
import sys
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # tests.soak, when run as a script

from tests.soak.plan import SoakConfig, content, make_pool, sizes

MSS = 1448
FIN, SYN, RST, PSH, ACK = 0x01, 0x02, 0x04, 0x08, 0x10
BATCH = 1 << 20  # bytes per write(): big writes keep the generator far ahead of the plugin
RESPONSE = b"HTTP/1.1 204 No Content\r\n\r\n"
MSS_OPT = struct.pack("!BBH", 2, 4, MSS)
LINKTYPE_EN10MB, LINKTYPE_LINUX_SLL2 = 1, 276

_REC = struct.Struct("<IIII")
# IPv4 (no options) + TCP (data offset in the 13th byte); checksums 0: tshark does not verify them by default.
_IPTCP = struct.Struct("!BBHHHBBH4s4sHHIIBBHHH")

Packet = tuple[bool, int, int, int, bytes | memoryview, bytes]  # inbound, seq, ack, flags, payload, options

_stop = False


def _on_signal(signum: int, frame: object) -> None:
    global _stop
    _stop = True  # checked between batches; a write in progress completes (PEP 475 retries it)


def conn_packets(rnd: random.Random, data: memoryview) -> Iterator[Packet]:
    size = len(data)
    m = 0xFFFFFFFF
    isn, sisn = rnd.getrandbits(32), rnd.getrandbits(32)  # random: some connections wrap around 2**32
    yield True, isn, 0, SYN, b"", MSS_OPT
    yield False, sisn, (isn + 1) & m, SYN | ACK, b"", MSS_OPT
    c_ack = (sisn + 1) & m
    yield True, (isn + 1) & m, c_ack, ACK, b"", b""
    segs: list[tuple[int, int]] = []
    pos = 0
    while pos < size:
        n = min(MSS if rnd.random() < 0.8 else rnd.randint(1, 700), size - pos)
        segs.append((pos, n))
        pos += n
    i = since_ack = 0
    while i < len(segs):
        r = rnd.random()
        order: tuple[tuple[int, int], ...]
        if r < 0.01 and i + 1 < len(segs):
            order = (segs[i + 1], segs[i])  # the later segment overtakes the earlier one
            i += 2
        else:
            order = (segs[i],)
            i += 1
        for p, n in order:
            yield True, (isn + 1 + p) & m, c_ack, PSH | ACK, data[p : p + n], b""
        p, n = order[-1]
        if 0.01 <= r < 0.02:
            yield True, (isn + 1 + p) & m, c_ack, PSH | ACK, data[p : p + n], b""  # duplicate
        elif 0.02 <= r < 0.03 and p > 0:
            start = max(0, p - rnd.randint(1, 600))  # retransmission overlapping bytes already seen
            yield True, (isn + 1 + start) & m, c_ack, PSH | ACK, data[start : p + n], b""
        since_ack += len(order)
        if since_ack >= 8:
            since_ack = 0
            end = segs[i - 1][0] + segs[i - 1][1]
            yield False, (sisn + 1) & m, (isn + 1 + end) & m, ACK, b"", b""
    fin = (isn + 1 + size) & m
    yield False, (sisn + 1) & m, fin, PSH | ACK, RESPONSE, b""
    c_ack = (sisn + 1 + len(RESPONSE)) & m
    yield True, fin, c_ack, ACK, b"", b""
    yield True, fin, c_ack, FIN | ACK, b"", b""
    yield False, c_ack, (fin + 1) & m, FIN | ACK, b"", b""
    yield True, (fin + 1) & m, (c_ack + 1) & m, ACK, b"", b""


def l2_headers(linktype: int) -> tuple[bytes, bytes]:
    """Link-layer header of (inbound, outbound) packets."""
    if linktype == LINKTYPE_LINUX_SLL2:
        # protocol, reserved, ifindex, ARPHRD_ETHER, packet type (0 to us, 4 outgoing), address length, address
        mac = bytes.fromhex("02000000000a0000")
        return (struct.pack("!HHIHBB8s", 0x0800, 0, 2, 1, 0, 6, mac),
                struct.pack("!HHIHBB8s", 0x0800, 0, 2, 1, 4, 6, mac))
    if linktype == LINKTYPE_EN10MB:
        pod, gw = bytes.fromhex("02000000000a"), bytes.fromhex("02000000000b")
        return gw + pod + b"\x08\x00", pod + gw + b"\x08\x00"
    raise SystemExit(f"unsupported link type {linktype}")


def write_all(data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(1, view):]


class Generator:
    """Writes connections [lo, hi) of the plan, interleaved `concurrency` at a time, in 1 MB writes."""

    def __init__(self, cfg: SoakConfig, port: int) -> None:
        self.cfg, self.port = cfg, port
        self.pool = make_pool(cfg.seed)
        self.plan = sizes(cfg)
        self.l2_in, self.l2_out = l2_headers(cfg.linktype)
        self.server = bytes(int(x) for x in cfg.server_ip.split("."))
        self.rnd = random.Random(f"mix/{cfg.seed}")
        self.packets = self.written = 0
        self.ts = time.time()
        self._ip_id = 0

    def _start(self, cid: int) -> tuple[Iterator[Packet], bytes, int]:
        # Unique 4-tuples: 20,000 client ports per client address.
        client = struct.pack("!I", 0x0A400000 + cid // 20_000)
        data = memoryview(content(self.pool, self.cfg.seed, cid, self.plan[cid]))
        return conn_packets(random.Random(f"conn/{self.cfg.seed}/{cid}"), data), client, 40_000 + cid % 20_000

    def run(self, lo: int, hi: int) -> None:
        rnd, port, server, l2_in, l2_out = self.rnd, self.port, self.server, self.l2_in, self.l2_out
        rec_pack, hdr_pack = _REC.pack, _IPTCP.pack
        nxt = min(lo + self.cfg.concurrency, hi)
        active = [self._start(cid) for cid in range(lo, nxt)]
        out: list[bytes | memoryview] = []
        buffered = packets = 0
        ip_id = self._ip_id
        ts = max(self.ts, time.time())  # capture time follows the wall clock, as the plugin's timeouts expect
        while active and not _stop:
            k = rnd.randrange(len(active))
            gen, client, cport = active[k]
            for _ in range(rnd.randint(1, 8)):
                pkt = next(gen, None)
                if pkt is None:
                    if nxt < hi:
                        active[k] = self._start(nxt)
                        nxt += 1
                    else:
                        active[k] = active[-1]
                        active.pop()
                    break
                inbound, seq, ack, flags, payload, opts = pkt
                ts += 1e-6
                ip_id = (ip_id + 1) & 0xFFFF
                tcp_len = 20 + len(opts) + len(payload)
                if inbound:
                    hdr = hdr_pack(0x45, 0, 20 + tcp_len, ip_id, 0x4000, 64, 6, 0, client, server, cport, port, seq,
                                   ack, (5 + len(opts) // 4) << 4, flags, 64240, 0, 0)
                    l2 = l2_in
                else:
                    hdr = hdr_pack(0x45, 0, 20 + tcp_len, ip_id, 0x4000, 64, 6, 0, server, client, port, cport, seq,
                                   ack, (5 + len(opts) // 4) << 4, flags, 65160, 0, 0)
                    l2 = l2_out
                caplen = len(l2) + 20 + tcp_len
                sec = int(ts)
                out += (rec_pack(sec, int((ts - sec) * 1e6), caplen, caplen), l2, hdr, opts, payload)
                buffered += caplen + 16
                packets += 1
            if buffered >= BATCH:
                write_all(b"".join(out))
                self.written += buffered
                out.clear()
                buffered = 0
                ts = max(ts, time.time())
        if out:
            write_all(b"".join(out))
            self.written += buffered
        self.packets += packets
        self.ts, self._ip_id = ts, ip_id


def generate(cfg: SoakConfig, port: int) -> Generator:
    """Warm-up connections, a pause until the runner says go, then the rest. Stops early on SIGINT/SIGTERM."""
    gen = Generator(cfg, port)
    warmup = min(cfg.warmup, cfg.conns)
    gen.run(0, warmup)
    while warmup and not _stop and not os.path.exists(cfg.go_file):
        time.sleep(0.05)
    gen.run(warmup, cfg.conns)
    return gen


def main() -> int:
    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    args = sys.argv[1:]
    if len(args) < 2 or args[0] != "--config":
        print("usage: tcpdump --config FILE [tcpdump options...] 'tcp port N'", file=sys.stderr)
        return 2
    cfg = SoakConfig.load(Path(args[1]))
    words = args[-1].split()  # the capture filter, "tcp port N [and (...)]"
    port = int(words[2]) if len(words) >= 3 and words[:2] == ["tcp", "port"] else 8080
    names = {LINKTYPE_LINUX_SLL2: "LINUX_SLL2 (Linux cooked v2)", LINKTYPE_EN10MB: "EN10MB (Ethernet)"}
    write_all(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 262144, cfg.linktype))
    print(f"tcpdump: listening on any, link-type {names[cfg.linktype]}, snapshot length 262144 bytes",
          file=sys.stderr, flush=True)
    first = True
    try:
        fd = os.open(cfg.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        os.close(fd)
    except FileExistsError:
        first = False
    packets = 0
    try:
        if first:
            t0 = time.monotonic()
            gen = generate(cfg, port)
            packets = gen.packets
            Path(cfg.marker).write_text(f"{packets} {gen.written} {time.monotonic() - t0:.3f} {int(_stop)}\n")
        while not _stop:
            time.sleep(0.1)  # idle like a capture with no traffic, until the plugin stops us
    except BrokenPipeError:
        return 0
    print(f"{packets} packets captured\n{packets} packets received by filter\n0 packets dropped by kernel",
          file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
