"""Hugging Face trainer_state.json and Lightning CSVLogger metrics.csv as Sources.

The inputs are made for real where it matters: a tiny GPT-2 trained by `transformers.Trainer` (built from
its config, nothing downloaded) and a tiny LightningModule trained by `lightning.pytorch.Trainer` with a
CSVLogger, each tailed while it trains by a callback that polls the source at each save / batch. Tailing
edge cases (appends, rewrites, shrinking, half-written and garbage files) run on hand-written files.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from monitor.cli.app import app
from monitor.config import load_config
from monitor.runlog.adapters import (
    HFStateSource,
    LightningCSVSource,
    SourceError,
    TensorBoardSource,
    discover,
    open_source,
    read_all,
)
from monitor.watch.daemon import Watcher

runner = CliRunner()


def everything(source) -> list:
    return source.poll() + source.flush()


def steps(records) -> list[int]:
    return [r.step for r in records]


def signals(records) -> list[tuple]:
    """What a record says, without its time (the file's mtime when it was read)."""
    return [(r.step, r.loss, r.lr, r.grad_norm, r.param_norms, r.scalars) for r in records]


class Touch:
    """Writes files with a strictly increasing mtime, as files written seconds apart have (the kernel's
    timestamps are coarser than a test's back-to-back writes)."""

    def __init__(self) -> None:
        self.ns = 1_700_000_000 * 10**9

    def write(self, path: Path, data: str | bytes, mode: str = "w") -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "ab" if mode == "a" else "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        self.ns += 10**9
        os.utime(path, ns=(self.ns, self.ns))


# == Hugging Face: a real Trainer ====================================================================


def _hf_train(out: Path, report_to: str, callbacks=()) -> None:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

    class Tokens(torch.utils.data.Dataset):
        def __init__(self, n: int, seed: int) -> None:
            self.x = torch.randint(0, 64, (n, 16), generator=torch.Generator().manual_seed(seed))

        def __len__(self) -> int:
            return len(self.x)

        def __getitem__(self, i):
            return {"input_ids": self.x[i], "labels": self.x[i]}

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=64, n_positions=32))
    args = TrainingArguments(output_dir=str(out), max_steps=12, logging_steps=1, save_steps=6, report_to=report_to,
                             use_cpu=True, per_device_train_batch_size=4, per_device_eval_batch_size=8,
                             eval_strategy="steps", eval_steps=4, warmup_steps=4, disable_tqdm=True, seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=Tokens(48, 0), eval_dataset=Tokens(16, 1),
                      callbacks=list(callbacks))
    trainer.train()
    trainer.save_state()  # what the example scripts do: output_dir/trainer_state.json, with the summary entry


