"""trainmon: a health monitor for PyTorch training runs.

    import monitor
    mon = monitor.attach(model, optimizer, scaler=scaler, scheduler=scheduler)

Importing `monitor` does not import torch: `attach`, `Monitor` and
`TrainingHalted` load the hooks (and torch) on first use, so `monitor watch`
and `monitor check` run in environments without torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from monitor.config import ConfigError, MonitorConfig, load_config
from monitor.runlog.rundir import RunDirError
from monitor.schema import Alert, RunInfo, Severity, StepRecord

__version__ = "0.1.0"  # = pyproject.toml's version (tests/test_cli.py checks); `monitor --version` prints it

if TYPE_CHECKING:
    from monitor.hooks.attach import Monitor, TrainingHalted, attach

_LAZY = {"attach", "Monitor", "TrainingHalted"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from monitor.hooks import attach as _attach_mod

        return getattr(_attach_mod, name)
    raise AttributeError(f"module 'monitor' has no attribute {name!r}")


__all__ = [
    "Alert", "ConfigError", "Monitor", "MonitorConfig", "RunDirError", "RunInfo", "Severity", "StepRecord",
    "TrainingHalted", "attach", "load_config", "__version__",
]
