"""Attention statistics of a call: entropy and logit statistics of a subsample, computed exactly.

For `batch` consecutive sequences at a given position in the batch, up to `rows` evenly spaced
query rows, all keys and heads, the attention softmax(q·kᵀ·scale + masks) is recomputed in
float32 under no_grad with autocast off, and four numbers are kept: the normalised entropy
(entropy / log of the visible keys) averaged over heads and its lowest head, the largest logit
and the largest probability. Statistics stay on the device (no host sync).

In two parts: `prepare` keeps what a call's statistics need (a `Call`: slices of its queries and
keys), `measure_calls` computes them, calls of one shape together, their tensors stacked along a
first dimension: the same few dozen tensor ops for all the layers of a forward, not for each.

Used by the probe (hooks/attention.py), which reads the arguments of F.scaled_dot_product_attention
and F.multi_head_attention_forward calls, and by `Monitor.observe_attention` (hooks/sampler.py).
"""

from __future__ import annotations

import contextlib
import math
import numbers
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

STATS = ("entropy_ratio", "entropy_min", "max_logit", "max_prob")

# Mask kinds: "keep" (bool, True = the key takes part: SDPA), "drop" (bool, True = masked out: MHA,
# key_padding_mask), "add" (float, added to the logits).
Mask = tuple[torch.Tensor, str]

# Additive masks write "masked" as a large negative number rather than -inf (Hugging Face uses the
# dtype's minimum, BERT -10000): such keys are not visible, so they don't count in log(visible keys).
MASKED_BELOW = -1e4
# Logits held at once, per chunk of heads: bounds the probe's memory on long sequences.
CHUNK_ELEMENTS = 1 << 24
# On CPU, calls measured together hold at most this many logits: past it the ops' fixed cost is small
# beside their work, and larger tensors fall out of the caches (measuring them together got slower).
BATCH_ELEMENTS = 1 << 16


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


def exact(device_type: str) -> contextlib.AbstractContextManager:
    """no_grad with autocast off: inside an autocast region the recomputed projections and logits
    would otherwise be fp16/bf16 again (and overflow where the model's fused kernel does not).
    Nothing stays entered when it raises (a device type autocast does not know: meta): a no_grad left
    on would turn off autograd in the training loop."""
    stack = contextlib.ExitStack()
    try:
        stack.enter_context(torch.no_grad())
        if torch.is_autocast_enabled(device_type):
            stack.enter_context(torch.autocast(device_type, enabled=False))
    except BaseException:
        stack.close()
        raise
    return stack


class Call(NamedTuple):
    """One attention call, kept to be measured: the probed sequences and query rows, in the model's dtype
    (views where they are slices), and what decides how they are measured."""

    qs: torch.Tensor | None  # (nb, heads, rows, dim)
    ks: torch.Tensor | None  # (nb, kv_heads, keys, dim)
    logits: torch.Tensor | None  # (batch, heads, queries, keys): the caller's logits instead of qs and ks
    masks: tuple[Mask, ...]  # 4-d, cut to the sequences, rows and heads when measured
    seqs: slice
    rows: torch.Tensor | None  # the query rows measured (None: all)
    is_causal: bool
    scale: Any  # a number, or a one-value tensor (SDPA takes either)
    versions: tuple[int, ...] | None  # the kept tensors' version counters: written in place since, not measured
    key: tuple  # calls with equal keys are measured together


def attention_stats(q: torch.Tensor | None, k: torch.Tensor | None, **kw: Any) -> torch.Tensor | None:
    """[entropy_ratio, entropy_min, max_logit, max_prob] of one call (arguments as `prepare`'s), computed
    exactly: float32, no autograd, autocast off."""
    t = kw.get("logits") if kw.get("logits") is not None else q
    with exact(t.device.type if isinstance(t, torch.Tensor) else "cpu"):
        call = prepare(q, k, **kw)
        return _measure([call])[0] if call is not None else None


