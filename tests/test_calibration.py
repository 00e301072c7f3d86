"""Calibration: the rules on real public training logs and on well-known public configs reproduced on CPU.

One test per source of benchmarks/calibration.py, each asserting the source's known verdict (a healthy
known-good run raises nothing at warning or critical; a broken one raises what its verdict requires and
nothing else loud). The corpus lives in tests/data/calibration/ (README.md: source, commit, licence, verdict
of each file). The reproduced configs train for a few seconds each on one CPU thread (`slow`).
"""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import calibration as cal  # noqa: E402

from monitor.schema import Severity  # noqa: E402

README = cal.CORPUS / "README.md"


def _explain(row: cal.Row) -> str:
    lines = [f"{row.entry.name}: expected {row.entry.verdict.summary}"]
    if row.error:
        lines.append(f"error: {row.error}")
    lines += [f"missed (must fire at warning or above): {m}" for m in row.missing]
    lines += [f"unexpected: {a.line()}" for a in row.unexpected]
    return "\n".join(lines)


@pytest.mark.parametrize("entry", cal.LOGS, ids=[e.name for e in cal.LOGS])
def test_public_log(entry):
    row = cal.run_entry(entry)
    assert row.error is None, row.error
    assert row.records > 0 and not row.data.problems, row.data.problems
    passed = row.passed
    assert passed, _explain(row)


def test_llmc_known_spikes_still_reach_warning():
    """The two known spikes of the llm.c run are allowed to warn; they must still be seen (at least info)."""
    row = cal.run_entry(cal.BY_NAME["llmc-gpt2-124m"])
    seen = {(a.rule, a.step) for a in row.alerts}
    assert {("grad_norm.spike", 7435), ("grad_norm.spike", 9025)} <= seen


def _lrs(row: cal.Row) -> list[float]:
    return [r.lr[0] for r in row.data.records[0]]


@pytest.mark.slow
def test_nanogpt_shakespeare_char_is_healthy():
    """nanoGPT's shakespeare_char hyper-parameters (beta2 0.99, warmup 100, lr 1e-3 cosine to 1e-4): no warning."""
    row = cal.run_entry(cal.BY_NAME["nanogpt-shakespeare-char"])
    assert row.error is None, row.error
    lrs = _lrs(row)
    # the run really is the config: warmup from lr/101 over 100 iterations, the peak at 100, cosine to min_lr
    assert len(lrs) == 300 and math.isclose(lrs[0], 1e-3 / 101) and math.isclose(max(lrs), 1e-3)
    assert lrs.index(max(lrs)) == 100 and math.isclose(lrs[-1], 1e-4, rel_tol=0.01)
    assert row.data.info.optimizer.groups[0].betas[1] == 0.99
    passed = row.passed
    assert passed, _explain(row)


@pytest.mark.slow
def test_nanogpt_without_warmup_raises_warmup_missing():
    row = cal.run_entry(cal.BY_NAME["nanogpt-shakespeare-char-no-warmup"])
    assert row.error is None, row.error
    assert math.isclose(_lrs(row)[0], 1e-3)
    passed = row.passed
    assert passed, _explain(row)
    hit = next(a for a in row.alerts if a.rule == "warmup.missing")
    assert hit.severity is Severity.warning and hit.step == 0


@pytest.mark.slow
def test_hf_trainer_defaults_finetune_is_healthy():
    """Hugging Face Trainer defaults (lr 5e-5, no warmup, linear decay) fine-tuning a small model: no warning."""
    row = cal.run_entry(cal.BY_NAME["hf-trainer-defaults-finetune"])
    assert row.error is None, row.error
    lrs = _lrs(row)
    assert len(lrs) == 200 and math.isclose(lrs[0], 5e-5) and lrs == sorted(lrs, reverse=True)
    assert row.data.info.optimizer.groups[0].betas[1] == 0.999
    passed = row.passed
    assert passed, _explain(row)


