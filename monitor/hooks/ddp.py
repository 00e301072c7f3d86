"""What ranks share, without adding a collective to the user's training.

Ranks talk through the key-value store torch.distributed already runs for the job (torchrun's
rendezvous store, or the TCPStore of an env:// init), never through the process group: a store
read has a timeout and nobody waits for a rank that does not attach the monitor, so the monitor
can neither deadlock a run nor depend on every rank logging.

- The run directory: rank 0 publishes its name; the others take it (a short wait, then their own).
- The rank exchange: every `every` optimizer steps each rank's publisher thread posts a small
  payload (its parameter fingerprint, its busy time and the median of its step phases: input,
  compute, collective wait); rank 0's publisher compares what has arrived (ddp.desync,
  ddp.straggler read the outcome).
- The local gradient norm: a DDP communication hook measures each bucket before the all-reduce;
  the same hook times the wait for the all-reduce (hooks/phases.py).
"""

from __future__ import annotations

import base64
import json
import logging
import math
import os
import struct
import time
import weakref
from collections import deque
from collections.abc import Callable
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import torch

from monitor.hooks.phases import window_phases
from monitor.schema import PHASES

if TYPE_CHECKING:
    from monitor.hooks.phases import StepPhases
    from monitor.schema import StepRecord

log = logging.getLogger("trainmon")

_PREFIX = "trainmon/"


def job_store(timeout_s: float = 30.0) -> Any | None:
    """A client of the job's store, or None outside a distributed job."""
    try:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            from torch.distributed.distributed_c10d import _get_default_store

            store = _get_default_store()
            clone = getattr(store, "clone", None)
            return clone() if callable(clone) else store
    except Exception:  # no default store (a custom init): fall through to the environment
        pass
    host, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not host or not port or int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1:
        return None
    try:
        return torch.distributed.TCPStore(host, int(port), is_master=False, timeout=timedelta(seconds=timeout_s),
                                          wait_for_workers=False)
    except Exception as e:
        log.warning("trainmon: cannot reach the job's store at %s:%s (%s); ranks will not compare notes", host, port, e)
        return None


def _job_id() -> str:
    return os.environ.get("TORCHELASTIC_RUN_ID") or os.environ.get("MASTER_PORT", "job")


def from_rank0(store: Any, rank: int, what: str, value: str | None, timeout_s: float = 30.0) -> str | None:
    """Rank 0's `value` of `what` on every rank, through the job's store (ranks start at slightly different
    times); a rank that does not get it in time keeps its own `value`, with a warning."""
    key = f"{_PREFIX}{_job_id()}/{what}"
    try:
        if rank == 0:
            store.set(key, value)
            return value
        store.wait([key], timedelta(seconds=timeout_s))
        return store.get(key).decode()
    except Exception as e:
        log.warning("trainmon: rank %d did not get rank 0's %s through the job's store (%s)", rank, what, e)
        return value


def agree_on_name(store: Any, rank: int, proposal: str, timeout_s: float = 30.0) -> str:
    """Rank 0's run-directory `proposal` on every rank."""
    return from_rank0(store, rank, "run_dir", proposal, timeout_s) or proposal


def pack_floats(values: list[float]) -> str:
    return base64.b64encode(struct.pack(f"<{len(values)}f", *values)).decode("ascii")


def unpack_floats(text: str) -> tuple[float, ...]:
    raw = base64.b64decode(text)
    return struct.unpack(f"<{len(raw) // 4}f", raw)


