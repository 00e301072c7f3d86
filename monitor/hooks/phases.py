"""Step phases of one rank, for telling a straggler apart under DDP.

A rank's step, as far as straggling goes, is three kinds of time:
- input: from the end of the previous optimizer step (micro-batch 0) or of the previous micro-batch's
  backward (the others) to the forward of the model the loop calls (the DDP wrapper): fetching and
  preparing the batch, the loop's own work. Host time: an input pipeline is host work.
- compute: the forward of the module inside the wrapper (hooks on `model.module`), which begins after
  DDP's own pre-forward work (the buffer broadcast of broadcast_buffers=True). Host time on CPU; CUDA
  events read on the publisher thread on CUDA (the device's time, where a slow GPU shows).
- collective wait: DDP's pre-forward work (wrapper forward -> inner forward: the buffer broadcast, where
  the fast ranks wait for a slow one when the model has buffers) plus the wait for the gradient
  all-reduce left after the backward (the last bucket's all-reduce done minus the last bucket ready,
  seen by the communication hook).
The first two hold no collective, so a slow rank's own time shows in them whatever DDP broadcasts;
the fast ranks' wait lands in the third. Nothing here waits: host timestamps and recorded events only.
"""

from __future__ import annotations

import logging
import time
from statistics import median
from typing import Any, NamedTuple

import torch

from monitor.hooks.guard import ErrorGuard

log = logging.getLogger("trainmon")


def window_phases(samples: dict[str, list[float]]) -> dict[str, float]:
    """What a rank posts for the steps since its last exchange: each phase's median (one slow step, an
    evaluation pass or a checkpoint between two steps, the attention probe's sampled forward, is not the
    rank's pace)."""
    return {name: median(values) for name, values in samples.items() if values}


class PhaseMarks(NamedTuple):
    """One step's raw phase marks, handed to the publisher (events are resolved there)."""

    input: float | None  # seconds, summed over the step's micro-batches; None: not measured whole
    pairs: list  # (kind, start, end): "compute" (inner forward) and "pre" (DDP's pre-forward work)
    ready: list  # marks taken when a gradient bucket was ready (the communication hook)
    done: list  # marks taken when a bucket's all-reduce had completed
    compute: bool  # compute is measured on this model (not sharded)
    comm: bool  # the collective wait is measured (DDP, and the monitor's communication hook is in)
    recycle: Any = None  # CUDA: takes the marks' events back once they are read (StepPhases.give_back)


def _seconds(a: Any, b: Any) -> float:
    if isinstance(b, float):
        return b - a
    a.synchronize()  # publisher thread: the events were recorded on the training thread, never waited there
    b.synchronize()
    return a.elapsed_time(b) / 1e3


def resolve_phases(m: PhaseMarks | None) -> dict[str, float | None]:
    """Publisher thread: {"input": s, "compute": s, "collective_wait": s} (None where not measured)."""
    out: dict[str, float | None] = {"input": None, "compute": None, "collective_wait": None}
    if m is None:
        return out
    out["input"] = m.input
    try:  # an event that cannot be timed costs its phase, never the record
        if m.compute:
            compute = None
            for kind, a, b in m.pairs:  # one pair per micro-batch (a loop: the usual one pair costs no frame)
                if kind == "compute":
                    compute = (compute or 0.0) + _seconds(a, b)
            if compute is not None:
                out["compute"] = max(0.0, compute)
        if m.comm:
            wait = sum(_seconds(a, b) for kind, a, b in m.pairs if kind == "pre")
            if m.ready and m.done:
                ref = m.ready[0]
                last_ready = max(_seconds(ref, r) for r in m.ready)
                last_done = max(_seconds(ref, d) for d in m.done)
                wait += max(0.0, last_done - last_ready)
            out["collective_wait"] = max(0.0, wait)
        if m.recycle is not None:  # read: the events go back to the clock for later marks
            m.recycle([*(e for _, a, b in m.pairs for e in (a, b)), *m.ready, *m.done])
    except (RuntimeError, TypeError):
        log.debug("trainmon: step phases not timed", exc_info=True)
    return out


