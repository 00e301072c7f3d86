"""The attention probe's numbers against an independent full computation.

The reference weights come from torch itself: SDPA with an identity matrix as values returns its
own attention weights, and nn.MultiheadAttention returns per-head weights with need_weights=True.
Entropy ratio, lowest head, max logit and max probability are then computed naively in float64
over every row and sequence.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from monitor.hooks import attention_math as att
from monitor.hooks.attention import AttentionProbe
from monitor.hooks.attention_math import attention_stats


def _reference(weights: torch.Tensor, logits: torch.Tensor) -> list[float]:
    """[entropy_ratio, entropy_min, max_logit, max_prob] from full weights (b, h, q, k), float64."""
    w = weights.double()
    visible = w > 0
    b, h, lq, _ = w.shape
    per_head = []
    max_prob = 0.0
    for hh in range(h):
        ratios = []
        for bb in range(b):
            for i in range(lq):
                n = int(visible[bb, hh, i].sum())
                if n < 2:
                    continue
                p = w[bb, hh, i][visible[bb, hh, i]]
                ratios.append(float(-(p * p.log()).sum()) / math.log(n))
                max_prob = max(max_prob, float(p.max()))
        if ratios:
            per_head.append(sum(ratios) / len(ratios))
    max_logit = float(logits.detach().double().masked_fill(~visible, float("-inf")).max())
    return [sum(per_head) / len(per_head), min(per_head), max_logit, max_prob]


def _sdpa_weights(q, k, mask=None, is_causal=False, scale=None, gqa=False):
    """SDPA's own attention weights: its output when the values are the identity."""
    lk = k.shape[-2]
    eye = torch.eye(lk, dtype=torch.float64).expand(*k.shape[:-2], lk, lk)
    return F.scaled_dot_product_attention(q.double(), k.double(), eye, attn_mask=mask, is_causal=is_causal,
                                          scale=scale, enable_gqa=gqa)


def _raw_logits(q, k, scale=None, additive=None):
    if k.shape[-3] != q.shape[-3]:
        k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)
    sc = scale if scale is not None else 1 / math.sqrt(q.shape[-1])
    lg = torch.einsum("bhqd,bhkd->bhqk", q.double(), k.double()) * sc
    return lg + additive.double() if additive is not None else lg


def _close(got: torch.Tensor, want: list[float]) -> None:
    assert got is not None
    assert got.tolist() == pytest.approx(want, rel=1e-4, abs=1e-5)


def _qk(b=2, h=4, lq=9, lk=9, d=8, hk=None, seed=0, gain=1.0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, lq, d, generator=g) * gain
    k = torch.randn(b, hk or h, lk, d, generator=g) * gain
    return q, k


def _bool_mask(b, lq, lk, seed=1):
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(b, 1, lq, lk, generator=g) > 0.4
    m[..., 0] = True  # every row sees at least one key
    return m


