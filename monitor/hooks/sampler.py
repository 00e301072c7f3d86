"""Rank 0's attention statistics: which steps are sampled, what each sample measured and what it cost.

The `AttentionSampler` owns the probe schedule (hooks/attention.py: ProbeSchedule). On the
training thread it opens the probe around the first training forward of a due step, measures
`mon.observe_attention` calls of that step, accounts the probe's cost, and at the step's end
hands the step's statistics (device tensors) to the collector, advances the schedule and keeps
the probe's cost and the interval now in force (`last_probe`, one tuple store). On the publisher
thread, as a stage after each record (`observe_record`), it reports a new `last_probe` (`on_probe`:
the Prometheus gauges) and reads a sampled record's statistics back: attention that moved brings
the next probe forward, an int store the training thread reads at its next step.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

import torch

from monitor.hooks import compiled, introspect
from monitor.hooks.attention import AttentionProbe, ProbeSchedule
from monitor.hooks.attention_math import attention_stats, scale_ok, sdpa_masks, unmeasurable
from monitor.hooks.guard import ErrorGuard

log = logging.getLogger("trainmon")

# Probed forwards in a row without an SDPA or MHA call after which the probe stops beginning.
EMPTY_PROBES = 3
NO_STATS: Mapping[str, torch.Tensor] = MappingProxyType({})  # an unsampled step's (no allocation per step)


def check_call(q, k, layer, logits, mask, *, is_causal: Any = False, scale: Any = None) -> None:
    """TypeError naming a wrong argument of `mon.observe_attention` (checked on every rank)."""
    if not isinstance(is_causal, bool) and type(is_causal).__name__ not in ("bool", "bool_"):  # numpy's bool passes
        # bool() of a string is True; of a device tensor, a wait for the device.
        raise TypeError(f"observe_attention: `is_causal` must be a bool, got {type(is_causal).__name__}")
    if not scale_ok(scale):
        raise TypeError(f"observe_attention: `scale` must be a float or None, got {type(scale).__name__}")
    if layer is not None and (not isinstance(layer, str) or not layer):
        raise TypeError(f"observe_attention: `layer` must be a non-empty str or None, got {layer!r}")
    if logits is None and not (isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor)):
        raise TypeError("observe_attention: pass `q` and `k` tensors, or `logits`")
    if logits is not None and not isinstance(logits, torch.Tensor):
        raise TypeError(f"observe_attention: `logits` must be a tensor, got {type(logits).__name__}")
    if mask is not None and not isinstance(mask, torch.Tensor):
        raise TypeError(f"observe_attention: `mask` must be a tensor or None, got {type(mask).__name__}")


class AttentionSampler:
    def __init__(self, cfg: Any, start_step: int, *, model: torch.nn.Module, probe_model: bool, guard: ErrorGuard,
                 on_probe: Callable[[float, int], None] | None = None) -> None:
        """`cfg`: the `attention` config section. `probe_model`: the probe may intercept attention in this
        model's forward (else only mon.observe_attention reports)."""
        self.model = model
        self.rows, self.batch = cfg.rows, cfg.batch
        self.schedule = ProbeSchedule(cfg.every, cfg.max_every, cfg.budget, start_step)
        self.probe: AttentionProbe | None = None
        if cfg.enabled and probe_model:
            names = {id(m): n for n, m in introspect.unwrap(model).named_modules()}
            self.probe = AttentionProbe(names, rows=cfg.rows, batch=cfg.batch, on_error=guard.record)
        self.off: str | None = None  # why the probe turned itself off during the run
        self._guard = guard
        self._on_probe = on_probe
        self.last_probe: tuple[float, int] | None = None  # (cost in seconds, interval) of the latest probe
        self._reported: tuple[float, int] | None = None  # the last_probe the publisher reported
        self._empty_probes = 0
        self._fwd_t0: float | None = None
        self._generator = torch.Generator().manual_seed(1)  # observe_attention's own (CPU) generator
        self._calls = 0  # observe_attention calls without a layer name, in this forward
        self._refused: set[str] = set()  # layers whose observe_attention values were refused (said once each)
        self._new_step()

    def _new_step(self) -> None:
        self.results: dict[str, torch.Tensor] = {}  # layer -> [entropy_ratio, entropy_min, max_logit, max_prob]
        self._offset: float | None = None  # where in the batch observe_attention measures this step
        self._cost = 0.0
        self._probed = False

    def due(self, step: int) -> bool:
        return self.schedule.due(step)

    # -- training thread -------------------------------------------------------------------------

    def forward_begin(self, step: int, first: bool) -> None:
        """A training forward begins; `first`: the step's first micro-batch, the only one probed."""
        self._calls = 0
        if not first or not self.schedule.timed(step):
            return
        self._fwd_t0 = time.perf_counter()
        if self.probe is not None and self.schedule.due(step) and self._runs_eagerly():
            self.probe.begin()

    def forward_end(self) -> None:
        """End of a forward (also one that raised): close the probe and account for its cost."""
        try:
            if self._fwd_t0 is None:
                return
            probe = self.probe
            probed = probe is not None and probe.active
            results = probe.end() if probed else None  # (the kept calls are measured now: part of the forward's cost)
            seconds = time.perf_counter() - self._fwd_t0
            self._fwd_t0 = None
            if probed:
                for layer, stats in results.items():
                    self.results.setdefault(layer, stats)
                self._empty_probes = 0 if results else self._empty_probes + 1
                self._probed = True
                # The cost is what the probed forward took beyond a plain one (the interception of
                # its calls included), at least the measured recomputation itself.
                plain = self.schedule.forward_seconds
                extra = seconds - plain if plain is not None else probe.seconds
                self._cost += max(probe.seconds, extra)
            else:
                self.schedule.plain_forward(seconds)
        except Exception as e:
            self._guard.record("attention probe", e)

    def _runs_eagerly(self) -> bool:
        """Before a sampled forward: the probe's interception would be traced into compiled code and make it
        recompile, so on a model (or part of one) that runs compiled it turns off, saying so once."""
        why = compiled.compiled_reason(self.model)
        if why is not None:
            self.turn_off(why)
        return why is None

    def turn_off(self, why: str) -> None:
        """The probe stops for good (the model runs compiled code); observe_attention still reports."""
        if self.probe is None:
            return
        self.probe = None
        self.off = f"{why}: the probe does not run inside compiled code; report with mon.observe_attention"
        log.info("trainmon: attention probe off: %s", self.off)

    def observe(self, step: int, q, k, layer: str | None, logits, mask, is_causal: bool, scale,
                presliced: bool = False) -> None:
        """Statistics of one attention call from the user (custom kernels); only on due steps.
        `presliced`: the sequences were chosen already, inside a compiled graph (which also told
        whether autograd was on: it runs with autograd off). An unnamed call is named by its order
        in the forward."""
        if not presliced and not torch.is_grad_enabled():
            return  # an evaluation pass (no_grad) inside a sampled step is not the step's attention
        if not layer:
            layer = f"attention.{self._calls}"
            self._calls += 1
        if not self.schedule.due(step) or layer in self.results:
            return
        t0 = time.perf_counter()
        try:
            why = unmeasurable(q, k, logits, mask, scale)
            if why is not None:  # the caller's values, not the monitor's fault: said once, not counted
                if layer not in self._refused:
                    self._refused.add(layer)
                    log.warning("trainmon: mon.observe_attention(layer=%r): %s; not measured (said once for this "
                                "layer)", layer, why)
                return
            if self._offset is None:  # one position per step, as the probe draws one per forward
                self._offset = float(torch.rand((), generator=self._generator))
            t = logits if logits is not None else q
            stats = attention_stats(q, k, logits=logits, masks=sdpa_masks(mask), is_causal=is_causal, scale=scale,
                                    rows=self.rows, batch=t.shape[0] if presliced else self.batch,
                                    offset=0.0 if presliced else self._offset)
            if stats is not None:
                self.results[layer] = stats
            self._probed = True
        except Exception as e:
            self._guard.record("mon.observe_attention", e)
        finally:
            self._cost += time.perf_counter() - t0

    def step_end(self, step: int, step_time: float | None) -> Mapping[str, torch.Tensor]:
        """The optimizer step `step` ended: its statistics (device tensors, none on unsampled steps). The
        schedule moves on; a step that was probed reports its cost and the interval now in force."""
        sched = self.schedule
        if not sched.due(step):  # nothing was measured (observe() and the probe work on due steps only)
            if step_time is not None and sched.timed(step):
                sched.plain_step(step_time)
            return NO_STATS
        results = self.results
        if not self._probed:
            sched.skipped(step)  # no training forward ran (or no call): try again later
        else:
            sched.probed(step, self._cost)
            if sched.off:
                log.info("trainmon: attention statistics off: %s", sched.off)
            elif self._empty_probes >= EMPTY_PROBES and self.probe is not None:
                # This model computes attention some other way (mon.observe_attention can still
                # report it): the mode is not worth entering.
                self.probe = None
                log.info("trainmon: no F.scaled_dot_product_attention or F.multi_head_attention_forward call in "
                         "%d probed forwards; the attention probe is off (mon.observe_attention still reports)",
                         EMPTY_PROBES)
            self.last_probe = (self._cost, sched.every)
        self._new_step()
        return results

    def close(self) -> None:
        if self.probe is not None:
            self.probe.end()  # a forward that never ended (a framework's step that raised) leaves its interception

    # -- publisher thread -------------------------------------------------------------------------

    def observe_record(self, step: int, attention: dict[str, dict[str, float]] | None) -> None:
        """After each step's record: a probe's cost and interval not reported yet go to `on_probe`; a
        sampled step's statistics, read back, bring the next probe forward when attention moved."""
        probe = self.last_probe
        if probe is not self._reported:
            self._reported = probe
            if self._on_probe is not None:
                self._on_probe(*probe)
        if attention:
            self.schedule.observe(step, attention)

    # -- any thread ------------------------------------------------------------------------------

    def summary(self) -> dict:
        """For run.json: the schedule's interval, samples and costs, and why the probe stopped, if it did."""
        out = self.schedule.summary()
        off = self.off or self.schedule.off
        if off:
            out.update(enabled=False, off=off)
        return out
