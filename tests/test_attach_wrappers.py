"""attach() on what frameworks hand out (Accelerate's prepared objects), attaching twice, DeepSpeed,
the DDP communication hook's capture, and alerts through `logging`."""

from __future__ import annotations

import gc
import logging
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn
from conftest import TinyLM, batches

import monitor
from monitor.hooks import clip as clip_patch
from monitor.runlog.reader import read_run

CFG = {"metrics": {"enabled": False}, "console": {"enabled": False}}


def _f32(x: float) -> float:
    return torch.tensor(x, dtype=torch.float32).item()


@pytest.fixture
def accelerator_factory():
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    def make(**kwargs):
        AcceleratorState._reset_state(reset_partial_state=True)
        return Accelerator(cpu=True, **kwargs)

    yield make
    AcceleratorState._reset_state(reset_partial_state=True)


def _accelerate_loop(acc, model, opt, sched, steps, accum):
    """Accelerate's documented loop: step and scheduler on every micro-batch, clip on sync steps."""
    truth = {"norm": [], "lr": [], "loss": []}
    micro = []
    for x, y in batches(steps * accum):
        with acc.accumulate(model):
            _, loss = model(x, y)
            micro.append(loss.detach())
            acc.backward(loss)
            if acc.sync_gradients:
                truth["norm"].append(acc.clip_grad_norm_(model.parameters(), 0.05).item())
                truth["lr"].append(opt.param_groups[0]["lr"])
                truth["loss"].append(torch.stack(micro).mean().item())
                micro = []
            opt.step()
            sched.step()
            opt.zero_grad()
    return truth


@pytest.mark.slow
def test_accelerate_prepared_objects_one_record_per_optimizer_step(tmp_path, accelerator_factory):
    acc = accelerator_factory(gradient_accumulation_steps=3)
    torch.manual_seed(0)
    model = TinyLM()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 4))
    model, opt, sched = acc.prepare(model, opt, sched)
    mon = monitor.attach(model, opt, scheduler=sched, run_dir=tmp_path / "r", config=CFG)
    truth = _accelerate_loop(acc, model, opt, sched, steps=6, accum=3)
    mon.flush()
    mon.close()
    recs = read_run(mon.run_dir).records[0]
    assert [r.step for r in recs] == list(range(6))
    assert [r.micro_batches for r in recs] == [3] * 6
    assert [r.grad_norm for r in recs] == [_f32(n) for n in truth["norm"]]
    assert [r.lr[0] for r in recs] == truth["lr"]
    assert [r.loss for r in recs] == pytest.approx(truth["loss"], rel=1e-6)
    # the scheduler stepped on every micro-batch, Accelerate passed one in three on: not a per-micro-batch bug
    assert [r.scheduler_steps for r in recs] == [0] + [1] * 5
    assert not [a for a in mon.alerts if a.rule == "warmup.per_microbatch"]
    assert mon.internal_errors == 0


@pytest.mark.slow
def test_a_healthy_accelerate_run_with_warmup_is_quiet(tmp_path, accelerator_factory):
    acc = accelerator_factory(gradient_accumulation_steps=2)
    torch.manual_seed(0)
    model = TinyLM()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 40))
    model, opt, sched = acc.prepare(model, opt, sched)
    mon = monitor.attach(model, opt, scheduler=sched, run_dir=tmp_path / "r", max_steps=60,
                         config={**CFG, "collector": {"param_norms_every": 1}})
    _accelerate_loop(acc, model, opt, sched, steps=60, accum=2)
    mon.flush()
    mon.close()
    assert [a.line() for a in mon.alerts if a.severity.value != "info"] == []


@pytest.mark.slow
def test_accelerate_finds_the_accelerators_grad_scaler(tmp_path, accelerator_factory):
    """Accelerate makes its GradScaler on GPUs only; this CPU accelerator is given one the same way, so
    the optimizer wrapper steps through scaler.step() as it does on a GPU, and attach finds the scaler."""
    acc = accelerator_factory(gradient_accumulation_steps=2)
    acc.scaler, acc.native_amp = torch.amp.GradScaler("cpu", init_scale=2.0**10), True
    torch.manual_seed(0)
    model = TinyLM()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    model, opt, sched = acc.prepare(model, opt, sched)
    mon = monitor.attach(model, opt, scheduler=sched, run_dir=tmp_path / "r", config=CFG)
    truth = _accelerate_loop(acc, model, opt, sched, steps=4, accum=2)
    mon.flush()
    mon.close()
    recs = read_run(mon.run_dir).records[0]
    assert [r.loss_scale for r in recs] == [2.0**10] * 4
    assert [r.grad_norm for r in recs] == [_f32(n) for n in truth["norm"]]
    assert mon.info.scaler == {"enabled": True, "init_scale": 2.0**10, "growth_factor": 2.0, "backoff_factor": 0.5,
                               "growth_interval": 2000}