def prepare(
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
) -> Call | None:
    """The part of an attention call that is measured, as a `Call`; None when nothing is measurable.

    q: (batch..., heads, queries, dim), k: (batch..., kv_heads, keys, dim), or `logits`
    (batch, heads, queries, keys) instead of both. `batch` consecutive sequences are measured,
    starting at `offset` (in [0, 1)) of the way through the batch, and up to `rows` evenly spaced
    query rows of them, against all keys and heads.
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
        if hk == 0 or h % hk or d == 0:
            return None
        device = q.device
    else:
        if logits.dim() == 2:
            logits = logits[None, None]
        elif logits.dim() == 3:
            logits, three_d = logits[:, None], True
        elif logits.dim() > 4:  # (batch..., heads, queries, keys), as q and k may be
            logits = logits.flatten(0, logits.dim() - 4)
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
    masks4 = tuple((_as4d(m, three_d), kind) for m, kind in masks)
    if logits is not None:
        return Call(None, None, logits, masks4, seqs, rows_idx, is_causal, 1.0, _versions(logits), (id(logits),))
    qs = q.detach()[seqs]  # kept without autograd history (detach shares the version counter)
    if rows_idx is not None:
        qs = qs.index_select(2, rows_idx)
    ks = k.detach()[seqs]
    sc = scale if scale is not None else 1.0 / math.sqrt(d)
    # Equal shapes, dtypes, masks (the same tensors), scale, rows and sequences: one computation for all.
    key = (tuple(qs.shape), tuple(ks.shape), qs.dtype, ks.dtype, device, lq, is_causal,
           sc if isinstance(sc, (int, float)) else id(sc), start, three_d, tuple((id(m), kind) for m, kind in masks))
    return Call(qs, ks, None, masks4, seqs, rows_idx, is_causal, sc, _versions(qs, ks), key)


def _versions(*tensors: torch.Tensor) -> tuple[int, ...] | None:
    try:
        return tuple(t._version for t in tensors)
    except RuntimeError:  # inference tensors keep no version counter (nor can they be written outside it)
        return None


def measure_calls(calls: list[Call]) -> list[torch.Tensor | None]:
    """Each call's statistics (None: written in place since it was kept, so not what the model saw), calls
    of one key together, as many at a time as BATCH_ELEMENTS allows; on the calls' device, exactly."""
    out: list[torch.Tensor | None] = [None] * len(calls)
    groups: dict[tuple, list[int]] = {}
    for i, c in enumerate(calls):
        src = (c.qs, c.ks) if c.logits is None else (c.logits,)
        if c.versions is None or _versions(*src) == c.versions:
            groups.setdefault(c.key, []).append(i)
    for idx in groups.values():
        c = calls[idx[0]]
        if c.logits is None:
            size = c.qs.shape[0] * c.qs.shape[1] * c.qs.shape[2] * c.ks.shape[2]  # logits of one call
            device = c.qs.device
        else:
            size, device = BATCH_ELEMENTS, c.logits.device
        n = max(1, BATCH_ELEMENTS // size) if device.type == "cpu" else max(1, CHUNK_ELEMENTS // size)
        with exact(device.type):
            for j in range(0, len(idx), n):
                part = idx[j:j + n]
                for i, stats in zip(part, _measure([calls[i] for i in part])):
                    out[i] = stats
    return out


def _measure(calls: list[Call]) -> torch.Tensor:
    """(len(calls), 4): [entropy_ratio, entropy_min, max_logit, max_prob] of calls of one key.

    The attention softmax(q·kᵀ·scale + masks) in float32. Grouped-query attention (fewer key heads)
    repeats them as SDPA's enable_gqa does. The ratio is the entropy of a row over log of its visible
    keys (1: uniform, 0: one-hot), averaged over rows and sequences per head; `entropy_ratio` is the
    mean over heads and `entropy_min` the lowest head. Rows with a single visible key have no choice
    to make and are left out. Every tensor carries the calls as its first dimension.
    """
    c = calls[0]
    rows_idx, seqs, masks4, is_causal = c.rows, c.seqs, c.masks, c.is_causal
    if c.logits is None:
        q = torch.stack([x.qs for x in calls]) if len(calls) > 1 else c.qs[None]
        k = torch.stack([x.ks for x in calls]) if len(calls) > 1 else c.ks[None]
        q, k = q.float(), k.float()
        nb, h, nrows, _ = c.qs.shape
        lk = c.ks.shape[2]
        if h > k.shape[2]:  # grouped-query attention: query head i reads key head i // group
            k = k.repeat_interleave(h // k.shape[2], dim=2)
        device = q.device
    else:
        _, h, lq, lk = c.logits.shape
        nb = seqs.stop - seqs.start
        nrows = rows_idx.numel() if rows_idx is not None else lq
        device = c.logits.device
    visible0 = torch.ones((nrows, lk), dtype=torch.bool, device=device)
    if is_causal:  # SDPA's is_causal: the top-left aligned lower triangle
        qi = rows_idx if rows_idx is not None else torch.arange(nrows, device=device)
        visible0 = torch.arange(lk, device=device)[None, :] <= qi[:, None]
    hc = max(1, min(h, CHUNK_ELEMENTS // max(1, len(calls) * nb * nrows * lk)))
    ent_sum, ent_n, maxes, pmaxes, nans = [], [], [], [], []
    for h0 in range(0, h, hc):
        heads = slice(h0, min(h, h0 + hc))
        if c.logits is None:
            lg = torch.matmul(q[:, :, heads], k[:, :, heads].transpose(-1, -2)) * c.scale
        else:
            lg = c.logits[seqs, heads]
            if rows_idx is not None:
                lg = lg.index_select(2, rows_idx)
            lg = lg.float()[None]
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
        if masks4 or c.logits is not None:
            # -inf may come from an additive mask or the caller's logits: such keys are not visible.
            # NaN logits (a diverged run) must still make max_logit NaN once masked away here.
            nans.append(lg.isnan().flatten(1).any(1))
            visible = visible & (lg > float("-inf"))
        if not (visible is visible0 and not is_causal):
            lg = lg.masked_fill(~visible, float("-inf"))
        top = lg.amax(-1, keepdim=True)
        maxes.append(top.flatten(1).amax(1))  # NaN propagates; -inf where nothing is visible
        # Entropy from logits shifted by their row maximum: H = log Z - sum(e * s) / Z with s = lg -
        # max <= 0 and e = exp(s), without the cancellation of log Z - sum(p * lg) when logits are
        # large and H small. The largest probability of a row is exp(0) / Z. Hidden keys give
        # e * s = 0 * -inf = NaN, which nansum skips (rows without a visible key are left out below).
        sh = lg - top
        e = sh.exp()
        z = e.sum(-1)
        entropy = z.log() - (e * sh).nansum(-1) / z  # (calls, nb, hc, rows)
        n_visible = visible.sum(-1)  # (rows,) when broadcast, else (calls, nb, hc, rows)
        unusable = (n_visible < 2).expand(entropy.shape)  # one visible key: nothing to choose
        ratio = (entropy / n_visible.clamp(min=2).log()).masked_fill(unusable, 0.0)
        ent_sum.append(ratio.sum(dim=(1, 3)))
        ent_n.append(entropy.shape[1] * entropy.shape[3] - unusable.sum(dim=(1, 3)))
        pmaxes.append(z.reciprocal().masked_fill(unusable, 0.0).flatten(1).amax(1))
    n = torch.cat(ent_n, dim=1)  # (calls, heads)
    if len(maxes) > 1:
        max_logit, max_prob = torch.stack(maxes, 1).amax(1), torch.stack(pmaxes, 1).amax(1)
    else:
        max_logit, max_prob = maxes[0], pmaxes[0]
    if nans:
        max_logit = max_logit.masked_fill(torch.stack(nans, 1).any(1), float("nan"))
    # Heads with no usable row (everything masked) are left out of the mean and the minimum; with
    # none at all both are NaN.
    per_head = torch.cat(ent_sum, dim=1) / n
    none = n == 0
    mean = per_head.masked_fill(none, 0.0).sum(1) / (h - none.sum(1))
    low = per_head.masked_fill(none, float("inf")).amin(1)
    return torch.stack([mean, low.masked_fill(low == float("inf"), float("nan")), max_logit, max_prob], dim=1)


def mha_call(args: tuple, kwargs: dict, rows: int, batch: int, offset: float = 0.0) -> Call | None:
    """One F.multi_head_attention_forward call, prepared from its packed or separate projections (computed
    now, in float32: call under `exact`)."""
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
    return prepare(q, k, masks=masks, is_causal=bool(a.get("is_causal")) and am is None, rows=rows, batch=nb)


def scale_ok(scale: Any) -> bool:
    """Whether `scale` is what SDPA takes: None, a number (not a bool) or a one-value tensor."""
    return scale is None or (not isinstance(scale, bool) and isinstance(scale, (numbers.Real, torch.Tensor))
                             and not (isinstance(scale, torch.Tensor) and scale.numel() != 1))


def unmeasurable(q: torch.Tensor | None, k: torch.Tensor | None, logits: torch.Tensor | None,
                 mask: torch.Tensor | None, scale: Any = None) -> str | None:
    """Why the tensors of one reported attention call (`mon.observe_attention`) are not what SDPA takes,
    or None. Measuring them anyway would be a guess (a batch or head count read from the wrong dimension,
    a complex value cast to real): the caller is told instead. Reads shapes only (no device sync)."""
    def dense_float(name: str, t: torch.Tensor) -> str | None:
        if t.layout != torch.strided or t.device.type == "meta":
            return f"`{name}` must be a dense tensor holding data, got a {t.layout} tensor on {t.device}"
        if not t.is_floating_point():
            return f"`{name}` must be a floating-point tensor, got {t.dtype}"
        return None

    if not scale_ok(scale):
        return f"`scale` must be a number or None, got {type(scale).__name__}"
    if logits is not None:
        shape = tuple(logits.shape)
        if (why := dense_float("logits", logits)) or logits.dim() < 2:
            return why or f"`logits` must be (batch, heads, queries, keys), got shape {list(shape)}"
        lead, rest = shape[:-2], shape[-2:]
    else:
        if q is None or k is None:
            return "pass `q` and `k` tensors, or `logits`"
        if why := dense_float("q", q) or dense_float("k", k):
            return why
        qs, ks = tuple(q.shape), tuple(k.shape)
        bad = (q.dim() < 2 or q.dim() != k.dim() or qs[:-3] != ks[:-3] or qs[-1] != ks[-1]
               or q.dim() == 3 and qs[0] != ks[0] or q.dim() >= 4 and (ks[-3] == 0 or qs[-3] % ks[-3]))
        if bad:
            return (f"`q` {list(qs)} and `k` {list(ks)} are not (batch, heads, queries, dim) and (batch, kv_heads, "
                    "keys, dim) with the same batch and dim and heads a multiple of kv_heads")
        lead, rest = qs[:-2], (qs[-2], ks[-2])
    if mask is None:
        return None
    if mask.layout != torch.strided or mask.device.type == "meta" or not (
            mask.dtype == torch.bool or mask.is_floating_point()):
        return f"`mask` must be a dense bool or floating-point tensor, got {mask.dtype} ({mask.layout})"
    full = (math.prod(lead[:-1]) if len(lead) > 1 else 1 if not lead else lead[0],
            lead[-1] if len(lead) > 1 else 1, *rest)
    m4 = tuple(_as4d(mask, len(lead) == 1).shape) if mask.dim() <= 4 else tuple(mask.shape)
    try:
        fits = torch.broadcast_shapes(m4, full) == full
    except RuntimeError:
        fits = False
    return None if fits else (f"`mask` of shape {list(mask.shape)} does not broadcast to the attention's (batch, "
                              f"heads, queries, keys) {list(full)}")


def sdpa_masks(mask: torch.Tensor | None) -> list[Mask]:
    """SDPA's attn_mask as a mask list: bool (True = may attend) or float (added to the logits)."""
    return [(mask, "keep" if mask.dtype == torch.bool else "add")] if mask is not None else []


def sdpa_call(args: tuple, kwargs: dict, rows: int, batch: int, offset: float = 0.0) -> Call | None:
    """One F.scaled_dot_product_attention call, prepared."""
    q, k = kwargs.get("query", args[0] if args else None), kwargs.get("key", args[1] if len(args) > 1 else None)
    mask = kwargs.get("attn_mask", args[3] if len(args) > 3 else None)
    is_causal = kwargs.get("is_causal", args[5] if len(args) > 5 else False)
    scale = kwargs.get("scale", args[6] if len(args) > 6 else None)
    return prepare(q, k, masks=sdpa_masks(mask), is_causal=bool(is_causal), scale=scale, rows=rows, batch=batch,
                   offset=offset)
