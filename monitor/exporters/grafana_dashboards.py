"""The trainmon dashboards: Overview, Alerts, Attention and DDP ranks.

Each builder takes rule options (a MonitorConfig, a mapping of rule id to options, or None) and
the scrape job of the per-rank endpoints. Threshold lines and colours on panels come from the
rules' configs (ruleconfig), so a panel turns red where the rule fires. Every dashboard (all select
runs) draws the rules' alerts (alert_annotations) and marks where a run resumed or restarted
(ATTEMPT_ANNOTATION).

Built for hundreds of ranks: the Overview aggregates over the selected ranks per run (mean, lowest
and highest loss; step-time quantiles over all ranks' steps; total throughput), and the DDP
dashboard's per-rank panels draw the `$topk` most extreme ranks of each run (topk/bottomk), with
the run's median over ranks as a dashed reference where it helps; `$rank` narrows any of them.
"""

from __future__ import annotations

from typing import Any

from monitor.exporters.grafana_panels import (
    ATTEMPT_ANNOTATION,
    RATE,
    TOPK,
    Layout,
    Q,
    alert_annotations,
    dashboard,
    dashed,
    right_axis,
    sel,
    stat,
    table,
    timeseries,
    variables,
)
from monitor.exporters.promrules import JOB
from monitor.exporters.promrules_model import check_job
from monitor.exporters.ruleconfig import rule_config


def quantile(q: float, labels: tuple[str, ...] = ("run", "rank")) -> str:
    """Step-time quantile q of the selected ranks' steps, grouped by `labels` (by run: over all its ranks)."""
    by = ", ".join((*labels, "le"))
    return (f"histogram_quantile({q}, sum by ({by}) "
            f"(rate(trainmon_step_duration_seconds_bucket{sel('run', 'rank')}[{RATE}])))")


def mean_step_time(selector: str) -> str:
    return (f"sum by (run, rank) (rate(trainmon_step_duration_seconds_sum{selector}[{RATE}]))\n"
            f"  / sum by (run, rank) (rate(trainmon_step_duration_seconds_count{selector}[{RATE}]))")