def test_attaching_twice_replaces_the_first_monitor(tmp_path, caplog):
    model = TinyLM()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    first = monitor.attach(model, opt, run_dir=tmp_path / "a", config=CFG)
    with caplog.at_level(logging.WARNING, logger="trainmon"):
        second = monitor.attach(model, opt, run_dir=tmp_path / "b", config=CFG)
    assert "already had a monitor" in caplog.text and str(tmp_path / "a") in caplog.text
    assert first._closed and not second._closed
    assert len(opt._optimizer_step_pre_hooks) == 1 and len(clip_patch._listeners) == 1
    for x, y in batches(3):
        model(x, y)[1].backward()
        opt.step()
        opt.zero_grad()
    second.close()
    assert len(read_run(tmp_path / "b").records[0]) == 3 and len(read_run(tmp_path / "a").records) == 0
    assert not opt._optimizer_step_pre_hooks and clip_patch._listeners == []


def test_deepspeed_engines_are_refused_with_what_to_do_instead(tmp_path):
    # DeepSpeed is not installable here; its engine is recognised by module and class name alone.
    Engine = type("DeepSpeedEngine", (nn.Module,), {"__module__": "deepspeed.runtime.engine"})
    engine = Engine()
    engine.inner = TinyLM()
    with pytest.raises(NotImplementedError, match="DeepSpeed engines are not supported yet.*monitor watch"):
        monitor.attach(engine, torch.optim.SGD(engine.parameters(), lr=0.1), run_dir=tmp_path / "r")
    assert not (tmp_path / "r").exists()


def test_the_ddp_hook_capture_stops_on_close_and_follows_a_new_monitor(tmp_path):
    """DDP cannot unregister a communication hook: closing empties its slot, a new monitor refills it."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from monitor.hooks.ddp import install_local_norm_hook

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    ddp = None
    try:
        ddp = DistributedDataParallel(TinyLM())
        first, second = [], []
        undo = install_local_norm_hook(ddp, first)
        x, y = next(batches(1))
        ddp(x, y)[1].backward()
        assert len(first) == 1
        undo()
        ddp(x, y)[1].backward()
        assert len(first) == 1
        install_local_norm_hook(ddp, second)
        ddp(x, y)[1].backward()
        assert len(first) == 1 and len(second) == 1
    finally:
        # The DDP reducer goes before its process group: freed after it, its destructor hung once joining a
        # gloo thread (after the trainer and framework tests had run in this process; not seen again).
        del ddp
        gc.collect()
        dist.destroy_process_group()


def _no_warmup_steps(mon_run_dir, config, steps=8):
    model = TinyLM()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    mon = monitor.attach(model, opt, run_dir=mon_run_dir, config=config)
    for x, y in batches(steps):
        model(x, y)[1].backward()
        opt.step()
        opt.zero_grad()
    mon.flush()
    mon.close()
    return mon


@pytest.mark.slow
def test_alerts_go_through_the_trainmon_logger(tmp_path, caplog):
    config = {"metrics": {"enabled": False}}
    with caplog.at_level(logging.INFO, logger="trainmon"):
        _no_warmup_steps(tmp_path / "a", config)
    alerts = [r for r in caplog.records if r.name == "trainmon.alerts"]
    assert any(r.levelno == logging.WARNING and "warmup.missing at step 0" in r.getMessage() for r in alerts)
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="trainmon"):  # the usual logging configuration silences them
        _no_warmup_steps(tmp_path / "b", config)
    assert not [r for r in caplog.records if r.name == "trainmon.alerts"]


@pytest.mark.slow
def test_an_alert_during_a_tqdm_bar_is_written_above_it(tmp_path):
    """No logging configured: the default handler writes through tqdm.write, on a line of its own."""
    script = textwrap.dedent(f"""
        import sys, torch, tqdm
        sys.path.insert(0, {str(__import__('pathlib').Path(__file__).parent)!r})
        from conftest import TinyLM, batches
        import monitor
        model = TinyLM()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        mon = monitor.attach(model, opt, run_dir={str(tmp_path / 'r')!r}, config={{"metrics": {{"enabled": False}}}})
        bar = tqdm.tqdm(total=8, file=sys.stderr, mininterval=0)
        for x, y in batches(8):
            model(x, y)[1].backward()
            opt.step()
            opt.zero_grad()
            mon.flush()
            bar.update()
        bar.close()
        mon.close()
    """)
    err = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120).stderr
    pieces = [p for chunk in err.split("\n") for p in chunk.split("\r")]
    assert any(p.startswith("[trainmon] WARNING warmup.missing at step 0") for p in pieces), err
    assert "|" not in next(p for p in err.split("\n") if "warmup.missing" in p).split("[trainmon]")[0], err
