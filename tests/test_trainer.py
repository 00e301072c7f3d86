"""The reference trainer: schedules, model, data, config, faults and the loop, with real (short) runs."""

from __future__ import annotations

import math

import pytest
import torch

from monitor.trainer import FAULTS, GPT, PRESETS, GPTConfig, TrainConfig, train
from monitor.trainer.config import healthy_warmup
from monitor.trainer.data import SyntheticData, TextData, build_data, read_corpus
from monitor.trainer.faults import parse_fault, parse_faults
from monitor.trainer.loop import latest_checkpoint
from monitor.trainer.schedules import SCHEDULES, ScheduleSpec, build_scheduler, lr_multiplier


def run(steps: int = 20, **overrides):
    """A short quiet tiny run without the monitor."""
    overrides.setdefault("warmup_steps", min(5, steps))
    return train(
        TrainConfig.from_preset("tiny", max_steps=steps, **overrides), attach_monitor=False, progress=False
    )


# --- schedules -------------------------------------------------------------------------------------

W, N, LO = 100, 1000, 0.1


@pytest.mark.parametrize(
    "kind, at_end, probe_step, probe_value",
    [
        ("cosine", LO, (W + N) // 2, (1 + LO) / 2),  # half-way through the decay: half-way down
        ("linear", LO, (W + N) // 2, (1 + LO) / 2),
        ("polynomial", LO, (W + N) // 2, LO + (1 - LO) * 0.25),  # power 2
        ("inverse_sqrt", math.sqrt(W / N), 4 * W, 0.5),
        ("constant_cooldown", LO, 700, 1.0),  # cooldown is the last 20%: flat until step 800
        ("constant", 1.0, 700, 1.0),
    ],
)
def test_schedule_multipliers_at_known_points(kind, at_end, probe_step, probe_value):
    spec = ScheduleSpec(kind, warmup_steps=W, max_steps=N, min_lr_ratio=LO, power=2.0, cooldown_frac=0.2)
    assert spec.lr_multiplier(0) == 0.0  # warmup starts from zero
    assert spec.lr_multiplier(W // 2) == pytest.approx(0.5)
    assert spec.lr_multiplier(W) == pytest.approx(1.0)  # end of warmup: the peak
    assert spec.lr_multiplier(N) == pytest.approx(at_end)
    assert spec.lr_multiplier(N + 500) == pytest.approx(spec.lr_multiplier(N)) or kind == "inverse_sqrt"
    assert spec.lr_multiplier(probe_step) == pytest.approx(probe_value)
    # Never above the peak, never negative.
    assert all(0.0 <= spec.lr_multiplier(s) <= 1.0 + 1e-12 for s in range(0, N + 1, 7))


def test_constant_cooldown_is_linear_over_last_fraction():
    spec = ScheduleSpec("constant_cooldown", warmup_steps=W, max_steps=N, min_lr_ratio=LO, cooldown_frac=0.2)
    assert spec.lr_multiplier(800) == 1.0
    assert spec.lr_multiplier(900) == pytest.approx((1 + LO) / 2)


def test_seed_lesson_exercise():
    # base_lr 1e-4, warmup 1000, max 10000: LR at step 500 is 5e-5.
    assert 1e-4 * lr_multiplier(500, "cosine", warmup_steps=1000, max_steps=10_000) == pytest.approx(5e-5)


def test_unknown_schedule_is_named():
    with pytest.raises(ValueError, match="'cosin'.*cosine"):
        ScheduleSpec("cosin", warmup_steps=1, max_steps=2)


@pytest.mark.parametrize("kind", SCHEDULES)
def test_lambdalr_first_step_is_never_zero_and_last_is_the_floor(kind):
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=1e-3)
    spec = ScheduleSpec(kind, warmup_steps=10, max_steps=50, min_lr_ratio=LO)
    sched = build_scheduler(opt, spec)
    lrs = []
    for _ in range(50):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(1e-3 / 10)  # update 1 runs at 1/warmup of the peak
    assert lrs[9] == pytest.approx(1e-3)  # update 10 ends warmup
    assert lrs[-1] == pytest.approx(1e-3 * spec.lr_multiplier(50))


# --- model -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("post_ln", [False, True])
def test_forward_returns_logits_and_scalar_loss(post_ln):
    model = GPT(GPTConfig(vocab_size=32, block_size=16, n_layer=2, n_head=2, n_embd=16, post_ln=post_ln))
    idx = torch.randint(32, (3, 16))
    logits, loss = model(idx, idx)
    assert logits.shape == (3, 16, 32)
    assert loss.dim() == 0 and torch.isfinite(loss)
    logits2, none = model(idx)
    assert none is None and torch.equal(logits, logits2)
    names = dict(model.named_modules())
    assert "blocks.0.attn" in names and "blocks.1.attn" in names
    assert model.lm_head.weight is model.wte.weight


def test_qk_gain_one_is_a_no_op_and_other_values_change_attention():
    model = GPT(GPTConfig(vocab_size=32, block_size=16, n_layer=1, n_head=2, n_embd=16), seed=3)
    for p in model.parameters():  # make attention non-trivial
        p.data.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    idx = torch.randint(32, (2, 16), generator=torch.Generator().manual_seed(1))
    base, _ = model(idx)
    model.blocks[0].attn.qk_gain = 1.0
    assert torch.equal(model(idx)[0], base)
    model.blocks[0].attn.qk_gain = 8.0
    assert not torch.allclose(model(idx)[0], base)


def test_init_is_seeded_locally():
    cfg = GPTConfig(vocab_size=32, block_size=16, n_layer=1, n_head=2, n_embd=16)
    a = GPT(cfg, seed=5)
    torch.rand(1000)  # global RNG use in between must not matter
    b = GPT(cfg, seed=5)
    assert all(
        torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )


@pytest.mark.slow
@pytest.mark.parametrize("post_ln", [False, True])
def test_pre_and_post_ln_both_learn_synthetic_data(post_ln):
    r = run(60, post_ln=post_ln, warmup_steps=10)
    assert r.first_loss == pytest.approx(math.log(256), abs=0.1)
    assert r.final_loss < r.first_loss - 1.0
    assert all(math.isfinite(x) for x in r.losses)


# --- data ------------------------------------------------------------------------------------------


def test_synthetic_batches_are_deterministic_and_shifted():
    d = SyntheticData(vocab_size=64, block_size=32, batch_size=4, seed=7)
    x, y = d.batch(3)
    assert x.shape == y.shape == (4, 32) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal(d.batch(3)[0], x)
    assert not torch.equal(d.batch(4)[0], x)
    assert torch.equal(SyntheticData(vocab_size=64, block_size=32, batch_size=4, seed=7).batch(3)[0], x)


def test_text_data_from_stdlib_sources():
    cfg = TrainConfig(data="text", text_max_bytes=200_000, block_size=32, batch_size=4)
    d = build_data(cfg, torch.device("cpu"))
    assert isinstance(d, TextData)
    assert 50 < d.vocab_size < 300  # characters of Python source
    x, y = d.batch(0)
    assert x.shape == (4, 32) and x.dtype == torch.int64 and int(x.max()) < d.vocab_size
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert "def " in read_corpus(None, 200_000)
    assert d.decode(x[0]) in read_corpus(None, 200_000)


def test_text_data_from_given_paths(tmp_path):
    (tmp_path / "a.txt").write_text("hello world " * 50)
    (tmp_path / "b.md").write_text("abc " * 50)
    d = TextData.from_paths([str(tmp_path)], 10_000, block_size=8, batch_size=2, seed=0)
    assert d.decode(range(d.vocab_size)) == " abcdehlorw"
    with pytest.raises(FileNotFoundError, match="nope"):
        read_corpus([str(tmp_path / "nope")], 100)


@pytest.mark.slow
def test_text_run_learns():
    r = run(30, data="text", text_max_bytes=100_000, lr=3e-3)
    assert r.final_loss < r.first_loss - 1.0


# --- config ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_build_with_healthy_warmup(name):
    cfg = TrainConfig.from_preset(name)
    beta2 = cfg.betas[1]
    assert cfg.warmup_steps >= 2 / (1 - beta2) and cfg.warmup_steps >= 0.01 * cfg.max_steps
    assert cfg.grad_clip == 1.0 and cfg.weight_decay == 0.1 and cfg.betas == (0.9, 0.95)


def test_warmup_default_follows_max_steps():
    assert TrainConfig(max_steps=10_000).warmup_steps == 100
    assert TrainConfig(max_steps=200).warmup_steps == 40
    assert healthy_warmup(10, 0.95) == 10
    assert TrainConfig(warmup_steps=0).warmup_steps == 0


def test_unknown_preset_and_field_are_named():
    with pytest.raises(ValueError, match="'huge'.*tiny, small, medium"):
        TrainConfig.from_preset("huge")
    with pytest.raises(ValueError, match="'n_layers'.*did you mean 'n_layer'"):
        TrainConfig.from_preset("tiny", n_layers=3)
    with pytest.raises(ValueError, match="bogus"):
        TrainConfig(bogus=1)
    with pytest.raises(ValueError, match="divisible"):
        TrainConfig(n_embd=30, n_head=4)


# --- determinism and checkpoints -------------------------------------------------------------------


@pytest.mark.slow
def test_same_seed_same_bits_other_seed_other_bits():
    a, b = run(15, grad_accum=2), run(15, grad_accum=2)
    assert a.param_hash == b.param_hash and a.losses == b.losses
    assert run(15, grad_accum=2, seed=2).param_hash != a.param_hash


@pytest.mark.slow
def test_checkpoint_resume_is_bitwise_equal_to_uninterrupted(tmp_path):
    common = dict(grad_accum=2, warmup_steps=6)
    full = run(20, **common)
    ckpt = str(tmp_path / "ckpt")
    first = train(
        TrainConfig.from_preset("tiny", max_steps=20, checkpoint_dir=ckpt, checkpoint_every=4, **common),
        attach_monitor=False,
        progress=False,
        on_step=lambda info: info.step == 9,
    )
    assert first.stopped_early and first.steps == 10
    assert latest_checkpoint(ckpt).name == "ckpt_0000010.pt"
    rest = run(20, checkpoint_dir=ckpt, resume=True, **common)
    assert (rest.start_step, rest.steps) == (10, 10)
    assert rest.lrs == full.lrs[10:] and rest.losses == full.losses[10:]
    assert rest.param_hash == full.param_hash
    assert latest_checkpoint(ckpt).name == "ckpt_0000020.pt"


@pytest.mark.slow
def test_resume_without_checkpoint_starts_from_scratch(tmp_path):
    r = run(5, checkpoint_dir=str(tmp_path), resume=True)
    assert (r.start_step, r.steps) == (0, 5)


@pytest.mark.slow
def test_plain_progress_lines(capsys):
    train(TrainConfig.from_preset("tiny", max_steps=10, log_every=5), attach_monitor=False, progress=None)
    out = capsys.readouterr().out
    assert "step      5/10 | loss" in out and "step     10/10" in out and "steps/s" in out
    train(TrainConfig.from_preset("tiny", max_steps=3), attach_monitor=False, progress=False)
    assert capsys.readouterr().out == ""


# --- precision -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_fp16_on_cpu_uses_an_enabled_grad_scaler():
    r = run(10, precision="fp16")
    assert r.loss_scale is not None and r.loss_scale > 1
    assert all(math.isfinite(x) for x in r.losses)


@pytest.mark.slow
def test_bf16_has_no_scaler():
    r = run(10, precision="bf16")
    assert r.loss_scale is None and r.skipped_steps == 0
    assert all(math.isfinite(x) for x in r.losses)


# --- faults ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(FAULTS))
def test_every_fault_has_a_doc_and_parses(name):
    spec = FAULTS[name]
    assert spec.name == name and len(spec.doc) > 100
    flag = f"{name}:7" if spec.required else name
    fault = parse_fault(flag)
    assert fault.spec is spec and fault.value == (7 if spec.required else spec.default)
    if spec.arg is not None:
        assert parse_fault(f"{name}:3").value == 3
    TrainConfig(faults=[flag])


@pytest.mark.parametrize(
    "flags, match",
    [
        (["bogus"], r"unknown fault 'bogus'; valid faults: no-warmup, lr-too-high\[:FACTOR\]"),
        (["nan-at"], r"'nan-at' needs an argument: nan-at:STEP"),
        (["nan-at:x"], r"'nan-at:x': STEP must be an integer"),
        (["nan-at:-1"], r"must be positive"),
        (["lr-too-high:0"], r"must be positive"),
        (["lr-too-high:nan"], r"must be positive"),
        (["no-warmup:3"], r"'no-warmup:3' takes no argument"),
        (["no-warmup", "no-warmup"], r"more than once: no-warmup"),
    ],
)
def test_bad_fault_flags_are_named(flags, match):
    with pytest.raises(ValueError, match=match):
        parse_faults(flags)
    with pytest.raises(ValueError, match=match):
        TrainConfig(faults=flags)


@pytest.mark.slow
def test_no_warmup_first_update_at_peak():
    cfg = TrainConfig.from_preset("tiny", faults=["no-warmup"])
    r = train(cfg, attach_monitor=False, progress=False, on_step=lambda info: info.step == 2)
    assert r.config.warmup_steps == 0 and r.lrs[0] == pytest.approx(r.config.lr, rel=1e-3)
    assert run(5).lrs[0] == pytest.approx(r.config.lr / 5)  # vs. warmup: 1/warmup_steps of the peak


@pytest.mark.slow
def test_lr_too_high_multiplies_peak_and_destabilises():
    healthy, bad = run(100, warmup_steps=None), run(100, warmup_steps=None, faults=["lr-too-high"])
    assert bad.config.lr == pytest.approx(500 * healthy.config.lr)
    assert max(bad.grad_norms[20:]) > 3 * max(healthy.grad_norms[20:])
    assert max(bad.losses[20:]) > 2 * min(bad.losses[:20])  # a spike above where it had got to
    assert bad.final_loss > 3 * healthy.final_loss


@pytest.mark.slow
def test_per_microbatch_scheduler_runs_the_schedule_grad_accum_times_too_fast():
    with pytest.warns(UserWarning, match=r"lr_scheduler.step\(\)` before `optimizer.step\(\)"):
        r = run(12, warmup_steps=40, faults=["per-microbatch-scheduler"])  # torch notices, as in real life
    assert (r.config.grad_accum, r.config.batch_size) == (4, 2)
    spec = ScheduleSpec.from_config(r.config)
    assert r.lrs[:10] == pytest.approx([r.config.lr * spec.lr_multiplier(4 * k + 1) for k in range(10)])


@pytest.mark.slow
def test_fp16_overflow_collapses_the_loss_scale():
    r = run(30, faults=["fp16-overflow:5"])
    assert r.config.precision == "fp16"
    assert r.skipped_steps >= 17
    assert r.loss_scale < 1.0  # 65536 halved on every skipped step
    assert all(not math.isfinite(g) for g in r.grad_norms[5:22])


@pytest.mark.slow
def test_nan_at_makes_that_steps_loss_nan():
    r = run(8, faults=["nan-at:4"])
    assert all(math.isfinite(x) for x in r.losses[:4])
    assert math.isnan(r.losses[4])
    assert not any(torch.isfinite(p).all() for p in r.model.parameters())  # fp32: the run is dead


@pytest.mark.slow
def test_attention_sharpen_raises_qk_gain_from_its_step():
    gains = []
    train(
        TrainConfig.from_preset("tiny", max_steps=12, faults=["attention-sharpen:2"]),
        attach_monitor=False,
        progress=False,
        on_step=lambda info: gains.append(info.run.model.blocks[1].attn.qk_gain),
    )
    assert gains[:2] == [1.0, 1.0]
    assert gains[2] == pytest.approx(1.25) and gains[11] == pytest.approx(1.25**10)


@pytest.mark.slow
def test_resume_without_scheduler_restarts_warmup(tmp_path):
    r = run(20, warmup_steps=5, faults=["resume-without-scheduler:12"], checkpoint_dir=str(tmp_path))
    assert r.lrs[12] == pytest.approx(r.lrs[0]) and r.lrs[11] > 2.5 * r.lrs[12]
    assert r.lrs[12:17] == pytest.approx(r.lrs[:5])
    assert (tmp_path / "ckpt_0000012.pt").exists()
    # Without a checkpoint_dir it uses a temporary one; default step is mid-run, after warmup.
    r = run(20, warmup_steps=5, faults=["resume-without-scheduler"])
    assert r.lrs[10] == pytest.approx(r.lrs[0])


def test_the_gpt2_preset_is_gpt2_124m_shaped():
    """The GPU check's device-bound workload: GPT-2 small's shape (built on the meta device: no memory)."""
    from monitor.trainer.model import GPT, GPTConfig

    cfg = TrainConfig.from_preset("gpt2")
    with torch.device("meta"):
        model = GPT(GPTConfig(vocab_size=cfg.synthetic_vocab, block_size=cfg.block_size, n_layer=cfg.n_layer,
                              n_head=cfg.n_head, n_embd=cfg.n_embd))
    assert (cfg.n_layer, cfg.n_embd, cfg.block_size, cfg.precision) == (12, 768, 1024, "bf16")
    assert 124e6 < model.num_params() < 125e6  # GPT-2 small: 124M with tied embeddings
    assert len(list(model.parameters())) == 148
