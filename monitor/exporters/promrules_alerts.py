"""The exported Prometheus alerts, one builder each; thresholds from the rules' configs.

A builder takes rule options (a MonitorConfig, a mapping of rule id to options, or None) and the
scrape job of the per-rank endpoints, and returns an `AlertDef` with its promtool test cases
scaled to the thresholds, or None when the rule it exports is disabled. The `rule` label names the
rule whose section of docs/rules.md is the alert's runbook (AlertDef.runbook where there is none).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from monitor.exporters.promrules_model import AlertDef, Case, Expect, Series
from monitor.exporters.ruleconfig import rule_config, rule_fix, rule_severity
from monitor.rules.registry import REGISTRY, _load_builtins

# Time window of the skipped-step rate (amp.overflow counts steps; Prometheus counts time).
SKIP_WINDOW = "10m"
DOWN_FOR = "2m"
DOWN_HINT = ("Check whether the training process crashed or is frozen (its log, `monitor check RUN_DIR`), "
             "or whether Prometheus can reach the endpoint listed in the run's targets.json.")
# Labels that tell the sources of a series apart (per-rank endpoint or `monitor watch`, and the
# file_sd target labels), not the run: an alert raised by both is one alert.
SOURCE_LABELS = ("instance", "job", "trainmon_run", "trainmon_rank")
SERIES_KEY = "job, instance, run, rank"


def _num(x: float) -> str:
    """A threshold as PromQL writes it: 120 not 120.0, 0.01 as is."""
    return repr(int(x)) if float(x).is_integer() else repr(float(x))


def _sel(job: str, **extra: str) -> str:
    inner = ", ".join([f'job="{job}"', *(f'{k}="{v}"' for k, v in extra.items())])
    return "{" + inner + "}"


def _target(job: str, run: str, rank: str, port: int) -> dict[str, str]:
    """Labels of a series scraped from a per-rank endpoint (exposition + target labels)."""
    return {"job": job, "instance": f"127.0.0.1:{port}", "run": run, "rank": rank,
            "trainmon_run": run, "trainmon_rank": rank}


def _stalled(options: Any, job: str) -> AlertDef | None:
    cfg = rule_config("run.stalled", options)
    if not cfg.enabled:
        return None
    floor, factor = cfg.floor_seconds, cfg.factor
    s = _sel(job)
    expr = (
        f"(\n  time() - trainmon_last_step_timestamp_seconds{s}\n)\n"
        f"> on ({SERIES_KEY}) (\n"
        f"    clamp_min({_num(factor)} * (histogram_quantile(0.5, sum by ({SERIES_KEY}, le) "
        f"(trainmon_step_duration_seconds_bucket{s})) >= 0), {_num(floor)})\n"
        f"  or on ({SERIES_KEY})\n"
        f"    0 * trainmon_last_step_timestamp_seconds{s} + {_num(floor)}\n)\n"
        f"and on (job, instance) up{s} == 1"
    )
    return AlertDef(
        name="TrainmonRunStalled",
        expr=expr,
        for_="1m",
        severity=rule_severity("run.stalled", cfg),
        labels={"rule": "run.stalled"},
        summary="Run {{ $labels.run }} rank {{ $labels.rank }} has made no optimizer step for "
                '{{ $value | printf "%.0f" }} s.',
        hint=rule_fix("run.stalled"),
        cases=[_stalled_case(job, floor, factor)],
    )


def _stalled_case(job: str, floor: float, factor: float) -> Case:
    """Runs that step once a minute until minute `stop`, then stop; scaled to the thresholds."""
    stop, m = 5, math.ceil(floor / 60)  # m: whole minutes of the floor
    quiet, stalled = stop + math.floor(floor / 60), stop + m + 2  # eval times: within the floor / beyond it
    n = stalled + 3  # samples per series
    fast, slow, fresh, down, healthy = (_target(job, r, "0", 9740 + i) for i, r in
                                        enumerate(("fast", "slow", "fresh", "down", "healthy")))
    stepping = f"0+60x{stop} {60 * stop}x{n - stop}"

    def hist(labels: dict[str, str], le: float, count: str) -> list[Series]:
        # Every observation in (le, 2 le]: the median is 1.5 le.
        return [Series("trainmon_step_duration_seconds_bucket", {**labels, "le": k}, v)
                for k, v in ((_num(le), f"0x{n}"), (_num(2 * le), count), ("+Inf", count))]

    def up(labels: dict[str, str], values: str) -> Series:
        return Series("up", {k: v for k, v in labels.items() if k not in ("run", "rank")}, values)

    def matched(labels: dict[str, str]) -> dict[str, str]:
        # A one-to-one comparison with on (...) keeps only the matching labels.
        return {k: labels[k] for k in ("job", "instance", "run", "rank")}

    age = 60.0 * (stalled - stop)
    series = [
        # Fast steps (factor x median well below the floor): the floor is the limit.
        Series("trainmon_last_step_timestamp_seconds", fast, stepping),
        *hist(fast, floor / (10 * factor), f"0+10x{stop} {10 * stop}x{n - stop}"),
        # Slow steps: factor x median is above the pause, so no stall yet.
        Series("trainmon_last_step_timestamp_seconds", slow, stepping),
        *hist(slow, age / factor, f"0+1x{stop} {stop}x{n - stop}"),
        # One step, no step time observed yet (an empty histogram): the floor applies.
        Series("trainmon_last_step_timestamp_seconds", fresh, f"{60 * stop}x{n}"),
        *hist(fresh, 0.1, f"0x{n}"),
        # Stopped and no longer answering scrapes: TrainmonTargetDown's business, not this alert's.
        Series("trainmon_last_step_timestamp_seconds", down, stepping),
        up(down, f"1x{stop} 0x{n - stop}"),
        Series("trainmon_last_step_timestamp_seconds", healthy, f"0+60x{n}"),
        *hist(healthy, 0.1, f"0+10x{n}"),
        *(up(t, f"1x{n}") for t in (fast, slow, fresh, healthy)),
    ]
    return Case(series, [
        (f"{stop - 1}m", []),
        (f"{quiet}m", []),
        (f"{stalled}m", [Expect(matched(fast), age), Expect(matched(fresh), age)]),
    ])


def _active(options: Any, job: str) -> AlertDef:
    _load_builtins()
    fixes = {rule_id: rule_fix(rule_id) for rule_id in REGISTRY.ids()}
    a = {**_target(job, "r1", "0", 9740), "rule": "loss.nonfinite", "severity": "critical"}
    # The same alert, raised again by `monitor watch` (another job, no target labels).
    a_watch = {"job": f"{job}-watch", "instance": "127.0.0.1:9739", "run": "r1", "rank": "0",
               "rule": "loss.nonfinite", "severity": "critical"}
    custom = {**_target(job, "r1", "1", 9741), "rule": "custom.my_rule", "severity": "info"}
    # A rule outside the catalogue at warning: the default hint, the catalogue as its runbook.
    custom_warning = {**_target(job, "r3", "0", 9743), "rule": "custom.my_rule", "severity": "warning"}
    resolved = {**_target(job, "r2", "0", 9742), "rule": "loss.spike", "severity": "warning"}
    escalated = {**resolved, "severity": "critical"}

    def key(labels: dict[str, str]) -> dict[str, str]:
        return {k: v for k, v in labels.items() if k not in SOURCE_LABELS}

    return AlertDef(
        name="TrainmonAlertActive",
        # Info findings (preflight advice) stay on the dashboards; paging starts at warning.
        expr=f"max without ({', '.join(SOURCE_LABELS)}) (trainmon_alert_active{{severity=~\"warning|critical\"}}) == 1",
        for_="0s",
        severity="{{ $labels.severity }}",
        summary="{{ $labels.rule }} ({{ $labels.severity }}) is firing in run {{ $labels.run }} "
                "rank {{ $labels.rank }}.",
        hint=fixes,
        hint_default="Run `monitor rules` for what {{ $labels.rule }} means and how to fix it.",
        cases=[Case(
            [Series("trainmon_alert_active", a, "0 0 1 1 1 1"),
             Series("trainmon_alert_active", a_watch, "_ _ _ 1 1 1"),
             Series("trainmon_alert_active", custom, "_ _ _ _ 1 1"),
             # A warning raised, then resolved (0); later the same rule at critical.
             Series("trainmon_alert_active", resolved, "0 1 0 0 0 0"),
             Series("trainmon_alert_active", escalated, "0 0 0 0 1 0"),
             Series("trainmon_alert_active", custom_warning, "_ _ _ _ _ 1")],
            [("0m", []),
             ("1m", [Expect(key(resolved))]),
             ("2m", [Expect(key(a))]),
             # `custom` is info: shown on the dashboards, never sent to Alertmanager.
             ("4m", [Expect(key(a)), Expect(key(escalated))]),
             ("5m", [Expect(key(a)), Expect(key(custom_warning))])],
        )],
    )


def _skipped(options: Any, job: str) -> AlertDef | None:
    cfg = rule_config("amp.overflow", options)
    if not cfg.enabled:
        return None
    s = _sel(job)
    w = SKIP_WINDOW
    min_skips = cfg.max_rate * cfg.window  # the rule's absolute floor: its rate over a full window
    expr = (
        f"(\n  increase(trainmon_skipped_steps_total{s}[{w}])\n"
        f"  / increase(trainmon_optimizer_steps_total{s}[{w}])\n) > {_num(cfg.max_rate)}\n"
        f"and on ({SERIES_KEY}) increase(trainmon_skipped_steps_total{s}[{w}]) > {_num(min_skips)}\n"
        # Calibration skips happen in the first steps: the window must start after them.
        f"and on ({SERIES_KEY}) (trainmon_optimizer_steps_total{s} offset {w}) > {_num(cfg.calibration_steps)}"
    )
    return AlertDef(
        name="TrainmonSkippedStepRate",
        expr=expr,
        for_="5m",
        severity=rule_severity("amp.overflow", cfg),
        labels={"rule": "amp.overflow"},
        summary="GradScaler skipped a fraction {{ $value | printf \"%.3f\" }} of the optimizer steps of run "
                f"{{{{ $labels.run }}}} rank {{{{ $labels.rank }}}} in the last {w} (threshold {_num(cfg.max_rate)}).",
        hint=rule_fix("amp.overflow"),
        cases=[_skipped_case(job, cfg.max_rate, cfg.window, cfg.calibration_steps)],
    )


def _skipped_case(job: str, max_rate: float, window: int, calibration: int) -> Case:
    """Steps and skips per minute for 30 minutes, scaled to amp.overflow's options."""
    over, healthy, calib, sparse = (_target(job, r, "0", 9740 + i) for i, r in
                                    enumerate(("overflowing", "healthy", "calibrating", "sparse")))
    per_min = max(1000, window, calibration + 1)  # optimizer steps per minute
    rate = min(5 * max_rate, (1 + max_rate) / 2)  # skipped fraction of the overflowing run
    series = [
        Series("trainmon_optimizer_steps_total", over, f"0+{per_min}x30"),
        Series("trainmon_skipped_steps_total", over, f"0+{_num(per_min * rate)}x30"),
        # Skips far below the limit (GradScaler probing a larger scale once per growth interval).
        Series("trainmon_optimizer_steps_total", healthy, f"0+{per_min}x30"),
        Series("trainmon_skipped_steps_total", healthy, f"0+{_num(per_min * max_rate / 20)}x30"),
        # Up (loading data, compiling) for 10 minutes, then many skips while the scale calibrates, none after.
        Series("trainmon_optimizer_steps_total", calib, "0x10 0+20x20"),
        Series("trainmon_skipped_steps_total", calib, "0x10 0+10x2 20x18"),
        # A high skipped fraction of very few steps: fewer skips than the rule's full window needs.
        Series("trainmon_optimizer_steps_total", sparse, f"{calibration + 100}+0.1x30"),
        Series("trainmon_skipped_steps_total", sparse, f"0x14 0+{_num(max_rate * window / 20)}x16"),
    ]
    return Case(series, [("8m", []), ("17m", [Expect(over, rate)]), ("25m", [Expect(over, rate)])])


