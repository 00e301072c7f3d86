"""The bundled reference trainer: a small GPT, deterministic data, the seed lesson's schedules and
fault flags that reproduce real training bugs, wired to `monitor.attach`.

    from monitor.trainer import TrainConfig, train
    result = train(TrainConfig.from_preset("tiny", faults=["no-warmup"]))
"""

from monitor.trainer.config import PRESETS, TrainConfig
from monitor.trainer.faults import FAULTS, FaultSpec
from monitor.trainer.loop import StepInfo, TrainResult, train
from monitor.trainer.model import GPT, GPTConfig

__all__ = [
    "FAULTS",
    "GPT",
    "PRESETS",
    "FaultSpec",
    "GPTConfig",
    "StepInfo",
    "TrainConfig",
    "TrainResult",
    "train",
]
