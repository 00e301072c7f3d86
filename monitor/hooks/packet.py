"""One step's values, gathered on the training thread and handed to the publisher as a `Packet`.

`StepState` is what the hooks accumulate during a step; `assemble` turns it, at the step
boundary, into a Packet: every device value copied into ONE float32 vector (`layout` names its
leading entries; per-parameter norms and the weight fingerprint follow), copied to the host
without waiting, and the state itself handed over for its plain values (the publisher derives
the step's times and counts from it). `Staging` plans that vector once per layout and reuses it
(hooks/staging notes in its docstring): no per-scalar tensor op, no allocation on CUDA. Nothing
here reads a device tensor on the host.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from monitor.hooks.attention_math import STATS
from monitor.hooks.norms import GradNorms, local_norm
from monitor.hooks.phases import PhaseMarks

# The loss sources, in order (the first with a value wins), and how a step's values combine. An
# explicit mon.log() wins; then what a framework integration reports: the Hugging Face Trainer's
# training_step returns each micro-batch's share of the step loss (summed, as the Trainer sums them),
# Lightning's training_step a micro-batch loss; then a loss module's output, then the model's own
# output; scaler.scale() sees the loss after the user divided it by the accumulation steps, so it
# is the last resort.
LOSS_SOURCES = {"log": "mean", "shares": "sum", "training_step": "mean", "loss_fn": "mean", "model": "mean",
                "scaler": "mean"}


log = logging.getLogger("trainmon")
_PLAIN_NUMBERS = frozenset((float, int))


def find_loss(output: Any) -> torch.Tensor | None:
    """The loss in a forward output: a 0-dim float tensor, a tuple element, `.loss` or ['loss']."""
    if isinstance(output, torch.Tensor):
        return output if output.dim() == 0 and output.is_floating_point() else None
    if isinstance(output, dict):
        v = output.get("loss")
        return v if isinstance(v, torch.Tensor) and v.dim() == 0 else None
    if isinstance(output, (tuple, list)):
        for v in output:
            if isinstance(v, torch.Tensor) and v.dim() == 0 and v.is_floating_point():
                return v
        return None
    v = getattr(output, "loss", None)
    return v if isinstance(v, torch.Tensor) and v.dim() == 0 else None


_TOKEN_DTYPES: dict[torch.dtype, bool] = {}  # dtype -> whether its tensors are token ids (filled as seen)


def count_tokens(args: tuple, kwargs: dict) -> tuple[int, int | None]:
    # Integer tensors fed to the model are token ids; numel and shape are metadata (no sync).
    for v in (*args, *kwargs.values()) if kwargs else args:
        if isinstance(v, torch.Tensor):
            dtype = v.dtype
            ids = _TOKEN_DTYPES.get(dtype)
            if ids is None:
                ids = _TOKEN_DTYPES[dtype] = not dtype.is_floating_point and not dtype.is_complex and dtype != torch.bool
            if ids:
                shape = v.shape
                return v.numel(), (shape[0] if shape else None)
    return 0, None


class StepState:
    """What the hooks gather during one optimizer step (training thread); a fresh one per step. At the
    step's end it goes to the publisher inside the Packet, which reads its plain values (never its tensors:
    those are staged) while the training thread fills the next one."""

    __slots__ = ("losses", "tokens", "logged_tokens", "micro", "t_first", "t_fwd_end", "lrs", "scalars", "autocast",
                 "batch")

    def __init__(self) -> None:
        self.losses: dict[str, list] = {}  # per LOSS_SOURCES key that reported one
        self.tokens = 0
        self.logged_tokens: int | None = None  # mon.log(tokens=...): wins over the counted token ids
        self.micro = 0  # training forwards (micro-batches) so far
        self.t_first: float | None = None  # when the first one began
        self.t_fwd_end: float | None = None  # when the last one's forward ended
        self.lrs: list | None = None  # read at optimizer.step(): floats, or tensors (staged)
        self.scalars: dict[str, Any] = {}  # mon.log(**scalars): floats, or tensors (staged)
        self.autocast: str | None = None
        self.batch: int | None = None  # the per-device batch seen this step (run.json's batch facts)

    def log(self, loss: Any, tokens: int | None, scalars: dict[str, Any], warned: set[str] | None = None
            ) -> list[tuple[str, str]]:
        """mon.log(): an explicit loss (the first source), tokens, named scalars (tensors stay on the device).
        Returns what was refused, as (name, why): nothing of a refused value is kept. It is the caller's
        value, not the monitor's fault: a warning names it, once per name in `warned` (no internal error)."""
        refused: list[tuple[str, str]] = []
        if loss is not None:
            value = loggable(loss)
            if isinstance(value, str):
                refused.append(("loss", value))
            else:
                self.losses.setdefault("log", []).append(value)
        if tokens is not None:
            n = _count(tokens)
            if n is None:
                refused.append(("tokens", "must be a whole number of tokens, 0 or more (a number, or a CPU tensor: "
                                          f"a device tensor would make the monitor wait for it); got {_shown(tokens)}"))
            else:
                self.logged_tokens = (self.logged_tokens or 0) + n
        for k, v in scalars.items():
            value = loggable(v)
            if isinstance(value, str):
                refused.append((k, value))
            else:
                self.scalars[k] = value
        if warned is not None:
            for name, why in refused:
                if name not in warned:
                    warned.add(name)
                    log.warning("trainmon: mon.log(%s=...) %s; left out (said once for this name)", name, why)
        return refused


