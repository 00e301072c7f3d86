"""The rules engine delivers the same alerts, in the same order, however the records are batched.

The daemon feeds thousands of records at a time (`observe_many`), the in-process monitor one at a
time (`observe`); both go through each rule's one `observe`. Each case below runs one record
stream through a fresh engine in several deliveries and compares everything a caller can see: the
alerts returned, the alerts the sinks got (in order), `engine.alerts`, `active()`, the error count
and the records each test rule saw.
"""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest

from monitor.rules import REGISTRY, Finding, Rule, RuleRegistry, RulesEngine
from monitor.rules.engine import _CHUNK
from monitor.schema import ModelInfo, OptimizerInfo, ParamGroupInfo, RunInfo, Severity, StepRecord

RUN = RunInfo(run_id="t", model=ModelInfo(param_names=[f"p{k}" for k in range(4)]),
              optimizer=OptimizerInfo(name="AdamW", groups=[ParamGroupInfo(lr=1e-3, betas=[0.9, 0.95])]))


# -- test rules: each logs the (rank, step) of every record it sees -------------------------------------


class _Logged(Rule):
    family = "custom"
    severity = Severity.warning
    scope = "rank"
    log: list  # set per case

    def observe(self, r):
        self.log.append((type(self).id, r.rank, r.step))
        return self.judge(r)

    def judge(self, r):
        return None


class Raises(_Logged):
    """Raises on some records, fires on others.

    Symptom: s.
    Why: w.
    Fix: f.
    """

    id = "custom.raises"

    def judge(self, r):
        if r.step % 7 == 3:
            raise ZeroDivisionError(f"bug at step {r.step}")
        if r.step % 40 in (10, 11):  # fires, then resolves (resolve_after 3) and fires again later
            return Finding(message=f"odd step {r.step}", hint="h")
        return None


class Retires(_Logged):
    """Fires once, then retires a few records later: on each rank at a different step.

    Symptom: s.
    Why: w.
    Fix: f.
    """

    id = "custom.retires"

    def judge(self, r):
        if r.step == 4 + r.rank:
            return Finding(message=f"seen on rank {r.rank}", hint="h", severity=Severity.critical)
        if r.step == 9 + 3 * r.rank:
            self.retired = True
        if r.step == 13 + 3 * r.rank:
            raise AssertionError("fed after it retired")
        return None


class RetiresWhileRaising(_Logged):
    """Retires on a record on which it also raises.

    Symptom: s.
    Why: w.
    Fix: f.
    """

    id = "custom.retires_raising"

    def judge(self, r):
        if r.step == 20:
            self.retired = True
            raise ValueError("retired and broken")
        return None


class NeedsAttention(_Logged):
    """Only records with attention statistics.

    Symptom: s.
    Why: w.
    Fix: f.
    """

    id = "custom.needs_attention"
    needs = "attention"
    scope = "global"

    def judge(self, r):
        if r.attention is None:
            raise AssertionError("fed a record without the field it needs")
        if r.step % 30 == 0:
            return Finding(message="sampled", hint="h", severity=Severity.info)
        return None


class Escalates(_Logged):
    """A finding every record in a stretch, more severe as it goes (one alert, then an escalation).

    Symptom: s.
    Why: w.
    Fix: f.
    """

    id = "custom.escalates"

    def judge(self, r):
        if 50 <= r.step < 60:
            return Finding(message="bad", hint="h", severity=Severity.critical if r.step >= 55 else None)
        return None


_TEST_RULES = (Raises, Retires, RetiresWhileRaising, NeedsAttention, Escalates)


def _registry(log: list) -> RuleRegistry:
    reg = RuleRegistry()
    for cls in _TEST_RULES:
        reg.register(type(cls.__name__, (cls,), {"__doc__": cls.__doc__, "log": log}))
    return reg


# -- record streams -------------------------------------------------------------------------------------


def _interleaved(ranks: int, n: int, runs: list[int], seed: int = 0) -> list[StepRecord]:
    """n records per rank, the ranks' records interleaved in runs of the given lengths (cycled)."""
    rng = random.Random(seed)
    step = [0] * ranks
    out: list[StepRecord] = []
    k = 0
    while min(step) < n:
        for rank in range(ranks):
            for _ in range(runs[k % len(runs)]):
                if step[rank] >= n:
                    break
                s = step[rank]
                out.append(StepRecord(step=s, rank=rank, loss=2.0 + 0.01 * rng.random(), lr=[1e-3],
                                      attention={"l0": {"entropy_ratio": 0.8}} if s % 5 == 0 else None))
                step[rank] += 1
            k += 1
    return out


