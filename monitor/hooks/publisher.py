"""The publisher thread: turns Packets into StepRecords and runs them through named stages.

Everything slow (waiting for the device, building records, writing events,
Prometheus, rules) happens here, off the training thread. The wait for the device polls the
step's event with a deadline; the clock rules (run.stalled) never depend on this thread. Each step goes through
`decode` (the Packet into a StepRecord), then the `stages` in order, which see
the decoded step and may annotate its record (e.g. the rank exchange's outcome),
then the `outputs` in order, which read the record (e.g. the event writer, the
metrics, the rules). An error in one is counted and logged under that stage's
name, and the step goes on to the next. Steps are published a batch at a time (decode and the
stages record by record, then each output over the batch: GATHER_SECONDS), in step order to every
output. The queue is bounded: when it is full the training thread drops the record and counts it
instead of waiting.
"""

from __future__ import annotations

import math
import threading
import time
from array import array
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from torch import Tensor

from monitor.hooks.guard import ErrorGuard
from monitor.hooks.packet import Packet
from monitor.hooks.phases import resolve_phases
from monitor.schema import StepRecord

# The longest a step's device-to-host copy is waited for: past any real step, short of forever (a hung
# kernel); the watchdog's clock rules meanwhile raise run.stalled from their own thread.
DEVICE_WAIT_SECONDS = 600.0


@dataclass(slots=True)
class Decoded:
    """One step on the publisher thread: its record and what the packet carried beside it."""

    record: StepRecord
    fingerprint: list[float] | None  # the weights' norms, on rank exchange steps (the rank exchange's)
    batch_size: int | None  # the per-device batch (run.json's batch facts)


def decode(p: Packet, rank: int, param_names: list[str], attempt: int = 1) -> Decoded:
    """The StepRecord of a packet, with the parameter fingerprint it carried (or None)."""
    # The non_blocking copy's event is complete (Publisher._publish waited for it, with a deadline).
    values = p.values.tolist() if p.values is not None else []
    if p.recycle is not None:
        p.recycle()  # read: the host buffer goes back to the training thread's pool
    fingerprint = None
    if p.fp_count:
        fingerprint = values[len(values) - p.fp_count:]
        values = values[:len(values) - p.fp_count]
    field_at, lr_at, scalar_at, attention_at = _layout_plan(p.layout)
    fields = {name: values[i] for name, i in field_at}
    s = p.state  # its plain values only: its tensors were staged into `values`
    lrs = [math.nan if isinstance(lr, Tensor) else float(lr) for lr in s.lrs] if s.lrs else []
    for group, i in lr_at:
        lrs[group] = values[i]
    scalars = {k: v for k, v in s.scalars.items() if not isinstance(v, Tensor)} if s.scalars else {}
    for name, i in scalar_at:
        scalars[name] = values[i]
    attention: dict[str, dict[str, float]] = {}
    for layer, stat, i in attention_at:
        attention.setdefault(layer, {})[stat] = values[i]
    n = len(p.layout)
    found_inf = fields.pop("found_inf", None)
    grad_norm = fields.get("grad_norm")
    coef = fields.get("clip_coef")
    if coef is None and grad_norm is not None and p.max_norm is not None:  # the loop clipped by this norm
        coef = fields["clip_coef"] = clip_coef(grad_norm, p.max_norm)
    if grad_norm is not None:
        fields["grad_norm_clipped"] = grad_norm * coef if coef is not None else grad_norm
        if coef is None:
            fields["clip_coef"] = 1.0  # the loop did not clip: nothing was scaled
    param_norms = None
    if len(values) > n:
        norms = values[n:]
        if p.param_index is None:  # every parameter, in order
            param_norms = dict(zip(param_names, norms))
        else:
            param_norms = {param_names[i]: v for i, v in zip(p.param_index, norms)}
    if "loss" not in fields and p.loss_value is not None:
        fields["loss"] = p.loss_value
    start = p.start
    phases = resolve_phases(p.phases)  # CUDA events are waited for here, off the training thread
    rec = StepRecord(
        step=p.step, rank=rank, attempt=attempt, time=p.time, loss=fields.get("loss"), lr=lrs,
        grad_norm=grad_norm, grad_norm_clipped=fields.get("grad_norm_clipped"),
        clip_coef=fields.get("clip_coef"), max_norm=p.max_norm, loss_scale=fields.get("loss_scale"),
        grad_norm_unknown=p.grad_norm_unknown,
        skipped=bool(found_inf) if found_inf is not None else False,
        step_time=p.end - start if start is not None else None,
        tokens=s.logged_tokens if s.logged_tokens is not None else (s.tokens or None), micro_batches=s.micro,
        autocast=s.autocast, scheduler_steps=p.scheduler_steps, param_norms=param_norms,
        attention=attention or None, scalars=scalars,
        busy_time=s.t_fwd_end - start if start is not None and s.t_fwd_end is not None else None,
        local_grad_norm=fields.get("local_grad_norm"), memory=p.memory,
        input_time=phases["input"], compute_time=phases["compute"], collective_wait_time=phases["collective_wait"],
    )
    return Decoded(rec, fingerprint, s.batch)


