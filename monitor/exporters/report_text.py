"""Numbers and text as the HTML report prints them: compact numbers, escaped text, short evidence.

Alerts read back from alerts.jsonl carry NaN/Inf as the strings JSON allows ("NaN", "Infinity"):
evidence formatting turns them back into the numbers' short forms.
"""

from __future__ import annotations

import html
import math

__all__ = ["esc", "fmt_num", "format_evidence"]


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

