"""The attention probe inside monitor.attach: records, surfaces, cost control, bitwise identity and
detection on models that are not the reference trainer (a plain SDPA model, nn.TransformerEncoder)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import monitor
from monitor.hooks.attention import ProbeSchedule
from monitor.hooks.attention_math import attention_stats
from monitor.runlog.reader import read_run
from monitor.trainer.data import TextData, read_corpus
from monitor.trainer.model import GPT, GPTConfig
from tests.conftest import sample, scrape

QUIET = {"metrics": {"port": 0}, "console": {"enabled": False}}


class SdpaBlock(nn.Module):
    def __init__(self, dim: int, heads: int, kv_heads: int, dropout: float) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.hd, self.dropout = heads, kv_heads, dim // heads, dropout
        self.norm = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * kv_heads * self.hd)
        self.out = nn.Linear(dim, dim)

    def forward(self, x):
        b, t, _ = x.shape
        h = self.norm(x)
        q = self.q(h).view(b, t, self.heads, self.hd).transpose(1, 2)
        k, v = self.kv(h).view(b, t, 2, self.kv_heads, self.hd).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        return x + self.out(y.transpose(1, 2).reshape(b, t, -1))


class SdpaLM(nn.Module):
    """A causal LM that calls F.scaled_dot_product_attention itself, with grouped-query heads."""

    def __init__(self, vocab: int, dim: int = 32, heads: int = 4, kv_heads: int = 2, layers: int = 2,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.randn(128, dim) * 0.02)
        self.layers = nn.ModuleList([SdpaBlock(dim, heads, kv_heads, dropout) for _ in range(layers)])
        self.head = nn.Linear(dim, vocab)

    def forward(self, idx, targets=None):
        x = self.emb(idx) + self.pos[: idx.shape[1]]
        for layer in self.layers:
            x = layer(x)
        logits = self.head(x)
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten()) if targets is not None else None
        return logits, loss

    def sharpen(self, factor: float) -> None:
        with torch.no_grad():
            for layer in self.layers:
                layer.q.weight.mul_(factor)
                layer.kv.weight[: layer.kv_heads * layer.hd].mul_(factor)  # the key half


class EncoderLM(nn.Module):
    """torch's own nn.TransformerEncoder as a causal LM (nn.MultiheadAttention, packed projections)."""

    def __init__(self, vocab: int, dim: int = 32, heads: int = 4, layers: int = 2) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.randn(128, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=64, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(dim, vocab)

    def forward(self, idx, targets=None):
        t = idx.shape[1]
        mask = nn.Transformer.generate_square_subsequent_mask(t)
        x = self.encoder(self.emb(idx) + self.pos[:t], mask=mask, is_causal=True)
        logits = self.head(x)
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten()) if targets is not None else None
        return logits, loss

    def sharpen(self, factor: float) -> None:
        with torch.no_grad():
            for layer in self.encoder.layers:
                e = layer.self_attn.embed_dim
                layer.self_attn.in_proj_weight[: 2 * e].mul_(factor)  # queries and keys


@pytest.fixture(scope="module")
def text():
    # Python's own standard library sources: real text on every machine, nothing downloaded.
    return read_corpus(None, 200_000)


def _opt(model):
    return torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)


def _train(model, data, steps, run_dir, config, sharpen_at=None, accum=1, factor=1.15):
    opt = _opt(model)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20))
    mon = monitor.attach(model, opt, scheduler=sched, run_dir=run_dir, config=config, max_steps=steps)
    try:
        for step in range(steps):
            if sharpen_at is not None and step >= sharpen_at:
                model.sharpen(factor)
            for micro in range(accum):
                x, y = data.batch(step * accum + micro)
                _, loss = model(x, y)
                (loss / accum).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
        mon.flush()
        return mon, [r for r in read_run(run_dir).records[0]]
    finally:
        mon.close()


def _records_with_attention(records):
    return {r.step: r.attention for r in records if r.attention}


