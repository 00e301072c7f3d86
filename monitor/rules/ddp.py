"""Distributed rules, on rank 0's comparison of the ranks (StepRecord.ddp, every few steps)."""

from __future__ import annotations

from statistics import median

from pydantic import Field

from monitor.rules.base import Finding, Rule, RuleConfig
from monitor.rules.registry import register
from monitor.schema import Severity, StepRecord


@register
class DdpDesync(Rule):
    """Ranks hold different parameters.

    Symptom: the parameter fingerprints (per-tensor norms of parameters and floating-point buffers)
    that the ranks post every few steps are not bitwise equal to rank 0's.
    Why: DDP keeps replicas identical only if every rank applies the same all-reduced update. A
    rank that mutated a weight on its own, a buffer that is not synchronised, or a rank that
    skipped a step (its own GradScaler decision, an exception swallowed) silently trains a
    different model on each rank: the loss looks fine while checkpoints from rank 0 are not what
    the other ranks compute.
    Fix: look at the named parameters on the named rank: code that writes to parameters outside
    optimizer.step() (on one rank only), buffers needing broadcast_buffers=True or SyncBatchNorm,
    and per-rank conditions around scaler.step(); restore from a checkpoint saved before the step.
    """

    id = "ddp.desync"
    needs = "ddp"
    family = "ddp"
    severity = Severity.critical

    def observe(self, r: StepRecord) -> Finding | None:
        ex = r.ddp
        if not ex or not ex.get("desync"):
            return None
        names = self.run.model.param_names
        bad = ex["desync"]
        ranks = [d["rank"] for d in bad]

        def name(i: int) -> str:
            return names[i] if 0 <= i < len(names) else f"tensor {i} (a buffer)"

        first = bad[0]
        params = [name(i) for i in first["params"]]
        return Finding(
            message=f"rank(s) {', '.join(map(str, ranks))} hold parameters that differ from rank 0's at step "
            f"{ex.get('step', r.step)}: {first['count']} tensor(s) on rank {first['rank']}, e.g. {', '.join(params[:3])}.",
            hint="Find what changes these parameters on that rank outside optimizer.step() (or an unsynchronised "
            "buffer, or a step skipped on one rank) and restore from a checkpoint taken before it.",
            evidence={"ranks": ranks, "params": params, "mismatches": [d["count"] for d in bad],
                      "compared_step": ex.get("step"), "reported": ex.get("reported")},
            step=ex.get("step", r.step),
        )


class StragglerConfig(RuleConfig):
    factor: float = Field(1.5, gt=1, description="A rank whose input or compute phase takes more than this multiple "
                          "of the other ranks' median ...")
    min_seconds: float = Field(0.01, ge=0, description="... and by more than this many seconds per step ...")
    exchanges: int = Field(3, ge=1, description="... in this many exchanges in a row (each covers a few steps).")


# The phases a straggler is named by (they hold no collective), in the order of preference when a rank is
# slow in both: a slow device also holds up the host where the loop next waits for it (in the input phase).
_JUDGED = ("compute", "input")
_WHAT = {
    "input": "input phase (from the previous optimizer step to the forward: data loading and the loop's own work)",
    "compute": "forward compute (the module inside the DDP wrapper)",
    "busy": "busy time (data loading and forwards; a run recorded without phase times)",
}
_HINT = {
    "input": "Look at rank {r}'s input pipeline: DataLoader num_workers and pin_memory, storage and decoding, "
             "and anything the loop does on that rank only between steps; the other ranks wait for it.",
    "compute": "Look at rank {r}'s device: clocks and temperature, other processes on it, a smaller share of "
               "CPU cores; and check that the ranks get equal batch shapes. The other ranks wait for it.",
    "busy": "Check rank {r}'s input pipeline (num_workers, storage) and device; the other ranks wait for it at "
            "every all-reduce.",
}