CASES = {
    "plain": {},
    "causal": {"is_causal": True},
    "causal, fewer queries than keys": {"is_causal": True, "lq": 5, "lk": 9},
    "scale": {"scale": 0.9},
    "bool mask": {"mask": "bool"},
    "additive -inf mask": {"mask": "-inf"},
    "additive dtype-min mask (Hugging Face)": {"mask": "min"},
    "additive bias (ALiBi-like)": {"mask": "bias"},
    "grouped-query": {"hk": 2, "gqa": True},
    "grouped-query, causal, scaled": {"hk": 1, "gqa": True, "is_causal": True, "scale": 0.5},
    "sharp": {"gain": 4.0},
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_sdpa_statistics_equal_a_full_softmax(case):
    c = dict(CASES[case])
    lq, lk = c.pop("lq", 9), c.pop("lk", 9)
    q, k = _qk(lq=lq, lk=lk, hk=c.pop("hk", None), gain=c.pop("gain", 1.0))
    kind = c.pop("mask", None)
    mask = additive = None
    masks = []
    if kind == "bool":
        mask = _bool_mask(2, lq, lk)
        masks = [(mask, "keep")]
    elif kind is not None:
        keep = _bool_mask(2, lq, lk)
        fill = {"-inf": float("-inf"), "min": torch.finfo(torch.float32).min, "bias": -3.0}[kind]
        mask = additive = torch.zeros(2, 1, lq, lk).masked_fill(~keep, fill)
        masks = [(mask, "add")]
    weights = _sdpa_weights(q, k, mask=mask, is_causal=c.get("is_causal", False), scale=c.get("scale"),
                            gqa=c.get("gqa", False))
    want = _reference(weights, _raw_logits(q, k, c.get("scale"), additive if kind == "bias" else None))
    got = attention_stats(q, k, masks=masks, is_causal=c.get("is_causal", False), scale=c.get("scale"),
                          rows=64, batch=8)
    _close(got, want)


def test_logits_api_and_three_dim_inputs_equal_the_reference():
    q, k = _qk(b=3, h=1)
    logits = _raw_logits(q, k)
    want = _reference(torch.softmax(logits, -1), logits)
    _close(attention_stats(None, None, logits=logits.float(), batch=8), want)
    _close(attention_stats(q[:, 0], k[:, 0], batch=8), want)  # (batch, queries, dim): one head
    bool_mask = _bool_mask(3, 9, 9)[:, 0]  # (batch, queries, keys) beside 3-d q/k
    w = _sdpa_weights(q, k, mask=bool_mask[:, None])
    _close(attention_stats(q[:, 0], k[:, 0], masks=[(bool_mask, "keep")], batch=8), _reference(w, logits))


def test_subsampled_rows_and_sequences_equal_the_reference_on_those_rows():
    q, k = _qk(b=5, h=3, lq=200, lk=200, d=4, seed=3)
    got = attention_stats(q, k, is_causal=True, rows=16, batch=2)
    rows = torch.linspace(0, 199, 16).round().long()
    weights = _sdpa_weights(q, k, is_causal=True)[:2].index_select(2, rows)
    logits = _raw_logits(q, k)[:2].index_select(2, rows)
    _close(got, _reference(weights, logits))


def test_heads_in_chunks_give_the_same_numbers(monkeypatch):
    q, k = _qk(b=2, h=6, hk=3, lq=20, lk=20, seed=4)
    whole = attention_stats(q, k, is_causal=True, masks=[(_bool_mask(2, 20, 20), "keep")])
    monkeypatch.setattr(att, "CHUNK_ELEMENTS", 2 * 20 * 20)  # one head at a time
    chunked = attention_stats(q, k, is_causal=True, masks=[(_bool_mask(2, 20, 20), "keep")])
    assert chunked.tolist() == pytest.approx(whole.tolist(), rel=1e-6)


def test_low_precision_inputs_are_measured_in_float32():
    q, k = _qk(seed=5)
    want = attention_stats(q, k, is_causal=True)
    got = attention_stats(q.bfloat16(), k.bfloat16(), is_causal=True)
    assert got.dtype == torch.float32
    assert got.tolist() == pytest.approx(want.tolist(), rel=0.05)


def test_nothing_measurable_gives_none_or_nan():
    q, k = _qk(h=4, hk=3)
    assert attention_stats(q, k) is None  # 4 query heads cannot share 3 key heads
    assert attention_stats(torch.randn(4), torch.randn(4)) is None
    one_key = attention_stats(*_qk(lq=3, lk=1))  # a single key: no choice anywhere
    assert math.isnan(one_key[0]) and math.isnan(one_key[1])


def _mha_reference(mha: nn.MultiheadAttention, x, **kw):
    mha.eval()  # need_weights returns the per-head weights of this very call
    with torch.no_grad():
        _, w = mha(x, x, x, need_weights=True, average_attn_weights=False, **kw)
    mha.train()
    e = mha.embed_dim
    xb = x if mha.batch_first else x.transpose(0, 1)
    proj = F.linear(xb.double(), mha.in_proj_weight.double(), mha.in_proj_bias.double())
    q, k = proj[..., :e], proj[..., e:2 * e]
    b, length, _ = q.shape
    hd = e // mha.num_heads
    q = q.view(b, length, mha.num_heads, hd).transpose(1, 2)
    k = k.view(b, length, mha.num_heads, hd).transpose(1, 2)
    return w, _raw_logits(q, k)


@pytest.mark.slow
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("masking", ["none", "causal", "padding", "float mask"])
def test_multihead_attention_packed_projections(batch_first, masking):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=batch_first)
    x = torch.randn(3, 7, 16) if batch_first else torch.randn(7, 3, 16)
    kw = {}
    if masking == "causal":
        kw = {"attn_mask": nn.Transformer.generate_square_subsequent_mask(7), "is_causal": True}
    elif masking == "padding":
        pad = torch.zeros(3, 7, dtype=torch.bool)
        pad[1, 5:] = True
        kw = {"key_padding_mask": pad}
    elif masking == "float mask":
        kw = {"attn_mask": torch.zeros(7, 7).masked_fill(torch.eye(7, dtype=torch.bool).roll(1, 1), -2.0)}
    weights, logits = _mha_reference(mha, x, **kw)
    if masking == "float mask":
        logits = logits + kw["attn_mask"].double()
    probe = AttentionProbe({id(mha): "attn"}, batch=8)
    probe.begin()
    try:
        mha(x, x, x, need_weights=False, **kw)
    finally:
        results = probe.end()
    _close(results["attn"], _reference(weights, logits))


