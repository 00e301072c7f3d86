"""The training thread's path stays cheap (issue 13): a few device ops per step whatever the model's size,
the layout planned once, the clip coefficient derived bit for bit on the publisher, per-parameter norms
sampled; the publisher works a batch at a time, in step order, and flush() does not wait for a batch."""

from __future__ import annotations

import collections
import math
import random
import threading
import time

import pytest
import torch
from conftest import TinyLM, batches
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import monitor
from monitor.config import CollectorConfig
from monitor.hooks.guard import ErrorGuard
from monitor.hooks.packet import Packet, StepState
from monitor.hooks.publisher import Publisher, clip_coef
from monitor.runlog.reader import read_run

CFG = {"metrics": {"enabled": False}, "console": {"enabled": False}, "attention": {"enabled": False}}


class _Ops(TorchDispatchMode):
    """Counts the top-level aten ops run while it is active."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))


class Deep(nn.Module):
    """TinyLM's interface with `depth` extra parameter tensors pairs."""

    def __init__(self, depth: int) -> None:
        super().__init__()
        self.lm = TinyLM()
        self.extra = nn.ModuleList(nn.Linear(16, 16) for _ in range(depth))

    def forward(self, x, y):
        h = self.lm.norm(self.lm.emb(x))
        for layer in self.extra:
            h = h + 0.01 * layer(h)
        logits = self.lm.head(h)
        return logits, nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1))


def _ops_per_step(model_fn, monitored: bool, tmp_path, steps: int = 5, clip: bool = True) -> list[collections.Counter]:
    torch.manual_seed(0)
    model = model_fn()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    cfg = {**CFG, "collector": {"param_norms_every": 1000}}
    mon = monitor.attach(model, opt, run_dir=tmp_path / f"r{monitored}{id(model)}", config=cfg) if monitored else None
    out = []
    try:
        for x, y in batches(steps):
            counter = _Ops()
            with counter:
                model(x, y)[1].backward()
                if clip:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                opt.zero_grad()
            out.append(counter.ops)
    finally:
        if mon is not None:
            assert mon.internal_errors == 0
            mon.close()
    return out


@pytest.mark.parametrize("depth", [0, 40])
def test_the_monitor_adds_two_ops_per_step_whatever_the_model_size(tmp_path, depth):
    """Between sampled steps on CPU: the loss's detach and one stack of the step's values (the host vector).
    No per-scalar op, nothing per parameter tensor (a loop that clips: its own norm is reused)."""
    plain = _ops_per_step(lambda: Deep(depth), False, tmp_path)
    monitored = _ops_per_step(lambda: Deep(depth), True, tmp_path)
    for i in (2, 3, 4):  # step 0 has per-parameter norms (every 1000 steps, from step 0)
        added = monitored[i] - plain[i]
        assert sum(monitored[i].values()) - sum(plain[i].values()) == 2, added
        assert added == collections.Counter({"aten.detach.default": 1, "aten.stack.default": 1})


def test_a_loop_that_does_not_clip_pays_one_norm_pass(tmp_path):
    """Without a clip to reuse, the total norm is one _foreach_norm over the gradients, stacked and reduced
    (clip_grad_norm_'s own ops), plus the two above."""
    plain = _ops_per_step(lambda: Deep(10), False, tmp_path, clip=False)
    monitored = _ops_per_step(lambda: Deep(10), True, tmp_path, clip=False)
    added = monitored[3] - plain[3]
    assert added == collections.Counter({"aten.detach.default": 1, "aten._foreach_norm.Scalar": 1,
                                         "aten.stack.default": 2, "aten.linalg_vector_norm.default": 1}), added


def test_the_layout_is_planned_once_and_reused(tmp_path):
    torch.manual_seed(0)
    model = TinyLM()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    layouts = []
    mon = monitor.attach(model, opt, run_dir=tmp_path / "r", config={**CFG, "collector": {"param_norms_every": 4}})
    handoff = mon._collector._handoff

    def keep(packet):
        layouts.append(packet.layout)
        handoff(packet)

    mon._collector._handoff = keep
    for x, y in batches(9):
        model(x, y)[1].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
    assert mon.flush(10)
    plans = mon._collector.staging._plans
    mon.close()
    # Two layouts: steps with per-parameter norms (0, 4, 8) and steps without; each made once.
    assert len(plans) == 2
    assert all(layouts[i] is layouts[1] for i in (1, 2, 3, 5, 6, 7)) and layouts[0] is layouts[4] is layouts[8]
    records = read_run(mon.run_dir).records[0]
    assert [r.step for r in records if r.param_norms] == [0, 4, 8]


