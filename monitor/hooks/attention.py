"""The attention probe, and the schedule that says which steps it samples.

Models compute attention with F.scaled_dot_product_attention, nn.MultiheadAttention
(F.multi_head_attention_forward) or fused kernels that never materialise the weights. On a
sampled step the probe sees each SDPA or MHA call of the model's forward: the call runs
unchanged, and the probe keeps a small subsample of its queries and keys (hooks/attention_math.py)
at a position drawn from the probe's own generator. When the forward ends, the attention of every
call kept is recomputed under no_grad, calls of one shape together (a few tensor ops for all the
layers, not a few dozen per layer). Neither the run's random stream nor anything the model
computes is touched: a probed run is bitwise the run without it. Statistics stay on the device (no
host sync); the collector ships them with the step's other values.

How the calls are seen: a TorchFunctionMode around the forward sees every call, however the
model reached the function, but every other torch call of the forward pays for passing through it;
so it is used for the first probe only, which counts the calls. Later probes replace the two
functions in torch.nn.functional for the forward's duration (where models look them up), and a probe
that sees fewer calls than the mode did (a model that bound the function under another name) goes
back to the mode for good.

Layers are named by module path (`blocks.3.attn`): a call belongs to the innermost module of the
model whose method is running, read from the Python stack at the call. Anything else
(flash-attention, custom kernels, compiled models) reports through `Monitor.observe_attention(q,
k, ...)`, which uses the same computation.
"""

from __future__ import annotations

import functools
import math
import sys
import threading
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from monitor.hooks import attention_math

_SDPA = {F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention}
_MHA = F.multi_head_attention_forward
_PATCHED = {"scaled_dot_product_attention": False, "multi_head_attention_forward": True}  # name -> is MHA


class _Interceptor(TorchFunctionMode):
    def __init__(self, probe: AttentionProbe) -> None:
        super().__init__()
        self.probe = probe

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)  # the model's own call, unchanged (this mode is off inside it)
        if func in _SDPA or func is _MHA:
            self.probe._keep(func is _MHA, args, kwargs)
        return out


class _Patch:
    """torch.nn.functional's SDPA and MHA wrapped while some thread's probed forward runs (`active`:
    thread id -> its probe); other threads' calls go straight through. What is wrapped is what is
    there (another library's replacement included) and is put back, unless something replaced the
    wrapper since. A call inside a measured one (MHA's own SDPA) is not measured again, as under the
    mode."""

    lock = threading.Lock()
    active: dict[int, AttentionProbe] = {}
    wrapped: dict[str, Callable] = {}  # name -> what the wrapper calls

    @classmethod
    def add(cls, probe: AttentionProbe) -> int:
        """The calling thread's calls go to `probe`; returns the thread's id, for `remove`."""
        with cls.lock:
            if not cls.active:
                for name, mha in _PATCHED.items():
                    cls.wrapped[name] = current = getattr(F, name)
                    setattr(F, name, cls._wrap(current, mha))
            thread = threading.get_ident()
            cls.active[thread] = probe
            return thread

    @classmethod
    def remove(cls, thread: int) -> None:
        """The probe of thread `thread` ends (end() may run on another thread: a close at exit)."""
        with cls.lock:
            cls.active.pop(thread, None)
            if not cls.active:
                for name, current in cls.wrapped.items():
                    if getattr(getattr(F, name), "__wrapped__", None) is current:
                        setattr(F, name, current)
                cls.wrapped.clear()

    @classmethod
    def _wrap(cls, function: Callable, mha: bool) -> Callable:
        @functools.wraps(function)  # its name and docstring, for code that looks (and __wrapped__)
        def wrapper(*args, **kwargs):
            probe = cls.active.get(threading.get_ident())
            if probe is None or probe.inside:
                return function(*args, **kwargs)
            probe.inside = True
            try:
                out = function(*args, **kwargs)
            finally:
                probe.inside = False
            probe._keep(mha, args, kwargs)
            return out

        return wrapper


