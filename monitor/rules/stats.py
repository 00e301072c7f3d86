"""Small streaming statistics for rules: O(1) amortized per observation."""

from __future__ import annotations

import math
from bisect import bisect_left, insort
from collections import deque
from itertools import repeat
from operator import sub

# MAD of a normal distribution times this is its standard deviation.
MAD_TO_SIGMA = 1.4826


class RobustWindow:
    """Trailing window of values with median and MAD refreshed every `refresh` pushes.

    Re-sorting the window on every step would cost O(W log W) per record; the
    baseline of a trailing window barely moves in a few steps, so refreshing it
    every W/10 pushes keeps the per-record cost O(log W) amortized. `med` and
    `mad` are plain attributes (rules read them on every record).

    With `alarm=(z, min_sigma, min_gap)`, `quiet_below` is `alarm_floor(*alarm)` as of the last
    refresh: a rule that tests values against the window with those parameters knows that a value
    below it finds nothing (its quiet records' fast path).
    """

    def __init__(self, size: int, refresh: int | None = None,
                 alarm: tuple[float, float, float] | None = None) -> None:
        self.size = size
        self.values: deque[float] = deque(maxlen=size)
        self.refresh = refresh or max(1, size // 10)
        self._since = 0
        self.med = math.nan
        self.mad = math.nan
        self.full = False
        self.alarm = alarm
        self.quiet_below = -math.inf

    def __len__(self) -> int:
        return len(self.values)

    def push(self, x: float) -> None:
        self.values.append(x)
        self._since += 1
        if self._since >= self.refresh or not self.full:
            self._recompute()
            self.full = len(self.values) >= self.size
            if self.alarm is not None:
                self.quiet_below = self.alarm_floor(*self.alarm)

    def _recompute(self) -> None:
        vals = sorted(self.values)
        n = len(vals)
        mid = n // 2
        med = vals[mid] if n % 2 else 0.5 * (vals[mid - 1] + vals[mid])
        self.med = med
        self.mad = _mad(vals, med) if math.isfinite(sum(vals)) else _mad_sorting(vals, med)
        self._since = 0

    @property
    def median(self) -> float:
        return self.med

    def alarm_floor(self, z: float, min_sigma: float, min_gap: float) -> float:
        """A value below which x is certainly not both `z` robust sigmas (sigma floored at min_sigma) and
        `min_gap` above the median: rules that test both need the exact test only at or above it. The
        margin (1e-9 relative) covers the rounding of the exact test many times over; -inf while the
        window is not full or gives no usable sigma."""
        if not self.full:
            return -math.inf  # no baseline yet: rules take their exact path
        sigma = MAD_TO_SIGMA * self.mad
        if sigma < min_sigma:
            sigma = min_sigma
        if not sigma > 0 or not math.isfinite(self.med):
            return -math.inf
        bound = self.med + max(z * sigma, min_gap)
        return bound - 1e-9 * (abs(bound) + 1.0)

    def zscore(self, x: float, min_sigma: float = 0.0) -> float:
        """Robust z of x against the window: (x - median) / (1.4826 MAD), sigma floored at min_sigma."""
        sigma = MAD_TO_SIGMA * self.mad
        if sigma < min_sigma:
            sigma = min_sigma
        if sigma <= 0:
            return math.inf if x > self.med else 0.0
        return (x - self.med) / sigma


class LazyLogMedian:
    """The median of log(x) that a RobustWindow(size, refresh) of log(x) would hold, for a rule that reads
    it rarely (loss.spike's gradient baseline, read only when a spike is judged).

    A push only appends x: no log, no sort every `refresh` pushes. `median()` rebuilds the window as
    of the last refresh a RobustWindow would have made (it refreshes on each of its first `size`
    pushes, then every `refresh`), from the last size + refresh - 1 values kept, so it returns the
    same float; `full` says whether that window was full.
    """

    def __init__(self, size: int, refresh: int | None = None) -> None:
        self.size = size
        self.refresh = refresh or max(1, size // 10)
        self.values: deque[float] = deque(maxlen=size + self.refresh - 1)
        self.pushes = 0

    def push(self, x: float) -> None:
        self.values.append(x)
        self.pushes += 1

    @property
    def full(self) -> bool:
        return self.pushes >= self.size

    def median(self) -> float:
        n, size = self.pushes, self.size
        if n == 0:
            return math.nan
        since = 0 if n <= size else (n - size) % self.refresh  # pushes after the last refresh
        kept = list(self.values)
        vals = sorted(map(math.log, kept[max(0, len(kept) - since - size):len(kept) - since]))
        k = len(vals)
        mid = k // 2
        return vals[mid] if k % 2 else 0.5 * (vals[mid - 1] + vals[mid])


def _mad(vals: list[float], med: float) -> float:
    """The median of |v - med| over sorted finite `vals`, without sorting the deviations.

    Above the median the deviations v - med rise (A[t] = vals[mid + t] - med); below it med - v rise
    too, read downwards (B[t] = med - vals[mid - 1 - t]): the same floats as |v - med|. The median of
    their union comes from splitting off its `mid` smallest: i from A and mid - i from B, found by
    bisection on i (the k-th of two sorted lists), in O(log n) instead of a sort."""
    n = len(vals)
    mid = n // 2
    a, b = n - mid, mid
    lo, hi = 0, min(mid, a)
    while lo <= hi:
        i = (lo + hi) // 2
        j = mid - i
        if i > 0 and j < b and vals[mid + i - 1] - med > med - vals[mid - 1 - j]:
            hi = i - 1  # A[i-1] > B[j]: fewer from A
        elif j > 0 and i < a and med - vals[mid - j] > vals[mid + i] - med:
            lo = i + 1  # B[j-1] > A[i]: more from A
        else:
            break
    else:  # no split found: only if the comparisons were inconsistent, which finite floats are not
        return _mad_sorting(vals, med)
    right = min(vals[mid + i] - med if i < a else math.inf, med - vals[mid - 1 - j] if j < b else math.inf)
    if n % 2:
        return right
    left = max(vals[mid + i - 1] - med if i > 0 else -math.inf, med - vals[mid - j] if j > 0 else -math.inf)
    return 0.5 * (left + right)


def _mad_sorting(vals: list[float], med: float) -> float:
    """_mad for windows with non-finite values: the deviations sorted (two runs, merged in one pass)."""
    n = len(vals)
    mid = n // 2
    dev = list(map(sub, repeat(med, mid), vals[:mid]))
    dev.reverse()
    dev += map(sub, vals[mid:], repeat(med))
    dev.sort()
    return dev[mid] if n % 2 else 0.5 * (dev[mid - 1] + dev[mid])


def finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


class SortedWindow:
    """The last `size` finite values and their exact median at any push: the window in order and a sorted
    copy kept by bisection (no sort per median; a rule that fires on every record reads it every record)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.order: deque[float] = deque()
        self.sorted: list[float] = []

    def __len__(self) -> int:
        return len(self.order)

    def push(self, x: float) -> None:
        if not math.isfinite(x):
            return
        if len(self.order) == self.size:
            s = self.sorted
            del s[bisect_left(s, self.order.popleft())]
        self.order.append(x)
        insort(self.sorted, x)

    def median(self) -> float:
        """As statistics.median of the window (call only when it is not empty)."""
        s = self.sorted
        mid = len(s) // 2
        return s[mid] if len(s) % 2 else (s[mid - 1] + s[mid]) / 2


class Ema:
    """Exponential moving average with span-style smoothing (alpha = 2 / (span + 1))."""

    def __init__(self, span: float) -> None:
        self.alpha = 2.0 / (span + 1.0)
        self.value: float | None = None
        self.count = 0

    def push(self, x: float) -> float:
        self.value = x if self.value is None else self.value + self.alpha * (x - self.value)
        self.count += 1
        return self.value
