"""Small streaming statistics for rules: O(1) amortized per observation."""

from __future__ import annotations

import math
from bisect import bisect_left, insort
from collections import OrderedDict, deque
from collections.abc import Mapping
from itertools import repeat
from operator import sub
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from monitor.schema import StepRecord

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


def top_movers(before: dict[str, float] | None, after: dict[str, float] | None, k: int = 3) -> list[dict]:
    """The k parameters whose gradient norm grew the most (ratio after/before), for diagnosis."""
    if not before or not after:
        return []
    rows = []
    for name, b in before.items():
        a = after.get(name)
        if a is None or not finite(b) or b <= 0:
            continue
        ratio = a / b if finite(a) else math.inf  # a NaN/Inf gradient is the strongest lead
        rows.append({"param": name, "before": b, "after": a, "ratio": ratio})
    rows.sort(key=lambda r: r["ratio"], reverse=True)
    return rows[:k]


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


class LrTrace:
    """What the LR trace says about warmup: first LR, peak so far, and when warmup ended.

    Warmup lasts while the (max over groups) LR rises; it has ended at the first step whose LR falls
    below the peak, or once the LR has stayed flat for `flat_steps` steps (a constant schedule after
    warmup). A repeated value alone does not end it: logs print the LR rounded (llm.c `%f`, Megatron
    `%.3E`), so a slow warmup shows the same value two steps running. `warmup_steps` counts the
    steps up to and including the peak.
    """

    flat_steps = 3

    def __init__(self) -> None:
        self.first_lr: float | None = None
        self.first_step: int | None = None
        self.prev: float | None = None
        self.peak = 0.0
        self.peak_step: int | None = None
        self.warmup_done = False
        self.warmup_steps: int | None = None
        self.rose = False
        self.flat = 0

    def push(self, step: int, lr: float | None) -> None:
        if lr is None:
            return
        if self.warmup_done:  # the usual case, after the first steps: only the peak can move
            if lr > self.peak:
                self.peak, self.peak_step = lr, step
            self.prev = lr
            return
        if self.first_lr is None:
            self.first_lr, self.first_step = lr, step
        if lr > self.peak:
            self.peak, self.peak_step = lr, step
        if self.prev is not None and not self.warmup_done:
            if lr > self.prev:
                self.rose, self.flat = True, 0
            elif lr > 0:
                self.flat += 1
                if lr < self.peak or self.flat >= self.flat_steps:
                    self.warmup_done = True
                    self.warmup_steps = (self.peak_step - self.first_step + 1) if self.rose else 0
        self.prev = lr

    @property
    def in_warmup(self) -> bool:
        return not self.warmup_done


class EarlyInstability:
    """Signs that the start of a run is unstable, collected up to a horizon step: a non-finite loss or
    gradient norm, or a loss `spike_ratio` times above the lowest seen after the first `settle` steps
    (early losses fall fast, so a rise to well above the best so far is not noise).

    The warmup rules use it as evidence: advice about a warmup becomes a warning when the run it
    describes is visibly unstable in or right after the warmup.
    """

    def __init__(self, spike_ratio: float, settle: int = 10, keep: int = 5) -> None:
        self.spike_ratio, self.settle, self.keep = spike_ratio, settle, keep
        self.low = math.inf
        self.seen = 0
        self.events: list[dict] = []

    def push(self, r: StepRecord) -> bool:
        """Fold in a record; True when it is a sign of instability."""
        self.seen += 1
        loss, g = r.loss, r.grad_norm
        what = None
        if loss is not None and not math.isfinite(loss):
            what = f"loss {loss}"
        elif g is not None and not math.isfinite(g) and not r.skipped:
            what = f"gradient norm {g}"
        elif loss is not None:
            if self.seen > self.settle and self.low > 0 and loss > self.spike_ratio * self.low:
                what = f"loss {loss:.4g}, {loss / self.low:.1f}x the lowest so far ({self.low:.4g})"
            self.low = min(self.low, loss)
        if what is None:
            return False
        if len(self.events) < self.keep:
            self.events.append({"step": r.step, "what": what})
        return True


