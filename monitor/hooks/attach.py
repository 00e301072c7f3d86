"""`monitor.attach(...)`: the one call that wires a training loop to the monitor.

A `Monitor` owns the pieces and the threads they run on:
- training thread: the StepCollector's hooks (hooks/collector.py), the AttentionSampler on rank 0
  (hooks/sampler.py) and the halt check before each optimizer step (hooks/halt.py);
- publisher thread (hooks/publisher.py): decodes each step and runs the named stages (halt
  coordination, attention sampler, rank exchange, run.json facts) and outputs (TensorBoard writer,
  Prometheus metrics, rules engine); the rules' alerts go through the AlertFanout (hooks/alerts.py)
  to the sinks, the HaltController among them;
- watchdog thread: runs the clock rules (run.stalled) even while the training loop or the publisher
  is stuck; the rules engine is shared under one lock (hooks/judge.py).
"""

from __future__ import annotations

import atexit
import os
import threading
from collections.abc import Callable, Mapping
from typing import Any

import torch
from prometheus_client import CollectorRegistry

from monitor.config import MonitorConfig, load_config
from monitor.exporters.console import ConsoleSink, install_console_handler
from monitor.exporters.endpoint import MetricsServer, metrics_endpoint
from monitor.exporters.prometheus import TrainMetrics
from monitor.exporters.sinks import build_http_sinks
from monitor.hooks import attempt, compiled, ddp, exit, introspect, prepare, resolve
from monitor.hooks.alerts import AlertFanout, OnAlert, StackDump
from monitor.hooks.collector import StepCollector
from monitor.hooks.guard import ErrorGuard
from monitor.hooks.halt import HaltController, TrainingHalted
from monitor.hooks.hooked import CollectorOptions, Hooked
from monitor.hooks.judge import Judge
from monitor.hooks.publisher import Decoded, Publisher
from monitor.hooks.sampler import AttentionSampler, check_call
from monitor.rules.engine import RulesEngine
from monitor.runlog.events import EventWriter
from monitor.runlog.rundir import ALERTS_JSONL, JsonlAlertSink, RunDir, RunDirError
from monitor.schema import Alert

__all__ = ["Monitor", "RunDirError", "TrainingHalted", "attach"]


