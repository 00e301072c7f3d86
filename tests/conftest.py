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


# -- the fault table (benchmarks/faults.md) ---------------------------------------------------------

FAULTS_MD = Path(__file__).resolve().parent.parent / "benchmarks" / "faults.md"
_FAULT_ROWS: set[tuple[str, str, str]] = set()


@pytest.fixture
def fault_row():
    """`fault_row(fault, what the run did, what was lost or counted)`: one row of benchmarks/faults.md,
    recorded by a fault test once its checks passed; the table is written at the end of the session."""
    def record(fault: str, run: str, lost: str) -> None:
        _FAULT_ROWS.add((fault, run, lost))

    return record


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _table_rows(text: str) -> dict[str, str]:
    """The rows of the committed table, by fault (the first cell)."""
    rows = {}
    for line in text.splitlines()[2:]:
        if line.startswith("| ") and not line.startswith("| fault |"):
            rows[line[2:].split(" | ", 1)[0]] = line
    return rows


def pytest_terminal_summary(terminalreporter):
    """The tests skipped for want of a server binary (tests/servers.py `binary`), counted on one line."""
    from servers import NOT_FOUND

    missing: dict[str, int] = {}
    for rep in terminalreporter.stats.get("skipped", []):
        reason = rep.longrepr[2] if isinstance(rep.longrepr, tuple) else ""
        if NOT_FOUND in reason:
            name = reason.split(NOT_FOUND, 1)[0].removeprefix("Skipped: ")
            missing[name] = missing.get(name, 0) + 1
    if missing:
        terminalreporter.write_line(
            f"{sum(missing.values())} test(s) skipped, server binaries not installed: "
            + ", ".join(f"{name} ({n})" for name, n in sorted(missing.items()))
            + "; install them with `sudo scripts/provision.sh` (`make test` runs it; as root it installs them)",
            yellow=True)


def pytest_sessionfinish(session, exitstatus):
    """Rows recorded in this session replace those of the same fault; the others stay (a partial run,
    `make test-fast`, must not shrink the table)."""
    if not _FAULT_ROWS:
        return
    rows = _table_rows(FAULTS_MD.read_text(encoding="utf-8")) if FAULTS_MD.exists() else {}
    rows.update({_cell(f): f"| {_cell(f)} | {_cell(r)} | {_cell(lost)} |" for f, r, lost in _FAULT_ROWS})
    lines = ["# Faults the test suite injects", "",
             "Generated by the test suite (the tests that take the `fault_row` fixture): one row per fault a test",
             "injected for real (processes, files, sockets, environment), with what the run (or the daemon, or",
             "`monitor check`) did and what was lost or counted. Do not edit: run the tests again.", "",
             "| fault | what the run did | what was lost or counted |", "|---|---|---|"]
    lines += [rows[k] for k in sorted(rows, key=str.lower)]
    FAULTS_MD.write_text("\n".join(lines) + "\n", encoding="utf-8")
