"""Imports every built-in rule module so they register (one module per family, warmup's in two)."""

from monitor.rules import (  # noqa: F401
    amp,
    attention,
    clip,
    ddp,
    grad,
    grad_norm,
    loss,
    lr,
    preflight,
    run,
    schedule,
    warmup,
)
