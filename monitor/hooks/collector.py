"""The training-thread side: hooks that gather one optimizer step's values.

Hooks only keep references (detached loss tensors, the clip's norm) and run
tensor ops that stay on the device. At the step boundary the step's state is
assembled into a Packet (hooks/packet.py: ONE tensor, copied to the host without
waiting) and handed to the publisher, so the training thread never waits for the
device on the monitor's behalf. Nothing here calls .item(), .tolist() or float()
on a device tensor.

Step boundaries: without a GradScaler (or with a disabled one) the optimizer's step
pre/post hooks; with one, `scaler.step(optimizer)`, because a skipped step never
calls optimizer.step(). Every hook body runs under the ErrorGuard: a failure is
counted and the training loop never sees it (TrainingHalted excepted, which is
the user's own request).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from monitor.hooks import clip as clip_patch
from monitor.hooks import compiled
from monitor.hooks.evalmode import EvalModeTraining
from monitor.hooks.guard import ErrorGuard
from monitor.hooks.hooked import CollectorOptions, Hooked
from monitor.hooks.intercept import intercept
from monitor.hooks.introspect import SchedulerSteps
from monitor.hooks.norms import GradNorms, fingerprint, scaler_state
from monitor.hooks.packet import Packet, Staging, StepState, assemble, count_tokens, find_loss
from monitor.hooks.phases import PhaseHooks
from monitor.hooks.sampler import NO_STATS, AttentionSampler


class StepCollector:
    def __init__(self, hooked: Hooked, options: CollectorOptions, *, handoff: Callable[[Packet], None],
                 guard: ErrorGuard, halt_check: Callable[[], None], sampler: AttentionSampler | None = None) -> None:
        """`handoff` takes each finished step's Packet; `halt_check` runs before each optimizer step (it
        may raise TrainingHalted); `sampler` measures attention on sampled steps (rank 0)."""
        self.model, self.optimizer = hooked.model, hooked.optimizer
        self.scaler, self.scheduler = hooked.scaler, hooked.scheduler
        self.params = hooked.params
        self._device = self.params[0].device
        self._device_type = self._device.type
        self.step = options.start_step
        self._opt = options
        self._global = options.global_stats
        self._handoff = handoff
        self._guard = guard
        self._refused: set[str] = set()  # mon.log names whose value was refused (warned once each)
        self._halt_check = halt_check
        self.sampler = sampler
        self.norms = GradNorms(self.params, options.param_norms_every, global_stats=options.global_stats,
                               sharded=options.sharded, groups=len(self.optimizer.param_groups))
        self._fp_tensors = [*self.params, *[b for b in self.model.buffers() if b.is_floating_point()]]
        self.staging = Staging(self._device)  # the step's values to the host: planned once per layout
        self.local_sq: list[torch.Tensor] = []  # squared bucket norms from the DDP communication hook
        self._handles: list[Any] = []
        self._undo: list[Callable[[], None]] = []
        self._in_scaler_step = False
        self._prev_end: float | None = None
        self._eval = EvalModeTraining()  # a loop training on eval-mode forwards (model.train() not called)
        self._scheduler_steps = SchedulerSteps(hooked.scheduler, hooked.scheduler_steps_per_step)
        self.compiled_key = compiled.register(self)
        self.token = torch.zeros(1, device=self._device)  # what the compiled observe_attention op "writes"
        compiled.install()
        self._compile_watch = True
        self.phases = PhaseHooks(self.model, self._device, sharded=options.sharded, guard=guard)
        self._clock = self.phases.clock  # the model's forward boundaries go to it directly
        self._reset()
        self._install(hooked.loss_fn)

    def _reset(self) -> None:
        self.s = StepState()
        self.norms.reset()
        self.local_sq.clear()

    # -- installation ------------------------------------------------------------------

    def _install(self, loss_fn: torch.nn.Module | None) -> None:
        m = self.model
        if self._opt.forward_hooks:  # else a framework integration reports micro-batches (begin/end_forward)
            self._handles.append(m.register_forward_pre_hook(self._forward_pre, with_kwargs=True))
            self._handles.append(m.register_forward_hook(self._forward_post_model))
            if self.sampler is not None:
                # always_call: a forward that raises still ends the probe's interception.
                self._handles.append(m.register_forward_hook(self._forward_end, always_call=True))
        if loss_fn is not None:
            self._handles.append(loss_fn.register_forward_hook(self._forward_post_loss_fn))
        self._handles.append(self.optimizer.register_step_pre_hook(self._optimizer_pre))
        self._handles.append(self.optimizer.register_step_post_hook(self._optimizer_post))
        clip_patch.add_listener(self._on_clip)
        self._handles += self.phases.install(m)
        if self._opt.local_grad_norm:
            from monitor.hooks.ddp import install_local_norm_hook

            undo = install_local_norm_hook(m, self.local_sq, self.phases.clock)
            if undo is not None:
                self._undo.append(undo)
        if type(m).__name__ == "FullyShardedDataParallel" and callable(getattr(m, "clip_grad_norm_", None)):
            # FSDP1 clips sharded gradients in its own method, which all-reduces the norm itself.
            self._undo.append(intercept(m, "clip_grad_norm_", self._fsdp_clip))
        if self.scaler is not None:
            self._undo.append(intercept(self.scaler, "scale", self._scaler_scale))
            if getattr(self.scaler, "_enabled", True):  # a disabled one's step() is optimizer.step(): its hooks do
                self._undo.append(intercept(self.scaler, "step", self._scaler_step))

    def remove(self) -> None:
        if self.sampler is not None:
            self.sampler.close()
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

    # -- forwards (training thread) ------------------------------------------------------------

    def _training(self, module: torch.nn.Module) -> bool:
        # Evaluation passes (model.eval() or no_grad) are not part of the step, unless the loop trains on
        # eval-mode forwards (found at a step boundary: hooks/evalmode.py).
        return (module.training or self._eval.on) and torch.is_grad_enabled()

    def _forward_pre(self, module, args, kwargs):
        if torch.compiler.is_compiling():  # traced into a compiled graph: reported after it ran (hooks/compiled.py)
            ids = compiled.token_ids(args, kwargs) if self._opt.count_tokens else None
            compiled.forward_began(self.compiled_key, ids, self._training(module))
            return None
        if self._training(module):
            if self._eval.on and module.training:
                self._train_mode_again()
            self.begin_forward(args, kwargs)
        elif torch.is_grad_enabled():  # eval mode, autograd on: an evaluation, or training in eval mode
            self._eval.forwards += 1
        return None

    def begin_forward(self, args: tuple, kwargs: dict, autocast: str | None = None, timed: bool = True) -> None:
        """A training micro-batch starts (the model's forward pre-hook, or a framework's batch start,
        which passes the autocast dtype its precision setting will use). `timed`: now is when it starts
        (not so after a compiled graph ran: that step's phases are not measured)."""
        try:
            s = self.s
            now = time.perf_counter()
            first = s.micro == 0
            if first:
                if s.t_first is None:
                    s.t_first = now
                if autocast is not None:
                    s.autocast = autocast
                elif torch.is_autocast_enabled(self._device_type):
                    # For the preflight checks (fp16 without GradScaler, GradScaler with bf16).
                    s.autocast = str(torch.get_autocast_dtype(self._device_type)).removeprefix("torch.")
            if timed:
                self._clock.forward_begin(now)
            else:  # after a compiled graph ran: its phases were not seen
                self._clock.valid = False
            if self.sampler is not None:
                self.sampler.forward_begin(self.step, first)
            s.micro += 1
            if self._opt.count_tokens:
                tokens, batch = count_tokens(args, kwargs)
                s.tokens += tokens
                if batch is not None:
                    s.batch = batch
        except Exception as e:
            self._guard.record("forward pre-hook", e)

    def _forward_done(self) -> None:
        """A training forward of the model returned."""
        now = time.perf_counter()
        self.s.t_fwd_end = now
        try:
            self._clock.forward_end(now)
        except Exception as e:
            self._guard.record("forward timing", e)

    def _forward_post_model(self, module, args, output):
        if torch.compiler.is_compiling():
            compiled.forward_ended(self.compiled_key, "model", find_loss(output), self._training(module))
            return
        if self._training(module):
            # The last forward of a step ends its "busy" part: what follows is the backward with the all-reduce.
            self._forward_done()
            self.phases.watch_backward(output, self._capture_output("model", output))

    def _forward_end(self, module, args, output):
        if not torch.compiler.is_compiling():
            self.sampler.forward_end()

    def end_forward(self) -> None:
        """A framework's training micro-batch finished its forward (Lightning: before the backward)."""
        self._forward_done()
        if self.sampler is not None:
            self.sampler.forward_end()

    def add_loss(self, source: str, loss: torch.Tensor) -> None:
        """A loss reported for the step by a framework integration ("shares", "training_step") or by a
        compiled graph after it ran ("model", "loss_fn")."""
        try:
            if isinstance(loss, torch.Tensor) and loss.dim() == 0:
                self.s.losses.setdefault(source, []).append(loss.detach())
        except Exception as e:
            self._guard.record(f"{source} loss", e)

    def compiled_forward_began(self, tokens: torch.Tensor | None) -> None:
        """After a compiled graph ran: a training forward of the model began in it."""
        if self.sampler is not None:
            self.sampler.turn_off("the model's forward runs under torch.compile")
        self.begin_forward((tokens,) if tokens is not None else (), {}, timed=False)

    def compiled_forward_ended(self, source: str, loss: torch.Tensor | None) -> None:
        """After a compiled graph ran: a forward of the model ("model") or the loss module ended in it."""
        if source == "model":
            self._forward_done()
        self.add_loss(source, loss)

    def observe_attention(self, q, k, layer: str | None, logits, mask, is_causal: bool, scale,
                          presliced: bool = False) -> None:
        """One attention call reported by the user, or by a compiled graph as it runs (`presliced`)."""
        if self.sampler is not None:
            self.sampler.observe(self.step, q, k, layer, logits, mask, is_causal, scale, presliced)

    def _forward_post_loss_fn(self, module, args, output):
        if torch.compiler.is_compiling():
            compiled.forward_ended(self.compiled_key, "loss_fn", find_loss(output), torch.is_grad_enabled())
            return
        if torch.is_grad_enabled():
            self._capture_output("loss_fn", output)

    def _capture_output(self, source: str, output) -> torch.Tensor | None:
        """Keep the loss of a training forward's output; returns it (None: none found)."""
        try:
            loss = find_loss(output)
            if loss is not None:
                self.s.losses.setdefault(source, []).append(loss.detach())
            return loss
        except Exception as e:
            self._guard.record(f"{source} forward hook", e)
        return None

    def _scaler_scale(self, original, outputs):
        try:
            s = self.s
            if isinstance(outputs, torch.Tensor) and outputs.dim() == 0:
                # The last-resort loss source: kept only while no other source reported (any other wins).
                if not s.losses or "scaler" in s.losses:
                    s.losses.setdefault("scaler", []).append(outputs.detach())
                if s.t_first is None:
                    s.t_first = time.perf_counter()
        except Exception as e:
            self._guard.record("GradScaler.scale hook", e)
        return original(outputs)

    # -- clipping and the optimizer step (training thread) -----------------------------------------

    def _on_clip(self, parameters, max_norm, total_norm) -> None:
        try:
            self.norms.on_clip(self.step, parameters, max_norm, total_norm, self.s.micro)
        except Exception as e:
            self._guard.record("clip_grad_norm_ hook", e)

    def _fsdp_clip(self, original, max_norm, norm_type=2.0):
        clips = self.norms.clips
        clips.inside_fsdp = True
        try:
            total = original(max_norm, norm_type)
        finally:
            clips.inside_fsdp = False
        try:
            self.norms.on_fsdp_clip(max_norm, norm_type, total, self.s.micro)
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
            # Another optimizer's step (a GAN's discriminator): the losses scaled so far were its own.
            self.s.losses.pop("scaler", None)
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

    def _read_lrs(self) -> None:
        if self.s.lrs is None:
            self.s.lrs = lrs = [g["lr"] for g in self.optimizer.param_groups] if self._global else []
            if len(lrs) != self.norms.groups and self._global:
                self.norms.regroup(self.optimizer)

    def _measure(self, in_optimizer: bool) -> None:
        divide_by = None
        if in_optimizer and self._in_scaler_step:
            # Optimizers that unscale inside their fused step get the scale as an attribute.
            gs = getattr(self.optimizer, "grad_scale", None)
            divide_by = gs if isinstance(gs, torch.Tensor) else None
        self.norms.measure(self.step, divide_by)

    def _scaler_step_done(self) -> None:
        if self.s.lrs is None or (not self.norms.clips and self.norms.total is None):
            # A skipped step never reached optimizer.step(): the grads are unscaled now (inf included).
            self._read_lrs()
            self._measure(in_optimizer=False)
        found_inf, scale = scaler_state(self.scaler, self.optimizer)
        self._finalize(found_inf=found_inf, scale=scale if self._global else None)

    # -- the step boundary (training thread, no host sync) -------------------------------------------

    def _finalize(self, found_inf: torch.Tensor | None, scale: torch.Tensor | None = None) -> None:
        s = self.s
        if self._eval.forwards:
            self._eval.step_end(s.micro)
        if s.lrs is None:
            self._read_lrs()
            self._measure(in_optimizer=False)
        now = time.perf_counter()
        start = self._prev_end if self._prev_end is not None else s.t_first
        self._prev_end = now
        # Host-side allocator counter (no device sync): the process's peak so far.
        memory = float(torch.cuda.max_memory_allocated(self._device)) if self._device_type == "cuda" else None
        step_time = now - start if start is not None else None
        attention = self.sampler.step_end(self.step, step_time) if self.sampler is not None else NO_STATS
        fp_every = self._opt.fingerprint_every
        # One read of the weights every few steps, for the cross-rank comparison.
        fp = fingerprint(self._fp_tensors) if fp_every and self.step % fp_every == 0 else []
        try:
            packet = assemble(s, self.norms, step=self.step, scale=scale, found_inf=found_inf, attention=attention,
                              local_sq=self.local_sq, fingerprint=fp, staging=self.staging, end=now, start=start,
                              memory=memory, phases=self.phases.clock.step_end(now),
                              scheduler_steps=self._scheduler_steps.since_last())
        finally:  # the step is over even when its record could not be made (that error is counted)
            self.step += 1
            self._reset()
        self._handoff(packet)

    def _train_mode_again(self) -> None:
        """The model is back in train mode: this step's eval-mode forwards so far were evaluations."""
        self._eval.on = False
        s = self.s
        for source in ("model", "loss_fn", "scaler"):
            s.losses.pop(source, None)
        s.tokens, s.micro, s.batch, s.t_fwd_end = 0, 0, None, None
        self._clock.valid = False  # the step's phases included an evaluation

    # -- explicit API -------------------------------------------------------------------------

    def log(self, loss: Any = None, tokens: int | None = None, **scalars: Any) -> None:
        try:
            self.s.log(loss, tokens, scalars, warned=self._refused)
        except Exception as e:
            self._guard.record("mon.log", e)
