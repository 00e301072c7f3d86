"""The Hugging Face Trainer with TrainmonCallback: real Trainer, tiny GPT-2 / Llama built from config."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from monitor.integrations.transformers import TrainmonCallback  # noqa: E402
from monitor.runlog.reader import read_run  # noqa: E402

VOCAB = 64
QUIET = {"metrics": {"enabled": False}, "console": {"enabled": False}}


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int = 64, t: int = 16, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randint(0, VOCAB, (n, t), generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "labels": self.x[i]}


def gpt2():
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                                  attn_implementation="sdpa")
    return transformers.GPT2LMHeadModel(cfg)


def llama():
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                   attn_implementation="sdpa")
    return transformers.LlamaForCausalLM(cfg)


class UsedLR(transformers.TrainerCallback):
    """The LR the optimizer steps with, read just before each step."""

    def __init__(self) -> None:
        self.lrs: list[float] = []

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        self.lrs.append(optimizer.param_groups[0]["lr"])


def train(tmp_path, model, *, steps=8, accum=2, config=None, **args):
    torch.manual_seed(0)
    cb, used = TrainmonCallback(config={**QUIET, **(config or {})}), UsedLR()
    args = {"learning_rate": 1e-3, "warmup_steps": 4, "save_strategy": "no", **args}
    targs = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=4, gradient_accumulation_steps=accum,
        logging_steps=1, report_to="none", use_cpu=True, disable_tqdm=True, **args)
    trainer = transformers.Trainer(model=model, args=targs, train_dataset=Tokens(), callbacks=[cb, used])
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    return cb, used, logged, trainer


@pytest.mark.slow
@pytest.mark.parametrize("build", [gpt2, llama])
def test_records_equal_what_the_trainer_logs(tmp_path, build):
    cb, used, logged, _ = train(tmp_path, build(), config={"attention": {"every": 2, "max_every": 2}})
    mon = cb.monitor
    assert mon.run_dir.parent == tmp_path / "trainmon"
    recs = read_run(mon.run_dir).records[0]
    assert [r.step for r in recs] == list(range(8))  # one record per optimizer step, not per micro-batch
    assert [r.micro_batches for r in recs] == [2] * 8
    assert [r.loss for r in recs] == pytest.approx([h["loss"] for h in logged], rel=1e-5)
    assert [r.grad_norm for r in recs] == pytest.approx([h["grad_norm"] for h in logged], rel=1e-6)
    assert [r.lr[0] for r in recs] == used.lrs
    assert all(r.max_norm == 1.0 for r in recs)
    probed = [r for r in recs if r.attention]
    assert [r.step for r in probed] == [0, 2, 4, 6]
    assert len(probed[0].attention) == 2 and all(0 < s["entropy_ratio"] <= 1 for s in probed[0].attention.values())
    assert mon.internal_errors == 0


@pytest.mark.slow
def test_a_healthy_run_with_warmup_is_quiet(tmp_path):
    cb, *_ = train(tmp_path, gpt2(), steps=60, accum=1, warmup_steps=40, adam_beta2=0.95)
    assert [a.line() for a in cb.monitor.alerts if a.severity.value != "info"] == []


@pytest.mark.slow
def test_no_warmup_at_a_from_scratch_lr_raises_warmup_missing(tmp_path):
    cb, *_ = train(tmp_path, gpt2(), steps=10, accum=1, warmup_steps=0)
    assert "warmup.missing" in {a.rule for a in cb.monitor.alerts}


@pytest.mark.slow
def test_halt_saves_a_checkpoint_and_stops_without_an_exception(tmp_path):
    """halt_on=warning with no warmup: the Trainer saves and stops; train() returns normally."""
    cb, _, logged, trainer = train(tmp_path, gpt2(), steps=20, accum=1, warmup_steps=0,
                                   config={"halt_on": "warning"})
    assert trainer.state.global_step < 20
    assert (tmp_path / f"checkpoint-{trainer.state.global_step}").is_dir()
    assert cb.monitor.halt_requested and "warmup.missing" in cb.monitor.halt_requested
    # `monitor watch <output_dir>` finds this run once: ours, not also the Trainer's checkpoint state beside it
    from monitor.runlog.adapters import discover

    assert discover([tmp_path]) == [cb.monitor.run_dir]


def test_a_bad_config_fails_when_the_callback_is_built():
    import monitor

    with pytest.raises(monitor.ConfigError, match="metrics.prot"):
        TrainmonCallback(config={"metrics": {"prot": 1}})


@pytest.mark.slow
def test_under_torchrun_each_rank_reports_its_share_and_their_mean_is_the_logged_loss(tmp_path):
    """DDP over gloo: with num_items_in_batch and tokens averaged across processes, a rank's share is
    scaled by the world size; the ranks' records average to exactly what the Trainer logs."""
    import json

    from conftest import torchrun_worker

    torchrun_worker("hf_ddp.py", str(tmp_path))
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["world"] == 2
    recs = read_run(result["run_dir"]).records
    assert sorted(recs) == [0, 1] and [len(recs[0]), len(recs[1])] == [6, 6]
    mean = [(a.loss + b.loss) / 2 for a, b in zip(recs[0], recs[1])]
    assert mean == pytest.approx(result["loss"], rel=1e-6)
    assert [r.grad_norm for r in recs[0]] == pytest.approx(result["grad_norm"], rel=1e-6)
    assert all(r.local_grad_norm is not None for r in recs[1])  # each rank's own, before the all-reduce


@pytest.mark.slow
def test_resume_from_checkpoint_goes_on_in_the_same_run_directory(tmp_path):
    """trainer.train(resume_from_checkpoint=...) is a new attempt of the run it resumes, at the Trainer's
    global step; the records of both read as one run."""
    first, *_ = train(tmp_path, gpt2(), steps=8, accum=1, save_strategy="steps", save_steps=4)
    run_dir = first.monitor.run_dir
    torch.manual_seed(0)
    cb = TrainmonCallback(config=QUIET)
    targs = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=8, per_device_train_batch_size=4, learning_rate=1e-3, warmup_steps=4,
        logging_steps=1, report_to="none", use_cpu=True, disable_tqdm=True, save_strategy="no")
    transformers.Trainer(model=gpt2(), args=targs, train_dataset=Tokens(), callbacks=[cb]).train(
        resume_from_checkpoint=str(tmp_path / "checkpoint-4"))
    assert cb.monitor.run_dir == run_dir
    assert (cb.monitor.attempt.id, cb.monitor.attempt.kind, cb.monitor.attempt.start_step, cb.monitor.attempt.how) == (
        2, "resumed", 4, "resume_step")
    recs = read_run(run_dir).records[0]
    assert [(r.attempt, r.step) for r in recs] == [(1, s) for s in range(4)] + [(2, s) for s in range(4, 8)]
    assert [a.line() for a in cb.monitor.alerts if a.severity.value != "info"] == []
