"""tshark driver: turns a pcap stream into `Segment`s without blocking the caller's event loop.

tshark is asked only for what it knows best (which frames are TCP, addresses, ports, raw seq/ack, length, flags);
payload bytes are cut from the record we already hold, which halves tshark's work and avoids hex decoding.
tshark's memory grows as it reads (per packet, and more per connection), so when its resident memory nears
`handover_rss`, or after `handover_every` packets, a fresh (pre-spawned) tshark takes over and the old one drains
and exits. Every hand-over costs a tshark start-up (~0.3 s of CPU), so it is driven by measured memory rather
than a small fixed packet count.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import select
import selectors
import shutil
import stat
import struct
import subprocess
import tempfile
import termios
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, BinaryIO

from .errors import InputError, ToolError
from .model import Endpoint, Segment
from .pcap import FAST_LINKTYPES, PcapReader, PcapWriter, Record, cut_record, linktype_name
from .shard import Merger, headers_end, ip_start, route
from .tshark_locate import locate_tshark

MIN_VERSION = (3, 4, 0)  # LINUX_SLL2 (tcpdump -i any on current kernels) needs 3.4
log = logging.getLogger(__name__)

# Hand over to a fresh tshark when the current one's resident memory reaches this (tshark starts near 160 MB;
# the budget is 300 MB), or after this many packets whatever the memory says (platforms without /proc).
HANDOVER_RSS = 230 << 20
HANDOVER_EVERY = 2_000_000
RSS_CHECK_EVERY = 4096
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
INSTALL_HINT = (
    "install it, version 3.4 or newer (Debian/Ubuntu: sudo apt-get install tshark; macOS: brew install wireshark; "
    "Fedora: sudo dnf install wireshark-cli), then retry; or pass --tshark PATH"
)

FIELDS = (
    "frame.number", "ip.src", "ipv6.src", "tcp.srcport", "ip.dst", "ipv6.dst", "tcp.dstport",
    "tcp.seq_raw", "tcp.ack_raw", "tcp.len", "tcp.flags",
)
# The fields are asked for as the columns of tshark's summary line (-T tabs), each the field's first occurrence,
# unresolved, not with -T fields: -T fields makes tshark build the whole visible protocol tree, every item's label
# formatted, for every packet, while a summary fills only the columns asked for. Measured with tshark 4.0 on the
# bench's big capture (133,766 records, cut as below): the same values, 2.2 s of CPU with -T fields, 0.96 s as
# columns. Frame numbers come first; an empty column (ip.src of an IPv6 packet) stays an empty tab-separated field.
# Columns a user hid in their own preferences (gui.column.hidden) would be left out of the line and shift every
# field: tshark is pointed at an empty configuration directory of our own (tshark_environment).
COLUMNS = "gui.column.format:" + ",".join(f'"{k}","%Cus:{name}:1:U"' for k, name in enumerate(FIELDS))
# TCP headers quoted inside ICMP errors are not segments of any flow.
DISPLAY_FILTER = "tcp && !icmp && !icmpv6"
# Measured on 200k loopback packets: these cut tshark's CPU by ~28%, and with sequence analysis off its memory no
# longer grows per packet (only ~2 KB per TCP conversation). Disabling every protocol above TCP
# (--disable-protocol ALL) was measured too, on small HTTP requests: no gain, and older tsharks may not know ALL.
PREFERENCES = (
    "tcp.analyze_sequence_numbers:FALSE",
    "tcp.desegment_tcp_streams:FALSE",
    "tcp.calculate_timestamps:FALSE",
    "tcp.check_checksum:FALSE",
    "ip.check_checksum:FALSE",
    "ip.defragment:FALSE",
    "ipv6.defragment:FALSE",
)

# tshark is handed each TCP record only up to the end of its TCP header: the payload is cut from the record held
# here, and the fields asked for are header fields (tcp.len comes from the IP length). Measured on 300k packets of
# the bench's big capture cut this way: tshark's CPU -22%, and an eighth of the bytes through its pipe. Shorter
# records are passed whole: finding their header costs more than copying them.
CUT_FROM = 192

MAX_AHEAD_RECORDS = 50_000  # records handed to tshark whose lines have not been read yet
MAX_AHEAD_BYTES = 16 << 20
# Capture bytes one read_segments call hands out. Reading a segment frees its record's place ahead, so the feeder
# refills the window at once: what the caller still holds (paced segments waiting for their time) comes on top of
# MAX_AHEAD_BYTES. Without this cap a slow CPU, whose tshark lines come in bursts, let one batch take the whole
# window and the plugin hold twice it (~30 MiB more); with it the caller holds at most this much more.
MAX_BATCH_BYTES = 2 << 20
READ_SIZE = 256 * 1024
# With several tsharks the merge waits for a line for every TCP record. A record tshark prints nothing for after
# all (a header it will not dissect) is given up once its tshark has been idle this long with nothing left to read.
STALL_SECONDS = 0.5
# Several tsharks print each line at once (-l): read as soon as one is there, the plugin would wake for every
# line and take a line a read, twice the CPU of reading blocks (measured). At most one read round this often.
READ_EVERY = 0.002
PIPE_SIZE = 1 << 20  # Linux's default /proc/sys/fs/pipe-max-size


# A capture file smaller than this gets one tshark unless --dissectors says otherwise: another tshark's start-up
# (~0.2 s of CPU) costs more than sharing a few thousand packets saves.
SMALL_CAPTURE = 4 << 20


def usable_cores() -> int:
    """The cores this process may run on (its affinity, which containers and taskset narrow), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # no sched_getaffinity (macOS)
        return max(1, os.cpu_count() or 1)