def spiky(n: int = 1500, seed: int = 0, rank: int = 0) -> list[StepRecord]:
    """A realistic stream that reaches every built-in rule's exact path: loss spikes (transient,
    persistent, with a gradient spike), NaN losses, gradient spikes, skipped AMP steps, a loss scale
    collapse, LR zeros, a scheduler stepped per micro-batch, a dead parameter, collapsing attention,
    a straggling rank, and a pause in the clock."""
    rng = random.Random(seed)
    loss_spikes = {300: 4.0, 301: 1.0, 600: 3.0, 601: 3.0, 602: 3.0, 603: 3.0, 900: 8.0, 1200: 50.0}
    grad_spikes = {600: 6.0, 900: 1.0, 1000: 20.0, 1001: 20.0, 1300: 3.0}
    out = []
    for s in range(n):
        loss = 3.0 * (1 + 0.02 * rng.gauss(0, 1)) * loss_spikes.get(s, 1.0)
        g = 0.7 * (1 + 0.1 * rng.gauss(0, 1)) * grad_spikes.get(s, 1.0)
        if s >= 1350 and s % 5 == 0:  # one-step bumps that grow through the alarm level, finely
            loss *= 1 + (s - 1350) / 150 * 0.4
            g *= 1 + (s - 1350) / 150 * 3.0
        if s in (450, 451):
            loss = math.nan
        ent = 0.8 if s < 1100 else 0.8 * 0.9 ** ((s - 1100) / 10)  # attention collapsing from step 1100
        skipped = s in (700, 701) or 1150 <= s < 1154  # AMP: a pair, then a run of skipped steps
        lr = 1e-3 * min(1.0, (s + 1) / 30) if seed % 2 else (0.0 if 1400 <= s < 1410 else 1e-3)
        out.append(StepRecord(
            step=s, rank=rank, loss=loss, lr=[lr], grad_norm=math.inf if skipped else g, skipped=skipped,
            clip_coef=min(1.0, 1 / g), max_norm=None if seed == 3 else 1.0,
            loss_scale=0.5 if 1460 <= s < 1465 else 2.0 ** (10 - skipped),
            scheduler_steps=4 if 500 <= s < 510 else 1, time=1.7e9 + s + (300 if s > 1200 else 0),
            param_norms={f"p{k}": 0.0 if k == 2 and s > 800 else g * (k + 1) / 4 for k in range(4)}
            if s % 2 == 0 else None,
            ddp={"step": s, "busy": {"0": 0.1, "1": 0.5 if s > 700 else 0.1}, "reported": [0, 1]}
            if s % 25 == 0 else None,
            attention={f"l{i}": {"entropy_ratio": ent * (1 - 0.05 * i), "entropy_min": ent / 2,
                                 "max_logit": 8.0 / ent} for i in range(3)} if s % 10 == 0 else None))
    return out


def _mix(*streams: list[StepRecord], run: int) -> list[StepRecord]:
    """The streams' records interleaved in runs of `run` consecutive records of each."""
    out: list[StepRecord] = []
    for i in range(0, max(map(len, streams)), run):
        for stream in streams:
            out += stream[i:i + run]
    return out


# -- deliveries -----------------------------------------------------------------------------------------


def _one_by_one(engine: RulesEngine, records: list[StepRecord]) -> list:
    return [a for r in records for a in engine.observe(r)]


def _all_at_once(engine: RulesEngine, records: list[StepRecord]) -> list:
    return engine.observe_many(iter(records))  # any iterable


def _chunks(sizes: list[int], seed: int):
    def deliver(engine: RulesEngine, records: list[StepRecord]) -> list:
        rng, out, i = random.Random(seed), [], 0
        while i < len(records):
            k = rng.choice(sizes)
            out += engine.observe_many(records[i:i + k])
            i += k
        return out
    deliver.__name__ = f"chunks of {sizes}"
    return deliver


DELIVERIES = [_all_at_once, _chunks([1, 2, 3], 1), _chunks([5, 64, _CHUNK + 1, 1000], 2),
              _chunks([1, 7, 300], 3)]


class _Sink:
    def __init__(self) -> None:
        self.got: list = []

    def emit(self, alert) -> None:
        self.got.append(alert)


def _key(alert) -> tuple:
    return (alert.rule, alert.severity.value, alert.status, alert.step, alert.rank, alert.message,
            repr(sorted(alert.evidence.items())))


def _deliver(make_engine, records, deliver) -> dict:
    sink, errors, log = _Sink(), [], []
    engine = make_engine(log)
    engine.attach([sink], on_error=lambda where, e: errors.append(where))
    for rank in sorted({r.rank for r in records}):
        engine.start(rank)
    sink.got.clear()  # what the records caused, from here
    returned = deliver(engine, records)
    return {
        "returned": [_key(a) for a in returned],
        "delivered": [_key(a) for a in sink.got],
        "alerts": [_key(a) for a in engine.alerts],
        "active": sorted(_key(a) for a in engine.active()),
        "errors": (engine.errors, Counter(errors)),  # counted alike; rule by rule, the order may differ
        "seen": {rule: [(rank, step) for r, rank, step in log if r == rule] for rule in {e[0] for e in log}},
    }


def _test_rules(log):
    return RulesEngine(RUN, {"custom.raises": {"resolve_after": 3, "cooldown_steps": 0}}, registry=_registry(log))