def _nonfinite(options: Any, job: str) -> AlertDef | None:
    cfg = rule_config("loss.nonfinite", options)
    if not cfg.enabled:
        return None
    loss = f"trainmon_loss{_sel(job)}"
    # The window's largest loss (NaN counts as largest): a NaN step that recovered before the scrape too.
    peak = f"trainmon_loss_max{_sel(job)}"
    nan, inf, ok = (_target(job, r, "0", p) for r, p in (("nan", 9740), ("inf", 9741), ("ok", 9742)))
    ninf = _target(job, "inf", "1", 9743)
    between = _target(job, "between", "0", 9744)
    return AlertDef(
        name="TrainmonLossNonFinite",
        expr=f"{peak} != {peak} or {peak} == +Inf or {loss} == -Inf",
        for_="0s",
        severity=rule_severity("loss.nonfinite", cfg),
        labels={"rule": "loss.nonfinite"},
        summary="The loss of run {{ $labels.run }} rank {{ $labels.rank }} is NaN or infinite.",
        hint=rule_fix("loss.nonfinite"),
        cases=[Case(
            [Series("trainmon_loss_max", nan, "2.5 2.4 NaN NaN"),
             Series("trainmon_loss_max", inf, "2.5 2.4 2.3 +Inf"),
             Series("trainmon_loss", ninf, "2.5 2.4 2.3 -Inf"),
             Series("trainmon_loss_max", ok, "2.5 2.4 2.3 2.2"),
             # a NaN step between two scrapes: the latest loss is finite, the window's peak is not
             Series("trainmon_loss", between, "2.5 2.4 2.3 2.2"),
             Series("trainmon_loss_max", between, "2.5 NaN NaN 2.2")],
            [("0m", []), ("1m", [Expect(between)]), ("2m", [Expect(nan), Expect(between)]),
             ("3m", [Expect(nan), Expect(inf), Expect(ninf)])],
        )],
    )