class Recurrence:
    """The steps of recent spikes: `count` of them within `window` steps make a recurrence."""

    def __init__(self, count: int, window: int) -> None:
        self.count, self.window = count, window
        self.steps: deque[int] = deque()

    def add(self, step: int) -> list[int] | None:
        """Count a spike at `step`; the spikes of the window when they are `count` or more, else None."""
        steps = self.steps
        steps.append(step)
        while step - steps[0] >= self.window:
            steps.popleft()
        return list(steps) if len(steps) >= self.count else None


class ParamBaseline:
    """A slow EMA of each parameter's log gradient norm, to name the ones that moved most.

    Updated only from records that carry per-parameter norms (every step in-process, sampled in
    event files), and only while the rule calling it sees nothing abnormal, so an incident does
    not become its own baseline.

    Several rules keep a baseline each (loss.spike, loss.divergence, grad_norm.spike) and, while
    the run is healthy, fold the same vectors into equal baselines. The last folds are remembered
    (`_FOLDS`, keyed by the vector's identity: a record's values are not changed once it exists), and
    a baseline equal to the one a vector was folded into takes that result instead of folding again.
    Baselines are never changed in place, so they can be shared.
    """

    def __init__(self, span: float = 20.0, every: int = 10) -> None:
        self.alpha = 2.0 / (span + 1.0)
        self.every = every  # a baseline moves slowly: folding in every 10th vector keeps it O(1) amortized
        self.calls = 0
        self.log_norms: dict[str, float] = {}

    def update(self, norms: Mapping[str, float] | None) -> None:
        if not norms:
            return
        self.calls += 1
        if self.calls % self.every != 1 and self.log_norms:
            return
        base = self.log_norms
        memo = _FOLDS.get(id(norms))
        if memo is not None and memo[0] is norms and memo[2] == self.alpha and (
                memo[1] is base or memo[1] == base):
            self.log_norms = memo[3]
            return
        after = self.log_norms = self._fold(base, norms)
        # The entry holds the vector itself, so its id names no other object while it is remembered.
        _FOLDS[id(norms)] = (norms, base, self.alpha, after)
        if len(_FOLDS) > _FOLDS_KEPT:
            _FOLDS.popitem(last=False)  # one call: engines in other threads share the memo

    def _fold(self, base: dict[str, float], norms: Mapping[str, float]) -> dict[str, float]:
        a = self.alpha
        isfinite, log = math.isfinite, math.log
        values = list(norms.values())
        if base and values and min(values) > 0 and isfinite(sum(values)):
            names = list(norms)
            if names == list(base):  # the usual case: the same parameters, every value usable
                return dict(zip(names, [o + a * (lv - o) for o, lv in zip(base.values(), map(log, values))]))
        out = dict(base)
        for name, v in norms.items():
            if v > 0 and isfinite(v):
                lv = log(v)
                old = out.get(name)
                out[name] = lv if old is None else old + a * (lv - old)
        return out

    def movers(self, norms: dict[str, float] | None, k: int = 3) -> list[dict]:
        if not norms or not self.log_norms:
            return []
        before = {n: math.exp(v) for n, v in self.log_norms.items()}
        return top_movers(before, norms, k)


# The last folds of ParamBaseline: id(vector) -> (vector, baseline before, alpha, baseline after), oldest
# first. The engine feeds a chunk of records (256) rule by rule, so the rule after the first finds the
# folds of the whole chunk here: about 26 at one fold per 10 vectors.
_FOLDS: OrderedDict[int, tuple[Mapping[str, float], dict[str, float], float, dict[str, float]]] = OrderedDict()
_FOLDS_KEPT = 64


def describe_movers(movers: list[dict]) -> str:
    return ", ".join(f"{m['param']} x{m['ratio']:.1f}" for m in movers)
