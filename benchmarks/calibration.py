"""Calibration: the rules on real public training logs and on well-known public configs reproduced on CPU.

The detection matrix (benchmarks/detection.py) plants faults in the reference trainer. This is the other
half: runs nobody here wrote, each with a verdict known from outside trainmon (the run's own outcome, its
authors' notes, or what the log itself shows), replayed through `monitor check`'s logic
(`monitor.cli.check.check_run`), and judged:

- a **healthy** entry passes when nothing reaches warning or critical (a known-good config raising a
  warning is a failing row);
- a **faulty** entry passes when each rule its verdict requires fires at warning or above (inside the
  step window, when the verdict gives one), and nothing else reaches warning except what the verdict
  tolerates.

Two kinds of entry:

- `LOGS`: excerpts of public logs and state files under tests/data/calibration/ (sources, commits and
  licences in its README.md); the llm.c GPT-2 log is the one already in tests/data/.
- `REPRODUCED`: well-known public configs re-run at small scale on CPU with `monitor.attach` or the
  Hugging Face callback (nanoGPT's `shakespeare_char` hyper-parameters, the same with no warmup, the
  Hugging Face Trainer's defaults for fine-tuning), each into a fresh run directory that `check_run` reads.

`python benchmarks/calibration.py` writes benchmarks/results/calibration.{md,json}; `make detection`
(benchmarks/detection.py) runs it too and appends the table to benchmarks/detection.md.
tests/test_calibration.py asserts every row.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "tests" / "data" / "calibration"
DATA = ROOT / "tests" / "data"
LOUD = ("warning", "critical")


# -- verdicts ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Match:
    """An alert of `rule` at warning or above, whose step (or first-detected step) lies in `steps`."""

    rule: str
    steps: tuple[int, int] | None = None

    def hits(self, alert) -> bool:
        if alert.rule != self.rule or alert.severity.value not in LOUD:
            return False
        if self.steps is None:
            return True
        lo, hi = self.steps
        at = {alert.step, int(alert.evidence.get("detected_at", alert.step))}
        return any(lo <= s <= hi for s in at)

    def __str__(self) -> str:
        return self.rule + (f" (steps {self.steps[0]}-{self.steps[1]})" if self.steps else "")


@dataclass(frozen=True)
class Verdict:
    """What is known about a run: the rules that must fire (`must`) and those tolerated (`may`) at warning or
    above; any other warning or critical fails the row. No `must`: a healthy run."""

    summary: str
    must: tuple[Match, ...] = ()
    may: tuple[Match, ...] = ()

    @property
    def healthy(self) -> bool:
        return not self.must


HEALTHY = Verdict("healthy: nothing at warning or critical")


@dataclass(frozen=True)
class Entry:
    name: str
    kind: str  # "log" (a public log or state file) or "reproduced" (a public config re-run here)
    source: str  # where it comes from (repository, path, commit; or the config reproduced)
    license: str
    verdict: Verdict
    path: str | None = None  # log entries: relative to the repository root
    mapping: dict[str, str] | None = None  # `monitor check --map` for columns no framework table names
    run: Callable[[Path], Path] | None = None  # reproduced entries: writes a run under the dir, returns its path
    note: str = ""
    slow: bool = False


@dataclass
class Row:
    entry: Entry
    alerts: list  # firing alerts, as check_run returned them
    records: int
    seconds: float
    missing: list[str] = field(default_factory=list)  # `must` matches no alert satisfied
    unexpected: list = field(default_factory=list)  # loud alerts neither required nor tolerated
    error: str | None = None
    data: Any = None  # the RunData check_run read (info, records by rank)

    @property
    def passed(self) -> bool:
        return self.error is None and not self.missing and not self.unexpected

    def counts(self) -> dict[str, int]:
        out = {"info": 0, "warning": 0, "critical": 0}
        for a in self.alerts:
            out[a.severity.value] = out.get(a.severity.value, 0) + 1
        return out

    def rules(self, severity: str) -> list[str]:
        """`rule@step` of the alerts of one severity, in step order (each rule once per step)."""
        seen: dict[str, None] = {}
        for a in sorted(self.alerts, key=lambda a: (a.step, a.rule)):
            if a.severity.value == severity:
                seen[f"{a.rule}@{a.step}"] = None
        return list(seen)


def judge(entry: Entry, alerts: list, records: int, seconds: float, data: Any = None) -> Row:
    row = Row(entry, alerts, records, seconds, data=data)
    v = entry.verdict
    row.missing = [str(m) for m in v.must if not any(m.hits(a) for a in alerts)]
    row.unexpected = [a for a in alerts if a.severity.value in LOUD
                      and not any(m.hits(a) for m in (*v.must, *v.may))]
    return row


from _public_configs import hf_trainer_defaults, nanogpt_no_warmup, nanogpt_shakespeare_char  # noqa: E402

# -- the corpus -------------------------------------------------------------------------------------

MN = "KellerJordan/modded-nanogpt"
LOGS: list[Entry] = [
    Entry(
        "llmc-gpt2-124m", "log",
        f"{MN} records/track_1_short/2024-10-13_llmc/main.log (tests/data/llmc-gpt2-124m.log)",
        "MIT",
        Verdict("healthy baseline (llm.c GPT-2 124M, 19,560 steps, val loss 3.28) with two known one-step spikes "
                "that recover: at 7435 (loss 3.50 -> 3.78, grad norm 0.27 -> 1.44) and 9025 (norm 0.28 -> 2.02); "
                "only those may warn",
                may=(Match("grad_norm.spike", (7435, 7435)), Match("grad_norm.spike", (9025, 9025)),
                     Match("loss.spike", (7435, 7435)))),
        path="tests/data/llmc-gpt2-124m.log",
    ),
    Entry(
        "modded-nanogpt-adamw-baseline", "log",
        f"{MN} records/track_1_short/2024-06-06_AdamW/f66d43d7-e449-4029-8adf-e8537bab49ea.log",
        "MIT",
        HEALTHY,
        path="tests/data/calibration/modded-nanogpt-adamw/train.log",
        note="loss only (llm.c format, no LR or grad norm): GPT-2 124M, AdamW lr 0.0018, warmup 250, 9,536 steps, "
             "val loss 3.276; about a dozen one-step loss outliers of 1.06-1.10x (hard batches), some three within "
             "300 steps",
    ),
    Entry(
        "modded-nanogpt-muon-record", "log",
        f"{MN} records/track_1_short/2024-10-10_Muon/eb5659d0-fb6a-49e5-a311-f1f89412f726.txt",
        "MIT",
        HEALTHY,
        path="tests/data/calibration/modded-nanogpt-muon/train.log",
        note="loss only, converted from modded-nanogpt's `step:N/M train_loss:X` lines (a format trainmon does not "
             "read) to llm.c lines: the Muon speedrun record, 6,200 steps, val loss 3.279; the loss falls from "
             "10.9 to 8.7 in one step (Muon's first updates)",
    ),
    Entry(
        "bigscience-gpt2-perf-ds-off", "log",
        "bigscience-workshop/bigscience experiments/gpt2-meg-ds-3d/meg_ds_3d_gpt2_perf_n16-ds-off.out",
        "Apache-2.0",
        Verdict("broken: a Megatron-LM GPT-2 throughput test (fp16, lr 1.5e-4, 8-step warmup): the loss jumps from "
                "12.4 to 44 at iteration 3 and, after falling back to 11.6, climbs again to 20.4 by iteration 62 "
                "with the clipped grad norm pinned near 8; loss.divergence must fire",
                must=(Match("loss.divergence"),),
                may=(Match("loss.spike", (1, 12)), Match("warmup.too_short"), Match("grad_norm.growth"))),
        path="tests/data/calibration/bigscience-gpt2-perf-ds-off/train.log",
        note="the 62 iteration lines of the log, unmodified",
    ),
    Entry(
        "hf-whisper-large-v2-japanese", "log",
        "P4P4N1CK/whisper-large-v2-japanese-5k-steps last-checkpoint/trainer_state.json",
        "Apache-2.0 (model card)",
        HEALTHY,
        path="tests/data/calibration/hf-whisper-large-v2-japanese",
        note="HF Seq2SeqTrainer, Whisper fine-tuning recipe (lr 1e-5, warmup 500, linear, 5,000 steps, fp16 AMP), "
             "loss logged every 25 steps; it optimises fine and overfits (train loss 0.3 -> 2e-4, eval loss "
             "0.32 -> 0.42), which is not a training-health fault",
    ),
    Entry(
        "hf-trainer-state-viz-sample", "log",
        "aigoncharov/trainer_state_viz trainer_state.json",
        "MIT",
        HEALTHY,
        path="tests/data/calibration/hf-trainer-state-viz",
        note="the sample state file of a trainer_state visualiser: 30 epochs at a constant lr 1e-5, the training "
             "loss logged once per epoch (401 steps), six eval sets per epoch",
    ),
    Entry(
        "lightning-genrisk-gan-nan", "log",
        "AIRI-Institute/genrisk lightning_logs/version_0/metrics.csv",
        "MIT",
        Verdict("broken: a Lightning GAN run whose discriminator loss is 1.6e24 at step 0 and NaN from step 1 on "
                "(the generator loss NaN throughout); loss.nonfinite must fire at step 1",
                must=(Match("loss.nonfinite", (0, 1)),)),
        path="tests/data/calibration/lightning-genrisk-gan-nan",
        mapping={"loss": "train_disc_loss"},
        note="CSVLogger metrics.csv with train_disc_loss / train_gen_loss columns, read with "
             "--map loss=train_disc_loss",
    ),
]

REPRODUCED: list[Entry] = [
    Entry(
        "nanogpt-shakespeare-char", "reproduced",
        "karpathy/nanoGPT config/train_shakespeare_char.py (commit 3adf61e1), shrunk for CPU",
        "MIT (config values only)",
        HEALTHY,
        run=nanogpt_shakespeare_char,
        note="beta2 0.99, warmup 100 of 300 iterations, lr 1e-3 cosine to 1e-4, clip 1.0, dropout 0.2: "
             "nanoGPT's own config, which trains fine; 2/(1-beta2) = 200 > 100",
        slow=True,
    ),
    Entry(
        "nanogpt-shakespeare-char-no-warmup", "reproduced",
        "karpathy/nanoGPT config/train_shakespeare_char.py with warmup_iters=0, shrunk for CPU",
        "MIT (config values only)",
        Verdict("fault: no warmup at a from-scratch peak LR (1e-3): warmup.missing must fire at step 0",
                must=(Match("warmup.missing", (0, 1)),)),
        run=nanogpt_no_warmup,
        slow=True,
    ),
    Entry(
        "hf-trainer-defaults-finetune", "reproduced",
        "transformers.TrainingArguments defaults (lr 5e-5, no warmup, linear, AdamW (0.9, 0.999), clip 1.0)",
        "Apache-2.0 (library defaults)",
        HEALTHY,
        run=hf_trainer_defaults,
        note="a tiny GPT-2 pre-trained here, then fine-tuned for 200 steps with the Trainer's defaults",
        slow=True,
    ),
]

ENTRIES: list[Entry] = LOGS + REPRODUCED
BY_NAME = {e.name: e for e in ENTRIES}


# -- running ----------------------------------------------------------------------------------------


@contextlib.contextmanager
def _one_thread():
    """Reproduced runs train on one intra-op thread: the tiny models gain nothing from more, and on a shared
    machine two threads contending with other processes run ~10x slower than one."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_entry(entry: Entry, workdir: Path | None = None) -> Row:
    """Replays the entry through check_run at the default config and judges it against its verdict."""
    from monitor.cli.check import check_run
    from monitor.config import load_config

    config = load_config(None, environ={})
    t0 = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            if entry.kind == "log":
                path = ROOT / entry.path
            else:
                base = Path(workdir or tmp) / entry.name
                base.mkdir(parents=True, exist_ok=True)
                with warnings.catch_warnings(), _one_thread():
                    warnings.simplefilter("ignore")
                    path = entry.run(base / "run")
            data, alerts = check_run(path, config, mapping=entry.mapping)
            records = sum(len(v) for v in data.records.values())
    except Exception as e:  # a row that cannot be read or run fails with the reason
        row = Row(entry, [], 0, time.perf_counter() - t0, error=f"{type(e).__name__}: {e}")
        return row
    return judge(entry, alerts, records, time.perf_counter() - t0, data)