@register
class DdpStraggler(Rule):
    """One rank is persistently slower than the others, in a phase that holds no collective.

    Symptom: a rank's input phase (previous optimizer step's end or previous micro-batch's backward end
    to its forward: data loading, summed over micro-batches) or compute phase (the forward of the
    module inside the DDP wrapper) is above `factor` x the median of the other ranks, by more than
    `min_seconds` per step, in `exchanges` comparisons in a row; the alert names the rank and the phase
    (compute when both are slow). Each rank posts the median of its phase times since the last
    exchange. Step times cannot show it, nor can the time before the backward: DDP's all-reduce, and
    with buffers (broadcast_buffers=True, the default) the broadcast at the start of every forward,
    make the fast ranks wait for the slowest inside those. That wait is recorded apart (collective
    wait, high on the ranks that wait, low on the straggler) and is not judged. Runs recorded before
    phase times existed are judged on busy time (data and forwards).
    Why: the whole job runs at the speed of its slowest rank: one slow data loader, a throttled or
    shared GPU, or a noisy neighbour costs every rank the same time.
    Fix: for the input phase look at the named rank's input pipeline (num_workers, storage, decoding);
    for compute, at its device (clocks, temperature, other processes on it); check that the data is
    split evenly.
    """

    id = "ddp.straggler"
    needs = "ddp"
    family = "ddp"
    severity = Severity.warning
    Config = StragglerConfig

    def __init__(self, config: StragglerConfig, run) -> None:
        super().__init__(config, run)
        self.streak: dict[tuple[str, str], int] = {}  # (rank, phase) -> exchanges in a row above the others
        self.since: dict[tuple[str, str], int] = {}

    def observe(self, r: StepRecord) -> Finding | None:
        ex = r.ddp
        if not ex:
            return None
        if "phases" in ex:  # this monitor's exchange: the phases that hold no collective
            judged = {p: ex["phases"][p] for p in _JUDGED if len(ex["phases"].get(p) or {}) >= 2}
        elif len(ex.get("busy") or {}) >= 2:  # a run recorded without phase times: busy time only
            judged = {"busy": ex["busy"]}
        else:
            return None
        if not judged:
            return None
        c = self.config
        slow: dict[tuple[str, str], tuple[float, float]] = {}  # (rank, phase) -> (seconds, others' median)
        for phase, times in judged.items():
            times = {k: v for k, v in times.items() if v is not None}
            if len(times) < 2:
                continue
            for k, v in times.items():
                # Against the median of the OTHER ranks: with two ranks the plain median would be their mean.
                med = median([x for j, x in times.items() if j != k])
                if v > c.factor * med and v - med > c.min_seconds:
                    slow[(k, phase)] = (v, med)
        step = ex.get("step", r.step)
        for key in list(self.streak):
            if key not in slow:
                del self.streak[key]
                self.since.pop(key, None)
        for key in slow:
            self.streak[key] = self.streak.get(key, 0) + 1
            self.since.setdefault(key, step)
        ready = [key for key in slow if self.streak[key] >= c.exchanges]
        if not ready:
            return None
        # The rank furthest above the others; its phase by preference (compute over input).
        rank = max(ready, key=lambda key: slow[key][0] - slow[key][1])[0]
        order = (*_JUDGED, "busy")
        phase = min((p for k, p in ready if k == rank), key=order.index)
        secs, med = slow[(rank, phase)]
        key = (rank, phase)
        seconds = {p: dict(v) for p, v in (ex.get("phases") or {}).items()}
        wait = seconds.get("collective_wait") or {}
        waits = ""
        others = [v for j, v in wait.items() if j != rank and v is not None]
        if rank in wait and others:
            waits = (f" The other ranks wait {median(others):.3g} s per step in collectives, rank {rank} "
                     f"{wait[rank]:.3g} s.")
        ratio = f"{secs / med:.1f}x" if med > 0 else "far above"
        return Finding(
            message=f"rank {rank} is slow in its {_WHAT[phase]}: {secs:.3g} s per step, {ratio} the other ranks' "
            f"median ({med:.3g} s), for {self.streak[key]} comparisons since step {self.since[key]}.{waits}",
            hint=_HINT[phase].format(r=rank),
            evidence={"rank": int(rank), "phase": phase, "seconds": secs, "median_seconds": med,
                      "phase_seconds": seconds, "busy_seconds": ex.get("busy"), "first_step": self.since[key]},
            step=self.since[key],
        )
