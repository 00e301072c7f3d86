"""The attention probe: entropy and logit statistics of every attention call, on sampled steps.

Models compute attention with F.scaled_dot_product_attention, nn.MultiheadAttention
(F.multi_head_attention_forward) or fused kernels that never materialise the weights. On a
sampled step the probe enters a TorchFunctionMode around the model's forward: each SDPA or MHA
call runs unchanged, and then, under no_grad, the probe recomputes the attention of a small
subsample (`batch` consecutive sequences at a position drawn from the probe's own generator, up
to `rows` evenly spaced query rows, all keys and heads) and keeps four numbers per layer: the
normalised entropy (entropy / log of the visible keys) averaged over heads and its lowest head,
the largest logit and the largest probability. Neither the run's random stream nor anything the
model computes is touched: a probed run is bitwise the run without it. Statistics stay on the
device (no host sync); the collector ships them with the step's other values.

Layers are named by module path (`blocks.3.attn`): a call belongs to the innermost module of the
model whose method is running, read from the Python stack at the call. Anything else
(flash-attention, custom kernels, compiled models) reports through `Monitor.observe_attention(q,
k, ...)`, which uses the same computation.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

STATS = ("entropy_ratio", "entropy_min", "max_logit", "max_prob")

_SDPA = {F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention}
_MHA = F.multi_head_attention_forward

# Mask kinds: "keep" (bool, True = the key takes part: SDPA), "drop" (bool, True = masked out: MHA,
# key_padding_mask), "add" (float, added to the logits).
Mask = tuple[torch.Tensor, str]

# Additive masks write "masked" as a large negative number rather than -inf (Hugging Face uses the
# dtype's minimum, BERT -10000): such keys are not visible, so they don't count in log(visible keys).
MASKED_BELOW = -1e4
# Logits held at once, per chunk of heads: bounds the probe's memory on long sequences.
CHUNK_ELEMENTS = 1 << 24


def _as4d(m: torch.Tensor, heads_first: bool) -> torch.Tensor:
    """A mask broadcastable to (batch, heads, queries, keys), as a view with leading 1-dims added."""
    if m.dim() == 3 and heads_first:  # (batch, queries, keys) beside 3-d q/k without a head dim
        return m[:, None]
    return m.reshape((1,) * (4 - m.dim()) + tuple(m.shape)) if m.dim() < 4 else m


def _cut(m: torch.Tensor, seqs: slice, rows: torch.Tensor | None, heads: slice) -> torch.Tensor:
    """A 4-d mask cut to the probed sequences, rows and heads where it is not broadcast along them."""
    if m.shape[0] > 1:
        m = m[seqs]
    if m.shape[1] > 1:
        m = m[:, heads]
    if rows is not None and m.shape[2] > 1:
        m = m.index_select(2, rows)
    return m


def _exact(device_type: str) -> contextlib.AbstractContextManager:
    """no_grad with autocast off: inside an autocast region the recomputed projections and logits
    would otherwise be fp16/bf16 again (and overflow where the model's fused kernel does not)."""
    stack = contextlib.ExitStack()
    stack.enter_context(torch.no_grad())
    if torch.is_autocast_enabled(device_type):
        stack.enter_context(torch.autocast(device_type, enabled=False))
    return stack


def attention_stats(q: torch.Tensor | None, k: torch.Tensor | None, **kw: Any) -> torch.Tensor | None:
    """`_stats` (below) computed exactly: float32, no autograd, autocast off."""
    t = kw.get("logits") if kw.get("logits") is not None else q
    with _exact(t.device.type if isinstance(t, torch.Tensor) else "cpu"):
        return _stats(q, k, **kw)


def _stats(
    q: torch.Tensor | None,
    k: torch.Tensor | None,
    *,
    logits: torch.Tensor | None = None,
    masks: list[Mask] | tuple[Mask, ...] = (),
    is_causal: bool = False,
    scale: float | None = None,
    rows: int = 64,
    batch: int = 2,
    offset: float = 0.0,
) -> torch.Tensor | None:
    """[entropy_ratio, entropy_min, max_logit, max_prob] of the attention softmax(q·kᵀ·scale + masks).

    q: (batch..., heads, queries, dim), k: (batch..., kv_heads, keys, dim), or `logits`
    (batch, heads, queries, keys) instead of both. Grouped-query attention (fewer key heads) repeats
    them as SDPA's enable_gqa does. The ratio is the entropy of a row over log of its visible keys
    (1: uniform, 0: one-hot), averaged over rows and sequences per head; `entropy_ratio` is the mean
    over heads and `entropy_min` the lowest head. Rows with a single visible key have no choice to
    make and are left out. `batch` consecutive sequences are measured, starting at `offset` (in
    [0, 1)) of the way through the batch. Returns a float32 tensor on the inputs' device (no host sync), or None
    when nothing is measurable.
    """
    three_d = False
    if logits is None:
        if q is None or k is None or q.dim() < 2 or k.dim() < 2:
            return None
        if q.dim() == 2:  # (queries, dim)
            q, k = q[None, None], k[None, None]
        elif q.dim() == 3:  # (batch, queries, dim): one head
            q, k, three_d = q[:, None], k[:, None], True
        elif q.dim() > 4:
            q, k = q.flatten(0, q.dim() - 4), k.flatten(0, k.dim() - 4)
        b, h, lq, d = q.shape
        hk, lk = k.shape[-3], k.shape[-2]
        if hk == 0 or h % hk:
            return None
        device = q.device
    else:
        if logits.dim() == 2:
            logits = logits[None, None]
        elif logits.dim() == 3:
            logits, three_d = logits[:, None], True
        b, h, lq, lk = logits.shape
        device = logits.device
    if lk == 0 or lq == 0 or b == 0:
        return None
    nb = min(batch, b)
    start = min(b - nb, int(offset * (b - nb + 1)))
    seqs = slice(start, start + nb)
    rows_idx = None
    if lq > rows:  # evenly spaced rows: deterministic, no RNG drawn
        rows_idx = torch.linspace(0, lq - 1, rows, device=device).round().long()
    nrows = rows if rows_idx is not None else lq
    visible0 = torch.ones((nrows, lk), dtype=torch.bool, device=device)
    if is_causal:  # SDPA's is_causal: the top-left aligned lower triangle
        qi = rows_idx if rows_idx is not None else torch.arange(lq, device=device)
        visible0 = torch.arange(lk, device=device)[None, :] <= qi[:, None]
    masks4 = [(_as4d(m, three_d), kind) for m, kind in masks]
    group = 1
    if logits is None:
        qs = q[seqs]
        if rows_idx is not None:
            qs = qs.index_select(2, rows_idx)
        qs = qs.float()
        ks = k[seqs].float()
        group = h // hk
        if group > 1:  # grouped-query attention: query head i reads key head i // group
            ks = ks.repeat_interleave(group, dim=1)
        sc = scale if scale is not None else 1.0 / math.sqrt(d)
    hc = max(1, min(h, CHUNK_ELEMENTS // max(1, nb * nrows * lk)))
    ent_sum, ent_n, maxes, pmaxes, nans = [], [], [], [], []
    for h0 in range(0, h, hc):
        heads = slice(h0, min(h, h0 + hc))
        if logits is None:
            lg = torch.matmul(qs[:, heads], ks[:, heads].transpose(-1, -2)) * sc
        else:
            lg = logits[seqs, heads]
            if rows_idx is not None:
                lg = lg.index_select(2, rows_idx)
            lg = lg.float()
        if masks4:
            visible = visible0.expand(lg.shape).clone()
            for m, kind in masks4:
                sub = _cut(m, seqs, rows_idx, heads)
                if kind == "keep":
                    visible &= sub
                elif kind == "drop":
                    visible &= ~sub
                else:
                    sub = sub.float()
                    lg = lg + sub
                    visible &= sub > MASKED_BELOW
        else:
            visible = visible0  # (rows, keys), broadcast: no copy per head and sequence
        if masks4 or logits is not None:
            # -inf may come from an additive mask or the caller's logits: such keys are not visible.
            # NaN logits (a diverged run) must still make max_logit NaN once masked away here.
            nans.append(lg.isnan().any())
            visible = visible & (lg > float("-inf"))
        if not (visible is visible0 and not is_causal):
            lg = lg.masked_fill(~visible, float("-inf"))
        top = lg.amax(-1, keepdim=True)
        maxes.append(top.amax())  # NaN propagates; -inf where nothing is visible
        # Entropy from logits shifted by their row maximum: H = log Z - sum(e * s) / Z with s = lg -
        # max <= 0 and e = exp(s), without the cancellation of log Z - sum(p * lg) when logits are
        # large and H small. The largest probability of a row is exp(0) / Z. Hidden keys give
        # e * s = 0 * -inf = NaN, which nansum skips (rows without a visible key are left out below).
        sh = lg - top
        e = sh.exp()
        z = e.sum(-1)
        entropy = z.log() - (e * sh).nansum(-1) / z  # (nb, hc, rows)
        n_visible = visible.sum(-1)  # (rows,) when broadcast, else (nb, hc, rows)
        unusable = (n_visible < 2).expand(entropy.shape)  # one visible key: nothing to choose
        ratio = (entropy / n_visible.clamp(min=2).log()).masked_fill(unusable, 0.0)
        ent_sum.append(ratio.sum(dim=(0, 2)))
        ent_n.append(entropy.shape[0] * entropy.shape[2] - unusable.sum(dim=(0, 2)))
        pmaxes.append(z.reciprocal().masked_fill(unusable, 0.0).amax())
    n = torch.cat(ent_n)
    if len(maxes) > 1:
        max_logit, max_prob = torch.stack(maxes).amax(), torch.stack(pmaxes).amax()
    else:
        max_logit, max_prob = maxes[0], pmaxes[0]
    if nans:
        max_logit = max_logit.masked_fill(torch.stack(nans).any(), float("nan"))
    # Heads with no usable row (everything masked) are left out of the mean and the minimum; with
    # none at all both are NaN.
    per_head = torch.cat(ent_sum) / n
    none = n == 0
    mean = per_head.masked_fill(none, 0.0).sum() / (n.numel() - none.sum())
    low = per_head.masked_fill(none, float("inf")).amin()
    return torch.stack([mean, low.masked_fill(low == float("inf"), float("nan")), max_logit, max_prob])


def _mha_stats(args: tuple, kwargs: dict, rows: int, batch: int, offset: float = 0.0) -> torch.Tensor | None:
    """Statistics of one F.multi_head_attention_forward call, from its packed or separate projections."""
    names = ("query", "key", "value", "embed_dim_to_check", "num_heads", "in_proj_weight", "in_proj_bias", "bias_k",
             "bias_v", "add_zero_attn", "dropout_p", "out_proj_weight", "out_proj_bias", "training",
             "key_padding_mask", "need_weights", "attn_mask", "use_separate_proj_weight", "q_proj_weight",
             "k_proj_weight", "v_proj_weight", "static_k", "static_v", "average_attn_weights", "is_causal")
    a = dict(zip(names, args))
    a.update(kwargs)
    if a.get("bias_k") is not None or a.get("add_zero_attn") or a.get("static_k") is not None:
        return None  # extra keys the probe does not model
    query, key, heads = a["query"], a["key"], int(a["num_heads"])
    kpm = a.get("key_padding_mask")
    if query.dim() == 2:  # unbatched (L, E)
        query, key = query[:, None], key[:, None]
        kpm = kpm[None] if kpm is not None else None
    e = query.shape[-1]
    if a.get("use_separate_proj_weight"):
        wq, wk = a["q_proj_weight"], a["k_proj_weight"]
    else:
        wq, wk = a["in_proj_weight"][:e], a["in_proj_weight"][e:2 * e]
    bias = a.get("in_proj_bias")
    bq, bk = (bias[:e], bias[e:2 * e]) if bias is not None else (None, None)
    lq, n = query.shape[0], query.shape[1]
    nb = min(batch, n)
    start = min(n - nb, int(offset * (n - nb + 1)))
    seqs = slice(start, start + nb)
    lk = key.shape[0]
    hd = e // heads
    q = F.linear(query[:, seqs].float(), wq.float(), bq.float() if bq is not None else None)  # (L, nb, E)
    k = F.linear(key[:, seqs].float(), wk.float(), bk.float() if bk is not None else None)
    q = q.reshape(lq, nb, heads, hd).permute(1, 2, 0, 3)  # (nb, H, L, hd)
    k = k.reshape(lk, nb, heads, hd).permute(1, 2, 0, 3)
    masks: list[Mask] = []
    am = a.get("attn_mask")
    if am is not None:
        if am.dim() == 3:  # (N*H, L, S)
            am = am.reshape(n, heads, lq, lk)[seqs]
        masks.append((am, "drop" if am.dtype == torch.bool else "add"))
    if kpm is not None:
        kpm = kpm[seqs, None, None, :]
        masks.append((kpm, "drop" if kpm.dtype == torch.bool else "add"))
    return attention_stats(q, k, masks=masks, is_causal=bool(a.get("is_causal")) and am is None, rows=rows, batch=nb)


class _Interceptor(TorchFunctionMode):
    def __init__(self, probe: AttentionProbe) -> None:
        super().__init__()
        self.probe = probe

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)  # the model's own call, unchanged (this mode is off inside it)
        if func in _SDPA or func is _MHA:
            self.probe._measure(func, args, kwargs)
        return out


def sdpa_masks(mask: torch.Tensor | None) -> list[Mask]:
    """SDPA's attn_mask as a mask list: bool (True = may attend) or float (added to the logits)."""
    return [(mask, "keep" if mask.dtype == torch.bool else "add")] if mask is not None else []


def _sdpa_stats(args: tuple, kwargs: dict, rows: int, batch: int, offset: float = 0.0) -> torch.Tensor | None:
    q, k = kwargs.get("query", args[0] if args else None), kwargs.get("key", args[1] if len(args) > 1 else None)
    mask = kwargs.get("attn_mask", args[3] if len(args) > 3 else None)
    is_causal = kwargs.get("is_causal", args[5] if len(args) > 5 else False)
    scale = kwargs.get("scale", args[6] if len(args) > 6 else None)
    return attention_stats(q, k, masks=sdpa_masks(mask), is_causal=bool(is_causal), scale=scale, rows=rows, batch=batch,
                           offset=offset)


class AttentionProbe:
    """Collects per-layer statistics during one forward pass; begin() and end() bracket it.

    begin() enters the TorchFunctionMode, end() leaves it (also after a forward that raised).
    Outside begin()/end() nothing of the probe is installed, so unsampled steps pay nothing. A
    call's layer is the innermost module of the model whose method is on the Python stack at the
    call (`blocks.3.attn`): found by walking the caller's frames, only when attention is called.
    """

    def __init__(self, names: dict[int, str], *, rows: int = 64, batch: int = 2, seed: int = 0,
                 on_error: Callable[[str, BaseException], None] | None = None) -> None:
        self.names = names  # id(module) -> path in the user's model ("" for the model itself)
        self.rows, self.batch = rows, batch
        self.on_error = on_error
        self.results: dict[str, torch.Tensor] = {}
        self.seconds = 0.0  # host time spent measuring during the last probed forward
        self._mode: _Interceptor | None = None
        # Which sequences of the batch to measure: a random position per probed forward (the same for
        # every layer of it), from the probe's own generator: the run's RNG stream is not touched.
        self.generator = torch.Generator().manual_seed(seed)
        self.offset = 0.0

    @property
    def active(self) -> bool:
        return self._mode is not None

    def begin(self) -> None:
        if self._mode is not None:
            return
        self.results = {}
        self.seconds = 0.0
        self.offset = self.draw()
        self._mode = _Interceptor(self)
        self._mode.__enter__()

    def draw(self) -> float:
        """A position in [0, 1) from the probe's generator (a CPU tensor: no device sync)."""
        return float(torch.rand((), generator=self.generator))

    def end(self) -> dict[str, torch.Tensor]:
        if self._mode is not None:
            mode, self._mode = self._mode, None
            mode.__exit__(None, None, None)
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

    def _measure(self, func, args: tuple, kwargs: dict) -> None:
        t0 = time.perf_counter()
        try:
            if func is _MHA:
                query = kwargs.get("query", args[0] if args else None)
                with _exact(query.device.type):  # the projections too, not only the logits
                    stats = _mha_stats(args, kwargs, self.rows, self.batch, self.offset)
            else:
                stats = _sdpa_stats(args, kwargs, self.rows, self.batch, self.offset)
            self.record(self._layer(), stats)
        except Exception as e:  # the probe never breaks a forward pass
            if self.on_error is not None:
                self.on_error("attention probe", e)
        finally:
            self.seconds += time.perf_counter() - t0


MOVED_LOGIT = 5.0  # max logit above which doubling since the last sample counts as movement
MOVED_ENTROPY = 0.1  # a fall of the entropy ratio this large since the last sample counts as movement


class ProbeSchedule:
    """Which optimizer steps to probe, with the interval kept within the probe's share of the time.

    Steps are probed every `every` steps (aligned to multiples of it). After each probe its measured
    cost is set against the time it is amortised over, interval x typical step time: above `budget`
    the interval doubles (up to `max_every`) until it fits; below a quarter of the budget it halves
    back towards `every`. The typical step time is a running median-like EMA of unprobed steps.

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
        self.off: str | None = None  # why probing stopped for good
        self._over = 0  # probes in a row over budget at max_every
        self._last: dict[str, dict[str, float]] = {}

    def due(self, step: int) -> bool:
        return step >= self.next

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
        if self.off:
            return False
        """A sample's statistics (publisher thread). When a layer's max logit doubled (and is above
        `MOVED_LOGIT`) or its entropy ratio fell by `MOVED_ENTROPY` since the last sample, or a value
        is not finite, the next probe comes `every` steps after this one whatever the budget says:
        the budget is an average, spent where attention is moving."""
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
        if moved:
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
