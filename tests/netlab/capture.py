"""tcpdump in a namespace: started for real (its "listening on" line seen), stopped cleanly (complete pcap)."""

from __future__ import annotations

import signal
import struct
import subprocess
import threading
import time
from pathlib import Path

from .netns import Netns

LINKTYPE_EN10MB = 1
LINKTYPE_RAW = 101
LINKTYPE_LINUX_SLL2 = 276


class Capture:
    def __init__(self, ns: Netns, iface: str, path: Path, bpf: str = "tcp", snaplen: int = 262144,
                 extra: list[str] | None = None) -> None:
        self.ns, self.iface, self.path, self.bpf, self.snaplen = ns, iface, path, bpf, snaplen
        self.extra = list(extra or [])  # more tcpdump options, e.g. -y LINUX_SLL
        self.proc: subprocess.Popen[bytes] | None = None
        self.stderr: list[str] = []
        self._listening = threading.Event()
        self._reader: threading.Thread | None = None

    def start(self, timeout: float = 10.0) -> Capture:
        # --immediate-mode: without it TPACKET_V3 hands packets over in blocks up to a second late, and a
        # SIGINT then drops whatever is still in the ring ("received by filter" > "captured"). -U: write each
        # packet at once. -Z root: write as root (Debian's tcpdump otherwise drops to the tcpdump user).
        # -B: a 64 MiB kernel buffer, so bursts (8 MB uploads of 64 KB GRO frames) on a busy 2-core machine
        # are not dropped before tcpdump reads them.
        args = ["tcpdump", "--immediate-mode", "-U", "-n", "-Z", "root", "-B", "65536", "-s", str(self.snaplen),
                "-i", self.iface, *self.extra,
                "-w", str(self.path), *self.bpf.split()]
        self.proc = self.ns.popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self._reader = threading.Thread(target=self._read_stderr, daemon=True)
        self._reader.start()
        if not self._listening.wait(timeout):
            self.stop()
            raise RuntimeError(f"tcpdump did not start on {self.iface}: {' | '.join(self.stderr)}")
        return self

    def __enter__(self) -> Capture:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    def _read_stderr(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        for raw in self.proc.stderr:
            line = raw.decode(errors="replace").rstrip()
            self.stderr.append(line)
            if "listening on" in line:
                self._listening.set()

    def stop(self, timeout: float = 10.0) -> Path:
        """SIGINT, as a user pressing Ctrl-C: tcpdump flushes and closes the file."""
        if self.proc is not None and self.proc.poll() is None:
            # Let packets already on the wire reach the capture before it closes.
            time.sleep(0.2)
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
        if self._reader is not None:
            self._reader.join(timeout)
        return self.path

    def dropped(self) -> int:
        """Packets tcpdump reported as lost (dropped by the kernel or by the interface); -1 if unknown."""
        total, seen = 0, False
        for line in self.stderr:
            parts = line.split()
            if len(parts) >= 4 and parts[1] == "packets" and parts[2] == "dropped":
                total += int(parts[0])
                seen = True
        return total if seen else -1

    def counts(self) -> tuple[int, int]:
        """(captured, received by filter) as tcpdump reported them on exit; equal when nothing was lost."""
        got = {"captured": -1, "received": -1}
        for line in self.stderr:
            parts = line.split()
            if len(parts) >= 3 and parts[1] == "packets" and parts[2] in got:
                got[parts[2]] = int(parts[0])
        return got["captured"], got["received"]


def pcap_linktype(path: Path) -> int:
    """The link type in a classic pcap file header (what tcpdump -w writes)."""
    head = Path(path).read_bytes()[:24]
    magic = head[:4]
    endian = "<" if magic in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1") else ">"
    return int(struct.unpack(endian + "I", head[20:24])[0]) & 0x0FFFFFFF


def tshark_count(path: Path, display_filter: str, timeout: float = 60.0) -> int:
    """How many frames of a capture match a Wireshark display filter (e.g. tcp.analysis.retransmission)."""
    out = subprocess.run(["tshark", "-n", "-r", str(path), "-Y", display_filter, "-T", "fields", "-e", "frame.number"],
                         capture_output=True, text=True, timeout=timeout, check=False)
    return sum(1 for line in out.stdout.splitlines() if line.strip())