def overview(options: Any = None, job: str = JOB) -> dict[str, Any]:
    floor = rule_config("run.stalled", options).floor_seconds
    collapse_floor = rule_config("amp.scale_collapse", options).floor
    L = Layout()
    L.add(stat("Optimizer steps", "Optimizer steps so far (GradScaler-skipped ones included), per run.",
               [Q(f"max by (run) (trainmon_optimizer_steps_total{sel('run', 'rank')})", "{{run}}")]), w=6, h=4)
    L.add(stat("Since the last step", "Seconds since the last optimizer step ended (slowest rank); red from "
               "run.stalled's floor_seconds.",
               [Q(f"time() - min by (run) (trainmon_last_step_timestamp_seconds{sel('run', 'rank')})", "{{run}}")],
               unit="s", thresholds=[(None, "green"), (floor / 2, "yellow"), (floor, "red")]), w=6, h=4)
    L.add(stat("Active alerts", "Rules firing now (trainmon_alert_active == 1); the Alerts dashboard lists them.",
               [Q(f"count(trainmon_alert_active{sel('run', 'rank')} == 1) or vector(0)", "active")],
               thresholds=[(None, "green"), (1, "red")]), w=6, h=4)
    L.add(stat("Monitor health", "Step records the monitor dropped (publisher queue full) and errors it caught; "
               "both should stay 0.",
               [Q(f"sum(trainmon_dropped_records_total{sel('run', 'rank')})", "dropped records"),
                Q(f"sum(trainmon_internal_errors_total{sel('run', 'rank')})", "internal errors")],
               thresholds=[(None, "green"), (1, "orange")]), w=6, h=4)
    loss = f"trainmon_loss{sel('run', 'rank')}"
    L.add(timeseries("Loss", "Training loss of each optimizer step (mean over micro-batches): the mean over the "
                     "selected ranks per run, the lowest and highest rank, and the peak step (dashed: the largest "
                     "loss of any step in the last metrics.extremes_window_seconds, so a one-step spike between two "
                     "scrapes shows). A NaN/Inf loss on any rank makes the mean a gap: see loss.nonfinite. The DDP "
                     "dashboard has the ranks one by one.",
                     [Q(f"avg by (run) ({loss})", "{{run}} mean over ranks"),
                      Q(f"min by (run) ({loss})", "{{run}} lowest rank"),
                      Q(f"max by (run) ({loss})", "{{run}} highest rank"),
                      Q(f"max by (run) (trainmon_loss_max{sel('run', 'rank')})", "{{run}} peak step")],
                     overrides=[dashed(".* (lowest|highest) rank$"), dashed(".* peak step$")]))
    L.add(timeseries("Learning rate", "Learning rate per param group, as used by each optimizer step (rank 0).",
                     [Q(f"trainmon_learning_rate{sel('run')}", "{{run}} group {{group}}")]))
    L.add(timeseries(
        "Gradient norm", "Global L2 norm of the unscaled gradients before and after clipping (rank 0), the peak "
        "step's before clipping (dashed: over the last metrics.extremes_window_seconds, so a spike between two "
        "scrapes shows), and the factor clipping applied (right axis, 1 = not clipped).",
        [Q(f"trainmon_grad_norm{sel('run')}", "{{run}} before clipping"),
         Q(f"trainmon_grad_norm_max{sel('run')}", "{{run}} peak step before clipping"),
         Q(f"trainmon_grad_norm_clipped{sel('run')}", "{{run}} after clipping"),
         Q(f"trainmon_clip_coefficient{sel('run')}", "{{run}} clip coefficient")],
        overrides=[right_axis(".* clip coefficient$", unit="percentunit"), dashed(".* peak step before clipping$")]))
    L.add(timeseries(
        "Loss scale and skipped steps", "GradScaler's loss scale (log2 axis; red below amp.scale_collapse's floor), "
        "its lowest over the last metrics.extremes_window_seconds (a drop between two scrapes shows) and the "
        "optimizer steps it skipped for inf/NaN gradients (bars, right axis).",
        [Q(f"trainmon_loss_scale{sel('run')}", "{{run}} loss scale"),
         Q(f"trainmon_loss_scale_min{sel('run')}", "{{run}} lowest loss scale (window)"),
         Q(f"sum by (run) (increase(trainmon_skipped_steps_total{sel('run', 'rank')}[{RATE}]))",
           "{{run}} skipped steps")],
        log=2, thresholds=[(None, "red"), (collapse_floor, "transparent")],
        overrides=[right_axis(".* skipped steps$", bars=True)]))
    L.add(timeseries("Step time", "Wall time per optimizer step: median, p90 and p99 per run, over the steps of "
                     "all the selected ranks (from the trainmon_step_duration_seconds histogram); the DDP dashboard "
                     "has the slowest ranks.",
                     [Q(quantile(q, ("run",)), f"{{{{run}}}} p{round(q * 100)}") for q in (0.5, 0.9, 0.99)],
                     unit="s"))
    L.add(timeseries("Throughput (tokens/s)", "Tokens (input elements) processed per second, per run (the "
                     "selected ranks together).",
                     [Q(f"sum by (run) (rate(trainmon_tokens_total{sel('run', 'rank')}[{RATE}]))",
                        "{{run}}")], unit="suffix: tok/s"), w=6)
    L.add(timeseries("Throughput (steps/s)", "Optimizer steps per second, per run (mean over the selected ranks, "
                     "which step together).",
                     [Q(f"avg by (run) (rate(trainmon_optimizer_steps_total{sel('run', 'rank')}[{RATE}]))",
                        "{{run}}")], unit="suffix: steps/s"), w=6)
    return dashboard("trainmon-overview", "trainmon / Overview",
                     "Loss, learning rate, gradient norms, loss scale, step time and throughput of trainmon runs.",
                     L, variables(job, "run", "rank"), [*alert_annotations("run", "rank"), ATTEMPT_ANNOTATION])


