"""Imports every built-in rule module so they register (one module per family)."""

from monitor.rules import amp, attention, clip, ddp, grad, grad_norm, loss, lr, preflight, run, warmup  # noqa: F401
