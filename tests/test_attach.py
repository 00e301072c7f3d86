"""monitor.attach on plain loops (not the reference trainer): real hooks, real endpoint, real event files."""

from __future__ import annotations

import json
import logging
import math
import threading

import pytest
import torch
import torch.nn as nn
from conftest import VOCAB, TinyLM, batches, sample, scrape, targets_url
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import monitor
from monitor.hooks import clip as clip_patch
from monitor.runlog.reader import read_run

CONTRACT_METRICS = [
    "trainmon_loss", "trainmon_learning_rate", "trainmon_grad_norm", "trainmon_grad_norm_clipped",
    "trainmon_clip_coefficient", "trainmon_optimizer_steps_total", "trainmon_skipped_steps_total",
    "trainmon_step_duration_seconds_count", "trainmon_tokens_total", "trainmon_last_step_timestamp_seconds",
    "trainmon_dropped_records_total", "trainmon_internal_errors_total",
]


@pytest.mark.slow
def test_plain_loop_metrics_and_tensorboard(tmp_path, mon_config):
    """The issue's must-show: contract metrics via targets.json, grad norm == clip_grad_norm_'s return,
    TensorBoard's EventAccumulator reads one point per optimizer step."""
    torch.manual_seed(0)
    model = TinyLM()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    mon = monitor.attach(model, opt, run_dir=tmp_path / "run", config=mon_config)
    accum, steps = 2, 12
    data = batches(steps * accum)
    clip_returns, step_losses = [], []
    for _ in range(steps):
        micro = []
        for _ in range(accum):
            x, y = next(data)
            _, loss = model(x, y)
            micro.append(loss.detach())
            (loss / accum).backward()
        clip_returns.append(torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5))
        step_losses.append(torch.stack(micro).mean())
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert mon.flush()

    m = scrape(targets_url(mon.run_dir))
    names = {n for n, _ in m}
    for name in CONTRACT_METRICS:
        assert name in names, name
    labels = {"run": mon.run_id, "rank": 0}
    assert sample(m, "trainmon_grad_norm", **labels) == clip_returns[-1].item()
    expected_coef = torch.clamp(0.5 / (clip_returns[-1] + 1e-6), max=1.0).item()
    assert sample(m, "trainmon_clip_coefficient", **labels) == pytest.approx(expected_coef, rel=1e-6)
    assert sample(m, "trainmon_learning_rate", group=0, **labels) == 1e-3
    assert sample(m, "trainmon_loss", **labels) == step_losses[-1].item()
    assert sample(m, "trainmon_optimizer_steps_total", **labels) == steps
    assert sample(m, "trainmon_tokens_total", **labels) == steps * accum * 4 * 8
    assert sample(m, "trainmon_step_duration_seconds_count", **labels) == steps
    assert sample(m, "trainmon_internal_errors_total", **labels) == 0
    mon.close()

    acc = EventAccumulator(str(mon.run_dir))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    for tag in ("trainmon/loss", "trainmon/lr/group0", "trainmon/grad_norm"):
        assert tag in tags
    loss_events = acc.Scalars("trainmon/loss")
    assert [e.step for e in loss_events] == list(range(steps))
    assert [e.value for e in loss_events] == pytest.approx([x.item() for x in step_losses], rel=1e-6)
    assert [e.value for e in acc.Scalars("trainmon/grad_norm")] == pytest.approx(
        [x.item() for x in clip_returns], rel=1e-6)


def test_grad_norm_without_clipping_equals_what_clip_would_return(tmp_path, mon_config):
    torch.manual_seed(1)
    model = TinyLM()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = monitor.attach(model, opt, run_dir=tmp_path / "r", config={**mon_config, "metrics": {"enabled": False}})
    expected = []
    for x, y in batches(5):
        _, loss = model(x, y)
        loss.backward()
        expected.append(torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]))
        opt.step()
        opt.zero_grad()
    mon.flush()
    mon.close()
    records = read_run(mon.run_dir).records[0]
    assert [r.grad_norm for r in records] == [torch.tensor(e.item(), dtype=torch.float32).item() for e in expected]
    assert all(r.clip_coef == 1.0 for r in records)
    # per-parameter norms from the same fused pass, named by module path
    last = records[0].param_norms
    assert set(last) == {n for n, _ in model.named_parameters()}