def alerts(options: Any = None, job: str = JOB) -> dict[str, Any]:
    L = Layout()
    L.add(stat("Active alerts by severity", "Rules firing now, by severity (trainmon_alert_active).",
               [Q(f"sum by (severity) (trainmon_alert_active{sel('run', 'rank')})", "{{severity}}")],
               thresholds=[(None, "green"), (1, "red")]), w=8, h=5)
    L.add(timeseries("Prometheus alerts (exported rules)", "Alerts of the exported Prometheus rules "
                     "(grafana/prometheus/alerts.yml) firing now, by name and severity.",
                     [Q('sum by (alertname, severity) (ALERTS{alertname=~"Trainmon.*", alertstate="firing"})',
                        "{{alertname}} ({{severity}})")], bars=True), w=16, h=5)
    L.add(table("Active alerts", "Every rule firing now, per run and rank; `monitor check RUN_DIR` or "
                "alerts.jsonl in the run directory has the message, the evidence and the fix.",
                Q(f"trainmon_alert_active{sel('run', 'rank')} == 1"),
                columns=["run", "rank", "rule", "severity"],
                hide=["Time", "Value", "__name__", "instance", "job", "trainmon_run", "trainmon_rank"]), w=24, h=8)
    L.add(timeseries("Alerts raised, by rule", "Alerts raised per interval, by rule and severity "
                     "(trainmon_alerts_total).",
                     [Q(f"sum by (rule, severity) (increase(trainmon_alerts_total{sel('run', 'rank')}[$__interval]))",
                        "{{rule}} ({{severity}})")], bars=True), w=24)
    L.add(table("Alerts raised per run", "Alerts raised since each rank started, per rule and severity, over the "
                "runs seen in the time range.",
                Q(f"max by (run, rank, rule, severity) "
                  f"(max_over_time(trainmon_alerts_total{sel('run', 'rank')}[$__range]))"),
                columns=["run", "rank", "rule", "severity", "Value"], hide=["Time"]), w=24)
    return dashboard("trainmon-alerts", "trainmon / Alerts",
                     "What the trainmon rules engines (in-process and `monitor watch`) flag, now and over time.",
                     L, variables(job, "run", "rank"), [*alert_annotations("run", "rank"), ATTEMPT_ANNOTATION])


