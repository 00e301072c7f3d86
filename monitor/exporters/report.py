"""`monitor check RUN --report FILE.html`: one self-contained HTML page about a run.

The page holds a header (run facts, optimizer groups, alert counts, the preflight checklist), inline
SVG plots with a vertical marker per firing alert, and the alerts table with each alert's fix and
evidence. Everything is inline (CSS and SVG, no scripts, fonts, stylesheets or images), so the file
reads offline, from disk and on paper. No torch and no plotting library: the small plotting helper
below (`Series`, `Marks`, `Plot`, `svg_plot`) draws axes, ticks, log scales and legends itself.

Long runs are downsampled per series to at most `MAX_POINTS` points by bucket min/max, so a
one-step spike survives; NaN/Inf values are never dropped silently: they break the line and get a
mark of their own. The same input always gives the same bytes.
"""

from __future__ import annotations

import datetime as _dt
import html
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from statistics import median

from monitor.schema import Alert, RunInfo, Severity, StepRecord

__all__ = ["render_report", "Series", "Marks", "Plot", "svg_plot", "downsample", "MAX_POINTS"]

MAX_POINTS = 1500  # per series, after downsampling
POINT_BUDGET = 12000  # per plot: many series (layers, ranks) get fewer points each
MIN_POINTS = 200
MAX_RANK_LINES = 8  # ranks drawn individually; beyond this the first ones, with a note
AUTO_LOG_RATIO = 25.0  # max/min of the finite values above which an "auto" axis goes logarithmic