def _scaler_loop(model, opt, scaler, steps, inf_at=None, accum=1):
    """nanoGPT's AMP shape; the model returns logits only, the loss is computed in the loop."""
    crit = nn.CrossEntropyLoss()
    data = batches(steps * accum, seed=3)
    losses = []
    for step in range(steps):
        micro = []
        for _ in range(accum):
            x, y = next(data)
            logits, _ = model(x)
            loss = crit(logits.view(-1, VOCAB), y.view(-1))
            micro.append(loss.detach())
            scaler.scale(loss).backward()
        if step == inf_at:
            model.head.bias.grad[0] = float("inf")
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        losses.append(torch.stack(micro).mean().item())
    return losses


@pytest.mark.slow
def test_grad_scaler_loss_scale_and_skipped_step(tmp_path, mon_config):
    torch.manual_seed(2)
    model = TinyLM()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    with monitor.attach(model, opt, scaler=scaler, run_dir=tmp_path / "r", config=mon_config) as mon:
        losses = _scaler_loop(model, opt, scaler, steps=6, inf_at=3, accum=2)
        mon.flush()
        m = scrape(mon.metrics_url)
        labels = {"run": mon.run_id, "rank": 0}
        assert sample(m, "trainmon_skipped_steps_total", **labels) == 1
        assert sample(m, "trainmon_optimizer_steps_total", **labels) == 6
        # the scale used by the last step: halved once by the skip at step 3
        assert sample(m, "trainmon_loss_scale", **labels) == 512.0
    recs = read_run(mon.run_dir).records[0]
    assert [r.skipped for r in recs] == [False, False, False, True, False, False]
    assert math.isinf(recs[3].grad_norm) or math.isnan(recs[3].grad_norm)
    assert [r.loss_scale for r in recs] == [1024.0] * 4 + [512.0] * 2
    # loss via scaler.scale(loss), averaged over the two micro-batches
    assert [r.loss for r in recs] == pytest.approx(losses, rel=1e-6)
    assert [r.micro_batches for r in recs] == [2] * 6


def test_disabled_grad_scaler_and_loss_fn_module(tmp_path, mon_config):
    torch.manual_seed(2)
    model = TinyLM()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    crit = nn.CrossEntropyLoss()
    with monitor.attach(model, opt, scaler=scaler, loss_fn=crit, run_dir=tmp_path / "r", config=mon_config) as mon:
        expected = []
        for x, y in batches(4):
            logits, _ = model(x)
            loss = crit(logits.view(-1, VOCAB), y.view(-1))
            expected.append(loss.item())
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
        mon.flush()
        m = scrape(mon.metrics_url)
        assert sample(m, "trainmon_optimizer_steps_total", run=mon.run_id, rank=0) == 4
        assert sample(m, "trainmon_loss", run=mon.run_id, rank=0) == expected[-1]
        assert not any(n == "trainmon_loss_scale" for n, _ in m)


@pytest.mark.slow
def test_forward_output_shapes_and_explicit_log(tmp_path, mon_config):
    """Loss from a scalar output, an object with .loss, and mon.log() when no hook can see it."""

    class Out:
        def __init__(self, loss):
            self.loss = loss

    class ScalarModel(TinyLM):
        def forward(self, idx, targets):
            return super().forward(idx, targets)[1]

    class ObjModel(TinyLM):
        def forward(self, idx, targets):
            return Out(super().forward(idx, targets)[1])

    for cls in (ScalarModel, ObjModel):
        model = cls()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        with monitor.attach(model, opt, run_dir=tmp_path / cls.__name__, config=mon_config) as mon:
            for x, y in batches(3):
                out = model(x, y)
                loss = out if isinstance(out, torch.Tensor) else out.loss
                loss.backward()
                opt.step()
                opt.zero_grad()
            mon.flush()
            assert sample(scrape(mon.metrics_url), "trainmon_loss", run=mon.run_id, rank=0) == loss.item()

    model = TinyLM()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with monitor.attach(model, opt, run_dir=tmp_path / "log", config=mon_config) as mon:
        with torch.no_grad():  # the model's own loss is invisible under no_grad...
            _, loss = model(*next(batches(1)))
        mon.log(loss=2.5, tokens=100, accuracy=0.25)  # ...so the loop reports it
        opt.step()
        mon.flush()
        m = scrape(mon.metrics_url)
        assert sample(m, "trainmon_loss", run=mon.run_id, rank=0) == 2.5
        assert sample(m, "trainmon_tokens_total", run=mon.run_id, rank=0) == 100


