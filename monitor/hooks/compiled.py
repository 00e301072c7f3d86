"""Staying out of torch.compile's way: nothing of the monitor's is traced into a user's graph.

- Dynamo inlines a compiled module's forward hooks into its graph. Traced
  (`torch.compiler.is_compiling()`), the hooks do no host work: they hand the batch's token ids and
  the forward's loss to `forward_began`/`forward_ended`, functions registered with dynamo as
  reorderable logging, which it calls with the real tensors after the graph ran (wrapped in
  torch.compiler.disable, so that call is not compiled in turn). The graph gains no break, no
  guard that changes from step to step, and no op.
- The attention probe's interception (a TorchFunctionMode, or wrapped torch.nn.functional functions)
  around a compiled forward would be traced and guarded on, and recompile whenever it comes and goes:
  `compiled_reason` tells the probe, before it begins, that some of the model runs compiled (the whole model wrapped by torch.compile before
  or after attach, `model.compile()`, or blocks compiled one by one), and it stays off.
- `mon.observe_attention` inside compiled code slices a few sequences in the graph and passes them
  to a custom op (`trainmon::observe_attention`) whose implementation decides, as the graph runs,
  whether the step is sampled: the graph is the same on every step and has no break. Reorderable
  logging cannot carry it: dynamo drops such calls made from inlined functions, and the attention
  module's forward always is one. The op declares that it writes a one-element token tensor of
  the monitor's, so no compiler removes it as dead code.

Registration must precede the first trace. Importing torch._dynamo at attach would slow down the
start of every run, so `install` registers at once when it is loaded already, and otherwise wraps
`torch.compile` (as `nn.Module.compile` and Accelerate call it too) to register right after the
user's call, before anything is traced. `uninstall` puts it back when the last monitor closes.
"""

from __future__ import annotations

import functools
import sys
import threading
import weakref
from typing import Any

import torch

# id -> the collector the replayed functions report to (tensors and constants are all dynamo passes on).
_COLLECTORS: weakref.WeakValueDictionary[int, Any] = weakref.WeakValueDictionary()
_lock = threading.Lock()
_installs = 0
_original_compile: Any = None
_registered = False
_REPLAYED = ("forward_began", "forward_ended")


def _in_compiled_call() -> bool:
    """Whether a torch.compile'd callable is running (its eval-frame callback is set): our hooks of a
    module wrapped by torch.compile after attach run eagerly inside it."""
    get = getattr(getattr(torch._C, "_dynamo", None), "eval_frame", None)
    get = getattr(get, "get_eval_frame_callback", None)
    if get is not None:
        return get() not in (None, False)
    frame = sys._getframe(1)  # no get_eval_frame_callback in this torch: find dynamo's wrapper among the callers
    while frame is not None:
        if frame.f_code.co_filename.endswith("_dynamo/eval_frame.py"):
            return True
        frame = frame.f_back
    return False


def compiled_reason(model: torch.nn.Module) -> str | None:
    """Why a forward of `model` would run compiled code, or None. Called on sampled steps only."""
    if "torch._dynamo" not in sys.modules:
        return None
    if _in_compiled_call():
        return "the model runs under torch.compile"
    for name, m in model.named_modules():
        if "_orig_mod" in m._modules or getattr(m, "_compiled_call_impl", None) is not None:
            return f"{name or 'the model'} is compiled (torch.compile)"
    return None


def register(collector: Any) -> int:
    """Make the replayed functions reach `collector`; returns its key."""
    key = id(collector)
    _COLLECTORS[key] = collector
    return key


def ensure_registered() -> bool:
    """Register the replayed functions with dynamo, if torch._dynamo is loaded: each module-level name
    becomes its eager (torch.compiler.disable) version, which traced code then calls."""
    global _registered
    dynamo = sys.modules.get("torch._dynamo")
    if dynamo is None:
        return False
    if not _registered:
        module = sys.modules[__name__]
        for name in _REPLAYED:
            fn = torch.compiler.disable(getattr(module, "_" + name))
            setattr(module, name, fn)
            dynamo.config.reorderable_logging_functions.add(fn)
        _registered = True
    return True


