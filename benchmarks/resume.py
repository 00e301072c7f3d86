"""What a resume costs at attach: reading the run directory's history and the warm start.

A run directory holding N step records of one earlier attempt (written with the real EventWriter,
as benchmarks/watch.py writes them: 27-parameter norm vectors, attention every 10 steps) is resumed
into with `monitor.attach(..., resume_step=N)`: once with `attempts.warm_start` off and
`resume_step` given (nothing read), once with the defaults (the history read, mapped and replayed
through the rules). Interleaved rounds, medians of the attach time in seconds.
Results: benchmarks/results/resume.{json,md}.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import torch  # noqa: E402
from _common import write_results  # noqa: E402
from watch import make_run, record  # noqa: E402

import monitor  # noqa: E402
from tests.conftest import TinyLM  # noqa: E402

QUIET = {"metrics": {"enabled": False}, "console": {"enabled": False}}


def attach_seconds(template: Path, work: Path, n: int, warm: bool) -> float:
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(template, work)
    model = TinyLM()
    opt = torch.optim.AdamW(model.parameters())
    t = time.perf_counter()
    mon = monitor.attach(model, opt, run_dir=work / "run", resume_step=n,
                         config={**QUIET, "attempts": {"warm_start": warm}})
    dt = time.perf_counter() - t
    mon.close()
    return dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, nargs="+", default=[10_000, 50_000, 100_000])
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.records:
            template = Path(tmp) / f"t{n}"
            _, w = make_run(template, "run")
            t0 = time.time() - n * 0.1
            for s in range(n):
                w.write(record(s, t0 + s * 0.1, attention=s % 10 == 0))
            w.close()
            times: dict[bool, list[float]] = {False: [], True: []}
            for i in range(args.rounds):
                for warm in ((False, True) if i % 2 == 0 else (True, False)):
                    times[warm].append(attach_seconds(template, Path(tmp) / "work", n, warm))
            cold, warm = statistics.median(times[False]), statistics.median(times[True])
            rows.append({"records": n, "attach_cold_s": round(cold, 3), "attach_warm_s": round(warm, 3),
                         "warm_start_s": round(warm - cold, 3), "records_per_s": round(n / max(warm - cold, 1e-9))})
            print(rows[-1], flush=True)
    md = ["# Resume: attach cost of the warm start", "",
          "`python benchmarks/resume.py`: attach into a run directory holding N records of an earlier attempt,",
          f"`resume_step=N`; medians of {args.rounds} interleaved rounds (seconds). Cold: `attempts.warm_start` off (the",
          "history is not read). Warm: the defaults (history read, and replayed through the rules, delivering nothing).",
          "The warm start runs inside `attach`, before the first step: the training loop never waits for it later.", "",
          "| records | attach, cold (s) | attach, warm (s) | warm start (s) | records/s |", "|---|---|---|---|---|"]
    md += [f"| {r['records']} | {r['attach_cold_s']} | {r['attach_warm_s']} | {r['warm_start_s']} | {r['records_per_s']} |"
           for r in rows]
    write_results("resume", {"rounds": args.rounds, "rows": rows}, "\n".join(md) + "\n")


if __name__ == "__main__":
    main()