@lru_cache(maxsize=256)
def _layout_plan(layout: tuple[str, ...]) -> tuple[tuple, tuple, tuple, tuple]:
    """Where a layout's values go, worked out once per layout: ((field, i)...), ((lr group, i)...),
    ((scalar, i)...), ((layer, stat, i)...)."""
    fields, lrs, scalars, attention = [], [], [], []
    for i, name in enumerate(layout):
        if name.startswith("lr:"):
            lrs.append((int(name[3:]), i))
        elif name.startswith("s:"):
            scalars.append((name[2:], i))
        elif name.startswith("a:"):  # a:<stat>:<layer>
            _, stat, layer = name.split(":", 2)
            attention.append((layer, stat, i))
        else:
            fields.append((name, i))
    return tuple(fields), tuple(lrs), tuple(scalars), tuple(attention)


def _f32(x: float) -> float:
    return array("f", (x,))[0]  # rounded to float32 as a C cast rounds (past its range: inf)


_EPS32 = _f32(1e-6)


def clip_coef(total: float, max_norm: float) -> float:
    """clip_grad_norm_'s coefficient, clamp(max_norm / (total + 1e-6), max=1), in its float32 arithmetic:
    torch computes `max_norm / t` as `t.reciprocal() * max_norm`, each op rounded to float32 (a float32
    op computed in double and rounded once is the float32 result: double has over twice the bits)."""
    x = _f32(total + _EPS32)
    r = _f32(1.0 / x) if x else math.copysign(math.inf, x)
    c = _f32(r * _f32(max_norm))
    return 1.0 if c > 1.0 else c  # NaN stays NaN, as torch.clamp keeps it


Stage = tuple[str, Callable[[Decoded], object]]
# (name, per record) or (name, per record, per batch): the batch form takes a list of records in step order
# (TrainMetrics.observe_many, RulesEngine.observe_many: the same result as one at a time, for less).
Output = tuple[str, Callable[[StepRecord], object]] | tuple[str, Callable[[StepRecord], object],
                                                          Callable[[list[StepRecord]], object]]
Task = tuple[str, Callable[[], object]]


def _batch_form(output: Output) -> Output:
    """An output given as an object's bound `observe` gets that object's `observe_many` as its batch form
    (TrainMetrics, RulesEngine); any other as it was given."""
    if len(output) == 2:
        name, fn = output
        many = getattr(getattr(fn, "__self__", None), "observe_many", None)
        if getattr(fn, "__name__", None) == "observe" and callable(many):
            return name, fn, many
    return output