def _shown(v: Any) -> str:
    return f"{type(v).__name__} {str(v)[:40]!r}" if isinstance(v, (str, bytes)) else type(v).__name__


def _count(v: Any) -> int | None:
    """A token count: a whole number 0 or more (an int, a float or numpy value holding one, a one-value CPU
    tensor; a device tensor is not read: that would wait for the device)."""
    if isinstance(v, (str, bytes)):
        return None
    x = v
    if isinstance(v, torch.Tensor):
        if v.numel() != 1 or v.device.type != "cpu":
            return None
        x = float(v) if v.is_floating_point() else int(v)
    try:
        f = float(x)
    except (TypeError, ValueError, OverflowError):
        return None
    if not (math.isfinite(f) and f.is_integer() and f >= 0):
        return None
    return x if isinstance(x, int) else int(f)


def loggable(v: Any) -> float | torch.Tensor | str:
    """What mon.log keeps of a value: a real number as a float, a tensor of one real value detached (it stays
    on its device, staged with the step), or, for anything else, a string saying why it is refused."""
    if isinstance(v, torch.Tensor):
        if v.numel() != 1 or v.is_complex() or v.layout != torch.strided or v.device.type == "meta":
            return (f"must be a real number or a tensor of one real value; got a {v.device.type} tensor of shape "
                    f"{list(v.shape)}, {v.dtype}" + ("" if v.layout == torch.strided else f", {v.layout}"))
        return v.detach()
    if isinstance(v, (str, bytes, complex)) or v is None:
        return f"must be a real number or a tensor of one real value; got {_shown(v)}"
    try:
        return float(v)
    except (TypeError, ValueError, OverflowError) as e:
        return f"must be a real number or a tensor of one real value; got {_shown(v)} ({e})"


@dataclass(slots=True)
class Packet:
    """One step, handed from the training thread to the publisher: the staged vector of its device values
    and the raw facts beside it (the publisher works out the rest: hooks/publisher.decode)."""

    step: int
    layout: tuple[str, ...]  # names of the leading entries of `values`; then param norms, then the fingerprint
    values: torch.Tensor | None  # host tensor (or pinned buffer being filled on CUDA)
    event: Any  # torch.cuda.Event to wait on, or None
    state: StepState  # the step's gathered state: its plain LRs, scalars, tokens, micro-batches, autocast
    time: float  # wall clock at the step's end
    end: float  # perf_counter at the step's end
    start: float | None  # perf_counter at the previous step's end (the first step: its first forward)
    param_index: tuple[int, ...] | None = None  # which params the norms belong to; None: all, in order
    scheduler_steps: int | None = None
    max_norm: float | None = None
    grad_norm_unknown: bool = False  # the pre-clip norm could not be measured (see StepRecord)
    loss_value: float | None = None  # a float passed to mon.log(loss=...), when no tensor loss came
    memory: float | None = None  # the allocator's peak so far (CUDA)
    fp_count: int = 0  # the last values are the parameter fingerprint (the rank exchange's)
    phases: PhaseMarks | None = None  # input / compute / collective-wait marks (resolved by the publisher)
    recycle: Callable[[], None] | None = None  # the publisher calls it once `values` is read (CUDA: the buffer's pool)


