"""The monitor on a torch.compile'd model: the same graphs, recompiles and CUDA-graph recordings as without it.

    python scripts/compile_check.py --device cuda [--mode reduce-overhead] [--steps 30] [--observe]

Trains a small SDPA transformer twice in one process, compiled after attach (nanoGPT's order), without
and with the monitor, and compares dynamo's and inductor's counters (graph breaks, unique graphs,
recompiles, every `cudagraph*` counter: skips and re-recordings), the losses (bitwise), and the
monitor's records (one per step, the model's loss). With `--observe` the attention layers also call
mon.observe_attention, and the records must carry attention statistics on sampled steps; its custom op
runs on the host, which a CUDA graph cannot replay, so there the `cudagraph*` counters are reported, not
compared. Prints one `PASS compile-check ...` or `FAIL compile-check ...` line; exit 0 on PASS. On CPU
`--mode default` (CUDA graphs need a GPU).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import monitor  # noqa: E402
from monitor.runlog.reader import read_run  # noqa: E402

VOCAB, T, D, H = 64, 32, 64, 4


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln, self.qkv, self.proj, self.mon = nn.LayerNorm(D), nn.Linear(D, 3 * D), nn.Linear(D, D), None

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = (z.view(b, t, H, d // H).transpose(1, 2) for z in self.qkv(self.ln(x)).chunk(3, -1))
        if self.mon is not None:
            self.mon.observe_attention(q, k, is_causal=True)
        return x + self.proj(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb, self.blocks, self.head = nn.Embedding(VOCAB, D), nn.ModuleList([Block(), Block()]), nn.Linear(D, VOCAB)

    def forward(self, x, y):
        h = self.emb(x)
        for blk in self.blocks:
            h = blk(h)
        logits = self.head(h)
        return logits, F.cross_entropy(logits.view(-1, VOCAB), y.view(-1))


def run(device: torch.device, mode: str, steps: int, run_dir: Path | None, observe: bool = False
        ) -> tuple[dict, list[float], object]:
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = Net().to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    mon = None
    if run_dir is not None:
        mon = monitor.attach(model, opt, run_dir=run_dir, max_steps=steps,
                             config={"metrics": {"enabled": False}, "console": {"enabled": False},
                                     "attention": {"every": 5, "max_every": 5}})
        for blk in model.blocks:
            blk.mon = mon if observe else None
    compiled = torch.compile(model, mode=mode)
    g = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        x = torch.randint(0, VOCAB, (8, T), generator=g).to(device)
        _, loss = compiled(x, torch.roll(x, -1, 1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    seen = {"graph_breaks": sum(counters["graph_break"].values()), "unique_graphs": counters["stats"]["unique_graphs"],
            "recompiles": sum(counters["recompiles"].values()),
            **{k: v for k, v in counters["inductor"].items() if "cudagraph" in k}}
    if mon is not None:
        mon.close()
    return seen, losses, mon


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--mode", default=None, help="torch.compile mode (default: reduce-overhead on CUDA, default on CPU)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--observe", action="store_true", help="mon.observe_attention in the attention layers")
    a = ap.parse_args()
    device = torch.device(a.device)
    if device.type == "cpu":
        # Inductor's CPU kernels split reductions across threads in an order that varies from run to run:
        # with one thread two unmonitored runs agree bitwise, the baseline the comparison needs.
        torch.set_num_threads(1)
    mode = a.mode or ("reduce-overhead" if device.type == "cuda" else "default")
    plain, plain_losses, _ = run(device, mode, a.steps, None)
    with tempfile.TemporaryDirectory() as tmp:
        seen, losses, mon = run(device, mode, a.steps, Path(tmp) / "run", a.observe)
        recs = read_run(mon.run_dir).records[0]
    problems = []
    compared = {k: v for k, v in seen.items() if not (a.observe and k.startswith("cudagraph"))}
    if compared != {k: v for k, v in plain.items() if k in compared} or set(plain) - set(seen):
        problems.append(f"counters differ: without {plain}, with {seen}")
    if losses != plain_losses:
        problems.append("losses differ from the unmonitored run")
    if [r.step for r in recs] != list(range(a.steps)):
        problems.append(f"records for steps {[r.step for r in recs][:5]}... (want 0..{a.steps - 1})")
    elif any(abs(r.loss - x) > 1e-5 * abs(x) for r, x in zip(recs, losses)):
        problems.append("recorded losses differ from the model's")
    if a.observe and [r.step for r in recs if r.attention] != list(range(0, a.steps, 5)):
        problems.append(f"attention statistics on steps {[r.step for r in recs if r.attention]}")
    if mon.internal_errors:
        problems.append(f"{mon.internal_errors} internal errors")
    verdict = "FAIL" if problems else "PASS"
    print(f"{verdict} compile-check device={device} mode={mode} steps={a.steps} observe={a.observe} counters={seen}"
          + ("" if not problems else " problems: " + "; ".join(problems)))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