class Monitor:
    """A running monitor. Create it with `monitor.attach(...)`; close it with `close()` or a `with` block.

    The keyword-only arguments are for framework integrations (monitor.integrations), which know
    more about the loop than hooks can see: `resume_step` (as in `attach`: the loop's step index),
    `raise_on_halt=False` (the integration stops its trainer when
    `halt_requested` says so, instead of an exception from optimizer.step()), `forward_hooks=False`
    (the integration reports micro-batches to the collector), `runs_root` (the parent of the
    default run directory).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scaler: torch.amp.GradScaler | None = None,
        scheduler: Any | None = None,
        loss_fn: torch.nn.Module | None = None,
        run_dir: str | os.PathLike[str] | None = None,
        config: MonitorConfig | Mapping[str, Any] | str | os.PathLike[str] | None = None,
        max_steps: int | None = None,
        *,
        resume_step: int | None = None,
        raise_on_halt: bool = True,
        forward_hooks: bool = True,
        runs_root: str | os.PathLike[str] | None = None,
    ) -> None:
        prepare.check_args(model, optimizer, scaler, scheduler, loss_fn, run_dir, config, max_steps, resume_step)
        found = resolve.resolve(optimizer, scheduler)  # the objects inside Accelerate's/Lightning's wrappers
        optimizer, scheduler = found.optimizer, found.scheduler
        if scaler is None:
            scaler = found.scaler
        self.config = cfg = load_config(config)  # ConfigError names the key, before anything starts
        prepare.replace_earlier(model, optimizer)
        self._closed = False
        self._close_lock = threading.Lock()
        self._server: MetricsServer | None = None
        self._collector: StepCollector | None = None
        self._publisher: Publisher | None = None
        self._events: EventWriter | None = None
        self._jsonl: JsonlAlertSink | None = None
        self._http_sinks: list[Any] = []
        self._heartbeat: attempt.Heartbeat | None = None
        self.guard = ErrorGuard()

        dist = introspect.dist_info()
        self.rank, self.local_rank, self.world_size = dist.rank, dist.local_rank, dist.world_size
        store = ddp.job_store() if dist.world_size > 1 else None
        run_path = prepare.agree_on_run_dir(run_dir, dist, store, runs_root)
        prepare.replace_writer_of(run_path)
        self.rundir = RunDir(run_path, dist.rank)  # RunDirError names the path
        self.run_dir = self.rundir.path
        self.run_id = cfg.run_name or self.rundir.run_id
        # This process's attempt: RunDirBusy (a RunDirError) when another process writes the directory;
        # run.json not written (a full disk, its lock not free in time) is counted and the attempt goes on.
        started = attempt.begin(self.rundir, rank=dist.rank, store=store, optimizer=optimizer, scheduler=scheduler,
                                resume_step=resume_step, cfg=cfg.attempts, on_error=self.guard.record)
        self.attempt = started.attempt
        start_step = self.attempt.start_step

        params = introspect.optimizer_params(optimizer)
        names = introspect.param_names(model, params)
        self.info = prepare.run_info(self.run_id, cfg, world_size=dist.world_size, model=model, optimizer=optimizer,
                                     scaler=scaler, scheduler=scheduler, params=params, names=names,
                                     attempt=self.attempt, prior=started.prior, max_steps=max_steps)
        coordinator = None
        if store is not None and cfg.halt_on is not None:
            coordinator = ddp.HaltCoordinator(store, self.rank, cfg.ddp.halt_margin_seconds)
        self.halt = HaltController(cfg.halt_on, rank=self.rank, coordinator=coordinator, guard=self.guard,
                                   step=lambda: self.step, flush=self.flush, raise_on_halt=raise_on_halt,
                                   run_dir=self.run_dir)
        self._exchange = None
        if store is not None and cfg.ddp.exchange_every:
            self._exchange = ddp.RankExchange(store, self.rank, self.world_size, cfg.ddp.exchange_every,
                                              cfg.ddp.exchange_timeout)
        self._facts_written = False
        self._judge: Judge | None = None  # the rules engine, shared by the publisher, the watchdog and close()
        install_console_handler()
        try:
            self._start(cfg, Hooked(model, optimizer, params, scaler=scaler, scheduler=scheduler, loss_fn=loss_fn,
                                    scheduler_steps_per_step=found.scheduler_steps_per_step),
                        names, start_step, forward_hooks, started)
        except BaseException:
            exit.teardown(self)
            raise
        prepare.LIVE.add(self)
        atexit.register(self.close)
        if cfg.exit.handle_sigterm:
            exit.install_sigterm()

    def _start(self, cfg: MonitorConfig, hooked: Hooked, names: list[str], start_step: int,
               forward_hooks: bool, started: attempt.Started) -> None:
        registry = CollectorRegistry()
        self.metrics = TrainMetrics(registry, self.run_id, self.rank, attention_layers=cfg.attention.prometheus_layers)
        self.guard.listeners.append(self.metrics.count_error)
        if self.guard.count:  # counted before the metrics existed (run.json at the attempt's start)
            self.metrics.count_error(self.guard.count)

        sinks: list[Any] = [ConsoleSink()] if cfg.console.enabled else []
        self._jsonl = self._try("alerts.jsonl", lambda: JsonlAlertSink(self.run_dir / ALERTS_JSONL))
        self._http_sinks = build_http_sinks(cfg, registry=registry)  # webhook / Alertmanager: their own threads, never blocking
        sinks += [s for s in (self._jsonl, self.metrics, *self._http_sinks, self.halt) if s is not None]
        if cfg.on_alert is not None:
            sinks.append(OnAlert(cfg.on_alert))
        completions = [StackDump(self.run_dir, self.rank)] if cfg.watchdog.dump_stacks else []
        self._alerts = AlertFanout(sinks, self.guard)
        self.engine = RulesEngine(self.info, cfg.rules, sinks=[self._alerts], on_error=self.guard.record,
                                  completions=completions)
        self._alerts.active_source = self.engine.active  # read on the publisher thread, kept for the others
        self._judge = Judge(self.engine, self.guard)
        # Preflight: the checklist verdicts that need no step; they are printed now and kept in run.json.
        # A resumed attempt's rules first replay the records it builds on (warm start), delivering nothing.
        # The earlier attempts' alerts still firing are carried over or resolved, as monitor watch does.
        found = self.engine.start(self.rank, self.attempt, started.history, started.active)
        self.info.preflight = [a for a in found if a.status == "firing"]
        self._alerts.refresh()
        self.metrics.attempt(self.attempt)

        if cfg.metrics.enabled:  # bound to metrics.host, advertised (run.json, targets.json) as metrics.advertise
            self.metrics.extremes_window = cfg.metrics.extremes_window_seconds
            if self.rank == 0:
                self.metrics.run_info(self.world_size)
            self._server, self.info.endpoints = metrics_endpoint(registry, cfg.metrics, self.rank, self.local_rank)
        if self.rank == 0:  # a run.json write that fails (a full disk) is counted: the run goes on
            self._try("run.json", lambda: self.rundir.write_run_info(self.info))
            self._heartbeat = attempt.Heartbeat(self.rundir, self.attempt.id, cfg.attempts.heartbeat_seconds,
                                                self.guard.record)
        if self._server is not None:
            self._try("targets.json", lambda: self.rundir.add_endpoint(self.info.endpoints[0], self.run_id))
        elif cfg.metrics.enabled and started.prior is not None:  # an earlier attempt's endpoint is not this one
            self._try("targets.json", lambda: self.rundir.remove_endpoint(self.rank, run_json=True))

        model, params = hooked.model, hooked.params
        probe_model, why_not = prepare.probe_allowed(model, cfg)
        sharded = introspect.sharded(model, params)
        self.info.attention_probe = {"enabled": probe_model and self.rank == 0, "every": cfg.attention.every,
                                     **({"off": why_not} if why_not else {})}
        sampler = None
        if self.rank == 0:  # attention is the same on every rank: rank 0 measures it
            sampler = AttentionSampler(cfg.attention, start_step, model=model, probe_model=probe_model,
                                       guard=self.guard, on_probe=self.metrics.probe)
        self._publisher = self._start_publisher(cfg, names, sampler)
        self._collector = StepCollector(
            hooked,
            CollectorOptions(
                start_step=start_step, param_norms_every=cfg.collector.param_norms_every,
                count_tokens=cfg.collector.count_tokens, global_stats=self.rank == 0,
                # Sharded ranks hold different parameters by design: nothing to fingerprint.
                fingerprint_every=self._exchange.every if self._exchange and not sharded else 0,
                local_grad_norm=cfg.ddp.local_grad_norm and self.world_size > 1,
                forward_hooks=forward_hooks, sharded=sharded,
            ),
            handoff=self._publisher.submit, guard=self.guard, halt_check=self.halt.check, sampler=sampler,
        )
        if cfg.watchdog.enabled:
            self._judge.start_watchdog(cfg.watchdog.interval_seconds)

    def _try(self, where: str, fn: Callable[[], Any]) -> Any:
        """fn(), or None with the error counted: for what the run can go on without."""
        try:
            return fn()
        except Exception as e:
            self.guard.record(where, e)
            return None

    def _start_publisher(self, cfg: MonitorConfig, names: list[str], sampler: AttentionSampler | None) -> Publisher:
        """The publisher thread's stages, in order; each one's errors are counted under its name."""
        stages: list[Any] = []
        idle: list[Any] = []
        if self.halt.coordinator is not None:  # another rank's halt decision, and step times for the margin
            stages.append(("halt coordination", lambda s: self.halt.observe(s.record.step_time)))
            idle.append(("halt coordination", self.halt.poll))
        if sampler is not None:  # the probe's cost to the metrics; statistics that moved bring the next probe forward
            stages.append(("attention sampler", lambda s: sampler.observe_record(s.record.step, s.record.attention)))
        ex = self._exchange
        if ex is not None:
            stages.append(("rank exchange", lambda s: ex.observe(s.record, s.fingerprint)))
        if self.rank == 0:
            stages.append(("run.json facts", self._write_batch_facts))
        outputs = []
        if cfg.tensorboard.enabled:  # an event file that cannot be started (a full disk) is counted: none then
            self._events = self._try("event file", lambda: EventWriter(
                self.rundir.events_dir, self.rank, flush_secs=cfg.tensorboard.flush_secs,
                param_norms_every=cfg.tensorboard.param_norms_every, param_names=names, attempt=self.attempt.id))
        if self._events is not None:
            outputs.append(("tensorboard writer", self._events.write))
            idle.insert(0, ("event file flush", self._events.maybe_flush))
        outputs += [("prometheus metrics", self.metrics.observe), ("rules engine", self._judge.observe, self._judge.observe_many)]
        return Publisher(rank=self.rank, param_names=names, stages=stages, outputs=outputs, guard=self.guard,
                         queue_size=cfg.collector.queue_size, on_drop=self.metrics.count_dropped, idle=idle,
                         attempt=self.attempt.id)

    def _write_batch_facts(self, step: Decoded) -> None:
        """run.json, once: micro-batches per optimizer step and, when the batch size was seen, the effective batch."""
        if self._facts_written:
            return
        self._facts_written = True
        rec = step.record
        facts: dict[str, Any] = {"micro_batches_per_step": rec.micro_batches}
        if step.batch_size and rec.micro_batches:
            facts["per_device_batch"] = step.batch_size
            facts["effective_batch_size"] = step.batch_size * self.world_size * rec.micro_batches
        self.rundir.update_json("run.json", lambda old: {**(old or {}), **facts}, {})

    @property
    def halt_requested(self) -> str | None:
        """Why training must stop now (`halt_on`), once the step every rank agreed on is reached; else None.

        Framework integrations read it after each optimizer step to stop their trainer themselves.
        """
        return self.halt.reason

    # -- public API ---------------------------------------------------------------------------

    @property
    def alerts(self) -> list[Alert]:
        """Alerts raised (status 'firing') in this process so far, including preflight findings (a copy)."""
        raised = list(self.engine.alerts)  # one C-level copy of the list the publisher thread appends to
        return [a for a in raised if a.status == "firing"]

    @property
    def active_alerts(self) -> list[Alert]:
        """The alerts active now (a copy, as of the last alert the publisher thread delivered)."""
        return list(self._alerts.active)

    @property
    def step(self) -> int:
        """The index the next optimizer step will get."""
        return self._collector.step if self._collector else 0

    @property
    def metrics_url(self) -> str | None:
        return self._server.url if self._server else None

    @property
    def dropped_records(self) -> int:
        return self._publisher.dropped if self._publisher else 0

    @property
    def internal_errors(self) -> int:
        return self.guard.count

    def observe_attention(
        self,
        q: torch.Tensor | None = None,
        k: torch.Tensor | None = None,
        *,
        layer: str | None = None,
        logits: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        is_causal: bool = False,
        scale: float | None = None,
    ) -> None:
        """Report one attention call the probe cannot see (flash-attention, custom kernels, compiled models).

        Pass the queries and keys as SDPA takes them, (batch, heads, queries, dim) and (batch,
        kv_heads, keys, dim), or the pre-softmax `logits` (batch, heads, queries, keys). `mask` is
        SDPA's: bool (True = may attend) or float (added to the logits). Costs nothing on steps
        the probe does not sample; on sampled steps the first call per `layer` with autograd on
        counts (evaluation passes under no_grad are left out). Without `layer`, calls are named by
        their order in the forward: `attention.0`, `attention.1`, ...

        Inside a torch.compile'd forward it adds no graph break: the first `attention.batch`
        sequences are sliced in the graph and measured as it runs, on sampled steps. The name is a
        constant of the graph: blocks compiled one by one (one code object) that pass different
        names are compiled once per name, so leave `layer` out there and let the order name them.
        """
        if torch.compiler.is_compiling():
            c = self._collector
            if c is not None:  # a few sequences sliced in the graph, measured as it runs (hooks/compiled.py)
                compiled.observe_in_graph(c, self.config.attention.batch, q, k, logits, mask, layer, bool(is_causal),
                                          scale)
            return
        check_call(q, k, layer, logits, mask, is_causal=is_causal, scale=scale)
        if self._collector is not None and not self._closed:
            self._collector.observe_attention(q, k, layer, logits, mask, bool(is_causal), scale)

    @property
    def attention_due(self) -> bool:
        """True while the current step is one the attention probe samples (rank 0)."""
        c = self._collector
        return bool(c is not None and c.sampler is not None and c.sampler.due(c.step))

    def log(self, loss: Any = None, tokens: int | None = None, **scalars: Any) -> None:
        """Report values no hook can see: the loss (averaged over the step's calls), tokens, any scalar."""
        if self._collector is not None and not self._closed:
            self._collector.log(loss=loss, tokens=tokens, **scalars)

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until every finished step is written, exported and checked by the rules."""
        ok = self._publisher.flush(timeout) if self._publisher else True
        if self._events is not None:
            try:
                self._events.flush()
            except Exception as e:
                self.guard.record("event file flush", e)
        return ok

    def close(self) -> None:
        """Flush and stop everything within `exit.flush_seconds`; restores the hooked objects. Idempotent;
        also runs at exit and on SIGTERM; a no-op in a child made with os.fork."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        atexit.unregister(self.close)
        exit.teardown(self)  # local files first, the network last, within exit.flush_seconds (hooks/exit.py)
        exit.release_sigterm()

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Monitor(run_id={self.run_id!r}, rank={self.rank}, step={self.step}, run_dir={str(self.run_dir)!r})"


def attach(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None = None,
    scheduler: Any | None = None,
    loss_fn: torch.nn.Module | None = None,
    run_dir: str | os.PathLike[str] | None = None,
    config: MonitorConfig | Mapping[str, Any] | str | os.PathLike[str] | None = None,
    max_steps: int | None = None,
    runs_root: str | os.PathLike[str] | None = None,
    resume_step: int | None = None,
) -> Monitor:
    """Install the monitor's hooks on a training loop; call once, before the loop.

    Loss, LR per group, pre-clip gradient norms, clip coefficient, loss scale and
    skipped steps, step time and tokens are captured per optimizer step without
    further calls in the loop. Results go to `run_dir` (TensorBoard events,
    alerts.jsonl, run.json, targets.json) and to a Prometheus endpoint.
    Without `run_dir` (or $MONITOR_RUN_DIR) the run goes to `<runs_root>/<utc-time>-<host>`
    (runs_root: `runs`), a name the ranks of a distributed job agree on.
    Each attach into a run directory is one attempt (run.json `attempts`). A resume from a checkpoint
    is recognised from the restored scheduler or optimizer state; `resume_step` says it outright: the
    loop's index of the first step this process takes. The earlier attempts' records from that step on
    are superseded, and the rules start warm from the ones before it.
    Raises TypeError naming a wrong argument, ConfigError naming a bad config key,
    RunDirError naming an unwritable run directory (RunDirBusy, one of them, when another live
    process writes it).
    """
    return Monitor(model, optimizer, scaler=scaler, scheduler=scheduler, loss_fn=loss_fn, run_dir=run_dir,
                   config=config, max_steps=max_steps, runs_root=runs_root, resume_step=resume_step)

