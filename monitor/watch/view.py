"""What `monitor watch` shows: a live table per run (terminal) or one line per event (pipes, logs)."""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable

from monitor.schema import Alert, RunInfo, Severity, printable
from monitor.watch.daemon import Watcher
from monitor.watch.run import RunView

BARS = "▁▂▃▄▅▆▇█"
STYLE = {Severity.info: "cyan", Severity.warning: "yellow", Severity.critical: "bold red"}


def sparkline(values, width: int = 24) -> str:
    vals = [math.log(v) for v in list(values)[-width:] if v is not None and v > 0 and math.isfinite(v)]
    if not vals:
        return ""
    lo, hi = min(vals), max(vals)
    span = hi - lo or 1.0
    return "".join(BARS[min(len(BARS) - 1, int((v - lo) / span * (len(BARS) - 1) + 0.5))] for v in vals)


def _attention(v) -> str:
    """Lowest entropy ratio and largest max logit over layers, of the latest attention sample."""
    if v.attn_entropy is None and v.attn_logit is None:
        return "-"
    return f"{_num(v.attn_entropy, '.2f')} / {_num(v.attn_logit, '.3g')}"


def _attempt(info: RunInfo) -> str:
    """The run's latest attempt when there are several (it was resumed or restarted), else ""."""
    if len(info.attempts) < 2:
        return ""
    a = info.attempts[-1]
    how = f"resumed at {a.start_step}" if a.kind == "resumed" else a.kind
    return f"attempt {a.id} ({how})"


def _num(v: float | None, fmt: str = ".4g") -> str:
    return "-" if v is None else format(v, fmt)


class PlainView:
    """One line per event on stdout: alerts (with their fix), runs appearing and vanishing, problems."""

    def __init__(self, write: Callable[[str], object] | None = None) -> None:
        self._write = write or (lambda line: print(line, flush=True))

    def event(self, line: str) -> None:
        self._write(f"{time.strftime('%H:%M:%S')} {line}")

    def emit(self, alert: Alert) -> None:  # an alert sink
        self.event(f"{printable(alert.run)}: {alert.line()}")

    def restore(self, alert: Alert) -> None:
        """Shown in the alert log by the watcher itself (Watcher.alert_log)."""

    def refresh(self) -> None:
        pass

    def close(self) -> None:
        pass


class LiveView(PlainView):
    """A rich table that redraws in place: a row per run, the alert log below it."""

    def __init__(self, watcher_ref: Callable[[], Watcher], metrics_url: str | None = None) -> None:
        from rich.console import Console
        from rich.live import Live

        self._watcher_ref = watcher_ref
        self._metrics_url = metrics_url
        self._events: list[str] = []
        self.console = Console()
        self.live = Live(console=self.console, refresh_per_second=2, transient=False)
        self.live.start()

    def event(self, line: str) -> None:
        self._events = (self._events + [f"{time.strftime('%H:%M:%S')} {line}"])[-8:]

    def emit(self, alert: Alert) -> None:
        pass  # shown from the watcher's alert log

    def refresh(self) -> None:
        self.live.update(self._render())

    def _render(self):
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        w = self._watcher_ref()
        table = Table(title="trainmon watch" + (f"  ·  {self._metrics_url}" if self._metrics_url else ""),
                      expand=True, title_justify="left")
        for col in ("run", "source", "ranks", "step", "loss", "", "lr", "grad norm", "loss scale", "attn H / max",
                    "steps/s", "alerts"):
            table.add_column(col, no_wrap=True)
        for run in sorted(w.runs.values(), key=lambda r: r.run_id):
            v: RunView = run.view
            active = run.engine.active()
            alerts = Text(", ".join(sorted({a.rule for a in active})) or "ok",
                          style=STYLE[max((a.severity for a in active), key=lambda s: s.rank)] if active else "green")
            state = "finished" if run.finished else "" if run.live else "idle"
            attempt = _attempt(run.source.info)  # the source reads run.json again when it changes
            name = f"{run.run_id} · {attempt}" if attempt else run.run_id
            table.add_row(name, run.source.info.source, str(len(v.ranks) or "-"),
                          _num(v.step, "d") + (f" ({state})" if state else ""), _num(v.loss), sparkline(v.losses),
                          _num(v.lr, ".3g"), _num(v.grad_norm, ".3g"), _num(v.loss_scale, ".3g"),
                          _attention(v), _num(v.steps_per_second, ".2f"), alerts)
        log = Table.grid()
        for a in list(w.alert_log)[-8:]:
            log.add_row(Text(f"{printable(a.run)}: {a.line()}", style=STYLE[a.severity] if a.status == "firing" else "green"))
        for e in self._events:
            log.add_row(Text(e, style="dim"))
        return Group(table, log)

    def close(self) -> None:
        self.refresh()
        self.live.stop()


def make_view(plain: bool | None, watcher_ref: Callable[[], Watcher], metrics_url: str | None) -> PlainView:
    if plain or (plain is None and not sys.stdout.isatty()):
        return PlainView()
    return LiveView(watcher_ref, metrics_url)
