"""Lightning with TrainmonCallback: real Trainers (lightning.pytorch and pytorch_lightning), tiny SDPA model."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

L = pytest.importorskip("lightning.pytorch")

from monitor.integrations.lightning import TrainmonCallback  # noqa: E402
from monitor.runlog.reader import read_run  # noqa: E402

VOCAB, T = 32, 8
QUIET = {"metrics": {"enabled": False}, "console": {"enabled": False}, "collector": {"param_norms_every": 1}}


class Attn(nn.Module):
    def __init__(self, dim: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.qkv, self.proj, self.heads = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim), heads

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in self.qkv(x).chunk(3, -1))
        return self.proj(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb, self.attn, self.head = nn.Embedding(VOCAB, 16), Attn(), nn.Linear(16, VOCAB)

    def forward(self, x):
        h = self.emb(x)
        return self.head(h + self.attn(h))


def data(n: int = 64):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, VOCAB, (n, T), generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, torch.roll(x, -1, 1)), batch_size=4)


def module_class(pl):
    class LM(pl.LightningModule):
        """Logs what Lightning itself computes: training_step losses, and per optimizer step (in
        on_before_optimizer_step: unscaled, not yet clipped) the gradients' norms and the LR."""

        def __init__(self, manual: bool = False, clip: float | None = None, warmup: int = 4) -> None:
            super().__init__()
            self.warmup = warmup
            self.net = Net()
            self.automatic_optimization = not manual
            self.clip = clip
            self.losses, self.norms, self.param_norms, self.lrs = [], [], [], []

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = F.cross_entropy(self.net(x).view(-1, VOCAB), y.view(-1))
            self.losses.append(loss.detach().clone())
            if self.automatic_optimization:
                return loss
            opt = self.optimizers()
            opt.zero_grad()
            self.manual_backward(loss)
            self._truth(opt)  # before the loop's own clip
            if self.clip:
                self.clip_gradients(opt, gradient_clip_val=self.clip, gradient_clip_algorithm="norm")
            opt.step()
            self.lr_schedulers().step()

        def on_before_optimizer_step(self, optimizer):
            if self.automatic_optimization:
                self._truth(optimizer)

        def _truth(self, optimizer):
            grads = {n: p.grad.detach().clone() for n, p in self.named_parameters() if p.grad is not None}
            self.norms.append(torch.nn.utils.get_total_norm(list(grads.values())).item())
            self.param_norms.append({n: g.norm().item() for n, g in grads.items()})
            self.lrs.append(optimizer.param_groups[0]["lr"])

        def configure_optimizers(self):
            opt = torch.optim.AdamW(self.parameters(), lr=1e-3, betas=(0.9, 0.95))
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(self.warmup, 1)))
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    return LM


def fit(tmp_path, pl=L, *, steps=6, accum=1, clip=None, manual=False, plugins=None, config=None, warmup=4):
    torch.manual_seed(0)
    model = module_class(pl)(manual=manual, clip=clip if manual else None, warmup=warmup)
    cb = TrainmonCallback(config={**QUIET, **(config or {})})
    trainer = pl.Trainer(
        default_root_dir=tmp_path, max_steps=steps, accumulate_grad_batches=accum, accelerator="cpu", devices=1,
        gradient_clip_val=None if manual else clip, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[cb], plugins=plugins)
    trainer.fit(model, data())
    return model, cb, trainer


def _f32(x: float) -> float:
    return torch.tensor(x, dtype=torch.float32).item()


def check_records(model, cb, steps, accum):
    mon = cb.monitor
    recs = read_run(mon.run_dir).records[0]
    assert [r.step for r in recs] == list(range(steps))
    assert [r.micro_batches for r in recs] == [accum] * steps
    step_losses = [torch.stack(model.losses[i * accum:(i + 1) * accum]).mean().item() for i in range(steps)]
    assert [r.loss for r in recs] == pytest.approx(step_losses, rel=1e-6)
    assert [r.grad_norm for r in recs] == pytest.approx(model.norms, rel=1e-6)  # this step's, step 0 included
    for r, truth in zip(recs, model.param_norms):
        assert dict(r.param_norms) == pytest.approx(truth, rel=1e-6)
    assert [r.lr[0] for r in recs] == model.lrs
    assert mon.internal_errors == 0
    return recs