class SeedCosineWarmup:
    """The seed lesson's CosineWarmupScheduler, re-written from its description: the LR is only set by
    step(), so the optimizer's constructor LR (the base LR) is what the first update uses."""

    def __init__(self, optimizer, warmup_steps, max_steps, base_lr=1e-4, min_lr_ratio=0.1):
        self.optimizer, self.warmup, self.max_steps = optimizer, warmup_steps, max_steps
        self.base, self.min = base_lr, base_lr * min_lr_ratio
        self.current_step = 0

    def step(self):
        self.current_step += 1
        if self.current_step < self.warmup:
            lr = self.base * self.current_step / self.warmup
        else:
            progress = (self.current_step - self.warmup) / (self.max_steps - self.warmup)
            lr = self.min + (self.base - self.min) * 0.5 * (1 + math.cos(math.pi * progress))
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        return lr


def test_seed_cosine_warmup_scheduler_gets_a_warmup_alert(tmp_path, mon_config):
    model = TinyLM()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scheduler = SeedCosineWarmup(optimizer, warmup_steps=2000, max_steps=100000, base_lr=1e-4, min_lr_ratio=0.1)
    with monitor.attach(model, optimizer, scheduler=scheduler, run_dir=tmp_path / "r", config=mon_config,
                        max_steps=100000) as mon:
        for x, y in batches(8):
            _, loss = model(x, y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            scheduler.step()
        mon.flush()
        alerts = [a for a in mon.alerts if a.rule.startswith("warmup.")]
    assert alerts, "the first update runs at the peak LR: a warmup alert is expected"
    a = alerts[0]
    assert a.step == 0 and a.evidence["first_lr"] == 1e-4
    assert "LambdaLR" in a.hint or "warmup" in a.hint.lower()
    lines = (mon.run_dir / "alerts.jsonl").read_text().splitlines()
    assert a.rule in [json.loads(line)["rule"] for line in lines]


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        ({"model": "not a model"}, "`model`"),
        ({"optimizer": object()}, "`optimizer`"),
        ({"scaler": 1.0}, "`scaler`"),
        ({"scheduler": 3}, "`scheduler`"),
        ({"loss_fn": lambda a, b: a}, "`loss_fn`"),
        ({"run_dir": 42}, "`run_dir`"),
        ({"config": 7}, "`config`"),
        ({"max_steps": "100"}, "`max_steps`"),
    ],
)
def test_wrong_objects_raise_type_error_naming_the_argument(tmp_path, kwargs, argument):
    model = TinyLM()
    args = {"model": model, "optimizer": torch.optim.SGD(model.parameters(), lr=0.1), "run_dir": tmp_path / "r"}
    args.update(kwargs)
    with pytest.raises(TypeError, match=argument):
        monitor.attach(**args)
    assert not (tmp_path / "r").exists() or kwargs.get("run_dir") is not None


def test_unwritable_run_dir_and_bad_config_fail_at_attach(tmp_path):
    model = TinyLM()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(monitor.RunDirError, match=str(blocker / "run")):
        monitor.attach(model, opt, run_dir=blocker / "run")
    with pytest.raises(monitor.ConfigError, match=r"rules\.loss\.spike\.z_critical"):
        monitor.attach(model, opt, run_dir=tmp_path / "r", config={"rules": {"loss.spike": {"z_critical": "high"}}})
    with pytest.raises(monitor.ConfigError, match=r"metrics\.prot: unknown key"):
        monitor.attach(model, opt, run_dir=tmp_path / "r", config={"metrics": {"prot": 1}})
    # nothing was left hooked by the failed attaches
    assert clip_patch._listeners == []


def test_errors_inside_hooks_never_reach_the_loop(tmp_path, mon_config, caplog):
    class Exploding:
        @property
        def loss(self):
            raise RuntimeError("boom inside the monitor's loss capture")

    class Model(TinyLM):
        def forward(self, idx, targets):
            self.last = super().forward(idx, targets)[1]
            return Exploding()

    model = Model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    caplog.set_level(logging.WARNING, logger="trainmon")
    with monitor.attach(model, opt, run_dir=tmp_path / "r", config=mon_config) as mon:
        for x, y in batches(5):
            model(x, y)
            model.last.backward()
            opt.step()
            opt.zero_grad()
        mon.flush()
        m = scrape(mon.metrics_url)
        assert sample(m, "trainmon_internal_errors_total", run=mon.run_id, rank=0) == 5
        assert sample(m, "trainmon_optimizer_steps_total", run=mon.run_id, rank=0) == 5
    reports = [r for r in caplog.records if "internal error" in r.getMessage()]
    assert len(reports) == 1, "reported once, counted after"