def assemble(s: StepState, norms: GradNorms, *, step: int, scale: torch.Tensor | None,
             found_inf: torch.Tensor | None, attention: Mapping[str, torch.Tensor], local_sq: list[torch.Tensor],
             fingerprint: list[torch.Tensor], staging: Staging, end: float, start: float | None,
             memory: float | None, phases: PhaseMarks | None, scheduler_steps: int | None) -> Packet:
    """The Packet of a finished step: its device values staged, the rest as they are."""
    layout: list[str] = []
    parts: list[torch.Tensor] = []
    loss_value = None  # a Python float passed to mon.log(loss=...)
    losses = s.losses
    if losses:  # the first source in LOSS_SOURCES' order that reported (usually the only one)
        source = next(iter(losses)) if len(losses) == 1 else next(k for k in LOSS_SOURCES if k in losses)
        ls = losses[source]
        tensors = [x for x in ls if isinstance(x, torch.Tensor)]
        if len(tensors) == 1:  # mon.log mixing floats and tensors in one step: the tensors count
            layout.append("loss")
            parts.append(tensors[0])  # 0-dim; the staging copy makes it float32, as .float() would
        elif tensors:
            loss = torch.stack([x.float() for x in tensors])
            layout.append("loss")
            parts.append(loss.sum() if LOSS_SOURCES[source] == "sum" else loss.mean())
        else:
            loss_value = sum(ls) / len(ls)
    max_norm = None
    clips = norms.clips
    per_param = norms.per_param
    norm_unknown = norms.unknown
    if clips.calls and not clips.unknown:
        total, max_norm = clips.total()
        layout.append("grad_norm")
        parts.append(total)
        if total.dtype != torch.float32:  # same formula as clip_grad_norm_'s coefficient, in the total's dtype
            layout.append("clip_coef")
            parts.append(torch.clamp(max_norm / (total + 1e-6), max=1.0))
        # else the publisher derives it from the total and max_norm with clip_grad_norm_'s float32
        # arithmetic, bit for bit (publisher.clip_coef): three device ops fewer per step.
    elif norm_unknown:
        if clips:
            max_norm = clips.total()[1]
        if norms.total is not None:  # what the optimizer applied, after the clipping
            layout.append("grad_norm_clipped")
            parts.append(norms.total)
        per_param = None  # measured after clipping, or local shards: not the step's pre-clip truth
    elif norms.total is not None:
        layout.append("grad_norm")
        parts.append(norms.total)
    if scale is not None:
        layout.append("loss_scale")
        parts.append(scale)
    if found_inf is not None:
        layout.append("found_inf")
        parts.append(found_inf)
    if s.lrs and not _PLAIN_NUMBERS.issuperset(map(type, s.lrs)):  # (one C-level look in the usual case)
        for i, lr in enumerate(s.lrs):
            if isinstance(lr, torch.Tensor):  # capturable/tensor LR: stays on device
                layout.append(f"lr:{i}")
                parts.append(lr)
    if s.scalars:
        for k, v in s.scalars.items():
            if isinstance(v, torch.Tensor):
                layout.append(f"s:{k}")
                parts.append(v)
    for layer, stats in attention.items():  # sampled steps: four values per attention layer, one tensor
        layout += [f"a:{stat}:{layer}" for stat in STATS]
        parts.append(stats)
    if local_sq:  # this rank's gradients before the all-reduce, from the DDP hook
        layout.append("local_grad_norm")
        parts.append(local_norm(local_sq))
    names, values, event, recycle = staging.stage(layout, parts, per_param + fingerprint if per_param else fingerprint)
    return Packet(step, names, values, event, s, time.time(), end, start, norms.index, scheduler_steps, max_norm,
                  norm_unknown, loss_value, memory, len(fingerprint), phases, recycle)


_POOL = 16  # pinned host buffers kept per layout for reuse (more are made while the publisher lags)


class _Plan:
    """One layout's staging: the device vector, a view of it per source, the host buffers' pool (CUDA)."""

    __slots__ = ("layout", "stack", "buf", "head", "views", "tail", "free", "stream", "event")

    def __init__(self, layout: tuple[str, ...], parts: list[torch.Tensor], n_tail: int, device: torch.device) -> None:
        n = len(layout)
        if sum(t.numel() for t in parts) != n:
            raise ValueError(f"the step's values do not fit their names: {sum(t.numel() for t in parts)} values "
                             f"for {layout} (a non-scalar tensor passed to mon.log?)")
        self.layout = layout
        # 0-dim sources on the vector's device are stacked (one op); others are copied view by view.
        self.stack = bool(parts) and all(t.dim() == 0 and t.device == device for t in parts)
        self.buf = torch.zeros(n + n_tail, dtype=torch.float32, device=device)
        self.head, self.tail = self.buf[:n], self.buf[n:]
        self.views: list[torch.Tensor] = []
        at = 0
        for t in parts:
            self.views.append(self.buf[at:at + t.numel()].view(t.shape))
            at += t.numel()
        self.free: list[tuple[torch.Tensor, Any]] = []  # (pinned host buffer, its event), ready for reuse
        self.stream: Any = None  # CUDA: the stream the last copy out of `buf` was issued on
        self.event: Any = None  # and its event

    def fill(self, parts: list[torch.Tensor], tail: list[torch.Tensor]) -> None:
        """The step's values into the vector: a float32 conversion and a reshape inside one op."""
        if not parts:
            pass
        elif self.stack:
            torch.stack(parts, out=self.head)
        else:
            torch._foreach_copy_(self.views, parts)
        if tail:
            try:
                torch.stack(tail, out=self.tail)
            except RuntimeError:  # a model spread over devices
                device = self.buf.device
                self.tail.copy_(torch.stack([t.to(device=device, dtype=torch.float32) for t in tail]))

    def give_back(self, slot: tuple[torch.Tensor, Any]) -> None:
        """Publisher thread, once the host buffer is read (list.append is atomic)."""
        if len(self.free) < _POOL:
            self.free.append(slot)


