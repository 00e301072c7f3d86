"""The reference trainer's progress: a rich bar on a terminal, a plain line every log_every steps
otherwise (what the tests and CI logs read), nothing when quiet or on ranks other than 0."""

from __future__ import annotations

import sys
import time
from typing import Any

from monitor.trainer.config import TrainConfig


class Progress:
    """Rich bar on a terminal, a plain line every log_every steps otherwise, nothing when quiet."""

    def __init__(self, mode: str, cfg: TrainConfig, start: int) -> None:
        self.mode, self.cfg, self.start = mode, cfg, start
        self.t0 = time.perf_counter()
        self.bar: Any = None
        if mode == "rich":
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.bar = Progress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}  lr {task.fields[lr]}  {task.fields[sps]} steps/s"),
                TimeElapsedColumn(),
            )
            self.task = self.bar.add_task(
                "train", total=cfg.max_steps, completed=start, loss="-", lr="-", sps="-"
            )
            self.bar.start()

    def message(self, text: str) -> None:
        if self.mode == "rich":
            self.bar.console.print(text)
        elif self.mode == "plain":
            print(text, flush=True)

    def wants_loss(self, step: int) -> bool:
        return self.mode != "quiet" and (
            (step + 1) % self.cfg.log_every == 0 or step + 1 == self.cfg.max_steps
        )

    def update(self, step: int, lr: float, loss: float | None) -> None:
        if self.mode == "quiet":
            return
        sps = (step + 1 - self.start) / max(time.perf_counter() - self.t0, 1e-9)
        if self.mode == "rich":
            fields = {"lr": f"{lr:.2e}", "sps": f"{sps:.1f}"}
            if loss is not None:
                fields["loss"] = f"{loss:.4f}"
            self.bar.update(self.task, completed=step + 1, **fields)
        elif loss is not None:
            print(
                f"step {step + 1:>6}/{self.cfg.max_steps} | loss {loss:.4f} | lr {lr:.3e} | {sps:.1f} steps/s",
                flush=True,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def progress_mode(progress: bool | None, rank: int = 0) -> str:
    if progress is False or rank != 0:  # under DDP only rank 0 reports
        return "quiet"
    return "rich" if sys.stdout.isatty() else "plain"
