"""benchmarks/gradnorm.py: its measuring function on a few small tensors, and that the pass it times is the
monitor's real one (its total bit-equal to torch's clip_grad_norm_ total). No timing is asserted."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import gradnorm as bench  # noqa: E402


def _params(dtypes: tuple[torch.dtype, ...]) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(3)
    shapes = [(17, 9), (9,), (4, 5, 3), (1,), (33,)]
    params = []
    for i, shape in enumerate(shapes):
        dtype = dtypes[i % len(dtypes)]
        p = torch.nn.Parameter(torch.zeros(shape, dtype=dtype))
        p.grad = torch.randn(shape, generator=g).to(dtype)
        params.append(p)
    return params


def test_measure_structure():
    params = _params((torch.float32,))
    r = bench.measure(params, reps=3, warmup=1)
    assert r["param_tensors"] == 5 and r["params"] == sum(p.numel() for p in params)
    assert r["grad_mb"] == pytest.approx(r["params"] * 4 / 2**20)
    assert r["floor_read"] in bench.READS
    assert r["floor_ms"] == min(r[f"{n}_ms"] for n in bench.READS)
    for n in bench.CANDIDATES:
        assert len(r["samples_ms"][n]) == 3 and all(t > 0 for t in r["samples_ms"][n])
        assert r[f"{n}_ms"] > 0 and r[f"{n}_host_ms"] > 0
    for k in ("monitor_floor", "monitor_bare", "bare_floor", "floor_gb_s"):
        assert math.isfinite(r[k]) and r[k] > 0
    assert r["starved_calls"] == 0  # CPU: no lead to outlast
    md = bench.table("cpu", {"rows": [{"preset": "t", **r}], "args": {"reps": 3, "warmup": 1}, "threads": 1,
                             "machine": {"cpus": 2, "torch": torch.__version__}, "date": "now"})
    assert len([line for line in md if line.startswith("| t |")]) == 1


@pytest.mark.parametrize("dtypes", [(torch.float32,), (torch.float32, torch.float64)], ids=["fp32", "mixed"])
def test_monitor_pass_is_torchs_total(dtypes):
    params = _params(dtypes)
    grads = [p.grad for p in params]
    calls = bench.candidates(params)
    norms = calls["monitor"]()  # the callable the benchmark times
    total = norms.total
    assert torch.equal(total, torch.nn.utils.get_total_norm(grads))
    # The norm clip_grad_norm_ returns (an infinite max_norm scales the gradients by exactly 1).
    assert torch.equal(total, torch.nn.utils.clip_grad_norm_(params, float("inf")))
    # Per-parameter norms in parameter order, each torch's norm of that gradient.
    assert norms.index is None and len(norms.per_param) == len(params)
    assert all(torch.equal(n, torch.linalg.vector_norm(g)) for n, g in zip(norms.per_param, grads))
    if len(dtypes) == 1:  # the bare kernel the benchmark times: the same norms
        assert all(torch.equal(a, b) for a, b in zip(calls["bare"](), norms.per_param))
    assert len(calls["max"]()) == len(calls["sum"]()) == len(params)
