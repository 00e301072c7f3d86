"""What rules track about a run beyond its windows of numbers: the LR's warmup, early signs of
instability, recurring spikes and each parameter's usual gradient norm (to name the ones that moved)."""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from collections.abc import Mapping
from typing import TYPE_CHECKING

from monitor.rules.stats import finite

if TYPE_CHECKING:
    from monitor.schema import StepRecord


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
