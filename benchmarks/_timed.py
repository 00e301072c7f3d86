"""Timing the monitor's training-thread entry points from inside a run (hostcost.py's `solo`), and emptying
them (`hollow`, the floor of torch's hook dispatch around them)."""

from __future__ import annotations

import statistics
import time

# The monitor's training-thread entry points (the same names before and after issue 13): the solo run
# times the calls into them, the direct cost (without the hook dispatch inside torch around them).
ENTRY_POINTS = {
    "monitor.hooks.collector:StepCollector": ("_forward_pre", "_forward_post_model", "_forward_end",
                                              "_forward_post_loss_fn", "_scaler_scale", "_on_clip", "_optimizer_pre",
                                              "_optimizer_post", "_scaler_step_done"),
    "monitor.hooks.phases:PhaseHooks": ("_backward_began", "_backward_ended"),
}


# Work done inside an entry point that is the attention probe's (its calls measured as the forward ends, in
# the forward hook): counted in the probe's own cost, so taken out of the hooks' time here.
PROBE_PARTS = {"monitor.hooks.attention:AttentionProbe": ("end",)}


class Timed:
    """Wraps the entry points on their classes (before attach binds them): CPU time spent inside them, less
    the attention probe's parts inside them (`PROBE_PARTS`: the probe's column has them)."""

    def __init__(self) -> None:
        self.total = 0.0
        self.calls = 0
        self._undo: list = []
        # What the clock adds to each timed call (one read's worth falls inside the interval): the
        # median of back-to-back reads, subtracted per call (`direct`).
        reads = []
        for _ in range(20001):
            a = time.thread_time()
            reads.append(time.thread_time() - a)
        self.clock_cost = statistics.median(reads)

    def direct(self) -> float:
        """CPU seconds inside the entry points since `total` and `calls` were last zeroed."""
        return max(0.0, self.total - self.calls * self.clock_cost)

    def __enter__(self) -> Timed:
        import importlib

        for table, sign in ((ENTRY_POINTS, 1), (PROBE_PARTS, -1)):
            for where, names in table.items():
                mod, cls_name = where.split(":")
                cls = getattr(importlib.import_module(mod), cls_name)
                for name in names:
                    if name in vars(cls):
                        self._undo.append((cls, name, vars(cls)[name]))
                        setattr(cls, name, self._wrap(vars(cls)[name], sign))
        return self

    def _wrap(self, fn, sign: int):
        """`fn` timed: its time added (an entry point, a call counted), or taken away (-1: a probe part, inside
        an entry point whose time brought it in)."""
        clock = time.thread_time

        def timed(*args, **kwargs):
            t0 = clock()
            try:
                return fn(*args, **kwargs)
            finally:
                self.total += sign * (clock() - t0)
                self.calls += sign > 0

        return timed

    def __exit__(self, *exc) -> None:
        for cls, name, fn in self._undo:
            setattr(cls, name, fn)


def hollow() -> None:
    """Empty the bodies of the monitor's training-thread entry points (what is left: torch's dispatch of
    the hooks, the wrappers around the clip function and GradScaler): the floor under the hooks' own work."""
    from monitor.hooks.collector import StepCollector as C

    for name in ("_forward_pre", "_forward_post_model", "_forward_end", "_forward_post_loss_fn", "_optimizer_pre",
                 "_optimizer_post", "_on_clip"):
        setattr(C, name, lambda self, *args, **kwargs: None)
    C._scaler_scale = lambda self, original, outputs: original(outputs)
    C._scaler_step = lambda self, original, optimizer, *args, **kwargs: original(optimizer, *args, **kwargs)