def _down(options: Any, job: str) -> AlertDef:
    def up(run: str, rank: str, port: int) -> dict[str, str]:
        return {"job": job, "instance": f"127.0.0.1:{port}", "trainmon_run": run, "trainmon_rank": rank}

    crashed, alive, other = up("r1", "1", 9741), up("r1", "0", 9740), {"job": "node", "instance": "127.0.0.1:9100"}
    return AlertDef(
        name="TrainmonTargetDown",
        expr=f"up{_sel(job)} == 0",
        for_=DOWN_FOR,
        severity="critical",
        summary="The trainmon endpoint {{ $labels.instance }} (run {{ $labels.trainmon_run }} rank "
                f"{{{{ $labels.trainmon_rank }}}}) has not answered scrapes for {DOWN_FOR}.",
        hint=DOWN_HINT,
        runbook="run.stalled",  # a crashed or frozen rank: what run.stalled's section covers
        cases=[Case(
            [Series("up", crashed, "1 1 0 0 0 0 0"), Series("up", alive, "1x6"), Series("up", other, "0x6")],
            [("3m", []), ("5m", [Expect(crashed, 0)])],
        )],
    )


BUILDERS: list[Callable[[Any, str], AlertDef | None]] = [_stalled, _active, _skipped, _nonfinite, _down]
