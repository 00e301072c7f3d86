"""The stall watchdog does not depend on the publisher: a step whose device copy never completes (a hung
kernel or collective) leaves the publisher waiting, and run.stalled with its stack dump still comes,
from the watchdog's own thread; close() still returns."""

from __future__ import annotations

import dataclasses
import threading
import time

import torch
from conftest import TinyLM, batches

import monitor


class NeverDone:
    """A device event that never completes (a kernel that hangs), on CPU."""

    def query(self) -> bool:
        return False

    def synchronize(self) -> None:
        threading.Event().wait()  # what waiting on a hung kernel does: forever


def _wait(cond, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


def test_run_stalled_and_its_stack_dump_come_while_the_publisher_waits_on_a_hung_device(tmp_path):
    cfg = {"metrics": {"enabled": False}, "console": {"enabled": False}, "watchdog": {"interval_seconds": 0.05},
           "rules": {"run.stalled": {"floor_seconds": 0.5, "factor": 2}}, "exit": {"flush_seconds": 2}}
    model = TinyLM()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    mon = monitor.attach(model, opt, run_dir=tmp_path / "run", config=cfg)
    submit = mon._collector._handoff
    hung = []

    def handoff(packet):
        if hung:  # the steps after the first five: their values sit behind a kernel that never ends
            packet = dataclasses.replace(packet, event=NeverDone())
        submit(packet)

    mon._collector._handoff = handoff
    try:
        for i, (x, y) in enumerate(batches(6)):
            if i == 5:
                assert mon.flush(10)
                hung.append(True)
            model(x, y)[1].backward()
            opt.step()
            opt.zero_grad()
        # The publisher now polls the hung step's event; the loop is "stuck" too (no more steps).
        assert _wait(lambda: any(a.rule == "run.stalled" for a in mon.alerts))
        stall = next(a for a in mon.alerts if a.rule == "run.stalled")
        assert stall.step == 4  # the last step whose record arrived
        assert list((tmp_path / "run").glob("stacks-rank0-step4.txt"))
        assert mon._publisher.alive and mon._publisher.published == 5
    finally:
        mon.close()  # returns: the hung step is given up (counted), not waited for forever
    assert mon.dropped_records == 1 and mon.internal_errors >= 1