@pytest.fixture(scope="module")
def hf_run(tmp_path_factory):
    """A 12-step run with report_to="none", checkpoints at 6 and 12, tailed at each save."""
    pytest.importorskip("transformers")
    from transformers import TrainerCallback

    out = tmp_path_factory.mktemp("hf") / "gpt2-tiny"
    out.mkdir()
    tail = HFStateSource(out)
    polls: list[tuple[int, list]] = []

    class PollOnSave(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            polls.append((state.global_step, tail.poll()))

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        _hf_train(out, "none", [PollOnSave()])
    polls.append((-1, tail.poll()))  # after save_state: the top-level file, nothing new in it
    return out, tail, polls


@pytest.mark.slow
def test_trainer_state_records_are_log_history(hf_run):
    out, _, _ = hf_run
    src = open_source(out)
    assert isinstance(src, HFStateSource) and src.info.source == "huggingface" and src.info.run_id == "gpt2-tiny"
    recs = read_all(src)[0]
    assert src.file == out / "trainer_state.json" and src.problems == [] and src.info.max_steps == 12
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    train = [e for e in history if "loss" in e]
    evals = {e["step"]: e["eval_loss"] for e in history if "eval_loss" in e}
    assert [e["step"] for e in train] == list(range(1, 13))  # HF's global_step: the first step logs at 1
    assert steps(recs) == list(range(1, 13))  # one record per training entry; no summary record
    for r, e in zip(recs, train):
        assert (r.loss, r.lr, r.grad_norm) == (e["loss"], [e["learning_rate"]], e["grad_norm"])
        assert r.scalars == ({"val_loss": evals[r.step]} if r.step in evals else {})
    assert sorted(evals) == [4, 8, 12] and all(math.isfinite(v) for v in evals.values())
    assert recs[0].lr[0] < recs[3].lr[0]  # the warmup is there: 4 steps up to 5e-5
    # a checkpoint dir, and the file itself, open as the same run up to that checkpoint
    ck = open_source(out / "checkpoint-6")
    assert isinstance(ck, HFStateSource) and ck.info.run_id == "gpt2-tiny"
    assert signals(read_all(ck)[0]) == signals(recs[:6])
    assert signals(read_all(open_source(out / "checkpoint-6" / "trainer_state.json"))[0]) == signals(recs[:6])


@pytest.mark.slow
def test_trainer_state_tailed_while_training(hf_run):
    out, tail, polls = hf_run
    assert [(gs, steps(recs)) for gs, recs in polls] == [(6, [1, 2, 3, 4, 5, 6]), (12, list(range(7, 13))), (-1, [])]
    assert signals([r for _, recs in polls for r in recs]) == signals(read_all(open_source(out))[0])
    assert tail.problems == [] and tail.file == out / "trainer_state.json"


@pytest.mark.slow
def test_trainer_state_and_tensorboard_give_the_same_steps(tmp_path):
    pytest.importorskip("transformers")
    out = tmp_path / "hf-tb"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        _hf_train(out, "tensorboard")
    logdirs = [p for p in discover([out]) if p != out]
    assert len(logdirs) == 1 and logdirs[0].parent == out / "runs"
    tb, js = open_source(logdirs[0]), open_source(out)
    tb_recs, js_recs = read_all(tb)[0], read_all(js)[0]
    assert isinstance(tb, TensorBoardSource) and tb.info.source == js.info.source == "huggingface"
    assert steps(tb_recs) == steps(js_recs) == list(range(1, 13))
    for a, b in zip(tb_recs, js_recs):  # TensorBoard keeps float32
        assert a.loss == pytest.approx(b.loss, rel=1e-6) and a.grad_norm == pytest.approx(b.grad_norm, rel=1e-6)
        assert a.lr == pytest.approx(b.lr, rel=1e-6)
        assert a.scalars.keys() == b.scalars.keys()


# == Hugging Face: hand-written files ================================================================


def hf_entry(step: int, loss: float | None = None, **extra) -> dict:
    e = {"epoch": step / 12, "grad_norm": 1.0 + step / 100, "learning_rate": 5e-5 * step / 12, "step": step,
         "loss": 4.0 - step / 10 if loss is None else loss}
    e.update(extra)
    return e


def hf_state(history: list, global_step: int | None = None) -> str:
    gs = global_step if global_step is not None else max((e["step"] for e in history if isinstance(e, dict)
                                                         and isinstance(e.get("step"), int)), default=0)
    state = {"global_step": gs, "max_steps": 12, "log_history": history, "best_metric": None, "epoch": 1.0}
    return json.dumps(state, indent=2, sort_keys=True) + "\n"  # TrainerState.save_to_json


def H(*step_numbers: int, shift: float = 0.0) -> str:
    return hf_state([hf_entry(s, 4.0 - s / 10 + shift) for s in step_numbers])


HF_CASES = {
    "rewritten with more entries": [
        (H(1, 2, 3), [1, 2, 3], None),
        (H(1, 2, 3, 4, 5), [4, 5], None),
        (H(1, 2, 3, 4, 5), [], None),  # rewritten, nothing new
    ],
    "caught half-written": [
        (H(1, 2, 3), [1, 2, 3], None),
        (H(*range(1, 7))[:-200], [], "not valid JSON"),
        (H(*range(1, 7)), [4, 5, 6], None),
    ],
    "shrank: resumed from an earlier checkpoint": [
        (H(*range(1, 7)), [1, 2, 3, 4, 5, 6], None),
        (H(1, 2, 3), [], "ends at step 3, after step 6 was read"),
        (hf_state([hf_entry(s) for s in (1, 2, 3)] + [hf_entry(s, 9.0) for s in (4, 5)]), [4, 5], None),
    ],
    "steps restart: another run in the same place": [
        (H(*range(1, 7)), [1, 2, 3, 4, 5, 6], None),
        (H(1, 2, 3, 4, 5, 6, 7, shift=1.0), [1, 2, 3, 4, 5, 6, 7], "reading it again from its start"),
    ],
    "garbage, then a real state": [
        (b"\x00\xff{{{ not json", [], "not valid JSON"),
        ('[{"step": 1, "loss": 2.0}]', [], "no log_history list"),
        ('{"log_history": "nope"}', [], "no log_history list"),
        (H(1, 2), [1, 2], None),
    ],
    "odd entries": [
        (hf_state(["oops", {"loss": 1.0}, {"step": "3", "loss": 1.0}, {"step": True, "loss": 1.0},
                   hf_entry(1), hf_entry(2, learning_rate="high", grad_norm=None),
                   {"step": 2, "eval_loss": 3.5, "eval_runtime": 0.1},
                   {"step": 3, "eval_loss": 3.4},  # an evaluation only: no record
                   hf_entry(4, float("nan")), hf_entry(5, 10**400)], global_step=5),
         [1, 2, 4, 5], "is not an entry with a step"),
    ],
}


def _drain(src, limit: int | None) -> list:
    """poll(), or with a limit poll(limit) until a call returns fewer (each call at most `limit`)."""
    if limit is None:
        return src.poll()
    recs = []
    while True:
        got = src.poll(limit=limit)
        assert len(got) <= limit
        recs += got
        if len(got) < limit:
            return recs


@pytest.mark.parametrize("limit", [None, 1, 2])
@pytest.mark.parametrize("case", list(HF_CASES))
def test_trainer_state_tailing(tmp_path, case, limit):
    """Each case's records and problems; polled with a limit (the next call parses the file again and
    goes on after the last step given), drained until a call returns fewer, the same."""
    touch, path = Touch(), tmp_path / "out" / "trainer_state.json"
    src = HFStateSource(tmp_path / "out")
    for i, (content, expected, problem) in enumerate(HF_CASES[case]):
        touch.write(path, content)
        before = len(src.problems)
        recs = _drain(src, limit)
        assert steps(recs) == expected, (case, i)
        new = src.problems[before:]
        if problem is None:
            assert new == [], (case, i)
        else:
            assert len(new) == 1 and problem in new[0], (case, i, new)
        assert src.flush() == []
        if problem and "not valid JSON" in problem:
            assert src.poll() == [] and src.problems[before:] == new  # tried again, reported once
    if case == "shrank: resumed from an earlier checkpoint":
        assert [r.loss for r in recs] == [9.0, 9.0]  # the resumed run's own steps 4 and 5
    if case == "odd entries":
        r2, r4, r5 = recs[1], recs[2], recs[3]
        assert r2.lr == [] and r2.grad_norm is None and r2.scalars == {"val_loss": 3.5}
        assert math.isnan(r4.loss) and r5.loss == math.inf


def test_trainer_state_vanishing_and_restore(tmp_path):
    touch, out = Touch(), tmp_path / "out"
    path = out / "trainer_state.json"
    touch.write(path, H(1, 2, 3))
    src = HFStateSource(out)
    assert steps(src.poll()) == [1, 2, 3]
    saved = json.loads(json.dumps(src.state()))
    path.unlink()
    assert src.poll() == [] and any("vanished" in p for p in src.problems)
    touch.write(path, H(*range(1, 6)))
    fresh = HFStateSource(out)
    fresh.restore(saved)
    assert steps(fresh.poll()) == [4, 5] and fresh.problems == [] and fresh.info.max_steps == 12
    # after a restart, a history that does not continue is read from its start (its old version is not known)
    touch.write(path, H(1, 2))
    again = HFStateSource(out)
    again.restore(saved)
    assert steps(again.poll()) == [1, 2] and "from its start" in again.problems[0]


def test_output_dir_newest_state_is_the_run(tmp_path):
    touch, out = Touch(), tmp_path / "out"
    touch.write(out / "checkpoint-6" / "trainer_state.json", H(*range(1, 7)))
    touch.write(out / "checkpoint-12" / "trainer_state.json", H(*range(1, 13)))
    (out / "checkpoint-18").mkdir()  # being saved: no state yet
    src = open_source(out)
    assert isinstance(src, HFStateSource) and steps(everything(src)) == list(range(1, 13))
    assert src.file == out / "checkpoint-12" / "trainer_state.json"
    # a top-level file left from an earlier, shorter run is not the run; one at least as far on is
    touch.write(out / "trainer_state.json", H(1, 2, 3))
    assert open_source(out).poll()[-1].step == 12
    touch.write(out / "trainer_state.json", hf_state([hf_entry(s) for s in range(1, 13)]
                                                     + [{"step": 12, "train_loss": 3.5, "train_runtime": 1.0}]))
    src = open_source(out)
    assert steps(src.poll()) == list(range(1, 13)) and src.file == out / "trainer_state.json"
    touch.write(out / "checkpoint-18" / "trainer_state.json", H(*range(1, 19)))
    assert steps(src.poll()) == list(range(13, 19)) and src.problems == []


def test_mapping_applies_to_trainer_state_as_tensorboard_tags(tmp_path):
    touch = Touch()
    touch.write(tmp_path / "trainer_state.json",
                hf_state([hf_entry(1), {"step": 1, "eval_loss": 3.0, "eval_accuracy": 0.25}, hf_entry(2, my_metric=7.0)]))
    src = open_source(tmp_path / "trainer_state.json", {"scalars.acc": "eval/accuracy", "scalars.mine": "train/my_*"})
    recs = everything(src)
    assert [r.scalars for r in recs] == [{"val_loss": 3.0, "acc": 0.25}, {"mine": 7.0}]


# == Lightning: a real Trainer with a CSVLogger =====================================================


@pytest.fixture(scope="module")
def lightning_run(tmp_path_factory):
    """12 steps: LearningRateMonitor, grad norms, validation every 4 steps, `late_metric` from step 5 on (the
    header grows: Lightning rewrites the file); a TensorBoardLogger beside it when tensorboard is there;
    the CSV tailed by a callback at every batch end."""
    pytest.importorskip("lightning")
    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.callbacks import LearningRateMonitor
    from lightning.pytorch.loggers import CSVLogger
    from lightning.pytorch.utilities import grad_norm

    class Tiny(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.save_hyperparameters({"lr": 0.01})
            self.layer = torch.nn.Linear(4, 1)

        def training_step(self, batch, i):
            x, y = batch
            loss = torch.nn.functional.mse_loss(self.layer(x), y)
            self.log("train_loss", loss)
            if self.global_step >= 5:
                self.log("late_metric", float(self.global_step))
            return loss

        def on_before_optimizer_step(self, optimizer):
            self.log_dict(grad_norm(self, norm_type=2))

        def validation_step(self, batch, i):
            x, y = batch
            self.log("val_loss", torch.nn.functional.mse_loss(self.layer(x), y))

        def configure_optimizers(self):
            opt = torch.optim.AdamW(self.parameters(), lr=0.01)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 4))
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    root = tmp_path_factory.mktemp("pl")
    version = root / "csv" / "lightning_logs" / "version_0"
    seen: dict = {"source": None, "records": [], "headers": []}

    class PollEachBatch(pl.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            if seen["source"] is None and (version / "metrics.csv").exists():
                seen["source"] = LightningCSVSource(version, clock=lambda: 0.0)  # released by rows, not time
            if seen["source"] is not None:
                seen["records"] += seen["source"].poll()
                seen["headers"].append(list(seen["source"].header or []))

    from lightning.pytorch.loggers import TensorBoardLogger  # tensorboard is one of trainmon's dependencies

    loggers = [CSVLogger(root / "csv", version=0), TensorBoardLogger(root / "tb", version=0)]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 4, generator=g)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True)), batch_size=4)
    torch.manual_seed(0)
    trainer = pl.Trainer(max_steps=12, logger=loggers, callbacks=[LearningRateMonitor("step"), PollEachBatch()],
                         enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
                         log_every_n_steps=1, accelerator="cpu", val_check_interval=4, limit_val_batches=2)
    trainer.fit(Tiny(), data, data)
    seen["records"] += seen["source"].poll() + seen["source"].flush()
    tb = root / "tb" / "lightning_logs" / "version_0"
    return version, seen, tb