def _train(seed: int, run_dir=None, config=None, steps=8):
    torch.manual_seed(seed)
    model = TinyLM()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 4))
    mon = monitor.attach(model, opt, scaler=scaler, scheduler=sched, run_dir=run_dir, config=config) if run_dir else None
    try:
        for step in range(steps):
            for x, y in batches(2, seed=seed * 100 + step):
                _, loss = model(x, y)
                scaler.scale(loss / 2).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            sched.step()
    finally:
        if mon:
            mon.close()
    return model.state_dict(), torch.get_rng_state()


@pytest.mark.slow
def test_monitored_run_is_bitwise_identical(tmp_path, mon_config):
    plain, rng_plain = _train(7)
    watched, rng_watched = _train(7, run_dir=tmp_path / "r", config=mon_config)
    assert plain.keys() == watched.keys()
    for k in plain:
        assert torch.equal(plain[k], watched[k]), k
    assert torch.equal(rng_plain, rng_watched)


def test_close_restores_everything_and_is_idempotent(tmp_path, mon_config):
    model = TinyLM()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    original_clip = torch.nn.utils.clip_grad._clip_grads_with_norm_
    original_scale = vars(torch.amp.GradScaler)["scale"]
    mon = monitor.attach(model, opt, scaler=scaler, run_dir=tmp_path / "r", config=mon_config)
    assert torch.nn.utils.clip_grad._clip_grads_with_norm_ is not original_clip
    assert "scale" in vars(torch.amp.GradScaler) and "step" in vars(torch.amp.GradScaler)
    url = mon.metrics_url
    mon.close()
    mon.close()
    assert torch.nn.utils.clip_grad._clip_grads_with_norm_ is original_clip
    assert vars(torch.amp.GradScaler)["scale"] is original_scale and "scale" not in vars(scaler)
    assert not model._forward_hooks and not model._forward_pre_hooks
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks
    assert json.loads((mon.run_dir / "targets.json").read_text()) == []
    with pytest.raises(OSError):
        scrape(url)
    info = json.loads((mon.run_dir / "run.json").read_text())
    assert info["steps"] == 0 and "ended" in info


@pytest.mark.slow
def test_full_queue_drops_and_counts_never_blocks(tmp_path, mon_config):
    """A publisher stuck in a slow on_alert callback: the loop keeps going, records are dropped and counted."""
    release = threading.Event()
    cfg = {**mon_config, "collector": {"queue_size": 2},
           "on_alert": lambda alert: alert.rule == "warmup.missing" and release.wait(60)}
    model = TinyLM()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)  # constant LR: warmup.missing fires at step 5
    mon = monitor.attach(model, opt, run_dir=tmp_path / "r", config=cfg)
    try:
        for x, y in batches(40):
            _, loss = model(x, y)
            loss.backward()
            opt.step()
            opt.zero_grad()
        assert mon.dropped_records > 0
        release.set()
        assert mon.flush()
        m = scrape(mon.metrics_url)
        labels = {"run": mon.run_id, "rank": 0}
        assert sample(m, "trainmon_dropped_records_total", **labels) == mon.dropped_records
        assert sample(m, "trainmon_optimizer_steps_total", **labels) == 40 - mon.dropped_records
    finally:
        release.set()
        mon.close()


def test_halt_on_critical_raises_at_next_step_after_flushing(tmp_path, mon_config):
    model = TinyLM()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    cfg = {**mon_config, "halt_on": "critical"}
    mon = monitor.attach(model, opt, run_dir=tmp_path / "r", config=cfg)
    with pytest.raises(monitor.TrainingHalted, match="loss.nonfinite"):
        for step, (x, y) in enumerate(batches(50)):
            _, loss = model(x, y)
            if step == 3:
                loss = loss * float("nan")
            loss.backward()
            opt.step()
            opt.zero_grad()
            mon.flush()  # in a real loop the publisher keeps up on its own; here it makes the step exact
    assert step == 4
    alerts = [json.loads(line) for line in (mon.run_dir / "alerts.jsonl").read_text().splitlines()]
    assert any(a["rule"] == "loss.nonfinite" and a["step"] == 3 for a in alerts)
    mon.close()


