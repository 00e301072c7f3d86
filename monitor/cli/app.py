"""The `monitor` command line (typer): thin commands; domain errors become exit codes here.

Exit codes: 0 ok, 1 findings at or above --fail-on (check) or training halted,
2 bad input (arguments, config, run directory).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from monitor.config import ConfigError, MonitorConfig, load_config
from monitor.schema import Severity

app = typer.Typer(
    name="monitor",
    help="trainmon: a health monitor for PyTorch training runs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

EXIT_FINDINGS = 1
EXIT_BAD_INPUT = 2


def _fail(message: str, code: int = EXIT_BAD_INPUT) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


def _config(path: Path | None) -> MonitorConfig:
    try:
        return load_config(path)
    except ConfigError as e:
        raise _fail(str(e)) from None


ConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", help="Config file (YAML/TOML/JSON): rule options and more.")
]


@app.command()
def check(
    run_dir: Annotated[Path, typer.Argument(help="A trainmon run directory (holds run.json).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON array of alerts.")] = False,
    fail_on: Annotated[
        Severity, typer.Option("--fail-on", help="Exit 1 when an alert is at least this severe.")
    ] = Severity.warning,
    config: ConfigOpt = None,
) -> None:
    """Run the rules over a finished run and report what they find."""
    from monitor.cli.check import check_run
    from monitor.runlog.reader import RunReadError

    cfg = _config(config)
    try:
        data, alerts = check_run(run_dir, cfg)
    except RunReadError as e:
        raise _fail(str(e)) from None
    for p in data.problems:
        typer.echo(f"warning: {p}", err=True)
    if as_json:
        keys = {"rule", "severity", "step", "rank", "message", "hint", "evidence"}
        # Through model_dump_json: NaN/Inf evidence becomes "NaN"/"Infinity", so the output is strict JSON.
        typer.echo(json.dumps([json.loads(a.model_dump_json(include=keys)) for a in alerts], indent=2))
    else:
        steps = sum(len(r) for r in data.records.values())
        typer.echo(f"{run_dir}: {steps} step records from {len(data.records)} rank(s), {len(alerts)} alert(s)")
        for a in alerts:
            typer.echo(a.line())
    if any(a.severity.at_least(fail_on) for a in alerts):
        raise typer.Exit(EXIT_FINDINGS)


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
        cfg = _config(config)
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


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