@pytest.mark.slow
def test_lightning_csv_records_are_the_rows(lightning_run):
    version, _, _ = lightning_run
    assert (version / "hparams.yaml").is_file()
    src = open_source(version)
    assert isinstance(src, LightningCSVSource) and src.info.source == "lightning" and src.info.run_id == "version_0"
    recs = read_all(src)[0]
    assert src.problems == []
    rows = list(csv.DictReader(io.StringIO((version / "metrics.csv").read_text())))
    by_step: dict[int, dict] = {}
    for row in rows:
        by_step.setdefault(int(row["step"]), {}).update({k: v for k, v in row.items() if v != ""})
    assert steps(recs) == sorted(by_step) == list(range(12))  # Lightning's step: 0-based, as StepRecord's
    for r in recs:
        row = by_step[r.step]
        assert r.loss == float(row["train_loss"]) and r.lr == [float(row["lr-AdamW"])]
        assert r.grad_norm == float(row["grad_2.0_norm_total"])
        assert r.param_norms == {"layer.weight": float(row["grad_2.0_norm/layer.weight"]),
                                 "layer.bias": float(row["grad_2.0_norm/layer.bias"])}
        assert r.scalars == ({"val_loss": float(row["val_loss"])} if "val_loss" in row else {})
    assert [r.step for r in recs if r.scalars] == [3, 7, 11]
    assert recs[0].lr == [0.0025] and recs[5].lr == [0.01]  # LambdaLR warmup over 4 steps
    # the same through `monitor check`, and the file itself opens too
    assert signals(read_all(open_source(version / "metrics.csv"))[0]) == signals(recs)