def dissector_count(asked: int | None, source: BinaryIO | None = None) -> int:
    """--dissectors, or by default the usable cores (one for a small capture file)."""
    if asked is not None:
        return asked
    if source is not None:
        try:
            st = os.fstat(source.fileno())
        except (OSError, ValueError, AttributeError):
            st = None
        if st is not None and stat.S_ISREG(st.st_mode) and st.st_size < SMALL_CAPTURE:
            return 1
    return usable_cores()


@dataclass(frozen=True, slots=True)
class TsharkInfo:
    path: str
    version: tuple[int, int, int]


def find_tshark(path: str | None = None) -> TsharkInfo:
    """Locate tshark (the given path; else PATH, then where pyshark looks) and check its version."""
    exe = shutil.which(path) if path else locate_tshark()
    if exe is None:
        where = f" at {path}" if path else ""
        raise ToolError(f"tshark not found{where}: {INSTALL_HINT}")
    key = _binary_key(exe)
    version = _cached_version(key)
    if version is None:
        version = _ask_version(exe)
        _remember_version(key, version)
    if version < MIN_VERSION:
        shown = ".".join(map(str, version))
        raise ToolError(f"tshark {shown} is too old: need 3.4 or newer (for Linux cooked v2 captures); upgrade it")
    return TsharkInfo(exe, version)


def _ask_version(exe: str) -> tuple[int, int, int]:
    try:
        out = subprocess.run([exe, "--version"], capture_output=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ToolError(f"cannot run {exe} --version ({exc}): {INSTALL_HINT}") from None
    m = re.search(rb"(\d+)\.(\d+)\.(\d+)", out.stdout.split(b"\n", 1)[0])
    if out.returncode != 0 or m is None:
        raise ToolError(f"{exe} does not look like tshark (tshark --version failed): {INSTALL_HINT}")
    return int(m.group(1)), int(m.group(2)), int(m.group(3))


# `tshark --version` loads every dissector (~0.2 s); the answer only changes when the binary does, so it is
# remembered per path, size and modification time.
def _cache_file() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "kubectl-mirror" / "tshark-version.json"


def _binary_key(exe: str) -> str:
    try:
        st = os.stat(exe)
    except OSError:
        return ""
    return f"{os.path.realpath(exe)}:{st.st_size}:{st.st_mtime_ns}"


def _cached_version(key: str) -> tuple[int, int, int] | None:
    if not key:
        return None
    try:
        entry = json.loads(_cache_file().read_text()).get(key)
    except (OSError, ValueError, AttributeError):
        return None
    if isinstance(entry, list) and len(entry) == 3 and all(isinstance(x, int) for x in entry):
        return entry[0], entry[1], entry[2]
    return None


def _remember_version(key: str, version: tuple[int, int, int]) -> None:
    if not key:
        return
    path = _cache_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({key: list(version)}))
        os.replace(tmp, path)  # atomic: concurrent runs never read half a file
    except OSError:
        pass  # a read-only home only costs the next run 0.2 s


def tshark_command(tshark: TsharkInfo, *, live: bool = False) -> list[str]:
    # -l (flush every line) only when live: offline it costs a write and a wakeup per packet on both sides.
    cmd = [tshark.path, "-n", *(["-l"] if live else []), "-r", "-", "-T", "tabs", "-o", COLUMNS, "-Y", DISPLAY_FILTER]
    for pref in PREFERENCES:
        cmd += ["-o", pref]
    return cmd


def tshark_environment(config_dir: str) -> dict[str, str]:
    """The environment tshark runs in: its personal configuration read from `config_dir`, an empty directory
    the caller owns, so that no column a user hid shifts the line. Not a path that cannot exist: tshark 4.0
    crashes on one under a file (/dev/null/x), and one in a shared directory could be planted by another user."""
    return {**os.environ, "WIRESHARK_CONFIG_DIR": config_dir}


# ---- payload: cut from the held record ----------------------------------------------------------------------


def tcp_payload(linktype: int, data: bytes, tcp_len: int) -> bytes | None:
    """The TCP payload of a frame, or None when the frame does not hold all of it (snap length, fragments)."""
    try:
        off = ip_start(linktype, data)
        if off < 0:
            return None
        version = data[off] >> 4
        if version == 4:
            if ((data[off + 6] << 8) | data[off + 7]) & 0x3FFF:  # a fragment: the payload is not all here
                return None
            end = off + ((data[off + 2] << 8) | data[off + 3])
        elif version == 6:
            end = off + 40 + ((data[off + 4] << 8) | data[off + 5])
        else:
            return None
    except IndexError:
        return None
    # The IP length, not the frame length, ends the payload: Ethernet padding stays out.
    if end > len(data) or end - tcp_len < off:
        return None
    return data[end - tcp_len : end] if tcp_len else b""


