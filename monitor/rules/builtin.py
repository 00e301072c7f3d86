"""Imports every built-in rule module so they register (one module per family)."""

from monitor.rules import amp, grad_norm, loss, lr, warmup  # noqa: F401