@pytest.mark.slow
def test_lightning_csv_tailed_while_training_through_a_header_rewrite(lightning_run):
    version, seen, _ = lightning_run
    assert seen["source"].problems == []
    assert any("late_metric" not in h and h for h in seen["headers"]) and "late_metric" in seen["headers"][-1]
    assert signals(seen["records"]) == signals(read_all(open_source(version))[0])  # no step twice, none lost


@pytest.mark.slow
def test_lightning_csv_and_tensorboard_give_the_same_steps(lightning_run):
    version, _, tb = lightning_run
    tb_src = open_source(tb)
    tb_recs, csv_recs = read_all(tb_src)[0], read_all(open_source(version))[0]
    assert tb_src.info.source == "lightning" and steps(tb_recs) == steps(csv_recs)
    for a, b in zip(tb_recs, csv_recs):
        assert a.loss == pytest.approx(b.loss, rel=1e-6) and a.lr == pytest.approx(b.lr, rel=1e-6)
        assert a.scalars.keys() == b.scalars.keys()


# == Lightning: hand-written files ==================================================================


def pl_rows(step_numbers, loss_shift: float = 0.0, val_at=()) -> list[dict]:
    """LearningRateMonitor's row, then the training row, per step (and a validation row), as Lightning logs."""
    out = []
    for s in step_numbers:
        out.append({"lr-AdamW": 1e-3 * (s + 1), "step": s})
        out.append({"epoch": 0, "train_loss": 3.0 - s / 10 + loss_shift, "step": s})
        if s in val_at:
            out.append({"epoch": 0, "val_loss": 2.5, "step": s})
    return out


