"""The report's plots built from step records: which plots a run gets, their series and marks.

A plot whose data no record has is left out with the reason (the page lists it under "Not
plotted"). Ranks beyond `MAX_RANK_LINES` are not drawn, with a note; learning rates and
attention statistics come from the first rank that has them (ranks share the schedule, and
the attention probe samples rank 0).
"""

from __future__ import annotations

import re

from monitor.exporters.report_svg import AttemptMarker, Marks, Plot, Series
from monitor.runlog.attempts import describe
from monitor.schema import RunInfo, StepRecord

MAX_RANK_LINES = 8  # ranks drawn individually; beyond this the first ones, with a note
# Series colours: no red/orange, which are the alert severities'.
PALETTE = ["#1f77b4", "#2ca02c", "#9467bd", "#17becf", "#8c564b", "#e377c2", "#bcbd22", "#7f7f7f"]
_RAMP = [(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (190, 210, 30)]  # viridis-like, for many layers
SKIP_COLOR = "#374151"
THRESHOLD_COLOR = "#4b5563"


def _natural_key(s: str) -> list:
    return [int(t) if i % 2 else t for i, t in enumerate(re.split(r"(\d+)", s))]


def _ramp(i: int, n: int) -> str:
    if n <= len(PALETTE):
        return PALETTE[i % len(PALETTE)]
    t = i / max(1, n - 1) * (len(_RAMP) - 1)
    k = min(int(t), len(_RAMP) - 2)
    f = t - k
    c = [round(a + (b - a) * f) for a, b in zip(_RAMP[k], _RAMP[k + 1])]
    return "#{:02x}{:02x}{:02x}".format(*c)


def _steps(recs: list[StepRecord]) -> list[float]:
    return [r.step for r in recs]


def attempt_markers(info: RunInfo) -> list[AttemptMarker]:
    """A marker where each attempt after the first started; none for a run written once."""
    if len(info.attempts) < 2:
        return []
    return [AttemptMarker(a.id, a.start_step, f"attempt {a.id}: {a.kind}", describe(a)) for a in info.attempts[1:]]


def build_plots(records: dict[int, list[StepRecord]]) -> tuple[list[Plot], list[tuple[str, str, str]]]:
    """The plots with data, and (key, title, why) for those left out."""
    ranks = sorted(r for r in records if records[r])
    shown = ranks[:MAX_RANK_LINES]
    multi = len(shown) > 1
    rank_note = (f"Ranks {shown[0]}–{shown[-1]} of {len(ranks)} shown." if len(ranks) > len(shown) else "")
    plots: list[Plot] = []
    omitted: list[tuple[str, str, str]] = []

    def color(i: int) -> str:
        return PALETTE[i % len(PALETTE)]

    def per_rank(key: str, title: str, y_label: str, get, *, scale: str = "auto", why: str, base: str,
                 note: str = "") -> Plot | None:
        series = []
        for i, rk in enumerate(shown):
            recs = records[rk]
            ys = [get(r) for r in recs]
            if any(v is not None for v in ys):
                series.append(Series(f"{base} rank {rk}" if multi else base, _steps(recs), ys, color(i)))
        if not series:
            omitted.append((key, title, why))
            return None
        p = Plot(key, title, y_label, series, scale, note=" ".join(x for x in (note, rank_note if multi else "") if x))
        plots.append(p)
        return p

    # loss
    per_rank("loss", "Loss", "loss", lambda r: r.loss, why="no record has a loss.", base="loss")

    # learning rate per param group (of the first rank with LRs: ranks share the schedule)
    lr_rank = next((rk for rk in ranks if any(r.lr for r in records[rk])), None)
    if lr_rank is None:
        omitted.append(("lr", "Learning rate", "no record has a learning rate."))
    else:
        recs = records[lr_rank]
        n_groups = max(len(r.lr) for r in recs)
        cols: dict[tuple, list[int]] = {}
        for g in range(n_groups):
            col = tuple(r.lr[g] if g < len(r.lr) else None for r in recs)
            cols.setdefault(col, []).append(g)
        series = []
        for i, (col, groups) in enumerate(cols.items()):
            label = (f"group {groups[0]}" if len(groups) == 1 else
                     "groups " + ", ".join(map(str, groups)) + " (equal)")
            series.append(Series(label, _steps(recs), list(col), color(i)))
        plots.append(Plot("lr", "Learning rate per param group", "learning rate", series, "linear",
                          note=f"Rank {lr_rank}." if len(ranks) > 1 else ""))

    # gradient norm, clipped norm, clip threshold
    series = []
    for i, rk in enumerate(shown):
        recs = records[rk]
        sfx = f" rank {rk}" if multi else ""
        pre = [r.grad_norm for r in recs]
        post = [r.grad_norm_clipped for r in recs]
        if any(v is not None for v in pre):
            series.append(Series("grad norm (pre-clip)" + sfx, _steps(recs), pre, color(i), z=1))
        if any(v is not None for v in post):
            series.append(Series("clipped norm" + sfx, _steps(recs), post, color(i) if multi else PALETTE[1],
                                 dash="2 3", width=2.0, opacity=0.75))
    if series:
        thr_rank = next((rk for rk in ranks if any(r.max_norm is not None for r in records[rk])), None)
        if thr_rank is not None:
            recs = records[thr_rank]
            series.append(Series("clip threshold (max_norm)", _steps(recs), [r.max_norm for r in recs],
                                 THRESHOLD_COLOR, dash="7 4", width=1.3, z=2))
        plots.append(Plot("grad_norm", "Gradient norm", "global L2 norm", series, "auto",
                          note=rank_note if multi else ""))
    else:
        omitted.append(("grad_norm", "Gradient norm", "no record has a gradient norm."))

    # loss scale with skipped steps
    p = per_rank("loss_scale", "Loss scale (GradScaler)", "loss scale", lambda r: r.loss_scale, scale="log2",
                 why="no record has a loss scale (no GradScaler, or not fp16).", base="loss scale")
    skipped = sorted({r.step for rk in shown for r in records[rk] if r.skipped})
    if skipped:
        marks = Marks("skipped step", skipped, SKIP_COLOR, "bottom", "skipped",
                      "skipped step {first}: GradScaler found inf/NaN gradients")
        if p is None:  # skipped steps without a recorded scale: still worth a plot
            omitted.pop()
            p = Plot("loss_scale", "Loss scale (GradScaler)", "loss scale", [], "log2")
            plots.append(p)
        p.marks.append(marks)

    # step time and throughput
    per_rank("step_time", "Step time", "seconds per step", lambda r: r.step_time,
             why="no record has a step time.", base="step time")

    def tps(r: StepRecord) -> float | None:
        if r.tokens is None or r.step_time is None or not r.step_time > 0:
            return None
        return r.tokens / r.step_time

    per_rank("throughput", "Throughput", "tokens per second", tps,
             why="no record has both a token count and a step time.", base="tokens/s")

    # attention: per layer, of the first rank that has it
    att_rank = next((rk for rk in ranks if any(r.attention for r in records[rk])), None)
    if att_rank is None:
        for key, title in (("attention_entropy", "Attention entropy ratio"), ("attention_max_logit", "Attention max logit")):
            omitted.append((key, title, "no record has attention statistics (the attention probe was off)."))
    else:
        recs = [r for r in records[att_rank] if r.attention]
        layers = sorted({layer for r in recs for layer in r.attention}, key=_natural_key)
        for key, title, stat, y_label, scale in (
            ("attention_entropy", "Attention entropy ratio per layer", "entropy_ratio", "entropy / log(keys)", "linear"),
            ("attention_max_logit", "Attention max logit per layer", "max_logit", "max logit", "auto"),
        ):
            series = []
            for i, layer in enumerate(layers):
                ys = [r.attention.get(layer, {}).get(stat) for r in recs]
                if any(v is not None for v in ys):
                    series.append(Series(layer, _steps(recs), ys, _ramp(i, len(layers))))
            if series:
                plots.append(Plot(key, title, y_label, series, scale,
                                  note=f"Rank {att_rank}; sampled steps only." if len(ranks) > 1 else "Sampled steps only."))
            else:
                omitted.append((key, title, f"no attention record has {stat}."))
    return plots, omitted

