"""The training loop, in the shape users write (nanoGPT): accumulate, unscale, clip, step, schedule.

The loop itself never syncs with the device except for its progress line every `log_every` steps:
per-step losses and gradient norms are written into preallocated device tensors and read back once
at the end.

Under torchrun the same loop runs DDP: every rank builds the same model, wraps it in
DistributedDataParallel, takes its own share of the batches (`launch.batch_index`), skips the
gradient all-reduce with `no_sync()` on all but the last micro-batch of a step, and attaches the
monitor with the same call. Rank 0 prints progress and writes checkpoints.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from monitor.trainer.config import TrainConfig
from monitor.trainer.data import build_data
from monitor.trainer.faults import Fault, FaultRuntime, apply_config, check_world, parse_faults
from monitor.trainer.launch import DistContext, batch_index, env_world_size
from monitor.trainer.model import GPT, GPTConfig
from monitor.trainer.progress import Progress, progress_mode
from monitor.trainer.schedules import ScheduleSpec, build_scheduler

_CKPT = re.compile(r"ckpt_(\d+)\.pt$")


@dataclass
class StepInfo:
    """Passed to `on_step` after every optimizer step. `loss` is a device tensor (reading it syncs)."""

    step: int  # 0-based index of the optimizer step just done
    lr: float  # LR of param group 0 used by that step
    loss: torch.Tensor  # mean micro-batch loss of the step, detached
    run: _Run


@dataclass
class TrainResult:
    config: TrainConfig  # the effective config: faults' edits applied
    start_step: int  # > 0 when resumed from a checkpoint
    steps: int  # optimizer steps run by this call (GradScaler-skipped ones included)
    losses: list[float]  # per optimizer step: mean of its micro-batch losses
    lrs: list[float]  # per optimizer step: LR of param group 0 that the step used
    grad_norms: list[float]  # per optimizer step, before clipping; empty when clipping is off
    skipped_steps: int  # steps GradScaler skipped (non-finite gradients)
    loss_scale: float | None  # final GradScaler scale; None unless fp16
    wall_time_s: float
    param_hash: str  # sha256 of the final state_dict's bytes
    model: GPT
    run_dir: Path | None = None  # the monitor's run directory when attached
    alerts: list[Any] = field(default_factory=list)  # monitor alerts raised in this process
    stopped_early: bool = False  # on_step asked to stop
    rank: int = 0  # this process's rank under DDP (losses above are this rank's own)
    world_size: int = 1

    @property
    def first_loss(self) -> float:
        return self.losses[0] if self.losses else float("nan")

    @property
    def final_loss(self) -> float:
        return self.losses[-1] if self.losses else float("nan")


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    # nanoGPT's split: decay matrices and embeddings, never biases or LayerNorm gains.
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)


def param_hash(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(name.encode())
        h.update(ctypes.string_at(t.data_ptr(), t.numel() * t.element_size()))
    return h.hexdigest()


def latest_checkpoint(directory: str | Path) -> Path | None:
    found = [(int(m.group(1)), p) for p in Path(directory).glob("ckpt_*.pt") if (m := _CKPT.search(p.name))]
    return max(found)[1] if found else None


class _Run:
    """Everything a step needs, plus the checkpoint helpers the faults use."""

    def __init__(self, cfg: TrainConfig, device: torch.device, dist: DistContext | None = None) -> None:
        self.cfg = cfg
        self.device = device
        self.dist = dist or DistContext(device=device)
        self.rank, self.world_size = self.dist.rank, self.dist.world_size
        self.data = build_data(cfg, device)
        gcfg = GPTConfig(
            vocab_size=self.data.vocab_size,
            block_size=cfg.block_size,
            n_layer=cfg.n_layer,
            n_head=cfg.n_head,
            n_embd=cfg.n_embd,
            dropout=cfg.dropout,
            post_ln=cfg.post_ln,
        )
        self.model = GPT(gcfg, seed=cfg.seed).to(device)
        self.optimizer = build_optimizer(self.model, cfg)
        # Always a GradScaler, enabled only for fp16, as nanoGPT does: one code path for all precisions.
        self.scaler = torch.amp.GradScaler(device.type, init_scale=cfg.scaler_init_scale,
                                           growth_interval=cfg.scaler_growth_interval, enabled=cfg.precision == "fp16")
        self.schedule = ScheduleSpec.from_config(cfg)
        self.scheduler = self.new_scheduler()
        self.scheduler_per_microbatch = False  # the per-microbatch-scheduler fault sets it
        self._tmp: tempfile.TemporaryDirectory | None = None

    def new_scheduler(self) -> torch.optim.lr_scheduler.LambdaLR:
        return build_scheduler(self.optimizer, self.schedule)

    @property
    def checkpoint_dir(self) -> Path:
        if self.cfg.checkpoint_dir:
            return Path(self.cfg.checkpoint_dir)
        if self._tmp is None:  # a fault needs a checkpoint but the user configured none
            self._tmp = tempfile.TemporaryDirectory(prefix="trainmon-ckpt-")
        return Path(self._tmp.name)

    def save_checkpoint(self, step: int) -> Path:
        """Save the state after `step` completed optimizer steps; written atomically.

        Under DDP every rank must call it (it gathers each rank's RNG state); rank 0 writes the
        file, as the state is identical on every rank, and the others wait at a barrier so that
        nobody reads it early. A private temporary directory (a fault needs a checkpoint, none is
        configured) is per rank: each rank writes its own.
        """
        rng = torch.get_rng_state()  # dropout; data has its own per-batch generators
        rng_cuda = torch.cuda.get_rng_state_all() if self.device.type == "cuda" else []
        by_rank = self.dist.gather_objects((rng, rng_cuda)) if self.world_size > 1 else None
        d = self.checkpoint_dir
        path = d / f"ckpt_{step:07d}.pt"
        if self.rank == 0 or self._tmp is not None:
            d.mkdir(parents=True, exist_ok=True)
            state = {
                "step": step,
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "rng_cpu": rng,
                "rng_cuda": rng_cuda,
                "config": self.cfg.model_dump(mode="json"),
            }
            if by_rank is not None:
                state["rng_ranks"] = [{"cpu": c, "cuda": g} for c, g in by_rank]
            tmp = path.with_suffix(".tmp")
            torch.save(state, tmp)
            tmp.replace(path)
        self.dist.barrier()
        return path

    def load_checkpoint(self, path: Path, *, load_scheduler: bool = True) -> int:
        """Restore state in place (the monitor's hooks stay on these objects); returns the step."""
        state = torch.load(path, map_location=self.device, weights_only=True)
        self.model.load_state_dict(state["model"])
        # Optimizer before scheduler: the optimizer's state restores each group's lr, which a
        # scheduler built or loaded after it must not overwrite.
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        if load_scheduler:
            self.scheduler.load_state_dict(state["scheduler"])
        rng_cpu, rng_cuda = state["rng_cpu"], state["rng_cuda"]
        ranks = state.get("rng_ranks") or []
        if len(ranks) == self.world_size and self.world_size > 1:  # the same DDP layout: this rank's own
            rng_cpu, rng_cuda = ranks[self.rank]["cpu"], ranks[self.rank]["cuda"]
        torch.set_rng_state(rng_cpu.cpu())
        if rng_cuda and self.device.type == "cuda":
            torch.cuda.set_rng_state_all([s.cpu() for s in rng_cuda])
        return int(state["step"])

    def cleanup(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


def train(
    cfg: TrainConfig,
    *,
    run_dir: str | Path | None = None,
    monitor_config: Any = None,
    attach_monitor: bool = True,
    progress: bool | None = None,
    on_step: Callable[[StepInfo], bool | None] | None = None,
    on_attach: Callable[[Any], None] | None = None,
) -> TrainResult:
    """Train the reference GPT as `cfg` says, monitored unless attach_monitor=False.

    `on_step(info)` runs after every optimizer step; returning True stops the run there (a
    checkpoint is written when checkpoint_dir is set). `on_attach(mon)` receives the Monitor right
    after attach (the CLI prints its endpoint). Same config and seed give bitwise the same
    parameters, monitored or not.

    Under torchrun (RANK and WORLD_SIZE set) it joins the process group and trains DDP; every rank
    calls it with the same config and the same `run_dir`, and `on_step` must then decide the same
    way on every rank (a rank that stops alone leaves the others waiting in the all-reduce).
    """
    t_start = time.perf_counter()
    faults = parse_faults(cfg.faults)
    cfg = TrainConfig.model_validate(apply_config(cfg.model_dump(), faults))
    check_world(faults, env_world_size())  # before the process group: a clear error, not a hang
    dist = DistContext.init(cfg.device, cfg.ddp_backend, cfg.ddp_timeout_s)
    try:
        return _train(cfg, faults, dist, t_start, run_dir=run_dir, monitor_config=monitor_config,
                      attach_monitor=attach_monitor, progress=progress, on_step=on_step, on_attach=on_attach)
    finally:
        dist.close()


def _train(
    cfg: TrainConfig,
    faults: list[Fault],
    dist: DistContext,
    t_start: float,
    *,
    run_dir: str | Path | None,
    monitor_config: Any,
    attach_monitor: bool,
    progress: bool | None,
    on_step: Callable[[StepInfo], bool | None] | None,
    on_attach: Callable[[Any], None] | None,
) -> TrainResult:
    device = dist.device
    torch.manual_seed(cfg.seed + dist.rank)  # dropout's stream; init and data use their own generators
    run = _Run(cfg, device, dist)
    start, note = 0, None
    if cfg.resume:
        ckpt = latest_checkpoint(cfg.checkpoint_dir)
        if ckpt is None:
            note = f"no checkpoint in {cfg.checkpoint_dir}; starting from scratch"
        else:
            start = run.load_checkpoint(ckpt, load_scheduler=cfg.resume_scheduler)
            if not cfg.resume_scheduler:
                run.scheduler = run.new_scheduler()  # built after the optimizer's state: its LR from step 0
            note = f"resumed from {ckpt} at step {start}" + ("" if cfg.resume_scheduler else " (scheduler not restored)")
    report = Progress(progress_mode(progress, dist.rank), cfg, start)
    if note:
        report.message(note)
    report.message(
        f"GPT {run.model.num_params() / 1e6:.2f}M params | data {cfg.data} (vocab {run.data.vocab_size}) | "
        f"{cfg.precision} on {device} | {cfg.max_steps} steps x {cfg.grad_accum} x {cfg.batch_size}x{cfg.block_size}"
        + (f" | DDP {dist.world_size} ranks ({dist.backend})" if dist.distributed else "")
        + (f" | faults: {', '.join(cfg.faults)}" if cfg.faults else "")
    )

    runtimes: list[FaultRuntime] = [f.spec.runtime(f.value) for f in faults if f.spec.runtime is not None]
    for rt in runtimes:
        rt.install(run)

    model, optimizer, scaler = run.model, run.optimizer, run.scaler
    ddp: torch.nn.parallel.DistributedDataParallel | None = None
    if dist.distributed:
        # Broadcasts rank 0's parameters and buffers; all-reduces (averages) gradients in backward.
        ddp = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    fwd = ddp if ddp is not None else model
    autocast = (
        contextlib.nullcontext()
        if cfg.precision == "fp32"
        else torch.autocast(device.type, dtype=torch.bfloat16 if cfg.precision == "bf16" else torch.float16)
    )
    clip = cfg.grad_clip > 0
    n = cfg.max_steps - start
    losses = torch.zeros(n, device=device)
    norms = torch.zeros(n if clip else 0, device=device)
    lrs: list[float] = []
    applied_before = _optimizer_steps(optimizer)
    mon = None
    stopped = False
    done = 0
    try:
        if attach_monitor:
            import monitor

            scheduler = run.scheduler
            mon = monitor.attach(
                fwd,
                optimizer,
                scaler=scaler,
                scheduler=scheduler,
                run_dir=run_dir,
                config=monitor_config,
                max_steps=cfg.max_steps,
            )
            if on_attach is not None:
                on_attach(mon)
        model.train()
        last_micro = cfg.grad_accum - 1
        for step in range(start, cfg.max_steps):
            i = step - start
            for rt in runtimes:
                rt.before_step(run, step)
            lr = optimizer.param_groups[0]["lr"]
            for micro in range(cfg.grad_accum):
                for rt in runtimes:
                    rt.before_micro(run, step, micro)
                x, y = run.data.batch(batch_index(step, micro, cfg.grad_accum, dist.rank, dist.world_size))
                # DDP all-reduces gradients only on the last micro-batch; the others accumulate locally.
                with ddp.no_sync() if ddp is not None and micro < last_micro else contextlib.nullcontext():
                    with autocast:
                        _, loss = fwd(x, y)
                        # Scaled so the accumulated gradient is the mean over micro-batches.
                        loss = loss / cfg.grad_accum
                    losses[i].add_(loss.detach())
                    for rt in runtimes:
                        rt.before_backward(run, step, micro)
                    scaler.scale(loss).backward()
                if run.scheduler_per_microbatch:
                    run.scheduler.step()  # the bug the fault reproduces
            if clip:
                scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
                norms[i].copy_(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip))
            scaler.step(optimizer)  # skipped when fp16 gradients are not finite
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            if not run.scheduler_per_microbatch:
                run.scheduler.step()
            lrs.append(lr)
            done = i + 1
            report.update(step, lr, losses[i].item() if report.wants_loss(step) else None)
            if cfg.checkpoint_dir and cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0:
                run.save_checkpoint(step + 1)
            if on_step is not None and on_step(StepInfo(step, lr, losses[i], run)):
                stopped = True
                break
        if cfg.checkpoint_dir and not (cfg.checkpoint_every and (start + done) % cfg.checkpoint_every == 0):
            run.save_checkpoint(start + done)
        if done:
            report.message(
                f"done: {done} steps in {time.perf_counter() - t_start:.1f} s, "
                f"loss {losses[0].item():.4f} -> {losses[done - 1].item():.4f}"
                + (" (rank 0)" if dist.distributed else "")
            )
    finally:
        report.close()
        for rt in runtimes:
            rt.remove()
        run.cleanup()
        if mon is not None:
            mon.close()

    return TrainResult(
        config=cfg,
        start_step=start,
        steps=done,
        losses=losses[:done].tolist(),
        lrs=lrs,
        grad_norms=norms[:done].tolist(),
        skipped_steps=done - (_optimizer_steps(optimizer) - applied_before),
        loss_scale=scaler.get_scale() if scaler.is_enabled() else None,
        wall_time_s=time.perf_counter() - t_start,
        param_hash=param_hash(model),
        model=model,
        run_dir=Path(mon.run_dir) if mon is not None and getattr(mon, "run_dir", None) else None,
        alerts=list(getattr(mon, "alerts", [])) if mon is not None else [],
        stopped_early=stopped,
        rank=dist.rank,
        world_size=dist.world_size,
    )


def _optimizer_steps(optimizer: torch.optim.Optimizer) -> int:
    """Updates AdamW has applied (its per-parameter step count); GradScaler skips do not count."""
    for state in optimizer.state.values():
        if "step" in state:
            return int(state["step"])
    return 0