# CUDA timing events a clock keeps for reuse: a step takes two per micro-batch, a few more under DDP; the
# publisher hands them back once read, so a run creates a handful, not a few per step.
EVENT_POOL = 64


class StepPhases:
    """The phase clock of one rank (see above). Training thread, except `bucket_ready` (the autograd
    thread running the communication hook), `bucket_done` (the thread completing the all-reduce's
    future, before DDP's own wait on it returns) and `backward_end` (the end of a backward pass)."""

    def __init__(self, device: torch.device, *, ddp: bool, compute: bool = True) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.ddp = ddp
        self.compute = compute
        self.comm = False  # set when the communication hook times the buckets
        self.anchor: float | None = None  # host time the current input phase began
        self.last_forwards = 0  # training forwards (micro-batches) the last step had; 0: no step yet
        self._free: list = []  # CUDA timing events the publisher has read, recorded again by later marks
        self._reset()

    def _reset(self) -> None:
        self.input = 0.0
        self.forwards = 0
        self.input_ok = True
        self.valid = True
        self.pairs: list = []
        self.ready: list = []
        self.done: list = []
        self._pre: Any = None
        self._inner: Any = None

    def mark(self) -> Any:
        """Now: a host timestamp, or on CUDA an event recorded on the current stream (no sync)."""
        if self.cuda:
            if torch.cuda.is_current_stream_capturing():  # a CUDA graph being captured: no timing events in it
                self.valid = False
                return None
            try:
                ev = self._free.pop()  # (marks come from three threads: pop is atomic, a look before it is not)
            except IndexError:
                ev = torch.cuda.Event(enable_timing=True)
            ev.record(torch.cuda.current_stream(self.device))
            return ev
        return time.perf_counter()

    def give_back(self, events: list) -> None:
        """Publisher thread, once a step's marks are read: their events, for later marks (an event one pair
        ends and the next begins with comes once; at most EVENT_POOL are kept)."""
        free = self._free
        room = EVENT_POOL - len(free)
        if room > 0:
            free.extend(list({id(e): e for e in events}.values())[:room])

    def forward_begin(self, now: float) -> None:
        """The wrapper's forward of a training micro-batch starts: its input phase ends. Without a wrapper
        the model's own forward is the compute, which starts here too."""
        anchor = self.anchor
        if anchor is None:
            self.input_ok = False  # the first step (no previous step end), or a forward we did not see end
        elif now > anchor:
            self.input += now - anchor
        self.anchor = None
        self.forwards += 1
        if self.ddp:
            self._pre = self.mark() if self.cuda else now
        elif self.compute:
            self._inner = self.mark() if self.cuda else now

    def inner_begin(self) -> None:
        """DDP's inner module's forward starts (after DDP's pre-forward work)."""
        m = self.mark()
        if self._pre is not None:
            self.pairs.append(("pre", self._pre, m))
            self._pre = None
        if self.compute:
            self._inner = m

    def inner_end(self) -> None:
        if self._inner is not None:
            self.pairs.append(("compute", self._inner, self.mark()))
            self._inner = None

    def forward_end(self, now: float) -> None:
        """The wrapper's forward returned (without a wrapper, the compute ends): the next input phase begins
        here unless the backward's end is seen (backward_end), which is what normally moves it."""
        if not self.ddp and self._inner is not None:
            self.pairs.append(("compute", self._inner, self.mark() if self.cuda else now))
            self._inner = None
        self.anchor = now

    def backward_end(self) -> None:
        self.anchor = time.perf_counter()

    def bucket_ready(self) -> Any:
        m = self.mark()
        self.ready.append(m)
        return m

    def bucket_done(self, ready: Any) -> None:
        self.done.append(self.mark())

    def step_end(self, now: float) -> PhaseMarks:
        """The optimizer step ended: this step's marks; the next step's input phase starts now."""
        ok = self.valid and self.forwards > 0
        self.last_forwards = self.forwards
        marks = PhaseMarks(self.input if ok and self.input_ok else None, self.pairs if ok else [], self.ready,
                           self.done, self.compute and ok, self.comm and ok, self.give_back if self.cuda else None)
        self._reset()
        self.anchor = now
        return marks


