"""Shared fixtures: a small nanoGPT-shaped model and loop that is NOT the reference trainer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

VOCAB = 32


class TinyLM(nn.Module):
    """Embedding -> LayerNorm -> Linear; forward returns (logits, loss) like nanoGPT."""

    def __init__(self, vocab: int = VOCAB, dim: int = 16) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, idx, targets=None):
        logits = self.head(self.norm(self.emb(idx)))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))
        return logits, loss


def batches(n: int, seed: int = 0, bs: int = 4, t: int = 8):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        x = torch.randint(0, VOCAB, (bs, t), generator=g)
        yield x, torch.roll(x, -1, dims=1)


@pytest.fixture
def mon_config():
    """Monitor config for tests: any free port, quiet console."""
    return {"metrics": {"port": 0}, "console": {"enabled": False}}


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """GET /metrics and parse it with prometheus_client's own parser: {(sample name, labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(url, timeout=10).read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def sample(metrics: dict, name: str, **labels) -> float:
    for (n, labs), v in metrics.items():
        if n == name and all(dict(labs).get(k) == str(val) for k, val in labels.items()):
            return v
    raise KeyError(f"{name}{labels} not in scrape: {sorted({n for n, _ in metrics})}")


def targets_url(run_dir: Path) -> str:
    targets = json.loads((Path(run_dir) / "targets.json").read_text())
    return f"http://{targets[0]['targets'][0]}/metrics"


def torchrun_worker(name: str, *args: str, nproc: int = 2, timeout: float = 300.0) -> None:
    """Run tests/workers/<name> under `torchrun --standalone` (gloo on CPU); fail with its output if it fails."""
    worker = Path(__file__).parent / "workers" / name
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), str(worker),
         *args], capture_output=True, text=True, timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
