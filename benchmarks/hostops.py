"""Python work the monitor does per optimizer step on the training thread and its publisher, counted
(issue 13's host path).

hostcost.py times the monitor's host work, but on a shared VM whose speed drifts 25-35% within an hour a change of 10 us cannot be told from noise. This counts instead: the bytecode instructions and the Python calls executed in the monitor's own code (its package directory, the reference trainer left out) per step of the host-bound proxy (hostcost.py's 12-layer GPT, n_embd 8), through `sys.settrace` with opcode events: on the training thread (sampled steps included: the attention probe's and the per-parameter norms'), and on the publisher thread (the counted steps' records decoded, written, exported and judged). The training thread's count is deterministic: the same code gives the same count on any machine, so two versions can be compared exactly (`--label X` with PYTHONPATH pointing at a checkout of the other one); the publisher's nearly so (where its batches begin follows the clock: a tenth of its count is per batch). What it does not see: the C work inside the calls (torch ops, struct packing, dict lookups); and an instruction costs more when the step evicts the interpreter's working set from the cache (the reason the timed figures grow with the model much faster than the count does), or, on the publisher, when it runs between the training thread's ops.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
import threading
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, write_results  # noqa: E402
from _paired import one_step  # noqa: E402
from hostcost import TINY  # noqa: E402

import monitor  # noqa: E402
from monitor.trainer import TrainConfig  # noqa: E402
from monitor.trainer.loop import _Run  # noqa: E402


def count(layers: int, steps: int, warmup: int, config: dict | None = None) -> dict:
    """Per step, on the training thread and on the publisher thread: {"opcodes", "calls", "functions":
    [(name, opcodes per step, calls per step)...]} (the publisher's under "publisher")."""
    root = os.path.dirname(monitor.__file__)
    skip = os.path.join(root, "trainer")
    counts = {name: (collections.Counter(), collections.Counter()) for name in ("training", "publisher")}
    counting = threading.Event()

    def tracer(ops: collections.Counter, calls: collections.Counter):
        def local(frame, event, arg):
            if event == "opcode":
                ops[frame.f_code] += 1
            return local

        def enter(frame, event, arg):
            name = frame.f_code.co_filename
            if event == "call" and counting.is_set() and name.startswith(root) and not name.startswith(skip):
                frame.f_trace_opcodes = True
                calls[frame.f_code] += 1
                return local
            return None

        return enter

    def publisher_thread(*_):  # installed in every thread started from here on: traces only the publisher
        if threading.current_thread().name == "trainmon-publisher":
            sys.settrace(tracer(*counts["publisher"]))

    torch.manual_seed(0)
    cfg = TrainConfig.from_preset("tiny", n_layer=layers, max_steps=warmup + steps, **TINY)
    run = _Run(cfg, torch.device("cpu"))
    threading.settrace(publisher_thread)
    try:
        with tempfile.TemporaryDirectory() as d:
            mon = monitor.attach(run.model, run.optimizer, scaler=run.scaler, scheduler=run.scheduler, run_dir=d,
                                 max_steps=cfg.max_steps,
                                 config={"metrics": {"port": 0}, "console": {"enabled": False}, **(config or {})})
            try:
                for i in range(warmup):
                    one_step(run, i, nullcontext)
                assert mon.flush(60)
                counting.set()  # the publisher's work on the counted steps, their last batch included
                sys.settrace(tracer(*counts["training"]))  # this thread
                try:
                    for i in range(warmup, warmup + steps):
                        one_step(run, i, nullcontext)
                finally:
                    sys.settrace(None)
                assert mon.flush(60)
                counting.clear()
            finally:
                mon.close()
    finally:
        threading.settrace(None)
    assert mon.internal_errors == 0, mon.internal_errors
    out = {"param_tensors": len(list(run.model.parameters()))}
    for thread, (ops, calls) in counts.items():
        per = [(f"{os.path.relpath(c.co_filename, root)}:{c.co_firstlineno} {c.co_name}", ops[c] / steps,
                calls[c] / steps) for c in calls]
        per.sort(key=lambda f: -f[1])
        entry = {"opcodes": sum(ops.values()) / steps, "calls": sum(calls.values()) / steps, "functions": per}
        if thread == "training":
            out.update(entry)
        else:
            out["publisher"] = entry
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--label", default="after", help="the results' label (another version: PYTHONPATH at its checkout)")
    ap.add_argument("--note", default="", help="what code the label counted")
    ap.add_argument("--layers", default="12,48")
    ap.add_argument("--steps", type=int, default=300, help="counted steps (sampled steps come every 50 and ~100)")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--top", type=int, default=12, help="functions listed per label")
    a = ap.parse_args()
    torch.set_num_threads(1)
    path = RESULTS / "hostops.json"
    labels = json.loads(path.read_text()).get("labels", {}) if path.exists() else {}
    rows = []
    for layers in (int(x) for x in a.layers.split(",")):
        c = count(layers, a.steps, a.warmup)
        rows.append({"layers": layers, **c})
        print(f"{layers} layers: {c['opcodes']:.0f} opcodes, {c['calls']:.1f} calls per step on the training thread, "
              f"{c['publisher']['opcodes']:.0f} and {c['publisher']['calls']:.1f} on the publisher", flush=True)
    labels.pop(a.label, None)  # a label counted again goes last: the latest is the last row
    labels[a.label] = {"note": a.note, "steps": a.steps, "rows": rows}
    md = ["# Python work per optimizer step on the training thread and the publisher (counted)", "",
          (__doc__ or "").split("\n\n")[1].replace("\n", " "), "",
          "| label | layers | param tensors | training thread: opcodes / step | calls / step "
          "| publisher: opcodes / step | calls / step |", "|---|---|---|---|---|---|---|"]
    for label, e in labels.items():
        for r in e["rows"]:
            pub = r.get("publisher")
            md.append(f"| {label} | {r['layers']} | {r['param_tensors']} | {r['opcodes']:.0f} | {r['calls']:.1f} | "
                      + (f"{pub['opcodes']:.0f} | {pub['calls']:.1f} |" if pub else "- | - |"))
    for label, e in labels.items():
        md += ["", f"### {label}", "", e["note"], "", f"{e['steps']} steps counted. Where the instructions go "
               f"({e['rows'][0]['layers']} layers, per step), on the training thread:", "",
               "| function | opcodes | calls |", "|---|---|---|"]
        md += [f"| `{name}` | {o:.1f} | {c:.2f} |" for name, o, c in e["rows"][0]["functions"][:a.top]]
        pub = e["rows"][0].get("publisher")
        if pub:
            md += ["", "On the publisher:", "", "| function | opcodes | calls |", "|---|---|---|"]
            md += [f"| `{name}` | {o:.1f} | {c:.2f} |" for name, o, c in pub["functions"][:a.top]]
    out = write_results("hostops", {"labels": labels}, "\n".join(md) + "\n")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