def test_records_keep_the_values_the_loop_saw(tmp_path):
    """Loss, pre-clip norm and clip coefficient, bit for bit what torch computed, across layouts (accumulation,
    a tensor logged with mon.log, per-parameter norms on sampled steps)."""
    torch.manual_seed(0)
    model = TinyLM()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    mon = monitor.attach(model, opt, run_dir=tmp_path / "r", config={**CFG, "collector": {"param_norms_every": 3}})
    truth = []
    data = batches(16)
    for step in range(8):
        accum = 1 + step % 2
        losses = []
        for _ in range(accum):
            x, y = next(data)
            loss = model(x, y)[1]
            losses.append(loss.detach())
            loss.backward()
        norms = {n: torch.linalg.vector_norm(p.grad).item() for n, p in model.named_parameters()}
        total = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
        mon.log(extra=total * 2)
        opt.step()
        opt.zero_grad()
        loss = losses[0] if accum == 1 else torch.stack(losses).mean()
        truth.append((loss.item(), total.item(), torch.clamp(0.05 / (total + 1e-6), max=1.0).item(), norms,
                      (total * 2).item()))
    mon.flush()
    mon.close()
    records = read_run(mon.run_dir).records[0]
    assert len(records) == 8
    for r, (loss, total, coef, norms, extra) in zip(records, truth):
        assert (r.loss, r.grad_norm, r.clip_coef, r.max_norm) == (loss, total, coef, 0.05)
        assert r.grad_norm_clipped == total * coef and r.scalars == {"extra": extra}
        if r.step % 3 == 0:
            assert dict(r.param_norms) == pytest.approx(norms, rel=1e-6)
        else:
            assert r.param_norms is None


def _torch_coef(total: float, max_norm: float) -> float:
    return torch.clamp(max_norm / (torch.tensor(total, dtype=torch.float32) + 1e-6), max=1.0).item()


def test_clip_coef_is_torch_float32_arithmetic_bit_for_bit():
    rng = random.Random(0)
    totals = [0.0, 1e-45, 1e-38, 1e-7, 1e-6, 9.99e-7, 0.5, 1.0, 1.0000001, 3e38, math.inf, math.nan]
    totals += [torch.tensor(10 ** rng.uniform(-8, 8), dtype=torch.float32).item() for _ in range(3000)]
    maxes = [0.0, 1e-3, 0.05, 0.1, 0.3, 1.0, 5.0, 1e30, 1e300, math.inf]
    for t in totals:
        for m in maxes + [10 ** rng.uniform(-4, 3)]:
            want, got = _torch_coef(t, m), clip_coef(t, m)
            assert (math.isnan(want) and math.isnan(got)) or want == got, (t, m, want, got)


def _packet(step: int) -> Packet:
    state = StepState()
    state.lrs, state.micro = [1e-3], 1
    return Packet(step=step, layout=("loss", "grad_norm"), values=torch.tensor([1.5, 2.0]), event=None, state=state,
                  time=float(step), end=10.0 + step, start=10.0 + step - 0.01, scheduler_steps=1, max_norm=1.0)


def test_the_publisher_works_in_batches_in_step_order():
    seen, batches_seen, staged = [], [], []
    recycled = threading.Event()
    guard = ErrorGuard()
    pub = Publisher(rank=0, param_names=[], guard=guard, queue_size=1024, on_drop=lambda: None,
                    stages=[("stage", lambda s: staged.append(s.record.step))],
                    outputs=[("one by one", lambda r: seen.append(r.step)),
                             ("batches", lambda r: None, lambda recs: batches_seen.append([r.step for r in recs]))])
    try:
        first = _packet(0)
        first.recycle = recycled.set
        pub.submit(first)
        for step in range(1, 40):
            pub.submit(_packet(step))
        assert pub.flush(10)
    finally:
        pub.close()
    assert seen == staged == list(range(40)) == [s for b in batches_seen for s in b]
    assert len(batches_seen) < 40 and recycled.is_set() and guard.count == 0 and pub.published == 40
    assert batches_seen[0][0] == 0


def test_the_batch_form_coefficient_and_clipped_norm():
    out = []
    pub = Publisher(rank=0, param_names=[], guard=ErrorGuard(), queue_size=8, on_drop=lambda: None,
                    outputs=[("o", out.append)])
    pub.submit(_packet(0))
    assert pub.flush(10)
    pub.close()
    (r,) = out
    assert r.clip_coef == _torch_coef(2.0, 1.0) and r.grad_norm_clipped == 2.0 * r.clip_coef


def test_flush_does_not_wait_for_a_batch_to_gather():
    pub = Publisher(rank=0, param_names=[], guard=ErrorGuard(), queue_size=1024, on_drop=lambda: None,
                    outputs=[("o", lambda r: None)])
    try:
        for attempt in range(3):  # a loaded machine may be slow once; never every time by the whole window
            pub.submit(_packet(attempt))
            t0 = time.monotonic()
            assert pub.flush(10)
            if time.monotonic() - t0 < 0.08:
                break
        else:
            pytest.fail("flush() waited for the gather window")
    finally:
        pub.close()


