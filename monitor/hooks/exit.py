"""How a monitor ends: `close()` in order under one deadline, a SIGTERM, a child made with `os.fork`.

close() writes local state first, in the order a reader needs it: the queued steps through the
publisher (on rank 0 of a job, then the rank exchanges still pending, judged), the event file
(synced), alerts.jsonl (synced), run.json's end summary with the attempt's end, this rank's target
removed; then the network: the /metrics server, the webhook and Alertmanager sinks with the time that
is left. All within `exit.flush_seconds`; a part that does not finish in
time is given up and counted (`trainmon_internal_errors_total`).

SIGTERM (what schedulers, torchrun and `kill` send): with `exit.handle_sigterm`, attach on the main
thread installs a handler that closes the live monitors on a thread of its own, waits for them at
most their `flush_seconds`, then hands the signal on: to the handler that was there before, or, where
that was the default action, to the default action itself (the process ends by SIGTERM, as it would
have). An ignored SIGTERM, or a handler installed outside Python, is left alone: no handler then. A
second SIGTERM during the flush ends the process at once. Python runs the handler when the main
thread is next in the interpreter: a process stuck in a C call (a hung collective) is ended by the
launcher's SIGKILL, as before.

os.fork: the child has the monitor's objects but none of its threads. It must not do the parent's
close work (stop a server whose thread it does not have, write the parent's buffered bytes again):
a fork hook marks every monitor closed in the child, takes its close() off atexit and gives SIGTERM
back the handler it had before the monitor.
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from monitor.exporters.sinks import close_sinks
from monitor.hooks import attempt, prepare
from monitor.runlog.rundir import RUN_JSON
from monitor.schema import StepRecord

if TYPE_CHECKING:
    from monitor.hooks.attach import Monitor

log = logging.getLogger("trainmon")

# The longest rank 0's close waits for the other ranks' last exchange payloads (within exit.flush_seconds).
LAST_EXCHANGE_SECONDS = 5.0

_previous: Any = None  # the SIGTERM handler that was there before ours, while ours is installed


def teardown(mon: Monitor) -> None:
    """Everything close() does; also after a failed attach, for what was started."""
    deadline = time.monotonic() + mon.config.exit.flush_seconds

    def left() -> float:
        return max(0.0, deadline - time.monotonic())

    def step(where: str, fn: Callable[[], object]) -> None:
        try:
            fn()
        except TimeoutError as e:  # the close deadline passed (a slow disk or sink): counted, said plainly
            mon.guard.record(where, e, expected=True)
        except Exception as e:
            mon.guard.record(where, e)

    if getattr(mon, "rundir", None) is not None:
        mon.rundir.deadline = deadline  # lock waits end with the close
    if mon._judge is not None:
        step("watchdog", lambda: mon._judge.stop(min(5.0, left())))
    if mon._heartbeat is not None:
        step("attempt heartbeat", lambda: mon._heartbeat.stop(min(5.0, left())))
    if mon._collector is not None:
        step("removing hooks", mon._collector.remove)
    if mon._publisher is not None:
        step("publisher shutdown", lambda: _flushed(mon, left()))
        if getattr(mon, "_exchange", None) is not None:
            step("rank exchange", lambda: _last_exchange(mon, min(LAST_EXCHANGE_SECONDS, left())))
    if mon._events is not None:
        step("event file close", mon._events.close)
    if mon._jsonl is not None:
        step("alerts.jsonl close", mon._jsonl.close)
    if mon.rank == 0 and hasattr(mon, "attempt"):
        step("run.json", lambda: _write_end(mon))
    if mon._server is not None:
        step("targets.json", lambda: mon.rundir.remove_endpoint(mon.rank))
        step("metrics endpoint", mon._server.close)
    if mon._http_sinks:
        # (a moment even past the deadline: sinks with nothing pending close at once)
        step("alert sinks", lambda: _within(max(left(), 0.1), "the alert sinks' deliveries", close_sinks,
                                            mon._http_sinks))


def _flushed(mon: Monitor, timeout: float) -> None:
    if not mon._publisher.close(timeout):
        raise TimeoutError(f"steps still queued after exit.flush_seconds ({mon.config.exit.flush_seconds} s) "
                           "were not written")


def _last_exchange(mon: Monitor, timeout: float) -> None:
    """Rank 0: the rank exchanges still pending when its publisher stopped (the last `ddp.exchange_every`
    steps: no later record collects them) are compared and judged by the rules that read them (ddp.desync,
    ddp.straggler). The other ranks post their last payloads as they close: waited for up to `timeout`."""
    if mon._publisher.alive:  # stuck (a device wait): the exchange is still its thread's
        return
    for outcome in mon._exchange.finish(timeout):
        record = StepRecord(step=outcome["step"], rank=mon.rank, attempt=mon.attempt.id, ddp=outcome)
        mon._judge.observe_field(record, "ddp")


def _write_end(mon: Monitor) -> None:
    """run.json's end summary and the attempt's end, in one update."""
    ended = time.time()
    if mon._publisher is None:  # attach failed part-way: the attempt is over
        attempt.update(mon.rundir, mon.attempt.id, ended=ended)
        return
    summary: dict[str, Any] = {"ended": ended, "steps": mon.step, "records_published": mon._publisher.published,
                               "dropped_records": mon.dropped_records, "internal_errors": mon.internal_errors}
    sampler = mon._collector.sampler if mon._collector else None
    if sampler is not None:
        summary["attention_probe"] = {**(mon.info.attention_probe or {}), **sampler.summary()}
    mon.rundir.update_json(
        RUN_JSON, lambda old: attempt.set_fields({**(old or {}), **summary}, mon.attempt.id, ended=ended, steps=mon.step),
        {})


def _within(timeout: float, what: str, fn: Callable[..., object], *args: Any) -> None:
    """fn(*args) on a thread of its own, waited for at most `timeout`: TimeoutError when it is not done."""
    t = threading.Thread(target=fn, args=args, name="trainmon-close", daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise TimeoutError(f"{what} did not finish within the close deadline; what they held is dropped")


# -- SIGTERM -------------------------------------------------------------------------------------


def _wants_sigterm(mon: Monitor) -> bool:
    return not mon._closed and mon.config.exit.handle_sigterm


def install_sigterm() -> None:
    """Install the SIGTERM handler (attach, when `exit.handle_sigterm`); only the main thread can."""
    global _previous
    if threading.current_thread() is not threading.main_thread():
        return
    current = signal.getsignal(signal.SIGTERM)
    if current is _on_sigterm or current is None or current == signal.SIG_IGN:
        return
    _previous = current
    signal.signal(signal.SIGTERM, _on_sigterm)


def release_sigterm() -> None:
    """Put the earlier handler back once no live monitor wants ours (and ours is still the one there)."""
    global _previous
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) is not _on_sigterm or any(_wants_sigterm(m) for m in list(prepare.LIVE)):
        return
    signal.signal(signal.SIGTERM, _previous if _previous is not None else signal.SIG_DFL)
    _previous = None


def _close_all(monitors: list[Monitor]) -> None:
    for mon in monitors:
        try:
            mon.close()
        except Exception as e:  # close() counts its own errors: this is a bug, said and passed over
            log.warning("trainmon: closing the monitor on SIGTERM failed: %r", e)


def _on_sigterm(signum: int, frame: Any) -> None:
    monitors = [m for m in list(prepare.LIVE) if _wants_sigterm(m)]
    if monitors:
        # On a thread of its own: the main thread may be stopped inside the monitor (a hook holding a
        # lock); the wait is bounded either way.
        closing = threading.Thread(target=_close_all, args=(monitors,), name="trainmon-exit", daemon=True)
        closing.start()
        closing.join(sum(m.config.exit.flush_seconds for m in monitors) + 1.0)
    previous = _previous
    if callable(previous):
        previous(signum, frame)
        return
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the default action: the process ends by SIGTERM
    os.kill(os.getpid(), signal.SIGTERM)


# -- os.fork -------------------------------------------------------------------------------------


def _forget_in_child() -> None:
    for mon in list(prepare.LIVE):
        mon._closed = True
        mon._close_lock = threading.Lock()  # (a parent thread may have held it at the fork)
        atexit.unregister(mon.close)
    # The child (a DataLoader worker) reacts to SIGTERM as it would without the monitor: at once, even
    # inside a C call, where the default action is the one before.
    try:
        if signal.getsignal(signal.SIGTERM) is _on_sigterm:
            signal.signal(signal.SIGTERM, _previous if _previous is not None else signal.SIG_DFL)
    except ValueError:  # not the main thread after all: ours stays, and only hands the signal on
        pass


os.register_at_fork(after_in_child=_forget_in_child)