def test_probe_statistics_reach_the_records_exactly(tmp_path, text):
    torch.manual_seed(0)
    data = TextData(text, block_size=24, batch_size=3, seed=0)
    model = SdpaLM(data.vocab_size)
    # What the first step's attention must be: q and k of the batch, at the initial weights.
    x, _ = data.batch(0)
    seen = {}

    def grab(name):
        def hook(mod, args, out):
            seen[name] = out.detach().clone()
        return hook

    handles = [layer.q.register_forward_hook(grab(f"q{i}")) for i, layer in enumerate(model.layers)]
    handles += [layer.kv.register_forward_hook(grab(f"kv{i}")) for i, layer in enumerate(model.layers)]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    cfg = {**QUIET, "attention": {"every": 5, "max_every": 5, "batch": 3}}  # the whole batch of 3
    _, records = _train(model, data, 12, tmp_path / "r", cfg)
    sampled = _records_with_attention(records)
    assert sorted(sampled) == [0, 5, 10]
    assert set(sampled[0]) == {"layers.0", "layers.1"}
    q0 = seen["q0"].view(3, 24, 4, 8).transpose(1, 2)
    k0 = seen["kv0"].view(3, 24, 2, 2, 8).permute(2, 0, 3, 1, 4)[0]
    want = attention_stats(q0, k0, is_causal=True, batch=3).tolist()
    got = sampled[0]["layers.0"]
    assert [got[s] for s in ("entropy_ratio", "entropy_min", "max_logit", "max_prob")] == pytest.approx(want, rel=1e-5)


@pytest.mark.slow
def test_sampled_statistics_in_tensorboard_prometheus_and_run_json(tmp_path, text):
    torch.manual_seed(0)
    data = TextData(text, block_size=16, batch_size=2, seed=1)
    model = SdpaLM(data.vocab_size, layers=6)
    cfg = {**QUIET, "attention": {"every": 4, "max_every": 4, "prometheus_layers": 3}}
    opt = _opt(model)
    with monitor.attach(model, opt, run_dir=tmp_path / "r", config=cfg) as mon:
        for step in range(9):
            x, y = data.batch(step)
            model(x, y)[1].backward()
            opt.step()
            opt.zero_grad()
        mon.flush()
        metrics = scrape(mon.metrics_url)
        layers = {dict(labels)["layer"] for (name, labels) in metrics if name == "trainmon_attention_entropy_ratio"}
        assert len(layers) == 3  # bounded: the three riskiest of six
        assert all(math.isfinite(sample(metrics, "trainmon_attention_max_logit", layer=la)) for la in layers)
        assert sample(metrics, "trainmon_attention_probe_interval_steps") == 4
        assert sample(metrics, "trainmon_attention_probe_seconds") > 0
    events = next((tmp_path / "r").rglob("events.out.tfevents.*"))
    acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
    acc.Reload()
    tags = acc.Tags()["scalars"]
    for layer in ("layers.0", "layers.5"):
        series = acc.Scalars(f"trainmon_attention/entropy_ratio/{layer}")
        assert [e.step for e in series] == [0, 4, 8]
        assert all(0 < e.value <= 1 for e in series)
    assert "trainmon_attention/max_logit/layers.3" in tags
    info = json.loads((tmp_path / "r" / "run.json").read_text())["attention_probe"]
    assert info["enabled"] and info["samples"] == 3 and info["every"] == 4 and info["median_cost_seconds"] > 0


@pytest.mark.slow
def test_interval_lengthens_when_the_probe_exceeds_its_budget(tmp_path, text):
    torch.manual_seed(0)
    data = TextData(text, block_size=16, batch_size=2, seed=1)
    model = SdpaLM(data.vocab_size)
    # A budget no probe can meet: once a plain step's time is known (after step 0), the interval
    # goes straight to max_every; still over budget there three times in a row, probing stops.
    cfg = {**QUIET, "attention": {"every": 2, "max_every": 8, "budget": 1e-9}}
    mon, records = _train(model, data, 30, tmp_path / "r", cfg)
    assert sorted(_records_with_attention(records)) == [0, 2, 10, 18]
    probe = json.loads((tmp_path / "r" / "run.json").read_text())["attention_probe"]
    assert probe["every"] == 8 and probe["enabled"] is False and "attention.max_every" in probe["off"]


