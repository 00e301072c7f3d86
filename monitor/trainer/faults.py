"""Fault injection: each flag reproduces one real training bug so the monitor has something to catch.

A flag is `name` or `name:ARG`. A fault acts in up to two ways: `configure` edits the effective
config before anything is built (no-warmup, lr-too-high), and a `FaultRuntime` installs hooks and
acts at optimizer-step boundaries (`before_step(run, step)`, steps 0-based) or around each
micro-batch (`before_micro`, `before_backward`). Adding a fault is one entry in FAULTS. The `run`
the runtime sees is the loop's `_Run` (model, optimizer, scaler, scheduler, checkpoint helpers,
`rank` and `world_size`); this module imports nothing from the loop or the config.

DDP faults (ddp-desync, straggler) act on one rank of a torchrun launch and need world size > 1;
`check_world` says so before anything is built. `hang` also works in a single process.
"""

from __future__ import annotations

import math
import threading
import time
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

    def before_micro(self, run: Any, step: int, micro: int) -> None:
        """Called before each micro-batch is fetched (where a data loader would block)."""

    def before_backward(self, run: Any, step: int, micro: int) -> None:
        """Called after each micro-batch's forward, before its backward."""

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
    needs_ddp: bool = False  # only meaningful with world size > 1 (torchrun, `monitor train --nproc N`)
    rank_arg: bool = False  # ARG is a rank, so it must be below the world size

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


class _DdpDesync(FaultRuntime):
    """On the last rank, from step STEP, adds `delta` to one weight after every optimizer update."""

    delta = 1e-3

    def install(self, run: Any) -> None:
        self.active = False
        if run.rank != run.world_size - 1:
            return
        # Installed before the monitor attaches, so this runs before the monitor's own post-step hook.
        self.target = run.model.blocks[-1].mlp.c_proj.weight
        self.handles.append(run.optimizer.register_step_post_hook(self._post_step))

    def _post_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self.active:
            with torch.no_grad():
                self.target.add_(self.delta)

    def before_step(self, run: Any, step: int) -> None:
        self.active = step >= self.value


class _Straggler(FaultRuntime):
    """Rank RANK sleeps before fetching each micro-batch: a slow input pipeline."""

    delay_s = 0.08

    def install(self, run: Any) -> None:
        self.on = run.rank == self.value

    def before_micro(self, run: Any, step: int, micro: int) -> None:
        if self.on:
            time.sleep(self.delay_s)


class _Hang(FaultRuntime):
    """The last rank blocks forever before its backward at step STEP."""

    def install(self, run: Any) -> None:
        self.on = run.rank == run.world_size - 1
        self.never = threading.Event()  # nothing sets it; Ctrl-C (SIGINT) or a kill ends the wait

    def before_backward(self, run: Any, step: int, micro: int) -> None:
        if self.on and step == self.value and micro == 0:
            self.never.wait()


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
        FaultSpec(
            "ddp-desync",
            "DDP only (world size > 1). From optimizer step STEP (default 50) the last rank adds 1e-3 "
            "to every element of one weight (the last block's MLP output projection) right after each "
            "of its optimizer updates, a silent corruption no all-reduce repairs: gradients stay "
            "averaged, so training continues and looks healthy, but that rank's parameters drift "
            "further from the other ranks' every step (1e-3 x steps since STEP). ddp.desync from "
            "STEP (parameter fingerprints differ across ranks).",
            arg="STEP",
            default=50,
            runtime=_DdpDesync,
            needs_ddp=True,
        ),
        FaultSpec(
            "straggler",
            "DDP only (world size > 1). Rank RANK (default 1) sleeps 80 ms before fetching every "
            "micro-batch, from the first step on, as a slow input pipeline would: several times a "
            "tiny or small step. The other ranks wait for it in the gradient all-reduce, so every "
            "rank's step slows down alike; only the straggler's input phase (previous step's end to its "
            "forward: the data wait) stands out. ddp.straggler names the rank and the input phase within "
            "its window.",
            arg="RANK",
            default=1,
            runtime=_Straggler,
            needs_ddp=True,
            rank_arg=True,
        ),
        FaultSpec(
            "hang",
            "At optimizer step STEP (default 50) the last rank blocks forever before its backward "
            "(a wait on an event nothing sets), as a deadlocked data loader or collective does; under "
            "DDP the other ranks then wait in the gradient all-reduce until the process group's "
            "timeout (ddp_timeout_s). Also works in a single process, where the only rank blocks. "
            "Steps 0..STEP-1 complete; no record for STEP ever arrives. run.stalled after its "
            "timeout. Stop it with Ctrl-C.",
            arg="STEP",
            default=50,
            runtime=_Hang,
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


def check_world(faults: list[Fault], world_size: int) -> None:
    """ValueError when a fault cannot act in a run of `world_size` ranks (DDP faults in one process)."""
    for f in faults:
        if f.spec.needs_ddp and world_size < 2:
            raise ValueError(
                f"fault {f.flag!r} needs DDP (world size > 1) but this run has a single process: launch it "
                f"with `monitor train --nproc 2 --fault {f.flag} ...` or under torchrun"
            )
        if f.spec.rank_arg and f.value >= world_size:
            raise ValueError(
                f"fault {f.flag!r}: {f.spec.arg} {f.value} is not a rank of this run (ranks 0..{world_size - 1})"
            )


def apply_config(cfg_dict: dict[str, Any], faults: list[Fault]) -> dict[str, Any]:
    """The config dict with every fault's config edit applied (a copy)."""
    out = dict(cfg_dict)
    for f in faults:
        if f.spec.configure is not None:
            f.spec.configure(out, f.value)
    return out