def run_all(names: list[str] | None = None, progress: bool = True) -> list[Row]:
    rows = []
    for entry in ENTRIES:
        if names and entry.name not in names:
            continue
        row = run_entry(entry)
        rows.append(row)
        if progress:
            c = row.counts()
            print(f"{entry.name:36s} {'ok' if row.passed else 'FAIL'}  info {c['info']} warning {c['warning']} "
                  f"critical {c['critical']}  {row.seconds:.1f} s" + (f"  {row.error}" if row.error else ""),
                  flush=True)
    return rows


def _cell(items: list[str], limit: int = 8) -> str:
    if not items:
        return "-"
    shown = ", ".join(f"`{x}`" for x in items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def _info_summary(row: Row) -> str:
    by_rule: dict[str, int] = {}
    for a in row.alerts:
        if a.severity.value == "info":
            by_rule[a.rule] = by_rule.get(a.rule, 0) + 1
    return ", ".join(f"`{r}` x{n}" for r, n in sorted(by_rule.items())) or "-"


def markdown(rows: list[Row], heading: str = "#") -> str:
    passed = sum(r.passed for r in rows)
    md = [
        f"{heading} Calibration: real logs and public configs",
        "",
        f"Generated by benchmarks/calibration.py (also run by `make detection`) on {time.strftime('%Y-%m-%d')}: "
        f"{len(rows)} sources, {passed} passed. Each is replayed through `monitor check` (check_run) at the "
        "default config. A healthy source passes with nothing at warning or critical; a faulty one when the "
        "rules its verdict requires fire (at warning or above) and nothing else does. Sources, commits and "
        "licences: tests/data/calibration/README.md.",
        "",
        "| source | kind | expected verdict | info | warning | critical | result |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        e = r.entry
        if r.error:
            result = f"**FAIL**: {r.error}"
        elif r.passed:
            result = "pass"
        else:
            why = []
            if r.missing:
                why.append("missed " + ", ".join(f"`{m}`" for m in r.missing))
            if r.unexpected:
                why.append("unexpected " + _cell(sorted({f"{a.rule}@{a.step}" for a in r.unexpected})))
            result = "**FAIL**: " + "; ".join(why)
        md.append(f"| {e.name} | {e.kind} | {e.verdict.summary} | {_info_summary(r)} | {_cell(r.rules('warning'))} | "
                  f"{_cell(r.rules('critical'))} | {result} |")
    failing = [r for r in rows if not r.passed and not r.error]
    if failing:
        md += ["", "Why the failing rows fail (the alert text):", ""]
        for r in failing:
            for a in r.unexpected:
                md.append(f"- {r.entry.name}: {a.line()}")
            for m in r.missing:
                md.append(f"- {r.entry.name}: `{m}` did not fire at warning or above")
    return "\n".join(md) + "\n"


def to_json(rows: list[Row]) -> dict:
    return {"rows": [{
        "source": r.entry.name, "kind": r.entry.kind, "from": r.entry.source, "license": r.entry.license,
        "expected": r.entry.verdict.summary, "healthy": r.entry.verdict.healthy,
        "must": [str(m) for m in r.entry.verdict.must], "may": [str(m) for m in r.entry.verdict.may],
        "records": r.records, "seconds": round(r.seconds, 2), "counts": r.counts(),
        "rules": {sev: r.rules(sev) for sev in ("info", "warning", "critical")},
        "passed": r.passed, "missing": r.missing, "unexpected": [a.line() for a in r.unexpected], "error": r.error,
    } for r in rows]}


def write(rows: list[Row]) -> Path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _common import write_results

    return write_results("calibration", to_json(rows), markdown(rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="+", metavar="NAME", choices=sorted(BY_NAME),
                    help="run only these sources (the table is printed, the results files are left as they are)")
    a = ap.parse_args()
    rows = run_all(a.only)
    print(markdown(rows))
    if not a.only:
        path = write(rows)
        print(f"written to {path} and {path.with_suffix('.json')}")
    if not all(r.passed for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
