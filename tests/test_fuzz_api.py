"""The API misused as a user would: wrong arguments refused at attach, odd attention reports never breaking or
guessing, a framework's second optimizer not mistaken for the first. Real models, real Trainers."""

from __future__ import annotations

import logging
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import TinyLM, batches

import monitor
from monitor.hooks.attention_math import exact
from monitor.hooks.sampler import check_call
from monitor.runlog.reader import read_run

CFG = {"metrics": {"enabled": False}, "console": {"enabled": False},
       "attention": {"every": 1, "max_every": 1}}


def _train(model, opt, n):
    for x, y in batches(n):
        model(x, y)[1].backward()
        opt.step()
        opt.zero_grad()


# -- attach: wrong arguments are refused at the call, naming the argument --------------------------------


def test_an_optimizer_over_another_models_parameters_is_refused(tmp_path):
    model = TinyLM()
    stale = torch.optim.AdamW(TinyLM().parameters())  # a notebook's new model, the old optimizer
    with pytest.raises(ValueError, match="none of the parameters of `optimizer`.*parameter of `model`"):
        monitor.attach(model, stale, run_dir=tmp_path / "run", config=CFG)
    assert not os.path.exists(tmp_path / "run")
    # The optimizer covering some of the model's parameters (frozen ones, extra ones) is fine.
    partial = torch.optim.SGD([model.head.weight, nn.Parameter(torch.zeros(1))], lr=0.1)
    monitor.attach(model, partial, run_dir=tmp_path / "ok", config=CFG).close()


def test_a_scheduler_of_another_optimizer_or_the_optimizer_itself_is_refused(tmp_path):
    model = TinyLM()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    other = torch.optim.lr_scheduler.LambdaLR(torch.optim.SGD(TinyLM().parameters(), lr=0.1), lambda s: 1.0)
    with pytest.raises(ValueError, match="`scheduler` \\(LambdaLR\\) schedules another optimizer"):
        monitor.attach(model, opt, scheduler=other, run_dir=tmp_path / "a", config=CFG)
    with pytest.raises(TypeError, match="`scheduler` must be an LR scheduler.*got SGD"):
        monitor.attach(model, opt, scheduler=opt, run_dir=tmp_path / "b", config=CFG)
    monitor.attach(model, opt, scheduler=torch.optim.lr_scheduler.StepLR(opt, 1), run_dir=tmp_path / "c",
                   config=CFG).close()


def test_an_empty_run_dir_is_refused_instead_of_writing_into_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = TinyLM()
    with pytest.raises(ValueError, match="`run_dir` is empty"):
        monitor.attach(model, torch.optim.SGD(model.parameters(), lr=0.1), run_dir="", config=CFG)
    assert os.listdir(tmp_path) == []


def test_a_runs_root_that_is_not_a_path_is_named(tmp_path):
    model = TinyLM()
    with pytest.raises(TypeError, match="`runs_root` must be a path"):
        monitor.attach(model, torch.optim.SGD(model.parameters(), lr=0.1), runs_root=3, config=CFG)


def test_is_causal_and_scale_of_the_wrong_type_are_named(tmp_path):
    q = torch.randn(1, 1, 4, 8)
    model = TinyLM()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with monitor.attach(model, opt, run_dir=tmp_path / "run", config=CFG) as mon:
        with pytest.raises(TypeError, match="`is_causal` must be a bool, got str"):
            mon.observe_attention(q, q, is_causal="no")  # bool("no") would be True
        with pytest.raises(TypeError, match="`scale` must be a float or None, got str"):
            mon.observe_attention(q, q, scale="0.5")
        mon.observe_attention(q, q, is_causal=True, scale=0.5)
    check_call(q, q, None, None, None, is_causal=True, scale=0.5)


# -- observe_attention: never breaks the loop, never guesses ----------------------------------------------


def test_a_failed_measurement_never_leaves_autograd_off():
    """exact() entered no_grad and then asked autocast about a device type it does not know: the
    no_grad stayed on and the loop's backward failed ('does not require grad')."""
    with pytest.raises(RuntimeError):
        with exact("meta"):
            pass
    assert torch.is_grad_enabled()


def test_meta_tensors_reported_on_a_sampled_step_leave_the_loop_alone(tmp_path):
    torch.manual_seed(0)
    model = TinyLM()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with monitor.attach(model, opt, run_dir=tmp_path / "run", config=CFG) as mon:
        assert mon.attention_due
        for x, y in batches(2):
            _, loss = model(x, y)
            mon.observe_attention(torch.empty(2, 2, 4, 8, device="meta"), torch.empty(2, 2, 4, 8, device="meta"))
            assert torch.is_grad_enabled()
            loss.backward()  # raised before the fix: autograd had been turned off
            opt.step()
            opt.zero_grad()
        assert mon.flush() and mon.internal_errors == 0
    assert [r.attention for r in read_run(tmp_path / "run").records[0]] == [None, None]


