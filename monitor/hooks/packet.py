"""One step's values, gathered on the training thread and handed to the publisher as a `Packet`.

`StepState` is what the hooks accumulate during a step; `assemble` turns it, at the step
boundary, into a Packet: every device value stacked into ONE float32 tensor (`layout` names its
leading entries; per-parameter norms and the weight fingerprint follow), copied to the host
without waiting (on CUDA a non_blocking copy into pinned memory and an event the publisher waits
on). Nothing here reads a device tensor on the host.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

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


def count_tokens(args: tuple, kwargs: dict) -> tuple[int, int | None]:
    # Integer tensors fed to the model are token ids; numel and shape are metadata (no sync).
    for v in (*args, *kwargs.values()):
        if isinstance(v, torch.Tensor) and not v.is_floating_point() and not v.is_complex() and v.dtype != torch.bool:
            return v.numel(), (v.shape[0] if v.dim() > 0 else None)
    return 0, None


@dataclass
class Packet:
    """One step, handed from the training thread to the publisher."""

    step: int
    layout: tuple[str, ...]  # names of the leading entries of `values`; then param norms, then the fingerprint
    values: torch.Tensor | None  # host tensor (or pinned buffer being filled on CUDA)
    event: Any  # torch.cuda.Event to wait on, or None
    param_index: tuple[int, ...] | None  # which params the norms belong to; None: all, in order
    lrs: list[float]
    time: float
    step_time: float | None
    tokens: int | None
    micro_batches: int
    scheduler_steps: int | None
    max_norm: float | None
    grad_norm_unknown: bool = False  # the pre-clip norm could not be measured (see StepRecord)
    autocast: str | None = None
    loss_value: float | None = None
    busy_time: float | None = None
    memory: float | None = None
    batch_size: int | None = None  # the per-device batch seen this step (run.json's batch facts)
    fp_count: int = 0  # the last values are the parameter fingerprint (the rank exchange's)
    scalars: dict[str, float] = field(default_factory=dict)
    phases: PhaseMarks | None = None  # input / compute / collective-wait marks (resolved by the publisher)


@dataclass
class StepState:
    """What the hooks gather during one optimizer step (training thread); a fresh one per step."""

    losses: dict[str, list] = field(default_factory=lambda: {s: [] for s in LOSS_SOURCES})
    tokens: int = 0
    logged_tokens: int | None = None  # mon.log(tokens=...): wins over the counted token ids
    micro: int = 0  # training forwards (micro-batches) so far
    t_first: float | None = None  # when the first one began
    t_fwd_end: float | None = None  # when the last one's forward ended
    lrs: list | None = None  # read at optimizer.step()
    scalars: dict[str, Any] = field(default_factory=dict)
    autocast: str | None = None
    batch: int | None = None


class Timing(NamedTuple):
    time: float  # wall clock at the step's end
    step_time: float | None
    busy_time: float | None  # start of the step to the last forward's end
    memory: float | None  # the allocator's peak so far
    phases: PhaseMarks | None


def assemble(s: StepState, norms: GradNorms, *, step: int, scale: torch.Tensor | None,
             found_inf: torch.Tensor | None, attention: dict[str, torch.Tensor], local_sq: list[torch.Tensor],
             fingerprint: list[torch.Tensor], timing: Timing, scheduler_steps: int | None) -> Packet:
    """The Packet of a finished step."""
    layout: list[str] = []
    parts: list[torch.Tensor] = []
    loss_value = None  # a Python float passed to mon.log(loss=...)
    for source, reduce in LOSS_SOURCES.items():
        ls = s.losses[source]
        if not ls:
            continue
        tensors = [x for x in ls if isinstance(x, torch.Tensor)]
        if tensors:  # mon.log mixing floats and tensors in one step: the tensors count
            loss = tensors[0].float() if len(tensors) == 1 else torch.stack([x.float() for x in tensors])
            layout.append("loss")
            parts.append(loss if loss.dim() == 0 else loss.sum() if reduce == "sum" else loss.mean())
        else:
            loss_value = sum(ls) / len(ls)
        break
    max_norm = None
    clips = norms.clips
    per_param = norms.per_param
    norm_unknown = norms.unknown
    if clips and not clips.unknown:
        total, max_norm = clips.total()
        # Same formula as clip_grad_norm_'s coefficient.
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        layout += ["grad_norm", "clip_coef"]
        parts += [total, coef]
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
    lrs: list[float] = []
    for i, lr in enumerate(s.lrs or []):
        if isinstance(lr, torch.Tensor):  # capturable/tensor LR: stays on device
            layout.append(f"lr:{i}")
            parts.append(lr)
            lrs.append(float("nan"))
        else:
            lrs.append(float(lr))
    scalars: dict[str, float] = {}
    for k, v in s.scalars.items():
        if isinstance(v, torch.Tensor):
            layout.append(f"s:{k}")
            parts.append(v.detach())
        else:
            scalars[k] = float(v)
    for layer, stats in attention.items():  # sampled steps: four values per attention layer
        layout += [f"a:{stat}:{layer}" for stat in STATS]
        parts += stats.unbind()
    if local_sq:  # this rank's gradients before the all-reduce, from the DDP hook
        layout.append("local_grad_norm")
        parts.append(local_norm(local_sq))
    values, event = to_host(parts, (per_param or []) + fingerprint)
    return Packet(
        step=step, layout=tuple(layout), values=values, event=event, param_index=norms.index, lrs=lrs,
        time=timing.time, step_time=timing.step_time,
        tokens=s.logged_tokens if s.logged_tokens is not None else (s.tokens or None), micro_batches=s.micro,
        scheduler_steps=scheduler_steps, max_norm=max_norm, grad_norm_unknown=norm_unknown, autocast=s.autocast,
        loss_value=loss_value, scalars=scalars, busy_time=timing.busy_time, memory=timing.memory,
        batch_size=s.batch, fp_count=len(fingerprint), phases=timing.phases,
    )


def to_host(scalars: list[torch.Tensor], norms: list[torch.Tensor] | None) -> tuple[torch.Tensor | None, Any]:
    """One float32 tensor of the step's values; on CUDA a non_blocking copy into pinned memory."""
    pieces = []
    device = (scalars or norms or [None])[0]
    if device is None:
        return None, None
    device = device.device
    if scalars:
        # found_inf has shape [1], the others are 0-dim: flatten each to one element.
        pieces.append(torch.stack([t.detach().to(device=device, dtype=torch.float32).reshape(()) for t in scalars]))
    if norms:
        if all(n.device == device for n in norms):
            pieces.append(torch.stack(norms).to(torch.float32))
        else:  # a model spread over devices
            pieces.append(torch.stack([n.to(device=device, dtype=torch.float32) for n in norms]))
    stacked = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
    if device.type == "cuda":
        # Pinned destination + event: the publisher waits on the event, the training thread never does.
        host = torch.empty(stacked.shape, dtype=stacked.dtype, pin_memory=True)
        host.copy_(stacked, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return host, event
    if device.type != "cpu":
        # Other accelerators: an asynchronous copy where the backend supports it.
        return stacked.to("cpu", non_blocking=True), None
    return stacked, None
