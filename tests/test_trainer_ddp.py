"""The reference trainer under DDP: real torchrun, two gloo ranks on CPU, no mocks.

Run as a script under torchrun, this module is also the worker of the in-depth tests: each rank
trains with `train()` and writes what it saw (batch indices, per-step parameter hashes, time spent
before fetching each batch) to OUT/rank<r>.json.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

STEPS, ACCUM = 30, 2  # the healthy 2-rank runs: tiny preset, 30 steps of 2 micro-batches per rank


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _monitor(*args: str) -> list[str]:
    return [sys.executable, "-m", "monitor.cli.app", *args]


def _worker_run(out: Path, timeout: float = 120, **overrides) -> dict[int, dict]:
    from monitor.trainer.launch import torchrun_command

    out.mkdir(parents=True, exist_ok=True)
    cmd = torchrun_command(2, [__file__, str(out), json.dumps(overrides)])
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {r: json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)}


# --- a monitored 2-rank run through the CLI --------------------------------------------------------


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """`monitor train --nproc 2`, watching targets.json while it runs."""
    tmp = tmp_path_factory.mktemp("cli")
    run_dir, ckpt = tmp / "run", tmp / "ckpt"
    cmd = _monitor("train", "--nproc", "2", "--preset", "tiny", "--steps", str(STEPS), "--grad-accum", str(ACCUM),
                   "--run-dir", str(run_dir), "--checkpoint-dir", str(ckpt), "--no-progress")
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    live_targets = 0
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            live_targets = max(live_targets, len(json.loads((run_dir / "targets.json").read_text())))
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    stdout, stderr = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
    return {"rc": proc.returncode, "stdout": stdout, "stderr": stderr, "run_dir": run_dir, "ckpt": ckpt,
            "live_targets": live_targets}


def test_nproc_2_shares_one_run_dir(cli_run):
    assert cli_run["rc"] == 0, cli_run["stderr"][-3000:]
    run_dir = cli_run["run_dir"]
    info = json.loads((run_dir / "run.json").read_text())
    assert info["world_size"] == 2
    assert sorted(e["rank"] for e in info["endpoints"]) == [0, 1]
    assert cli_run["live_targets"] == 2  # both ranks were scrape targets while they trained
    assert json.loads((run_dir / "targets.json").read_text()) == []  # and are gone once they stopped
    assert len(list(run_dir.glob("events.out.tfevents.*"))) == 1  # rank 0's, at top level
    assert len(list((run_dir / "rank1").glob("events.out.tfevents.*"))) == 1
    assert not (run_dir / "rank0").exists()
    # Only rank 0 reports: one progress summary, one "where to look", one launch line.
    assert cli_run["stdout"].count("Where to look:") == 1
    assert cli_run["stderr"].count("launching 2 ranks with torchrun; run dir") == 1
    # Checkpoints come from rank 0 only: one final file, nothing half-written.
    assert sorted(p.name for p in cli_run["ckpt"].iterdir()) == [f"ckpt_{STEPS:07d}.pt"]


def test_ddp_run_is_deterministic_and_the_monitor_changes_no_bits(cli_run, workers):
    """The unmonitored worker run of the same config ends with bitwise the CLI run's parameters."""
    import torch

    assert cli_run["rc"] == 0, cli_run["stderr"][-3000:]
    monitored = torch.load(cli_run["ckpt"] / f"ckpt_{STEPS:07d}.pt", weights_only=True)
    plain = torch.load(workers["ckpt"] / f"ckpt_{STEPS:07d}.pt", weights_only=True)
    assert monitored["model"].keys() == plain["model"].keys()
    assert all(torch.equal(monitored["model"][k], plain["model"][k]) for k in plain["model"])
    assert len(plain["rng_ranks"]) == 2
    assert plain["config"]["grad_accum"] == ACCUM and plain["config"]["max_steps"] == STEPS


# --- the worker runs: what each rank did -----------------------------------------------------------


