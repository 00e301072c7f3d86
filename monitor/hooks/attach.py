"""`monitor.attach(...)`: the one call that wires a training loop to the monitor."""

from __future__ import annotations

import atexit
import faulthandler
import logging
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from prometheus_client import CollectorRegistry

from monitor.config import MonitorConfig, load_config
from monitor.exporters.console import ConsoleSink, install_console_handler
from monitor.exporters.prometheus import MetricsServer, TrainMetrics, serve
from monitor.exporters.sinks import build_http_sinks, close_sinks
from monitor.hooks import compiled, ddp, introspect, resolve
from monitor.hooks.collector import StepCollector, TrainingHalted
from monitor.hooks.guard import ErrorGuard
from monitor.hooks.phases import window_phases
from monitor.hooks.publisher import Publisher
from monitor.rules.engine import RulesEngine
from monitor.runlog.events import EventWriter
from monitor.runlog.rundir import ALERTS_JSONL, JsonlAlertSink, RunDir, RunDirError, default_run_dir
from monitor.schema import PHASES, Alert, Endpoint, RunInfo

log = logging.getLogger("trainmon")

__all__ = ["Monitor", "RunDirError", "TrainingHalted", "attach"]


# Monitors not yet closed: a second attach to the same model or optimizer (a re-run notebook cell)
# closes the first, whose hooks would otherwise see every step twice.
_LIVE: weakref.WeakSet[Monitor] = weakref.WeakSet()


def _check_args(model, optimizer, scaler, scheduler, loss_fn, run_dir, config, max_steps) -> None:
    def bad(name: str, want: str, got: Any) -> TypeError:
        return TypeError(f"monitor.attach: `{name}` must be {want}, got {type(got).__name__}")

    if not isinstance(model, torch.nn.Module):
        raise bad("model", "a torch.nn.Module", model)
    resolve.check_not_deepspeed(model, optimizer)
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise bad("optimizer", "a torch.optim.Optimizer", optimizer)
    if scaler is not None and not isinstance(scaler, torch.amp.GradScaler):
        raise bad("scaler", "a torch.amp.GradScaler or None", scaler)
    if scheduler is not None and not callable(getattr(scheduler, "step", None)):
        raise bad("scheduler", "an LR scheduler (an object with a step() method) or None", scheduler)
    if loss_fn is not None and not isinstance(loss_fn, torch.nn.Module):
        raise bad("loss_fn", "a torch.nn.Module (e.g. nn.CrossEntropyLoss()) or None", loss_fn)
    if run_dir is not None and not isinstance(run_dir, (str, os.PathLike)):
        raise bad("run_dir", "a path (str or os.PathLike) or None", run_dir)
    if config is not None and not isinstance(config, (MonitorConfig, Mapping, str, os.PathLike)):
        raise bad("config", "a MonitorConfig, a dict, a YAML/TOML path or None", config)
    if max_steps is not None and (isinstance(max_steps, bool) or not isinstance(max_steps, int)):
        raise bad("max_steps", "an int or None", max_steps)
    if max_steps is not None and max_steps <= 0:
        raise ValueError(f"monitor.attach: `max_steps` must be positive, got {max_steps}")
    if not any(True for g in optimizer.param_groups for _ in g["params"]):
        raise ValueError("monitor.attach: `optimizer` has no parameters")


def _probe_allowed(model: torch.nn.Module, cfg: MonitorConfig) -> tuple[bool, str | None]:
    """Whether the attention probe may enter its TorchFunctionMode around this model's forward."""
    if not cfg.attention.enabled:
        return False, "attention.enabled is false"
    # torch.compile's OptimizedModule holds the original as submodule `_orig_mod` (checked by name:
    # importing torch._dynamo to test the type would cost a second at attach).
    if any("_orig_mod" in m._modules for m in model.modules()):
        # A mode around a compiled graph would make dynamo recompile; report with observe_attention.
        return False, "compiled model: report attention with mon.observe_attention"
    return True, None