def locate_payload(linktype: int, data: bytes, sport: int, dport: int, seq: int,
                   tcp_len: int) -> tuple[bytes | None, bool]:
    """The slow path, for frames whose IP header tcp_payload cannot find (link types without a fast path, or
    encapsulations it does not know such as MPLS or PPPoE): find the TCP header tshark reported by its ports and
    raw sequence number, 8 bytes that do not recur by chance before it.

    Returns (payload, found): payload None when it is not all in the frame; found False when the TCP header
    could not be found at all (the encapsulation is beyond us).
    """
    try:
        off = ip_start(linktype, data)
        if 0 <= off < len(data) and data[off] >> 4 in (4, 6):
            return None, True  # the fast path found the IP header and said no (snap length, a fragment)
    except IndexError:
        pass
    sig = struct.pack(">HHI", sport, dport, seq)
    at = data.find(sig)
    found = False
    while at >= 0:
        if at + 13 <= len(data):
            found = True
            start = at + (data[at + 12] >> 4) * 4
            end = _ip_end(data, at)
            if end == -1:
                return None, True  # inside an IPv4 fragment
            if end is None:
                end = start + tcp_len
            if start >= at + 20 and start + tcp_len == end <= len(data):
                return data[start:end], True
        at = data.find(sig, at + 1)
    return None, found


def _ip_end(data: bytes, tcp_at: int) -> int | None:
    """Where the IPv4/IPv6 packet whose TCP header starts at tcp_at ends; -1 for an IPv4 fragment; None when no IP
    header sits right before it."""
    for ihl in range(20, 64, 4):
        p = tcp_at - ihl
        if p < 0:
            break
        if data[p] == 0x40 | ihl // 4 and data[p + 9] == 6:
            if ((data[p + 6] << 8) | data[p + 7]) & 0x3FFF:
                return -1
            return p + ((data[p + 2] << 8) | data[p + 3])
    p = tcp_at - 40
    if p >= 0 and data[p] >> 4 == 6 and data[p + 6] == 6:
        return tcp_at + ((data[p + 4] << 8) | data[p + 5])
    return None


# ---- tshark instances -----------------------------------------------------------------------------------------


@dataclass
class DissectStats:
    packets: int = 0  # every record read from the input
    bytes_captured: int = 0  # sum of the records' original lengths
    tcp_segments: int = 0
    non_tcp: int = 0
    tshark_restarts: int = 0  # handovers to a fresh tshark
    # TCP frames whose payload neither the fast path nor locate_payload could find, per link type: their bytes
    # are missing (holes), which the run must say rather than only count connections as incomplete.
    not_understood: dict[int, int] = field(default_factory=dict)
    # TCP frames the slow path found the header of, per link type
    slow_tcp: dict[int, int] = field(default_factory=dict)
    # Records read per link type; set when the input ends.
    linktypes: dict[int, int] = field(default_factory=dict)

    def unusable(self) -> InputError | None:
        """An error when no frame was of a link type either path can use (tshark found TCP in none of them)."""
        if self.tcp_segments or not self.linktypes or any(lt in FAST_LINKTYPES for lt in self.linktypes):
            return None
        names = ", ".join(linktype_name(lt) for lt in self.linktypes)
        return InputError(f"link type {names} is not one kubectl-mirror or tshark can use: tshark found no TCP in "
                          f"its {self.packets:,} frames; capture on the pod's network interface (tcpdump -i any or "
                          f"-i eth0)")

    def warnings(self) -> list[str]:
        """What the user must be told about frames the run could not use."""
        if self.unusable() is not None:
            return []  # said by the error instead
        out = [f"{n:,} frame{'s' * (n != 1)}: link type {linktype_name(lt)} not understood (their TCP payload "
               f"could not be found: their connections are incomplete)" for lt, n in self.not_understood.items()]
        for lt, n in self.linktypes.items():
            if lt not in FAST_LINKTYPES and not self.slow_tcp.get(lt) and lt not in self.not_understood:
                out.append(f"{n:,} frame{'s' * (n != 1)}: link type {linktype_name(lt)} not understood (tshark "
                           f"found no TCP in them)")
        return out


