"""mon.log with values it cannot record: each is left out with one warning naming it, the rest of the step
is recorded, and the steps go on as if it had not been called (numbered as the loop's, nothing piling up)."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import TinyLM, batches

import monitor
from monitor.hooks.packet import StepState
from monitor.runlog.reader import read_run

CFG = {"metrics": {"enabled": False}, "console": {"enabled": False}, "attention": {"enabled": False}}

# name: (the value, what the warning says about it)
BAD = {
    "None": (None, "got NoneType"),
    "a string": ("3.5", "got str '3.5'"),
    "a list": ([1.0, 2.0], "got list"),
    "a complex number": (1 + 2j, "got complex"),
    "an int past any float": (10**400, "got int"),
    "a vector": (torch.rand(3), "shape [3]"),
    "a complex tensor": (torch.tensor(1 + 2j), "torch.complex64"),
    "a meta tensor": (torch.empty((), device="meta"), "a meta tensor"),
    "a sparse tensor": (torch.tensor([1.0]).to_sparse(), "torch.sparse_coo"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_value_mon_log_cannot_record_is_left_out_once_named_and_the_steps_go_on(tmp_path, caplog, case):
    value, said = BAD[case]
    torch.manual_seed(0)
    model = TinyLM()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = monitor.attach(model, opt, run_dir=tmp_path / "r", config=CFG)
    losses = []
    with caplog.at_level(logging.WARNING, logger="trainmon"):
        for x, y in batches(6):
            loss = model(x, y)[1]
            loss.backward()
            losses.append(loss.item())
            mon.log(loss=value, bad=value, good=0.5, tokens=-3)
            opt.step()
            opt.zero_grad()
        mon.close()
    assert mon.step == 6 and mon.internal_errors == 0
    records = read_run(mon.run_dir).records[0]
    assert [r.step for r in records] == list(range(6))
    # the model's own loss stands in for the refused one; the good scalar is there, the bad one not
    assert [r.loss for r in records] == pytest.approx(losses) and all(r.scalars == {"good": 0.5} for r in records)
    warned = [r.getMessage() for r in caplog.records if "mon.log(" in r.getMessage()]
    named = ["bad", "tokens"] + (["loss"] if value is not None else [])  # loss=None is no loss: the default
    assert sorted(m.split("=")[0] for m in warned) == sorted(f"trainmon: mon.log({n}" for n in named), warned
    assert all(said in m for m in warned if "tokens" not in m), warned
    assert "0 or more (a number, or a CPU tensor: a device tensor would make the monitor wait for it); got int" in next(m for m in warned if "tokens" in m)
    assert "internal error" not in caplog.text


def test_the_values_mon_log_keeps():
    s = StepState()
    one = torch.tensor([2.5])  # one value in a shape: kept as it is (staged as float32)
    assert s.log(torch.tensor(1.5, requires_grad=True), 7, {"i": 3, "b": True, "h": torch.tensor(1.0).half(),
                                                            "one": one, "n": float("nan")}) == []
    assert not s.losses["log"][0].requires_grad and s.logged_tokens == 7
    assert s.scalars["i"] == 3.0 and s.scalars["b"] == 1.0 and s.scalars["one"] is not one
    assert s.scalars["n"] != s.scalars["n"]  # NaN is a real number: recorded, the rules judge it
    assert s.log(None, torch.tensor(5), {}) == [] and s.logged_tokens == 12
    assert s.log(None, 8.0, {}) == [] and s.log(None, torch.tensor(4.0), {}) == [] and s.logged_tokens == 24
    for bad in (2.5, -1, float("inf"), "7", torch.ones(2), [3], torch.tensor(4, device="meta")):
        assert [k for k, _ in s.log(None, bad, {})] == ["tokens"], bad
    assert s.logged_tokens == 24


def test_a_step_whose_record_cannot_be_made_still_ends(tmp_path):
    """Whatever makes a step's record fail (counted), the next step starts clean and keeps the loop's numbering:
    nothing of the failed step is carried into the next."""
    torch.manual_seed(0)
    model = TinyLM()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = monitor.attach(model, opt, run_dir=tmp_path / "r", config=CFG)
    collector = mon._collector
    real = collector.staging.stage

    def fails_at_step_2(layout, parts, tail):
        if collector.step == 2:
            raise RuntimeError("a value that cannot be staged")
        return real(layout, parts, tail)

    collector.staging.stage = fails_at_step_2
    for x, y in batches(5):
        model(x, y)[1].backward()
        opt.step()
        opt.zero_grad()
    mon.close()
    assert mon.step == 5 and mon.internal_errors == 1
    records = read_run(mon.run_dir).records[0]
    assert [(r.step, r.micro_batches) for r in records] == [(0, 1), (1, 1), (3, 1), (4, 1)]


def test_an_alert_sink_still_delivering_at_the_close_deadline_is_one_plain_line(tmp_path, caplog):
    """A webhook that never answers: close() keeps its deadline, counts what it dropped and says so in one
    line, not as an internal error with a traceback (it is the network's state, not the monitor's fault)."""
    import socket

    with socket.socket() as srv:  # accepts connections, never answers
        srv.bind(("127.0.0.1", 0))
        srv.listen(8)
        url = f"http://127.0.0.1:{srv.getsockname()[1]}/services/SECRETTOKEN"
        model = TinyLM()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        cfg = {**CFG, "exit": {"flush_seconds": 1.0},
               "sinks": {"webhook": {"url": url, "timeout": 30, "retries": 0, "min_severity": "info"}}}
        with caplog.at_level(logging.WARNING, logger="trainmon"):
            mon = monitor.attach(model, opt, run_dir=tmp_path / "r", config=cfg)
            for x, y in batches(3):
                model(x, y)[1].backward()
                mon.log(loss=float("nan"))  # an alert to deliver
                opt.step()
                opt.zero_grad()
            assert mon.flush(30)
            mon.close()
    said = [r for r in caplog.records if "did not finish within the close deadline" in r.getMessage()]
    assert len(said) == 1 and said[0].exc_info is None and "internal error" not in said[0].getMessage()
    assert said[0].getMessage().startswith("trainmon: alert sinks: ") and mon.internal_errors >= 1
    assert "SECRETTOKEN" not in caplog.text