def pl_csv(rows: list[dict], keys=None) -> str:
    """The whole file as Lightning's _ExperimentWriter writes it: sorted keys, empty cells, \\r\\n."""
    keys = sorted(keys or set().union(*rows))
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def cut_rows(text: str, n: int) -> str:
    """The header and the first n rows (a file caught while it is rewritten)."""
    return "".join(text.splitlines(keepends=True)[: n + 1])


BASE = pl_csv(pl_rows(range(4)))
WIDER = pl_csv(pl_rows(range(4), val_at=(3,)) + pl_rows(range(4, 6)))

PL_CASES = {
    "appended rows": [
        ("w", pl_csv(pl_rows(range(2))), [0], None),
        ("a", pl_csv(pl_rows(range(2, 4)))[pl_csv(pl_rows(range(2, 4))).index("\n") + 1:], [1, 2], None),
        ("flush", None, [3], None),
    ],
    "a partial last line waits": [
        ("w", BASE[:-6], [0, 1, 2], None),  # the last row cut short: step 3's training row is not read
        ("w", BASE, [], None),
        ("flush", None, [3], None),
    ],
    "rewritten with a wider header": [
        ("w", BASE, [0, 1, 2], None),
        ("w", WIDER, [3, 4], None),  # step 3 was held back: it gets its val_loss
        ("flush", None, [5], None),
    ],
    "caught mid-rewrite": [
        ("w", BASE, [0, 1, 2], None),
        ("w", cut_rows(WIDER, 3), [], None),  # the new header, fewer rows than were read: wait
        ("w", WIDER, [3, 4], None),
        ("flush", None, [5], None),
    ],
    "shrank and stays so: another run": [
        ("w", BASE, [0, 1, 2], None),
        ("w", cut_rows(BASE, 4), [], None),
        ("poll", None, [3, 0], "shrank from 8 to 4 rows"),  # unchanged: not a rewrite; step 3 was read
        ("flush", None, [1], None),
    ],
    "replaced by other rows": [
        ("w", BASE, [0, 1, 2], None),
        ("w", pl_csv(pl_rows(range(5), loss_shift=1.0)), [3, 0, 1, 2, 3], "rewritten with other rows"),
    ],
    "bad cells and rows": [
        ("w", pl_csv(pl_rows(range(2))) + "0,,2,abc\r\n,0.5,2,\r\n0,,x,1.0\r\n0,1.5\r\n,0.004,3,\r\n",
         [0, 1, 2], "is not a number"),
        ("flush", None, [3], None),
    ],
    "garbage, then a real file": [
        ("w", b"\x00\x01\xff garbage\n\xfe\xfd,,\n", [], None),
        ("w", BASE, [0, 1, 2], None),
    ],
}


