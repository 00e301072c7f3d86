"""The detection-quality matrix: reference-trainer runs with the rule each must (or must not) raise.

Each fault scenario names the rules that must fire and their maximum detection latency in
optimizer steps, counted from the step where the fault starts to bite; each healthy scenario must
raise nothing at warning or critical. The tests assert it (tests/test_detection.py) and
`python benchmarks/detection.py` regenerates benchmarks/detection.md over several seeds.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from monitor.trainer.config import TrainConfig
from monitor.trainer.loop import train

# The tiny model's CPU step is far shorter than a real one's, while the attention probe's cost is
# mostly fixed: at the default 1% budget its interval would stretch well beyond 10 steps (see
# benchmarks/results/attention-tiny-cpu.md). The matrix pins it at the default 10 (max_every) so that the attention rules (healthy runs
# included) are judged at that rate whatever the machine's load.
QUIET = {"metrics": {"enabled": False}, "console": {"enabled": False}, "attention": {"max_every": 10}}


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    overrides: dict[str, Any]
    expect: dict[str, int] = field(default_factory=dict)  # rule id -> max latency (steps after fault_step)
    fault_step: int = 0
    pending: str | None = None  # why the scenario cannot be judged yet
    nproc: int = 1  # > 1: ranks under torchrun (`monitor train --nproc`), in subprocesses
    stop_when_alerted: bool = False  # a run that never ends by itself (a hang): stop it once the rules fired
    # rule id -> evidence an alert must carry to count as the detection (e.g. the rank and phase it names)
    evidence: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def healthy(self) -> bool:
        return not self.expect and self.pending is None and not self.overrides.get("faults")


SCENARIOS: list[Scenario] = [
    # --- healthy: nothing at warning or critical -------------------------------------------------
    Scenario("healthy-fp32", "tiny preset, fp32, cosine with warmup", {}),
    Scenario("healthy-bf16", "bf16 autocast, no GradScaler", {"precision": "bf16", "max_steps": 120}),
    Scenario("healthy-fp16-calibration",
             "fp16 with GradScaler starting at 2^32: ~14 calibration skips, then a skip after every growth "
             "(growth_interval 30)",
             {"precision": "fp16", "scaler_init_scale": 2.0**32, "scaler_growth_interval": 30, "max_steps": 100}),
    Scenario("healthy-accumulation", "4 micro-batches per optimizer step", {"grad_accum": 4, "batch_size": 2}),
    Scenario("healthy-post-ln", "post-LN blocks with warmup", {"post_ln": True}),
    Scenario("healthy-long-cosine",
             "600 steps of char-level text, cosine to 0, weight decay 2.0: the raw grad norm climbs ~25% "
             "through the decay, as it does late in long runs",
             {"data": "text", "max_steps": 600, "min_lr_ratio": 0.0, "weight_decay": 2.0}),
    Scenario("healthy-text", "char-level Python sources, 300 steps", {"data": "text", "max_steps": 300}),
    # --- faults ----------------------------------------------------------------------------------
    Scenario("no-warmup", "warmup_steps=0: the first update at peak LR", {"faults": ["no-warmup"]},
             {"warmup.missing": 6}),
    Scenario("no-warmup-post-ln", "post-LN without warmup", {"faults": ["no-warmup"], "post_ln": True},
             {"warmup.missing": 6}),
    Scenario("lr-too-high", "peak LR x500 (1.0): clipping binds, the loss climbs far above its best",
             {"faults": ["lr-too-high"]}, {"preflight.lr_range": 0, "loss.divergence": 80, "clip.saturated": 100}),
    Scenario("per-microbatch-scheduler", "scheduler.step() per micro-batch with 4 micro-batches",
             {"faults": ["per-microbatch-scheduler"]}, {"warmup.per_microbatch": 3, "warmup.too_short": 12}),
    Scenario("fp16-overflow", "fp16 gradients overflow on every step from step 20",
             {"faults": ["fp16-overflow:20"], "max_steps": 80}, {"amp.overflow": 3, "amp.scale_collapse": 25},
             fault_step=20),
    Scenario("nan-loss", "NaN loss at step 100", {"faults": ["nan-at:100"], "max_steps": 120},
             {"loss.nonfinite": 0}, fault_step=100),
    Scenario("nan-loss-fp16", "NaN loss at step 60 under fp16 (GradScaler skips it)",
             {"faults": ["nan-at:60"], "precision": "fp16", "max_steps": 80}, {"loss.nonfinite": 0}, fault_step=60),
    Scenario("resume-without-scheduler", "resume at step 100 with a fresh scheduler: warmup replays",
             {"faults": ["resume-without-scheduler:100"]}, {"warmup.restart": 2}, fault_step=100),
    Scenario("attention-sharpen", "attention logits grow 1.25x per step from step 50",
             {"faults": ["attention-sharpen:50"]},
             {"attention.entropy_collapse": 30, "attention.logit_growth": 30}, fault_step=50),
    # DDP faults: 2 ranks under torchrun (`monitor train --nproc 2`), each scenario in subprocesses.
    Scenario("ddp-healthy", "2 ranks, healthy", {"max_steps": 60}, nproc=2),
    Scenario("ddp-desync", "2 ranks; from step 30 the last rank nudges one weight after every update",
             {"faults": ["ddp-desync:30"], "max_steps": 60}, {"ddp.desync": 15}, fault_step=30, nproc=2),
    Scenario("straggler", "2 ranks; rank 1 sleeps 80 ms before every micro-batch",
             {"faults": ["straggler:1"], "max_steps": 60}, {"ddp.straggler": 40}, nproc=2,
             evidence={"ddp.straggler": {"rank": 1, "phase": "input"}}),
    Scenario("hang", "2 ranks; the last rank blocks forever before its backward at step 30 (stall limit 3 s)",
             {"faults": ["hang:30"], "max_steps": 60}, {"run.stalled": 0}, fault_step=30, nproc=2,
             stop_when_alerted=True),
]

BY_NAME = {s.name: s for s in SCENARIOS}


@dataclass
class Outcome:
    scenario: Scenario
    seed: int
    alerts: list  # monitor.Alert, firing
    latency: dict[str, int | None]  # expected rule -> steps from fault_step to detection (None: missed)
    loud: list  # warning/critical alerts not expected by the scenario (false alarms)
    skipped_steps: int
    grad_norms: list[float]

    @property
    def passed(self) -> bool:
        s = self.scenario
        in_time = all(v is not None and v <= s.expect[k] for k, v in self.latency.items())
        return in_time and not self.loud


def detected_at(alert) -> int:
    return int(alert.evidence.get("detected_at", alert.step))


def run_scenario(s: Scenario, seed: int | None = None, run_dir: Path | None = None,
                 monitor_config: dict | None = None) -> Outcome:
    overrides = dict(s.overrides)
    if seed is not None:
        overrides["seed"] = seed
    cfg = TrainConfig.from_preset("tiny", **overrides)
    if s.nproc > 1:
        with tempfile.TemporaryDirectory() as tmp:
            alerts = _run_ranks(s, cfg, run_dir or Path(tmp) / s.name, monitor_config or QUIET)
        skipped, norms = 0, []
    else:
        with tempfile.TemporaryDirectory() as tmp:
            res = train(cfg, run_dir=run_dir or Path(tmp) / s.name, monitor_config=monitor_config or QUIET,
                        progress=False)
        alerts = [a for a in res.alerts if a.status == "firing"]
        skipped, norms = res.skipped_steps, res.grad_norms
    latency: dict[str, int | None] = {}
    for rule in s.expect:
        want = s.evidence.get(rule, {})
        hits = [a for a in alerts if a.rule == rule and all(a.evidence.get(k) == v for k, v in want.items())]
        latency[rule] = min(detected_at(a) for a in hits) - s.fault_step if hits else None
    loud = [a for a in alerts if a.rule not in s.expect and a.severity.value in ("warning", "critical")]
    if not s.healthy:
        # A fault may cause more than its own alerts (a NaN is also a divergence): only healthy
        # scenarios count unexpected warnings as false alarms.
        loud = []
    return Outcome(s, cfg.seed, alerts, latency, loud, skipped, norms)


def _run_ranks(s: Scenario, cfg: TrainConfig, run_dir: Path, monitor_config: dict, timeout: float = 240.0) -> list:
    """`monitor train --nproc N` in subprocesses; the alerts every rank wrote to the run's alerts.jsonl."""
    import json
    import os
    import signal
    import subprocess
    import sys
    import time

    from monitor.runlog.reader import read_alerts

    mon_cfg = dict(monitor_config)
    if s.stop_when_alerted:  # a hang: a short stall limit, and a watchdog that looks often
        mon_cfg = {**mon_cfg, "watchdog": {"interval_seconds": 0.5},
                   "rules": {**mon_cfg.get("rules", {}), "run.stalled": {"floor_seconds": 3}}}
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    cfg_file = run_dir.parent / f"{run_dir.name}.monitor.json"
    cfg_file.write_text(json.dumps(mon_cfg))
    cmd = [sys.executable, "-m", "monitor.cli.app", "train", "--nproc", str(s.nproc), "--no-progress",
           "--run-dir", str(run_dir), "--config", str(cfg_file), "--resolved-config", cfg.model_dump_json()]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + timeout
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
            if s.stop_when_alerted and run_dir.exists():
                firing = {a.rule for a in read_alerts(run_dir) if a.status == "firing"}
                if set(s.expect) <= firing:
                    break
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # torchrun stops its workers
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    out = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
    if not s.stop_when_alerted and proc.returncode != 0:
        raise RuntimeError(f"{s.name}: `monitor train --nproc {s.nproc}` exited {proc.returncode}:\n{out[-3000:]}")
    return [a for a in read_alerts(run_dir) if a.status == "firing"] if run_dir.exists() else []
