"""The `monitor` command line (typer): thin commands; domain errors become exit codes here.

Exit codes: 0 ok; 1 findings at or above --fail-on (check) or training halted (train, demo);
2 bad input (arguments, config, a path that is not a readable run); 3 damaged input (check: the run
was read, but with problems: a corrupt, vanished or unreadable file, an incomplete last event; reported
on stderr): findings win, so 3 means none reached --fail-on in what could be read; 4 an unexpected
error of trainmon itself (check: one line naming it on stderr), never 1.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Annotated

import typer

from monitor import __version__
from monitor.cli.common import (
    EXIT_DAMAGED,
    EXIT_FINDINGS,
    ConfigOpt,
    MapOpt,
    config_from,
    crash_exit,
    fail,
    mapping_from,
    one_line,
    os_message,
)
from monitor.cli.export_cmd import export_app
from monitor.config import MonitorConfig
from monitor.config_load import ignored_env, legacy_env
from monitor.schema import Severity

app = typer.Typer(
    name="monitor",
    help="trainmon: a health monitor for PyTorch training runs.",
    no_args_is_help=True,
    add_completion=True,  # --install-completion / --show-completion (bash, zsh, fish, PowerShell)
    pretty_exceptions_enable=False,
)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"trainmon {__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[bool | None, typer.Option("--version", callback=_print_version, is_eager=True,
                                                 help="Print trainmon's version and exit.")] = None,
) -> None:
    pass


@app.command()
def check(
    run_dir: Annotated[Path, typer.Argument(help="A run: a trainmon run directory, another framework's TensorBoard "
                                                 "logdir, or a Megatron/llm.c text log.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON array of alerts.")] = False,
    fail_on: Annotated[
        Severity, typer.Option("--fail-on", help="Exit 1 when an alert is at least this severe (it wins over exit "
                                                 "3, damaged input).")
    ] = Severity.warning,
    config: ConfigOpt = None,
    report: Annotated[
        Path | None, typer.Option("--report", help="Also write an offline HTML report (plots with alert markers).")
    ] = None,
    map_: MapOpt = None,
) -> None:
    """Run the rules over a finished run (ours or another framework's) and report what they find.

    Exit 0 clean, 1 an alert at least --fail-on severe, 2 bad arguments or no readable run at the path,
    3 damaged input (reported on stderr) and no such alert, 4 an unexpected error.
    """
    with crash_exit("check"):
        cfg = config_from(config)
        mapping = mapping_from(map_)
        _check(run_dir, cfg, mapping, as_json=as_json, fail_on=fail_on, report=report)


def _check(run_dir: Path, cfg: MonitorConfig, mapping: dict[str, str] | None, *, as_json: bool, fail_on: Severity,
           report: Path | None) -> None:
    from monitor.cli.check import examine_run
    from monitor.runlog.sources import SourceError

    try:
        result = examine_run(run_dir, cfg, mapping)
    except SourceError as e:  # (a pydantic error about run.json spans lines)
        raise fail(one_line(str(e))) from None
    except OSError as e:  # a file of the run the readers do not guard (run.json's permissions, say)
        raise fail(f"{run_dir}: unreadable: {os_message(e)}") from None
    data, alerts = result.data, result.alerts
    for p in result.damage:
        typer.echo(f"warning: {p}", err=True)
    for n in result.notes:
        typer.echo(f"note: {n}", err=True)
    if report is not None:
        from monitor.exporters.report import render_report

        try:  # text UTF-8 cannot hold (a lone surrogate in run.json, a file name that is not UTF-8) replaced
            report.write_text(render_report(data.info, data.records, alerts, problems=result.damage + result.notes),
                              encoding="utf-8", errors="replace")
        except OSError as e:
            raise fail(f"cannot write the report {report}: {e.strerror or e}") from None
        typer.echo(f"report written to {report}", err=True)
    if as_json:
        keys = {"rule", "severity", "step", "rank", "message", "hint", "evidence", "attempt"}
        # Through model_dump_json: NaN/Inf evidence becomes "NaN"/"Infinity", so the output is strict JSON.
        typer.echo(json.dumps([json.loads(a.model_dump_json(include=keys)) for a in alerts], indent=2))
    else:
        steps = sum(len(r) for r in data.records.values())
        damaged = f", {len(result.damage)} reading problem(s) (see above)" if result.damage else ""
        typer.echo(f"{run_dir}: {steps} step records from {len(data.records)} rank(s), {len(alerts)} alert(s)"
                   f"{damaged}")
        if len(data.info.attempts) > 1:  # resumed or restarted: the records that count are each rank's lineage
            from monitor.runlog.attempts import describe

            for a in data.info.attempts:
                typer.echo(f"  {describe(a)}")
        unknown = sum(r.grad_norm_unknown for rs in data.records.values() for r in rs)
        if unknown:
            typer.echo(f"note: the pre-clip gradient norm is unknown on {unknown} step record(s) (grad_norm_unknown): "
                       "clipping ran on each micro-batch, or sharded parameters had no clip reporting the global norm")
        for a in alerts:
            typer.echo(a.line())
    # Findings first: damage can hide findings, not make them, so what was found stands; a clean verdict
    # on a damaged run is not a clean verdict.
    if any(a.severity.at_least(fail_on) for a in alerts):
        raise typer.Exit(EXIT_FINDINGS)
    if result.damage:
        raise typer.Exit(EXIT_DAMAGED)


@app.command("config")
def config_cmd(
    config: ConfigOpt = None,
    markdown: Annotated[bool, typer.Option("--markdown", help="Print the reference of every key (docs/config.md).")] = False,
) -> None:
    """Print the effective configuration (defaults, the file, TRAINMON_* variables) as YAML, or the reference.

    Exit 2 naming the bad key when the file or a variable is invalid: check a config before a long job.
    Environment variables that are not read (TRAINMON_* names of no key, old MONITOR_* config variables)
    are listed on stderr, as YAML comments.
    """
    if markdown:
        from monitor.config_reference import config_markdown

        typer.echo(config_markdown(), nl=False)
        return
    import yaml

    cfg = config_from(config, warn=False)  # what the environment holds that is not read: said here, once
    ignored, legacy = ignored_env(), legacy_env()
    if ignored:
        typer.echo(f"# ignored environment variables (no config key of that name): {', '.join(ignored)}", err=True)
    if legacy:
        typer.echo(f"# not read: {', '.join(legacy)} (configuration variables now use the TRAINMON_ prefix)",
                   err=True)
    typer.echo(yaml.safe_dump(cfg.model_dump(mode="json", exclude={"on_alert"}), sort_keys=False), nl=False)


@app.command()
def rules(
    config: ConfigOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the catalogue as JSON.")] = False,
    markdown: Annotated[bool, typer.Option("--markdown", help="Print the catalogue as Markdown (docs/rules.md).")] = False,
) -> None:
    """List every rule with its severity, options and defaults, and its Symptom / Why / Fix.

    With --config, validate that file's rule options instead (exit 2 naming the bad key).
    """
    from monitor.rules.docs import catalogue, catalogue_markdown

    if config is not None:
        cfg = config_from(config)
        typer.echo(f"{config}: valid ({len(cfg.rules)} rule(s) configured)")
        return
    if markdown:
        typer.echo(catalogue_markdown(), nl=False)
        return
    rows = catalogue()
    if as_json:
        typer.echo(json.dumps(rows, indent=2, default=str))
        return
    for r in rows:
        typer.echo(f"{r['id']}  [{r['severity']}]  {r['summary']}")
        typer.echo(f"    Symptom: {r['symptom']}")
        typer.echo(f"    Why:     {r['why']}")
        typer.echo(f"    Fix:     {r['fix']}")
        opts = ", ".join(f"{o['name']}={getattr(o['default'], 'value', o['default'])}" for o in r["options"])
        typer.echo(f"    Options: {opts}\n")


TrainPreset = Annotated[str, typer.Option("--preset", "-p", help="Trainer preset: tiny, small, medium or gpt2 (124M).")]
RunDirOpt = Annotated[
    Path | None, typer.Option("--run-dir", help="Run directory (default: runs/<utc-time>-<host> or $MONITOR_RUN_DIR).")
]


def _fault_opt(default_help: str = ""):
    # Static text: listing FAULTS here would import torch for every command (check and rules run without it).
    return typer.Option("--fault", "-f", help="Fault to plant (repeatable), e.g. no-warmup, lr-too-high, "
                        "fp16-overflow, nan-at:120; --list-faults explains each." + default_help)


@app.command()
def train(
    preset: TrainPreset = "tiny",
    fault: Annotated[list[str] | None, _fault_opt()] = None,
    steps: Annotated[int | None, typer.Option("--steps", help="Optimizer steps (max_steps).")] = None,
    precision: Annotated[str | None, typer.Option(help="fp32, bf16 or fp16 (with GradScaler).")] = None,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, cuda:1, ...")] = None,
    data: Annotated[str | None, typer.Option(help="synthetic, or text (Python's stdlib sources by default).")] = None,
    post_ln: Annotated[bool, typer.Option("--post-ln", help="Post-LN blocks instead of pre-LN.")] = False,
    grad_accum: Annotated[int | None, typer.Option(help="Micro-batches per optimizer step.")] = None,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate.")] = None,
    warmup: Annotated[int | None, typer.Option(help="Warmup steps (default: max(2/(1-beta2), 1% of steps)).")] = None,
    schedule: Annotated[
        str | None, typer.Option(help="cosine, linear, polynomial, inverse_sqrt, constant_cooldown or constant.")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of init and data.")] = None,
    checkpoint_dir: Annotated[Path | None, typer.Option(help="Save checkpoints here.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the latest checkpoint.")] = False,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Any TrainConfig field, KEY=VALUE (repeatable).")
    ] = None,
    run_dir: RunDirOpt = None,
    config: ConfigOpt = None,
    no_monitor: Annotated[bool, typer.Option("--no-monitor", help="Train without the monitor.")] = False,
    progress: Annotated[bool, typer.Option(help="Progress bar (terminal) or log lines.")] = True,
    list_faults: Annotated[bool, typer.Option("--list-faults", help="Explain every fault flag and exit.")] = False,
    nproc: Annotated[int, typer.Option("--nproc", min=1, help="DDP ranks on this machine: N > 1 runs torchrun "
                                                             "with N ranks sharing one run dir; 1: no torchrun.")] = 1,
    ddp_backend: Annotated[str | None, typer.Option(help="gloo or nccl (default: nccl on CUDA, gloo on CPU; gloo "
                                                         "lets ranks share one GPU).")] = None,
    resolved_config: Annotated[str | None, typer.Option(hidden=True, help="A TrainConfig as JSON (what --nproc "
                                                                          "passes to each rank).")] = None,
) -> None:
    """Train the reference GPT (monitored), optionally with planted faults, in one process or DDP (--nproc)."""
    from monitor.cli import train as cli

    if list_faults:
        typer.echo(cli.list_faults())
        return
    try:
        if resolved_config is not None:
            cfg = cli.config_from_json(resolved_config)
        else:
            overrides = {
                "max_steps": steps, "precision": precision, "device": device, "data": data,
                "grad_accum": grad_accum, "lr": lr, "warmup_steps": warmup, "schedule": schedule, "seed": seed,
                "checkpoint_dir": str(checkpoint_dir) if checkpoint_dir else None, "faults": fault or None,
                "ddp_backend": ddp_backend,
            }
            if post_ln:
                overrides["post_ln"] = True
            if resume:
                overrides["resume"] = True
            overrides.update(cli.parse_sets(set_ or []))
            cfg = cli.build_config(preset, overrides)
        cli.check_launch(cfg, nproc)
    except ValueError as e:
        raise fail(str(e)) from None
    mon_cfg = config_from(config) if config else None
    if nproc > 1:
        code = cli.launch_ranks(cfg, nproc=nproc, run_dir=run_dir, config_path=config, no_monitor=no_monitor,
                                progress=progress)
    else:
        code = cli.execute(cfg, run_dir=run_dir, monitor_config=mon_cfg, no_monitor=no_monitor, progress=progress)
        if resolved_config is not None:  # a rank `monitor train --nproc` launched: its run is written
            from monitor.trainer.launch import exit_rank

            exit_rank(code)
    if code:
        raise typer.Exit(code)


DEMO_FAULTS = ["no-warmup", "nan-at:150"]


@app.command()
def demo(
    fault: Annotated[list[str] | None, _fault_opt(f" Default: {' '.join(DEMO_FAULTS)}.")] = None,
    preset: TrainPreset = "tiny",
    run_dir: RunDirOpt = None,
    linger: Annotated[
        float, typer.Option(help="Keep serving /metrics this many seconds after the last step.")
    ] = 0.0,
    progress: Annotated[bool, typer.Option(help="Progress bar (terminal) or log lines.")] = True,
) -> None:
    """The reference trainer with planted faults: alerts appear live, then where to look.

    By default the run has no LR warmup (a warning a few steps in) and a NaN loss at step 150
    (critical), and halts on the critical alert, as `halt_on: critical` would in your own run.
    """
    from monitor.cli.train import build_config, run_training, where_to_look

    try:
        cfg = build_config(preset, {"faults": fault or DEMO_FAULTS})
    except ValueError as e:
        raise fail(str(e)) from None
    typer.echo(f"trainmon demo: {preset} GPT with fault(s) {', '.join(cfg.faults)}; alerts print as they fire.")
    result, url, halted, mon = run_training(cfg, run_dir=run_dir, monitor_config={"halt_on": "critical"},
                                            progress=progress, linger=linger)
    if halted:
        typer.echo(f"\n{halted}")
    if mon is not None:
        typer.echo(where_to_look(Path(mon.run_dir), url, len(mon.alerts)))


@app.command()
def watch(
    paths: Annotated[list[Path], typer.Argument(help="Directories to watch: trainmon run dirs, TensorBoard logdirs "
                                                     "of other frameworks, text logs, or folders holding them.")],
    config: ConfigOpt = None,
    state_dir: Annotated[
        Path | None, typer.Option(help="Where what the rules judged and the active alerts survive "
                                       "restarts (default: $XDG_STATE_HOME/trainmon/watch).")
    ] = None,
    metrics_host: Annotated[str, typer.Option(help="Address of the daemon's /metrics.")] = "127.0.0.1",
    metrics_port: Annotated[int, typer.Option(help="Port of the daemon's /metrics (0: any free port, -1: off).")] = 9739,
    map_: MapOpt = None,
    plain: Annotated[
        bool | None, typer.Option("--plain/--live", help="One line per event, or a live table (default: live on a "
                                                         "terminal).", show_default=False)
    ] = None,
    poll: Annotated[float, typer.Option(help="Seconds between reads of the runs.")] = 0.5,
    discover: Annotated[float, typer.Option(help="Seconds between looks for new runs.")] = 5.0,
    once: Annotated[bool, typer.Option("--once", help="Read everything once, report, save state and exit.")] = False,
) -> None:
    """Watch many runs: rules per run, one /metrics for all, alerts to the console and the configured sinks."""
    from monitor.cli.watch import run_watch
    from monitor.watch.state import default_state_dir

    for name, seconds in (("--poll", poll), ("--discover", discover)):
        if not (math.isfinite(seconds) and seconds > 0):  # 0, negative or NaN: a busy loop; inf: a crash
            raise fail(f"{name} must be a number of seconds > 0, got {seconds}")
    if not -1 <= metrics_port <= 65535:
        raise fail(f"--metrics-port must be a port in 0..65535 (0: any free port) or -1 (off), got {metrics_port}")
    cfg = config_from(config)
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise fail(f"no such path: {', '.join(missing)}")
    mapping = mapping_from(map_)
    try:
        run_watch(paths, cfg, state_dir=state_dir or default_state_dir(), host=metrics_host,
                  port=None if metrics_port < 0 else metrics_port, mapping=mapping, plain=plain, poll=poll,
                  discover=discover, once=once)
    except OSError as e:
        raise fail(os_message(e)) from None


app.add_typer(export_app, name="export")


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