def attention(options: Any = None, job: str = JOB) -> dict[str, Any]:
    floor = rule_config("attention.entropy_collapse", options).floor
    logits = rule_config("attention.logit_growth", options)
    warn, crit = logits.warning, logits.critical
    entropy_steps = [(None, "red"), (floor, "green")]
    logit_steps = [(None, "green"), (warn, "orange"), (crit, "red")]
    s = sel("run", "layer")
    L = Layout()
    L.add(stat("Entropy ratio now, per layer", "Attention entropy / log(visible keys), mean over heads (rank 0, "
               "sampled steps); red below attention.entropy_collapse's floor.",
               [Q(f"trainmon_attention_entropy_ratio{s}", "{{run}} {{layer}}")], unit="percentunit",
               thresholds=entropy_steps), h=5)
    L.add(stat("Max logit now, per layer", "Largest attention logit (rank 0, sampled steps); orange and red at "
               "attention.logit_growth's warning and critical thresholds.",
               [Q(f"trainmon_attention_max_logit{s}", "{{run}} {{layer}}")], thresholds=logit_steps), h=5)
    L.add(timeseries("Attention entropy ratio", "Normalised attention entropy per layer: a collapse (a sharp drop) "
                     "precedes loss spikes (Zhai et al. 2023).",
                     [Q(f"trainmon_attention_entropy_ratio{s}", "{{run}} {{layer}}")], unit="percentunit",
                     thresholds=entropy_steps, minimum=0, maximum=1), w=24)
    L.add(timeseries("Max attention logit", "Largest attention logit per layer (log axis): ~100 is a healthy "
                     "ceiling, growth past it precedes divergence (Wortsman et al. 2023).",
                     [Q(f"trainmon_attention_max_logit{s}", "{{run}} {{layer}}")], thresholds=logit_steps, log=10),
          w=24)
    L.add(timeseries("Lowest entropy ratio and highest max logit over layers", "The extreme layer per run "
                     "(entropy ratio left, max logit right).",
                     [Q(f"min by (run) (trainmon_attention_entropy_ratio{s})", "{{run}} lowest entropy ratio"),
                      Q(f"max by (run) (trainmon_attention_max_logit{s})", "{{run}} highest max logit")],
                     unit="percentunit", overrides=[right_axis(".* highest max logit$", unit="short")]), w=24)
    r = sel("run")
    L.add(timeseries("Probe cost and interval", "What the last attention probe cost the training thread (left) and "
                     "the interval the overhead budget keeps (right, optimizer steps).",
                     [Q(f"trainmon_attention_probe_seconds{r}", "{{run}} probe cost"),
                      Q(f"trainmon_attention_probe_interval_steps{r}", "{{run}} interval")],
                     unit="s", overrides=[right_axis(".* interval$", unit="short")]), w=24)
    return dashboard("trainmon-attention", "trainmon / Attention",
                     "Per-layer attention statistics of trainmon runs (rank 0, sampled steps).",
                     L, variables(job, "run", "layer"), [*alert_annotations("run"), ATTEMPT_ANNOTATION])


def top(expr: str, by: str = "run", fn: str = "topk") -> str:
    """The `$topk` highest (fn="bottomk": lowest) series of expr per `by`, at each step."""
    inner = expr.replace("\n", "\n  ")
    return f"{fn} by ({by}) ({TOPK},\n  {inner}\n)"


