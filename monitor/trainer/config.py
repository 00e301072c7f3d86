"""TrainConfig: every knob of the reference trainer, with presets.

The field defaults are the `tiny` preset, so `TrainConfig()` is a run that finishes in seconds on a
laptop CPU. Faults are validated here (a typo fails at construction, not 100 steps into a run) but
applied by the loop, so a config always shows what the user asked for.
"""

from __future__ import annotations

import difflib
import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from monitor.trainer.faults import parse_faults

Schedule = Literal["cosine", "linear", "polynomial", "inverse_sqrt", "constant_cooldown", "constant"]
Precision = Literal["fp32", "bf16", "fp16"]
DdpBackend = Literal["gloo", "nccl"]


def healthy_warmup(max_steps: int, beta2: float) -> int:
    """Shortest warmup the monitor will not flag: >= 2/(1-beta2) steps (RAdam, Ma & Yarats: Adam's
    second-moment estimate is unreliable before then) and >= 1% of the run."""
    return min(max_steps, max(math.ceil(2.0 / (1.0 - beta2)), math.ceil(0.01 * max_steps)))


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # --- model -----------------------------------------------------------------------------------
    n_layer: int = Field(2, ge=1, description="Number of transformer blocks.")
    n_head: int = Field(4, ge=1, description="Attention heads per block; must divide n_embd.")
    n_embd: int = Field(64, ge=1, description="Residual stream width.")
    block_size: int = Field(64, ge=2, description="Context length in tokens (sequence length of a batch).")
    post_ln: bool = Field(
        False,
        description="Post-LN blocks (LayerNorm after each residual add, original Transformer) instead of "
        "the default pre-LN (GPT-2); post-LN needs warmup more badly.",
    )
    dropout: float = Field(
        0.0, ge=0.0, lt=1.0, description="Dropout probability (0 keeps runs bitwise reproducible)."
    )

    # --- data ------------------------------------------------------------------------------------
    data: Literal["synthetic", "text"] = Field(
        "synthetic",
        description="'synthetic': sequences of fixed random motifs (learnable in a few hundred steps, no "
        "files); 'text': character-level text from text_paths.",
    )
    text_paths: list[str] | None = Field(
        None,
        description="Files or directories (their *.py, *.txt, *.md, *.rst files, sorted) for data='text'. "
        "Default: the top-level *.py sources of Python's standard library.",
    )
    text_max_bytes: int = Field(2_000_000, ge=1, description="Read at most this many bytes of text corpus.")
    synthetic_vocab: int = Field(256, ge=4, description="Vocabulary size of the synthetic data.")

    # --- batch and length ------------------------------------------------------------------------
    batch_size: int = Field(8, ge=1, description="Sequences per micro-batch.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches accumulated per optimizer step.")
    max_steps: int = Field(
        200, ge=1, description="Optimizer steps in the whole run (sets the schedule's length)."
    )

    # --- optimizer (AdamW, decay on >=2-D weights only, as nanoGPT) ------------------------------
    lr: float = Field(2e-3, gt=0.0, description="Peak learning rate (reached at the end of warmup).")
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW (beta1, beta2).")
    eps: float = Field(1e-8, gt=0.0, description="AdamW epsilon.")
    weight_decay: float = Field(
        0.1,
        ge=0.0,
        description="Decoupled weight decay, applied to >=2-D weights only (not biases or norms).",
    )

    # --- schedule --------------------------------------------------------------------------------
    schedule: Schedule = Field("cosine", description="LR schedule after warmup.")
    warmup_steps: int | None = Field(
        None,
        ge=0,
        description="Linear warmup length in optimizer steps. Default: the healthy minimum, "
        "max(2/(1-beta2), 1% of max_steps).",
    )
    min_lr_ratio: float = Field(
        0.1,
        ge=0.0,
        le=1.0,
        description="Final LR as a fraction of the peak (cosine, linear, polynomial, cooldown).",
    )
    poly_power: float = Field(2.0, gt=0.0, description="Exponent of the polynomial decay.")
    cooldown_frac: float = Field(
        0.2,
        ge=0.0,
        le=1.0,
        description="Fraction of max_steps spent in the final linear cooldown (constant_cooldown).",
    )

    # --- numerics --------------------------------------------------------------------------------
    grad_clip: float = Field(1.0, ge=0.0, description="Max global gradient L2 norm; 0 disables clipping.")
    precision: Precision = Field(
        "fp32",
        description="Autocast dtype: 'fp32' (no autocast), 'bf16' (no loss scaling needed) or 'fp16' "
        "(GradScaler enabled).",
    )
    scaler_init_scale: float = Field(
        65536.0, gt=0, description="GradScaler's initial loss scale (fp16); larger values calibrate down by skipping steps."
    )
    scaler_growth_interval: int = Field(
        2000, ge=1, description="Good steps before GradScaler doubles its scale (each doubling may cost a skipped step)."
    )
    device: str = Field("cpu", description="Torch device, e.g. 'cpu', 'cuda', 'cuda:1'.")
    seed: int = Field(1337, description="Seeds model init, data and dropout; same seed, same bits.")

    # --- DDP (used when launched under torchrun, e.g. `monitor train --nproc 2`) --------------------
    ddp_backend: DdpBackend | None = Field(
        None,
        description="torch.distributed backend under torchrun. Default: nccl on CUDA, gloo on CPU; gloo also "
        "lets several ranks share one GPU.",
    )
    ddp_timeout_s: float = Field(
        600.0,
        gt=0.0,
        description="Process-group timeout in seconds (init and collectives): how long ranks wait for a hung "
        "or crashed rank before failing.",
    )

    # --- checkpoints -----------------------------------------------------------------------------
    checkpoint_dir: str | None = Field(None, description="Directory for checkpoints; None disables them.")
    checkpoint_every: int = Field(
        0,
        ge=0,
        description="Save every N optimizer steps (0: only at the end of the run) when checkpoint_dir is set.",
    )
    resume: bool = Field(False, description="Continue from the latest checkpoint in checkpoint_dir.")
    resume_scheduler: bool = Field(
        True, description="On resume, restore the LR scheduler's state too; false builds it fresh, as a resume "
        "script that forgets the scheduler does (the warmup replays: warmup.restart).",
    )

    # --- fault injection and output --------------------------------------------------------------
    faults: list[str] = Field(
        default_factory=list,
        description="Faults to inject, e.g. ['no-warmup', 'nan-at:120']; see monitor.trainer.FAULTS.",
    )
    log_every: int = Field(10, ge=1, description="Progress line (and the loss sync it needs) every N steps.")

    @field_validator("betas")
    @classmethod
    def _check_betas(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= b < 1.0 for b in v):
            raise ValueError(f"betas must be in [0, 1), got {v}")
        return v

    @field_validator("faults")
    @classmethod
    def _check_faults(cls, v: list[str]) -> list[str]:
        parse_faults(v)  # raises ValueError naming the bad flag
        return v

    @model_validator(mode="after")
    def _derive(self) -> TrainConfig:
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.resume and not self.checkpoint_dir:
            raise ValueError("resume=True needs checkpoint_dir")
        if self.warmup_steps is None:
            self.warmup_steps = healthy_warmup(self.max_steps, self.betas[1])
        return self

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> TrainConfig:
        """The preset `name` with fields replaced by `overrides`."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
        unknown = [k for k in overrides if k not in cls.model_fields]
        if unknown:
            hints = []
            for k in unknown:
                close = difflib.get_close_matches(k, cls.model_fields, n=1)
                hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            raise ValueError(f"unknown TrainConfig field(s): {', '.join(hints)}")
        return cls(**{**PRESETS[name], **overrides})


# Presets only list what differs from the field defaults (which are `tiny`).
PRESETS: dict[str, dict[str, Any]] = {
    # ~0.1M params; 200 steps in ~10 s on a 2-core CPU. Tests and `monitor demo`.
    "tiny": {},
    # ~0.8M params; the overhead benchmark's workload on CPU.
    "small": {
        "n_layer": 4,
        "n_head": 4,
        "n_embd": 128,
        "block_size": 128,
        "batch_size": 16,
        "max_steps": 300,
        "lr": 1e-3,
    },
    # ~11M params, char-level text, bf16 autocast: a GPU run (pass device='cuda').
    "medium": {
        "n_layer": 6,
        "n_head": 6,
        "n_embd": 384,
        "block_size": 256,
        "batch_size": 32,
        "max_steps": 2000,
        "lr": 1e-3,
        "data": "text",
        "precision": "bf16",
        "log_every": 50,
    },
    # GPT-2 124M-shaped (12 layers x 768, 1024 tokens, GPT-2's vocabulary size, tied embeddings), bf16:
    # the GPU check's device-bound workload (pass device='cuda'), where the monitor's share must be tiny.
    "gpt2": {
        "n_layer": 12,
        "n_head": 12,
        "n_embd": 768,
        "block_size": 1024,
        "synthetic_vocab": 50257,
        "batch_size": 16,
        "max_steps": 300,
        "lr": 6e-4,
        "precision": "bf16",
        "log_every": 50,
    },
}
