"""The soak's traffic plan, shared by the generator (the pod's "tcpdump") and the checker.

Everything derives from one seed, so the checker regenerates each connection's expected bytes instead of
anyone keeping 1 GB around. A connection's client bytes are a header carrying its id (the recorder keys on it)
followed by a slice of one seeded random pool: cheap to produce at GB scale, and any misplaced, missing or
repeated byte still changes the hash because the pool has no structure.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path

POOL_SIZE = 8 << 20
HEADER = b"SOAK%08d:%010d\n"  # id, total length; 24 bytes
HEADER_LEN = len(HEADER % (0, 0))
ID_LEN = 12  # b"SOAK" + 8 digits: what the recorder needs to name a connection
MIN_SIZE = 64
MAX_SIZE = 4 << 20  # below POOL_SIZE: every connection is one contiguous slice of the pool


@dataclass(frozen=True)
class SoakConfig:
    conns: int
    total_bytes: int
    seed: int
    server_ip: str
    marker: str  # created by the first generator run; later runs (capture reconnects) produce no traffic
    go_file: str  # the generator waits for it after the warm-up connections: the runner's idle fd baseline
    warmup: int = 0  # connections written before that pause
    concurrency: int = 64  # connections interleaved at once in the stream
    linktype: int = 276  # LINUX_SLL2, what tcpdump -i any writes; 1 (EN10MB) also works

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self)))

    @classmethod
    def load(cls, path: Path) -> SoakConfig:
        return cls(**json.loads(path.read_text()))


def make_pool(seed: int) -> bytes:
    return random.Random(f"pool/{seed}").randbytes(POOL_SIZE)


def sizes(cfg: SoakConfig) -> list[int]:
    """Client payload per connection: mostly request-sized, some hundreds of KB, a few MB; scaled to the total."""
    rnd = random.Random(f"sizes/{cfg.seed}")
    raw: list[float] = []
    for _ in range(cfg.conns):
        r = rnd.random()
        if r < 0.90:
            raw.append(math.exp(rnd.uniform(math.log(200), math.log(8 << 10))))
        elif r < 0.995:
            raw.append(math.exp(rnd.uniform(math.log(16 << 10), math.log(256 << 10))))
        else:
            raw.append(rnd.uniform(1 << 20, 3 << 20))
    scale = cfg.total_bytes / sum(raw)
    return [max(MIN_SIZE, min(MAX_SIZE, int(x * scale))) for x in raw]


def pool_offset(seed: int, conn_id: int, size: int) -> int:
    return random.Random(f"off/{seed}/{conn_id}").randrange(0, POOL_SIZE - size + 1)


def content(pool: bytes, seed: int, conn_id: int, size: int) -> bytes:
    """The exact bytes the client sent on connection `conn_id` (what the local target must receive)."""
    head = HEADER % (conn_id, size)
    off = pool_offset(seed, conn_id, size)
    return head + pool[off : off + size - len(head)]


def expected(cfg: SoakConfig) -> dict[int, tuple[int, str]]:
    """conn id -> (length, sha256 hex) of every connection's client bytes."""
    pool = make_pool(cfg.seed)
    out: dict[int, tuple[int, str]] = {}
    for cid, size in enumerate(sizes(cfg)):
        out[cid] = (size, hashlib.sha256(content(pool, cfg.seed, cid, size)).hexdigest())
    return out
