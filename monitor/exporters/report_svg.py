"""The report's plotting helper: `Series`, `Marks` and `Plot` in, one inline <svg> out (`svg_plot`).

No plotting library: the page must be self-contained and build where only the standard library
and pydantic are installed. The helper draws axes, ticks, log scales, a legend, a marker per
alert and per attempt start, and a mark per non-finite value itself. Long series are downsampled by bucket min/max
(`downsample`), so a one-step spike survives; NaN/Inf values break the line and get a mark of
their own, never dropped silently.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from monitor.exporters.report_axes import (
    fmt_tick,
    linear_tick_labels,
    linear_ticks,
    log2_tick_labels,
    log2_ticks,
    log_ticks,
    step_tick_labels,
)
from monitor.exporters.report_text import esc, fmt_num
from monitor.schema import Alert, Severity

MAX_POINTS = 1500  # per series, after downsampling
POINT_BUDGET = 12000  # per plot: many series (layers, ranks) get fewer points each
MIN_POINTS = 200
AUTO_LOG_RATIO = 25.0  # max/min of the finite values above which an "auto" axis goes logarithmic

SEVERITY_COLORS = {"info": "#6b7280", "warning": "#d97706", "critical": "#dc2626"}
NONFINITE_COLOR = "#c026d3"
ATTEMPT_COLOR = "#4338ca"  # attempt starts: neither a severity's colour nor a series'

# Figure geometry (SVG user units; the SVG scales to the page width).
WIDTH, PLOT_H = 960, 230
M_LEFT, M_RIGHT, M_BOTTOM = 72, 18, 42
LEGEND_ROW, FLAG_H, CHAR_W = 17, 12, 6.4


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
class AttemptMarker:
    """Where an attempt of the run (a resume or a restart) started: a dashed vertical line, labelled."""

    attempt: int
    step: int
    label: str  # drawn at the top of the line ("attempt 2: resumed")
    tooltip: str


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
    if k == "attempt":
        return (f'<line x1="{x + 10:.1f}" y1="{y - 6:.1f}" x2="{x + 10:.1f}" y2="{y + 6:.1f}" stroke="{rest}" '
                f'stroke-width="1.5" stroke-dasharray="3 2"/>')
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
             alert_ids: Sequence[str] | None = None, max_points: int = MAX_POINTS,
             attempts: Sequence[AttemptMarker] = ()) -> str:
    """One plot as an inline <svg>: grid, axes, ticks, series, marks, a legend, alert markers and a
    marker where each attempt in `attempts` started."""
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
        labels = log2_tick_labels(ticks) if scale == "log2" else [fmt_tick(t) for t in ticks]
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
    if attempts:
        entries.append((f"attempt:{ATTEMPT_COLOR}", "attempt start"))
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

    # attempt starts: under the data like the alert markers, the label inside the plot area (to the
    # left of a line in the right fifth, so it stays inside)
    for m in attempts:
        x = px(m.step)
        tx, anchor = (x - 3, "end") if x > left + pw * 0.8 else (x + 3, "start")
        o.append(f'<g class="attempt-marker" data-attempt="{m.attempt}" data-step="{m.step}">'
                 f'<title>{esc(m.tooltip)}</title><line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{bottom}" '
                 f'stroke="{ATTEMPT_COLOR}" stroke-width="1.5" stroke-dasharray="5 3"/><text x="{tx:.1f}" '
                 f'y="{top + 20}" text-anchor="{anchor}" fill="{ATTEMPT_COLOR}">{esc(m.label)}</text></g>')

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