@dataclass(eq=False)
class TsharkProcess:
    """One tshark reading pcap records on its stdin and printing one line per TCP segment."""

    proc: subprocess.Popen[bytes]
    stderr: IO[bytes]
    base: int = 0  # global frame number before this instance's first record
    records: deque[Record] = field(default_factory=deque)
    popped: int = 0  # local frame number of the last record taken off `records`
    written: int = 0  # records written to its stdin (feeder thread only)
    header: bytes | None = None  # last header written to its stdin (feeder thread only)
    partial: bytes = b""
    lines: list[str] = field(default_factory=list)
    line_pos: int = 0
    eof: bool = False
    retired: bool = False
    rss_checked: int = 0  # `written` when its memory was last read
    rss_high: bool = False  # near the limit: time to start a standby
    last_frame: int = 0  # frame of the last record given to it

    def rss(self) -> int | None:
        """Resident memory in bytes, from /proc (None where there is no /proc, e.g. macOS)."""
        try:
            with open(f"/proc/{self.proc.pid}/statm", "rb") as f:
                return int(f.read().split()[1]) * PAGE_SIZE
        except (OSError, ValueError, IndexError):
            return None

    def idle(self) -> bool:
        """It has read all it was given, its output is all read, and it sleeps: it has nothing more to say."""
        try:
            for pipe in (self.proc.stdin, self.proc.stdout):
                if pipe is not None and not pipe.closed and _pipe_bytes(pipe.fileno()):
                    return False
            with open(f"/proc/{self.proc.pid}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
        except (OSError, ValueError, IndexError):
            return False  # where there is no /proc it waits for its next line or its end
        return state == b"S"

    def last_stderr(self) -> str:
        try:
            self.stderr.seek(0)
            text = self.stderr.read().decode("utf-8", "replace")
        except (OSError, ValueError):
            return ""
        lines = [ln.strip() for ln in text.splitlines() if ln.strip() and "Running as user" not in ln]
        return lines[-1] if lines else ""


    def close(self) -> None:
        """Stop it (if still running) and release its pipes; safe to call twice."""
        for pipe in (self.proc.stdin, self.proc.stdout):
            try:
                if pipe is not None:
                    pipe.close()
            except OSError:
                pass
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        self.stderr.close()


def _spawn(tshark: TsharkInfo, live: bool, env: dict[str, str]) -> TsharkProcess:
    err = tempfile.TemporaryFile()  # noqa: SIM115 -- lives as long as the tshark it belongs to
    try:
        proc = subprocess.Popen(tshark_command(tshark, live=live), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=err, bufsize=0, start_new_session=True, env=env)
    except OSError as exc:
        err.close()
        raise ToolError(f"cannot start {tshark.path}: {exc.strerror}; check it runs, or pass --tshark PATH") from None
    assert proc.stdout is not None and proc.stdin is not None
    fd = proc.stdout.fileno()
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_NONBLOCK)
    # One feeder writes to every tshark in turn: a write that blocks on one tshark's full pipe (64 KiB, ~2 ms of
    # its work) starves the others. A larger pipe lets a whole batch's share go in at once (Linux; best effort).
    with contextlib.suppress(OSError, AttributeError):
        fcntl.fcntl(proc.stdin.fileno(), fcntl.F_SETPIPE_SZ, PIPE_SIZE)
    return TsharkProcess(proc, err)


