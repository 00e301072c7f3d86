"""`monitor check`: the rules over a finished (or growing) run of any kind.

The path is anything `monitor.runlog.adapters.open_source` opens: a trainmon run directory, another
framework's TensorBoard logdir (`mapping` names tags detection does not know: {"loss": "my/loss"}),
or a Megatron-LM / llm.c text log.
"""

from __future__ import annotations

from pathlib import Path

from monitor.config import MonitorConfig
from monitor.rules.engine import RulesEngine
from monitor.runlog.reader import RunData, read_run
from monitor.schema import Alert


def check_run(run_dir: Path, config: MonitorConfig, mapping: dict[str, str] | None = None) -> tuple[RunData, list[Alert]]:
    """Replay every rank's records through a fresh engine, as `monitor watch` would have judged them live
    (attempt after attempt); returns the firing alerts, preflight first."""
    data = read_run(run_dir, mapping)
    engine = RulesEngine(data.info, config.rules, attempts=data.attempts)
    # Ranks are independent streams: each in reading order, preflight (from run.json's facts) first.
    for rank in sorted(data.stream) or [0]:
        stream = data.stream.get(rank, [])
        if stream:
            engine.begin(stream[0])
        else:
            engine.start(rank)
        engine.observe_many(stream)
    return data, [a for a in engine.alerts if a.status == "firing"]