@pytest.fixture(scope="module")
def workers(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("workers")
    ranks = _worker_run(tmp / "out", max_steps=STEPS, grad_accum=ACCUM, checkpoint_dir=str(tmp / "ckpt"))
    return {"ranks": ranks, "ckpt": tmp / "ckpt"}


def test_each_rank_takes_its_own_batches_and_together_the_single_process_stream(workers):
    r0, r1 = workers["ranks"][0], workers["ranks"][1]
    assert (r0["rank"], r0["world_size"], r1["rank"], r1["world_size"]) == (0, 2, 1, 2)
    # rank r of W takes batch (step * grad_accum + micro) * W + r
    for r, rec in ((0, r0), (1, r1)):
        assert rec["indices"] == [(s * ACCUM + m) * 2 + r for s in range(STEPS) for m in range(ACCUM)]
    assert sorted(r0["indices"] + r1["indices"]) == list(range(STEPS * ACCUM * 2))
    assert r0["losses"][0] != r1["losses"][0]  # different data, different losses


def test_ranks_stay_in_sync_and_match_the_single_process_run(workers):
    """Gradients averaged over 2 ranks x 2 micro-batches = one process accumulating the same 4
    batches: the rank-mean loss follows the single-process grad_accum=4 run (up to summation order)."""
    from monitor.trainer import TrainConfig, train

    r0, r1 = workers["ranks"][0], workers["ranks"][1]
    assert r0["hashes"] == r1["hashes"]  # DDP keeps the replicas bitwise identical
    single = train(TrainConfig.from_preset("tiny", max_steps=STEPS, grad_accum=2 * ACCUM),
                   attach_monitor=False, progress=False)
    mean = [(a + b) / 2 for a, b in zip(r0["losses"], r1["losses"])]
    assert mean == pytest.approx(single.losses, rel=1e-4)
    assert r0["final_hash"] == r1["final_hash"]


def test_ddp_checkpoint_resume_is_bitwise_equal_to_uninterrupted(workers, tmp_path):
    """Rank 0 writes the checkpoint (with every rank's RNG state); both ranks resume from it."""
    ckpt = str(tmp_path / "ckpt")
    first = _worker_run(tmp_path / "a", max_steps=STEPS, grad_accum=ACCUM, checkpoint_dir=ckpt, stop_after=9)
    assert [p.name for p in (tmp_path / "ckpt").iterdir()] == ["ckpt_0000010.pt"]
    assert first[0]["final_hash"] == first[1]["final_hash"]
    rest = _worker_run(tmp_path / "b", max_steps=STEPS, grad_accum=ACCUM, checkpoint_dir=ckpt, resume=True)
    assert rest[0]["indices"][0] == 10 * ACCUM * 2  # rank 0 picks up the batch stream where it stopped
    assert rest[0]["losses"] == workers["ranks"][0]["losses"][10:]
    assert rest[1]["losses"] == workers["ranks"][1]["losses"][10:]
    assert rest[0]["final_hash"] == rest[1]["final_hash"] == workers["ranks"][0]["final_hash"]


def test_ddp_desync_and_straggler_act_on_their_rank(tmp_path):
    ranks = _worker_run(tmp_path / "out", max_steps=10, faults=["ddp-desync:4", "straggler:1"])
    h0, h1 = ranks[0]["hashes"], ranks[1]["hashes"]
    assert h0[:4] == h1[:4]  # in sync before the fault's step
    assert all(a != b for a, b in zip(h0[4:], h1[4:]))  # rank 1 drifts from step 4 on, training continues
    assert len(h0) == len(h1) == 10
    w0, w1 = sorted(ranks[0]["waits"]), sorted(ranks[1]["waits"])
    assert w1[len(w1) // 2] >= 0.07  # rank 1 sleeps 80 ms before fetching each batch (a sleep never ends early)
    # rank 0 does not (it waits for rank 1 in the all-reduce instead): relative, whatever the machine's load
    assert w0[len(w0) // 2] < w1[len(w1) // 2] / 2


# --- hang ------------------------------------------------------------------------------------------


def test_hang_blocks_a_single_process_run(tmp_path):
    cmd = _monitor("train", "--preset", "tiny", "--steps", "30", "--fault", "hang:3", "--no-monitor",
                   "--set", "log_every=1")
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []

    def read() -> None:
        for line in proc.stdout:
            lines.append(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 60
        while not any("step      3/30" in line for line in lines) and time.monotonic() < deadline:
            assert proc.poll() is None, "".join(lines)
            time.sleep(0.05)
        assert any("step      3/30" in line for line in lines), "".join(lines)  # steps 0..2 ran
        time.sleep(2.0)  # a tiny step takes milliseconds: step 3 would long be done
        assert proc.poll() is None, "".join(lines)  # still blocked
    finally:
        proc.kill()
        proc.wait()
        reader.join(timeout=5)
    out = "".join(lines)
    assert "step      4/30" not in out and "done:" not in out, out


def test_hang_under_ddp_stops_the_other_rank_at_the_process_group_timeout(tmp_path):
    cmd = _monitor("train", "--nproc", "2", "--preset", "tiny", "--steps", "30", "--fault", "hang:2",
                   "--no-monitor", "--no-progress", "--set", "ddp_timeout_s=3")
    t0 = time.monotonic()
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=90)
    assert proc.returncode != 0
    assert "Timed out" in proc.stderr or "timeout" in proc.stderr.lower(), proc.stderr[-3000:]
    assert time.monotonic() - t0 >= 3


# --- configuration errors, before anything starts --------------------------------------------------


@pytest.mark.parametrize("flag", ["ddp-desync", "ddp-desync:5", "straggler", "straggler:0"])
def test_ddp_faults_without_ddp_are_refused(flag):
    from typer.testing import CliRunner

    from monitor.cli.app import app
    from monitor.trainer import TrainConfig, train

    with pytest.raises(ValueError, match=rf"fault '{flag}' needs DDP \(world size > 1\).*--nproc 2"):
        train(TrainConfig(max_steps=2, faults=[flag]), attach_monitor=False, progress=False)
    res = CliRunner().invoke(app, ["train", "--fault", flag, "--no-monitor", "--no-progress"])
    assert res.exit_code == 2 and "needs DDP" in res.output


@pytest.mark.parametrize("args, match", [
    (["--fault", "straggler:2"], r"RANK 2 is not a rank of this run \(ranks 0..1\)"),
    (["--ddp-backend", "nccl"], r"nccl needs --device cuda"),
    (["--ddp-backend", "mpi"], r"ddp_backend"),
])
def test_bad_launches_fail_before_torchrun(args, match):
    from typer.testing import CliRunner

    from monitor.cli.app import app

    res = CliRunner().invoke(app, ["train", "--nproc", "2", "--no-monitor", *args])
    assert res.exit_code == 2
    assert "launching" not in res.output
    import re

    assert re.search(match, res.output), res.output


def test_new_faults_parse_with_their_defaults():
    from monitor.trainer.faults import FAULTS, check_world, parse_faults

    faults = parse_faults(["ddp-desync", "straggler", "hang:7"])
    assert [f.value for f in faults] == [50, 1, 7]
    assert FAULTS["ddp-desync"].needs_ddp and FAULTS["straggler"].needs_ddp and not FAULTS["hang"].needs_ddp
    check_world(faults, 2)
    check_world(parse_faults(["hang"]), 1)  # hang also works in one process


def test_batch_index_deals_batches_round_robin():
    from monitor.trainer.launch import batch_index

    for world, accum in [(1, 1), (2, 3), (4, 2)]:
        got = [batch_index(s, m, accum, r, world) for s in range(5) for m in range(accum) for r in range(world)]
        assert sorted(got) == list(range(5 * accum * world))
    assert [batch_index(s, m, 2) for s in range(3) for m in range(2)] == list(range(6))  # one rank: unchanged


# --- the worker (this file under torchrun) ---------------------------------------------------------


def _worker(out: Path, overrides: dict) -> None:
    import monitor.trainer.loop as loop
    from monitor.trainer import TrainConfig, train

    seen: dict[str, list] = {"indices": [], "fetch": [], "step_end": [], "hashes": []}
    real = loop.batch_index

    def recording(step, micro, grad_accum, rank=0, world_size=1):
        seen["indices"].append(real(step, micro, grad_accum, rank, world_size))
        seen["fetch"].append(time.perf_counter())
        return seen["indices"][-1]

    loop.batch_index = recording
    stop_after = overrides.pop("stop_after", None)

    def on_step(info) -> bool:
        seen["hashes"].append(loop.param_hash(info.run.model))
        seen["step_end"].append(time.perf_counter())
        return info.step == stop_after  # the same decision on every rank

    res = train(TrainConfig.from_preset("tiny", **overrides), attach_monitor=False, progress=False, on_step=on_step)
    accum = res.config.grad_accum
    # Time from the end of step s-1 to the first batch fetch of step s: where a slow input pipeline shows.
    waits = [seen["fetch"][s * accum] - seen["step_end"][s - 1] for s in range(1, res.steps)]
    (out / f"rank{res.rank}.json").write_text(json.dumps({
        "rank": res.rank, "world_size": res.world_size, "indices": seen["indices"], "losses": res.losses,
        "hashes": seen["hashes"], "waits": waits, "final_hash": res.param_hash,
    }))


if __name__ == "__main__":
    from monitor.trainer.launch import exit_rank

    _worker(Path(sys.argv[1]), json.loads(sys.argv[2]))
    exit_rank(0)  # not through interpreter finalization, where gloo can abort a finished rank