# Steps are published a batch at a time, at most one batch per GATHER_SECONDS: a step that comes after
# a quiet spell is published at once; while steps keep coming, those that arrive meanwhile wait for the
# next batch (flush() and close() cut the wait short, and so does a queue that reaches MAX_BATCH or half
# its size, so gathering never drops a step). A batch is decoded and run through the stages record by
# record, then through each output. Fewer wake-ups and GIL hand-offs, and the batch forms of the outputs
# run longer over more records (hostcost.md compares this window with a quarter second's); a record
# reaches its outputs at most GATHER_SECONDS (plus the work) after its step ended, so mon.alerts has it
# within a second.
GATHER_SECONDS = 0.5
MAX_BATCH = 256
_GATHER_MIN_QUEUE = 64  # a smaller queue (set to see drops early) is drained as it comes


class Publisher:
    """The publisher thread and its handoff.

    The handoff is a deque: the training thread appends (atomic under the GIL, no lock) and wakes the
    publisher only when it is asleep for want of steps (`_asleep`, set before its last look at the
    deque, so a step appended meanwhile is either seen there or wakes it). While steps keep coming the
    publisher is gathering, not asleep: a step costs the training thread an append, not a lock and a
    notify as a queue.Queue would. `_taken` counts the steps the publisher has finished with (published
    or not, counted); flush() waits for it to reach `_given`.
    """

    def __init__(
        self,
        *,
        rank: int,
        param_names: list[str],
        outputs: Sequence[Output],
        guard: ErrorGuard,
        queue_size: int,
        on_drop: Callable[[], None],
        stages: Sequence[Stage] = (),
        idle: Sequence[Task] = (),
        idle_secs: float = 1.0,
        attempt: int = 1,
    ) -> None:
        """`idle`: tasks run when no step came for `idle_secs`; `attempt`: the run directory's attempt this
        process writes (on every record)."""
        self.rank = rank
        self.attempt = attempt
        self.param_names = param_names
        self.stages = list(stages)
        self.outputs = [_batch_form(o) for o in outputs]
        self.guard = guard
        self.dropped = 0
        self.published = 0
        self._on_drop = on_drop
        self._idle = list(idle)
        self._idle_secs = idle_secs
        self._closing = threading.Event()  # close() gave up waiting: a step's device copy is not waited for
        self._hurry = threading.Event()  # flush() or close() waits: no gathering
        self._gather = GATHER_SECONDS if queue_size >= _GATHER_MIN_QUEUE else 0.0
        self._full = min(MAX_BATCH, queue_size // 2)  # a queue this long ends the gathering at once
        self._next_batch = 0.0  # monotonic time before which the next batch gathers (publisher thread)
        self._size = queue_size
        self._q: deque[Packet] = deque()
        self._given = 0  # steps handed over (training thread)
        self._taken = 0  # steps finished with (publisher thread)
        self._progress = threading.Condition()  # notified when _taken moves or the thread ends
        self._asleep = False  # the publisher waits on _wake for a step
        self._wake = threading.Event()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="trainmon-publisher", daemon=True)
        self._thread.start()

    # -- training thread ---------------------------------------------------------

    def submit(self, packet: Packet) -> None:
        q = self._q
        if len(q) >= self._size:
            self.dropped += 1
            self._on_drop()
            return
        q.append(packet)
        self._given += 1
        if self._asleep or len(q) == self._full:  # asleep for want of steps, or gathering with a batch full
            self._wake.set()

    # -- any thread ----------------------------------------------------------------

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until every submitted packet is published; False on timeout."""
        deadline = time.monotonic() + timeout
        target = self._given
        self._hurry.set()
        self._wake.set()
        try:
            with self._progress:
                while self._taken < target:
                    left = deadline - time.monotonic()
                    if left <= 0 or not self._thread.is_alive():
                        return False
                    self._hurry.set()  # again: another flush() that returned may have cleared it
                    self._progress.wait(min(left, 0.1))
            return True
        finally:
            self._hurry.clear()

    def close(self, timeout: float = 30.0) -> bool:
        """Publish what is queued and stop the thread, within `timeout` in all; False when steps were
        still queued at the end of it (a step whose device copy never completes is given up)."""
        deadline = time.monotonic() + timeout
        ok = self.flush(timeout)
        self._closing.set()
        self._hurry.set()  # no more gathering: what comes now is the end
        self._stop = True
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=min(5.0, max(0.0, deadline - time.monotonic())))
        return ok

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    # -- publisher thread -------------------------------------------------------------

    def _wait_for_steps(self) -> bool:
        """Until a step is queued (True), or `idle_secs` without one (False)."""
        q = self._q
        if q:
            return True
        self._asleep = True
        try:
            while not q and not self._stop:  # looked at after _asleep is set: no wake-up is missed
                if not self._wake.wait(self._idle_secs):
                    return bool(q)
                self._wake.clear()
            return bool(q)
        finally:
            self._asleep = False

    def _run(self) -> None:
        q = self._q
        try:
            while True:
                if not self._wait_for_steps():
                    if self._stop:
                        return
                    self._run_tasks(self._idle)
                    continue
                wait = self._next_batch - time.monotonic()
                if wait > 0:
                    # Let the next steps gather into this batch. Cleared first, then looked at: a flush,
                    # a close or a queue that fills up meanwhile sets _wake, which ends the wait.
                    self._wake.clear()
                    if not self._stop and not self._hurry.is_set() and len(q) < self._full:
                        self._wake.wait(wait)
                items = [q.popleft() for _ in range(min(len(q), MAX_BATCH))]
                self._next_batch = time.monotonic() + self._gather
                try:
                    self._publish_batch(items)
                finally:
                    with self._progress:
                        self._taken += len(items)
                        self._progress.notify_all()
        finally:
            with self._progress:
                self._progress.notify_all()

    def _run_tasks(self, tasks: Sequence[Task]) -> None:
        for name, task in tasks:
            try:
                task()
            except Exception as e:
                self.guard.record(name, e)

    def _device_ready(self, event: Any) -> bool:
        """Wait for a step's device-to-host copy by polling its event (never `synchronize()`: a hung kernel
        would hold this thread for good). Gives up, counted, when the publisher is closing or after
        DEVICE_WAIT_SECONDS; the clock rules do not depend on this thread (the watchdog runs them)."""
        if event.query():
            return True
        deadline = time.monotonic() + DEVICE_WAIT_SECONDS
        pause = 1e-4
        while not event.query():
            if self._closing.is_set() or time.monotonic() > deadline:
                self.guard.record("device wait", TimeoutError(
                    "a step's device-to-host copy did not complete" + (" before close" if self._closing.is_set()
                                                                       else f" in {DEVICE_WAIT_SECONDS:.0f} s")))
                self.dropped += 1
                self._on_drop()
                return False
            self._closing.wait(pause)
            pause = min(pause * 2, 0.01)
        return True

    def _publish(self, packet: Packet) -> StepRecord | None:
        """One step decoded and through the stages: its record (None: not published, counted)."""
        if packet.event is not None and not self._device_ready(packet.event):
            return
        try:
            step = decode(packet, self.rank, self.param_names, self.attempt)
        except Exception as e:
            self.guard.record("decode", e)
            return
        for name, stage in self.stages:
            try:
                stage(step)
            except Exception as e:
                self.guard.record(name, e)
        return step.record

    def _publish_batch(self, packets: list[Packet]) -> None:
        """Steps in order: each decoded and through the stages, then every output over them all."""
        records = [r for r in map(self._publish, packets) if r is not None]
        if not records:
            return
        for name, out, *many in self.outputs:
            try:
                if many:
                    many[0](records)
                else:
                    for rec in records:
                        try:
                            out(rec)
                        except Exception as e:
                            self.guard.record(name, e)
            except Exception as e:
                self.guard.record(name, e)
        self.published += len(records)
