"""A Source over another framework's TensorBoard logdir (Hugging Face, Lightning, Megatron, or mapped).

Points come from `TensorBoardTail`; the framework is detected from the tags seen (see
`frameworks.detect`), once, at the first step that is complete; until then whole steps are kept
(bounded) and replayed when detection succeeds. A step is complete when a point of another step
arrives, at `flush()`, or, in `poll()`, when nothing new has arrived for it for `settle_s` seconds
(Hugging Face and Lightning flush their writer after each logging call, so their steps settle at
once; Megatron's writer flushes every 120 s and may split a step across flushes). Points of a step
that arrive after it was released make a second record carrying just those values.

`poll(limit)` reads events in slices of what the limit still lacks (a step is one event or several), so
a long backlog is read, and held, a slice at a time; released steps beyond the limit (the held undecided
ones, when the framework becomes known) wait in `_ready` for the next call, and travel in `state()`.
"""

from __future__ import annotations

import os
import time
from collections import deque
from pathlib import Path
from typing import Any

from monitor.runlog.adapters.frameworks import (
    BY_NAME,
    FRAMEWORKS,
    PendingStep,
    StepBuffer,
    TagMap,
    detect,
    validate_mapping,
)
from monitor.runlog.adapters.tbtail import TensorBoardTail
from monitor.schema import RunInfo, StepRecord

# Seconds without new points after which a held-back step is released by poll(), per framework.
SETTLE_S = {"huggingface": 2.0, "lightning": 2.0, "megatron": 150.0, "tensorboard": 150.0}
MAX_UNDECIDED_STEPS = 5000
MAX_TAGS = 2000


def run_id_of(path: Path) -> str:
    return path.name or path.resolve().name


