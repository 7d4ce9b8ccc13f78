"""Which pods to mirror as the workload changes: sans-I/O.

Pod changes in (from podwatch), decisions out (start capturing a pod, stop one, say something, end the run).
The edge carries them out and reports back (started, failed to start, capture lost for good).

- ONE (the default): mirror one Ready pod; when it goes (deleted, evicted, finished, not Ready), move to another
  Ready pod of the workload as soon as there is one, and say so on one line.
- ALL (--all-pods): mirror every Ready pod; a pod that becomes Ready is started, a pod that goes is stopped.
- NAMED (pod/NAME): that pod and no other; when it goes the run ends.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from .podwatch import Change, ChangeKind, template_of
from .target import Pod


class Mode(str, enum.Enum):
    ONE = "one"
    ALL = "all"
    NAMED = "named"


@dataclass(frozen=True, slots=True)
class Start:
    pod: Pod

    @property
    def name(self) -> str:
        return self.pod.metadata.name


@dataclass(frozen=True, slots=True)
class Stop:
    name: str
    why: str  # "terminating", "deleted", "evicted", "not ready", ...


@dataclass(frozen=True, slots=True)
class Say:
    text: str


@dataclass(frozen=True, slots=True)
class End:
    """The named pod is gone: nothing left to mirror."""

    message: str


Decision = Start | Stop | Say | End


@dataclass
class _Left:
    name: str
    why: str
    template: str | None


@dataclass
class Follower:
    mode: Mode
    source: str  # "deployment web", "selector app=web": for messages
    active: set[str] = field(default_factory=set)  # capturing, or being started
    history: list[str] = field(default_factory=list)  # every pod mirrored over the run, in order
    latest_move: str | None = None
    _starting: set[str] = field(default_factory=set)
    _failed: set[str] = field(default_factory=set)  # a start failed: not tried again until it is Ready anew
    _templates: dict[str, str | None] = field(default_factory=dict)
    _left: _Left | None = None
    _unready: str | None = None  # ONE: the mirrored pod is not Ready, and no other pod is: kept until one is
    _waiting: bool = False  # the "waiting for a ready pod" line was said and nothing was mirrored since
    ended: bool = False

    def seed(self, pods: list[Pod]) -> None:
        """The pods the run started with (already capturing)."""
        for pod in pods:
            name = pod.metadata.name
            self.active.add(name)
            self._templates[name] = template_of(pod)
            if name not in self.history:
                self.history.append(name)

    @property
    def capturing(self) -> int:
        return len(self.active - self._starting)

    # ---- events in --------------------------------------------------------------------------------

    def changes(self, changes: list[Change], ready: list[Pod]) -> list[Decision]:
        """Pod changes from the watch; `ready` is every Ready pod of the selection now."""
        if self.ended:
            return []
        out: list[Decision] = []
        for c in changes:
            if c.kind is ChangeKind.READY or c.kind is ChangeKind.GONE:
                self._failed.discard(c.name)  # Ready anew (or gone): a failed start is history
            if self.mode is Mode.NAMED:
                if c.kind is ChangeKind.GONE and c.name in self.active:
                    self.ended = True
                    self.active.discard(c.name)
                    return [End(f"pod {c.name} is gone ({c.why}), so there is nothing left to mirror; to follow a "
                                "pod's replacements, name its workload (for example deploy/NAME) or use -l")]
                continue
            if c.name == self._unready and c.kind is not ChangeKind.UNREADY:
                self._unready = None  # Ready again (nothing to do), or gone (handled below)
            leaves = c.kind is ChangeKind.GONE or (c.kind is ChangeKind.UNREADY and self.mode is Mode.ONE)
            if leaves and c.kind is ChangeKind.UNREADY and not self._others(ready, c.name):
                # Not Ready, and no other pod is: its traffic may still come (direct, draining), so it stays
                # mirrored until another pod is Ready to take over.
                self._unready = c.name
                continue
            if leaves and c.name in self.active:
                self.active.discard(c.name)
                self._starting.discard(c.name)
                out.append(Stop(c.name, c.why))
                if self.mode is Mode.ONE:
                    self._left = _Left(c.name, c.why, self._templates.get(c.name))
                else:
                    self.latest_move = f"-{c.name} ({c.why})"
                    out.append(Say(f"pod {c.name} is gone ({c.why}); {self._mirroring_now()}"))
            if self.mode is Mode.ALL and c.kind is ChangeKind.READY and c.name not in self.active:
                out.append(self._start(c.pod))
        return out + self._fill(ready)

    def started(self, name: str) -> list[Decision]:
        """The capture of `name` runs."""
        if name not in self._starting:
            return []  # stopped while it was being started
        self._starting.discard(name)
        if name not in self.history:
            self.history.append(name)
        self._waiting = False
        if self.mode is Mode.ALL:
            self.latest_move = f"+{name}"
            return [Say(f"now also mirroring pod {name}; {self._mirroring_now()}")]
        left, self._left = self._left, None
        if left is None:
            self.latest_move = f"-> {name}"
            return [Say(f"now mirroring pod {name}")]
        why = left.why
        new_template = self._templates.get(name)
        if why in ("terminating", "deleted") and left.template and new_template and left.template != new_template:
            why = "rollout"
        self.latest_move = f"{left.name} -> {name} ({why})"
        state = "is not ready" if left.why == "not ready" else "is gone"
        return [Say(f"pod {left.name} {state}; now mirroring {name} ({why})")]

    def start_failed(self, name: str, message: str, ready: list[Pod]) -> list[Decision]:
        """Tapping or capturing `name` failed: try another pod (ONE), or go on without it (ALL)."""
        self.active.discard(name)
        self._starting.discard(name)
        self._failed.add(name)
        out: list[Decision] = [Say(f"warning: cannot mirror pod {name}: {message}")]
        if self.mode is Mode.NAMED:
            self.ended = True
            return [End(f"cannot mirror pod {name} any more: {message}")]
        return out + self._fill(ready)

    def capture_lost(self, name: str, message: str, ready: list[Pod]) -> list[Decision]:
        """The capture of `name` could not be restarted: as a failed start."""
        if name not in self.active:
            return []
        return self.start_failed(name, message, ready)

    # ---- helpers ----------------------------------------------------------------------------------

    def _start(self, pod: Pod) -> Start:
        name = pod.metadata.name
        self.active.add(name)
        self._starting.add(name)
        self._templates[name] = template_of(pod)
        return Start(pod)

    def _fill(self, ready: list[Pod]) -> list[Decision]:
        """ONE: a Ready pod when none is mirrored; ALL: every Ready pod. Or say that it waits, once."""
        if self.mode is Mode.NAMED:
            return []
        out: list[Decision] = []
        candidates = [p for p in ready if p.metadata.name not in self.active and p.metadata.name not in self._failed]
        if self.mode is Mode.ONE:
            if self._unready is not None and self._unready in self.active and candidates:
                name, self._unready = self._unready, None
                self.active.discard(name)
                self._starting.discard(name)
                self._left = _Left(name, "not ready", self._templates.get(name))
                out.append(Stop(name, "not ready"))
            if not self.active and candidates:
                out.append(self._start(candidates[0]))
        else:
            out += [self._start(p) for p in candidates]
        if not self.active and not self._waiting:
            self._waiting = True
            left = self._left
            lead = f"pod {left.name} is gone ({left.why}); " if left is not None else ""
            out.append(Say(f"{lead}no ready pod of {self.source}: waiting for one (Ctrl-C to stop)"))
        return out

    def _others(self, ready: list[Pod], name: str) -> bool:
        return any(p.metadata.name != name and p.metadata.name not in self._failed for p in ready)

    def _mirroring_now(self) -> str:
        n = len(self.active)
        if n == 0:
            return "no pod mirrored now"
        return f"mirroring {n} pod{'s' if n != 1 else ''}"
