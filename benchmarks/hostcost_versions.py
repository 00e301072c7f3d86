"""Host cost of several versions of the monitor, measured alternately, process by process (issue 13).

hostcost.py measures one version at a time, and minutes apart this VM's speed drifts by more than two
close versions differ (the same training-thread code has measured 72 and 126 us inside the hooks half an
hour apart). Here every round runs one fresh process per version, in turn, the order rotating each
round; each process makes hostcost.py's monitored run alone (`hostcost.solo`: after the warm-up steps,
the CPU inside the monitor's training-thread entry points, the publisher thread's CPU and the attention
probe's amortised cost per step). Each version's figures are medians over the rounds, and its
difference from the first version is the median of the per-round differences: drift moves both sides
of a round alike.

Usage: python benchmarks/hostcost_versions.py --version 80ea2fb=/tmp/checkout --version now=. [--rounds 8]
(a version is a checkout whose `monitor` package is imported; this file's harness is used for all).
Results: benchmarks/results/hostcost-versions.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import run_child, write_results  # noqa: E402

FIELDS = {"direct_us": "inside the hooks", "publisher_cpu_us": "publisher CPU", "probe_us": "attention probe",
          "host_us": "**host us/step**"}


def child(a: argparse.Namespace) -> None:
    """One version's solo run (this process imports the `monitor` its PYTHONPATH points at)."""
    import hostcost
    import torch

    import monitor
    from monitor.trainer import TrainConfig

    torch.set_num_threads(1)
    cfg = TrainConfig.from_preset("tiny", n_layer=a.layers, max_steps=a.warmup + a.steps, **hostcost.TINY)
    with tempfile.TemporaryDirectory() as d:
        r = hostcost.solo(cfg, argparse.Namespace(warmup=a.warmup, steps=a.steps), Path(d))
    r["host_us"] = r["direct_us"] + r["publisher_cpu_us"] + r["probe_us"]
    r["monitor"] = os.path.dirname(monitor.__file__)
    print(json.dumps(r))


def commit(path: str) -> str:
    """The checkout's commit (and "+changes" when its tree differs from it)."""
    git = ["git", "-C", path]
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                           text=True).stdout.strip()
    return (head or "?") + ("+changes" if dirty else "")


def run_version(path: str, a: argparse.Namespace, script: str = __file__) -> dict:
    """`script --child` (this file's child, or another benchmark's of the same arguments) on the checkout."""
    r = run_child([script, "--child", "--layers", str(a.layers), "--steps", str(a.steps), "--warmup",
                   str(a.warmup)], pythonpath=path)
    where = r.pop("monitor")
    if Path(where).resolve() != (Path(path) / "monitor").resolve():  # the checkout asked for, not an installed one
        raise SystemExit(f"{path}: the run imported the monitor from {where}")
    return r


def render(res: dict) -> str:
    versions = list(res["versions"])
    ref = versions[0]
    md = ["# Host cost of versions measured alternately (host-bound proxy, CPU)", "",
          (__doc__ or "").split("\n\n")[1].replace("\n", " "), "",
          f"{res['rounds']} rounds, {res['layers']} layers, {res['steps']} measured steps after {res['warmup']} "
          f"warm-up steps per run, torch threads 1; {res['date']}.", "",
          "| version | what it is | " + " | ".join(FIELDS.values()) + f" | change from {ref} (median of rounds) |",
          "|---|---|" + "---|" * (len(FIELDS) + 1)]
    for v in versions:
        runs = res["runs"][v]
        cells = []
        for f in FIELDS:
            xs = [r[f] for r in runs]
            q = statistics.quantiles(xs, n=4) if len(xs) > 1 else [xs[0]] * 3
            cells.append(f"{statistics.median(xs):.0f} us ({q[0]:.0f} .. {q[2]:.0f})")
        diff = "-" if v == ref else "; ".join(
            f"{FIELDS[f].strip('*')} {statistics.median(r[f] - b[f] for r, b in zip(runs, res['runs'][ref])):+.0f} us"
            for f in ("direct_us", "publisher_cpu_us", "host_us"))
        what = " ".join(x for x in (f"`{res['versions'][v]}`", res["notes"].get(v, "")) if x)
        md.append(f"| {v} | {what} | " + " | ".join(cells) + f" | {diff} |")
    md += ["", "Medians with the interquartile range over the rounds in brackets."]
    return "\n".join(md) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--version", action="append", default=[], metavar="LABEL=PATH",
                    help="a checkout to measure (the first is the reference); repeat for each")
    ap.add_argument("--note", action="append", default=[], metavar="LABEL=TEXT", help="what a version is")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--warmup", type=int, default=200, help="steps before measuring (the rules' windows fill)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(a)
        return
    versions = dict(v.split("=", 1) for v in a.version)
    if len(versions) < 2:
        ap.error("give at least two --version LABEL=PATH")
    runs: dict[str, list[dict]] = {v: [] for v in versions}
    labels = list(versions)
    for k in range(a.rounds):
        for v in labels[k % len(labels):] + labels[:k % len(labels)]:
            runs[v].append(run_version(versions[v], a))
            r = runs[v][-1]
            print(f"round {k + 1}/{a.rounds} {v}: hooks {r['direct_us']:.0f} us, publisher {r['publisher_cpu_us']:.0f} "
                  f"us, probe {r['probe_us']:.0f} us", flush=True)
    res = {"rounds": a.rounds, "layers": a.layers, "steps": a.steps, "warmup": a.warmup,
           "date": time.strftime("%Y-%m-%d %H:%M:%S"), "notes": dict(n.split("=", 1) for n in a.note),
           "versions": {v: commit(p) for v, p in versions.items()}, "runs": runs}
    text = render(res)
    out = write_results("hostcost-versions", res, text)
    print(text)
    print(f"written to {out}")


if __name__ == "__main__":
    main()
