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
_original: Callable[..., Any] | None = None


def _wrapped(parameters, max_norm, total_norm, foreach=None):
    for listener in tuple(_listeners):
        listener(parameters, max_norm, total_norm)  # listeners guard themselves
    return _original(parameters, max_norm, total_norm, foreach)


def add_listener(fn: ClipListener) -> None:
    global _original
    with _lock:
        if not _listeners:
            _original = _clip_mod._clip_grads_with_norm_
            _clip_mod._clip_grads_with_norm_ = _wrapped
            if getattr(nn_utils, "clip_grads_with_norm_", None) is _original:
                nn_utils.clip_grads_with_norm_ = _wrapped
        _listeners.append(fn)


def remove_listener(fn: ClipListener) -> None:
    global _original
    with _lock:
        if fn in _listeners:
            _listeners.remove(fn)
        if not _listeners and _original is not None:
            if _clip_mod._clip_grads_with_norm_ is _wrapped:
                _clip_mod._clip_grads_with_norm_ = _original
            if getattr(nn_utils, "clip_grads_with_norm_", None) is _wrapped:
                nn_utils.clip_grads_with_norm_ = _original
            _original = None