Q = torch.randn(2, 2, 5, 8)
REFUSED = {
    "batch mismatch": dict(q=Q, k=torch.randn(3, 2, 5, 8)),  # was measured on k's first sequences
    "k without heads": dict(q=Q, k=torch.randn(2, 5, 8)),  # was measured with k's batch read as heads
    "dim mismatch": dict(q=Q, k=torch.randn(2, 2, 5, 7)),
    "complex": dict(q=Q.to(torch.cfloat), k=Q.to(torch.cfloat)),  # was cast to real
    "int": dict(q=Q.long(), k=Q.long()),
    "int mask": dict(q=Q, k=Q, mask=torch.ones(5, 5, dtype=torch.int64)),  # was added to the logits
    "mask shape": dict(q=Q, k=Q, mask=torch.ones(3, 3, dtype=torch.bool)),
    "5-d mask": dict(q=Q, k=Q, mask=torch.ones(1, 1, 1, 5, 5, dtype=torch.bool)),
    "1-d logits": dict(logits=torch.randn(5)),
    "sparse": dict(q=Q.to_sparse(), k=Q.to_sparse()),
}


def test_values_sdpa_would_not_take_are_refused_with_a_warning_not_measured_nor_counted(tmp_path, caplog):
    torch.manual_seed(0)
    model = TinyLM()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    logits = torch.randn(2, 2, 3, 5, 5)
    cases = [*REFUSED.items(), ("5-d logits", dict(logits=logits)), ("zero dim", dict(q=Q[..., :0], k=Q[..., :0]))]
    caplog.set_level(logging.WARNING, logger="trainmon")
    cfg = {**CFG, "attention": {**CFG["attention"], "batch": 16}}  # every sequence measured
    with monitor.attach(model, opt, run_dir=tmp_path / "run", config=cfg) as mon:
        for (name, kw), (x, y) in zip(cases, batches(len(cases))):
            _, loss = model(x, y)
            mon.observe_attention(layer=name, **kw)
            loss.backward()
            opt.step()
            opt.zero_grad()
        assert mon.flush() and mon.internal_errors == 0
    recs = read_run(tmp_path / "run").records[0]
    got = {name: r.attention for (name, _), r in zip(cases, recs)}
    assert {name: got[name] for name in REFUSED} == dict.fromkeys(REFUSED)
    warned = [r.getMessage() for r in caplog.records if "observe_attention" in r.getMessage()]
    assert len(warned) == len(REFUSED)
    for name in REFUSED:
        assert any(f"layer={name!r}" in w for w in warned), name
    assert any("`k` [3, 2, 5, 8]" in w for w in warned) and any("got torch.complex64" in w for w in warned)
    # Leading batch dimensions of logits are flattened, as they are for q and k; a zero dim is nothing to measure.
    flat = got["5-d logits"]["5-d logits"]
    assert flat["max_logit"] == pytest.approx(logits.amax().item(), rel=1e-6)
    assert got["zero dim"] is None


# -- Lightning: a second optimizer's losses are not the first one's ---------------------------------------