class RankExchange:
    """Every `every` steps: each rank posts {fingerprint, busy time, phases}; rank 0 compares what arrived.

    Runs on the publisher threads (its own store connection), so the training threads never wait;
    rank 0 looks for the other ranks' payloads without blocking and gives up on a step after
    `timeout_s`, comparing the ranks that did report. `observe` is the publisher's stage: it keeps
    the busy and phase times of the steps since the last exchange, posts on exchange steps and
    puts the outcomes on rank 0's records (`ddp`), one per record, in step order.
    """

    def __init__(self, store: Any, rank: int, world_size: int, every: int, timeout_s: float = 60.0) -> None:
        self.store = store
        self.rank, self.world, self.every, self.timeout_s = rank, world_size, every, timeout_s
        self.ns = f"{_PREFIX}{_job_id()}/x/"
        self.pending: dict[int, float] = {}  # step -> when rank 0 posted its own payload
        self.own: dict[int, dict] = {}
        self.ready: deque[dict] = deque()  # outcomes not yet on a record (several can complete at once)
        self._busy: list[float] = []  # since the last exchange
        self._phases: dict[str, list[float]] = {name: [] for name in PHASES}

    def observe(self, rec: StepRecord, fingerprint: list[float] | None) -> None:
        """Publisher thread, each step: its record and, on exchange steps, the weights' fingerprint."""
        if rec.busy_time is not None:
            self._busy.append(rec.busy_time)
        for name, field in PHASES.items():
            v = getattr(rec, field)
            if v is not None:
                self._phases[name].append(v)
        if self.due(rec.step):  # sharded ranks post no fingerprint, but their times all the same
            busy = sum(self._busy) / len(self._busy) if self._busy else None
            self._busy.clear()
            phases = window_phases(self._phases)
            for values in self._phases.values():
                values.clear()
            fp = pack_floats(fingerprint) if fingerprint is not None else None
            self.post(rec.step, {"fp": fp, "busy": busy, "phases": phases})
        if self.pending:
            self.ready.extend(self.collect())
        if self.ready:  # one per record, in order: none is lost when several complete at once
            rec.ddp = self.ready.popleft()

    def due(self, step: int) -> bool:
        return step % self.every == 0

    def _key(self, step: int, rank: int) -> str:
        return f"{self.ns}{step}/{rank}"

    def _others(self, step: int) -> list[str]:
        return [self._key(step, r) for r in range(1, self.world)]

    def _complete(self, keys: list[str]) -> bool:
        return not keys or self.store.check(keys)

    def post(self, step: int, payload: dict) -> None:
        self.store.set(self._key(step, self.rank), json.dumps(payload))
        if self.rank == 0:
            self.pending[step] = time.monotonic()
            self.own[step] = payload

    def collect(self, final: bool = False) -> list[dict]:
        """Rank 0: the outcomes of exchanges that completed (or timed out, or all of them when `final`) since
        the last call."""
        out = []
        for step in sorted(self.pending):
            keys = self._others(step)
            complete = self._complete(keys)
            if not complete and not final and time.monotonic() - self.pending[step] < self.timeout_s:
                continue
            payloads = {0: self.own.pop(step)}
            for r, k in zip(range(1, self.world), keys):
                if complete or self.store.check([k]):
                    payloads[r] = json.loads(self.store.get(k))
                    self.store.delete_key(k)
            self.store.delete_key(self._key(step, 0))
            del self.pending[step]
            out.append(compare(step, payloads, self.world))
        return out

    def finish(self, timeout: float) -> list[dict]:
        """Rank 0 as the run closes (its publisher done): the outcomes of the exchanges still pending, which
        no later record of its own would collect. The other ranks post their last payloads as they close,
        so they are waited for, up to `timeout` (polling the store), then compared with whoever reported."""
        ready = list(self.ready)  # completed, and no record came to carry them
        self.ready.clear()
        if self.rank != 0 or not self.pending:
            return ready
        deadline = time.monotonic() + min(timeout, self.timeout_s)
        pause = 0.01
        while not all(self._complete(self._others(s)) for s in self.pending):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            time.sleep(min(pause, left))
            pause = min(pause * 2, 0.25)
        return ready + self.collect(final=True)


def compare(step: int, payloads: dict[int, dict], world: int) -> dict:
    """The exchange outcome rank 0 records: who reported, busy times, phase times, and parameters that differ."""
    ref = unpack_floats(payloads[0]["fp"]) if payloads[0].get("fp") else None
    desync = []
    for r, p in sorted(payloads.items()):
        if r == 0 or ref is None or not p.get("fp"):
            continue
        fp = unpack_floats(p["fp"])
        if len(fp) != len(ref):
            desync.append({"rank": r, "params": [], "count": -1})
            continue
        bad = [i for i, (a, b) in enumerate(zip(ref, fp)) if a != b]
        if bad:
            desync.append({"rank": r, "params": bad[:10], "count": len(bad)})
    # Phase-major, like "busy": {"input": {"0": s, "1": s}, ...}. Always present in this format;
    # ddp.straggler also reads outcomes that carry "busy" alone.
    phases: dict[str, dict[str, float]] = {}
    for r, p in sorted(payloads.items()):
        for name, v in (p.get("phases") or {}).items():
            if v is not None:
                phases.setdefault(name, {})[str(r)] = v
    return {
        "step": step,
        "world": world,
        "reported": sorted(payloads),
        "busy": {str(r): p.get("busy") for r, p in sorted(payloads.items()) if p.get("busy") is not None},
        "phases": phases,
        "desync": desync,
    }