def _pipe_bytes(fd: int) -> int:
    """Bytes waiting in a pipe (either end)."""
    return int(struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0])


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class Dissector:
    """Feeds a pcap stream through tshark and yields Segments; built for a single-threaded selectors loop.

    A feeder thread reads the source and writes to tshark; the caller's thread only ever does non-blocking reads
    of tshark's stdout (`fileno()`, `read_segments()`). With `dissectors` > 1 the records are dealt by flow to
    that many tsharks (shard.deal) and their segments merged back into capture order (shard.Merger); each of them
    hands over on memory on its own.
    """

    def __init__(self, source: BinaryIO, tshark: TsharkInfo, *, handover_every: int = HANDOVER_EVERY,
                 handover_rss: int = HANDOVER_RSS, tee: PcapWriter | None = None, live: bool = False,
                 dissectors: int = 1) -> None:
        if handover_every < 1:
            raise ValueError("handover_every must be positive")
        if dissectors < 1:
            raise ValueError("dissectors must be positive")
        self._source = source
        self._tshark = tshark
        self._handover_every = handover_every
        self._handover_rss = handover_rss
        self._tee = tee
        self._live = live
        self.stats = DissectStats()
        # Several tsharks: each must print a line as soon as it has one (-l), or the merge would wait on lines
        # sitting in one tshark's output block while the others' segments pile up behind them. Their output is
        # then read at most every READ_EVERY, so each read still takes many lines (see read_segments).
        flush = live or dissectors > 1
        self._lanes = [_Lane(self, i, flush) for i in range(dissectors)]
        self._next_read = 0.0
        self._merger = Merger(dissectors) if dissectors > 1 else None
        self._epoll: select.epoll | None = None
        self._watched: dict[int, int] = {}  # lane -> fd registered in _epoll
        self._stall: tuple[int, int, float] | None = None  # (lane, frame, since): the merge waiting on a lane
        self._cond = threading.Condition()
        self._stop = False
        self._feeder_done = False
        self._input_error: InputError | None = None
        # A tshark failure, or (InputError) a link type tshark does not know either
        self._tool_error: ToolError | InputError | None = None
        self._fed_records = 0
        self._fed_bytes = 0
        self._used_records = 0
        self._used_bytes = 0
        self._endpoints: dict[tuple[str, str], Endpoint] = {}
        self._thread: threading.Thread | None = None
        self._closed = False
        self._config_dir: str | None = None
        self._env: dict[str, str] = {}

    @property
    def _instances(self) -> list[TsharkProcess]:
        """Every tshark started so far, all lanes (for tests and diagnostics)."""
        return [inst for lane in self._lanes for inst in lane.instances]

    # ---- lifecycle --------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the tsharks and the feeder: records flow to tshark from here on, whatever the caller does."""
        self._config_dir = tempfile.mkdtemp(prefix="kubectl-mirror-tshark-")
        self._env = tshark_environment(self._config_dir)
        for lane in self._lanes:
            lane.instances.append(_spawn(self._tshark, lane.flush, self._env))
        if len(self._lanes) > 1:
            log.info("dissecting with %d tsharks, connections dealt among them", len(self._lanes))
        self._thread = threading.Thread(target=self._feed, name="dissect-feeder", daemon=True)
        self._thread.start()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        for lane in self._lanes:
            lane.close()
        if self._epoll is not None:
            self._epoll.close()
        if self._thread is not None and self._thread is not threading.current_thread():
            # the feeder may sit in a read of a live source that never returns; it is a daemon thread
            self._thread.join(timeout=2)
        if self._config_dir is not None:
            shutil.rmtree(self._config_dir, ignore_errors=True)

    def __enter__(self) -> Dissector:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- feeder thread ----------------------------------------------------------------------------------------

    def _feed(self) -> None:
        reader = PcapReader(self._source)
        try:
            while not self._stop:
                try:
                    batch = reader.read_batch()
                except InputError as exc:
                    self._input_error = exc
                    break
                except OSError as exc:
                    self._input_error = InputError(f"cannot read the capture: {exc.strerror or exc}")
                    break
                if not batch:
                    break
                if not self._send(batch):
                    break
        except ToolError as exc:
            self._tool_error = exc
        except Exception as exc:  # a bug here must end the run with a message, not hang it
            self._tool_error = ToolError(f"the dissector's feeder failed ({exc!r}): please report this bug")
        finally:
            self.stats.linktypes = reader.linktype_counts()
            self._feeder_done = True
            if self._tee is not None:
                try:
                    self._tee.flush()
                except OSError as exc:
                    if self._tool_error is None:
                        self._tool_error = ToolError(f"cannot write the capture copy (-w): {exc.strerror or exc}; "
                                                     f"free some space or choose another path")
            for lane in self._lanes:
                lane.end_input()

    def _wait_for_room(self, records: int, size: int) -> bool:
        merger = self._merger
        with self._cond:
            while not self._stop:
                # Segments the merge holds back are read but not handed out yet: they count as ahead too.
                ahead = self._fed_records - self._used_records + (merger.held if merger is not None else 0)
                held = self._fed_bytes - self._used_bytes + (merger.held_bytes if merger is not None else 0)
                if ahead == 0 or (ahead + records <= MAX_AHEAD_RECORDS and held + size <= MAX_AHEAD_BYTES):
                    return True
                self._cond.wait(timeout=0.2)
        return False

    def _send(self, batch: list[Record]) -> bool:
        """Write a batch to the tshark(s), handing over to fresh instances at the boundary. False to stop feeding."""
        stats = self.stats
        stats.packets += len(batch)
        stats.bytes_captured += sum(r.orig_len for r in batch)
        if self._tee is not None:
            try:
                for rec in batch:
                    self._tee.write_record(rec)
                if self._live:
                    self._tee.flush()
            except OSError as exc:
                raise ToolError(f"cannot write the capture copy (-w): {exc.strerror or exc}; free some space or "
                                f"choose another path") from None
        if self._stop:
            return False
        size = sum(len(r.raw) for r in batch)
        if not self._wait_for_room(len(batch), size):
            return False
        with self._cond:
            self._fed_records += len(batch)
            self._fed_bytes += size
        merger = self._merger
        if merger is None:
            return self._lanes[0].write(batch)
        # Every TCP record is announced to the merge before any of the batch reaches a tshark: a segment can
        # then never leave ahead of a record dealt with it.
        n = len(self._lanes)
        dealt: list[list[Record]] = [[] for _ in range(n)]
        expect = merger.expect
        for rec in batch:
            data = rec.data
            k, cut = route(rec.linktype, data, n)
            if cut < len(data):
                rec.payload_at = cut
            if k >= 0:
                expect(k, rec.frame)
                dealt[k].append(rec)
            else:
                dealt[-k - 1].append(rec)
        return all(lane.write(records) for lane, records in zip(self._lanes, dealt, strict=True) if records)

    # ---- caller's thread --------------------------------------------------------------------------------------

    @property
    def done(self) -> bool:
        """All input consumed and every tshark line read (or tshark failed)."""
        if self._tool_error is not None:
            return True
        if not self._feeder_done:
            return False
        return all(lane.done for lane in self._lanes) and (self._merger is None or not self._merger.held)

    @property
    def lines_waiting(self) -> bool:
        """tshark lines already read but not parsed (a batch cut by its limits): no need to wait for the fd."""
        return any(lane.lines_waiting for lane in self._lanes)

    def fileno(self) -> int:
        """A descriptor that is readable when tshark output is: ask again on every loop (hand-overs change it).

        With several tsharks, an epoll descriptor watching all of them (readable when any of theirs is)."""
        if len(self._lanes) == 1:
            return self._lanes[0].fileno()
        if not hasattr(select, "epoll"):  # no epoll (macOS): the lane the merge waits on, else the first
            waiting = self._merger.waiting_on() if self._merger is not None else None
            lane = self._lanes[waiting if waiting is not None else 0]
            return lane.fileno() if not lane.done else self._lanes[-1].fileno()
        if self._epoll is None:
            self._epoll = select.epoll()
        for i, lane in enumerate(self._lanes):
            fd = -1 if lane.done else lane.fileno()
            old = self._watched.get(i, -1)
            if fd == old:
                continue
            if old >= 0:
                with contextlib.suppress(OSError):
                    self._epoll.unregister(old)
                del self._watched[i]
            if fd >= 0:
                self._epoll.register(fd, select.EPOLLIN)
                self._watched[i] = fd
        return self._epoll.fileno()

    def raise_if_failed(self) -> None:
        if self._tool_error is not None:
            raise self._tool_error
        if self._input_error is not None and self.done:
            raise self._input_error
        if self.done and self._input_error is None:
            self._input_error = self.stats.unusable()
            if self._input_error is not None:
                raise self._input_error

    def read_segments(self, max_items: int = 4096, max_bytes: int = MAX_BATCH_BYTES) -> list[Segment]:
        """Segments available now, without blocking: at most max_items, and about max_bytes of capture records."""
        merger = self._merger
        if merger is None:
            out = self._lanes[0].read(max_items, max_bytes)
        else:
            wait = self._next_read - time.monotonic()
            if wait > 0:
                time.sleep(wait)  # the feeder thread runs meanwhile; the tsharks' lines gather in their pipes
            self._next_read = time.monotonic() + READ_EVERY
            for i, lane in enumerate(self._lanes):
                merger.add(i, lane.read(max_items, max_bytes))
            out = merger.pop()
            if merger.held:
                self._unstall(merger)
        if out:
            with self._cond:
                self._cond.notify_all()
        return out

    def _unstall(self, merger: Merger) -> None:
        """The merge waits on a lane's TCP record whose tshark has read all its input, printed all it had (-l) and
        sleeps: after STALL_SECONDS of that, it said nothing for that record (a header it would not dissect), so
        the merge stops waiting for it. Checked once per read round (3 syscalls and a /proc read)."""
        k = merger.waiting_on()
        frame = merger.expected_head(k) if k is not None else None
        if k is None or frame is None or not self._lanes[k].idle(frame):
            self._stall = None
            return
        now = time.monotonic()
        if self._stall is None or self._stall[:2] != (k, frame):
            self._stall = (k, frame, now)
        elif now - self._stall[2] >= STALL_SECONDS:
            merger.skip(k)
            self._stall = None
            log.debug("dissector %d printed nothing for frame %s: not waiting for it any longer", k, frame)

    def _endpoint(self, host: str, port: str) -> Endpoint:
        key = (host, port)
        ep = self._endpoints.get(key)
        if ep is None:
            if len(self._endpoints) > 100_000:
                self._endpoints.clear()  # bounded: a port scan must not grow memory forever
            ep = self._endpoints[key] = Endpoint(host, int(port))
        return ep

    # ---- blocking convenience ---------------------------------------------------------------------------------

    def iter_segments(self) -> Iterator[Segment]:
        """Every segment, blocking; starts the dissector if needed, raises at the end on failure."""
        if self._thread is None:
            self.start()
        with selectors.DefaultSelector() as sel:
            while True:
                yield from self.read_segments()
                self.raise_if_failed()
                if self.done:
                    return
                fd = self.fileno()
                sel.register(fd, selectors.EVENT_READ)
                try:
                    sel.select(timeout=0.05 if self._merger is not None and self._merger.held else 0.5)
                finally:
                    sel.unregister(fd)