def test_port_conflict_takes_the_next_free_port(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        base = s.getsockname()[1]
        s.listen()
        model = TinyLM()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        cfg = {"metrics": {"port": base}, "console": {"enabled": False}}
        with monitor.attach(model, opt, run_dir=tmp_path / "r", config=cfg) as mon:
            assert mon.metrics_url != f"http://127.0.0.1:{base}/metrics"
            port = int(mon.metrics_url.rsplit(":", 1)[1].split("/")[0])
            assert base < port <= base + 50
            info = json.loads((mon.run_dir / "run.json").read_text())
            assert info["endpoints"][0]["port"] == port
            assert targets_url(mon.run_dir) == mon.metrics_url


def test_training_thread_modules_have_no_host_sync_calls():
    """The training-thread modules never read a device tensor on the host (GPU runs check this live
    with torch.cuda.set_sync_debug_mode in scripts/gpu-check.sh)."""
    import ast
    import inspect

    from monitor.hooks import attention, attention_math, collector, evalmode, norms, packet, sampler

    syncing = {"item", "tolist", "cpu", "numpy", "synchronize", "wait"}
    for module in (attention, attention_math, collector, evalmode, norms, packet, sampler):
        tree = ast.parse(inspect.getsource(module))
        calls = {n.func.attr for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)}
        assert not syncing & calls, (module.__name__, syncing & calls)


def test_a_stall_dumps_the_stacks_before_any_sink_sees_the_alert(tmp_path):
    """In process: the watchdog's clock raises run.stalled; the stacks file is written first and every
    sink (alerts.jsonl, mon.alerts) gets the alert that names it."""
    import time

    model = TinyLM()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    cfg = {"console": {"enabled": False}, "metrics": {"enabled": False}, "watchdog": {"interval_seconds": 0.1},
           "rules": {"run.stalled": {"floor_seconds": 0.3}}}
    with monitor.attach(model, opt, run_dir=tmp_path / "r", config=cfg) as mon:
        for x, y in batches(2):
            model(x, y)[1].backward()
            opt.step()
            opt.zero_grad()
        mon.flush()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not any(a.rule == "run.stalled" for a in mon.alerts):
            time.sleep(0.05)
        (stall,) = [a for a in mon.alerts if a.rule == "run.stalled"]
        assert stall.step == 1 and "Thread" in (tmp_path / "r" / "stacks-rank0-step1.txt").read_text()
        assert stall.evidence["stacks"] == str(tmp_path / "r" / "stacks-rank0-step1.txt")
        (active,) = [a for a in mon.active_alerts if a.rule == "run.stalled"]
        assert active.evidence["stacks"] == stall.evidence["stacks"]
    lines = [json.loads(line) for line in (tmp_path / "r" / "alerts.jsonl").read_text().splitlines()]
    assert [a["evidence"]["stacks"] for a in lines if a["rule"] == "run.stalled"] == [stall.evidence["stacks"]]


def test_the_engine_completes_an_alert_once_and_every_sink_gets_the_same_object_in_any_order(tmp_path):
    """The stack dump is added to run.stalled as the engine raises it (its resolution keeps it); the
    fanout gives that one object to each sink, and a broken sink does not keep it from the others."""
    from monitor.hooks.alerts import AlertFanout, StackDump
    from monitor.hooks.guard import ErrorGuard
    from monitor.rules.engine import RulesEngine
    from monitor.schema import RunInfo, StepRecord

    class Keep:
        def __init__(self):
            self.got = []

        def emit(self, alert):
            self.got.append((alert, alert.model_dump()))

    class Broken:
        def emit(self, alert):
            raise RuntimeError("sink down")

    results = []
    for order in ((0, 1, 2), (2, 1, 0)):
        sinks = [Keep(), Broken(), Keep()]
        guard = ErrorGuard()
        engine = RulesEngine(RunInfo(run_id="r"), {"run.stalled": {"floor_seconds": 1}},
                             sinks=[AlertFanout([sinks[i] for i in order], guard)],
                             completions=[StackDump(tmp_path, 0)])
        for s in range(5):
            engine.observe(StepRecord(step=s, time=100.0 + s, loss=2.0, lr=[1e-3]))
        engine.tick(1000.0)
        engine.observe(StepRecord(step=5, time=1001.0, loss=2.0, lr=[1e-3]))
        got = [a for a, _ in sinks[0].got]
        assert guard.count == len(got)  # the broken sink, once per alert; the others still got every one
        assert [a for a, _ in sinks[2].got] == got and all(x is y for x, (y, _) in zip(got, sinks[2].got))
        assert all(a.model_dump() == dumped for a, dumped in sinks[0].got)  # nothing changed them later
        results.append([(a.rule, a.status, a.step, a.evidence.get("stacks")) for a in got if a.rule == "run.stalled"])
    path = str(tmp_path / "stacks-rank0-step4.txt")
    assert results[0] == results[1] == [("run.stalled", "firing", 4, path), ("run.stalled", "resolved", 5, path)]
    assert "File " in (tmp_path / "stacks-rank0-step4.txt").read_text()  # the dumped stack


