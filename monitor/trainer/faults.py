"""Fault injection: each flag reproduces one real training bug so the monitor has something to catch.

A flag is `name` or `name:ARG`. A fault acts in up to two ways: `configure` edits the effective
config before anything is built (no-warmup, lr-too-high), and a `FaultRuntime` installs hooks and
acts at optimizer-step boundaries (`before_step(run, step)`, steps 0-based). Adding a fault is one
entry in FAULTS. The `run` the runtime sees is the loop's `_Run` (model, optimizer, scaler,
scheduler, checkpoint helpers); this module imports nothing from the loop or the config.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

# Step faults are 0-based optimizer steps: `nan-at:0` poisons the very first update.


class FaultRuntime:
    """Behaviour of a fault during the run. Subclasses override what they need."""

    def __init__(self, value: Any) -> None:
        self.value = value
        self.handles: list[torch.utils.hooks.RemovableHandle] = []

    def install(self, run: Any) -> None:
        """Called once, after the model/optimizer/scaler/scheduler exist and before the first step."""

    def before_step(self, run: Any, step: int) -> None:
        """Called at the start of every optimizer step (before its first micro-batch)."""

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


@dataclass(frozen=True)
class FaultSpec:
    name: str
    doc: str
    arg: str | None = None  # what ':ARG' means, e.g. "STEP"; None: takes no argument
    arg_type: type = int
    default: int | float | None = None
    required: bool = False  # ARG must be given
    configure: Callable[[dict[str, Any], Any], None] | None = None  # edits the config dict in place
    runtime: type[FaultRuntime] | None = None

    @property
    def usage(self) -> str:
        if self.arg is None:
            return self.name
        return f"{self.name}:{self.arg}" if self.required else f"{self.name}[:{self.arg}]"


@dataclass(frozen=True)
class Fault:
    """A parsed flag: its spec and argument (the default when omitted)."""

    spec: FaultSpec
    value: Any
    flag: str


# --- runtimes --------------------------------------------------------------------------------------


class _PerMicrobatchScheduler(FaultRuntime):
    def install(self, run: Any) -> None:
        run.scheduler_per_microbatch = True


class _Fp16Overflow(FaultRuntime):
    # 2**40 times any non-zero fp16 gradient (>= 6e-8) exceeds fp16's max (65504): inf.
    factor = 2.0**40

    def install(self, run: Any) -> None:
        self.active = False
        # The last MLP's output projection runs in fp16 under autocast; its output gradient is fp16.
        target = run.model.blocks[-1].mlp.c_proj
        self.handles.append(target.register_forward_hook(self._forward))

    def _forward(self, module: torch.nn.Module, args: Any, out: torch.Tensor) -> None:
        if self.active and out.requires_grad:
            out.register_hook(lambda g: g * self.factor)

    def before_step(self, run: Any, step: int) -> None:
        self.active = step >= self.value


class _NanAt(FaultRuntime):
    def install(self, run: Any) -> None:
        self.active = False
        self.handles.append(run.model.wte.register_forward_hook(self._forward))

    def _forward(self, module: torch.nn.Module, args: Any, out: torch.Tensor) -> torch.Tensor | None:
        return out + float("nan") if self.active else None

    def before_step(self, run: Any, step: int) -> None:
        self.active = step == self.value


class _AttentionSharpen(FaultRuntime):
    growth = 1.25  # per step: x800 after 30 steps
    cap = 1e3  # keeps q finite in fp16/bf16; attention is one-hot long before

    def before_step(self, run: Any, step: int) -> None:
        if step < self.value:
            return
        gain = min(self.cap, self.growth ** (step - self.value + 1))
        for m in run.model.modules():
            if hasattr(m, "qk_gain"):
                m.qk_gain = gain


class _ResumeWithoutScheduler(FaultRuntime):
    def install(self, run: Any) -> None:
        cfg = run.cfg
        self.at = self.value if self.value is not None else max(cfg.warmup_steps + 1, cfg.max_steps // 2)

    def before_step(self, run: Any, step: int) -> None:
        if step != self.at:
            return
        # What a restarted job does when its resume code forgets the scheduler: model, optimizer
        # and scaler come back from the checkpoint, the scheduler is built fresh at its step 0.
        path = run.save_checkpoint(step)
        run.load_checkpoint(path, load_scheduler=False)
        run.scheduler = run.new_scheduler()


# --- config edits ----------------------------------------------------------------------------------


def _no_warmup(cfg: dict[str, Any], _: Any) -> None:
    cfg["warmup_steps"] = 0


def _lr_too_high(cfg: dict[str, Any], factor: float) -> None:
    cfg["lr"] = cfg["lr"] * factor


def _per_microbatch(cfg: dict[str, Any], _: Any) -> None:
    if cfg["grad_accum"] == 1:
        # Same tokens per optimizer step, split into 4 micro-batches, so the run costs the same.
        cfg["grad_accum"] = 4
        cfg["batch_size"] = max(1, cfg["batch_size"] // 4)


def _force_fp16(cfg: dict[str, Any], _: Any) -> None:
    cfg["precision"] = "fp16"


FAULTS: dict[str, FaultSpec] = {
    spec.name: spec
    for spec in [
        FaultSpec(
            "no-warmup",
            "Sets warmup_steps to 0, so the first optimizer update runs at the peak LR while Adam's "
            "second-moment estimates are still near zero: the earliest updates are far larger than "
            "intended. A model as small as tiny still converges: the mistake shows in the LR trace, "
            "not the loss. warmup.missing (and warmup.too_short) on step 0.",
            configure=_no_warmup,
        ),
        FaultSpec(
            "lr-too-high",
            "Multiplies the peak LR by FACTOR (default 500: tiny then peaks at 1.0, an SGD habit), "
            "warmup and clipping as configured. On tiny the run destabilises while the LR ramps up: "
            "from step ~20 gradient norms climb 3-5x above their start and stay there through step "
            "~100, clipping is active on most steps, the loss spikes to ~3x its minimum and ends "
            "near 4.5 instead of 0.4. grad_norm.growth/spike, clip.saturated, loss.spike/divergence.",
            arg="FACTOR",
            arg_type=float,
            default=500.0,
            configure=_lr_too_high,
        ),
        FaultSpec(
            "per-microbatch-scheduler",
            "Calls scheduler.step() after every micro-batch instead of once per optimizer step (the "
            "classic gradient-accumulation bug). If grad_accum is 1 it becomes 4, with batch_size "
            "divided by 4 so each step sees the same tokens; the schedule then runs grad_accum "
            "times too fast: warmup ends early and the LR reaches its floor a quarter into the "
            "run. The monitor should raise warmup.per_microbatch from the first step.",
            configure=_per_microbatch,
            runtime=_PerMicrobatchScheduler,
        ),
        FaultSpec(
            "fp16-overflow",
            "Forces precision fp16 with a GradScaler. From optimizer step STEP (default 20) a "
            "backward hook multiplies the gradient of the last MLP's fp16 output by 2**40, so the "
            "fp16 gradients overflow: GradScaler skips step after step, halving its scale each "
            "time (below 1 after 17 skips). After ~30 skips (scale ~6e-5) the scaled gradients "
            "underflow to zero at that point instead, updates resume with the rest of the "
            "gradients quantised away and the loss stalls. amp.overflow, then amp.scale_collapse.",
            arg="STEP",
            default=20,
            configure=_force_fp16,
            runtime=_Fp16Overflow,
        ),
        FaultSpec(
            "nan-at",
            "Adds NaN to the token-embedding output during optimizer step STEP (required), so that "
            "step's loss and gradients are NaN. In fp32/bf16 clipping and AdamW then write NaN into "
            "every parameter and the run is dead from that step on; in fp16 GradScaler skips the "
            "step and the run continues. loss.nonfinite at STEP.",
            arg="STEP",
            required=True,
            runtime=_NanAt,
        ),
        FaultSpec(
            "attention-sharpen",
            "From optimizer step STEP (default 50) multiplies every attention's queries by a gain "
            "growing 1.25x per step (capped at 1000), the way attention logits grow in unstable "
            "runs. On tiny the max attention logit passes 100 about 28 steps in and attention is "
            "one-hot (normalised entropy ~0.01) by 40 steps in; gradient norms triple, clipping "
            "saturates and the loss stalls above the healthy run's. attention.logit_growth and "
            "attention.entropy_collapse.",
            arg="STEP",
            default=50,
            runtime=_AttentionSharpen,
        ),
        FaultSpec(
            "resume-without-scheduler",
            "At optimizer step STEP (default: the later of mid-run and end of warmup) saves a "
            "checkpoint (to checkpoint_dir, or a temporary directory), restores model, optimizer "
            "and GradScaler from it, but builds a fresh LR scheduler without its saved state, as "
            "a resume script that forgets the scheduler does: the LR drops back to the start of "
            "warmup and the schedule replays from step 0. warmup.restart at STEP.",
            arg="STEP",
            runtime=_ResumeWithoutScheduler,
        ),
    ]
}


def _usage() -> str:
    return ", ".join(spec.usage for spec in FAULTS.values())


def parse_fault(flag: str) -> Fault:
    """Parse one flag; ValueError names the flag and lists the valid ones."""
    name, sep, raw = flag.strip().partition(":")
    spec = FAULTS.get(name)
    if spec is None:
        raise ValueError(f"unknown fault {flag!r}; valid faults: {_usage()}")
    if not sep:
        if spec.required:
            raise ValueError(f"fault {flag!r} needs an argument: {spec.usage}")
        return Fault(spec, spec.default, flag)
    if spec.arg is None:
        raise ValueError(f"fault {flag!r} takes no argument: {spec.usage}")
    try:
        value = spec.arg_type(raw)
    except ValueError:
        raise ValueError(
            f"fault {flag!r}: {spec.arg} must be {'an integer' if spec.arg_type is int else 'a number'}, "
            f"got {raw!r} ({spec.usage})"
        ) from None
    if not math.isfinite(value) or value < 0 or (spec.arg_type is float and value <= 0):
        raise ValueError(f"fault {flag!r}: {spec.arg} must be positive, got {raw!r}")
    return Fault(spec, value, flag)


def parse_faults(flags: list[str]) -> list[Fault]:
    faults = [parse_fault(f) for f in flags]
    names = [f.spec.name for f in faults]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"fault(s) given more than once: {', '.join(dup)}")
    return faults


def apply_config(cfg_dict: dict[str, Any], faults: list[Fault]) -> dict[str, Any]:
    """The config dict with every fault's config edit applied (a copy)."""
    out = dict(cfg_dict)
    for f in faults:
        if f.spec.configure is not None:
            f.spec.configure(out, f.value)
    return out