class _Lane:
    """One dissector of a Dissector: a tshark, then the fresh ones it hands over to, and the reading of their lines.

    The feeder thread writes (`write`, `end_input`); the caller's thread reads (`read`). Frame numbers are the
    records' own (their place in the whole input), whichever lane they were dealt to.
    """

    def __init__(self, owner: Dissector, index: int, flush: bool) -> None:
        self._d = owner
        self.index = index
        self.flush = flush
        self.instances: list[TsharkProcess] = []  # appended by the feeder, read by the caller
        self.standby: TsharkProcess | None = None
        self.reading = 0  # index of the instance whose output is being read
        self.sent_frame = 0  # frame of the last record whose bytes are all in a tshark's pipe

    # ---- feeder thread ----------------------------------------------------------------------------------------

    def write(self, batch: list[Record]) -> bool:
        """Write records to this lane's tshark, handing over at the boundary. False to stop feeding."""
        d = self._d
        i = 0
        while i < len(batch):
            if d._stop:
                return False  # closing: spawn and feed nothing more
            inst = self.instances[-1]
            if inst.written >= d._handover_every or self._memory_full(inst):
                inst = self._handover(inst)
            # Live, one tshark keeps a standby ready at all times; several start theirs as their memory nears the
            # limit, or a run would hold twice as many idle tsharks.
            early = d._live and len(d._lanes) == 1
            if self.standby is None and (early or inst.rss_high or inst.written >= d._handover_every // 2):
                self.standby = _spawn(d._tshark, self.flush, d._env)  # starts up while this one is still busy
            take = batch[i : i + d._handover_every - inst.written]
            i += len(take)
            parts: list[bytes] = []
            for rec in take:
                if rec.header is not inst.header:
                    old = inst.header
                    parts.append(rec.header[len(old) :] if old is not None and rec.header.startswith(old)
                                 else rec.header)
                    inst.header = rec.header
                data = rec.data
                size = len(data)
                if size <= CUT_FROM:
                    parts.append(rec.raw)
                    continue
                cut = rec.payload_at
                if not cut:
                    cut = headers_end(rec.linktype, data)
                    if cut < size:
                        rec.payload_at = cut
                parts.append(cut_record(rec, cut))  # the whole record when the cut is not inside it
            inst.records.extend(take)
            inst.written += len(take)
            inst.last_frame = take[-1].frame
            assert inst.proc.stdin is not None
            try:
                _write_all(inst.proc.stdin.fileno(), b"".join(parts))
            except (OSError, ValueError):
                return False  # tshark died or we are closing: the reading side reports it
            self.sent_frame = inst.last_frame
        return True

    def end_input(self) -> None:
        """The input ended: the last tshark finishes what it has; a standby never used is stopped."""
        for inst in self.instances[-1:]:
            _close_stdin(inst)
        standby, self.standby = self.standby, None
        if standby is not None:
            standby.proc.kill()  # never used: input ended before a handover needed it
            standby.proc.wait()
            standby.stderr.close()

    def _memory_full(self, inst: TsharkProcess) -> bool:
        """True once tshark's memory reached the limit; read every RSS_CHECK_EVERY records (a /proc read)."""
        if inst.written - inst.rss_checked < RSS_CHECK_EVERY:
            return False
        inst.rss_checked = inst.written
        rss = inst.rss()
        if rss is None:
            return False
        limit = self._d._handover_rss
        inst.rss_high = rss >= limit * 0.85
        return rss >= limit

    def _handover(self, old: TsharkProcess) -> TsharkProcess:
        d = self._d
        new = self.standby if self.standby is not None else _spawn(d._tshark, self.flush, d._env)
        self.standby = None
        new.base = old.base + old.written
        self.instances.append(new)
        d.stats.tshark_restarts += 1
        log.info("tshark hand-over after %d packets (memory %s MB)", old.written,
                 f"{(old.rss() or 0) / 1e6:.0f}")
        _close_stdin(old)  # the old one finishes what it has and exits
        return new

    def close(self) -> None:
        everyone = list(self.instances) + ([self.standby] if self.standby is not None else [])
        for inst in everyone:
            inst.close()

    # ---- caller's thread --------------------------------------------------------------------------------------

    @property
    def done(self) -> bool:
        """Its input ended and every line of its tsharks is read."""
        if not self.instances:
            return False
        return self.reading == len(self.instances) - 1 and self.instances[-1].retired

    @property
    def lines_waiting(self) -> bool:
        inst = self.instances[self.reading] if self.instances else None
        return inst is not None and inst.line_pos < len(inst.lines)

    def fileno(self) -> int:
        inst = self.instances[self.reading]
        if inst.eof and self.reading + 1 < len(self.instances):
            inst = self.instances[self.reading + 1]
        assert inst.proc.stdout is not None
        return inst.proc.stdout.fileno()

    def idle(self, frame: int) -> bool:
        """The record of this frame is in a tshark's pipe, and every tshark of the lane has read all its input,
        printed all it has (all read and parsed), and sleeps (a blocked read)."""
        if frame > self.sent_frame or self.lines_waiting:
            return False
        return all(inst.idle() for inst in self.instances[self.reading :] if not inst.retired)

    def read(self, max_items: int, max_bytes: int) -> list[Segment]:
        d = self._d
        out: list[Segment] = []
        budget_end = d._used_bytes + max_bytes
        while len(out) < max_items and d._used_bytes < budget_end and d._tool_error is None and self.instances:
            inst = self.instances[self.reading]
            if inst.line_pos < len(inst.lines):
                self._parse(inst, out, max_items - len(out), budget_end - d._used_bytes)
                continue
            if inst.eof:
                if not inst.retired:
                    self._retire(inst)
                if self.reading + 1 < len(self.instances):
                    self.reading += 1
                    continue
                break
            if not self._read_more(inst):
                break
        return out

    def _read_more(self, inst: TsharkProcess) -> bool:
        """One non-blocking read of tshark's output. False when nothing is available now."""
        assert inst.proc.stdout is not None
        try:
            data = os.read(inst.proc.stdout.fileno(), READ_SIZE)
        except BlockingIOError:
            return False
        except (OSError, ValueError):
            data = b""
        if data:
            text = inst.partial + data
            cut = text.rfind(b"\n") + 1
            inst.partial = text[cut:]
            inst.lines = text[:cut].decode("ascii", "replace").splitlines()
            inst.line_pos = 0
            return True
        self._finish(inst)
        return True

    def _finish(self, inst: TsharkProcess) -> None:
        d = self._d
        inst.eof = True
        try:
            code = inst.proc.wait(timeout=5)  # stdout closed: tshark is exiting right now
        except subprocess.TimeoutExpired:
            inst.proc.kill()
            code = inst.proc.wait()
        stdin_closed = inst.proc.stdin is None or inst.proc.stdin.closed
        if inst.header is None and stdin_closed:
            code = 0  # it was given nothing at all (empty or unreadable input): its complaint adds nothing
        if code != 0 or not stdin_closed:
            if not d._closed:
                detail = inst.last_stderr()
                unknown = re.search(r"network type (\d+) unknown or unsupported", detail)
                if unknown is not None:
                    d._tool_error = InputError(
                        f"link type {linktype_name(int(unknown.group(1)))} is not one kubectl-mirror or tshark "
                        f"{'.'.join(map(str, d._tshark.version))} can read: capture on the pod's network "
                        f"interface (tcpdump -i any or -i eth0)")
                    return
                d._tool_error = ToolError(
                    f"tshark exited unexpectedly (code {code}): {detail or 'no message'}; "
                    f"check that {d._tshark.path} works, or pass --tshark PATH"
                )
            return
        if inst.partial:  # a last line without its newline
            inst.lines = [*inst.lines[inst.line_pos :], inst.partial.decode("ascii", "replace")]
            inst.line_pos = 0
            inst.partial = b""

    def _retire(self, inst: TsharkProcess) -> None:
        """Every line of a finished instance is parsed: whatever it never printed a line for was not TCP."""
        d = self._d
        left = len(inst.records)
        d.stats.non_tcp += left
        d._used_records += left
        d._used_bytes += sum(len(r.raw) for r in inst.records)
        inst.records.clear()
        inst.popped += left
        inst.retired = True
        if d._merger is not None and inst.last_frame:
            d._merger.answered(self.index, inst.last_frame)
        # Its output is read and its exit checked: release its descriptors now, not at close(), or every
        # hand-over of a long run leaves two behind.
        for f in (inst.proc.stdout, inst.stderr):
            try:
                if f is not None:
                    f.close()
            except OSError:
                pass

    def _parse(self, inst: TsharkProcess, out: list[Segment], limit: int, budget: int) -> None:
        # One loop with everything in locals: this runs once per packet and is most of the caller's CPU.
        d = self._d
        lines = inst.lines
        stop = min(len(lines), inst.line_pos + limit)
        records = inst.records
        popped = inst.popped
        endpoint = d._endpoint
        stats = d.stats
        used_records = used_bytes = non_tcp = tcp = 0
        last = 0
        append = out.append
        for k in range(inst.line_pos, stop):
            if used_bytes >= budget:
                stop = k  # the rest stays in inst.lines for the next call
                break
            f = lines[k].split("\t")
            try:
                number = int(f[0])
            except ValueError:
                continue
            skip = number - popped - 1
            if skip < 0 or skip >= len(records):
                continue  # not a frame we sent (only if tshark misbehaves): ignore the line
            for _ in range(skip):
                used_bytes += len(records.popleft().raw)
            rec = records.popleft()
            used_bytes += len(rec.raw)
            used_records += skip + 1
            non_tcp += skip
            popped = number
            last = rec.frame
            try:
                seq, ack, tcp_len, flags = int(f[7]), int(f[8]), int(f[9]), int(f[10], 16)
                src, dst = endpoint(f[1] or f[2], f[3]), endpoint(f[4] or f[5], f[6])
            except (ValueError, IndexError):
                non_tcp += 1  # a malformed TCP header: tshark could not read the fields
                continue
            at = rec.payload_at
            payload: bytes | None
            if at and at + tcp_len <= len(rec.data):
                payload = rec.data[at : at + tcp_len] if tcp_len else b""  # as tcp_payload, headers read once
            else:
                payload = tcp_payload(rec.linktype, rec.data, tcp_len)
            tcp += 1
            if payload is None:
                payload = self._slow_payload(rec, f, tcp_len)
            if payload is None:
                append(Segment(rec.ts, src, dst, seq, ack, flags, b"", False, rec.frame))
            else:
                append(Segment(rec.ts, src, dst, seq, ack, flags, payload, True, rec.frame))
        inst.popped = popped
        d._used_records += used_records
        d._used_bytes += used_bytes
        stats.non_tcp += non_tcp
        stats.tcp_segments += tcp
        inst.line_pos = stop
        if stop >= len(lines):
            inst.lines = []
            inst.line_pos = 0
        if last and d._merger is not None:
            d._merger.answered(self.index, last)

    def _slow_payload(self, rec: Record, f: list[str], tcp_len: int) -> bytes | None:
        """Off the hot path: only frames the fast path could not cut come here."""
        lt = rec.linktype
        stats = self._d.stats
        try:
            payload, found = locate_payload(lt, rec.data, int(f[3]), int(f[6]), int(f[7]), tcp_len)
        except ValueError:
            payload, found = None, False
        if found:
            stats.slow_tcp[lt] = stats.slow_tcp.get(lt, 0) + 1
        else:
            stats.not_understood[lt] = stats.not_understood.get(lt, 0) + 1
        return payload


def _close_stdin(inst: TsharkProcess) -> None:
    try:
        if inst.proc.stdin is not None:
            inst.proc.stdin.close()
    except OSError:
        pass
