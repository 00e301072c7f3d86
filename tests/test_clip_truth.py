"""The pre-clip gradient norm is the truth, or recorded as unknown: never a clipped norm labelled pre-clip.

Real loops, real clip_grad_norm_/clip_grads_with_norm_, records read back from the event files.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from conftest import TinyLM, batches, torchrun_worker

import monitor
from monitor.runlog.reader import read_run

CFG = {"metrics": {"enabled": False}, "console": {"enabled": False}}


def _f32(t: torch.Tensor) -> float:
    return torch.tensor(t.item(), dtype=torch.float32).item()


def _records(mon):
    mon.flush()
    mon.close()
    return read_run(mon.run_dir).records[0]


class Frozen(nn.Module):
    """PEFT/LoRA's shape: a frozen embedding first, trainable adapters after it."""

    def __init__(self) -> None:
        super().__init__()
        self.base = TinyLM()
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.adapter = nn.Linear(16, 16)

    def forward(self, x, y):
        h = self.base.norm(self.base.emb(x))
        logits = self.base.head(h + self.adapter(h))
        return nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1))


def _clip_once(model, max_norm):
    return [torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)]


def _clip_twice(model, max_norm):
    """The same clip repeated (no backward between): the second sees clipped gradients."""
    first = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    return [first]


def _clip_groups_same_total(model, max_norm):
    """One total, applied group by group (what HF's mixed-mesh clip does): counted once, not sqrt(k) times."""
    params = [p for p in model.parameters() if p.grad is not None]
    total = torch.nn.utils.get_total_norm([p.grad for p in params])
    for i in range(0, len(params), 2):
        torch.nn.utils.clip_grads_with_norm_(params[i:i + 2], max_norm, total)
    return [total]


def _clip_disjoint(model, max_norm):
    """A clip per sub-model: the global norm is the L2 norm of the parts."""
    a = torch.nn.utils.clip_grad_norm_(model.base.head.parameters(), max_norm)
    b = torch.nn.utils.clip_grad_norm_([*model.base.emb.parameters(), *model.base.norm.parameters()], max_norm)
    return [torch.linalg.vector_norm(torch.stack([a, b]))]


@pytest.mark.parametrize("clip", [_clip_once, _clip_twice, _clip_groups_same_total, _clip_disjoint])
def test_recorded_norm_is_the_pre_clip_truth(tmp_path, clip):
    torch.manual_seed(0)
    model = Frozen() if clip is _clip_once else _Plain()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    mon = monitor.attach(model, opt, run_dir=tmp_path / "r", config=CFG)
    truth = []
    for x, y in batches(4):
        model(x, y).backward()
        truth.append(clip(model, 0.05)[0])
        opt.step()
        opt.zero_grad()
    records = _records(mon)
    assert [r.grad_norm for r in records] == [_f32(t) for t in truth]
    assert all(r.clip_coef < 1 and not r.grad_norm_unknown for r in records)  # clipping did bind
    assert mon.internal_errors == 0


class _Plain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.base = TinyLM()

    def forward(self, x, y):
        return self.base(x, y)[1]


def test_clipping_each_micro_batch_is_recorded_as_unknown(tmp_path):
    """Clipped partial gradients, then more backward: no pre-clip norm of the step exists to record."""
    torch.manual_seed(0)
    model = _Plain()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    mon = monitor.attach(model, opt, run_dir=tmp_path / "r", config={**CFG, "collector": {"param_norms_every": 1}})
    applied = []
    data = batches(6)
    for _ in range(3):
        for _ in range(2):
            x, y = next(data)
            model(x, y).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
        applied.append(torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]))
        opt.step()
        opt.zero_grad()
    records = _records(mon)
    assert [r.grad_norm_unknown for r in records] == [True] * 3
    assert [r.grad_norm for r in records] == [None] * 3
    assert [r.grad_norm_clipped for r in records] == [_f32(t) for t in applied]
    assert all(r.param_norms is None and r.clip_coef is None and r.max_norm == 0.05 for r in records)
    # monitor check and the report say so; clip.saturated says it cannot judge
    from typer.testing import CliRunner

    from monitor.cli.app import app

    report = tmp_path / "report.html"
    out = CliRunner().invoke(app, ["check", str(mon.run_dir), "--report", str(report)])
    assert "pre-clip gradient norm is unknown on 3 step record(s)" in out.output
    assert "INFO clip.saturated at step 0: cannot judge clipping" in out.output
    assert out.exit_code == 0  # info only
    assert "pre-clip norm unknown on 3 step(s)" in report.read_text()


def test_a_closure_optimizer_gets_the_norm_of_the_gradients_it_computes(tmp_path):
    """optimizer.step(closure): the gradients exist only once the closure ran inside step() (LBFGS, Lightning)."""
    torch.manual_seed(0)
    model = _Plain()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = monitor.attach(model, opt, run_dir=tmp_path / "r", config=CFG)
    truth, losses = [], []
    for x, y in batches(4):
        def closure(x=x, y=y):
            opt.zero_grad()
            loss = model(x, y)
            loss.backward()
            truth.append(torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]))
            losses.append(loss.detach())
            return loss

        opt.step(closure)
    records = _records(mon)
    assert [r.grad_norm for r in records] == [_f32(t) for t in truth]
    assert [r.loss for r in records] == [_f32(t) for t in losses]
    assert records[0].param_norms  # per-parameter norms of the same gradients, step 0 included


def test_a_closure_that_clips_records_the_clip_s_pre_clip_norm(tmp_path):
    torch.manual_seed(0)
    model = _Plain()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = monitor.attach(model, opt, run_dir=tmp_path / "r", config=CFG)
    truth = []
    for x, y in batches(3):
        def closure(x=x, y=y):
            opt.zero_grad()
            loss = model(x, y)
            loss.backward()
            truth.append(torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05))
            return loss

        opt.step(closure=closure)
    records = _records(mon)
    assert [r.grad_norm for r in records] == [_f32(t) for t in truth]
    assert all(r.clip_coef < 1 for r in records)


@pytest.mark.slow
def test_fsdp_clip_paths_record_the_global_norm_or_unknown(tmp_path):
    """FSDP1's own clip and FSDP2 through clip_grad_norm_ report the global norm (rank 0 records it); a
    torch.nn.utils clip over FSDP1's local shards, and an unclipped sharded run, are recorded as unknown."""
    import json

    torchrun_worker("fsdp_loop.py", str(tmp_path))
    truth = json.loads((tmp_path / "rank0.json").read_text())
    for variant, known in (("fsdp1", True), ("fsdp1-plain-clip", False), ("fsdp2", True), ("fsdp2-no-clip", False)):
        recs = read_run(tmp_path / variant).records[0]
        assert truth[variant]["internal_errors"] == 0
        assert len(recs) == 4, variant
        if known:
            assert [r.grad_norm for r in recs] == pytest.approx(truth[variant]["norms"], rel=1e-6), variant
            assert all(not r.grad_norm_unknown and r.clip_coef < 1 for r in recs), variant
        else:
            assert all(r.grad_norm is None and r.grad_norm_unknown for r in recs), variant
        assert all(r.param_norms is None for r in recs)  # local shards' norms are not the parameters'
