"""The monitor never syncs the training thread with the GPU: proof under torch's sync debug mode.

Trains the reference GPT with the monitor attached; after `--warmup` optimizer steps (attach,
preflight, allocator and autotuning settle) it turns on `torch.cuda.set_sync_debug_mode("error")`,
so any host-device synchronisation (`.item()`, `.cpu()`, a blocking copy, `synchronize()`) raises
in whichever thread makes it, and turns it off after the last step (the trainer reads its own
results back then). Passes when training raised nothing, the monitor counted no internal error
(a sync in its publisher thread would be one) and dropped no record, and the run directory holds
one record per optimizer step, the attention probe's samples among them (its steps run under the
sync debug mode too: it probes every 2 steps here, a fixed interval).

fp32 and bf16 only: with fp16, GradScaler's own `step()` reads found_inf on the host, a sync that is
torch's, not the monitor's. On CPU there is no sync debug mode; `--device cpu` checks the rest.

    python scripts/sync_check.py --device cuda --precision bf16 --out results.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--preset", default="small")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--steps", type=int, default=40, help="optimizer steps in all")
    ap.add_argument("--warmup", type=int, default=5, help="steps before sync debug mode is turned on")
    ap.add_argument("--run-dir", type=Path, default=None, help="default: a temporary directory")
    ap.add_argument("--out", type=Path, default=None, help="also write the result as JSON here")
    a = ap.parse_args(argv)
    if not 0 < a.warmup < a.steps:
        ap.error("need 0 < --warmup < --steps")

    import torch

    from monitor.runlog.reader import read_run
    from monitor.trainer import TrainConfig, train

    cuda = a.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        print(f"FAIL sync-check: device {a.device!r} but torch {torch.__version__} sees no CUDA", flush=True)
        return 2
    cfg = TrainConfig.from_preset(a.preset, max_steps=a.steps, device=a.device, precision=a.precision,
                                  log_every=10**9)
    tmp = tempfile.TemporaryDirectory(prefix="trainmon-sync-") if a.run_dir is None else None
    run_dir = a.run_dir or Path(tmp.name) / "run"
    seen: dict = {"mon": None, "checked_steps": 0}

    def on_attach(mon) -> None:
        seen["mon"] = mon

    def on_step(info) -> None:
        if not cuda:
            return
        if info.step == a.warmup - 1:
            torch.cuda.synchronize()  # settle everything queued so far, then forbid syncs
            torch.cuda.set_sync_debug_mode("error")
        elif info.step >= a.warmup:
            seen["checked_steps"] += 1
        if info.step == a.steps - 1:
            torch.cuda.set_sync_debug_mode("default")

    result: dict = {"device": a.device, "preset": a.preset, "precision": a.precision, "steps": a.steps,
                    "warmup": a.warmup, "sync_debug_mode": cuda}
    error = None
    t0 = time.perf_counter()
    try:
        train(cfg, run_dir=run_dir, progress=False, on_step=on_step, on_attach=on_attach,
              monitor_config={"console": {"enabled": False}, "metrics": {"port": 0},
                              "attention": {"every": 2, "max_every": 2}})
    except Exception as e:  # a sync in the training thread raises here
        error = f"{type(e).__name__}: {e}"
        traceback.print_exc()
    finally:
        if cuda:
            torch.cuda.set_sync_debug_mode("default")
    result["wall_s"] = round(time.perf_counter() - t0, 2)
    mon = seen["mon"]
    result["checked_steps"] = seen["checked_steps"]  # steps completed with sync debug mode "error"
    result["error"] = error
    result["internal_errors"] = mon.internal_errors if mon is not None else None
    result["dropped_records"] = mon.dropped_records if mon is not None else None
    try:
        records = read_run(run_dir).records.get(0, [])
        result["records"] = len(records)
        result["record_steps_ok"] = [r.step for r in records] == list(range(a.steps))
        result["attention_samples_checked"] = sum(1 for r in records if r.attention and r.step >= a.warmup)
    except Exception as e:
        result["records"], result["record_steps_ok"] = 0, False
        result["read_error"] = f"{type(e).__name__}: {e}"
    problems = []
    if error:
        problems.append(f"training raised {error}")
    if mon is None:
        problems.append("the monitor never attached")
    else:
        if mon.internal_errors:
            problems.append(f"the monitor counted {mon.internal_errors} internal error(s)")
        if mon.dropped_records:
            problems.append(f"the monitor dropped {mon.dropped_records} record(s)")
    if cuda and error is None and result["checked_steps"] != a.steps - a.warmup:
        problems.append(f"only {result['checked_steps']} of {a.steps - a.warmup} steps ran under sync debug mode")
    if not result.get("attention_samples_checked"):
        problems.append("no attention sample after the warm-up: the probe did not run under the check")
    if result["records"] != a.steps or not result["record_steps_ok"]:
        problems.append(f"{result['records']} records in {run_dir} for {a.steps} steps")
    result["passed"] = not problems
    result["problems"] = problems
    if tmp is not None:
        tmp.cleanup()
    if a.out is not None:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(result, indent=2) + "\n")
    mode = f"sync debug mode 'error' on steps {a.warmup}..{a.steps - 1}" if cuda else "no sync debug mode (CPU)"
    print(f"{'PASS' if not problems else 'FAIL'} sync-check: {a.preset} {a.precision} on {a.device}, {a.steps} steps, "
          f"{mode}; records {result['records']}, internal errors {result['internal_errors']}, dropped "
          f"{result['dropped_records']}" + (f"; {'; '.join(problems)}" if problems else ""), flush=True)
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