def _grad_root(output: Any, loss: torch.Tensor | None) -> torch.Tensor | None:
    """A tensor of a forward's output that the backward will reach early (its loss, as find_loss found it,
    else the first output that requires grad): a hook on it sees that micro-batch's backward start."""
    if loss is not None and loss.requires_grad:
        return loss
    if isinstance(output, torch.Tensor):
        candidates: Any = (output,)
    elif isinstance(output, (tuple, list)):
        candidates = output
    elif isinstance(output, dict):
        candidates = output.values()
    else:
        candidates = (getattr(output, "logits", None),)
    return next((v for v in candidates if isinstance(v, torch.Tensor) and v.requires_grad), None)


class PhaseHooks:
    """What feeds a StepPhases clock (`clock`) from the training thread besides the model's forward
    boundaries, which the collector reports to the clock itself: the inner module's forward (under DDP,
    hooks on `model.module`) and the end of a micro-batch's backward (a hook on the forward's output asks
    autograd for a callback).

    The backward's end matters only where another micro-batch of the same step follows (its input phase
    starts there); the next step's starts at the optimizer step. So the backward is watched only while
    the step has had fewer micro-batches than the last one (every micro-batch of the first step): a loop
    without accumulation pays for no autograd hook. A micro-batch beyond the expected count has no start
    for its input phase, and its step's input time is unknown (None), never the backward's time."""

    def __init__(self, model: torch.nn.Module, device: torch.device, *, sharded: bool, guard: ErrorGuard) -> None:
        from torch.nn.parallel import DistributedDataParallel

        # Under DDP the compute is the inner module's forward, after DDP's pre-forward work (the buffer
        # broadcast); a sharded model's forward holds its all-gathers, so its compute is not measured.
        self.ddp = isinstance(model, DistributedDataParallel)
        self.clock = StepPhases(device, ddp=self.ddp, compute=not sharded)
        self._guard = guard

    def install(self, model: torch.nn.Module) -> list:
        """The inner module's hooks (DDP only); returns their handles."""
        if not self.ddp:
            return []
        return [model.module.register_forward_pre_hook(self._inner_pre),
                model.module.register_forward_hook(self._inner_post)]

    @staticmethod
    def _training(module: torch.nn.Module) -> bool:
        return module.training and torch.is_grad_enabled() and not torch.compiler.is_compiling()

    def _inner_pre(self, module, args):
        try:
            if self._training(module):
                self.clock.inner_begin()
        except Exception as e:
            self._guard.record("inner forward pre-hook", e)
        return None

    def _inner_post(self, module, args, output):
        try:
            if self._training(module):
                self.clock.inner_end()
        except Exception as e:
            self._guard.record("inner forward hook", e)
        return None

    def watch_backward(self, output: Any, loss: torch.Tensor | None) -> None:
        """After a training forward (forward_done): watch its backward's end when another micro-batch
        of this step is expected; else the input phase has no start until the optimizer step."""
        clock = self.clock
        if 0 < clock.last_forwards <= clock.forwards:
            clock.anchor = None  # not the forward's end: the backward follows
            return
        try:
            root = _grad_root(output, loss)
            if root is not None:
                root.register_hook(self._backward_began)
        except Exception as e:
            self._guard.record("backward timing", e)

    def _backward_began(self, grad):
        # The backward reached this micro-batch's output: ask the engine to call back when it is done.
        try:
            torch.autograd.Variable._execution_engine.queue_callback(self._backward_ended)
        except Exception as e:
            self._guard.record("backward timing", e)
        return None

    def _backward_ended(self) -> None:
        try:
            self.clock.backward_end()
        except Exception as e:
            self._guard.record("backward timing", e)