def _agree_on_run_dir(run_dir: str | os.PathLike[str] | None, dist: introspect.DistInfo, store: Any,
                      runs_root: str | os.PathLike[str] | None) -> Path:
    if run_dir is not None:
        return Path(run_dir)
    path = default_run_dir(parent=runs_root)
    if dist.world_size > 1 and store is not None and "MONITOR_RUN_DIR" not in os.environ:
        # Ranks start at slightly different times: rank 0's name wins, through the job's store (no
        # collective: a rank that does not attach the monitor cannot make the others wait forever).
        path = Path(ddp.agree_on_name(store, dist.rank, str(path)))
    return path


def _replace_earlier(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    inner = introspect.unwrap(model)
    for other in list(_LIVE):
        c = other._collector
        if other._closed or c is None:
            continue
        if c.optimizer is optimizer or introspect.unwrap(c.model) is inner:
            log.warning("trainmon: this model or optimizer already had a monitor (run dir %s); it is closed and "
                        "replaced by the new one", other.run_dir)
            other.close()


class Monitor:
    """A running monitor. Create it with `monitor.attach(...)`; close it with `close()` or a `with` block.

    The keyword-only arguments are for framework integrations (monitor.integrations), which know
    more about the loop than hooks can see: `start_step` (the loop's step index, else the
    optimizer's own count), `raise_on_halt=False` (the integration stops its trainer when
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
        start_step: int | None = None,
        raise_on_halt: bool = True,
        forward_hooks: bool = True,
        runs_root: str | os.PathLike[str] | None = None,
    ) -> None:
        _check_args(model, optimizer, scaler, scheduler, loss_fn, run_dir, config, max_steps)
        found = resolve.resolve(optimizer, scheduler)  # the objects inside Accelerate's/Lightning's wrappers
        optimizer, scheduler = found.optimizer, found.scheduler
        if scaler is None:
            scaler = found.scaler
        self.config = cfg = load_config(config)  # ConfigError names the key, before anything starts
        _replace_earlier(model, optimizer)
        self._raise_on_halt = raise_on_halt
        self._closed = False
        self._close_lock = threading.Lock()
        self._server: MetricsServer | None = None
        self._collector: StepCollector | None = None
        self._publisher: Publisher | None = None
        self._events: EventWriter | None = None
        self._jsonl: JsonlAlertSink | None = None
        self._halt: Alert | None = None  # this rank's alert that asked for the halt
        self._halt_at: int | None = None  # the optimizer step at which to raise TrainingHalted
        self._halt_from: tuple[int, Alert] | None = None  # (rank, alert) of another rank's halt
        self._halt_raised = False
        self._step_times: deque[float] = deque(maxlen=16)  # recent step times: halt_margin_seconds in steps
        self._http_sinks: list[Any] = []
        self.guard = ErrorGuard()

        dist = introspect.dist_info()
        self.rank, self.local_rank, self.world_size = dist.rank, dist.local_rank, dist.world_size
        store = ddp.job_store() if dist.world_size > 1 else None
        self.rundir = RunDir(_agree_on_run_dir(run_dir, dist, store, runs_root), dist.rank)  # RunDirError names the path
        self.run_dir = self.rundir.path
        self.run_id = cfg.run_name or self.rundir.run_id

        params = introspect.optimizer_params(optimizer)
        names = introspect.param_names(model, params)
        if start_step is None:
            start_step = introspect.resumed_step(optimizer)
        self.info = RunInfo(
            run_id=self.run_id,
            hostname=introspect.hostname(),
            world_size=dist.world_size,
            max_steps=max_steps,
            start_step=start_step,
            torch_version=torch.__version__,
            cuda_version=torch.version.cuda,
            device=str(params[0].device),
            model=introspect.model_info(model, names),
            optimizer=introspect.optimizer_info(optimizer, dict(zip(map(id, params), names))),
            scaler=self._scaler_info(scaler),
            scheduler=type(scheduler).__name__ if scheduler is not None else None,
            schedule=introspect.schedule_preview(scheduler, max_steps) if start_step == 0 else None,
            config=cfg.model_dump(mode="json"),
        )
        self._halter = None
        if store is not None and cfg.halt_on is not None:
            self._halter = ddp.HaltCoordinator(store, self.rank, cfg.ddp.halt_margin_seconds)
        self._exchange = None
        if store is not None and cfg.ddp.exchange_every:
            self._exchange = ddp.RankExchange(store, self.rank, self.world_size, cfg.ddp.exchange_every,
                                              cfg.ddp.exchange_timeout)
        self._busy: list[float] = []
        self._phases: dict[str, list[float]] = {name: [] for name in PHASES}  # since the last exchange
        self._facts_written = False
        self._watchdog: threading.Thread | None = None
        self._watchdog_stop = threading.Event()
        install_console_handler()
        try:
            self._start(cfg, model, optimizer, scaler, scheduler, loss_fn, params, names, start_step,
                        forward_hooks, found.scheduler_steps_per_step)
        except BaseException:
            self._teardown()
            raise
        _LIVE.add(self)
        atexit.register(self.close)

    @staticmethod
    def _scaler_info(scaler: torch.amp.GradScaler | None) -> dict[str, Any] | None:
        if scaler is None:
            return None
        enabled = scaler.is_enabled()
        info: dict[str, Any] = {"enabled": enabled}
        if enabled:
            info.update(init_scale=scaler._init_scale, growth_factor=scaler._growth_factor,
                        backoff_factor=scaler._backoff_factor, growth_interval=scaler._growth_interval)
        return info

    def _start(self, cfg, model, optimizer, scaler, scheduler, loss_fn, params, names, start_step,
               forward_hooks, scheduler_steps_per_step) -> None:
        registry = CollectorRegistry()
        self.metrics = TrainMetrics(registry, self.run_id, self.rank, attention_layers=cfg.attention.prometheus_layers)
        self.guard.listeners.append(self.metrics.count_error)

        sinks: list[Any] = []
        if cfg.watchdog.dump_stacks:
            sinks.append(_StackDumpSink(self.run_dir, self.rank))  # first: the alert then names the file
        if cfg.console.enabled:
            sinks.append(ConsoleSink())
        self._jsonl = JsonlAlertSink(self.run_dir / ALERTS_JSONL)
        self._http_sinks = build_http_sinks(cfg)  # webhook / Alertmanager: their own threads, never blocking
        sinks += [self._jsonl, self.metrics, *self._http_sinks, _CallbackSink(self._on_alert)]
        self.engine = RulesEngine(self.info, cfg.rules, sinks=sinks, on_error=self.guard.record)
        # Preflight: the checklist verdicts that need no step; they are printed now and kept in run.json.
        self.info.preflight = self.engine.start(self.rank)

        if cfg.metrics.enabled:
            self._server = serve(registry, cfg.metrics.host,
                                 cfg.metrics.port + self.local_rank if cfg.metrics.port else 0,
                                 cfg.metrics.port_search)
            ep = Endpoint(rank=self.rank, local_rank=self.local_rank, host=cfg.metrics.host,
                          port=self._server.port, url=self._server.url)
            self.info.endpoints = [ep]
        if self.rank == 0:
            self.rundir.write_run_info(self.info)
        if self._server is not None:
            self.rundir.add_endpoint(self.info.endpoints[0], self.run_id)

        outputs = []
        if cfg.tensorboard.enabled:
            self._events = EventWriter(self.rundir.events_dir, self.rank, flush_secs=cfg.tensorboard.flush_secs,
                                       param_norms_every=cfg.tensorboard.param_norms_every, param_names=names)
            outputs.append(("tensorboard writer", self._events.write))
        outputs += [("prometheus metrics", self.metrics.observe), ("rules engine", self.engine.observe)]
        self._publisher = Publisher(
            rank=self.rank, param_names=names, outputs=outputs, guard=self.guard,
            queue_size=cfg.collector.queue_size, on_drop=self.metrics.count_dropped,
            idle=self._idle,
            before=self._before_outputs, on_tick=lambda: self.engine.tick(time.time()),
        )
        probe_model, why_not = _probe_allowed(model, cfg)
        sharded = introspect.sharded(model, params)
        self.info.attention_probe = {"enabled": probe_model and self.rank == 0, "every": cfg.attention.every,
                                     **({"off": why_not} if why_not else {})}
        self._collector = StepCollector(
            model=model, optimizer=optimizer, scaler=scaler, scheduler=scheduler, loss_fn=loss_fn,
            params=params, start_step=start_step, param_norms_every=cfg.collector.param_norms_every,
            count_tokens=cfg.collector.count_tokens, handoff=self._publisher.submit, guard=self.guard,
            halt_check=self._halt_check, global_stats=self.rank == 0,
            # Sharded ranks hold different parameters by design: nothing to fingerprint.
            fingerprint_every=self._exchange.every if self._exchange and not sharded else 0,
            local_grad_norm=cfg.ddp.local_grad_norm and self.world_size > 1,
            attention=cfg.attention, probe_model=probe_model,
            module_names={id(m): n for n, m in introspect.unwrap(model).named_modules()},
            forward_hooks=forward_hooks, scheduler_steps_per_step=scheduler_steps_per_step, sharded=sharded,
        )
        if cfg.watchdog.enabled:
            self._watchdog = threading.Thread(target=self._watch, args=(cfg.watchdog.interval_seconds,),
                                              name="trainmon-watchdog", daemon=True)
            self._watchdog.start()

    # -- publisher thread: between building a record and handing it out ------------------------

    def _idle(self) -> None:
        """Publisher thread, when no step came for a second."""
        if self._events is not None:
            self._events.maybe_flush()
        self._poll_halt()

    def _poll_halt(self) -> None:
        if self._halter is not None and self._halt_at is None:
            try:
                decision = self._halter.poll()
                if decision is not None:
                    self._apply_halt(decision)
            except Exception as e:  # a store hiccup must not cost the record its other outputs
                self.guard.record("halt coordination", e)

    def _apply_halt(self, decision: dict) -> None:
        if decision["rank"] != self.rank or self._halt is None:
            self._halt_from = (int(decision["rank"]), Alert.model_validate(decision["alert"]))
        self._halt_at = int(decision["at"])

    def _before_outputs(self, rec, packet, fingerprint) -> None:
        if rec.step_time is not None and rec.step_time > 0:
            self._step_times.append(rec.step_time)
        self._poll_halt()
        if packet.probe_cost is not None:
            self.metrics.probe(packet.probe_cost, packet.probe_every)
        sched = self._collector.schedule if self._collector is not None else None
        if rec.attention and sched is not None:
            sched.observe(rec.step, rec.attention)  # statistics that moved bring the next probe forward
        ex = self._exchange
        if ex is not None:  # the busy and phase times of the steps since the last exchange
            if rec.busy_time is not None:
                self._busy.append(rec.busy_time)
            for name, field in PHASES.items():
                v = getattr(rec, field)
                if v is not None:
                    self._phases[name].append(v)
            if ex.due(rec.step):  # sharded ranks post no fingerprint, but their times all the same
                busy = sum(self._busy) / len(self._busy) if self._busy else None
                self._busy.clear()
                phases = window_phases(self._phases)
                for values in self._phases.values():
                    values.clear()
                fp = ddp.pack_floats(fingerprint) if fingerprint is not None else None
                ex.post(rec.step, {"fp": fp, "busy": busy, "phases": phases})
            if ex.pending:
                outcomes = ex.collect()
                if outcomes:
                    rec.ddp = outcomes[-1]
        if not self._facts_written and self.rank == 0:
            self._facts_written = True
            self._write_batch_facts(rec, packet)

    def _write_batch_facts(self, rec, packet) -> None:
        """run.json: micro-batches per optimizer step and, when the batch size was seen, the effective batch."""
        facts: dict[str, Any] = {"micro_batches_per_step": rec.micro_batches}
        if packet.batch_size and rec.micro_batches:
            facts["per_device_batch"] = packet.batch_size
            facts["effective_batch_size"] = packet.batch_size * self.world_size * rec.micro_batches
        self.rundir.update_json("run.json", lambda old: {**(old or {}), **facts}, {})

    def _watch(self, interval: float) -> None:
        """The watchdog: asks the publisher thread to run the clock rules, even while the loop is stuck."""
        while not self._watchdog_stop.wait(interval):
            self._publisher.tick()

    # -- alerts ----------------------------------------------------------------------------

    def _on_alert(self, alert: Alert) -> None:
        """Publisher thread: the user's callback and the halt request."""
        if alert.status != "firing":
            return
        cfg = self.config
        if cfg.halt_on is not None and self._halt is None and alert.severity.at_least(cfg.halt_on):
            self._halt = alert
            if self._halter is None:
                self._halt_at = self.step  # alone: at the next optimizer step
            elif self._halt_at is None:
                # DDP: every rank stops at the same step (the first rank to ask sets it).
                # The median of recent steps: the slow first steps must not shrink the margin.
                recent = sorted(self._step_times)
                step_seconds = recent[len(recent) // 2] if recent else None
                try:
                    self._apply_halt(self._halter.request(self.step, step_seconds, alert.model_dump(mode="json")))
                except Exception as e:  # no store: this rank still halts, as asked
                    self.guard.record("halt coordination", e)
                    self._halt_at = self.step
        if cfg.on_alert is not None:
            cfg.on_alert(alert)

    def _halt_check(self) -> None:
        """Training thread, before each optimizer step: two int reads unless a halt is due."""
        at = self._halt_at
        if at is None or self._halt_raised or self.step < at or not self._raise_on_halt:
            return
        self._halt_raised = True  # raise once; a loop that catches it may go on
        self.flush()
        raise TrainingHalted(self.halt_requested, self._halt_from[1] if self._halt_from else self._halt)

    @property
    def halt_requested(self) -> str | None:
        """Why training must stop now (`halt_on`), once the step every rank agreed on is reached; else None.

        Framework integrations read it after each optimizer step to stop their trainer themselves.
        """
        at = self._halt_at
        if at is None or self.step < at:
            return None
        if self._halt_from is not None:
            rank, alert = self._halt_from
            why = f"rank {rank} raised {alert.line()}"
        else:
            why = self._halt.line()
        where = f" at step {self.step}, with every rank" if self._halter is not None else ""
        return f"trainmon halted training{where} (halt_on={self.config.halt_on!r}): {why} Run dir: {self.run_dir}"

    # -- public API ---------------------------------------------------------------------------

    @property
    def alerts(self) -> list[Alert]:
        """Alerts raised (status 'firing') in this process so far, including preflight findings."""
        return [a for a in self.engine.alerts if a.status == "firing"]

    @property
    def active_alerts(self) -> list[Alert]:
        return self.engine.active()

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
        if layer is not None and (not isinstance(layer, str) or not layer):
            raise TypeError(f"observe_attention: `layer` must be a non-empty str or None, got {layer!r}")
        if logits is None and not (isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor)):
            raise TypeError("observe_attention: pass `q` and `k` tensors, or `logits`")
        if logits is not None and not isinstance(logits, torch.Tensor):
            raise TypeError(f"observe_attention: `logits` must be a tensor, got {type(logits).__name__}")
        if mask is not None and not isinstance(mask, torch.Tensor):
            raise TypeError(f"observe_attention: `mask` must be a tensor or None, got {type(mask).__name__}")
        if self._collector is not None and not self._closed:
            self._collector.observe_attention(q, k, layer, logits, mask, bool(is_causal), scale)

    @property
    def attention_due(self) -> bool:
        """True while the current step is one the attention probe samples (rank 0)."""
        c = self._collector
        return bool(c is not None and c.schedule is not None and c.schedule.due(c.step))

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
        """Flush and stop everything; restores the hooked objects. Idempotent; also runs at exit."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        atexit.unregister(self.close)
        self._teardown()

    def _teardown(self) -> None:
        def step(where: str, fn) -> None:
            try:
                fn()
            except Exception as e:
                self.guard.record(where, e)

        self._watchdog_stop.set()
        if self._watchdog is not None:
            step("watchdog", lambda: self._watchdog.join(timeout=5))
        if self._collector is not None:
            step("removing hooks", self._collector.remove)
        if self._publisher is not None:
            step("publisher shutdown", self._publisher.close)
        if self._events is not None:
            step("event file close", self._events.close)
        if self._jsonl is not None:
            step("alerts.jsonl close", self._jsonl.close)
        if self._http_sinks:
            step("alert sinks", lambda: close_sinks(self._http_sinks))
        if self._server is not None:
            step("metrics endpoint", self._server.close)
            step("targets.json", lambda: self.rundir.remove_endpoint(self.rank))
        if self.rank == 0 and self._publisher is not None:
            step("run.json", self._write_summary)

    def _write_summary(self) -> None:
        summary = {"ended": time.time(), "steps": self.step, "records_published": self._publisher.published,
                   "dropped_records": self.dropped_records, "internal_errors": self.internal_errors}
        sched = self._collector.schedule if self._collector else None
        if sched is not None:
            summary["attention_probe"] = {**(self.info.attention_probe or {}), **sched.summary()}
            off = self._collector.probe_off or sched.off
            if off:
                summary["attention_probe"].update(enabled=False, off=off)
        self.rundir.update_json("run.json", lambda old: {**(old or {}), **summary}, {})

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Monitor(run_id={self.run_id!r}, rank={self.rank}, step={self.step}, run_dir={str(self.run_dir)!r})"


class _CallbackSink:
    def __init__(self, fn) -> None:
        self.emit = fn


class _StackDumpSink:
    """On run.stalled: every thread's Python stack into the run directory (a hung collective shows where)."""

    def __init__(self, run_dir: Path, rank: int) -> None:
        self.run_dir, self.rank = run_dir, rank

    def emit(self, alert: Alert) -> None:
        if alert.rule != "run.stalled" or alert.status != "firing":
            return
        path = self.run_dir / f"stacks-rank{self.rank}-step{alert.step}.txt"
        with open(path, "w") as f:
            f.write(f"trainmon: run.stalled at step {alert.step}, rank {self.rank}: {alert.message}\n\n")
            f.flush()
            faulthandler.dump_traceback(file=f, all_threads=True)
        alert.evidence["stacks"] = str(path)


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
) -> Monitor:
    """Install the monitor's hooks on a training loop; call once, before the loop.

    Loss, LR per group, pre-clip gradient norms, clip coefficient, loss scale and
    skipped steps, step time and tokens are captured per optimizer step without
    further calls in the loop. Results go to `run_dir` (TensorBoard events,
    alerts.jsonl, run.json, targets.json) and to a Prometheus endpoint.
    Without `run_dir` (or $MONITOR_RUN_DIR) the run goes to `<runs_root>/<utc-time>-<host>`
    (runs_root: `runs`), a name the ranks of a distributed job agree on.
    Raises TypeError naming a wrong argument, ConfigError naming a bad config key,
    RunDirError naming an unwritable run directory.
    """
    return Monitor(model, optimizer, scaler=scaler, scheduler=scheduler, loss_fn=loss_fn, run_dir=run_dir,
                   config=config, max_steps=max_steps, runs_root=runs_root)

