"""Axis ticks and tick labels of the report's plots: linear, base-10 log and base-2 log axes.

Every label of one axis is printed in one style (the same decimals, one suffix), so an axis
reads as a scale rather than a list of numbers.
"""

from __future__ import annotations

import math

from monitor.exporters.report_text import fmt_num


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


def fmt_tick(v: float, step: float | None = None) -> str:
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
    return [fmt_tick(t, step) for t in ticks]


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

