"""Small streaming statistics for rules: O(1) amortized per observation."""

from __future__ import annotations

import math
from collections import deque
from statistics import median

# MAD of a normal distribution times this is its standard deviation.
MAD_TO_SIGMA = 1.4826


class RobustWindow:
    """Trailing window of values with median and MAD refreshed every `refresh` pushes.

    Re-sorting the window on every step would cost O(W log W) per record; the
    baseline of a trailing window barely moves in a few steps, so refreshing it
    every W/10 pushes keeps the per-record cost O(log W) amortized.
    """

    def __init__(self, size: int, refresh: int | None = None) -> None:
        self.size = size
        self.values: deque[float] = deque(maxlen=size)
        self.refresh = refresh or max(1, size // 10)
        self._since = self.refresh  # force a refresh on first use
        self._median = math.nan
        self._mad = math.nan

    def __len__(self) -> int:
        return len(self.values)

    @property
    def full(self) -> bool:
        return len(self.values) >= self.size

    def push(self, x: float) -> None:
        self.values.append(x)
        self._since += 1

    def _update(self) -> None:
        if self._since >= self.refresh and self.values:
            vals = list(self.values)
            self._median = median(vals)
            self._mad = median(abs(v - self._median) for v in vals)
            self._since = 0

    @property
    def median(self) -> float:
        self._update()
        return self._median

    @property
    def mad(self) -> float:
        self._update()
        return self._mad

    def zscore(self, x: float, min_sigma: float = 0.0) -> float:
        """Robust z of x against the window: (x - median) / (1.4826 MAD), sigma floored at min_sigma."""
        sigma = max(MAD_TO_SIGMA * self.mad, min_sigma)
        if sigma <= 0:
            return math.inf if x > self.median else 0.0
        return (x - self.median) / sigma


def finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


def top_movers(before: dict[str, float] | None, after: dict[str, float] | None, k: int = 3) -> list[dict]:
    """The k parameters whose gradient norm grew the most (ratio after/before), for diagnosis."""
    if not before or not after:
        return []
    rows = []
    for name, b in before.items():
        a = after.get(name)
        if a is None or not (finite(a) and finite(b)) or b <= 0:
            continue
        rows.append({"param": name, "before": b, "after": a, "ratio": a / b})
    rows.sort(key=lambda r: r["ratio"], reverse=True)
    return rows[:k]
