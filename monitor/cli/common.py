"""What the `monitor` commands share: exit codes, errors to exit codes, the config and --map options."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import click
import typer

from monitor.config import ConfigError, MonitorConfig, load_config

EXIT_FINDINGS = 1
EXIT_BAD_INPUT = 2
EXIT_DAMAGED = 3
EXIT_CRASH = 4


def fail(message: str, code: int = EXIT_BAD_INPUT) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


def one_line(message: str) -> str:
    """A message whose lines (a pydantic error's, say) are joined: one error, one line on stderr."""
    return " ".join(message.split())


def os_message(e: OSError) -> str:
    """An OSError in words, without Python's "[Errno N]" prefix: the file it names, then the OS's reason."""
    if e.strerror is None:
        return str(e)
    return f"{e.filename}: {e.strerror}" if e.filename is not None else e.strerror


@contextmanager
def crash_exit(command: str) -> Iterator[None]:
    """An unexpected exception inside: one line naming it on stderr and EXIT_CRASH, never the findings code.
    (typer.Exit is a RuntimeError: the command's own exits pass through.)"""
    try:
        yield
    except (typer.Exit, typer.Abort, click.exceptions.ClickException):
        raise
    except Exception as e:
        what = " ".join(f"{type(e).__name__}: {e}".split())
        typer.echo(f"error: monitor {command} failed unexpectedly: {what} (a trainmon bug, not a finding; "
                   "please report it)", err=True)
        raise typer.Exit(EXIT_CRASH) from None


def config_from(path: Path | None, *, warn: bool = True) -> MonitorConfig:
    try:
        return load_config(path, warn=warn)
    except ConfigError as e:
        raise fail(str(e)) from None


ConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", help="Config file (YAML/TOML/JSON): rule options and more.")
]


MapOpt = Annotated[
    list[str] | None, typer.Option("--map", help="SIGNAL=TAG for logs with other tag names (repeatable), e.g. "
                                                 "loss=train/my_loss; signals: loss, lr, grad_norm, loss_scale, skipped, "
                                                 "step_time, tokens, scalars.NAME; a TAG may be a glob (lr=opt/lr/*).")
]


def mapping_from(pairs: list[str] | None) -> dict[str, str] | None:
    from monitor.runlog.adapters.frameworks import validate_mapping
    from monitor.runlog.sources import SourceError

    out: dict[str, str] = {}
    for pair in pairs or []:
        name, sep, tag = pair.partition("=")
        if not sep or not name.strip() or not tag.strip():
            raise fail(f"--map expects SIGNAL=TAG (e.g. loss=train/loss), got {pair!r}")
        out[name.strip()] = tag.strip()
    if not out:
        return None
    try:
        return validate_mapping(out)
    except SourceError as e:
        raise fail(str(e)) from None