def install() -> None:
    """At attach: register now, or as soon as torch.compile is called."""
    global _installs, _original_compile
    with _lock:
        _installs += 1
        if ensure_registered() or _original_compile is not None:
            return
        original = _original_compile = torch.compile

        @functools.wraps(original)
        def compile(*args: Any, **kwargs: Any) -> Any:
            out = original(*args, **kwargs)
            ensure_registered()  # torch._dynamo is loaded now; nothing was traced yet
            return out

        torch.compile = compile


def uninstall() -> None:
    global _installs, _original_compile
    with _lock:
        _installs = max(0, _installs - 1)
        if _installs == 0 and _original_compile is not None:
            if getattr(torch.compile, "__wrapped__", None) is _original_compile:
                torch.compile = _original_compile
            _original_compile = None


def token_ids(args: tuple, kwargs: dict) -> Any:
    """The first integer tensor fed to the model (token ids), or None; traced, a choice made at trace time."""
    for v in (*args, *kwargs.values()):
        if isinstance(v, torch.Tensor) and not v.is_floating_point() and not v.is_complex() and v.dtype != torch.bool:
            return v
    return None


def _forward_began(key: int, tokens: Any, training: bool) -> None:
    """After a graph: a forward of the model began in it (its pre-hook was traced into the graph)."""
    collector = _COLLECTORS.get(key)
    if collector is not None and training:
        collector.compiled_forward_began(tokens)


def _forward_ended(key: int, source: str, loss: Any, training: bool) -> None:
    """After a graph: a forward of the model (or the loss module) ended in it, with this loss or None."""
    collector = _COLLECTORS.get(key)
    if collector is not None and training:
        collector.compiled_forward_ended(source, loss)


def head(t: Any, n: int) -> Any:
    """The first `n` sequences of a batch-first tensor (traced: a view in the graph); others as they are."""
    if isinstance(t, torch.Tensor) and t.dim() >= 3:
        return t[:n]
    return t


def mask_head(mask: Any, ref: Any, n: int) -> Any:
    """An attention mask cut as `head` cuts `ref` (its q or logits): only where its first dimension is the
    batch, i.e. it has as many dimensions as `ref`; with fewer it broadcasts from the right (SDPA's
    (heads, queries, keys) beside a 4-d q), and is passed whole."""
    if isinstance(mask, torch.Tensor) and isinstance(ref, torch.Tensor) and mask.dim() >= ref.dim() >= 3:
        return mask[:n]
    return mask


@torch.library.custom_op("trainmon::observe_attention", mutates_args=("token",))
def _observe_op(token: torch.Tensor, key: int, layer: str, q: torch.Tensor | None, k: torch.Tensor | None,
                logits: torch.Tensor | None, mask: torch.Tensor | None, is_causal: bool, scale: float | None,
                training: bool) -> None:
    """Runs as the compiled graph runs: the sliced sequences of one attention call (token: see above)."""
    collector = _COLLECTORS.get(key)
    if collector is not None and training:
        collector.observe_attention(q, k, layer, logits, mask, is_causal, scale, presliced=True)


@_observe_op.register_fake
def _(token, key, layer, q, k, logits, mask, is_causal, scale, training) -> None:
    return None


def observe_in_graph(collector: Any, n: int, q: Any, k: Any, logits: Any, mask: Any, layer: str | None,
                     is_causal: bool, scale: Any) -> None:
    """Traced: the first `n` sequences of one attention call to the custom op ("": unnamed)."""
    _observe_op(collector.token, collector.compiled_key, layer or "", head(q, n), head(k, n), head(logits, n),
                mask_head(mask, q if logits is None else logits, n), is_causal,
                None if scale is None else float(scale), torch.is_grad_enabled())


# Traced code calls these names; ensure_registered() replaces them by their registered eager versions.
forward_began, forward_ended = _forward_began, _forward_ended