def test_schedule_budget_arithmetic_and_movement():
    s = ProbeSchedule(every=10, max_every=640, budget=0.01, start_step=3)
    assert s.next == 10 and not s.due(9) and s.due(10)
    for _ in range(5):
        s.plain_step(0.1)
    s.probed(10, cost=0.05)  # 5% of one step: fits 1% at an interval of 5 steps x10 -> 80
    assert s.every == 80 and s.next == 90
    s.probed(90, cost=0.001)  # now cheap: back towards 10 while the share stays below a quarter
    assert s.every == 10 and s.next == 100
    s.probed(100, cost=0.05)
    assert s.every == 80
    assert not s.observe(180, {"a": {"entropy_ratio": 0.9, "max_logit": 4.0}})
    assert not s.observe(260, {"a": {"entropy_ratio": 0.85, "max_logit": 7.0}})
    s.next = 340
    assert s.observe(260, {"a": {"entropy_ratio": 0.5, "max_logit": 7.0}})  # entropy fell by 0.35
    assert s.next == 270
    assert s.observe(270, {"a": {"entropy_ratio": 0.5, "max_logit": float("nan")}})
    hurried = s.hurried
    s.probed(280, cost=0.001)  # the training thread probed again before the publisher saw the next sample
    after = s.next
    assert s.observe(275, {"a": {"entropy_ratio": 0.2, "max_logit": 7.0}})  # it moved, seen a batch late:
    assert s.next == after and s.hurried == hurried  # a later probe followed it already, nothing comes forward


@pytest.mark.slow
def test_bitwise_identical_with_the_probe_on_every_step_and_attention_dropout(tmp_path, text):
    data = TextData(text, block_size=16, batch_size=2, seed=2)

    def run(config):
        torch.manual_seed(3)
        model = SdpaLM(data.vocab_size, dropout=0.1)  # attention dropout draws from the global RNG
        opt = _opt(model)
        mon = monitor.attach(model, opt, run_dir=tmp_path / str(len(list(tmp_path.iterdir()))),
                             config=config) if config else None
        for step in range(6):
            for micro in range(2):
                x, y = data.batch(2 * step + micro)
                (model(x, y)[1] / 2).backward()
            opt.step()
            opt.zero_grad()
        if mon:
            mon.flush()
            assert len(_records_with_attention(read_run(mon.run_dir).records[0])) == 6
            mon.close()
        return model.state_dict(), torch.get_rng_state()

    plain, rng = run(None)
    probed, rng_probed = run({**QUIET, "attention": {"every": 1, "max_every": 1}})
    assert all(torch.equal(plain[k], probed[k]) for k in plain)
    assert torch.equal(rng, rng_probed)


@pytest.mark.slow
def test_only_the_first_micro_batch_is_probed_and_a_raising_forward_leaves_no_mode(tmp_path, text):
    data = TextData(text, block_size=16, batch_size=2, seed=2)
    torch.manual_seed(0)
    model = SdpaLM(data.vocab_size)
    opt = _opt(model)
    original = F.scaled_dot_product_attention
    with monitor.attach(model, opt, run_dir=tmp_path / "r", config={**QUIET, "attention": {"every": 1}}) as mon:
        x, y = data.batch(0)
        with pytest.raises(ValueError):  # the forward raises inside the probed region
            model(x, y[:, :-1])  # wrong target shape: cross_entropy raises after attention ran
        assert not torch.overrides._is_torch_function_mode_enabled()
        assert F.scaled_dot_product_attention is original
        opt.zero_grad()
        for micro in range(3):
            x, y = data.batch(micro)
            model(x, y)[1].backward()
        opt.step()
        mon.flush()
        recs = read_run(mon.run_dir).records[0]
    assert set(recs[0].attention) == {"layers.0", "layers.1"}  # one entry per layer, not one per micro-batch
    assert mon.internal_errors == 0


class ManualAttention(nn.Module):
    """Attention the probe cannot see (a hand-written softmax, as a custom kernel would be)."""

    def __init__(self, vocab: int, mon_ref: list) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, 16)
        self.qk = nn.Linear(16, 32)
        self.head = nn.Linear(16, vocab)
        self.mon_ref = mon_ref

    def forward(self, idx, targets):
        x = self.emb(idx)
        q, k = self.qk(x).view(*idx.shape, 2, 2, 8).permute(2, 0, 3, 1, 4)
        logits = q @ k.transpose(-1, -2) / math.sqrt(8)
        causal = torch.ones(idx.shape[1], idx.shape[1], dtype=torch.bool).tril()
        if self.mon_ref:
            self.mon_ref[0].observe_attention(q, k, layer="manual", mask=causal)
        w = logits.masked_fill(~causal, float("-inf")).softmax(-1)
        y = (w @ x[:, None]).mean(1)
        return F.cross_entropy(self.head(y).flatten(0, 1), targets.flatten())


