"""Seeing `clip_grad_norm_` from the inside, so its own pre-clip norm is reused.

torch.nn.utils.clip_grad_norm_ computes the total norm, then calls the module
global `_clip_grads_with_norm_(parameters, max_norm, total_norm)`. Wrapping that
global catches every call of clip_grad_norm_, however it was imported, at the
moment the pre-clip norm exists and before the gradients are scaled. The public
alias `torch.nn.utils.clip_grads_with_norm_` is wrapped too. The wrapper calls
the original with the same arguments: clipping itself is unchanged.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.utils as nn_utils
from torch.nn.utils import clip_grad as _clip_mod

ClipListener = Callable[[Any, float, torch.Tensor], None]

_lock = threading.Lock()
_listeners: list[ClipListener] = []
# The function the wrapper calls. Set under _lock when the wrapper is installed and never cleared: a
# call that already entered the wrapper while close() restores the original (or code holding the
# wrapper, e.g. `from torch.nn.utils import clip_grads_with_norm_` after attach) still clips.
# Read without a lock: one module-global load, always a callable.
_original: Callable[..., Any] | None = None


def _wrapped(parameters, max_norm, total_norm, foreach=None):
    original = _original  # one read: the function this call clips with
    for listener in tuple(_listeners):  # a copy: close() may remove listeners meanwhile
        listener(parameters, max_norm, total_norm)  # listeners guard themselves
    return original(parameters, max_norm, total_norm, foreach)


def add_listener(fn: ClipListener) -> None:
    global _original
    with _lock:
        if not _listeners and _clip_mod._clip_grads_with_norm_ is not _wrapped:
            current = _clip_mod._clip_grads_with_norm_
            alias = getattr(nn_utils, "clip_grads_with_norm_", None) is current
            _original = current
            _clip_mod._clip_grads_with_norm_ = _wrapped
            if alias:
                nn_utils.clip_grads_with_norm_ = _wrapped
        _listeners.append(fn)


def remove_listener(fn: ClipListener) -> None:
    with _lock:
        if fn in _listeners:
            _listeners.remove(fn)
        if not _listeners and _original is not None:
            if _clip_mod._clip_grads_with_norm_ is _wrapped:
                _clip_mod._clip_grads_with_norm_ = _original
            if getattr(nn_utils, "clip_grads_with_norm_", None) is _wrapped:
                nn_utils.clip_grads_with_norm_ = _original


def covers(parameters: list | tuple, ours: set[int]) -> bool:
    """Whether a clip call's parameters include any of the optimizer's (`ours`: their ids).

    Not just the first: under PEFT/LoRA `model.parameters()` starts with frozen weights the optimizer
    does not hold. The first is checked alone in the usual case, where it is the optimizer's.
    """
    return id(parameters[0]) in ours or any(id(p) in ours for p in parameters)


def _is_dtensor(t: Any) -> bool:
    return type(t).__name__ == "DTensor"


def sharded_total(parameters: list | tuple, total: torch.Tensor) -> torch.Tensor | None:
    """Under sharded parameters (FSDP), the global norm a clip call was given, as a plain tensor, or
    None when it holds only this rank's share (reading more would take a collective, which the
    monitor never runs).

    - A DTensor total (FSDP2 through clip_grad_norm_) is replicated once its own all-reduce ran: its
      local value is the global norm, read without another collective. A partial one is a share.
    - A plain total over DTensor gradients was reduced by the caller (`full_tensor()`) before clipping.
    - A plain total over plain gradients is the norm of this rank's shards (FSDP1's flat or
      original parameters through torch.nn.utils.clip_grad_norm_ instead of the model's own).
    """
    if _is_dtensor(total):
        if all(type(p).__name__ == "Replicate" for p in total.placements):
            return total.to_local()
        return None
    grad = next((p.grad for p in parameters if p.grad is not None), None)
    return total if _is_dtensor(grad) else None


class StepClips:
    """The clip calls of one optimizer step, and what they say about the pre-clip norm.

    - One call: its total is the pre-clip norm.
    - Calls over disjoint parameter sets (a clip per sub-model): the global norm is the L2 norm
      of their totals.
    - The same total tensor applied group by group (`clip_grads_with_norm_(group, max_norm, total)`
      per group): counted once.
    - A call over parameters an earlier call already clipped: with no forward in between it clips
      the same gradients again and the first total stands; after more forwards (clipping each
      micro-batch) the step's gradient was never seen whole before clipping, so its pre-clip norm
      is unknown (`unknown`), never the combination of partial norms.
    """

    __slots__ = ("calls", "unknown", "inside_fsdp")

    def __init__(self) -> None:
        self.calls: list[tuple[list | tuple, float, torch.Tensor, int]] = []  # (params, max_norm, total, forwards)
        self.unknown = False
        self.inside_fsdp = False  # in FSDP1's own clip_grad_norm_, whose return value is recorded

    def __bool__(self) -> bool:
        return bool(self.calls)

    def add(self, parameters: list | tuple, max_norm: float, total: torch.Tensor, forwards: int) -> None:
        if not self.calls:
            self.calls.append((parameters, max_norm, total, forwards))
            return
        if any(t is total for _, _, t, _ in self.calls):
            return
        ids = {id(p) for p in parameters}
        for params, _, _, seen_at in self.calls:
            if any(id(p) in ids for p in params):
                if forwards != seen_at:
                    self.unknown = True
                return
        self.calls.append((parameters, max_norm, total, forwards))

    def total(self) -> tuple[torch.Tensor, float]:
        """The pre-clip norm over every call and the tightest threshold (call only when non-empty)."""
        if len(self.calls) == 1:
            _, max_norm, total, _ = self.calls[0]
            return total, max_norm
        total = torch.linalg.vector_norm(torch.stack([c[2].float() for c in self.calls]), 2.0)
        return total, min(c[1] for c in self.calls)
