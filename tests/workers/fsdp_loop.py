"""FSDP 1 and 2 on CPU with gloo, monitored: what the clip paths give the monitor.

    torchrun --standalone --nproc-per-node 2 tests/workers/fsdp_loop.py OUT_DIR

Runs four short loops one after another in one process group, each with its own monitor and run
directory OUT_DIR/<variant>: FSDP1's own clip_grad_norm_, FSDP1 clipped with torch.nn.utils'
(which sees only this rank's shards), FSDP2 through torch.nn.utils.clip_grad_norm_, and FSDP2
without clipping. Each rank writes OUT_DIR/rank<N>.json: per variant, the norms the loop's clip
calls returned (the global truth where the clip path computes it).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import VOCAB, TinyLM  # noqa: E402

STEPS = 4


def build(variant: str):
    torch.manual_seed(0)
    model = TinyLM()
    if variant.startswith("fsdp1"):
        from torch.distributed.fsdp import FullyShardedDataParallel

        return FullyShardedDataParallel(model, device_id=torch.device("cpu"))
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for m in (model.emb, model.head):
        fully_shard(m, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def clip(variant: str, model) -> float | None:
    if variant == "fsdp1":
        return model.clip_grad_norm_(0.05).item()
    if variant == "fsdp1-plain-clip":
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
        return None
    if variant == "fsdp2":
        total = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
        return total.full_tensor().item()
    return None


def main() -> None:
    import monitor

    out = Path(sys.argv[1])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    g = torch.Generator().manual_seed(100 + rank)
    result = {}
    for variant in ("fsdp1", "fsdp1-plain-clip", "fsdp2", "fsdp2-no-clip"):
        model = build(variant)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        cfg = {"metrics": {"enabled": False}, "console": {"enabled": False}, "collector": {"param_norms_every": 1}}
        mon = monitor.attach(model, opt, run_dir=out / variant, config=cfg)
        norms = []
        for _ in range(STEPS):
            x = torch.randint(0, VOCAB, (4, 8), generator=g)
            model(x, torch.roll(x, -1, dims=1))[1].backward()
            norms.append(clip(variant, model))
            opt.step()
            opt.zero_grad()
        mon.flush()
        mon.close()
        result[variant] = {"norms": norms, "internal_errors": mon.internal_errors}
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
