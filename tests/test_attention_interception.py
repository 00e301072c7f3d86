"""How the probe sees a forward's attention calls, and measures them together.

The first probe enters a TorchFunctionMode (every call seen, however the model reached the function) and
counts the calls; later ones wrap torch.nn.functional's two functions for the forward's duration, and
go back to the mode for good when they see fewer calls. The calls kept are measured at the forward's
end, those of one shape together: the numbers are those of each call measured alone.
"""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.functional import scaled_dot_product_attention as bound_sdpa

from monitor.hooks.attention import AttentionProbe
from monitor.hooks.attention_math import attention_stats


class Stack(nn.Module):
    """`n` causal self-attention layers (SDPA), the last `bound` of them calling SDPA through a name bound at
    import, which only the mode sees; one nn.MultiheadAttention layer after them."""

    def __init__(self, n: int = 4, bound: int = 0, dim: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.heads, self.bound = heads, bound
        self.qkv = nn.ModuleList([nn.Linear(dim, 3 * dim) for _ in range(n)])
        self.mha = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.seen: list[tuple[torch.Tensor, torch.Tensor]] = []  # each SDPA layer's q and k, for the reference

    def forward(self, x):
        b, t, d = x.shape
        for i, proj in enumerate(self.qkv):
            q, k, v = proj(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
            self.seen.append((q.detach().clone(), k.detach().clone()))
            sdpa = bound_sdpa if i >= len(self.qkv) - self.bound else F.scaled_dot_product_attention
            x = x + sdpa(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
        y, _ = self.mha(x, x, x, need_weights=False)
        return y.sum()


def _probe(model: nn.Module) -> AttentionProbe:
    return AttentionProbe({id(m): n for n, m in model.named_modules()}, batch=2)


def _probed(probe: AttentionProbe, model: Stack, x: torch.Tensor) -> tuple[dict, bool, torch.Tensor]:
    """One probed forward: (results, whether it ran under the mode, the output)."""
    model.seen.clear()
    probe.begin()
    mode = probe._mode is not None
    try:
        out = model(x)
    finally:
        results = probe.end()
    return results, mode, out


def test_later_probes_wrap_the_functions_and_measure_what_the_mode_does():
    torch.manual_seed(0)
    model, x = Stack(), torch.randn(2, 6, 16)  # two sequences: both measured whatever the offset
    probe = _probe(model)
    first, mode1, out1 = _probed(probe, model, x)
    second, mode2, out2 = _probed(probe, model, x)
    assert (mode1, mode2) == (True, False) and probe.mode_calls == 5
    assert set(first) == set(second) == {"model", "model#2", "model#3", "model#4", "mha"}  # MHA's SDPA not again
    assert all(torch.equal(first[n], second[n]) for n in first)
    assert torch.equal(out1, out2) and torch.equal(out1, model(x))  # the forward itself is untouched
    assert F.scaled_dot_product_attention is torch._C._nn.scaled_dot_product_attention  # put back
    assert F.multi_head_attention_forward.__module__ == "torch.nn.functional"
    probe.results = {}
    model(x)
    assert probe.results == {}  # nothing installed outside begin()/end()


def test_calls_measured_together_equal_each_call_measured_alone():
    torch.manual_seed(1)
    model, x = Stack(n=6), torch.randn(3, 80, 16)  # more queries than the probe's 64 rows
    probe = _probe(model)
    for _ in range(2):  # under the mode, then wrapped
        results, _, _ = _probed(probe, model, x)
        names = ["model"] + [f"model#{i}" for i in range(2, 7)]
        for name, (q, k) in zip(names, model.seen):
            alone = attention_stats(q, k, is_causal=True, batch=2, offset=probe.offset)
            assert torch.equal(results[name], alone), name


def test_a_model_that_binds_the_function_under_another_name_goes_back_to_the_mode():
    torch.manual_seed(2)
    model, x = Stack(n=3, bound=1), torch.randn(2, 5, 16)
    probe = _probe(model)
    modes, counts = [], []
    for _ in range(3):
        results, mode, _ = _probed(probe, model, x)
        modes.append(mode)
        counts.append(len(results))
    assert modes == [True, False, True] and counts == [4, 3, 4]  # the wrapped probe missed the bound call
    assert not probe.wrapping
    _, mode, _ = _probed(probe, model, x)
    assert mode is True  # for good


def test_another_threads_calls_are_not_measured_and_another_librarys_replacement_is_kept(monkeypatch):
    torch.manual_seed(3)
    model, x = Stack(n=2), torch.randn(2, 5, 16)
    probe = _probe(model)
    _probed(probe, model, x)  # the mode's probe: the next one wraps
    calls = []

    def replacement(*args, **kwargs):  # a library's own SDPA, installed before the probe
        calls.append(threading.get_ident())
        return torch._C._nn.scaled_dot_product_attention(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", replacement)
    q = torch.randn(1, 2, 4, 8)
    other = threading.Thread(target=lambda: F.scaled_dot_product_attention(q, q, q))
    probe.begin()
    try:
        other.start()
        other.join()
        model(x)
    finally:
        results = probe.end()
    assert set(results) == {"model", "model#2", "mha"}  # the other thread's call is not among them
    # Called through (the other thread, the two layers, MHA inside), then put back.
    assert len(calls) == 4 and F.scaled_dot_product_attention is replacement


def test_a_kept_call_written_in_place_before_the_forward_ends_is_left_out():
    probe = AttentionProbe({}, batch=2)
    q = torch.randn(2, 2, 5, 8)
    k = torch.randn(2, 2, 5, 8)
    probe.begin()
    try:
        F.scaled_dot_product_attention(q, k, k)
        k.mul_(2)  # what the probe kept is no longer what the call saw
        F.scaled_dot_product_attention(q, k, k)
    finally:
        results = probe.end()
    assert list(results) == ["attention"]  # only the second call, whose tensors are as they were
    assert torch.equal(results["attention"], attention_stats(q, k, batch=2, offset=probe.offset))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_calls_measured_together_are_measured_in_float32(dtype):
    torch.manual_seed(4)
    model, x = Stack(n=3).to(dtype), torch.randn(2, 5, 16, dtype=dtype)
    probe = _probe(model)
    results, _, _ = _probed(probe, model, x)
    assert all(r.dtype == torch.float32 for r in results.values())
    q, k = model.seen[0]
    assert torch.equal(results["model"], attention_stats(q, k, is_causal=True, batch=2, offset=probe.offset))


def test_two_threads_probing_at_once_each_see_their_own_calls():
    """Two monitored models trained in two threads: the wrappers go in with the first probe, out with the
    last, and each probe keeps its own thread's calls."""
    torch.manual_seed(5)
    models = [Stack(n=2), Stack(n=3)]
    probes = [_probe(m) for m in models]
    x = torch.randn(2, 5, 16)
    for p, m in zip(probes, models):
        _probed(p, m, x)  # the mode's probes: the next ones wrap
    inside = threading.Barrier(2)
    done: dict[int, dict] = {}

    def train(i: int) -> None:
        probes[i].begin()
        try:
            inside.wait(timeout=30)  # both probes begun before either forward
            models[i](x)
            inside.wait(timeout=30)  # both forwards done before either probe ends
        finally:
            done[i] = probes[i].end()

    threads = [threading.Thread(target=train, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert set(done[0]) == {"model", "model#2", "mha"} and set(done[1]) == {"model", "model#2", "model#3", "mha"}
    assert all(not p.active for p in probes)
    assert F.scaled_dot_product_attention is torch._C._nn.scaled_dot_product_attention


def test_a_probe_ended_on_another_thread_takes_its_wrappers_out():
    """A close at exit (SIGTERM's thread) ends a probe whose forward never ended on the training thread."""
    model, x = Stack(n=1), torch.randn(2, 5, 16)
    probe = _probe(model)
    _probed(probe, model, x)
    probe.begin()
    assert F.scaled_dot_product_attention is not torch._C._nn.scaled_dot_product_attention  # wrapped
    closer = threading.Thread(target=probe.end)
    closer.start()
    closer.join(timeout=30)
    assert not probe.active and F.scaled_dot_product_attention is torch._C._nn.scaled_dot_product_attention
