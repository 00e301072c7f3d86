"""run.stalled while a kernel hangs: the watchdog does not wait for the publisher.

Trains a small model on the GPU with the monitor attached (stall floor 2 s, watchdog every 0.2 s).
After a few steps, one step's backward queues `torch.cuda._sleep` for far longer than the stall limit:
the training thread goes on (kernels are asynchronous), the publisher waits for that step's event
(polling it, with a deadline), and the loop then stops stepping, as a loop stuck on a hung kernel or
collective would. Passes when run.stalled and its stack dump arrive while the kernel still runs, and
close() returns once it is done. CUDA only (on CPU, tests/test_watchdog.py checks the same with an
event that never completes).

    python scripts/hang_check.py --device cuda
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--hang-seconds", type=float, default=20.0)
    args = ap.parse_args(argv)
    import torch

    import monitor

    if args.device == "cpu" or not torch.cuda.is_available():
        print("SKIPPED hang-check: CUDA only (tests/test_watchdog.py covers CPU)")
        return 0
    dev = torch.device(args.device)
    model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.GELU(), torch.nn.Linear(256, 1)).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    run_dir = Path(tempfile.mkdtemp(prefix="hang-check-"))
    cfg = {"metrics": {"enabled": False}, "watchdog": {"interval_seconds": 0.2},
           "rules": {"run.stalled": {"floor_seconds": 2.0, "factor": 2}}}
    mon = monitor.attach(model, opt, run_dir=run_dir, config=cfg)
    # Cycles for the sleep: measured, so the hang lasts about --hang-seconds on this GPU.
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(10_000_000)
    end.record()
    end.synchronize()
    cycles = int(10_000_000 * args.hang_seconds * 1000 / max(start.elapsed_time(end), 1e-3))
    x = torch.randn(64, 256, device=dev)
    for i in range(6):
        loss = model(x).pow(2).mean()
        if i == 5:
            torch.cuda._sleep(cycles)  # the "hung" kernel, ahead of this step's backward and copies
            hung = torch.cuda.Event()
            hung.record()
        loss.backward()
        opt.step()
        opt.zero_grad()
    t0 = time.monotonic()
    stalled = None
    while time.monotonic() - t0 < args.hang_seconds * 0.75 and stalled is None:
        stalled = next((a for a in mon.alerts if a.rule == "run.stalled"), None)
        time.sleep(0.05)
    waited = time.monotonic() - t0
    still_running = not hung.query()  # the alert came while the kernel was still running
    dumps = list(run_dir.glob("stacks-rank0-step*.txt"))
    torch.cuda.synchronize()
    mon.close()
    ok = stalled is not None and bool(dumps) and still_running
    print(f"{'PASS' if ok else 'FAIL'} hang-check: run.stalled after {waited:.1f} s of a "
          f"{args.hang_seconds:.0f} s kernel (step {stalled.step if stalled else '-'}), stack dump "
          f"{'written' if dumps else 'missing'}, kernel still running then: {still_running}, internal errors {mon.internal_errors}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
