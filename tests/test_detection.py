"""The detection-quality matrix: every planted fault caught within its latency, healthy runs quiet.

Scenarios live in monitor.trainer.detection (shared with benchmarks/detection.py, which writes
benchmarks/detection.md over several seeds); here each runs once with its default seed.
"""

from __future__ import annotations

import statistics

import pytest

from monitor.cli.check import check_run
from monitor.config import load_config
from monitor.trainer.detection import SCENARIOS, run_scenario

JUDGED = [s for s in SCENARIOS if s.pending is None]


@pytest.mark.slow
@pytest.mark.parametrize("scenario", JUDGED, ids=[s.name for s in JUDGED])
def test_scenario(scenario, tmp_path):
    out = run_scenario(scenario, run_dir=tmp_path / "run")
    # `monitor check` on the run directory reaches the same verdicts as the process did (but for
    # run.stalled, which came from the process's clock: a replay has none)
    _, replayed = check_run(tmp_path / "run", load_config(None, environ={}))
    key = lambda a: (a.rule, a.severity.value, a.step, a.rank)  # noqa: E731
    assert sorted(map(key, replayed)) == sorted(key(a) for a in out.alerts if a.rule != "run.stalled")
    if scenario.healthy:
        assert out.loud == [], [a.line() for a in out.loud]
    for rule, latency in out.latency.items():
        assert latency is not None, f"{rule} missed; raised: {[a.line() for a in out.alerts]}"
        assert latency <= scenario.expect[rule], f"{rule} after {latency} steps (max {scenario.expect[rule]})"
    for rule in scenario.expect:
        hit = next(a for a in out.alerts if a.rule == rule)
        assert hit.hint and hit.evidence, rule
    # The healthy scenarios must really contain what makes them hard.
    if scenario.name == "healthy-fp16-calibration":
        assert out.skipped_steps >= 10
    if scenario.name == "healthy-long-cosine":
        g = out.grad_norms
        blocks = [statistics.median(g[i:i + 50]) for i in range(50, len(g), 50)]
        assert statistics.median(g[-150:]) >= 1.15 * min(blocks), "the raw grad norm should rise late"


def test_matrix_covers_the_catalogue_and_six_healthy_configs():
    from monitor.trainer import FAULTS

    assert sum(s.healthy for s in SCENARIOS) >= 6
    planted = {f.split(":")[0] for s in SCENARIOS for f in s.overrides.get("faults", [])}
    assert planted == set(FAULTS), f"faults without a scenario: {set(FAULTS) - planted}"
