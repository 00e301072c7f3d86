"""One step's gradient norms, computed on the device (no host sync).

The pre-clip norm comes from the loop's clip calls when it clips (hooks/clip.py), else it is
computed when the optimizer gets the gradients, exactly as torch.nn.utils.clip_grad_norm_
computes it (same grouping by device and dtype, same reduction), so a loop that does not clip
gets the number it would have clipped by. Per-parameter norms come from the same pass, on sampled
steps; on steps where the loop clips they are read at the first clip call, before the gradients
change.
"""

from __future__ import annotations

import logging
from itertools import repeat
from operator import attrgetter, is_
from typing import Any

import torch
from torch.utils._foreach_utils import _group_tensors_by_device_and_dtype, _has_foreach_support

from monitor.hooks import clip as clip_patch
from monitor.hooks import introspect
from monitor.hooks.clip import StepClips, covers

_GRAD = attrgetter("grad")
log = logging.getLogger("trainmon")


class GradNorms:
    """One step's gradients: the clip calls seen (`clips`), the `total` norm the optimizer got (a 0-dim
    tensor) and, every `every` steps, `per_param` norms.

    `index` says which parameters `per_param` belongs to when some had no gradient (None: all, in
    order). `reset()` at each step's end. With `global_stats` False (ranks other than 0) nothing is
    measured; `sharded` (FSDP): a local norm is not the global one, and only clip calls that report
    the global total count.
    """

    def __init__(self, params: list[torch.Tensor], every: int, *, global_stats: bool = True,
                 sharded: bool = False, groups: int = 1) -> None:
        self.params = params
        self._ids = {id(p) for p in params}
        self.every = every if global_stats else 0  # per-parameter norms every this many steps; 0: never
        self.global_stats, self.sharded = global_stats, sharded
        self.groups = groups  # the optimizer's param groups `params` came from
        self.reset()

    def regroup(self, optimizer: torch.optim.Optimizer) -> None:
        """The optimizer's param groups changed since (add_param_group after attach): the norms cover its
        parameters as they are now. Per-parameter norms stop: their names were fixed at attach."""
        self.params = introspect.optimizer_params(optimizer)
        self._ids = {id(p) for p in self.params}
        self.groups = len(optimizer.param_groups)
        if self.every:
            self.every = 0
            log.info("trainmon: the optimizer has %d param groups now (add_param_group): gradient norms cover "
                     "them; per-parameter norms stop (their names were fixed at attach)", self.groups)

    def reset(self) -> None:
        self.clips = StepClips()
        self.total: torch.Tensor | None = None
        self.per_param: list[torch.Tensor] | None = None
        self.index: tuple[int, ...] | None = None

    def wanted(self, step: int) -> bool:
        """Whether step `step` records per-parameter norms."""
        return self.every > 0 and step % self.every == 0

    @property
    def unknown(self) -> bool:
        """The step's pre-clip norm cannot be known: clipping the monitor could not see whole (each
        micro-batch), or a sharded model whose global norm no clip call reported."""
        return self.clips.unknown or (self.sharded and self.global_stats and not self.clips)

    def measure(self, step: int, divide_by: torch.Tensor | None = None) -> None:
        """The gradients as the optimizer gets them: their norm is the pre-clip one unless a clip call
        said otherwise (then it is the norm after clipping, recorded as such)."""
        if self.total is not None or not self.global_stats or self.sharded:
            return
        if self.clips.calls and not self.clips.unknown:
            return
        self.compute(total=True, per_param=self.wanted(step), divide_by=divide_by)

    def on_clip(self, step: int, parameters, max_norm, total_norm, forwards: int) -> None:
        """A clip_grad_norm_ call (any of the loop's): its total, when it covers this optimizer's parameters."""
        clips = self.clips
        if isinstance(parameters, torch.Tensor):
            parameters = [parameters]
        if not isinstance(parameters, (list, tuple)) or not parameters:
            return  # a generator here would be consumed by looking at it: leave it alone
        if not self.global_stats or not covers(parameters, self._ids):
            return  # a rank that leaves global stats to rank 0, or clipping some other model's parameters
        if self.sharded:
            if clips.inside_fsdp:
                return  # FSDP1's own clip_grad_norm_ (unsharded, it calls this one): its return is recorded
            total_norm = clip_patch.sharded_total(parameters, total_norm)
            if total_norm is None:
                clips.unknown = True
                return
        first = not clips.calls
        clips.add(parameters, float(max_norm), total_norm, forwards)
        if first and self.wanted(step) and self.per_param is None and not self.sharded:
            # Gradients are still unclipped here: one extra read of them, on sampled steps only.
            self.compute(total=False, per_param=True)

    def on_fsdp_clip(self, max_norm, norm_type, total, forwards: int) -> None:
        """FSDP1's own clip_grad_norm_ returned the global total (it all-reduces the norm itself)."""
        if self.global_stats and isinstance(total, torch.Tensor) and float(norm_type) == 2.0:
            self.clips.add(self.params, float(max_norm), total, forwards)

    def compute(self, *, total: bool, per_param: bool, divide_by: torch.Tensor | None = None) -> None:
        """Per-parameter norms with torch._foreach_norm and (`total`) their total; `divide_by`: the loss
        scale, for gradients an optimizer unscales inside its fused step."""
        with torch.no_grad():
            # One pass to gather the gradients (clip_grad_norm_ does the same); the index of those
            # present is only built in the rare step where some parameter has none.
            grads = list(map(_GRAD, self.params))  # (no bytecode per parameter)
            index = None
            if any(map(is_, grads, repeat(None))):
                index = tuple(i for i, g in enumerate(grads) if g is not None)
                grads = [grads[i] for i in index]
            if not grads:
                return
            # Grouped on every call, as clip_grad_norm_ does: a model moved or cast after attach (its
            # parameters keep their identity) groups differently.
            grouped = _group_tensors_by_device_and_dtype([grads], with_indices=True)
            order: list[torch.Tensor] = []  # the norms in clip_grad_norm_'s order (group by group)
            for (device, _dtype), ([group], _) in grouped.items():
                if _has_foreach_support(group, device):
                    order.extend(torch._foreach_norm(group, 2.0))
                else:  # the same fallback clip_grad_norm_ takes (e.g. tensor subclasses)
                    order.extend(torch.linalg.vector_norm(g, 2.0) for g in group)
            if len(grouped) == 1:
                norms = order  # one device and dtype: already in parameter order
            else:  # mixed devices/dtypes: put each norm back at its parameter's position
                norms = [None] * len(grads)  # type: ignore[list-item]
                pos = [i for _, (_, indices) in grouped.items() for i in indices]
                for i, n in zip(pos, order):
                    norms[i] = n
            if divide_by is not None:
                order = [n / divide_by for n in order]
                norms = order if len(grouped) == 1 else [n / divide_by for n in norms]
            if total:
                stacked = torch.stack(order) if len(grouped) == 1 else torch.stack([n.to(grads[0].device) for n in order])
                self.total = torch.linalg.vector_norm(stacked, 2.0)
            if per_param:
                self.per_param = norms
                self.index = index


def fingerprint(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """The weights' norms, for the cross-rank comparison: ranks' parameters must be bitwise equal."""
    with torch.no_grad():
        return list(torch._foreach_norm(tensors, 2.0))


def local_norm(squares: list[torch.Tensor]) -> torch.Tensor:
    """This rank's gradient norm before the all-reduce, from the DDP hook's squared bucket norms."""
    return torch.sqrt(torch.stack(squares).sum())


def scaler_state(scaler: Any, optimizer: torch.optim.Optimizer) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """After scaler.step(optimizer): (found_inf, the loss scale this step's backward used), device tensors;
    (None, None) for a disabled GradScaler."""
    if not getattr(scaler, "_enabled", False):
        return None, None
    found_inf = None
    state = scaler._per_optimizer_states.get(id(optimizer), {})
    per_device = list(state.get("found_inf_per_device", {}).values())
    if per_device:
        found_inf = per_device[0] if len(per_device) == 1 else torch.stack(
            [t.to(per_device[0].device) for t in per_device]).sum()
    return found_inf, scaler._scale  # the scale is read before update() changes it