SEVERITY_COLORS = {"info": "#6b7280", "warning": "#d97706", "critical": "#dc2626"}
SEVERITY_ICONS = {"info": "ℹ", "warning": "⚠", "critical": "✖"}
# Series colours: no red/orange, which are the alert severities'.
PALETTE = ["#1f77b4", "#2ca02c", "#9467bd", "#17becf", "#8c564b", "#e377c2", "#bcbd22", "#7f7f7f"]
_RAMP = [(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (190, 210, 30)]  # viridis-like, for many layers
NONFINITE_COLOR = "#c026d3"
SKIP_COLOR = "#374151"
THRESHOLD_COLOR = "#4b5563"

# Figure geometry (SVG user units; the SVG scales to the page width).
WIDTH, PLOT_H = 960, 230
M_LEFT, M_RIGHT, M_BOTTOM = 72, 18, 42
LEGEND_ROW, FLAG_H, CHAR_W = 17, 12, 6.4


# --------------------------------------------------------------------------------------------
# numbers and text


def esc(s: object) -> str:
    return html.escape(str(s), quote=True)


_NONFINITE_STRINGS = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def fmt_num(x: float | int | None) -> str:
    """Compact, stable number formatting: 4 significant digits, e-notation for the very large/small."""
    if x is None:
        return "–"
    if isinstance(x, bool):
        return str(x).lower()
    if isinstance(x, int):
        return str(x)
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    if x == 0:
        return "0"
    a = abs(x)
    if x == int(x) and a < 1e9:
        return str(int(x))
    if a >= 1e5 or a < 1e-3:
        m, e = f"{x:.3e}".split("e")
        m = m.rstrip("0").rstrip(".")
        return f"{m}e{int(e)}"
    return f"{x:.4g}"


def _fmt_value(v: object, depth: int = 0) -> str:
    """Evidence values: numbers formatted, long lists and dicts shortened."""
    if isinstance(v, str):
        if v in _NONFINITE_STRINGS:  # how alerts.jsonl stores NaN/Inf evidence
            return fmt_num(_NONFINITE_STRINGS[v])
        return v if len(v) <= 60 else v[:57] + "…"
    if v is None or isinstance(v, (bool, int, float)):
        return fmt_num(v)
    if isinstance(v, dict):
        if depth >= 2:
            return "{…}"
        if "param" in v and "ratio" in v:  # top_params: the parameter and how much its gradient grew
            return f"{_fmt_value(v['param'], depth + 1)} ×{_fmt_value(v['ratio'], depth + 1)}"
        items = list(v.items())
        label = None
        for k in ("layer", "param", "name"):
            if k in v:
                label = _fmt_value(v[k], depth + 1)
                items = [(a, b) for a, b in items if a != k]
                break
        shown = ", ".join(f"{k}={_fmt_value(x, depth + 1)}" for k, x in items[:4])
        if len(items) > 4:
            shown += ", …"
        return f"{label} ({shown})" if label is not None else "{" + shown + "}"
    if isinstance(v, (list, tuple)):
        if depth >= 2:
            return f"[{len(v)} items]"
        parts = [_fmt_value(x, depth + 1) for x in v[:3]]
        if len(v) > 3:
            parts.append(f"… +{len(v) - 3} more")
        return "[" + ", ".join(parts) + "]"
    return _fmt_value(str(v), depth)


def format_evidence(evidence: dict) -> list[tuple[str, str]]:
    return [(str(k), _fmt_value(v)) for k, v in evidence.items()]


def _finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


def _natural_key(s: str) -> list:
    return [int(t) if i % 2 else t for i, t in enumerate(re.split(r"(\d+)", s))]


def _utc(t: float) -> str:
    return _dt.datetime.fromtimestamp(t, tz=_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _duration(s: float) -> str:
    s = max(0.0, s)
    if s < 60:
        return f"{s:.1f} s"
    m, sec = divmod(int(round(s)), 60)
    h, m = divmod(m, 60)
    d, h = divmod(h, 24)
    if d:
        return f"{d} d {h} h {m} min"
    if h:
        return f"{h} h {m} min"
    return f"{m} min {sec} s"


# --------------------------------------------------------------------------------------------
# the plotting helper


@dataclass
class Series:
    """One line. ``y`` None = not recorded at that x (the line continues); NaN/Inf = non-finite
    (the line breaks there and the value gets a mark)."""

    label: str
    x: Sequence[float]
    y: Sequence[float | None]
    color: str
    dash: str | None = None  # SVG stroke-dasharray
    width: float = 1.5
    opacity: float = 1.0
    z: int = 0  # drawing order (higher on top); the legend keeps the list order


@dataclass
class Marks:
    """Events at steps, drawn as a strip of symbols: 'bottom' triangles (skipped steps) or 'top' crosses."""

    label: str
    x: Sequence[float]
    color: str
    where: str = "bottom"
    css: str = "mark"
    describe: str = "{label} at step {first}"  # tooltip; also {last}, {count}


@dataclass
class Plot:
    key: str
    title: str
    y_label: str
    series: list[Series]
    scale: str = "auto"  # "linear" | "log" (base 10) | "log2" | "auto" (log when the range is wide)
    marks: list[Marks] = field(default_factory=list)
    note: str = ""


def downsample(x: Sequence[float], y: Sequence[float | None], max_points: int = MAX_POINTS
               ) -> tuple[list[tuple[float, float] | None], list[tuple[float, float]]]:
    """Points to draw (None = break the line) and the non-finite (x, y) pairs.

    Missing values (None) are left out without breaking the line. At most ``max_points`` points:
    beyond that, consecutive buckets each contribute their min and max (in order), so spikes stay.
    A single non-finite value breaks the line when not downsampled; a bucket holding only
    non-finite values breaks it when downsampled.
    """
    pairs = [(a, b) for a, b in zip(x, y) if b is not None]
    bad = [(a, b) for a, b in pairs if not math.isfinite(b)]
    n = len(pairs)
    out: list[tuple[float, float] | None] = []
    if n <= max_points:
        for a, b in pairs:
            out.append((a, b) if math.isfinite(b) else None)
        return out, bad
    buckets = max(1, max_points // 2)
    for i in range(buckets):
        chunk = pairs[i * n // buckets:(i + 1) * n // buckets]
        lo = hi = None
        for j, (_, b) in enumerate(chunk):
            if math.isfinite(b):
                if lo is None or b < chunk[lo][1]:
                    lo = j
                if hi is None or b > chunk[hi][1]:
                    hi = j
        if lo is None:
            out.append(None)
        elif lo == hi:
            out.append(chunk[lo])
        else:
            out.extend([chunk[min(lo, hi)], chunk[max(lo, hi)]])
    return out, bad


def _nice_step(raw: float) -> float:
    if raw <= 0 or not math.isfinite(raw):
        return 1.0
    e = math.floor(math.log10(raw))
    f = raw / 10**e
    for m, upto in ((1, 1.5), (2, 2.25), (2.5, 3.5), (5, 7.5)):
        if f < upto:
            return m * 10**e
    return 10.0 ** (e + 1)


def linear_ticks(lo: float, hi: float, n: int = 5) -> tuple[list[float], float]:
    step = _nice_step((hi - lo) / max(1, n))
    first = math.ceil(lo / step - 1e-9)
    ticks = []
    k = first
    while k * step <= hi + step * 1e-9 and len(ticks) < 50:
        ticks.append(round(k * step, 12) + 0.0)
        k += 1
    return ticks, step


def log_ticks(lo: float, hi: float) -> list[float]:
    """Ticks for a base-10 log axis over [lo, hi] (both > 0)."""
    a, b = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
    if b - a <= 3:
        cands = [m * 10**e for e in range(a, b + 1) for m in (1, 2, 5)]
    else:
        every = max(1, math.ceil((b - a) / 7))
        cands = [10.0**e for e in range(a, b + 1) if e % every == 0]
    ticks = [t for t in cands if lo * (1 - 1e-9) <= t <= hi * (1 + 1e-9)]
    return ticks or [lo, hi]


def log2_ticks(lo: float, hi: float) -> list[float]:
    a, b = math.ceil(math.log2(lo) - 1e-9), math.floor(math.log2(hi) + 1e-9)
    if b < a:
        return [lo, hi]
    every = max(1, math.ceil((b - a + 1) / 7))
    return [2.0**k for k in range(a, b + 1) if k % every == 0] or [2.0**a]


def _fmt_tick(v: float, step: float | None = None) -> str:
    """A tick label; with the linear step, every label of an axis gets the same number of decimals."""
    if v == 0:
        return "0"
    a = abs(v)
    if step is not None and step >= 1e-5 and a < 1e4:
        if step >= 1 and float(step).is_integer():
            return str(int(round(v)))
        e = math.floor(math.log10(step))
        extra = 0 if round(step / 10**e, 6) in (1, 2, 5) else 1
        return f"{v:.{max(0, -e + extra)}f}"
    return fmt_num(float(f"{v:.3g}"))


def linear_tick_labels(ticks: list[float], step: float) -> list[str]:
    """Labels of one linear axis, in one style: k/M suffixes when the axis reaches 10^4 in whole steps."""
    top = max((abs(t) for t in ticks), default=0.0)
    if step >= 1 and 1e4 <= top < 1e9:
        div, sfx = (1e3, "k") if top < 1e6 else (1e6, "M")
        return ["0" if t == 0 else f"{t / div:g}{sfx}" for t in ticks]
    return [_fmt_tick(t, step) for t in ticks]


def step_tick_labels(ticks: list[float]) -> list[str]:
    """x-axis (step) labels in one style: 2.5k, 5k, ... once the axis reaches 10,000."""
    top = max((abs(t) for t in ticks), default=0.0)
    if top >= 1e4:
        return ["0" if t == 0 else f"{t / 1e3:g}k" for t in ticks]
    return [str(int(round(t))) for t in ticks]


_SUPERSCRIPT = str.maketrans("-0123456789", "⁻⁰¹²³⁴⁵⁶⁷⁸⁹")


def log2_tick_labels(ticks: list[float]) -> list[str]:
    """Powers of two: plain integers while small, 2ⁿ for all ticks otherwise."""
    ks = [round(math.log2(t)) for t in ticks]
    if all(0 <= k <= 13 for k in ks):
        return [str(2**k) for k in ks]
    return ["2" + str(k).translate(_SUPERSCRIPT) for k in ks]


def _layout_legend(entries: list[tuple[str, str]], width: float) -> tuple[list[tuple[float, float, str, str]], int]:
    """(x, y_row, swatch_svg_kind, label) positions; returns the rows used."""
    out, x, row = [], M_LEFT, 0
    for kind, label in entries:
        w = 26 + CHAR_W * len(label) + 14
        if x + w > width - M_RIGHT and x > M_LEFT:
            row += 1
            x = M_LEFT
        out.append((x, row, kind, label))
        x += w
    return out, (row + 1 if entries else 0)


def _swatch(kind: str, x: float, y: float) -> str:
    """Legend symbol at (x, y) = left end, vertical centre."""
    k, _, rest = kind.partition(":")
    if k == "line":
        color, dash, width, opacity = rest.split("|")
        d = f' stroke-dasharray="{dash}"' if dash else ""
        o = f' stroke-opacity="{opacity}"' if opacity != "1.0" else ""
        return f'<line x1="{x:.1f}" y1="{y:.1f}" x2="{x + 20:.1f}" y2="{y:.1f}" stroke="{color}" stroke-width="{width}"{d}{o}/>'
    if k == "cross":
        return _cross(x + 10, y, rest)
    if k == "tri":
        return _tri(x + 10, y, rest)
    if k == "alert":
        return (f'<line x1="{x + 10:.1f}" y1="{y - 6:.1f}" x2="{x + 10:.1f}" y2="{y + 6:.1f}" stroke="{rest}" '
                f'stroke-width="2"/>')
    return ""


def _cross(cx: float, cy: float, color: str, r: float = 3.5) -> str:
    return (f'<path d="M{cx - r:.1f},{cy - r:.1f}L{cx + r:.1f},{cy + r:.1f}M{cx - r:.1f},{cy + r:.1f}'
            f'L{cx + r:.1f},{cy - r:.1f}" stroke="{color}" stroke-width="2"/>')


def _tri(cx: float, cy: float, color: str, r: float = 4.0) -> str:
    return f'<path d="M{cx:.1f},{cy - r:.1f}L{cx + r:.1f},{cy + r * 0.8:.1f}L{cx - r:.1f},{cy + r * 0.8:.1f}Z" fill="{color}"/>'


def _group_close(xs: Iterable[float], to_px, gap_px: float = 4.0) -> list[tuple[float, float, int]]:
    """Sorted xs merged into (first, last, count) runs whose pixels lie within gap_px of each other."""
    groups: list[list] = []
    for x in sorted(xs):
        px = to_px(x)
        if groups and px - groups[-1][3] <= gap_px:
            g = groups[-1]
            g[1], g[2], g[3] = x, g[2] + 1, px
        else:
            groups.append([x, x, 1, px])
    return [(a, b, c) for a, b, c, _ in groups]


def _nonfinite_runs(x: Sequence[float], y: Sequence[float | None], to_px, gap_px: float = 4.0
                    ) -> list[tuple[float, float, int, set[str]]]:
    """(first x, last x, count, kinds) of each run of consecutive non-finite values (missing values
    do not end a run); runs whose pixels lie within gap_px merge."""
    runs: list[list] = []
    open_run = False
    for a, b in zip(x, y):
        if b is None:
            continue
        if math.isfinite(b):
            open_run = False
            continue
        px = to_px(a)
        if runs and (open_run or px - runs[-1][4] <= gap_px):
            r = runs[-1]
            r[1], r[2], r[4] = a, r[2] + 1, px
            r[3].add(fmt_num(b))
        else:
            runs.append([a, a, 1, {fmt_num(b)}, px])
        open_run = True
    return [(a, b, c, k) for a, b, c, k, _ in runs]


def _alert_tooltip(a: Alert) -> str:
    where = f"step {a.step}" + (f", rank {a.rank}" if a.rank else "")
    return f"{a.severity.value.upper()} {a.rule} at {where}\n{a.message}\nFix: {a.hint}"


def _auto_log(values: list[float]) -> bool:
    if not values or min(values) <= 0:
        return False
    return max(values) / min(values) >= AUTO_LOG_RATIO


def svg_plot(p: Plot, x_domain: tuple[float, float], alerts: Sequence[Alert] = (),
             alert_ids: Sequence[str] | None = None, max_points: int = MAX_POINTS) -> str:
    """One plot as an inline <svg>: grid, axes, ticks, series, marks, a legend and alert markers."""
    per_series = max(MIN_POINTS, min(max_points, POINT_BUDGET // max(1, len(p.series))))
    prepared = [(s, *downsample(s.x, s.y, per_series)) for s in p.series]
    ys = [pt[1] for _, pts, _ in prepared for pt in pts if pt is not None]
    scale = p.scale
    if scale == "auto":
        scale = "log" if _auto_log(ys) else "linear"
    log = scale in ("log", "log2")
    if log:
        ys = [v for v in ys if v > 0]

    # y domain, padded, and its ticks
    if not ys:
        lo, hi = (1.0, 10.0) if log else (0.0, 1.0)
    else:
        lo, hi = min(ys), max(ys)
    if log:
        llo, lhi = math.log10(lo), math.log10(hi)
        pad = max((lhi - llo) * 0.05, 0.15 if scale == "log2" else 0.05)
        llo, lhi = llo - pad, lhi + pad
        lo, hi = 10**llo, 10**lhi
        ticks = log2_ticks(lo, hi) if scale == "log2" else log_ticks(lo, hi)
        labels = log2_tick_labels(ticks) if scale == "log2" else [_fmt_tick(t) for t in ticks]
    else:
        if hi - lo <= 0:
            d = abs(hi) * 0.1 or 1.0
            lo, hi = lo - d, hi + d
        pad = (hi - lo) * 0.05
        lo, hi = lo - pad, hi + pad
        ticks, step = linear_ticks(lo, hi)
        labels = linear_tick_labels(ticks, step)
        llo, lhi = lo, hi

    x_lo, x_hi = x_domain
    if x_hi <= x_lo:
        x_lo, x_hi = x_lo - 1, x_hi + 1

    # legend first: it decides the top margin
    severities = sorted({a.severity.value for a in alerts}, key=lambda s: Severity(s).rank)
    entries: list[tuple[str, str]] = [
        (f"line:{s.color}|{s.dash or ''}|{s.width}|{s.opacity}", s.label) for s in p.series]
    if any(bad for _, _, bad in prepared):
        entries.append((f"cross:{NONFINITE_COLOR}", "NaN/Inf value"))
    for m in p.marks:
        if m.x:
            entries.append((f"{'cross' if m.where == 'top' else 'tri'}:{m.color}", m.label))
    entries += [(f"alert:{SEVERITY_COLORS[s]}", f"{s} alert") for s in severities]
    placed, rows = _layout_legend(entries, WIDTH)
    top = 8 + rows * LEGEND_ROW + FLAG_H
    height = top + PLOT_H + M_BOTTOM
    left, right, bottom = M_LEFT, WIDTH - M_RIGHT, top + PLOT_H
    pw = right - left

    def px(x: float) -> float:
        return left + (x - x_lo) / (x_hi - x_lo) * pw

    def py(y: float) -> float:
        v = math.log10(y) if log else y
        return bottom - (v - llo) / (lhi - llo) * PLOT_H

    o: list[str] = [
        f'<svg class="plot-svg" data-plot="{esc(p.key)}" viewBox="0 0 {WIDTH} {height}" width="100%" '
        f'role="img" aria-label="{esc(p.title)}" font-family="system-ui, sans-serif" font-size="11">'
    ]
    o.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{PLOT_H}" fill="#fff" stroke="#9ca3af"/>')
    # grid and y ticks
    o.append('<g class="y-axis">')
    for t, lab in zip(ticks, labels):
        y = py(t)
        if top - 0.5 <= y <= bottom + 0.5:
            o.append(f'<line x1="{left}" y1="{y:.1f}" x2="{right}" y2="{y:.1f}" stroke="#e5e7eb"/>'
                     f'<text x="{left - 6}" y="{y + 3.5:.1f}" text-anchor="end" fill="#374151">{esc(lab)}</text>')
    o.append(f'<text transform="translate(14,{top + PLOT_H / 2:.1f}) rotate(-90)" text-anchor="middle" '
             f'fill="#374151">{esc(p.y_label + (" (log scale)" if log else ""))}</text></g>')
    # x ticks
    xt, _ = linear_ticks(x_lo, x_hi, 8)
    xt = [t for t in xt if float(t).is_integer()]
    o.append('<g class="x-axis">')
    for t, lab in zip(xt, step_tick_labels(xt)):
        x = px(t)
        o.append(f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{bottom}" stroke="#f0f1f3"/>'
                 f'<line x1="{x:.1f}" y1="{bottom}" x2="{x:.1f}" y2="{bottom + 4}" stroke="#6b7280"/>'
                 f'<text x="{x:.1f}" y="{bottom + 16}" text-anchor="middle" fill="#374151">{lab}</text>')
    o.append(f'<text x="{left + pw / 2:.1f}" y="{bottom + 34}" text-anchor="middle" fill="#374151">step</text></g>')

    # alert markers: under the data, flag above the plot area, one <g> per firing alert
    ids = list(alert_ids) if alert_ids is not None else [""] * len(alerts)
    # the most severe drawn last, on top of a milder alert at the same step
    for a, aid in sorted(zip(alerts, ids), key=lambda t: t[0].severity.rank):
        x = px(a.step)
        c = SEVERITY_COLORS[a.severity.value]
        inner = (f'<line x1="{x:.1f}" y1="{top - FLAG_H + 2}" x2="{x:.1f}" y2="{bottom}" stroke="transparent" '
                 f'stroke-width="9"/>'
                 f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{bottom}" stroke="{c}" stroke-width="1.5" '
                 f'stroke-opacity="0.85"/>'
                 f'<path d="M{x:.1f},{top - FLAG_H + 2}L{x + 7:.1f},{top - FLAG_H / 2 + 1:.1f}L{x:.1f},{top}Z" fill="{c}"/>')
        if aid:
            inner = f'<a href="#{esc(aid)}">{inner}</a>'
        o.append(f'<g class="alert-marker" data-severity="{a.severity.value}" data-rule="{esc(a.rule)}" '
                 f'data-step="{a.step}" data-rank="{a.rank}"><title>{esc(_alert_tooltip(a))}</title>{inner}</g>')

    # series
    o.append('<g class="series" fill="none" stroke-linejoin="round" stroke-linecap="round">')
    for s, pts, _ in sorted(prepared, key=lambda t: t[0].z):
        segs: list[list[str]] = [[]]
        for pt in pts:
            if pt is None or (log and pt[1] <= 0):
                if segs[-1]:
                    segs.append([])
                continue
            segs[-1].append(f"{px(pt[0]):.1f},{py(pt[1]):.1f}")
        segs = [sg for sg in segs if sg]
        d = "".join("M" + " ".join(sg) for sg in segs if len(sg) > 1)
        dash = f' stroke-dasharray="{s.dash}"' if s.dash else ""
        op = f' stroke-opacity="{s.opacity}"' if s.opacity != 1.0 else ""
        o.append(f'<g data-series="{esc(s.label)}"><title>{esc(s.label)}</title>')
        if d:
            o.append(f'<path d="{d}" stroke="{s.color}" stroke-width="{s.width}"{dash}{op}/>')
        for sg in segs:  # isolated points between gaps
            if len(sg) == 1:
                cx, cy = sg[0].split(",")
                o.append(f'<circle cx="{cx}" cy="{cy}" r="1.8" fill="{s.color}" stroke="none"/>')
        o.append("</g>")
    o.append("</g>")

    # non-finite values: crosses along the top edge, one per run of consecutive non-finite values
    # (runs closer than a few pixels merge), with a band over the run's steps
    for s, _, bad in prepared:
        if not bad:
            continue
        for first, last, count, kinds in _nonfinite_runs(s.x, s.y, px):
            x0, x1 = px(first), px(last)
            what = "/".join(sorted(kinds))
            tip = (f"{s.label} = {what} at step {fmt_num(first)}" if count == 1 else
                   f"{s.label}: {count} non-finite values ({what}) at steps {fmt_num(first)}–{fmt_num(last)}")
            band = (f'<line x1="{x0:.1f}" y1="{top + 6}" x2="{x1:.1f}" y2="{top + 6}" stroke="{NONFINITE_COLOR}" '
                    f'stroke-width="3" stroke-opacity="0.45"/>' if x1 - x0 > 3 else "")
            o.append(f'<g class="nonfinite" data-series="{esc(s.label)}" data-step="{fmt_num(first)}" '
                     f'data-last-step="{fmt_num(last)}" data-count="{count}"><title>{esc(tip)}</title>'
                     f'{band}{_cross(x0, top + 6, NONFINITE_COLOR)}</g>')

    # event marks (skipped steps)
    for m in p.marks:
        for first, last, count in _group_close(m.x, px):
            x0, x1 = px(first), px(last)
            yy = top + 6 if m.where == "top" else bottom - 6
            tip = m.describe.format(label=m.label, first=fmt_num(first), last=fmt_num(last), count=count)
            if count > 1:
                tip = f"{m.label}: {count} at steps {fmt_num(first)}–{fmt_num(last)}"
            band = (f'<line x1="{x0:.1f}" y1="{yy}" x2="{x1:.1f}" y2="{yy}" stroke="{m.color}" stroke-width="3" '
                    f'stroke-opacity="0.45"/>' if x1 - x0 > 3 else "")
            sym = _cross(x0, yy, m.color) if m.where == "top" else _tri(x0, yy, m.color)
            o.append(f'<g class="{esc(m.css)}" data-step="{fmt_num(first)}" data-count="{count}">'
                     f'<title>{esc(tip)}</title>{band}{sym}</g>')

    # legend
    o.append('<g class="legend">')
    for x, row, kind, label in placed:
        y = 8 + row * LEGEND_ROW + 6
        o.append(_swatch(kind, x, y) + f'<text x="{x + 26:.1f}" y="{y + 4:.1f}" fill="#111827">{esc(label)}</text>')
    o.append("</g></svg>")
    return "".join(o)


# --------------------------------------------------------------------------------------------
# building the plots from records


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


def _build_plots(records: dict[int, list[StepRecord]]) -> tuple[list[Plot], list[tuple[str, str, str]]]:
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


# --------------------------------------------------------------------------------------------
# the page

_CSS = """
*{box-sizing:border-box}
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;color:#111827;
background:#f6f7f9;margin:0;-webkit-print-color-adjust:exact;print-color-adjust:exact}
main{max-width:1100px;margin:0 auto;padding:20px 24px 40px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 10px;border-bottom:1px solid #d1d5db;padding-bottom:4px}
h3{font-size:14px;margin:0 0 4px}
.sub{color:#4b5563;margin:0 0 14px}
.card{background:#fff;border:1px solid #e5e7eb;border-radius:6px;padding:12px 14px;margin:0 0 14px}
dl.facts{display:grid;grid-template-columns:max-content 1fr;gap:3px 18px;margin:0}
dl.facts dt{color:#4b5563}dl.facts dd{margin:0}
table{border-collapse:collapse;width:100%;font-size:13px}
th,td{text-align:left;vertical-align:top;padding:5px 8px;border-bottom:1px solid #e5e7eb}
th{background:#f3f4f6;font-weight:600}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
.badge{display:inline-block;padding:0 7px;border-radius:9px;color:#fff;font-size:12px;font-weight:600;white-space:nowrap}
.sev-info{background:#6b7280}.sev-warning{background:#d97706}.sev-critical{background:#dc2626}
.summary{font-size:15px;margin:8px 0 0}
.summary .badge{margin-right:6px}
ul.checklist{list-style:none;padding:0;margin:0}
ul.checklist li{padding:5px 0;border-bottom:1px solid #f0f1f3}
ul.checklist li:last-child{border-bottom:0}
.icon{display:inline-block;width:1.4em;font-weight:700}
.icon.ok{color:#16a34a}.icon.info{color:#6b7280}.icon.warning{color:#d97706}.icon.critical{color:#dc2626}
.fix{color:#374151}
code,.ev{font:12px/1.4 ui-monospace,SFMono-Regular,Menlo,Consolas,monospace}
.ev span{display:inline-block;margin-right:10px;white-space:nowrap}
.ev b{font-weight:600;color:#4b5563}
figure.plot{background:#fff;border:1px solid #e5e7eb;border-radius:6px;margin:0 0 14px;padding:10px 10px 4px}
figure.plot svg{display:block;width:100%;height:auto}
figure.plot figcaption{font-size:12px;color:#4b5563;margin:2px 0 4px}
.omitted{color:#4b5563;font-size:13px}
.problems{border-color:#fcd34d;background:#fffbeb}
.resolved{display:block;color:#16a34a;font-size:12px}
tr:target td{background:#fef9c3}
footer{color:#6b7280;font-size:12px;margin-top:24px}
@media print{body{background:#fff;font-size:11px}main{max-width:none;padding:0}
.card,figure.plot{border-color:#d1d5db;break-inside:avoid;page-break-inside:avoid}
tr{break-inside:avoid;page-break-inside:avoid}h2{break-after:avoid;page-break-after:avoid}
@page{size:A4;margin:12mm}}
"""


def _severity_counts(alerts: Sequence[Alert]) -> dict[str, int]:
    counts = {"critical": 0, "warning": 0, "info": 0}
    for a in alerts:
        counts[a.severity.value] += 1
    return counts


def _optimizer_section(info: RunInfo) -> str:
    opt = info.optimizer
    if not opt.name and not opt.groups:
        return '<p class="omitted">Optimizer: not known for this run.</p>'
    o = [f"<h3>Optimizer: {esc(opt.name or 'unknown')}</h3>"]
    if opt.groups:
        o.append('<table class="groups"><thead><tr><th>group</th><th class="num">lr</th>'
                 '<th class="num">initial lr</th><th>betas</th><th class="num">eps</th><th class="num">weight decay</th>'
                 '<th class="num">momentum</th><th class="num">params</th><th class="num">elements</th></tr></thead><tbody>')
        for i, g in enumerate(opt.groups):
            betas = ", ".join(fmt_num(b) for b in g.betas) if g.betas else "–"
            o.append(f'<tr><td>{i}</td><td class="num">{fmt_num(g.lr)}</td><td class="num">{fmt_num(g.initial_lr)}</td>'
                     f'<td>{esc(betas)}</td><td class="num">{fmt_num(g.eps)}</td>'
                     f'<td class="num">{fmt_num(g.weight_decay)}</td><td class="num">{fmt_num(g.momentum)}</td>'
                     f'<td class="num">{g.params}</td><td class="num">{f"{g.numel:,}" if g.numel else "–"}</td></tr>')
        o.append("</tbody></table>")
    return "".join(o)


def _facts(info: RunInfo, records: dict[int, list[StepRecord]]) -> list[tuple[str, str]]:
    allr = [r for rs in records.values() for r in rs]
    facts = [("Run", info.run_id), ("Source", info.source), ("World size", str(info.world_size))]
    if allr:
        steps = [r.step for r in allr]
        per_rank = sorted(records)
        facts.append(("Steps", f"{min(steps)}–{max(steps)}: {len(allr):,} step records from {len(per_rank)} rank(s)"))
    else:
        facts.append(("Steps", "no step records"))
    facts.append(("Max steps", fmt_num(info.max_steps) if info.max_steps is not None else "not set"))
    times = [r.time for r in allr if _finite(r.time) and r.time > 0]
    if times:
        t0, t1 = min(times), max(times)
        facts.append(("Time span", f"{_utc(t0)} → {_utc(t1)} ({_duration(t1 - t0)})"))
    if info.model.name or info.model.parameters:
        facts.append(("Model", f"{info.model.name or '?'}, {info.model.parameters:,} parameters"
                               + (f" ({info.model.trainable:,} trainable)" if info.model.trainable != info.model.parameters else "")))
    env = ", ".join(x for x in (info.device, info.torch_version and f"torch {info.torch_version}",
                                info.cuda_version and f"CUDA {info.cuda_version}", info.hostname) if x)
    if env:
        facts.append(("Environment", env))
    if info.scheduler:
        sched = info.scheduler
        if info.schedule and info.schedule.get("warmup_steps") is not None:
            sched += f" (warmup {info.schedule['warmup_steps']} steps)"
        facts.append(("LR scheduler", sched))
    if info.scaler is not None:
        facts.append(("GradScaler", "enabled" if info.scaler.get("enabled") else "disabled"))
    first = min(records) if records else None
    if first is not None:
        recs = records[first]
        losses = [(r.step, r.loss) for r in recs if _finite(r.loss)]
        if losses:
            best = min(losses, key=lambda t: t[1])
            facts.append(("Loss", f"{fmt_num(losses[0][1])} at step {losses[0][0]} → {fmt_num(losses[-1][1])} at step "
                                  f"{losses[-1][0]}; min {fmt_num(best[1])} at step {best[0]}"
                                  + (f" (rank {first})" if len(records) > 1 else "")))
        nonfinite = sum(1 for r in recs if r.loss is not None and not math.isfinite(r.loss))
        if nonfinite:
            facts.append(("Non-finite loss", f"{nonfinite} step(s)" + (f" on rank {first}" if len(records) > 1 else "")))
        st = [r.step_time for r in recs if _finite(r.step_time) and r.step_time > 0]
        if st:
            tp = [r.tokens / r.step_time for r in recs if r.tokens is not None and _finite(r.step_time) and r.step_time > 0]
            facts.append(("Speed", f"median {fmt_num(median(st))} s/step"
                                   + (f", {fmt_num(round(median(tp)))} tokens/s" if tp else "")
                                   + (f" (rank {first})" if len(records) > 1 else "")))
        skipped = sum(1 for r in recs if r.skipped)
        if skipped:
            facts.append(("Skipped steps", f"{skipped} (GradScaler)"))
        unknown = sum(1 for r in recs if r.grad_norm_unknown)
        if unknown:
            facts.append(("Gradient norm", f"pre-clip norm unknown on {unknown} step(s): clipping ran on each "
                                           "micro-batch, or sharded parameters had no clip reporting the global norm"))
    return facts


def _preflight(info: RunInfo, firing: Sequence[Alert]) -> str:
    items: list[Alert] = [a for a in firing if a.rule.startswith("preflight.")]
    seen = {(a.rule, a.rank) for a in items}
    for a in info.preflight:  # what attach found, when the caller's alerts do not repeat it
        if a.status == "firing" and a.rule.startswith("preflight.") and (a.rule, a.rank) not in seen:
            seen.add((a.rule, a.rank))
            items.append(a)
    items.sort(key=lambda a: (-a.severity.rank, a.rule, a.rank))
    if not items:
        return ('<ul class="checklist"><li class="ok"><span class="icon ok">✓</span>No preflight findings: '
                'none of the preflight checks that ran on this run flagged its setup.</li></ul>')
    o = ['<ul class="checklist">']
    for a in items:
        s = a.severity.value
        o.append(f'<li class="preflight-item" data-rule="{esc(a.rule)}" data-severity="{s}">'
                 f'<span class="icon {s}">{SEVERITY_ICONS[s]}</span><span class="badge sev-{s}">{s}</span> '
                 f'<code>{esc(a.rule)}</code> {esc(a.message)}<br><span class="fix"><b>Fix:</b> {esc(a.hint)}</span></li>')
    o.append("</ul>")
    return "".join(o)


def _alerts_table(firing: Sequence[Alert], ids: Sequence[str], resolved: Sequence[Alert]) -> str:
    if not firing:
        return '<p class="omitted">No alerts fired.</p>'
    o = ['<table class="alerts"><thead><tr><th>severity</th><th>rule</th><th class="num">step</th>'
         '<th class="num">rank</th><th>message</th><th>fix</th><th>evidence</th></tr></thead><tbody>']
    for a, aid in zip(firing, ids):
        s = a.severity.value
        res = min((r.step for r in resolved if r.rule == a.rule and r.rank == a.rank and r.step >= a.step), default=None)
        res_html = f'<span class="resolved">resolved at step {res}</span>' if res is not None else ""
        ev = "".join(f"<span><b>{esc(k)}</b>={esc(v)}</span>" for k, v in format_evidence(a.evidence))
        o.append(f'<tr class="alert-row" id="{esc(aid)}" data-rule="{esc(a.rule)}" data-step="{a.step}" '
                 f'data-rank="{a.rank}" data-severity="{s}"><td><span class="badge sev-{s}">{s}</span>{res_html}</td>'
                 f'<td><code>{esc(a.rule)}</code></td><td class="num">{a.step}</td><td class="num">{a.rank}</td>'
                 f'<td>{esc(a.message)}</td><td class="fix">{esc(a.hint)}</td><td class="ev">{ev}</td></tr>')
    o.append("</tbody></table>")
    return "".join(o)


def render_report(info: RunInfo, records: dict[int, list[StepRecord]], alerts: list[Alert], *,
                  title: str | None = None, problems: Sequence[str] = ()) -> str:
    """The whole report as one self-contained HTML document (deterministic for the same input).

    ``records``: by rank, each in step order (as `read_run` gives them). ``alerts``: firing alerts
    are drawn and tabled; resolved events only annotate the alert they resolve. ``problems``:
    reading problems (damaged files) to show at the top.
    """
    records = {rk: sorted(rs, key=lambda r: r.step) for rk, rs in sorted(records.items()) if rs}
    order = {s: i for i, s in enumerate(("critical", "warning", "info"))}
    firing = sorted((a for a in alerts if a.status == "firing"),
                    key=lambda a: (a.step, order[a.severity.value], a.rule, a.rank, a.message))
    resolved = [a for a in alerts if a.status == "resolved"]
    ids = [f"alert-{i + 1}" for i in range(len(firing))]
    title = title or f"trainmon report — {info.run_id}"

    steps = [r.step for rs in records.values() for r in rs] + [a.step for a in firing]
    x_domain = (min(steps), max(steps)) if steps else (0, 1)
    plots, omitted = _build_plots(records)

    counts = _severity_counts(firing)
    o = ['<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
         '<meta name="viewport" content="width=device-width, initial-scale=1">'
         f"<title>{esc(title)}</title><style>{_CSS}</style></head><body><main>"]
    o.append(f"<header><h1>{esc(title)}</h1>")
    o.append(f'<p class="sub">Run <code>{esc(info.run_id)}</code> · source {esc(info.source)}</p>')
    if firing:
        parts = "".join(f'<span class="badge sev-{s}">{counts[s]} {s}</span>' for s in ("critical", "warning", "info")
                        if counts[s])
        o.append(f'<p class="summary" data-alerts="{len(firing)}">{len(firing)} alert(s): {parts}'
                 + "".join(f' · {counts[s]} {s}' for s in ("critical", "warning", "info") if not counts[s]) + "</p>")
    else:
        o.append('<p class="summary" data-alerts="0"><span class="icon ok">✓</span>No alerts: '
                 '0 critical · 0 warning · 0 info</p>')
    o.append("</header>")
    if problems:
        o.append('<div class="card problems"><h3>Problems reading the run</h3><ul>'
                 + "".join(f"<li>{esc(p)}</li>" for p in problems) + "</ul></div>")

    o.append('<section id="run"><h2>Run</h2><div class="card"><dl class="facts">')
    for k, v in _facts(info, records):
        o.append(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>")
    o.append(f'</dl></div><div class="card">{_optimizer_section(info)}</div></section>')

    o.append(f'<section id="preflight"><h2>Preflight checklist</h2><div class="card">{_preflight(info, firing)}'
             "</div></section>")

    o.append('<section id="plots"><h2>Plots</h2>')
    if firing:
        o.append('<p class="omitted">Vertical lines mark alerts (hover for the rule and fix; click for its row '
                 'in the table).</p>')
    for p in plots:
        o.append(f'<figure class="plot" id="plot-{esc(p.key)}" data-plot="{esc(p.key)}"><h3>{esc(p.title)}</h3>')
        if p.note:
            o.append(f"<figcaption>{esc(p.note)}</figcaption>")
        o.append(svg_plot(p, x_domain, firing, ids))
        o.append("</figure>")
    if omitted:
        o.append('<div class="card"><h3>Not plotted</h3><ul class="omitted">'
                 + "".join(f'<li class="omitted-plot" data-plot="{esc(k)}"><b>{esc(t)}</b>: {esc(why)}</li>'
                           for k, t, why in omitted) + "</ul></div>")
    o.append("</section>")

    o.append(f'<section id="alerts"><h2>Alerts</h2>{_alerts_table(firing, ids, resolved)}</section>')
    o.append("<footer>Generated by trainmon <code>monitor check --report</code>. Self-contained: no scripts, "
             "no external resources.</footer></main></body></html>\n")
    return "".join(o)