class Staging:
    """Brings each step's values to the host in one float32 vector, without per-step layout work.

    A layout (the names of the step's values and how many norms follow) is planned once: a float32
    vector on the device and a view of it per source. On CPU, a step of 0-dim values is one
    `torch.stack` (already the host vector); otherwise the values go into the vector in one op
    (`torch.stack(out=)`, or `torch._foreach_copy_` into the views when shapes or devices differ: the
    float32 conversion and the reshape happen inside it, no per-scalar op), the per-parameter norms
    on the steps that have them in one more, then to the host: a clone on CPU; on CUDA a non_blocking
    copy into a pinned buffer taken from the layout's pool, with a CUDA event made once per buffer and
    recorded again, both handed back by the publisher once it has read them (`Packet.recycle`). A
    step whose values no longer fit the plan (a shape or device that changed) gets a new plan.
    Training thread only; nothing here waits for the device.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._kind = device.type
        self._plans: dict[tuple, _Plan] = {}

    def stage(self, layout: list[str], parts: list[torch.Tensor], tail: list[torch.Tensor]
              ) -> tuple[tuple[str, ...], torch.Tensor | None, Any, Callable[[], None] | None]:
        """(layout as a tuple, the host vector, the event to wait on or None, the recycle callable or None)."""
        if not parts and not tail:
            return (), None, None, None
        key = (*layout, len(tail))
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = _Plan(key[:-1], parts, len(tail), self.device)
        if self._kind == "cpu" and plan.stack and not tail:
            try:
                values = torch.stack(parts)  # fresh: it is the host vector (mixed dtypes promote exactly)
            except RuntimeError:  # a shape or device that changed: the general path, planned anew
                plan = self._replan(key, parts, tail)
            else:
                return plan.layout, values if values.dtype is torch.float32 else values.float(), None, None
        if self._kind == "cuda":
            self._order(plan)
        if torch.is_grad_enabled():  # the sources carry no grad; out= and in-place copies must not record any
            with torch.no_grad():
                plan = self._fill(key, plan, parts, tail)
        else:
            plan = self._fill(key, plan, parts, tail)
        if self._kind == "cuda":
            return plan.layout, *self._to_pinned(plan)
        if self._kind != "cpu":  # other accelerators: an asynchronous copy where the backend has one
            return plan.layout, plan.buf.to("cpu", non_blocking=True), None, None
        return plan.layout, plan.buf.clone(), None, None

    def _replan(self, key: tuple, parts: list[torch.Tensor], tail: list[torch.Tensor]) -> _Plan:
        plan = self._plans[key] = _Plan(key[:-1], parts, len(tail), self.device)
        plan.stack = False  # its shapes or devices changed once: they may again
        return plan

    def _fill(self, key: tuple, plan: _Plan, parts: list[torch.Tensor], tail: list[torch.Tensor]) -> _Plan:
        try:
            plan.fill(parts, tail)
        except RuntimeError:  # a shape or device that changed: planned anew, once
            plan = self._replan(key, parts, tail)
            if self._kind == "cuda":
                self._order(plan)
            plan.fill(parts, tail)
        return plan

    @staticmethod
    def _order(plan: _Plan) -> None:
        """A step on another stream than the last copy out of the vector waits for that copy first."""
        stream = torch.cuda.current_stream(plan.buf.device)
        if plan.stream is not None and plan.stream != stream:
            stream.wait_event(plan.event)
        plan.stream = stream

    @staticmethod
    def _to_pinned(plan: _Plan) -> tuple[torch.Tensor, Any, Callable[[], None]]:
        # Pinned destination + event: the publisher waits on the event, the training thread never does.
        slot = plan.free.pop() if plan.free else (
            torch.empty(plan.buf.shape, dtype=torch.float32, pin_memory=True), torch.cuda.Event())
        host, event = slot
        host.copy_(plan.buf, non_blocking=True)
        event.record(plan.stream)
        plan.event = event
        return host, event, partial(plan.give_back, slot)
