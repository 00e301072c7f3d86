"""torch.compile: the monitor adds no graph break, recompile or guard to a compiled model, whether it is
compiled before or after attach, whole or block by block, with fullgraph=True; the records are the
same as in eager mode; mon.observe_attention works inside the compiled graph."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import monitor
from monitor.hooks.attention import ProbeSchedule
from monitor.runlog.reader import read_run

dynamo = pytest.importorskip("torch._dynamo")
from torch._dynamo.utils import counters  # noqa: E402

VOCAB = 32
CFG = {"metrics": {"enabled": False}, "console": {"enabled": False}, "attention": {"every": 2, "max_every": 2}}


class Attn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv, self.mon, self.named = nn.Linear(16, 48), None, True

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = (z.view(b, t, 2, 8).transpose(1, 2) for z in self.qkv(x).chunk(3, -1))
        if self.mon is not None:  # the user's own report, for kernels the probe cannot see
            self.mon.observe_attention(q, k, layer=self.name if self.named else None, is_causal=True)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb, self.head = nn.Embedding(VOCAB, 16), nn.Linear(16, VOCAB)
        self.blocks = nn.ModuleList([Attn(), Attn()])
        for i, blk in enumerate(self.blocks):
            blk.name = f"blocks.{i}"

    def forward(self, x, y):
        h = self.emb(x)
        for blk in self.blocks:
            h = h + blk(h)
        logits = self.head(h)
        return logits, F.cross_entropy(logits.view(-1, VOCAB), y.view(-1))


def run(tmp_path, *, monitored: bool, order: str, observe: bool = False, backend: str = "aot_eager", steps: int = 6):
    dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def compile_(m):
        return torch.compile(m, backend=backend, fullgraph=True)

    def compile_blocks():
        for i, blk in enumerate(model.blocks):
            model.blocks[i] = compile_(blk)

    called = model
    if order == "before":
        called = compile_(model)
    elif order == "blocks-before":
        compile_blocks()
    mon = monitor.attach(called, opt, run_dir=tmp_path / "run", config=CFG) if monitored else None
    if observe and mon is not None:
        for blk in model.blocks:
            blk = getattr(blk, "_orig_mod", blk)
            # Blocks compiled one by one share one code object: names by order, not one graph per name.
            blk.mon, blk.named = mon, not order.startswith("blocks")
    if order == "after":
        called = compile_(model)
    elif order == "in-place":
        model.compile(backend=backend, fullgraph=True)
    elif order == "blocks-after":
        compile_blocks()
    g = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        x = torch.randint(0, VOCAB, (4, 8), generator=g)
        _, loss = called(x, torch.roll(x, -1, 1))
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    seen = {"breaks": dict(counters["graph_break"]), "graphs": counters["stats"]["unique_graphs"],
            "recompiles": sum(counters["recompiles"].values())}
    if mon is not None:
        mon.close()
    return seen, losses, mon


ORDERS = ["after", "before", "in-place", "blocks-after", "blocks-before"]


@pytest.mark.slow
@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("observe", [False, True], ids=["plain", "observe_attention"])
def test_compiled_models_see_no_difference(tmp_path, order, observe):
    plain, plain_losses, _ = run(tmp_path / "plain", monitored=False, order=order)
    seen, losses, mon = run(tmp_path / "mon", monitored=True, order=order, observe=observe)
    assert seen == plain and seen["breaks"] == {}  # fullgraph=True would have raised on a break anyway
    assert losses == plain_losses
    recs = read_run(mon.run_dir).records[0]
    assert [r.loss for r in recs] == pytest.approx(losses, rel=1e-6)  # the model's own loss, in every order
    assert [r.micro_batches for r in recs] == [1] * 6 and all(r.tokens == 32 for r in recs)
    assert all(r.grad_norm is not None for r in recs)
    probe = json.loads((mon.run_dir / "run.json").read_text())["attention_probe"]
    assert probe["enabled"] is False and "compile" in probe["off"] and "observe_attention" in probe["off"]
    if observe:  # sampled steps only, both layers, real statistics
        assert [r.step for r in recs if r.attention] == [0, 2, 4]
        names = {"blocks.0", "blocks.1"} if not order.startswith("blocks") else {"attention.0", "attention.1"}
        assert set(recs[0].attention) == names
        assert all(0 < s["entropy_ratio"] <= 1 for s in recs[0].attention.values())
    else:
        assert not any(r.attention for r in recs)
    assert mon.internal_errors == 0


@pytest.mark.slow
def test_inductor_keeps_the_monitor_s_calls(tmp_path):
    """Inductor, compiled after attach: the hooks' reports and observe_attention's op survive codegen."""
    plain, plain_losses, _ = run(tmp_path / "plain", monitored=False, order="after", backend="inductor", steps=4)
    seen, losses, mon = run(tmp_path / "mon", monitored=True, order="after", observe=True, backend="inductor",
                            steps=4)
    assert seen == plain and losses == plain_losses
    recs = read_run(mon.run_dir).records[0]
    assert [r.loss for r in recs] == pytest.approx(losses, rel=1e-6)
    assert [r.step for r in recs if r.attention] == [0, 2]


@pytest.mark.slow
def test_compile_is_restored_when_the_last_monitor_closes(tmp_path):
    original = torch.compile
    model = Net()
    mon = monitor.attach(model, torch.optim.SGD(model.parameters(), lr=0.1), run_dir=tmp_path / "r", config=CFG)
    assert torch.compile is original or torch.compile.__wrapped__ is original
    mon.close()
    assert torch.compile is original


@pytest.mark.parametrize("max_every, cost, off", [
    (64, 0.5, True),    # 0.5 s a probe against 10 ms steps: over the budget even every 64 steps
    (64, 0.001, False),  # 1 ms every 64 steps of 10 ms: within 0.5%
    (2, 0.5, False),     # max_every == every pins the interval: the user's choice, not enforced
])
def test_a_probe_whose_cost_cannot_be_bounded_is_switched_off(max_every, cost, off):
    sched = ProbeSchedule(2, max_every, 0.005)
    for step in range(2000):
        if sched.due(step):
            sched.probed(step, cost)
        else:
            sched.plain_step(0.01)
    assert bool(sched.off) == off
    if off:
        assert not sched.due(10**6) and "attention.max_every" in sched.off
        assert sched.samples == ProbeSchedule.OVER_BUDGET + sched.samples - ProbeSchedule.OVER_BUDGET


def test_a_mask_is_cut_to_the_sequences_only_along_its_batch_dimension():
    """observe_attention inside a graph slices the first sequences: a (heads, queries, keys) mask beside a
    4-d q broadcasts over the batch, and cutting its first dimension cut heads."""
    from monitor.hooks.compiled import mask_head

    q = torch.randn(4, 3, 5, 8)
    per_head = torch.rand(3, 5, 5) > 0.5
    per_seq = torch.rand(4, 1, 5, 5) > 0.5
    assert mask_head(per_head, q, 2) is per_head
    assert torch.equal(mask_head(per_seq, q, 2), per_seq[:2])
    three_d = torch.randn(4, 5, 8)  # (batch, queries, dim): its 3-d mask is (batch, queries, keys)
    assert mask_head(torch.ones(4, 5, 5), three_d, 2).shape == (2, 5, 5)
    assert mask_head(torch.ones(5, 5), q, 2).shape == (5, 5)