@pytest.mark.slow
def test_separate_projection_weights():
    torch.manual_seed(1)
    mha = nn.MultiheadAttention(8, 2, kdim=6, vdim=5, batch_first=True)
    q_in, kv = torch.randn(2, 4, 8), torch.randn(2, 6, 6)
    with torch.no_grad():
        mha.eval()
        _, w = mha(q_in, kv, torch.randn(2, 6, 5), need_weights=True, average_attn_weights=False)
        mha.train()
    q = F.linear(q_in.double(), mha.q_proj_weight.double(), mha.in_proj_bias[:8].double()).view(2, 4, 2, 4)
    k = F.linear(kv.double(), mha.k_proj_weight.double(), mha.in_proj_bias[8:16].double()).view(2, 6, 2, 4)
    logits = _raw_logits(q.transpose(1, 2), k.transpose(1, 2))
    probe = AttentionProbe({id(mha): "cross"}, batch=8)
    probe.begin()
    mha(q_in, kv, torch.randn(2, 6, 5))
    _close(probe.end()["cross"], _reference(w, logits))


class _TwoKinds(nn.Module):
    """One SDPA layer and one nn.MultiheadAttention layer, the way users mix them."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(16, 48)
        self.blocks = nn.ModuleList([nn.Module(), nn.Module()])
        self.blocks[1].mha = nn.MultiheadAttention(16, 2, batch_first=True)

    def forward(self, x):
        q, k, v = self.qkv(x).view(*x.shape[:2], 3, 2, 8).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(x.shape)
        y, _ = self.blocks[1].mha(y, y, y, need_weights=False)
        return y.sum()


def test_probe_sees_sdpa_and_mha_with_module_path_names_and_changes_nothing():
    torch.manual_seed(0)
    model = _TwoKinds()
    names = {id(m): n for n, m in model.named_modules()}
    x = torch.randn(2, 5, 16)
    plain = model(x)
    plain.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    probe = AttentionProbe(names)
    probe.begin()
    out = model(x)
    results = probe.end()
    out.backward()
    assert set(results) == {"model", "blocks.1.mha"}  # SDPA runs in the root module's own forward
    assert torch.equal(out, plain)
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
    # Nothing stays installed: a later forward is not measured.
    probe.results = {}
    model(x)
    assert probe.results == {}


@pytest.mark.parametrize("part", ["sdpa_call", "measure_calls"])  # at the call, at the forward's end
def test_errors_inside_the_probe_are_reported_and_the_forward_goes_on(monkeypatch, part):
    def broken(*args, **kwargs):
        raise ValueError("boom")

    monkeypatch.setattr(att, part, broken)
    errors = []
    probe = AttentionProbe({}, on_error=lambda where, e: errors.append((where, str(e))))
    q, k = _qk()
    probe.begin()
    try:
        out = F.scaled_dot_product_attention(q, k, k)
    finally:
        results = probe.end()
    assert torch.equal(out, F.scaled_dot_product_attention(q, k, k))
    assert errors == [("attention probe", "boom")] and results == {}


def test_nan_logits_give_a_nan_max_logit():
    q, k = _qk()
    q[0, 1, 3, 0] = float("nan")
    stats = attention_stats(q, k)
    assert math.isnan(stats[2])


def test_offset_picks_consecutive_sequences_anywhere_in_the_batch():
    q, k = _qk(b=6, seed=7)
    mask = _bool_mask(6, 9, 9)
    for offset, start in ((0.0, 0), (0.5, 2), (0.99, 4)):
        got = attention_stats(q, k, masks=[(mask, "keep")], batch=2, offset=offset)
        want = attention_stats(q[start:start + 2], k[start:start + 2], masks=[(mask[start:start + 2], "keep")],
                               batch=2)
        assert got.tolist() == want.tolist(), offset


def test_the_probe_draws_positions_from_its_own_generator():
    state = torch.get_rng_state()
    probe = AttentionProbe({}, seed=3)
    offsets = []
    for _ in range(3):
        probe.begin()
        offsets.append(probe.offset)
        probe.end()
    assert torch.equal(torch.get_rng_state(), state)  # the run's stream is untouched
    assert len(set(offsets)) == 3 and all(0 <= o < 1 for o in offsets)


def test_mha_under_autocast_is_measured_in_float32():
    torch.manual_seed(2)
    mha = nn.MultiheadAttention(16, 4, batch_first=True)
    x = torch.randn(2, 7, 16) * 3
    want_probe = AttentionProbe({id(mha): "attn"})
    want_probe.begin()
    mha(x, x, x, need_weights=False)
    want = want_probe.end()["attn"]
    probe = AttentionProbe({id(mha): "attn"})
    with torch.autocast("cpu", dtype=torch.bfloat16):
        probe.begin()
        mha(x, x, x, need_weights=False)
        got = probe.end()["attn"]
    assert got.dtype == torch.float32
    assert got.tolist() == pytest.approx(want.tolist(), rel=1e-5)  # bf16 projections would be ~1e-2 off