@pytest.mark.slow
@pytest.mark.parametrize("clip, accum", [(None, 1), (0.05, 2)])
def test_records_are_the_current_step_s_pre_clip_values(tmp_path, clip, accum):
    model, cb, _ = fit(tmp_path, clip=clip, accum=accum, config={"attention": {"every": 2, "max_every": 2}})
    recs = check_records(model, cb, 6, accum)
    assert cb.monitor.run_dir.parent == tmp_path / "trainmon"
    if clip:
        assert all(r.max_norm == clip and r.clip_coef < 1 for r in recs)
    assert [r.step for r in recs if r.attention] == [0, 2, 4]
    assert set(recs[0].attention) == {"net.attn"}


@pytest.mark.slow
def test_manual_optimization(tmp_path):
    model, cb, _ = fit(tmp_path, manual=True, clip=0.05)
    recs = check_records(model, cb, 6, 1)
    assert all(r.max_norm == 0.05 for r in recs)


@pytest.mark.slow
def test_a_precision_plugin_with_a_grad_scaler(tmp_path):
    """fp16 autocast on CPU with Lightning's MixedPrecision and a GradScaler: the loss scale is recorded
    and the norms are of the unscaled gradients."""
    from lightning.pytorch.plugins import MixedPrecision

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    model, cb, _ = fit(tmp_path, clip=1.0, plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    recs = check_records(model, cb, 6, 1)
    assert [r.loss_scale for r in recs] == [2.0**8] * 6
    assert recs[0].autocast == "float16"


@pytest.mark.slow
def test_pytorch_lightning_package(tmp_path):
    pl = importlib.import_module("pytorch_lightning")
    model, cb, _ = fit(tmp_path, pl=pl, clip=0.05, accum=2)
    check_records(model, cb, 6, 2)


@pytest.mark.slow
def test_halt_stops_the_trainer_without_an_exception(tmp_path):
    model, cb, trainer = fit(tmp_path, steps=30, warmup=0, config={"halt_on": "warning"})
    assert "warmup.missing" in cb.monitor.halt_requested
    assert trainer.global_step < 30


@pytest.mark.slow
def test_attach_takes_a_lightning_optimizer_and_its_grad_scaler(tmp_path):
    """monitor.attach(self, self.optimizers(), ...) by hand: the LightningOptimizer is unwrapped, so the
    precision plugin's scaler.step(optimizer) is recognised as this optimizer's step."""
    from lightning.pytorch.plugins import MixedPrecision

    import monitor

    class Manual(module_class(L)):
        def on_train_start(self):
            self.mon = monitor.attach(self, self.optimizers(), scaler=self.trainer.precision_plugin.scaler,
                                      run_dir=tmp_path / "run", config=QUIET)

        def on_before_optimizer_step(self, optimizer):
            self._truth(optimizer)  # unscaled here (no clipping in this loop)

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = F.cross_entropy(self.net(x).view(-1, VOCAB), y.view(-1))
            self.mon.log(loss=loss)
            opt = self.optimizers()
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()

    torch.manual_seed(0)
    model = Manual(manual=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**6)
    trainer = L.Trainer(default_root_dir=tmp_path, max_steps=5, accelerator="cpu", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    trainer.fit(model, data())
    model.mon.close()
    recs = read_run(tmp_path / "run").records[0]
    assert [r.step for r in recs] == list(range(5))
    assert [r.loss_scale for r in recs] == [2.0**6] * 5
    assert [r.grad_norm for r in recs] == pytest.approx(model.norms, rel=1e-6)
    assert model.mon.internal_errors == 0


@pytest.mark.slow
def test_a_healthy_run_with_warmup_is_quiet(tmp_path):
    _, cb, _ = fit(tmp_path, steps=60, warmup=40, clip=1.0)
    assert [a.line() for a in cb.monitor.alerts if a.severity.value != "info"] == []


@pytest.mark.slow
def test_fit_from_a_checkpoint_goes_on_in_the_same_run_directory(tmp_path):
    """trainer.fit(..., ckpt_path=...) is a new attempt of the run it resumes, at Lightning's global step."""
    _, first, trainer = fit(tmp_path, steps=4)
    trainer.save_checkpoint(tmp_path / "step4.ckpt")
    run_dir = first.monitor.run_dir
    torch.manual_seed(0)
    cb = TrainmonCallback(config=QUIET)
    resumed = L.Trainer(default_root_dir=tmp_path, max_steps=8, accelerator="cpu", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[cb])
    resumed.fit(module_class(L)(), data(), ckpt_path=tmp_path / "step4.ckpt")
    assert cb.monitor.run_dir == run_dir
    a = cb.monitor.attempt
    assert (a.id, a.kind, a.start_step, a.how) == (2, "resumed", 4, "resume_step")
    recs = read_run(run_dir).records[0]
    assert [(r.attempt, r.step) for r in recs] == [(1, s) for s in range(4)] + [(2, s) for s in range(4, 8)]