def test_a_queue_that_fills_up_ends_the_gathering_instead_of_dropping(monkeypatch):
    import monitor.hooks.publisher as publisher

    monkeypatch.setattr(publisher, "GATHER_SECONDS", 3600.0)  # only a full queue (or a flush) can end it
    seen, busy, release, more = [], threading.Event(), threading.Event(), threading.Event()

    def out(r):
        seen.append(r.step)
        if r.step == 0:
            busy.set()
            release.wait(30)
        elif r.step == 32:
            more.set()

    pub = Publisher(rank=0, param_names=[], guard=ErrorGuard(), queue_size=64, on_drop=lambda: None,
                    outputs=[("o", out)])
    try:
        pub.submit(_packet(0))  # after a quiet spell: published at once, and the next batch gathers
        assert busy.wait(30)
        for step in range(1, 32):
            pub.submit(_packet(step))
        release.set()
        deadline = time.monotonic() + 30
        while not (pub._wake._cond._waiters and not pub._asleep):  # the publisher gathers, with 31 queued
            assert time.monotonic() < deadline
            time.sleep(0.001)
        pub.submit(_packet(32))  # half the queue: the gathering ends here
        assert more.wait(30) and pub.dropped == 0
    finally:
        pub.close()
    assert seen == list(range(33))


def test_records_reach_the_outputs_within_a_second_without_flush():
    seen = threading.Event()
    pub = Publisher(rank=0, param_names=[], guard=ErrorGuard(), queue_size=1024, on_drop=lambda: None,
                    outputs=[("o", lambda r: seen.set())])
    try:
        pub.submit(_packet(0))
        assert seen.wait(1.0)
    finally:
        pub.close()


def test_param_norms_every_default_is_documented_with_its_reason():
    field = CollectorConfig.model_fields["param_norms_every"]
    assert field.default > 1 and "grad.vanishing" in field.description


def test_a_bf16_clip_keeps_its_own_coefficient_and_odd_values_are_staged_as_before(tmp_path):
    """A bf16 total's coefficient is computed on the device in bf16 (as torch clips with it); logged values
    of other dtypes and shapes (float64, shape [1]), a shape that changes and bf16 per-parameter norms are
    staged as float32, as before."""
    torch.manual_seed(0)
    model = TinyLM().to(torch.bfloat16)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = monitor.attach(model, opt, run_dir=tmp_path / "r", config=CFG)
    truth = []
    for step, (x, y) in enumerate(batches(4)):
        model(x, y)[1].backward()
        grads = [p.grad for p in model.parameters()]
        norms = [n.float().item() for n in torch._foreach_norm(grads, 2.0)]  # bf16, as the monitor's pass
        total = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
        assert total.dtype == torch.bfloat16
        wide = torch.tensor(1 / 3, dtype=torch.float64)
        odd = torch.tensor([2.5]) if step % 2 else torch.tensor(2.5)  # its shape changes from step to step
        mon.log(wide=wide, odd=odd)
        opt.step()
        opt.zero_grad()
        truth.append((total.float().item(), torch.clamp(0.05 / (total + 1e-6), max=1.0).float().item(),
                      wide.float().item(), norms))
    mon.flush()
    mon.close()
    assert mon.internal_errors == 0
    records = read_run(mon.run_dir).records[0]
    for r, (total, coef, wide, norms) in zip(records, truth):
        assert (r.grad_norm, r.clip_coef) == (total, coef)
        assert r.scalars == {"wide": wide, "odd": 2.5}
        if r.step == 0:  # the sampled step: the bf16 per-parameter norms staged as float32, exactly
            assert list(dict(r.param_norms).values()) == norms


def test_tensor_lrs_and_plain_ones_side_by_side_are_recorded_per_group(tmp_path):
    """A group whose LR is a tensor (capturable schedules) is staged with the step's values; a float beside it
    goes as it is, and a float logged with mon.log beside a tensor one likewise."""
    torch.manual_seed(0)
    model = TinyLM()
    params = list(model.parameters())
    lr = torch.tensor(0.02)
    opt = torch.optim.AdamW([{"params": params[:2], "lr": lr}, {"params": params[2:], "lr": 0.01}], foreach=False)
    mon = monitor.attach(model, opt, run_dir=tmp_path / "r", config=CFG)
    truth = []
    for step, (x, y) in enumerate(batches(4)):
        model(x, y)[1].backward()
        mon.log(plain=0.5 * step, device=torch.tensor(0.25 * step))
        opt.step()
        opt.zero_grad()
        truth.append([lr.item(), 0.01])
        with torch.no_grad():
            lr.mul_(0.5)  # changed in place after the step: the record keeps the value the step used
    mon.close()
    assert mon.internal_errors == 0
    records = read_run(mon.run_dir).records[0]
    assert [r.lr for r in records] == truth
    assert [r.scalars for r in records] == [{"plain": 0.5 * i, "device": 0.25 * i} for i in range(4)]


def test_a_failing_batch_output_is_counted_and_the_others_still_get_every_record():
    got = []

    def broken(records):
        raise ValueError("boom")

    guard = ErrorGuard()
    pub = Publisher(rank=0, param_names=[], guard=guard, queue_size=1024, on_drop=lambda: None,
                    outputs=[("broken", lambda r: None, broken), ("fine", lambda r: got.append(r.step))])
    try:
        for step in range(10):
            pub.submit(_packet(step))
        assert pub.flush(10)
    finally:
        pub.close()
    assert got == list(range(10)) and 1 <= guard.count <= 10 and pub.published == 10