def _builtins(log):
    return RulesEngine(RUN, {})


CASES = [
    # (name, engine factory, records)
    ("test rules, one rank", _test_rules, _interleaved(1, 120, [1])),
    ("test rules, three ranks in runs of 1", _test_rules, _interleaved(3, 80, [1])),
    ("test rules, three ranks in uneven runs", _test_rules, _interleaved(3, 400, [1, 17, 3, 300, 2], seed=1)),
    ("built-in rules, one rank", _builtins, spiky(seed=0)),
    ("built-in rules, no clipping, LR warmup", _builtins, spiky(seed=3)),
    ("built-in rules, two ranks in runs of 37", _builtins, _mix(spiky(seed=0), spiky(seed=1, rank=1), run=37)),
    ("built-in rules, two ranks alternating", _builtins, _mix(spiky(seed=2), spiky(seed=3, rank=1), run=1)),
]


@pytest.mark.parametrize("deliver", DELIVERIES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("name, make_engine, records", CASES, ids=[c[0] for c in CASES])
def test_batches_deliver_what_one_by_one_does(name, make_engine, records, deliver):
    expected = _one_by_one_result(name, make_engine, records)
    assert _deliver(make_engine, records, deliver) == expected


_EXPECTED: dict[str, dict] = {}


def _one_by_one_result(name, make_engine, records) -> dict:
    if name not in _EXPECTED:
        got = _EXPECTED[name] = _deliver(make_engine, records, _one_by_one)
        assert got["returned"] == got["delivered"] == got["alerts"][len(got["alerts"]) - len(got["delivered"]):]
        assert got["alerts"], "the case raises no alert: it proves nothing"
    return _EXPECTED[name]


def test_the_test_rules_reach_every_situation():
    """The cases above are only worth something if they contain what they claim."""
    got = _one_by_one_result(*CASES[2])
    rules = {a[0] for a in got["alerts"]}
    assert rules == {"custom.raises", "custom.retires", "custom.needs_attention", "custom.escalates"}
    assert {"resolved", "firing"} <= {a[2] for a in got["alerts"]}
    escalated = [a[1] for a in got["alerts"] if a[0] == "custom.escalates" and a[2] == "firing" and a[4] == 0]
    assert escalated == ["warning", "critical"]
    errors, where = got["errors"]  # no rule was fed a record it should not see (they raise if so)
    assert errors == sum(where.values()) and set(where) == {"rule custom.raises", "rule custom.retires_raising"}
    assert where["rule custom.retires_raising"] == 3  # once per rank, on the record it retired on
    for rank in range(3):  # each retiring rule saw its rank's records up to the one it retired on, no more
        assert [s for r, s in got["seen"]["custom.retires"] if r == rank] == list(range(10 + 3 * rank))
        assert [s for r, s in got["seen"]["custom.retires_raising"] if r == rank] == list(range(21))
    assert [(a[0], a[4]) for a in got["active"] if a[0] == "custom.retires"] == [("custom.retires", r) for r in range(3)]
    assert all(s % 5 == 0 for _, s in got["seen"]["custom.needs_attention"])
    assert {r for r, _ in got["seen"]["custom.needs_attention"]} == {0}  # a global rule: rank 0 only

    builtin = _one_by_one_result(*CASES[5])
    fired = {(a[0], a[4]) for a in builtin["alerts"]}
    assert {("loss.spike", 0), ("loss.spike", 1), ("loss.nonfinite", 0), ("loss.nonfinite", 1),
            ("grad_norm.spike", 0), ("amp.overflow", 0), ("warmup.missing", 0)} <= fired
    assert builtin["errors"][0] == 0


# -- the quiet-record fast paths change nothing ---------------------------------------------------------


@pytest.mark.parametrize("rule_id", ["loss.spike", "grad_norm.spike"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_alarm_floor_fast_paths_find_and_keep_what_the_exact_tests_do(rule_id, seed, monkeypatch):
    """Below RobustWindow.alarm_floor a rule only moves its windows; with the floor at -inf every
    record takes the exact tests. Both give the same findings and leave the same state."""
    import pickle

    from monitor.rules.stats import RobustWindow

    cls = REGISTRY.get(rule_id)
    records = spiky(seed=seed)
    fast = cls(cls.Config(), RUN)
    got = [fast.observe(r) for r in records]
    monkeypatch.setattr(RobustWindow, "alarm_floor", lambda self, *a: -math.inf)
    exact = cls(cls.Config(), RUN)
    expected = [exact.observe(r) for r in records]
    assert [repr(f) for f in got] == [repr(f) for f in expected]
    assert sum(f is not None for f in expected) >= 1
    assert fast.window.quiet_below > -math.inf == exact.window.quiet_below
    fast.window.quiet_below = exact.window.quiet_below  # the one difference: where the fast path starts
    assert pickle.dumps(vars(fast)) == pickle.dumps(vars(exact))