@pytest.mark.parametrize("limit", [None, 1, 2])
@pytest.mark.parametrize("case", list(PL_CASES))
def test_lightning_csv_tailing(tmp_path, case, limit):
    """Each case's records and problems; polled with a limit (poll(limit) goes on from where the last
    call stopped), drained until a call returns fewer, the same."""
    touch, path = Touch(), tmp_path / "version_0" / "metrics.csv"
    src = LightningCSVSource(tmp_path / "version_0", clock=lambda: 0.0)
    for i, (action, content, expected, problem) in enumerate(PL_CASES[case]):
        if action in ("w", "a"):
            touch.write(path, content, action)
        before = len(src.problems)
        recs = src.flush() if action == "flush" else _drain(src, limit)
        assert steps(recs) == expected, (case, i)
        new = src.problems[before:]
        if problem is None:
            assert new == [], (case, i, new)
        else:
            assert any(problem in p for p in new), (case, i, new)
        if case == "rewritten with a wider header" and i == 1:
            assert recs[0].scalars == {"val_loss": 2.5} and recs[0].loss == pytest.approx(2.7)
        if case == "bad cells and rows" and i == 0:
            assert [(r.loss, r.lr) for r in recs] == [(3.0, [1e-3]), (pytest.approx(2.9), [2e-3]), (None, [0.5])]
            assert len(src.problems) == 3  # the bad cell, the bad step, the short row


def test_lightning_csv_a_long_file_is_read_a_limit_at_a_time(tmp_path):
    """A file far longer than one read's worth: each call reads about what its limit takes, in pieces,
    and returns exactly `limit` records until the end; a call returning fewer has read everything."""
    path = tmp_path / "metrics.csv"
    path.write_text(pl_csv(pl_rows(range(3000))), newline="")
    whole = LightningCSVSource(path, clock=lambda: 0.0)
    expected = whole.poll() + whole.flush()
    src = LightningCSVSource(path, clock=lambda: 0.0)
    got, sizes = [], []
    while True:
        part = src.poll(limit=700)
        got += part
        sizes.append(len(part))
        if len(part) < 700:
            break
    assert sizes == [700, 700, 700, 700, 199] and src.offset == path.stat().st_size  # step 2999 waits for flush()
    got += src.flush()
    assert [(r.step, r.loss, r.lr) for r in got] == [(r.step, r.loss, r.lr) for r in expected]
    assert len(got) == 3000 and src.problems == []


def test_lightning_csv_restore_continues(tmp_path):
    touch, path = Touch(), tmp_path / "v" / "metrics.csv"
    touch.write(path, BASE)
    src = LightningCSVSource(tmp_path / "v", clock=lambda: 0.0)
    assert steps(src.poll()) == [0, 1, 2]
    saved = json.loads(json.dumps(src.state()))
    touch.write(path, WIDER)  # rewritten while the daemon was down
    fresh = LightningCSVSource(tmp_path / "v", clock=lambda: 0.0)
    fresh.restore(saved)
    assert steps(fresh.poll()) == [3, 4] and steps(fresh.flush()) == [5] and fresh.problems == []
    # appended to after a restore
    fresh2 = LightningCSVSource(tmp_path / "v", clock=lambda: 0.0)
    fresh2.restore(json.loads(json.dumps(src.state())))
    touch.write(path, BASE + pl_csv(pl_rows([4])).split("\r\n", 1)[1])
    assert steps(fresh2.poll()) == [3] and steps(fresh2.flush()) == [4]