# -- the harness itself -----------------------------------------------------------------------------


def _alert(rule: str, severity: str, step: int, **evidence):
    return SimpleNamespace(rule=rule, severity=Severity(severity), step=step, evidence=evidence,
                           line=lambda: f"{severity} {rule} at {step}")


def test_judge_fails_a_healthy_source_that_warns_and_passes_info():
    healthy = cal.Entry("h", "log", "-", "-", cal.HEALTHY, path="x")
    assert cal.judge(healthy, [_alert("loss.spike", "info", 5)], 10, 0.0).passed
    row = cal.judge(healthy, [_alert("warmup.too_short", "warning", 100)], 10, 0.0)
    assert not row.passed and [a.rule for a in row.unexpected] == ["warmup.too_short"]


def test_judge_requires_and_tolerates_by_rule_and_step():
    v = cal.Verdict("broken", must=(cal.Match("loss.divergence"),), may=(cal.Match("loss.spike", (1, 12)),))
    e = cal.Entry("b", "log", "-", "-", v, path="x")
    assert not cal.judge(e, [], 10, 0.0).passed  # what must fire did not
    assert not cal.judge(e, [_alert("loss.divergence", "info", 3)], 10, 0.0).passed  # info is not enough
    ok = [_alert("loss.divergence", "critical", 3), _alert("loss.spike", "warning", 3)]
    assert cal.judge(e, ok, 10, 0.0).passed
    late = [_alert("loss.divergence", "critical", 3), _alert("loss.spike", "warning", 40)]
    assert not cal.judge(e, late, 10, 0.0).passed  # tolerated only inside its window
    # an alert counts in the window by its step or by the step the signal first left its band
    assert cal.judge(e, [_alert("loss.divergence", "critical", 3), _alert("loss.spike", "warning", 40, detected_at=9)],
                     10, 0.0).passed


def test_markdown_has_a_row_per_source_and_says_why_a_row_fails():
    e = cal.Entry("h", "log", "-", "-", cal.HEALTHY, path="x")
    rows = [cal.judge(e, [_alert("clip.saturated", "warning", 50)], 10, 0.0),
            cal.judge(cal.Entry("g", "log", "-", "-", cal.HEALTHY, path="y"), [], 10, 0.0)]
    md = cal.markdown(rows)
    assert "| h | log |" in md and "| g | log |" in md and "**FAIL**: unexpected `clip.saturated@50`" in md
    assert "- h: warning clip.saturated at 50" in md
    data = cal.to_json(rows)["rows"]
    assert [r["passed"] for r in data] == [False, True] and data[0]["counts"]["warning"] == 1


# -- the corpus on disk -----------------------------------------------------------------------------


def test_corpus_files_are_small_and_each_is_a_source():
    files = [p for p in cal.CORPUS.rglob("*") if p.is_file()]
    assert all(p.stat().st_size < 200_000 for p in files), [(p.name, p.stat().st_size) for p in files]
    assert sum(p.stat().st_size for p in files) < 1_000_000
    used = {cal.ROOT / e.path for e in cal.LOGS}
    for p in files:
        if p != README:
            assert p in used or p.parent in used, f"{p} is no calibration source"
    for e in cal.LOGS:
        assert (cal.ROOT / e.path).exists(), e.path


def test_readme_documents_every_source():
    text = README.read_text()
    sections = dict(re.findall(r"^## (\S+)\n(.*?)(?=^## |\Z)", text, flags=re.M | re.S))
    for e in cal.ENTRIES:
        assert e.name in sections, f"{e.name} has no section in {README}"
        body = sections[e.name]
        for key in ("Source", "Licen", "Expected verdict"):
            assert key in body, f"{e.name}: no {key!r} in its README section"
    for name, body in sections.items():
        if name in cal.BY_NAME and cal.BY_NAME[name].kind == "log":
            assert re.search(r"\b[0-9a-f]{40}\b", body), f"{name}: the README names no commit"
