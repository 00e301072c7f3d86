"""The training-thread side: hooks that gather one optimizer step's values.

Hooks only keep references (detached loss tensors, the clip's norm) and run
tensor ops that stay on the device. At the step boundary every tensor value is
stacked into ONE tensor and handed to the publisher; on CUDA that tensor is
copied non_blocking to pinned host memory and an event is recorded, so the
training thread never waits for the device on the monitor's behalf. Nothing
here calls .item(), .tolist() or float() on a device tensor.

Step boundaries: without a GradScaler the optimizer's step pre/post hooks; with
one, `scaler.step(optimizer)`, because a skipped step never calls
optimizer.step(). Every hook body runs under the ErrorGuard: a failure is
counted and the training loop never sees it (TrainingHalted excepted, which is
the user's own request).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._foreach_utils import _group_tensors_by_device_and_dtype, _has_foreach_support

from monitor.hooks import clip as clip_patch
from monitor.hooks import compiled
from monitor.hooks.attention import STATS, AttentionProbe, ProbeSchedule, attention_stats, sdpa_masks
from monitor.hooks.clip import StepClips, covers
from monitor.hooks.guard import ErrorGuard
from monitor.hooks.intercept import intercept
from monitor.hooks.phases import PhaseHooks, PhaseMarks

# The loss sources, in order (the first with a value wins), and how a step's values combine. An
# explicit mon.log() wins; then what a framework integration reports: the Hugging Face Trainer's
# training_step returns each micro-batch's share of the step loss (summed, as the Trainer sums them),
# Lightning's training_step a micro-batch loss; then a loss module's output, then the model's own
# output; scaler.scale() sees the loss after the user divided it by the accumulation steps, so it
# is the last resort.
_LOSS_SOURCES = {"log": "mean", "shares": "sum", "training_step": "mean", "loss_fn": "mean", "model": "mean",
                 "scaler": "mean"}

log = logging.getLogger("trainmon")


class TrainingHalted(RuntimeError):
    """Raised at optimizer.step() after an alert at or above `halt_on`; the run dir was flushed first."""

    def __init__(self, message: str, alert: Any = None) -> None:
        super().__init__(message)
        self.alert = alert  # the monitor.Alert that asked for the halt


@dataclass
class Packet:
    """One step, handed from the training thread to the publisher."""

    step: int
    layout: tuple[str, ...]  # names of the leading entries of `values`; the rest are param norms
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
    batch_size: int | None = None
    fp_count: int = 0  # the last values are the parameter fingerprint
    scalars: dict[str, float] = field(default_factory=dict)
    probe_cost: float | None = None  # seconds the attention probe took on this step (probed steps only)
    probe_every: int | None = None  # the probe's interval after this step
    phases: PhaseMarks | None = None  # input / compute / collective-wait marks (resolved by the publisher)


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


# Step counters of torch's LRScheduler and of common hand-written schedulers.
_SCHEDULER_COUNTERS = ("last_epoch", "current_step", "step_count", "_step_count", "steps")


def _scheduler_counter(scheduler: Any) -> str | None:
    if scheduler is None:
        return None
    for name in _SCHEDULER_COUNTERS:
        if isinstance(getattr(scheduler, name, None), int):
            return name
    return None


def _count_tokens(args: tuple, kwargs: dict) -> tuple[int, int | None]:
    # Integer tensors fed to the model are token ids; numel and shape are metadata (no sync).
    for v in (*args, *kwargs.values()):
        if isinstance(v, torch.Tensor) and not v.is_floating_point() and not v.is_complex() and v.dtype != torch.bool:
            return v.numel(), (v.shape[0] if v.dim() > 0 else None)
    return 0, None


class StepCollector:
    def __init__(
        self,
        *,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scaler: Any | None,
        scheduler: Any | None,
        loss_fn: torch.nn.Module | None,
        params: list[torch.Tensor],
        start_step: int,
        param_norms_every: int,
        count_tokens: bool,
        handoff: Callable[[Packet], None],
        guard: ErrorGuard,
        halt_check: Callable[[], None],
        global_stats: bool = True,
        fingerprint_every: int = 0,
        local_grad_norm: bool = True,
        attention: Any | None = None,
        module_names: dict[int, str] | None = None,
        probe_model: bool = True,
        forward_hooks: bool = True,
        scheduler_steps_per_step: int = 1,
        sharded: bool = False,
    ) -> None:
        self.model, self.optimizer, self.scaler, self.scheduler = model, optimizer, scaler, scheduler
        self.params = params
        self._param_ids = {id(p) for p in params}
        self._device_type = params[0].device.type
        self.step = start_step
        self._every = param_norms_every
        self._count_tokens = count_tokens
        self._handoff = handoff
        self._guard = guard
        self._halt_check = halt_check
        self._handles: list[Any] = []
        self._undo: list[Callable[[], None]] = []
        # Gradients, LRs and loss scale are the same on every rank after the all-reduce: only rank 0
        # computes them; every rank reports its own loss, timing and local gradient norm.
        self._global = global_stats
        self._fp_every = fingerprint_every
        self._fp_tensors = [*params, *[b for b in model.buffers() if b.is_floating_point()]]
        self.local_sq: list[torch.Tensor] = []  # squared bucket norms from the DDP communication hook
        self._device = params[0].device
        self._local_grad_norm = local_grad_norm
        self._in_scaler_step = False
        self._prev_end: float | None = None
        # Sharded parameters (FSDP): a local norm is not the global one, and the monitor runs no collective.
        self._sharded = sharded
        self._sched_per_step = scheduler_steps_per_step
        # Attention statistics (rank 0): the schedule decides "probe this step?" once per step; the
        # probe hooks SDPA/MHA calls of the first forward of a due step; mon.observe_attention feeds
        # the same step from custom kernels.
        self.schedule: ProbeSchedule | None = None
        self._probe: AttentionProbe | None = None
        self.probe_off: str | None = None  # why the probe turned itself off during the run
        self.compiled_key = compiled.register(self)
        self.token = torch.zeros(1, device=self._device)  # what the compiled observe_attention op "writes"
        compiled.install()
        self._compile_watch = True
        self._attn_cfg = attention
        self.phases = PhaseHooks(model, self._device, sharded=sharded, guard=guard)  # input/compute/wait times
        self._empty_probes = 0
        self._fwd_t0: float | None = None
        self._attn_gen = torch.Generator().manual_seed(1)  # the explicit API's own (CPU) generator
        self._calls = 0
        if attention is not None and global_stats:
            self.schedule = ProbeSchedule(attention.every, attention.max_every, attention.budget, start_step)
            if attention.enabled and probe_model:
                self._probe = AttentionProbe(module_names or {}, rows=attention.rows, batch=attention.batch,
                                             on_error=guard.record)
        self._reset()
        self._install(loss_fn, forward_hooks)

    # -- per-step state ----------------------------------------------------------

    def _reset(self) -> None:
        self._losses: dict[str, list] = {s: [] for s in _LOSS_SOURCES}
        self._tokens = 0
        self._logged_tokens: int | None = None
        self._micro = 0
        self._t_first: float | None = None
        self._clips = StepClips()
        self._norm_total: torch.Tensor | None = None
        self._param_norms: list[torch.Tensor] | None = None
        self._param_index: tuple[int, ...] | None = None
        self._lrs: list | None = None
        self._scalars: dict[str, Any] = {}
        self._autocast: str | None = None
        self._t_fwd_end: float | None = None
        self._batch: int | None = None
        self._attn: dict[str, torch.Tensor] = {}
        self._attn_offset: float | None = None  # where in the batch mon.observe_attention measures
        self._probe_cost = 0.0
        self._probed = False
        self.local_sq.clear()

    def _want_param_norms(self) -> bool:
        return self._global and self._every > 0 and self.step % self._every == 0

    # -- installation ------------------------------------------------------------------

    def _install(self, loss_fn: torch.nn.Module | None, forward_hooks: bool) -> None:
        m = self.model
        if forward_hooks:  # else a framework integration reports micro-batches (begin_forward/end_forward)
            self._handles.append(m.register_forward_pre_hook(self._forward_pre, with_kwargs=True))
            self._handles.append(m.register_forward_hook(self._forward_post_model))
            if self.schedule is not None:
                # always_call: a forward that raises still leaves the probe's mode.
                self._handles.append(m.register_forward_hook(self._forward_end, always_call=True))
        if loss_fn is not None:
            self._handles.append(loss_fn.register_forward_hook(self._forward_post_loss_fn))
        self._handles.append(self.optimizer.register_step_pre_hook(self._optimizer_pre))
        self._handles.append(self.optimizer.register_step_post_hook(self._optimizer_post))
        clip_patch.add_listener(self._on_clip)
        self._handles += self.phases.install(m)
        if self._local_grad_norm:
            from monitor.hooks.ddp import install_local_norm_hook

            undo = install_local_norm_hook(m, self.local_sq, self.phases.clock)
            if undo is not None:
                self._undo.append(undo)
        if type(m).__name__ == "FullyShardedDataParallel" and callable(getattr(m, "clip_grad_norm_", None)):
            # FSDP1 clips sharded gradients in its own method, which all-reduces the norm itself.
            self._undo.append(intercept(m, "clip_grad_norm_", self._fsdp_clip))
        if self.scaler is not None:
            self._undo.append(intercept(self.scaler, "scale", self._scaler_scale))
            self._undo.append(intercept(self.scaler, "step", self._scaler_step))
        # The scheduler is not wrapped: an attribute set on it would land in its state_dict()
        # (LRScheduler saves its __dict__) and break the user's checkpoints. Its own step counter is read.
        self._sched_attr = _scheduler_counter(self.scheduler)
        self._sched_last = self._read_sched()

    def remove(self) -> None:
        if self._probe is not None:
            self._probe.end()  # a forward that never ended (a framework's step that raised) leaves its mode
        if self._compile_watch:
            compiled.uninstall()
            self._compile_watch = False
        for h in self._handles:
            h.remove()
        self._handles.clear()
        clip_patch.remove_listener(self._on_clip)
        for undo in self._undo:
            undo()
        self._undo.clear()

    # -- hooks (training thread) -------------------------------------------------------------

    @staticmethod
    def _training(module: torch.nn.Module) -> bool:
        # Evaluation passes (model.eval() or no_grad) are not part of the step.
        return module.training and torch.is_grad_enabled()

    def _forward_pre(self, module, args, kwargs):
        if torch.compiler.is_compiling():  # traced into a compiled graph: reported after it ran (hooks/compiled.py)
            ids = compiled.token_ids(args, kwargs) if self._count_tokens else None
            compiled.forward_began(self.compiled_key, ids, self._training(module))
            return None
        if self._training(module):
            self.begin_forward(args, kwargs)
        return None

    def begin_forward(self, args: tuple, kwargs: dict, autocast: str | None = None, timed: bool = True) -> None:
        """A training micro-batch starts (the model's forward pre-hook, or a framework's batch start,
        which passes the autocast dtype its precision setting will use). `timed`: now is when it starts
        (not so after a compiled graph ran: that step's phases are not measured)."""
        try:
            now = time.perf_counter()
            if self._t_first is None:
                self._t_first = now
            self.phases.forward_begin(now, timed)
            self._calls = 0  # mon.observe_attention calls without a layer name, in this forward
            if self._micro == 0 and self.schedule is not None:
                self._fwd_t0 = time.perf_counter()
                if self._probe is not None and self.schedule.due(self.step) and self._probe_runs_eagerly():
                    self._probe.begin()  # only this step's first forward is probed
            if self._micro == 0 and autocast is not None:
                self._autocast = autocast
            elif self._micro == 0 and torch.is_autocast_enabled(self._device_type):
                # For the preflight checks (fp16 without GradScaler, GradScaler with bf16).
                self._autocast = str(torch.get_autocast_dtype(self._device_type)).removeprefix("torch.")
            self._micro += 1
            if self._count_tokens:
                tokens, batch = _count_tokens(args, kwargs)
                self._tokens += tokens
                if batch is not None:
                    self._batch = batch
        except Exception as e:
            self._guard.record("forward pre-hook", e)

    def _forward_done(self) -> None:
        """A training forward of the model returned."""
        now = time.perf_counter()
        self._t_fwd_end = now
        try:
            self.phases.forward_done(now)
        except Exception as e:
            self._guard.record("forward timing", e)

    def _forward_post_model(self, module, args, output):
        if torch.compiler.is_compiling():
            compiled.forward_ended(self.compiled_key, "model", find_loss(output), self._training(module))
            return
        training = module.training and torch.is_grad_enabled()
        if training:
            # The last forward of a step ends its "busy" part: what follows is the backward with the all-reduce.
            self._forward_done()
        loss = self._capture_output("model", module, output)
        if training:
            self.phases.watch_backward(output, loss)

    def end_forward(self) -> None:
        """A framework's training micro-batch finished its forward (Lightning: before the backward)."""
        self._forward_done()
        self._forward_end(None, (), None)

    def add_loss(self, source: str, loss: torch.Tensor) -> None:
        """A loss reported for the step by a framework integration ("shares", "training_step") or by a
        compiled graph after it ran ("model", "loss_fn")."""
        try:
            if isinstance(loss, torch.Tensor) and loss.dim() == 0:
                self._losses[source].append(loss.detach())
        except Exception as e:
            self._guard.record(f"{source} loss", e)

    def _forward_end(self, module, args, output):
        """End of a forward (also one that raised): close the probe and account for its cost."""
        if torch.compiler.is_compiling():
            return
        try:
            if self._fwd_t0 is None:
                return
            seconds = time.perf_counter() - self._fwd_t0
            self._fwd_t0 = None
            probe = self._probe
            if probe is not None and probe.active:
                results = probe.end()
                for layer, stats in results.items():
                    self._attn.setdefault(layer, stats)
                self._empty_probes = 0 if results else self._empty_probes + 1
                self._probed = True
                # The cost is what the probed forward took beyond a plain one (the mode's dispatch of
                # every op included), at least the measured recomputation itself.
                plain = self.schedule.forward_seconds
                extra = seconds - plain if plain is not None else probe.seconds
                self._probe_cost += max(probe.seconds, extra)
            else:
                self.schedule.plain_forward(seconds)
        except Exception as e:
            self._guard.record("attention probe", e)

    def _probe_runs_eagerly(self) -> bool:
        """Before a sampled forward: the probe's mode would be traced into compiled code and make it
        recompile, so on a model (or part of one) that runs compiled it turns off, saying so once."""
        why = compiled.compiled_reason(self.model)
        if why is not None:
            self._probe_off(why)
        return why is None

    def _probe_off(self, why: str) -> None:
        self._probe = None
        self.probe_off = f"{why}: the probe does not run inside compiled code; report with mon.observe_attention"
        log.info("trainmon: attention probe off: %s", self.probe_off)

    def compiled_forward_began(self, tokens: torch.Tensor | None) -> None:
        """After a compiled graph ran: a training forward of the model began in it."""
        if self._probe is not None:
            self._probe_off("the model's forward runs under torch.compile")
        self.begin_forward((tokens,) if tokens is not None else (), {}, timed=False)

    def compiled_forward_ended(self, source: str, loss: torch.Tensor | None) -> None:
        """After a compiled graph ran: a forward of the model ("model") or the loss module ended in it."""
        if source == "model":
            self._forward_done()
        self.add_loss(source, loss)

    def observe_attention(self, q, k, layer: str | None, logits, mask, is_causal: bool, scale,
                          presliced: bool = False) -> None:
        """Statistics of one attention call from the user (custom kernels); only on due steps.
        `presliced`: the sequences were chosen already, inside a compiled graph (which also told
        whether autograd was on: it runs with autograd off). An unnamed call is named by its order
        in the forward."""
        if not presliced and not torch.is_grad_enabled():
            return  # an evaluation pass (no_grad) inside a sampled step is not the step's attention
        if not layer:
            layer = f"attention.{self._calls}"
            self._calls += 1
        if self.schedule is None or not self.schedule.due(self.step) or layer in self._attn:
            return
        t0 = time.perf_counter()
        try:
            cfg = self._attn_cfg
            if self._attn_offset is None:  # one position per step, as the probe draws one per forward
                self._attn_offset = float(torch.rand((), generator=self._attn_gen))
            t = logits if logits is not None else q
            stats = attention_stats(q, k, logits=logits, masks=sdpa_masks(mask), is_causal=is_causal, scale=scale,
                                    rows=cfg.rows, batch=t.shape[0] if presliced else cfg.batch,
                                    offset=0.0 if presliced else self._attn_offset)
            if stats is not None:
                self._attn[layer] = stats
            self._probed = True
        except Exception as e:
            self._guard.record("mon.observe_attention", e)
        finally:
            self._probe_cost += time.perf_counter() - t0

    def _forward_post_loss_fn(self, module, args, output):
        if torch.compiler.is_compiling():
            compiled.forward_ended(self.compiled_key, "loss_fn", find_loss(output), torch.is_grad_enabled())
            return
        self._capture_output("loss_fn", module, output)

    def _capture_output(self, source: str, module, output) -> torch.Tensor | None:
        """Keep the loss of a training forward's output; returns it (None: none found)."""
        try:
            if torch.is_grad_enabled() and (source == "loss_fn" or module.training):
                loss = find_loss(output)
                if loss is not None:
                    self._losses[source].append(loss.detach())
                return loss
        except Exception as e:
            self._guard.record(f"{source} forward hook", e)
        return None

    def _scaler_scale(self, original, outputs):
        try:
            if isinstance(outputs, torch.Tensor) and outputs.dim() == 0:
                self._losses["scaler"].append(outputs.detach())
                if self._t_first is None:
                    self._t_first = time.perf_counter()
        except Exception as e:
            self._guard.record("GradScaler.scale hook", e)
        return original(outputs)

    def _read_sched(self) -> int | None:
        if self._sched_attr is None:
            return None
        v = getattr(self.scheduler, self._sched_attr, None)
        return v if isinstance(v, int) else None

    def _on_clip(self, parameters, max_norm, total_norm) -> None:
        try:
            if isinstance(parameters, torch.Tensor):
                parameters = [parameters]
            if not isinstance(parameters, (list, tuple)) or not parameters:
                return  # a generator here would be consumed by looking at it: leave it alone
            if not self._global or not covers(parameters, self._param_ids):
                return  # a rank that leaves global stats to rank 0, or clipping some other model's parameters
            if self._sharded:
                if self._clips.inside_fsdp:
                    return  # FSDP1's own clip_grad_norm_ (unsharded, it calls this one): its return is recorded
                total_norm = clip_patch.sharded_total(parameters, total_norm)
                if total_norm is None:
                    self._clips.unknown = True
                    return
            first = not self._clips
            self._clips.add(parameters, float(max_norm), total_norm, self._micro)
            if first and self._want_param_norms() and self._param_norms is None and not self._sharded:
                # Gradients are still unclipped here: one extra read of them, on sampled steps only.
                self._compute_norms(total=False)
        except Exception as e:
            self._guard.record("clip_grad_norm_ hook", e)

    def _fsdp_clip(self, original, max_norm, norm_type=2.0):
        self._clips.inside_fsdp = True
        try:
            total = original(max_norm, norm_type)
        finally:
            self._clips.inside_fsdp = False
        try:
            if self._global and isinstance(total, torch.Tensor) and float(norm_type) == 2.0:
                self._clips.add(self.params, float(max_norm), total, self._micro)
        except Exception as e:
            self._guard.record("FSDP clip_grad_norm_ hook", e)
        return total

    def _optimizer_pre(self, optimizer, args, kwargs):
        self._halt_check()  # may raise TrainingHalted: deliberately outside the guard
        try:
            self._read_lrs()
            # args is (optimizer, *step's args): the closure is step's first argument.
            closure = kwargs.get("closure", args[1] if len(args) > 1 else None)
            if callable(closure):
                # The closure computes this step's gradients inside step() (LBFGS, Lightning, which also
                # clips in it): they are read when it returns, not now.
                return self._after_closure(args, kwargs, closure)
            self._measure(in_optimizer=True)
        except Exception as e:
            self._guard.record("optimizer step pre-hook", e)
        return None

    def _after_closure(self, args: tuple, kwargs: dict, closure: Callable[[], Any]) -> tuple[tuple, dict]:
        def measured_closure():
            result = closure()
            try:
                self._measure(in_optimizer=True)
            except Exception as e:
                self._guard.record("optimizer closure", e)
            return result

        if "closure" in kwargs:
            return args, {**kwargs, "closure": measured_closure}
        return (args[0], measured_closure, *args[2:]), kwargs

    def _optimizer_post(self, optimizer, args, kwargs):
        if self._in_scaler_step:
            return None  # scaler.step() finalizes, skipped or not
        try:
            self._finalize(found_inf=None)
        except Exception as e:
            self._guard.record("optimizer step post-hook", e)
        return None

    def _scaler_step(self, original, optimizer, *args, **kwargs):
        if optimizer is not self.optimizer:
            return original(optimizer, *args, **kwargs)
        self._halt_check()
        self._in_scaler_step = True
        try:
            ret = original(optimizer, *args, **kwargs)
        finally:
            self._in_scaler_step = False
        try:
            self._scaler_step_done()
        except Exception as e:
            self._guard.record("GradScaler.step hook", e)
        return ret

    # -- step assembly (training thread, no host sync) ---------------------------------------

    def _read_lrs(self) -> None:
        if self._lrs is None:
            self._lrs = [g["lr"] for g in self.optimizer.param_groups] if self._global else []

    def _measure(self, in_optimizer: bool) -> None:
        """The gradients as the optimizer gets them: their norm is the pre-clip one unless a clip call
        said otherwise (then it is the norm after clipping, recorded as such)."""
        if self._norm_total is not None or not self._global or self._sharded:
            return
        if self._clips and not self._clips.unknown:
            return
        divide_by = None
        if in_optimizer and self._in_scaler_step:
            # Optimizers that unscale inside their fused step get the scale as an attribute.
            gs = getattr(self.optimizer, "grad_scale", None)
            divide_by = gs if isinstance(gs, torch.Tensor) else None
        self._compute_norms(total=True, divide_by=divide_by)

    def _compute_norms(self, total: bool, divide_by: torch.Tensor | None = None) -> None:
        """Per-parameter norms with torch._foreach_norm and, when the loop did not clip, the total
        computed exactly as clip_grad_norm_ would (same grouping, same reduction)."""
        with torch.no_grad():
            # One pass to gather the gradients (clip_grad_norm_ does the same); the index of those
            # present is only built in the rare step where some parameter has none.
            grads = [p.grad for p in self.params]
            index = None
            if any(g is None for g in grads):
                index = tuple(i for i, g in enumerate(grads) if g is not None)
                grads = [grads[i] for i in index]
            if not grads:
                return
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
                self._norm_total = torch.linalg.vector_norm(stacked, 2.0)
            if self._want_param_norms():
                self._param_norms = norms
                self._param_index = index

    def _scaler_step_done(self) -> None:
        if self._lrs is None or (not self._clips and self._norm_total is None):
            # A skipped step never reached optimizer.step(): the grads are unscaled now (inf included).
            self._read_lrs()
            self._measure(in_optimizer=False)
        found_inf = None
        scale = None
        if getattr(self.scaler, "_enabled", False):
            state = self.scaler._per_optimizer_states.get(id(self.optimizer), {})
            per_device = list(state.get("found_inf_per_device", {}).values())
            if per_device:
                found_inf = per_device[0] if len(per_device) == 1 else torch.stack(
                    [t.to(per_device[0].device) for t in per_device]).sum()
            if self._global:
                scale = self.scaler._scale  # the scale this step's backward used (update() comes after)
        self._finalize(found_inf=found_inf, scale=scale)

    def _finalize(self, found_inf: torch.Tensor | None, scale: torch.Tensor | None = None) -> None:
        if self._lrs is None:
            self._read_lrs()
            self._measure(in_optimizer=False)
        now = time.perf_counter()
        wall = time.time()
        start = self._prev_end if self._prev_end is not None else self._t_first
        step_time = now - start if start is not None else None
        busy = self._t_fwd_end - start if start is not None and self._t_fwd_end is not None else None
        # Host-side allocator counter (no device sync): the process's peak so far.
        memory = float(torch.cuda.max_memory_allocated(self._device)) if self._device.type == "cuda" else None
        self._prev_end = now
        phases = self.phases.clock.step_end(now)

        layout: list[str] = []
        parts: list[torch.Tensor] = []
        loss_value = None  # a Python float passed to mon.log(loss=...)
        for source, reduce in _LOSS_SOURCES.items():
            ls = self._losses[source]
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
        clips = self._clips
        # Unknown: clipping the monitor could not see whole (each micro-batch), or a sharded model
        # whose global norm no clip call reported.
        norm_unknown = clips.unknown or (self._sharded and self._global and not clips)
        if clips and not clips.unknown:
            total, max_norm = clips.total()
            # Same formula as clip_grad_norm_'s coefficient.
            coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
            layout += ["grad_norm", "clip_coef"]
            parts += [total, coef]
        elif norm_unknown:
            if clips:
                max_norm = clips.total()[1]
            if self._norm_total is not None:  # what the optimizer applied, after the clipping
                layout.append("grad_norm_clipped")
                parts.append(self._norm_total)
            self._param_norms = None  # measured after clipping, or local shards: not the step's pre-clip truth
        elif self._norm_total is not None:
            layout.append("grad_norm")
            parts.append(self._norm_total)
        if scale is not None:
            layout.append("loss_scale")
            parts.append(scale)
        if found_inf is not None:
            layout.append("found_inf")
            parts.append(found_inf)
        lrs: list[float] = []
        for i, lr in enumerate(self._lrs or []):
            if isinstance(lr, torch.Tensor):  # capturable/tensor LR: stays on device
                layout.append(f"lr:{i}")
                parts.append(lr)
                lrs.append(float("nan"))
            else:
                lrs.append(float(lr))
        scalars: dict[str, float] = {}
        for k, v in self._scalars.items():
            if isinstance(v, torch.Tensor):
                layout.append(f"s:{k}")
                parts.append(v.detach())
            else:
                scalars[k] = float(v)
        for layer, stats in self._attn.items():  # sampled steps: four values per attention layer
            layout += [f"a:{stat}:{layer}" for stat in STATS]
            parts += stats.unbind()
        probe_cost = probe_every = None
        if self.schedule is not None:
            probe_cost, probe_every = self._schedule_next(step_time)
        if self.local_sq:  # this rank's gradients before the all-reduce, from the DDP hook
            layout.append("local_grad_norm")
            parts.append(torch.sqrt(torch.stack(self.local_sq).sum()))
        fp_count = 0
        if self._fp_every and self.step % self._fp_every == 0:
            # Parameter fingerprint for the cross-rank comparison: the ranks' parameters must be
            # bitwise equal after every step. One read of the weights every few steps.
            with torch.no_grad():
                fp = torch._foreach_norm(self._fp_tensors, 2.0)
            fp_count = len(fp)
        else:
            fp = []
        param_index = self._param_index
        values, event = self._to_host(parts, (self._param_norms or []) + list(fp))
        tokens = self._logged_tokens if self._logged_tokens is not None else (self._tokens or None)
        sched_now = self._read_sched()
        sched_steps = None
        if sched_now is not None and self._sched_last is not None:
            sched_steps = (sched_now - self._sched_last) // self._sched_per_step
        self._sched_last = sched_now
        packet = Packet(
            step=self.step, layout=tuple(layout), values=values, event=event, param_index=param_index,
            lrs=lrs, time=wall, step_time=step_time, tokens=tokens, micro_batches=self._micro,
            scheduler_steps=sched_steps,
            max_norm=max_norm, grad_norm_unknown=norm_unknown, autocast=self._autocast, loss_value=loss_value,
            scalars=scalars,
            busy_time=busy, memory=memory, batch_size=self._batch, fp_count=fp_count,
            probe_cost=probe_cost, probe_every=probe_every, phases=phases,
        )
        self.step += 1
        self._reset()
        self._handoff(packet)

    def _schedule_next(self, step_time: float | None) -> tuple[float | None, int | None]:
        """After a step: advance the probe schedule; (cost, interval) when this step was probed."""
        sched = self.schedule
        if not sched.due(self.step):
            if step_time is not None:
                sched.plain_step(step_time)
            return None, None
        if not self._probed:
            sched.skipped(self.step)  # no training forward ran (or no call): try again later
            return None, None
        sched.probed(self.step, self._probe_cost)
        if sched.off:
            log.info("trainmon: attention statistics off: %s", sched.off)
            return self._probe_cost, sched.every
        if self._empty_probes >= 3 and self._probe is not None:
            # Three probed forwards without an SDPA or MHA call: this model computes attention some
            # other way (mon.observe_attention can still report it). Stop paying for the mode.
            self._probe = None
            log.info("trainmon: no F.scaled_dot_product_attention or F.multi_head_attention_forward call in "
                     "3 probed forwards; the attention probe is off (mon.observe_attention still reports)")
        return self._probe_cost, sched.every

    @staticmethod
    def _to_host(scalars: list[torch.Tensor], norms: list[torch.Tensor] | None) -> tuple[torch.Tensor | None, Any]:
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

    # -- explicit API -------------------------------------------------------------------------

    def log(self, loss: Any = None, tokens: int | None = None, **scalars: Any) -> None:
        try:
            if loss is not None:
                self._losses["log"].append(loss.detach() if isinstance(loss, torch.Tensor) else float(loss))
            if tokens is not None:
                self._logged_tokens = (self._logged_tokens or 0) + int(tokens)
            for k, v in scalars.items():
                self._scalars[k] = v.detach() if isinstance(v, torch.Tensor) else float(v)
        except Exception as e:
            self._guard.record("mon.log", e)
