"""DDP for the reference trainer: the process group inside each rank, and torchrun from the outside.

Inside a rank (`train()` under torchrun): `DistContext.from_env()` reads RANK/WORLD_SIZE/LOCAL_RANK,
`init()` creates the process group (gloo on CPU, nccl on CUDA unless TrainConfig.ddp_backend says
otherwise) and picks the CUDA device by LOCAL_RANK, `close()` destroys it. A process group the
caller created already is used as is and left alone.

From the outside (`monitor train --nproc N`): `torchrun_command()` builds
`python -m torch.distributed.run --standalone --nproc-per-node N ...` and `run_torchrun()` runs it,
forwarding Ctrl-C and returning its exit code. No home-made launcher: torchrun does rendezvous,
environment and teardown.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import NoReturn

import torch

_ENV = ("RANK", "WORLD_SIZE")


def under_torchrun(environ: Mapping[str, str] | None = None) -> bool:
    """True when torchrun (or another launcher with its conventions) started this process."""
    env = os.environ if environ is None else environ
    return all(env.get(k, "").strip() for k in _ENV)


def exit_rank(code: int) -> NoReturn:
    """End a rank process now that its work is written: without interpreter finalization, where
    gloo's worker threads can still abort a process whose run succeeded (SIGABRT, "terminate called
    without an active exception"; seen in about 1 of 100 two-rank CPU runs here, with the process
    group destroyed). torchrun would report that rank, and the whole job, as failed."""
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)


def env_world_size(environ: Mapping[str, str] | None = None) -> int:
    env = os.environ if environ is None else environ
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return int(env.get("WORLD_SIZE", "1") or 1) if under_torchrun(env) else 1


def _device_for(cfg_device: str, local_rank: int, distributed: bool) -> torch.device:
    device = torch.device(cfg_device)
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        raise RuntimeError(f"device {cfg_device!r} requested but CUDA is not available")
    if distributed and device.index is None:
        # One GPU per local rank; more ranks than GPUs share them round-robin (gloo only).
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
    return device


@dataclass
class DistContext:
    """This process's place in the run: rank 0 of 1 unless launched under torchrun."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    backend: str | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    _owned: bool = False  # we created the process group, so we destroy it

    @property
    def distributed(self) -> bool:
        return self.backend is not None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def init(cls, cfg_device: str, backend: str | None = None, timeout_s: float = 600.0,
             environ: Mapping[str, str] | None = None) -> DistContext:
        """Join the process group when launched under torchrun (or when one exists); else a single rank."""
        env = os.environ if environ is None else environ
        dist = torch.distributed
        initialized = dist.is_available() and dist.is_initialized()
        if not initialized and not under_torchrun(env):
            return cls(device=_device_for(cfg_device, 0, False))
        if not dist.is_available():
            raise RuntimeError("launched under torchrun but this torch build has no torch.distributed")
        local_rank = int(env.get("LOCAL_RANK", "0") or 0)
        device = _device_for(cfg_device, local_rank, True)
        if device.type == "cuda":
            torch.cuda.set_device(device)  # before the process group: nccl binds to the current device
        owned = False
        if not initialized:
            backend = backend or ("nccl" if device.type == "cuda" else "gloo")
            if backend == "nccl" and device.type != "cuda":
                raise ValueError("ddp_backend 'nccl' needs device cuda; use gloo on CPU")
            local_world = int(env.get("LOCAL_WORLD_SIZE", env.get("WORLD_SIZE", "1")) or 1)
            if backend == "nccl" and local_world > torch.cuda.device_count():
                raise ValueError(
                    f"nccl needs one GPU per rank: {local_world} ranks on {torch.cuda.device_count()} GPU(s) "
                    "on this machine; use ddp_backend gloo (--ddp-backend gloo) to share GPUs between ranks"
                )
            kwargs = {"device_id": device} if backend == "nccl" else {}
            dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s), **kwargs)
            owned = True
        return cls(rank=dist.get_rank(), local_rank=local_rank, world_size=dist.get_world_size(),
                   backend=str(dist.get_backend()), device=device, _owned=owned)

    def barrier(self) -> None:
        if self.distributed:
            if self.backend == "nccl":
                torch.distributed.barrier(device_ids=[self.device.index])
            else:
                torch.distributed.barrier()

    def gather_objects(self, obj: object) -> list[object]:
        """`obj` from every rank, in rank order (a collective: every rank must call it)."""
        if not self.distributed:
            return [obj]
        out: list[object] = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj)
        return out

    def close(self) -> None:
        if self._owned and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        self._owned = False


def batch_index(step: int, micro: int, grad_accum: int, rank: int = 0, world_size: int = 1) -> int:
    """Index of the batch rank `rank` of `world_size` takes at micro-batch `micro` of optimizer step `step`.

    Consecutive indices are dealt round-robin to the ranks, so the union over ranks is the same
    deterministic stream whatever the rank count, and one rank is exactly the single-process run.
    """
    return (step * grad_accum + micro) * world_size + rank


# --- torchrun from the outside ---------------------------------------------------------------------


def torchrun_command(nproc: int, entry: Sequence[str], *, python: str | None = None) -> list[str]:
    """`python -m torch.distributed.run --standalone --nproc-per-node N <entry...>`; entry is
    `['-m', 'module', args...]` or `['script.py', args...]`."""
    if nproc < 1:
        raise ValueError(f"nproc must be at least 1, got {nproc}")
    return [python or sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            *entry]


def torchrun_env(nproc: int, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The launcher's environment: ours, OMP threads split between ranks (torchrun would force 1 and
    say so), and `extra` (e.g. MONITOR_RUN_DIR, shared by every rank)."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    env.update(extra or {})
    return env


def run_torchrun(cmd: Sequence[str], env: Mapping[str, str] | None = None, grace_s: float = 30.0) -> int:
    """Run torchrun and return its exit code. Ctrl-C reaches torchrun (same process group on a
    terminal, forwarded otherwise), which stops the ranks; we wait for that, up to grace_s."""
    proc = subprocess.Popen(list(cmd), env=dict(env) if env is not None else None)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            proc.terminate()
            try:
                proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        raise