# DDP model -> [the list our communication hook appends norms to, the StepPhases it times buckets for]
# (None: nothing): DDP cannot unregister a hook, so closing a monitor empties the slot (the hook then
# only all-reduces) and a later monitor refills it.
_HOOK_SLOTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def install_local_norm_hook(model: torch.nn.Module, sink: list,
                            phases: StepPhases | None = None) -> Callable[[], None] | None:
    """On a DDP model without a communication hook of its own: measure each gradient bucket before
    its all-reduce (this rank's own gradients), then all-reduce exactly as DDP does by default.

    `sink` collects the squared norms (device tensors, no sync). With `phases`, each bucket is also
    timed from ready to its all-reduce done (the collective wait). Returns the undo (the capture
    stops), or None when no hook went in (not DDP, or the user's own hook stays).
    """
    from torch.nn.parallel import DistributedDataParallel

    if not isinstance(model, DistributedDataParallel):
        return None
    slot = _HOOK_SLOTS.get(model)
    if slot is None:
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        slot = [None, None]

        def hook(process_group, bucket):
            target, clock = slot[0], slot[1]
            if target is not None:
                try:
                    target.append(torch.linalg.vector_norm(bucket.buffer().detach(), 2.0, dtype=torch.float32) ** 2)
                except Exception:  # measuring must never stop the all-reduce
                    pass
            ready = None
            if clock is not None:
                try:
                    ready = clock.bucket_ready()
                except Exception:
                    clock = None
            fut = allreduce_hook(process_group, bucket)
            if clock is None:
                return fut

            def done(f):
                # Chained (not a done-callback): DDP waits on this future, so the mark is taken before
                # its wait returns. On CUDA this runs once the all-reduce is enqueued, on a stream that
                # waits for it: the event it records completes when the all-reduce has.
                try:
                    clock.bucket_done(ready)
                except Exception:
                    pass
                return f.value()

            return fut.then(done)

        try:
            model.register_comm_hook(None, hook)
        except RuntimeError:  # the user registered one already: theirs stays
            return None
        _HOOK_SLOTS[model] = slot
    slot[0] = sink
    slot[1] = phases
    if phases is not None:
        phases.comm = True

    def undo() -> None:
        if slot[0] is sink:
            slot[0] = None
        if phases is not None and slot[1] is phases:
            slot[1] = None

    return undo


class HaltCoordinator:
    """`halt_on` under DDP: every rank stops at the same optimizer step.

    A rank that raised the alert proposes a halt step far enough ahead (its current step plus
    the steps `margin_s` seconds take, at least `min_steps`) for every rank's publisher to read it
    from the store in time; the first proposal wins (compare_set) and every rank raises
    TrainingHalted when it reaches that step. A rank halting alone would leave the others blocked
    in their next all-reduce until the process group's timeout.
    """

    def __init__(self, store: Any, rank: int, margin_s: float = 5.0, min_steps: int = 3) -> None:
        self.store, self.rank, self.margin_s, self.min_steps = store, rank, margin_s, min_steps
        self.key = f"{_PREFIX}{_job_id()}/halt"
        self.decision: dict | None = None
        self._last_poll = 0.0

    def request(self, step: int, step_seconds: float | None, alert_json: dict) -> dict:
        ahead = self.min_steps
        if step_seconds and step_seconds > 0:
            ahead = max(ahead, math.ceil(self.margin_s / step_seconds))
        proposal = json.dumps({"at": step + ahead, "rank": self.rank, "alert": alert_json})
        won = self.store.compare_set(self.key, "", proposal)  # the first proposal stays
        self.decision = json.loads(won)
        return self.decision

    def poll(self, every_s: float = 0.2) -> dict | None:
        """Publisher thread: another rank's decision, looked up at most every `every_s` seconds."""
        if self.decision is None and time.monotonic() - self._last_poll >= every_s:
            self._last_poll = time.monotonic()
            if self.store.check([self.key]):
                self.decision = json.loads(self.store.get(self.key))
        return self.decision
