"""Every script in examples/ runs as a user would run it (a subprocess, a few steps) and its run reads back.

The examples run two at a time in a thread pool, started when the first test of this module needs
one; each test waits for its own. Only the examples of the selected tests are run.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from monitor.runlog.reader import RunData, read_run

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
STEPS = 8
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
ENV = {
    "OMP_NUM_THREADS": "1",  # two shared cores: oversubscribed OpenMP threads slow tiny models 10-100x
    "HF_HUB_OFFLINE": "1",
    "TRAINMON_METRICS__PORT": "0",  # any free port
    "TRAINMON_ATTENTION__EVERY": "2",  # a probe every other step, whatever the cost control would choose
    "TRAINMON_ATTENTION__MAX_EVERY": "2",
}


@dataclass
class Done:
    cmd: list[str]
    out: Path
    returncode: int
    stdout: str
    stderr: str

    def why(self) -> str:
        return f"{' '.join(self.cmd)}\n--- stdout\n{self.stdout[-3000:]}\n--- stderr\n{self.stderr[-5000:]}"


def warmup_lrs(peak: float, warmup: int, start: int = 1) -> list[float]:
    return [peak * min(1.0, (k + start) / warmup) for k in range(STEPS)]


def check_raw_loop(run: RunData) -> None:
    recs = run.records[0]
    assert all(math.isfinite(r.loss) and math.isfinite(r.grad_norm) for r in recs)
    assert all(len(r.lr) == 2 and r.lr[0] == r.lr[1] for r in recs)  # two param groups, one schedule
    assert [r.lr[0] for r in recs] == pytest.approx(warmup_lrs(3e-3, 40))
    assert all(r.max_norm == 1.0 and r.micro_batches == 1 for r in recs)
    assert run.info.schedule["first_multiplier"] == pytest.approx(1 / 40)  # read from the LambdaLR at attach


def check_nanogpt_fp16(run: RunData) -> None:
    recs = run.records[0]
    assert run.info.scaler["enabled"] is True
    assert all(r.loss_scale == 65536.0 for r in recs)  # GradScaler's init_scale, no overflow at this LR
    assert all(math.isfinite(r.loss) and 4.5 < r.loss < 6.5 for r in recs)  # ~ln(256) = 5.5 at the start
    nanogpt_lr = [1e-3 * (k + 1) / 41 for k in range(STEPS)]  # get_lr: warmup_iters=40
    assert [r.lr[0] for r in recs] == pytest.approx(nanogpt_lr)
    assert all(r.micro_batches == 2 and r.tokens == 2 * 8 * 32 for r in recs)
    assert [r.step for r in recs if r.attention] == [0, 2, 4, 6]
    assert set(recs[0].attention) == {"blocks.0.attn", "blocks.1.attn"}


def check_hf_trainer(run: RunData) -> None:
    recs = run.records[0]
    assert run.path.parent.name == "trainmon"  # <output_dir>/trainmon/<run>
    assert all(math.isfinite(r.loss) for r in recs)
    assert [r.lr[0] for r in recs] == pytest.approx(warmup_lrs(1e-3, 40, start=0))  # HF warmup starts at 0
    assert all(r.micro_batches == 2 and r.max_norm == 1.0 for r in recs)
    probed = [r for r in recs if r.attention]
    assert [r.step for r in probed] == [0, 2, 4, 6]
    assert len(probed[0].attention) == 2
    assert all(0 < s["entropy_ratio"] <= 1 for s in probed[0].attention.values())


def check_lightning(run: RunData) -> None:
    recs = run.records[0]
    assert run.path.parent.name == "trainmon"  # <default_root_dir>/trainmon/<run>
    assert all(math.isfinite(r.loss) and 3.5 < r.loss < 5.0 for r in recs)  # ~ln(64) = 4.16 at the start
    assert [r.lr[0] for r in recs] == pytest.approx(warmup_lrs(1e-3, 40))
    assert all(r.micro_batches == 2 for r in recs)
    assert [r.step for r in recs if r.attention] == [0, 2, 4, 6]


def check_accelerate(run: RunData) -> None:
    recs = run.records[0]
    assert all(math.isfinite(r.loss) for r in recs)
    # One scheduler step per real optimizer step, though the loop calls scheduler.step() every micro-batch.
    assert [r.lr[0] for r in recs] == pytest.approx(warmup_lrs(3e-3, 40))
    assert all(r.micro_batches == 2 and r.max_norm == 1.0 and r.tokens == 2 * 32 * 8 for r in recs)


def check_ddp(run: RunData) -> None:
    r0, r1 = run.records[0], run.records[1]
    assert run.info.world_size == 2
    assert [r.lr[0] for r in r0] == pytest.approx(warmup_lrs(1e-3, 40))
    assert all(r.grad_norm is not None and r.micro_batches == 2 for r in r0)
    assert all(math.isfinite(r.loss) for r in r0 + r1)
    assert [a.loss for a in r0] != [b.loss for b in r1]  # each rank reports its own data's loss
    assert [r.step for r in r0 if r.attention] == [0, 2, 4, 6] and not any(r.attention for r in r1)


# case id -> (script, extra arguments, launcher, value check)
CASES = {
    "raw_loop": ("raw_loop", [], [sys.executable], check_raw_loop),
    "nanogpt_style-float16": ("nanogpt_style", ["--dtype", "float16"], [sys.executable], check_nanogpt_fp16),
    "hf_trainer": ("hf_trainer", [], [sys.executable], check_hf_trainer),
    "lightning_module": ("lightning_module", [], [sys.executable], check_lightning),
    "accelerate_loop": ("accelerate_loop", [], [sys.executable], check_accelerate),
    "ddp_torchrun": ("ddp_torchrun", [], TORCHRUN, check_ddp),
}
SLOWEST_FIRST = ["ddp_torchrun", "lightning_module", "hf_trainer", "accelerate_loop", "nanogpt_style-float16",
                 "raw_loop"]


def run_case(case: str, out: Path) -> Done:
    script, extra, launcher, _ = CASES[case]
    cmd = [*launcher, str(EXAMPLES / f"{script}.py"), "--steps", str(STEPS), "--out", str(out), *extra]
    env = {k: v for k, v in os.environ.items() if k not in ("MONITOR_RUN_DIR", "TRAINMON_CONFIG")}
    p = subprocess.run(cmd, cwd=out, capture_output=True, text=True, timeout=240, env={**env, **ENV})
    return Done(cmd, out, p.returncode, p.stdout, p.stderr)


@pytest.fixture(scope="module")
def launched(request, tmp_path_factory):
    """Starts every selected case (two at a time); returns case id -> Future[Done]."""
    here = sys.modules[__name__]
    wanted = {item.callspec.params.get("case") for item in request.session.items
              if getattr(item, "module", None) is here and hasattr(item, "callspec")}
    pool = ThreadPoolExecutor(max_workers=2)
    futures: dict[str, Future] = {}
    for case in (c for c in SLOWEST_FIRST if c in wanted):
        out = tmp_path_factory.mktemp(case)
        futures[case] = pool.submit(run_case, case, out)
    yield futures
    pool.shutdown(wait=True, cancel_futures=True)


@pytest.mark.parametrize("case", list(CASES))
def test_example_runs_and_its_run_reads_back(case, launched):
    done: Done = launched[case].result()
    assert done.returncode == 0, done.why()
    found = re.findall(r"^run directory: (.+)$", done.stdout, re.M)
    assert len(found) == 1, done.why()  # one summary (in DDP, rank 0's only)
    run_dir = Path(found[0])
    assert run_dir.is_dir() and done.out in run_dir.parents, done.why()
    assert re.search(r"^alerts: \d+$", done.stdout, re.M), done.why()
    run = read_run(run_dir)
    assert run.problems == []
    ranks = [0, 1] if case == "ddp_torchrun" else [0]
    assert sorted(run.records) == ranks
    for rank in ranks:  # one record per optimizer step, not per micro-batch
        assert [r.step for r in run.records[rank]] == list(range(STEPS)), rank
    assert run.info.max_steps == STEPS
    CASES[case][3](run)


def test_every_example_is_tested():
    scripts = {p.stem for p in EXAMPLES.glob("*.py")}
    assert scripts == {script for script, *_ in CASES.values()}
    assert set(SLOWEST_FIRST) == set(CASES)
    readme = (EXAMPLES / "README.md").read_text()
    assert all(f"[`{s}.py`]" in readme for s in scripts)