class AttentionProbe:
    """Collects per-layer statistics during one forward pass; begin() and end() bracket it.

    begin() starts seeing the attention calls, end() stops (also after a forward that raised) and
    measures what was kept. Outside begin()/end() nothing of the probe is installed, so unsampled
    steps pay nothing. A call's layer is the innermost module of the model whose method is on the
    Python stack at the call (`blocks.3.attn`): found by walking the caller's frames, only when
    attention is called.
    """

    def __init__(self, names: dict[int, str], *, rows: int = 64, batch: int = 2, seed: int = 0,
                 on_error: Callable[[str, BaseException], None] | None = None) -> None:
        self.names = names  # id(module) -> path in the user's model ("" for the model itself)
        self.rows, self.batch = rows, batch
        self.on_error = on_error
        self.results: dict[str, torch.Tensor] = {}
        self.seconds = 0.0  # host time spent measuring during the last probed forward
        self.inside = False  # in an intercepted call (patched functions)
        self.mode_calls: int | None = None  # calls the mode saw in its last probe; None: none yet
        self.wrapping = True  # later probes wrap the functions; False once a wrapped probe saw fewer calls
        self._mode: _Interceptor | None = None
        self._patched: int | None = None  # the thread whose calls go to this probe through the wrappers
        self._kept: list[tuple[str, attention_math.Call]] = []
        # Which sequences of the batch to measure: a random position per probed forward (the same for
        # every layer of it), from the probe's own generator: the run's RNG stream is not touched.
        self.generator = torch.Generator().manual_seed(seed)
        self.offset = 0.0

    @property
    def active(self) -> bool:
        return self._mode is not None or self._patched is not None

    def begin(self) -> None:
        if self.active:
            return
        self.results = {}
        self._kept = []
        self.seconds = 0.0
        self.offset = self.draw()
        if self.mode_calls is None or not self.wrapping:
            self._mode = _Interceptor(self)
            self._mode.__enter__()
        else:
            self._patched = _Patch.add(self)

    def draw(self) -> float:
        """A position in [0, 1) from the probe's generator (a CPU tensor: no device sync)."""
        return float(torch.rand((), generator=self.generator))

    def end(self) -> dict[str, torch.Tensor]:
        if self._mode is not None:
            mode, self._mode = self._mode, None
            mode.__exit__(None, None, None)
            self.mode_calls = len(self._kept)
        elif self._patched is not None:
            _Patch.remove(self._patched)
            self._patched = None
            if len(self._kept) < (self.mode_calls or 0):  # calls it cannot see: the mode from now on
                self.wrapping = False
        kept, self._kept = self._kept, []
        if kept:
            t0 = time.perf_counter()
            try:
                for (layer, _), stats in zip(kept, attention_math.measure_calls([c for _, c in kept])):
                    self.record(layer, stats)
            except Exception as e:  # the probe never breaks a forward pass
                if self.on_error is not None:
                    self.on_error("attention probe", e)
            finally:
                self.seconds += time.perf_counter() - t0
        return self.results

    def _layer(self) -> str:
        frame = sys._getframe(2)  # the caller of the intercepted function
        for _ in range(64):
            if frame is None:
                break
            # `self` of a method frame; f_locals is only read here, on probed attention calls.
            owner = frame.f_locals.get("self") if "self" in frame.f_code.co_varnames else None
            if owner is not None:
                name = self.names.get(id(owner))
                if name is not None:
                    return name or "model"
            frame = frame.f_back
        return "attention"

    def record(self, layer: str, stats: torch.Tensor | None) -> None:
        if stats is None:
            return
        name, n = layer, 2
        while name in self.results:  # the same module attending twice (self- and cross-attention)
            name, n = f"{layer}#{n}", n + 1
        self.results[name] = stats

    def _keep(self, mha: bool, args: tuple, kwargs: dict) -> None:
        """One call seen (`mha`: F.multi_head_attention_forward's, else SDPA's): its subsample kept, measured
        at end()."""
        t0 = time.perf_counter()
        try:
            if mha:
                query = kwargs.get("query", args[0] if args else None)
                with attention_math.exact(query.device.type):  # the projections too, not only the logits
                    call = attention_math.mha_call(args, kwargs, self.rows, self.batch, self.offset)
            else:
                call = attention_math.sdpa_call(args, kwargs, self.rows, self.batch, self.offset)
            if call is not None:
                self._kept.append((self._layer(), call))
        except Exception as e:  # the probe never breaks a forward pass
            if self.on_error is not None:
                self.on_error("attention probe", e)
        finally:
            self.seconds += time.perf_counter() - t0


MOVED_LOGIT = 5.0  # max logit above which doubling since the last sample counts as movement
MOVED_ENTROPY = 0.1  # a fall of the entropy ratio this large since the last sample counts as movement
# Unprobed steps timed before each probe (their EMAs are read at the probe): the rest pay no clock read.
TIMED_STEPS = 16