def test_lightning_csv_step_settles_after_settle_s(tmp_path):
    now = [100.0]
    touch = Touch()
    touch.write(tmp_path / "metrics.csv", BASE)
    src = LightningCSVSource(tmp_path / "metrics.csv", settle_s=2.0, clock=lambda: now[0])
    assert steps(src.poll()) == [0, 1, 2]
    now[0] += 1.9
    assert src.poll() == []
    now[0] += 0.2
    assert steps(src.poll()) == [3] and src.flush() == []


@pytest.mark.parametrize("columns, mapping, expect", [
    ({"loss": 2.0, "epoch": 0}, None, (2.0, [], None)),  # bare `loss` next to `epoch`
    ({"loss": 2.0}, None, SourceError),  # ... and without it: nobody's in particular
    ({"loss": 2.0}, {"loss": "loss"}, (2.0, [], None)),
    ({"my_loss": 1.5, "opt_lr/g1": 0.2, "opt_lr/g0": 0.1, "acc_top1": 0.9}, {"loss": "my_loss", "lr": "opt_lr/*",
      "scalars.acc": "acc_*"}, (1.5, [0.1, 0.2], {"acc": 0.9})),
    ({"train_loss_step": 1.0, "lr-SGD/pg1": 0.1, "lr-SGD/pg2": 0.01, "lr-SGD/pg1-momentum": 0.9,
      "grad_2.0_norm_total": 3.0}, {"grad_norm": "train_loss_step"}, (1.0, [0.1, 0.01], None)),
])
def test_lightning_csv_columns_and_mapping(tmp_path, columns, mapping, expect):
    Touch().write(tmp_path / "metrics.csv", pl_csv([{**columns, "step": 0}, {**columns, "step": 1}]))
    src = open_source(tmp_path / "metrics.csv", mapping)
    if expect is SourceError:
        with pytest.raises(SourceError, match="--map loss=COLUMN"):
            read_all(src)
        return
    recs = read_all(src)[0]
    loss, lr, scalars = expect
    assert steps(recs) == [0, 1] and recs[0].loss == loss and recs[0].lr == lr
    assert recs[0].scalars == (scalars or {})
    if mapping and "grad_norm" in mapping:
        assert recs[0].grad_norm == 1.0  # the mapping overrides the framework's tag


# == discovery, the CLI, the daemon ===================================================================


@pytest.mark.slow
def test_discover_one_run_per_output_dir(tmp_path, hf_run, lightning_run):
    touch, root = Touch(), tmp_path / "exp"
    hf = root / "hf-out"
    for n in (6, 12):
        touch.write(hf / f"checkpoint-{n}" / "trainer_state.json", H(*range(1, n + 1)))
    touch.write(hf / "trainer_state.json", H(*range(1, 13)))
    only_ckpts = root / "hf-running"
    touch.write(only_ckpts / "checkpoint-500" / "trainer_state.json", H(1, 2))
    (only_ckpts / "checkpoint-1000").mkdir()
    saving = root / "hf-first-save"  # a checkpoint dir without its state yet: not a run yet
    (saving / "checkpoint-6").mkdir(parents=True)
    pl = root / "lightning_logs" / "version_3"
    touch.write(pl / "metrics.csv", BASE)
    touch.write(pl / "hparams.yaml", "{}\n")
    touch.write(root / "results" / "metrics.csv", BASE)  # some other tool's CSV: no hparams.yaml beside it
    found = discover([root])
    assert sorted(found) == sorted([hf, only_ckpts, pl])
    assert discover([hf / "trainer_state.json", pl / "metrics.csv"]) == [hf, pl]
    assert discover([hf / "checkpoint-6"]) == [hf / "checkpoint-6"]  # named: that checkpoint
    assert [type(open_source(p)).__name__ for p in found] == ["HFStateSource", "HFStateSource", "LightningCSVSource"]
    assert [open_source(p).info.run_id for p in found] == ["hf-out", "hf-running", "version_3"]
    # the real runs: one each
    assert discover([hf_run[0]]) == [hf_run[0]]
    assert discover([lightning_run[0].parent.parent]) == [lightning_run[0]]