def test_publisher_counts_an_error_under_the_stage_that_raised(caplog):
    from monitor.hooks.guard import ErrorGuard
    from monitor.hooks.packet import Packet, StepState
    from monitor.hooks.publisher import Publisher

    seen = []

    def broken(step):
        raise ValueError("boom")

    guard = ErrorGuard()
    pub = Publisher(rank=0, param_names=[], guard=guard, queue_size=4, on_drop=lambda: None,
                    stages=[("first stage", broken), ("second stage", lambda s: seen.append(("stage", s.record.step)))],
                    outputs=[("an output", lambda r: seen.append(("output", r.step)))])
    with caplog.at_level(logging.WARNING, logger="trainmon"):
        pub.submit(Packet(step=3, layout=("loss",), values=torch.tensor([1.5]), event=None, state=StepState(),
                          time=0.0, end=0.0, start=None))
        assert pub.flush(10)
        pub.close()
    assert seen == [("stage", 3), ("output", 3)] and guard.count == 1 and pub.published == 1
    assert "internal error in first stage" in caplog.text


def test_hooked_objects_still_checkpoint_and_pickle(tmp_path, mon_config):
    """Nothing is set on the user's objects: scheduler and scaler state_dicts and pickles stay clean."""
    import copy
    import io

    model = TinyLM()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10))
    scaler = torch.amp.GradScaler("cpu")
    other = torch.amp.GradScaler("cpu", init_scale=8.0)  # not monitored: passes straight through
    with monitor.attach(model, opt, scaler=scaler, scheduler=sched, run_dir=tmp_path / "r", config=mon_config) as mon:
        for x, y in batches(3):
            _, loss = model(x, y)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
            sched.step()
        buf = io.BytesIO()
        torch.save({"sched": sched.state_dict(), "scaler": scaler.state_dict(), "opt": opt.state_dict()}, buf)
        copy.deepcopy(scaler)
        assert other.scale(torch.tensor(2.0)).item() == 16.0
        mon.flush()
    recs = read_run(mon.run_dir).records[0]
    # LambdaLR's last_epoch: 0 before the first step, one scheduler.step() after each optimizer step
    assert [r.scheduler_steps for r in recs] == [0, 1, 1]


def test_a_clip_wrapper_held_past_close_still_clips(tmp_path, mon_config):
    """Issue 14: a call already inside the clip wrapper when close() restores the original (or code that
    imported the wrapper by name after attach) still clips, as the original would."""
    from torch.nn.utils import clip_grad

    torch.manual_seed(0)
    model = TinyLM()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = monitor.attach(model, opt, run_dir=tmp_path / "r", config=mon_config)
    held = clip_grad._clip_grads_with_norm_
    assert held is clip_patch._wrapped
    mon.close()
    assert clip_grad._clip_grads_with_norm_ is not held
    x, y = next(batches(1))
    model(x, y)[1].backward()
    params = list(model.parameters())
    grads = [p.grad.clone() for p in params]
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    held(params, 0.1, total)
    coef = torch.clamp(0.1 / (total + 1e-6), max=1.0)
    for p, g in zip(params, grads):
        assert torch.equal(p.grad, g * coef)


def test_alerts_and_active_alerts_are_snapshots_readable_from_any_thread(tmp_path, mon_config):
    """Issue 14: the lists the publisher thread changes are copied, never handed out or iterated live."""
    model = TinyLM()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)  # constant LR: warmup.missing fires at step 5
    stop, failures = threading.Event(), []
    with monitor.attach(model, opt, run_dir=tmp_path / "r", config=mon_config) as mon:
        def read() -> None:
            while not stop.is_set():
                try:
                    _ = (mon.alerts, mon.active_alerts)
                except Exception as e:
                    failures.append(e)

        reader = threading.Thread(target=read)
        reader.start()
        try:
            for x, y in batches(8):
                _, loss = model(x, y)
                loss.backward()
                opt.step()
                opt.zero_grad()
            assert mon.flush()
        finally:
            stop.set()
            reader.join()
        active = mon.active_alerts
        assert any(a.rule == "warmup.missing" for a in active) and active == mon.engine.active()
        active.clear()
        raised = mon.alerts
        raised.clear()
        assert mon.active_alerts and mon.alerts
    assert failures == []