class TensorBoardSource:
    def __init__(self, path: str | os.PathLike[str], mapping: dict[str, str] | None = None, *,
                 settle_s: float | None = None, clock=time.monotonic) -> None:
        self.path = Path(path)
        self.mapping = validate_mapping(mapping)
        self.problems: list[str] = []
        self.tail = TensorBoardTail(self.path, self.problems)
        self.info = RunInfo(run_id=run_id_of(self.path), source="tensorboard", created=0.0)
        self.tags: set[str] = set()
        self.tagmap: TagMap | None = None
        self.settle_s = settle_s
        self._clock = clock
        self._buffer = StepBuffer()
        self._last_arrival: float | None = None
        self._undecided: deque[PendingStep] = deque(maxlen=MAX_UNDECIDED_STEPS)
        self._ready: deque[PendingStep] = deque()  # released steps that wait for room under a poll's limit
        self._new_tags = False
        # Until the framework is known, keep only the tags some framework (or the mapping) would use: the
        # others (Megatron's "... vs samples" twins, logged at the sample count) must not split steps.
        self._candidates = [TagMap(fw, self.mapping) for fw in FRAMEWORKS] + [TagMap(None, self.mapping)]
        self.records_emitted = 0

    # -- detection ------------------------------------------------------------------------------

    @property
    def problem_counts(self) -> dict[str, int]:
        return self.tail.problem_counts

    @property
    def framework(self) -> str | None:
        return self.tagmap.framework.name if self.tagmap is not None and self.tagmap.framework else None

    def _decide(self) -> bool:
        """Pick the framework (once); True when records can be built."""
        tm = self.tagmap
        if tm is not None and tm.framework is not None:
            return True
        if not self._new_tags:
            return tm is not None
        self._new_tags = False
        fw = detect(self.tags)
        if fw is not None:  # a mapped generic source still upgrades to a framework
            self.tagmap = TagMap(fw, self.mapping)
        elif tm is None and self.mapping:
            self.tagmap = TagMap(None, self.mapping)
        if self.tagmap is not None:
            self.info.source = self.tagmap.source
        return self.tagmap is not None

    @property
    def unrecognized(self) -> str | None:
        """Why no records can come from this logdir yet (no known tags and no mapping), else None."""
        if self.tagmap is not None:
            return None
        seen = sorted(self.tags)
        shown = ", ".join(repr(t) for t in seen[:20]) + (" ..." if len(seen) > 20 else "")
        return (f"{self.path}: TensorBoard event files without the tags of a known framework (looked for Hugging "
                "Face 'train/loss', Lightning 'train_loss'/'lr-<Optimizer>', Megatron-LM 'lm loss'/'learning-rate'); "
                + (f"scalar tags seen: {shown}; " if seen else "no scalar events yet; ")
                + "name yours with --map loss=TAG (and lr=TAG, grad_norm=TAG, ...)")

    # -- records --------------------------------------------------------------------------------

    def _emit(self, p: PendingStep | None) -> None:
        """A released step: held undecided until the framework is known, then ready (after those held)."""
        if p is None:
            return
        if not self._decide():
            self._undecided.append(p)
            return
        self._ready.extend(self._undecided)
        self._undecided.clear()
        self._ready.append(p)

    def _drain(self, out: list[StepRecord], limit: int | None) -> None:
        """Records of the ready steps into `out`, up to `limit` in it."""
        tagmap, ready = self.tagmap, self._ready
        while ready and tagmap is not None and (limit is None or len(out) < limit):
            p = ready.popleft()
            r = tagmap.record(p.step, p.wall_time, p.values)
            if r is not None:
                out.append(r)
                self.records_emitted += 1

    def poll(self, limit: int | None = None) -> list[StepRecord]:
        """Records of the steps completed since the last call; with `limit`, at most that many."""
        out: list[StepRecord] = []
        self._drain(out, limit)
        more = bool(self._ready) or (limit is not None and len(out) >= limit)  # left for the next call
        arrived = False
        while not more:
            room = None if limit is None else limit - len(out)
            events = self.tail.poll_events(room)  # a step takes at least one event: no more than needed
            arrived |= self._take(self.tail.points(events, self._keep))
            self._drain(out, limit)
            if room is None or len(events) < room:
                break  # read to the end
            more = bool(self._ready) or len(out) >= limit
        if self.tail.first_wall_time is not None and not self.info.created:
            self.info.created = self.tail.first_wall_time
        now = self._clock()
        if arrived:
            self._last_arrival = now
        settle = self.settle_s if self.settle_s is not None else SETTLE_S.get(self.info.source, 150.0)
        pending = self._buffer.pending
        # Only when read to the end: a step cut by the limit has more points waiting in the file.
        if not more and pending is not None and self._last_arrival is not None and now - self._last_arrival >= settle:
            self._emit(self._buffer.release())
            self._drain(out, limit)
        return out

    def _take(self, points: list) -> bool:
        """Points into steps; whether there were any."""
        buf = self._buffer
        for step, wall, tag, value in points:
            if step < 0:  # no writer counts steps below zero; taken as a step it would look like a restart
                self.tail.report("negative-step", f"{self.path}: a point at step {step} ({tag!r}): steps are "
                                  "never negative; skipped it (and any more such points: counted)")
                continue
            tm = self.tagmap
            if tm is not None and tm.framework is not None and not tm.relevant(tag):
                continue  # the framework was detected in this poll: its own tags only from here
            self._emit(buf.add(step, wall, tag, value))
        return bool(points)

    def _keep(self, tag: str) -> bool:
        """Notes every tag (for detection), keeps those the framework (or, until known, any framework or the
        mapping) uses."""
        if tag not in self.tags and len(self.tags) < MAX_TAGS:
            self.tags.add(tag)
            self._new_tags = True
        tm = self.tagmap
        if tm is not None and tm.framework is not None:
            return tm.relevant(tag)
        return any(c.relevant(tag) for c in self._candidates)

    def flush(self) -> list[StepRecord]:
        out: list[StepRecord] = []
        self._emit(self._buffer.release())
        self._drain(out, None)
        return out

    # -- positions ------------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        return {
            "kind": "tensorboard",
            "tail": self.tail.state(),
            "framework": self.framework,
            "decided": self.tagmap is not None,
            "tags": sorted(self.tags)[:MAX_TAGS],
            "pending": self._buffer.state(),
            "undecided": [StepBuffer.state(_holder(p)) for p in self._undecided],
            "ready": [StepBuffer.state(_holder(p)) for p in self._ready],
        }

    def restore(self, state: dict[str, Any]) -> None:
        self.tail.restore(state.get("tail") or {})
        if self.tail.first_wall_time:
            self.info.created = self.tail.first_wall_time
        self.tags = set(state.get("tags") or [])
        fw = state.get("framework")
        if fw in BY_NAME or (state.get("decided") and self.mapping):
            self.tagmap = TagMap(BY_NAME.get(fw), self.mapping)
            self.info.source = self.tagmap.source
        self._buffer.restore(state.get("pending"))
        for held, key in ((self._undecided, "undecided"), (self._ready, "ready")):
            held.clear()
            for s in state.get(key) or []:
                b = StepBuffer()
                b.restore(s)
                if b.pending is not None:
                    held.append(b.pending)
        self._last_arrival = self._clock() if self._buffer.pending is not None else None


def _holder(p: PendingStep) -> StepBuffer:
    b = StepBuffer()
    b.pending = p
    return b