def ddp(options: Any = None, job: str = JOB) -> dict[str, Any]:
    per_rank = sel("run", "rank")
    all_ranks = sel("run")
    median = [dashed(".* median over ranks$")]
    L = Layout()
    L.add(stat("Ranks reporting", "Ranks with a metrics series, per run.",
               [Q(f"count by (run) (trainmon_optimizer_steps_total{all_ranks})", "{{run}}")]), w=8, h=4)
    L.add(stat("Step spread", "Optimizer steps of the most advanced rank minus the least advanced one, per run "
               "(ranks step together: more than a few means a rank is stuck or restarted).",
               [Q(f"max by (run) (trainmon_optimizer_steps_total{all_ranks}) - "
                  f"min by (run) (trainmon_optimizer_steps_total{all_ranks})", "{{run}}")],
               thresholds=[(None, "green"), (3, "orange")]), w=8, h=4)
    L.add(stat("Since the last step, per rank", "Seconds since each rank's last optimizer step: the $topk ranks "
               "per run that stepped longest ago.",
               [Q(top(f"time() - trainmon_last_step_timestamp_seconds{per_rank}"), "{{run}} rank {{rank}}")],
               unit="s"), w=8, h=4)
    loss = f"trainmon_loss{per_rank}"
    L.add(timeseries("Loss per rank", "Each rank's loss on its own micro-batches: the $topk highest ranks per run "
                     "at each step, and the median over the run's selected ranks (dashed).",
                     [Q(top(loss), "{{run}} rank {{rank}}"),
                      Q(f"quantile by (run) (0.5, {loss})", "{{run}} median over ranks")], overrides=median))
    L.add(timeseries("Step time per rank (median)", "Median wall time per optimizer step: the $topk slowest ranks "
                     "per run, and the median over all the run's selected ranks' steps (dashed).",
                     [Q(top(quantile(0.5)), "{{run}} rank {{rank}}"),
                      Q(quantile(0.5, ("run",)), "{{run}} median over ranks")], unit="s", overrides=median))
    L.add(timeseries("Step time relative to the median rank", "Each rank's mean step time divided by the median "
                     "over the run's ranks, the $topk highest per run: a straggler stays above 1.",
                     [Q(top(f"(\n  {mean_step_time(per_rank)}\n)\n/ on (run) group_left ()\nquantile by (run) (0.5,\n  "
                            f"{mean_step_time(all_ranks)}\n)"), "{{run}} rank {{rank}}")], unit="none"))
    tokens = f"sum by (run, rank) (rate(trainmon_tokens_total{per_rank}[{RATE}]))"
    L.add(timeseries("Throughput per rank (tokens/s)", "Tokens (input elements) per second: the $topk slowest "
                     "ranks per run, and the median over the run's selected ranks (dashed).",
                     [Q(top(tokens, fn="bottomk"), "{{run}} rank {{rank}}"),
                      Q(f"quantile by (run) (0.5, {tokens})", "{{run}} median over ranks")],
                     unit="suffix: tok/s", overrides=median))
    judged = 'phase=~"input|compute"'
    L.add(timeseries("Step phases per rank", "Seconds of each rank's last step per phase, the $topk highest ranks "
                     "per run and phase: input (previous step's end to the forward: data loading, summed over "
                     "micro-batches), compute (the forward inside the DDP wrapper) and collective_wait (DDP's buffer "
                     "broadcast and the gradient all-reduce left after the backward). A straggler's input or compute "
                     "stands out; the ranks waiting for it have the higher collective_wait.",
                     [Q(top(f"trainmon_step_phase_seconds{per_rank}", by="run, phase"),
                        "{{run}} rank {{rank}} {{phase}}")], unit="s"))
    L.add(timeseries("Input and compute relative to the median rank", "Each rank's input and compute phases "
                     "(averaged over the interval) divided by the median over the run's ranks, the $topk highest per "
                     "run and phase: what ddp.straggler judges (it names a rank persistently above its factor).",
                     [Q(top(f"avg_over_time(trainmon_step_phase_seconds{per_rank[:-1]}, {judged}}}[{RATE}])\n"
                            f"/ on (run, phase) group_left ()\nquantile by (run, phase) (0.5,\n  "
                            f"avg_over_time(trainmon_step_phase_seconds{all_ranks[:-1]}, {judged}}}[{RATE}])\n)",
                            by="run, phase"),
                        "{{run}} rank {{rank}} {{phase}}")], unit="none"))
    L.add(timeseries("Skipped steps per rank", "Optimizer steps GradScaler skipped per interval: the $topk ranks "
                     "per run that skipped most.",
                     [Q(top(f"sum by (run, rank) (increase(trainmon_skipped_steps_total{per_rank}[{RATE}]))"),
                        "{{run}} rank {{rank}}")], bars=True), w=24)
    return dashboard("trainmon-ddp", "trainmon / DDP ranks",
                     "Per-rank statistics of distributed trainmon runs: loss, step time, stragglers, throughput, "
                     "step phases (input, compute, collective wait), skipped steps. Per-rank panels draw the most "
                     "extreme ranks of each run ('ranks per panel', $topk); $rank narrows them.",
                     L, variables(job, "run", "rank", "topk"), [*alert_annotations("run", "rank"), ATTEMPT_ANNOTATION])


DASHBOARDS = {"overview": overview, "alerts": alerts, "attention": attention, "ddp": ddp}


def dashboards(options: Any = None, job: str = JOB) -> dict[str, dict[str, Any]]:
    """Every dashboard by file stem. ValueError naming a `job` that cannot go into a PromQL selector."""
    check_job(job)
    return {name: build(options, job) for name, build in DASHBOARDS.items()}