@pytest.mark.slow
def test_lightning_manual_optimization_with_two_optimizers_reports_the_loss_as_unknown(tmp_path):
    L = pytest.importorskip("lightning.pytorch")
    from monitor.integrations.lightning import TrainmonCallback

    class TwoNets(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = TinyLM(), TinyLM()
            self.automatic_optimization = False
            self.norms: list[float] = []

        def training_step(self, batch, batch_idx):
            x, y = batch
            opt_a, opt_b = self.optimizers()
            opt_a.zero_grad()
            self.manual_backward(self.a(x, y)[1])
            self.norms.append(torch.nn.utils.get_total_norm([p.grad for p in self.a.parameters()]).item())
            opt_a.step()
            opt_b.zero_grad()
            self.manual_backward(self.b(x, y)[1] * 100)  # b's loss: nothing to do with a's step
            opt_b.step()

        def configure_optimizers(self):
            opt_a, opt_b = torch.optim.SGD(self.a.parameters(), lr=0.1), torch.optim.SGD(self.b.parameters(), lr=0.1)
            b_only = torch.optim.lr_scheduler.LambdaLR(opt_b, lambda s: 1.0)  # not the first optimizer's schedule
            return [opt_a, opt_b], [{"scheduler": b_only, "interval": "step"}]

    torch.manual_seed(0)
    module, cb = TwoNets(), TrainmonCallback(config=CFG)
    data = torch.utils.data.DataLoader(list(batches(3)), batch_size=None)
    trainer = L.Trainer(default_root_dir=tmp_path, max_epochs=1, accelerator="cpu", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[cb])
    trainer.fit(module, data)
    assert cb.monitor is not None and cb.monitor.info.scheduler is None  # b's scheduler is not a's
    recs = read_run(cb.monitor.run_dir).records[0]
    assert cb.monitor.internal_errors == 0
    assert [r.step for r in recs] == [0, 1, 2]
    # Before: step 1's loss was the mean of b's step-0 loss (x100) and a's: a guess, now unknown.
    assert [r.loss for r in recs] == [None, None, None]
    assert [r.grad_norm for r in recs] == pytest.approx(module.norms, rel=1e-6)


def test_lightning_single_optimizer_losses_are_still_recorded(tmp_path):
    L = pytest.importorskip("lightning.pytorch")
    from monitor.integrations.lightning import TrainmonCallback

    class One(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = TinyLM()
            self.losses: list[float] = []

        def training_step(self, batch, batch_idx):
            loss = F.cross_entropy(self.net(batch[0])[0].flatten(0, 1), batch[1].flatten())
            self.losses.append(loss.item())
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    torch.manual_seed(0)
    module, cb = One(), TrainmonCallback(config=CFG)
    trainer = L.Trainer(default_root_dir=tmp_path, max_steps=2, accelerator="cpu", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[cb])
    trainer.fit(module, torch.utils.data.DataLoader(list(batches(2)), batch_size=None))
    assert [r.loss for r in read_run(cb.monitor.run_dir).records[0]] == pytest.approx(module.losses, rel=1e-6)


def test_a_grad_scaler_shared_with_another_optimizer_gives_the_monitored_ones_loss(tmp_path):
    """A GAN's loop: D's loss scaled and stepped, then G's (computed outside G's forward, so the scaler is the
    loss's only source). G's record holds G's loss, not the mean with D's."""
    torch.manual_seed(0)
    g, d = nn.Linear(4, 4), nn.Linear(4, 1)
    opt_g, opt_d = torch.optim.SGD(g.parameters(), lr=0.01), torch.optim.SGD(d.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu")
    want = []
    with monitor.attach(g, opt_g, scaler=scaler, run_dir=tmp_path / "run", config=CFG):
        for _ in range(3):
            x = torch.randn(8, 4)
            loss_d = 100 * d(x).pow(2).mean()
            scaler.scale(loss_d).backward()
            scaler.step(opt_d)
            opt_d.zero_grad()
            loss_g = g(x).pow(2).mean()
            scaler.scale(loss_g).backward()
            scaler.step(opt_g)
            scaler.update()
            opt_g.zero_grad()
            want.append(loss_g.item())
    got = [r.loss for r in read_run(tmp_path / "run").records[0]]
    assert got == pytest.approx(want, rel=1e-6)


def test_param_groups_added_after_attach_are_in_the_gradient_norm(tmp_path, caplog):
    """A loop that adds a param group after attach (unfreezing layers in stages): its gradients count in the
    pre-clip norm from then on; per-parameter norms stop, their names were fixed at attach."""
    torch.manual_seed(0)
    model = TinyLM()
    opt = torch.optim.SGD([model.emb.weight], lr=0.1)
    want = []
    cfg = {**CFG, "collector": {"param_norms_every": 1}}
    with caplog.at_level(logging.INFO, logger="trainmon"):
        with monitor.attach(model, opt, run_dir=tmp_path / "run", config=cfg):
            for i, (x, y) in enumerate(batches(4)):
                if i == 2:
                    opt.add_param_group({"params": [*model.norm.parameters(), *model.head.parameters()]})
                model(x, y)[1].backward()
                trained = [p for g in opt.param_groups for p in g["params"]]
                want.append(torch.nn.utils.get_total_norm([p.grad for p in trained]).item())
                opt.step()
                opt.zero_grad()
    recs = read_run(tmp_path / "run").records[0]
    assert [r.grad_norm for r in recs] == pytest.approx(want, rel=1e-5)
    assert want[2] > 2 * want[1]  # the new groups' gradients are most of it
    assert [r.param_norms is not None for r in recs] == [True, True, False, False]
    assert any("param groups now" in r.getMessage() for r in caplog.records)


def test_a_loop_training_in_eval_mode_is_told_and_its_steps_recorded(tmp_path, caplog):
    """model.train() not called after an evaluation: every record was empty, nothing said. Now the first step
    finds it out (its record stays empty: its forwards were taken for an evaluation), the next ones count."""
    torch.manual_seed(0)
    model = TinyLM()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    want = []
    with caplog.at_level(logging.WARNING, logger="trainmon"):
        with monitor.attach(model, opt, run_dir=tmp_path / "run", config=CFG):
            model.eval()
            for x, y in batches(4):
                loss = model(x, y)[1]
                loss.backward()
                opt.step()
                opt.zero_grad()
                want.append(loss.item())
            model.train()  # back in train mode: an evaluation with autograd on is not a step's forward again
            for x, y in batches(2, seed=1):
                model.eval()
                model(x, y)  # an evaluation pass (autograd on)
                model.train()
                loss = model(x, y)[1]
                loss.backward()
                opt.step()
                opt.zero_grad()
                want.append(loss.item())
    recs = read_run(tmp_path / "run").records[0]
    assert recs[0].loss is None and [r.loss for r in recs[1:]] == pytest.approx(want[1:], rel=1e-6)
    assert [r.micro_batches for r in recs] == [0, 1, 1, 1, 1, 1]
    said = [r.getMessage() for r in caplog.records if "eval mode" in r.getMessage()]
    assert len(said) == 1 and "model.train()" in said[0]