def _manual_run(tmp_path, text, compile_backend=None, before=None):
    """ManualAttention for 7 steps with the probe every 3 steps; the records with attention."""
    data = TextData(text, block_size=12, batch_size=2, seed=4)
    torch.manual_seed(0)
    ref: list = []
    model = ManualAttention(data.vocab_size, ref)
    opt = _opt(model)
    run = torch.compile(model, backend=compile_backend) if compile_backend else model
    cfg = {**QUIET, "attention": {"every": 3, "max_every": 3}}
    with monitor.attach(run, opt, run_dir=tmp_path / "r", config=cfg) as mon:
        ref.append(mon)
        if before is not None:
            before(mon)
        for step in range(7):
            x, y = data.batch(step)
            run(x, y).backward()
            opt.step()
            opt.zero_grad()
        mon.flush()
        assert mon.internal_errors == 0
        return _records_with_attention(read_run(mon.run_dir).records[0])


@pytest.mark.slow
def test_observe_attention_for_kernels_the_probe_cannot_see(tmp_path, text):
    def bad_calls(mon):
        assert mon.attention_due  # step 0 is sampled: a caller may skip building q and k otherwise
        with pytest.raises(TypeError, match="layer"):
            mon.observe_attention(torch.ones(1, 1, 2, 2), torch.ones(1, 1, 2, 2), layer="")
        with pytest.raises(TypeError, match="`q` and `k`"):
            mon.observe_attention(layer="x")

    sampled = _manual_run(tmp_path, text, before=bad_calls)
    assert sorted(sampled) == [0, 3, 6] and set(sampled[0]) == {"manual"}
    assert 0 < sampled[0]["manual"]["entropy_ratio"] <= 1


@pytest.mark.slow
def test_observe_attention_inside_a_compiled_forward(tmp_path, text):
    # dynamo traces the forward (the eager backend needs no C++ build); the call runs eagerly outside
    # the graph, so "is this step sampled?" is asked anew each step.
    assert sorted(_manual_run(tmp_path, text, compile_backend="eager")) == [0, 3, 6]


@pytest.mark.slow
def test_compiled_models_turn_the_probe_off_and_say_why(tmp_path):
    model = GPT(GPTConfig(vocab_size=16))
    compiled = torch.compile(model)  # not run: the check looks at the wrapper only
    opt = _opt(model)
    with monitor.attach(compiled, opt, run_dir=tmp_path / "r", config=QUIET):
        pass
    info = json.loads((tmp_path / "r" / "run.json").read_text())["attention_probe"]
    assert info["enabled"] is False and "observe_attention" in info["off"]
    model.blocks[1] = torch.compile(model.blocks[1])  # one compiled block is enough to keep the mode out
    with monitor.attach(model, opt, run_dir=tmp_path / "r2", config=QUIET):
        pass
    assert json.loads((tmp_path / "r2" / "run.json").read_text())["attention_probe"]["enabled"] is False


def _attention_alerts(mon):
    return [a for a in mon.alerts if a.rule.startswith("attention.")]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sdpa", "transformer-encoder"])
def test_sharpening_attention_is_detected_within_30_steps_and_not_before(tmp_path, text, kind):
    torch.manual_seed(0)
    data = TextData(text, block_size=32, batch_size=4, seed=5)
    model = SdpaLM(data.vocab_size) if kind == "sdpa" else EncoderLM(data.vocab_size)
    # Queries and keys grow 1.15x per step from step 80 (logits 1.3x per step), as in runs whose
    # attention logits blow up. The probe's interval is pinned at its default 10: this model's CPU
    # step is a few ms, and the budget would stretch it.
    at = 80
    cfg = {**QUIET, "attention": {"max_every": 10}}
    mon, records = _train(model, data, at + 31, tmp_path / "r", cfg, sharpen_at=at)
    alerts = _attention_alerts(mon)
    first = {a.rule: a.step for a in reversed(alerts)}
    assert alerts and all(a.step >= at for a in alerts), [(a.rule, a.step, a.message) for a in alerts]
    assert min(first.values()) <= at + 30
    assert any(a.severity.value in ("warning", "critical") for a in alerts)
    assert len(_records_with_attention(records)) >= 10


@pytest.mark.slow
def test_healthy_models_raise_no_attention_alert(tmp_path, text):
    for kind in ("sdpa", "transformer-encoder"):
        torch.manual_seed(1)
        data = TextData(text, block_size=32, batch_size=4, seed=6)
        model = SdpaLM(data.vocab_size) if kind == "sdpa" else EncoderLM(data.vocab_size)
        mon, records = _train(model, data, 200, tmp_path / kind, {**QUIET, "attention": {"max_every": 10}})
        assert _attention_alerts(mon) == [], kind
        assert len(_records_with_attention(records)) == 20