class ProbeSchedule:
    """Which optimizer steps to probe, with the interval kept within the probe's share of the time.

    Steps are probed every `every` steps (aligned to multiples of it). After each probe its measured
    cost is set against the time it is amortised over, interval x typical step time: above `budget`
    the interval doubles (up to `max_every`) until it fits; below a quarter of the budget it halves
    back towards `every`. The typical step time is an EMA of the unprobed steps just before each probe
    (`timed`).

    The budget is honest: when `OVER_BUDGET` probes in a row cost more than the budget even at
    `max_every`, the cost cannot be bounded and probing stops (`off` says why); never a cap that
    still exceeds the budget. A `max_every` equal to `every` pins the interval: the user chose that
    rate, and the budget is not enforced.
    """

    OVER_BUDGET = 3

    def __init__(self, every: int, max_every: int, budget: float, start_step: int = 0) -> None:
        self.base, self.max_every, self.budget = every, max_every, budget
        self.every = every
        self.next = -(-start_step // every) * every  # the first multiple of `every` at or after the start
        self.step_seconds: float | None = None  # EMA of unprobed step times
        self.forward_seconds: float | None = None  # EMA of unprobed first forwards
        self.samples = 0
        self.costs: list[float] = []  # the last few probe costs, for run.json
        self.hurried = 0  # probes brought forward because attention moved
        self.probed_at = -1  # the step of the latest probe (training thread)
        self.off: str | None = None  # why probing stopped for good
        self._over = 0  # probes in a row over budget at max_every
        self._last: dict[str, dict[str, float]] = {}

    def due(self, step: int) -> bool:
        return step >= self.next

    def timed(self, step: int) -> bool:
        """Whether step `step`'s times feed the typical step and forward times: the `TIMED_STEPS` before a
        probe and the probe's own (those times are read at probes only)."""
        return step >= self.next - TIMED_STEPS

    @staticmethod
    def _ema(old: float | None, x: float, alpha: float = 0.1) -> float:
        return x if old is None else old + alpha * (x - old)

    def plain_forward(self, seconds: float) -> None:
        self.forward_seconds = self._ema(self.forward_seconds, seconds)

    def plain_step(self, seconds: float) -> None:
        if seconds > 0:
            self.step_seconds = self._ema(self.step_seconds, seconds)

    def probed(self, step: int, cost: float) -> None:
        """A probe ran at `step` and cost `cost` seconds: adapt the interval, schedule the next one."""
        self.samples += 1
        self.probed_at = step
        self.costs = [*self.costs[-15:], cost]
        if self.step_seconds:
            share = lambda every: cost / (every * self.step_seconds)  # noqa: E731
            while share(self.every) > self.budget and self.every * 2 <= self.max_every:
                self.every *= 2
            while self.every > self.base and share(self.every // 2) < self.budget / 4:
                self.every = max(self.base, self.every // 2)
            over = self.max_every > self.base and share(self.every) > self.budget
            self._over = self._over + 1 if over else 0
            if self._over >= self.OVER_BUDGET:
                self.off = (f"a probe costs {cost * 1e3:.1f} ms, {share(self.every):.1%} of the time even every "
                            f"{self.every} steps (attention.max_every), above attention.budget {self.budget:.1%}")
                self.next = math.inf  # due() is False from now on
                return
        self.next = step + self.every

    def observe(self, step: int, attention: dict[str, dict[str, float]]) -> bool:
        """A sample's statistics (publisher thread). When a layer's max logit doubled (and is above
        `MOVED_LOGIT`) or its entropy ratio fell by `MOVED_ENTROPY` since the last sample, or a value
        is not finite, the next probe comes `every` steps after this one whatever the budget says:
        the budget is an average, spent where attention is moving. A sample that a later probe has
        already followed (the publisher sees samples a batch late) brings nothing forward."""
        if self.off:
            return False
        moved = False
        for layer, st in attention.items():
            prev = self._last.get(layer, {})
            logit, ent = st.get("max_logit"), st.get("entropy_ratio")
            if any(v is not None and not math.isfinite(v) for v in (logit, ent)):
                moved = True
            elif logit is not None and logit > MOVED_LOGIT and logit >= 2 * prev.get("max_logit", math.inf):
                moved = True
            elif ent is not None and ent <= prev.get("entropy_ratio", -math.inf) - MOVED_ENTROPY:
                moved = True
        self._last = attention
        if moved and self.probed_at <= step:
            self.hurried += 1
            self.next = min(self.next, step + self.base)  # an int store: atomic for the training thread
        return moved

    def skipped(self, step: int) -> None:
        """The step was due but nothing was probed (no attention ran): look again `every` steps on."""
        self.next = step + self.every

    def summary(self) -> dict:
        costs = sorted(self.costs)
        return {"every": self.every, "samples": self.samples, "hurried": self.hurried,
                "median_cost_seconds": costs[len(costs) // 2] if costs else None,
                "step_seconds": self.step_seconds}