@pytest.mark.slow
def test_check_cli_on_real_runs_exits_0(hf_run, lightning_run):
    for path in (hf_run[0], hf_run[0] / "checkpoint-6" / "trainer_state.json", lightning_run[0]):
        result = runner.invoke(app, ["check", str(path), "--json"])
        assert result.exit_code == 0, (path, result.output)
        assert json.loads(result.stdout) == []
    result = runner.invoke(app, ["check", str(hf_run[0])])
    assert result.exit_code == 0 and "12 step records from 1 rank(s), 0 alert(s)" in result.stdout


def test_check_cli_findings_exit_1(tmp_path):
    touch = Touch()
    touch.write(tmp_path / "hf" / "checkpoint-40" / "trainer_state.json",
                hf_state([hf_entry(s, float("nan") if s == 30 else None) for s in range(1, 41)]))
    rows = pl_rows(range(40))
    rows[2 * 25 + 1]["train_loss"] = float("nan")
    touch.write(tmp_path / "pl" / "metrics.csv", pl_csv(rows))
    for path, step in ((tmp_path / "hf", 30), (tmp_path / "pl", 25)):
        result = runner.invoke(app, ["check", str(path), "--json"])
        assert result.exit_code == 1, result.output
        alerts = json.loads(result.stdout)
        assert ("loss.nonfinite", "critical", step) in {(a["rule"], a["severity"], a["step"]) for a in alerts}


@pytest.mark.parametrize("make, message", [
    (lambda d, t: t.write(d / "trainer_state.json", H(1, 2, 3)[:50]), "not valid JSON"),
    (lambda d, t: t.write(d / "metrics.csv", pl_csv([{"accuracy": 0.5, "step": 0}])), "--map loss=COLUMN"),
    (lambda d, t: d.mkdir(), "no trainer_state.json, no checkpoint-N/trainer_state.json"),
    (lambda d, t: t.write(d / "checkpoint-3" / "trainer_state.json", "[]"), "no log_history list"),
])
def test_check_cli_bad_input_exits_2(tmp_path, make, message):
    make(tmp_path / "run", Touch())
    result = runner.invoke(app, ["check", str(tmp_path / "run"), "--json"])
    assert result.exit_code == 2, result.output
    assert message in result.output


def test_watch_daemon_reads_both_and_resumes_after_a_restart(tmp_path):
    touch, root = Touch(), tmp_path / "runs"
    touch.write(root / "hf" / "checkpoint-3" / "trainer_state.json", H(1, 2, 3))
    touch.write(root / "pl" / "version_0" / "metrics.csv", BASE)
    touch.write(root / "pl" / "version_0" / "hparams.yaml", "{}\n")
    config = load_config(None, environ={})
    lines: list[str] = []
    w = Watcher([root], config, state_dir=tmp_path / "state", on_event=lines.append)
    w.scan()
    assert w.poll() == 3 + 3  # the CSV's last step waits (for its settle time, or the next step's rows)
    assert sorted((r.run_id, r.source.info.source) for r in w.runs.values()) == [("hf", "huggingface"),
                                                                                 ("version_0", "lightning")]
    w.save()
    touch.write(root / "hf" / "checkpoint-6" / "trainer_state.json", H(*range(1, 7)))
    touch.write(root / "pl" / "version_0" / "metrics.csv", WIDER)
    again = Watcher([root], config, state_dir=tmp_path / "state", on_event=lines.append)
    again.scan()
    # A restarted daemon reads each run again (the first records replayed with its sinks muted): hf 1-6;
    # pl 0-4 (step 4 is released by the wider file's rows)
    assert again.poll() == 6 + 5
    assert [r.judged for r in again.runs.values()] == [{0: 6}, {0: 5}]
    views = {r.run_id: r.view.step for r in again.runs.values()}
    assert views == {"hf": 6, "version_0": 4}
    assert not [line for line in lines if line.startswith("warning")]


@pytest.mark.slow
def test_new_sources_import_no_torch(tmp_path):
    touch = Touch()
    touch.write(tmp_path / "hf" / "trainer_state.json", H(1, 2))
    touch.write(tmp_path / "pl" / "metrics.csv", BASE)
    touch.write(tmp_path / "pl" / "hparams.yaml", "{}\n")
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from monitor.runlog.adapters import discover, open_source, read_all\n"
        f"paths = discover([{str(tmp_path)!r}])\n"
        "assert len(paths) == 2, paths\n"
        "assert [len(read_all(open_source(p))[0]) for p in paths] == [2, 4]\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
