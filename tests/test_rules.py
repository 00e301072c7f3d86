"""Rules core: registry, engine lifecycle, and table-driven cases per rule on synthetic record streams."""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping

import pytest

from monitor.rules import REGISTRY, Finding, Rule, RuleConfig, RuleRegistry, RulesEngine
from monitor.rules.lifecycle import RuleState
from monitor.schema import ModelInfo, OptimizerInfo, ParamGroupInfo, RunInfo, Severity, StepRecord

RUN = RunInfo(run_id="t", optimizer=OptimizerInfo(name="AdamW", groups=[ParamGroupInfo(lr=1e-3, betas=[0.9, 0.95])]))


def recs(n: int, *, loss=2.0, lr=1e-3, grad_norm=1.0, skipped=False, start=0, loss_scale=None):
    """n records; each field is a constant or a function of the step."""
    def val(v, s):
        return v(s) if callable(v) else v
    return [
        StepRecord(step=s, loss=val(loss, s), lr=[val(lr, s)], grad_norm=val(grad_norm, s),
                   skipped=val(skipped, s), loss_scale=val(loss_scale, s))
        for s in range(start, start + n)
    ]


def warmup(peak=1e-3, steps=50):
    return lambda s: peak * min(1.0, (s + 1) / steps)


def cosine(peak=1e-3, warm=50, total=2000):
    def f(s):
        if s < warm:
            return peak * (s + 1) / warm
        return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (s - warm) / (total - warm))))
    return f


def noisy(base, amp=0.02, period=7):
    """Deterministic small noise around a base (a number or a function of the step)."""
    return lambda s: (base(s) if callable(base) else base) * (1 + amp * math.sin(s * 2.399 + s % period))


def run_rules(records, rule_ids=None, options=None, run=RUN):
    opts = dict(options or {})
    if rule_ids is not None:
        for cls in REGISTRY:
            if cls.id not in rule_ids:
                opts.setdefault(cls.id, {})["enabled"] = False
    engine = RulesEngine(run, opts)
    engine.observe_many(records)
    return [a for a in engine.alerts if a.status == "firing"]


CASES = [
    # (name, records, rule, expected: None = quiet, else (severity, first alert step, max detection step))
    ("nan loss", recs(30, loss=lambda s: math.nan if s >= 20 else 2.0), "loss.nonfinite", ("critical", 20, 20)),
    ("inf grad norm", recs(30, grad_norm=lambda s: math.inf if s == 12 else 1.0), "loss.nonfinite", ("critical", 12, 12)),
    ("inf grad on a skipped step is amp's business", recs(30, grad_norm=lambda s: math.inf if s == 12 else 1.0,
                                                          skipped=lambda s: s == 12, loss_scale=1024.0),
     "loss.nonfinite", None),
    ("healthy loss", recs(400, loss=noisy(lambda s: 3.0 * math.exp(-s / 300) + 1.0)), "loss.spike", None),
    ("loss spike with a gradient spike", recs(300, loss=noisy(lambda s: 8.0 if s == 250 else 2.0),
                                              grad_norm=noisy(lambda s: 6.0 if s == 250 else 1.0)),
     "loss.spike", ("critical", 250, 250)),
    ("loss jump that persists", recs(300, loss=noisy(lambda s: 8.0 if 250 <= s < 254 else 2.0)),
     "loss.spike", ("critical", 250, 252)),
    ("one hard batch: info", recs(300, loss=noisy(lambda s: 8.0 if s == 250 else 2.0)), "loss.spike", ("info", 250, 251)),
    ("spike inside the first window is a transient", recs(80, loss=noisy(lambda s: 8.0 if s == 30 else 2.0)),
     "loss.spike", None),
    ("loss only: three transient 2x spikes within 400 steps recur", recs(700, grad_norm=None, loss=noisy(
        lambda s: 4.0 if s in (250, 400, 560) else 2.0)), "loss.spike", ("info", 250, 560)),
    ("loss only: one isolated 2x spike stays info", recs(700, grad_norm=None, loss=noisy(
        lambda s: 4.0 if s == 250 else 2.0)), "loss.spike", ("info", 250, 251)),
    ("constant LR: no warmup", recs(40, lr=1e-3), "warmup.missing", ("warning", 0, 6)),
    ("cosine from peak: no warmup", recs(40, lr=lambda s: 1e-3 * math.cos(s / 100)), "warmup.missing", ("warning", 0, 6)),
    ("linear warmup", recs(100, lr=warmup()), "warmup.missing", None),
    ("peak first, then warmup (scheduler stepped after step 0)",
     recs(40, lr=lambda s: 1e-4 if s == 0 else 1e-4 * s / 2000), "warmup.missing", ("warning", 0, 1)),
    ("resumed run: start not seen", recs(40, lr=1e-3, start=5000), "warmup.missing", None),
    ("LR zero from integer division", recs(40, lr=lambda s: 1e-3 * (s // 100)), "lr.zero", ("critical", 0, 3)),
    ("LR decays to exactly zero at the end", recs(120, lr=lambda s: max(0.0, 1e-3 * (1 - s / 100))), "lr.zero", None),
    ("LR drops to zero mid-run", recs(80, lr=lambda s: 0.0 if s >= 40 else 1e-3), "lr.zero", ("critical", 40, 43)),
    ("GradScaler calibration and growth-interval skips",
     recs(2000, skipped=lambda s: s < 8 or s % 500 == 499, loss_scale=lambda s: 2.0 ** (16 - min(s, 8))),
     "amp.overflow", None),
    ("steady overflow", recs(100, skipped=lambda s: s < 5 or s >= 60, loss_scale=1.0), "amp.overflow",
     ("critical", 62, 62)),
    ("skip rate above 1%", recs(400, skipped=lambda s: s < 3 or (s > 50 and s % 40 == 0)), "amp.overflow",
     ("warning", 160, 160)),
    ("grad norm flat after warmup", recs(600, lr=cosine(), grad_norm=noisy(1.0, 0.1)), "grad_norm.growth", None),
    ("grad norm rising as the LR decays (by design)",
     recs(2000, lr=cosine(), grad_norm=noisy(lambda s: (cosine()(s) / 1e-3) ** -0.5, 0.1)), "grad_norm.growth", None),
    ("grad norm growing exponentially", recs(400, lr=warmup(), grad_norm=noisy(lambda s: math.exp(max(0, s - 100) / 60))),
     "grad_norm.growth", ("warning", None, 250)),
]


@pytest.mark.parametrize("name, records, rule, expected", CASES, ids=[c[0] for c in CASES])
def test_rule_cases(name, records, rule, expected):
    alerts = run_rules(records, [rule])
    if expected is None:
        assert alerts == [], [a.line() for a in alerts]
        return
    severity, first_step, max_detect = expected
    assert alerts, f"{rule} did not fire"
    a = alerts[0]
    assert a.rule == rule
    detected = a.evidence.get("detected_at", a.step)
    if first_step is not None:
        assert a.step == first_step
    assert detected <= max_detect
    assert any(x.severity == Severity(severity) for x in alerts)
    assert a.hint and a.message and a.evidence


def test_every_builtin_rule_is_declared_and_documented():
    ids = REGISTRY.ids()
    assert {"loss.nonfinite", "loss.spike", "warmup.missing", "lr.zero", "amp.overflow", "grad_norm.growth"} <= set(ids)
    for cls in REGISTRY:
        doc = cls.doc_sections()
        assert all(doc[k] for k in ("Symptom", "Why", "Fix"))
        assert cls.family == cls.id.split(".")[0]
        assert all(desc for _, _, desc in cls.config_fields()), f"{cls.id}: undocumented option"


def _rule(rule_id="custom.thing", doc="A thing.\n\nSymptom: s.\nWhy: w.\nFix: f.\n"):
    return type("R", (Rule,), {"id": rule_id, "family": "custom", "severity": Severity.warning, "__doc__": doc,
                               "observe": lambda self, r: None})


def test_registry_rejects_duplicates_bad_ids_and_undocumented_rules():
    reg = RuleRegistry()
    reg.register(_rule())
    with pytest.raises(ValueError, match="duplicate rule id 'custom.thing'"):
        reg.register(_rule())
    with pytest.raises(ValueError, match="must look like"):
        reg.register(_rule("NoDots"))
    with pytest.raises(TypeError, match="lacks section"):
        reg.register(_rule("custom.nodoc", doc="Only a summary."))


class _Threshold(Rule):
    """Loss above a threshold (a user's own rule).

    Symptom: loss above `limit`.
    Why: the user says so.
    Fix: do something.
    """

    id = "custom.threshold"
    family = "custom"
    severity = Severity.warning
    once = False

    class Config(RuleConfig):
        limit: float = 5.0

    def observe(self, r):
        if r.loss is not None and r.loss > self.config.limit:
            sev = Severity.critical if r.loss > 2 * self.config.limit else None
            return Finding(message=f"loss {r.loss}", hint="lower it", evidence={"loss": r.loss}, severity=sev)
        return None


def test_engine_lifecycle_one_alert_per_problem_escalation_resolution_cooldown():
    reg = RuleRegistry()
    reg.register(_Threshold)
    engine = RulesEngine(RUN, {"custom.threshold": {"resolve_after": 5, "cooldown_steps": 20}}, registry=reg)
    losses = [1] * 5 + [6] * 10 + [11] * 3 + [1] * 5 + [6] * 3 + [1] * 30 + [6] * 2
    out = engine.observe_many(StepRecord(step=i, loss=v) for i, v in enumerate(losses))
    got = [(a.status, a.severity.value, a.step) for a in out]
    assert got == [
        ("firing", "warning", 5),  # one alert for ten bad steps
        ("firing", "critical", 15),  # escalation
        ("resolved", "critical", 22),  # five quiet steps
        # the relapse at 23..25 falls inside the cooldown (until step 42): quiet
        ("firing", "warning", 56),
    ]


def test_user_rule_is_configurable_and_validated():
    reg = RuleRegistry()
    reg.register(_Threshold)
    engine = RulesEngine(RUN, {"custom.threshold": {"limit": 100}}, registry=reg)
    assert engine.observe_many(StepRecord(step=i, loss=50.0) for i in range(3)) == []
    with pytest.raises(ValueError, match=r"rules\.custom\.threshold\.limt: unknown option"):
        RulesEngine(RUN, {"custom.threshold": {"limt": 1}}, registry=reg)
    with pytest.raises(ValueError, match=r"rules\.custom\.nope: unknown rule id"):
        RulesEngine(RUN, {"custom.nope": {}}, registry=reg)


def test_broken_rule_is_counted_not_raised():
    class Broken(_Threshold):
        """Broken.

        Symptom: s.
        Why: w.
        Fix: f.
        """

        id = "custom.broken"

        def observe(self, r):
            raise ZeroDivisionError("bug in a rule")

    reg = RuleRegistry()
    reg.register(Broken)
    reg.register(_Threshold)
    seen = []
    engine = RulesEngine(RUN, {}, registry=reg, on_error=lambda where, e: seen.append(where))
    out = engine.observe_many(StepRecord(step=i, loss=9.0) for i in range(3))
    assert engine.errors == 3 and seen == ["rule custom.broken"] * 3
    assert [a.rule for a in out] == ["custom.threshold"]


def test_rules_are_per_rank():
    engine = RulesEngine(RUN, {})
    engine.observe_many(StepRecord(step=s, rank=1, lr=[1e-3 * (s + 1) / 50], loss=2.0) for s in range(30))
    engine.observe_many(StepRecord(step=s, rank=0, lr=[1e-3], loss=2.0) for s in range(30))
    fired = [(a.rule, a.rank) for a in engine.alerts if a.rule.startswith("warmup.")]
    assert fired == [("warmup.missing", 0)]


def _run(lr=1e-3, beta2=0.95, max_steps=None, trainable=1.0):
    return RunInfo(run_id="t", max_steps=max_steps,
                   optimizer=OptimizerInfo(name="AdamW", groups=[ParamGroupInfo(lr=lr, betas=[0.9, beta2])]),
                   model=ModelInfo(name="m", parameters=1000, trainable=int(1000 * trainable)))


def _unstable_at(step, base=2.0):
    return noisy(lambda s: float("nan") if s == step else base)


WARMUP_CALIBRATION = [
    # (name, run, records, rule, severities in order (empty: quiet))
    ("nanoGPT shakespeare_char: warmup 100, beta2 0.99, 5000 iters", _run(beta2=0.99, max_steps=5000),
     recs(400, lr=warmup(1e-3, 100), loss=noisy(lambda s: 4 * math.exp(-s / 80) + 1)), "warmup.too_short", ["info"]),
    ("the same, unstable right after its warmup", _run(beta2=0.99, max_steps=5000),
     recs(400, lr=warmup(1e-3, 100), loss=_unstable_at(150)), "warmup.too_short", ["info", "warning"]),
    ("a 3-step warmup with beta2 0.999 at a from-scratch LR", _run(beta2=0.999),
     recs(100, lr=warmup(1e-3, 3)), "warmup.too_short", ["warning"]),
    ("the same at a fine-tuning LR: advice", _run(lr=2e-5, beta2=0.999),
     recs(100, lr=warmup(2e-5, 3)), "warmup.too_short", ["info"]),
    ("a short run asks for at most 10% of itself", _run(beta2=0.999, max_steps=200),
     recs(200, lr=warmup(1e-3, 20)), "warmup.too_short", []),
    ("HF fine-tuning defaults: lr 5e-5, no warmup, linear decay", _run(lr=5e-5, beta2=0.999, max_steps=500),
     recs(200, lr=lambda s: 5e-5 * (1 - s / 500), loss=noisy(lambda s: 2 * math.exp(-s / 100) + 1)),
     "warmup.missing", ["info"]),
    ("no warmup at a fine-tuning LR, then a NaN", _run(lr=5e-5), recs(100, lr=5e-5, loss=_unstable_at(40)),
     "warmup.missing", ["info", "warning"]),
    ("no warmup at a from-scratch LR", _run(lr=6e-4), recs(40, lr=6e-4), "warmup.missing", ["warning"]),
    ("no warmup, adapters only (LoRA) at 2e-4", _run(lr=2e-4, trainable=0.01), recs(150, lr=2e-4),
     "warmup.missing", ["info"]),
]


@pytest.mark.parametrize("name, run, records, rule, severities", WARMUP_CALIBRATION,
                         ids=[c[0] for c in WARMUP_CALIBRATION])
def test_warmup_severity_follows_the_evidence(name, run, records, rule, severities):
    alerts = run_rules(records, [rule], run=run)
    assert [a.severity.value for a in alerts] == severities, [a.line() for a in alerts]
    for a in alerts:
        assert a.step == alerts[0].step and a.evidence
    if len(alerts) > 1:
        assert alerts[-1].evidence["instability"][0]["what"].startswith("loss nan")


def test_sgd_runs_are_not_held_to_adam_warmup():
    run = RunInfo(run_id="t", optimizer=OptimizerInfo(name="SGD"))
    assert run_rules(recs(40, lr=0.1), ["warmup.missing"], run=run) == []


# --- the rest of the catalogue ------------------------------------------------------------------

def _with(records, **fields):
    """Set per-step fields (constants or functions of the step) on records."""
    for r in records:
        for k, v in fields.items():
            setattr(r, k, v(r.step) if callable(v) else v)
    return records


def attn(ent, logit, low=None):
    return lambda s: {"blocks.0.attn": {"entropy_ratio": ent(s), "entropy_min": (low or ent)(s), "max_logit": logit(s)},
                      "blocks.1.attn": {"entropy_ratio": 0.8, "entropy_min": 0.7, "max_logit": 8.0}}


MORE_CASES = [
    ("deep clipping while the loss still falls fast (no warmup): info", _with(recs(120, lr=1e-4,
     loss=lambda s: 5 * math.exp(-s / 40) + 1, grad_norm=5.0), clip_coef=0.2, max_norm=1.0), "clip.saturated",
     ("info", None, 60)),
    ("deep clipping with the loss flat: warning", _with(recs(120, lr=1e-4, loss=noisy(2.0), grad_norm=5.0),
                                                       clip_coef=0.2, max_norm=1.0), "clip.saturated",
     ("warning", None, 60)),
    ("loss climbs and stays up", recs(200, lr=warmup(), loss=lambda s: 2.0 if s < 100 else 4.0),
     "loss.divergence", ("critical", 100, 125)),
    ("loss falls normally", recs(300, lr=warmup(), loss=noisy(lambda s: 5 * math.exp(-s / 50) + 0.5, 0.1)),
     "loss.divergence", None),
    ("warmup of 10 steps with beta2 0.95, stable: advice", recs(60, lr=warmup(steps=10)), "warmup.too_short",
     ("info", 9, 12)),
    ("warmup printed rounded (llm.c): repeats are not its end",
     recs(900, lr=lambda s: round(6e-4 * min(1.0, (s + 1) / 700), 6)), "warmup.too_short", None),
    ("warmup of 50 steps with beta2 0.95", recs(100, lr=warmup(steps=50)), "warmup.too_short", None),
    ("scheduler stepped 4x per optimizer step", _with(recs(20), scheduler_steps=4, micro_batches=4),
     "warmup.per_microbatch", ("critical", 0, 2)),
    ("scheduler stepped once per step", _with(recs(20), scheduler_steps=1), "warmup.per_microbatch", None),
    ("warmup replayed at step 150", recs(250, lr=lambda s: warmup()(s) if s < 150 else warmup()(s - 150)),
     "warmup.restart", ("warning", 150, 151)),
    ("step decay x0.1", recs(250, lr=lambda s: warmup()(s) * (0.1 if s >= 150 else 1.0)), "warmup.restart", None),
    ("cosine decay", recs(500, lr=cosine(total=500)), "warmup.restart", None),
    ("unclipped 8x grad norm spike", recs(300, lr=warmup(), grad_norm=noisy(lambda s: 8.0 if s == 200 else 1.0)),
     "grad_norm.spike", ("warning", 200, 200)),
    ("clipped grad norm spike is info", _with(recs(300, lr=warmup(), grad_norm=noisy(lambda s: 8.0 if s == 200 else 1.0)),
                                              clip_coef=lambda s: 0.125 if s == 200 else 1.0),
     "grad_norm.spike", ("info", 200, 200)),
    ("deep clipping on every step", _with(recs(200, lr=warmup()), clip_coef=0.2, max_norm=1.0, grad_norm=5.0),
     "clip.saturated", ("warning", 101, 101)),
    ("clipping only during warmup", _with(recs(200, lr=warmup()), clip_coef=lambda s: 0.5 if s < 50 else 1.0),
     "clip.saturated", None),
    ("loss scale below 1", recs(60, loss_scale=lambda s: 2.0 ** (10 - s)), "amp.scale_collapse", ("critical", 11, 11)),
    ("a skip right after each scale growth", recs(600, skipped=lambda s: s % 31 == 30,
                                                  loss_scale=lambda s: 2.0 ** 17 if s % 31 == 30 else 2.0 ** 16),
     "amp.overflow", None),
    ("attention entropy collapses in one layer",
     _with(recs(300, lr=warmup()), attention=lambda s: attn(lambda t: 0.9 if t < 200 else 0.3, lambda t: 10.0)(s)
           if s % 10 == 0 else None),
     "attention.entropy_collapse", ("critical", 200, 200)),
    ("one head goes one-hot", _with(recs(100), attention=attn(lambda t: 0.8, lambda t: 10.0,
                                                              lambda t: 0.005 if t >= 50 else 0.6)),
     "attention.entropy_collapse", ("critical", 50, 50)),
    ("healthy attention", _with(recs(300, lr=warmup()), attention=attn(noisy(0.85, 0.05), noisy(12.0, 0.1))),
     "attention.entropy_collapse", None),
    ("a head that was always one-hot (an attention sink) is no collapse",
     _with(recs(200, lr=warmup()), attention=attn(noisy(0.7, 0.05), lambda t: 10.0, lambda t: 0.004)),
     "attention.entropy_collapse", None),
    ("a layer far below the floor from the first sample", _with(recs(30), attention=attn(lambda t: 0.02, lambda t: 10.0)),
     "attention.entropy_collapse", ("critical", 0, 0)),
    ("attention logits above 1000", _with(recs(60), attention=attn(lambda t: 0.8, lambda t: 2000.0 if t >= 40 else 10.0)),
     "attention.logit_growth", ("critical", 40, 40)),
    ("attention logits growing fast", _with(recs(60), attention=attn(lambda t: 0.8, lambda t: 10.0 * 1.5 ** max(0, t - 30))),
     "attention.logit_growth", ("warning", None, 36)),
    ("healthy attention logits", _with(recs(60), attention=attn(lambda t: 0.8, noisy(20.0, 0.2))),
     "attention.logit_growth", None),
]

ONGOING_CASES = [
    ("deep clipping with the loss flat: one warning, held", _with(recs(400, lr=1e-4, loss=noisy(2.0), grad_norm=5.0),
                                                                 clip_coef=0.2, max_norm=1.0), {}),
    ("info while the loss falls fast, then a warning once it is flat",
     _with(recs(400, lr=1e-4, loss=lambda s: 5 * math.exp(-s / 20) + 1 if s < 150 else 1.0, grad_norm=5.0),
           clip_coef=0.2, max_norm=1.0), {}),
    ("clipping stops, the alert resolves, the cooldown passes, clipping comes back",
     _with(recs(700, lr=1e-4, loss=noisy(2.0), grad_norm=5.0), max_norm=1.0,
           clip_coef=lambda s: 1.0 if 150 <= s < 300 else 0.2), {"clip.saturated": {"cooldown_steps": 100}}),
    ("a configured severity over the rule's own", _with(recs(300, lr=1e-4, loss=noisy(2.0), grad_norm=5.0),
                                                       clip_coef=0.2, max_norm=1.0),
     {"clip.saturated": {"severity": "critical"}}),
    ("the pre-clip norm unknown on every step", _with(recs(120, lr=1e-4), grad_norm=None, grad_norm_unknown=True,
                                                      grad_norm_clipped=1.0, max_norm=1.0), {}),
]


@pytest.mark.parametrize("name, records, options", ONGOING_CASES, ids=[c[0] for c in ONGOING_CASES])
def test_a_rule_that_skips_composing_while_its_alert_stands_says_what_it_would_have_said(name, records, options,
                                                                                       monkeypatch):
    def alerts():
        engine = RulesEngine(RUN, {cls.id: {"enabled": cls.id == "clip.saturated"} for cls in REGISTRY}
                             | {k: {"enabled": True, **v} for k, v in options.items()})
        engine.observe_many(copy.deepcopy(records))
        return [a.model_dump(exclude={"time"}) for a in engine.alerts], [a.rule for a in engine.active()]

    reading = alerts()
    # The same stream with the rule never told its alert stands: it composes every finding in full.
    monkeypatch.setattr(RuleState, "set_active", lambda st, alert: setattr(st, "active", alert))
    composing = alerts()
    assert reading == composing
    assert reading[0] and reading[0][0]["message"]  # something fired, with its message


VANISH_RUN = RunInfo(run_id="t", optimizer=OptimizerInfo(name="AdamW"))
VANISH_RUN.model.param_names = ["a.weight", "b.weight", "dead.weight", "detached.weight"]


@pytest.mark.parametrize("name, records, rule, expected", MORE_CASES, ids=[c[0] for c in MORE_CASES])
def test_more_rule_cases(name, records, rule, expected):
    test_rule_cases(name, records, rule, expected)


def test_grad_vanishing_names_dead_and_detached_parameters():
    records = _with(recs(40), param_norms=lambda s: {"a.weight": 0.5, "b.weight": 0.3, "dead.weight": 0.0})
    alerts = run_rules(records, ["grad.vanishing"], {"grad.vanishing": {"stride": 1}}, run=VANISH_RUN)
    assert [a.rule for a in alerts] == ["grad.vanishing"]
    ev = alerts[0].evidence
    assert ev["params"] == ["dead.weight", "detached.weight"] and ev["grad_none"] == ["detached.weight"]
    assert alerts[0].step == 0 and ev["detected_at"] == 19
    healthy = _with(recs(40), param_norms=lambda s: {n: 0.1 + s for n in VANISH_RUN.model.param_names})
    assert run_rules(healthy, ["grad.vanishing"], {"grad.vanishing": {"stride": 1}}, run=VANISH_RUN) == []
    # by default every 10th step is examined: 20 samples are 200 steps
    late = _with(recs(200), param_norms=lambda s: {"a.weight": 0.5, "b.weight": 0.3, "dead.weight": 0.0})
    alerts = run_rules(late, ["grad.vanishing"], run=VANISH_RUN)
    assert alerts[0].evidence["detected_at"] == 190


def _facts(name="AdamW", lr=3e-4, betas=(0.9, 0.95), eps=1e-8, wd=0.1, one_d=0, scaler=None):
    return RunInfo(run_id="t", scaler=scaler, optimizer=OptimizerInfo(name=name, groups=[ParamGroupInfo(
        lr=lr, betas=list(betas), eps=eps, weight_decay=wd, decay_1d=one_d, decay_1d_names=["ln.weight"] * min(one_d, 1))]))


PREFLIGHT = [
    (_facts(), None, []),
    (_facts(name="Adam", wd=0.1), None, [("preflight.adam_coupled_weight_decay", "warning")]),
    (_facts(name="Adam", wd=0.0), None, []),
    (_facts(one_d=4), None, [("preflight.decay_on_norm_bias", "info")]),
    (_facts(one_d=4, wd=0.0), None, []),
    (_facts(lr=1.0), None, [("preflight.lr_range", "warning")]),
    (_facts(lr=5e-3), None, [("preflight.lr_range", "info")]),
    (_facts(name="SGD", lr=0.5, betas=()), None, []),
    (_facts(betas=(0.9, 0.5)), None, [("preflight.adam_hyperparameters", "info")]),
    (_facts(eps=1e-3), None, [("preflight.adam_hyperparameters", "info")]),
    (_facts(), "float16", [("preflight.fp16_without_scaler", "critical")]),
    (_facts(scaler={"enabled": True}), "float16", []),
    (_facts(scaler={"enabled": True}), "bfloat16", [("preflight.scaler_with_bf16", "info")]),
    (_facts(), "bfloat16", []),
]


@pytest.mark.parametrize("run, autocast, expected", PREFLIGHT)
def test_preflight(run, autocast, expected):
    engine = RulesEngine(run, {})
    engine.start(0)
    engine.observe_many(_with(recs(5, lr=warmup()), autocast=autocast, max_norm=1.0))
    got = [(a.rule, a.severity.value) for a in engine.alerts if a.rule.startswith("preflight.")]
    assert got == expected


def test_preflight_no_clipping_only_for_trainmon_runs():
    run = _facts()
    assert [a.rule for a in run_rules(recs(12, lr=warmup()), ["preflight.no_clipping"], run=run)] == [
        "preflight.no_clipping"]
    foreign = run.model_copy(update={"source": "huggingface"})
    assert run_rules(recs(12, lr=warmup()), ["preflight.no_clipping"], run=foreign) == []


def test_spike_alerts_name_the_parameters_that_moved():
    """Diagnosis: the parameters whose gradient norm rose most against their own baseline."""
    def norms(s):
        hot = 40.0 if s == 250 else 1.0
        return {"blocks.0.attn.c_attn.weight": 0.5 * hot, "blocks.0.mlp.c_fc.weight": 0.5, "wte.weight": 0.2}

    records = _with(recs(300, lr=warmup(), grad_norm=noisy(lambda s: 20.0 if s == 250 else 1.0)), param_norms=norms)
    alert = run_rules(records, ["grad_norm.spike"])[0]
    assert alert.step == 250
    assert alert.evidence["top_params"][0]["param"] == "blocks.0.attn.c_attn.weight"
    assert "blocks.0.attn.c_attn.weight x40" in alert.message


def test_run_stalled_from_the_clock_and_resolved_by_the_next_step():
    engine = RulesEngine(RUN, {"run.stalled": {"floor_seconds": 30, "factor": 10}})
    t0 = 1_000_000.0
    engine.observe_many(StepRecord(step=s, time=t0 + 2.0 * s, lr=[1e-3], loss=2.0) for s in range(20))
    last = t0 + 38.0
    assert engine.tick(last + 30) == []  # 10 x 2 s = 20 s, floored at 30 s: not yet
    fired = engine.tick(last + 31)
    assert [(a.rule, a.severity.value, a.step) for a in fired] == [("run.stalled", "critical", 19)]
    assert fired[0].evidence["timeout_seconds"] == 30.0
    assert engine.tick(last + 100) == []  # still the same stall: one alert
    out = engine.observe(StepRecord(step=20, time=last + 101, lr=[1e-3], loss=2.0))
    assert [(a.rule, a.status) for a in out] == [("run.stalled", "resolved")]


def test_foreign_inf_grad_norm_is_a_warning():
    """A Hugging Face fp16 log shows an inf grad norm on an overflow step without saying it was skipped."""
    hf = RunInfo(run_id="hf", source="huggingface")
    alerts = run_rules(recs(30, grad_norm=lambda s: math.inf if s == 12 else 1.0), ["loss.nonfinite"], run=hf)
    assert [(a.severity.value, a.step) for a in alerts] == [("warning", 12)]
    assert "skipped" in alerts[0].message
    nan_loss = run_rules(recs(30, loss=lambda s: math.nan if s == 12 else 2.0), ["loss.nonfinite"], run=hf)
    assert [a.severity.value for a in nan_loss] == ["critical"]


# -- the fast paths of the rules' statistics give the plain computation's exact floats ------------


def _plain_median_mad(values):
    vals = sorted(values)
    n, mid = len(vals), len(vals) // 2
    med = vals[mid] if n % 2 else 0.5 * (vals[mid - 1] + vals[mid])
    dev = sorted(abs(v - med) for v in vals)
    return med, dev[mid] if n % 2 else 0.5 * (dev[mid - 1] + dev[mid])


@pytest.mark.parametrize("size", [10, 11, 100, 101])
def test_robust_window_matches_the_plain_median_and_mad(size):
    import random

    from monitor.rules.stats import RobustWindow

    rng = random.Random(size)
    w = RobustWindow(size, refresh=1)
    for i in range(3 * size):
        x = rng.choice([rng.gauss(0, 1), round(rng.gauss(0, 1), 1), 1e300 * rng.random(), -0.0, 0.0])
        w.push(x)
        assert (w.med, w.mad) == _plain_median_mad(list(w.values)), i


@pytest.mark.parametrize("size", [1, 10, 11, 50])
def test_sorted_window_median_is_the_plain_median_of_its_finite_values(size):
    import random
    from statistics import median

    from monitor.rules.stats import SortedWindow

    rng = random.Random(size)
    w, kept = SortedWindow(size), []
    for i in range(4 * size + 3):
        x = rng.choice([rng.random(), round(rng.random(), 1), 1.0, 0.0, -0.0, math.nan, math.inf, 1e-30])
        w.push(x)
        if math.isfinite(x):
            kept = (kept + [x])[-size:]
        assert len(w) == len(kept) and list(w.order) == kept, i
        if kept:
            assert w.median() == median(kept), i


def test_param_baseline_fast_fold_matches_the_plain_fold():
    from monitor.rules.trackers import ParamBaseline

    names = [f"p{i}" for i in range(20)]
    fast, plain = ParamBaseline(), {}
    for step in range(60):
        norms = {n: (k + 1) * (1.0 + 0.3 * math.sin(step + k)) for k, n in enumerate(names)}
        if step == 30:
            norms["p3"] = math.nan  # one unusable value: the slow path, which skips it
        if step == 40:
            norms = {n: v for n, v in norms.items() if n != "p5"}  # a parameter without a gradient
        fast.calls = 0  # fold every record
        fast.update(norms)
        for n, v in norms.items():
            if v > 0 and math.isfinite(v):
                old = plain.get(n)
                plain[n] = math.log(v) if old is None else old + fast.alpha * (math.log(v) - old)
        assert fast.log_norms == plain and list(fast.log_norms) == list(plain), step


class _NoGradient(Mapping):
    """A decoded parameter vector of a step where no parameter had a gradient: empty, yet truthy (the
    vector was there)."""

    def __getitem__(self, name):
        raise KeyError(name)

    def __iter__(self):
        return iter(())

    def __len__(self) -> int:
        return 0

    def __bool__(self) -> bool:
        return True


def test_rules_read_parameter_vectors_without_any_gradient():
    """Rules must not trip over a vector without any gradient between ordinary ones."""
    names = ["a", "b", "c"]
    engine = RulesEngine(RUN.model_copy(update={"model": RUN.model.model_copy(update={"param_names": names})}), {})
    for s in range(400):
        norms = _NoGradient() if s % 7 == 0 else {n: 0.5 + 0.01 * (s % 5) for n in names}
        engine.observe(StepRecord(step=s, loss=2.0 + 0.01 * math.sin(s), lr=[1e-3 * min(1, (s + 1) / 50)],
                                  grad_norm=1.0, param_norms=norms))
    assert engine.errors == 0


def test_retired_rules_stop_on_their_own_rank_only_and_keep_their_alert():
    """A rule that sets `retired` sees no record of that rank after the one it retired on; the same rule
    on another rank goes on until it retires there too; an alert it raised stays active."""
    seen = []

    class Once(_Threshold):
        """Judges the first three records of a rank, then retires.

        Symptom: s.
        Why: w.
        Fix: f.
        """

        id = "custom.once"
        scope = "rank"

        def observe(self, r):
            seen.append((r.rank, r.step))
            if r.step == 2:
                self.retired = True
                return Finding(message="done", hint="h")
            return None

    reg = RuleRegistry()
    reg.register(Once)
    engine = RulesEngine(RUN, {}, registry=reg)
    engine.observe_many(StepRecord(step=s, rank=0, loss=2.0) for s in range(5))
    engine.observe_many(StepRecord(step=s, rank=1, loss=2.0) for s in range(2))
    assert seen == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)] and engine.errors == 0
    for s in range(2, 6):
        engine.observe(StepRecord(step=s, rank=1, loss=2.0))
    assert seen[-1] == (1, 2) and len(seen) == 6
    assert [(a.rank, a.step) for a in engine.active()] == [(0, 2), (1, 2)]

    builtin = RulesEngine(RUN, {})  # warmup.missing decides within the first steps, then retires
    builtin.observe_many(StepRecord(step=s, lr=[1e-3], loss=2.0) for s in range(30))
    assert [a.rule for a in builtin.alerts].count("warmup.missing") == 1


def test_ranks_started_are_the_ranks_with_rules():
    engine = RulesEngine(RUN, {})
    assert engine.ranks_started() == set()
    engine.start(2)
    engine.observe(StepRecord(step=0, rank=0, loss=2.0))
    assert engine.ranks_started() == {0, 2}


def test_rule_defaults_are_read_from_the_rule_config_class():
    """Other modules (the daemon's stall floor, the Prometheus rules) read a rule's defaults from its
    config class, never from a copy of the number."""
    from monitor.rules.run import RunStalledConfig

    cls = REGISTRY.get("run.stalled")
    assert cls.Config is RunStalledConfig
    assert cls.Config().floor_seconds == RunStalledConfig.model_fields["floor_seconds"].default == 120.0
    assert cls.Config().factor == 10.0
    assert REGISTRY.validate_options({"run.stalled": {"floor_seconds": 30}})["run.stalled"].floor_seconds == 30.0


@pytest.mark.parametrize("cls", [c for c in REGISTRY if c.needs], ids=lambda c: c.id)
def test_rules_that_need_a_field_do_nothing_without_it(cls):
    """`needs` lets the engine skip a rule for records that lack the field; that is only right if the
    rule itself would do nothing with them."""
    import pickle

    rule = cls(cls.Config(), RUN)
    full = {"attention": {"blocks.0.attn": {"entropy_ratio": 0.8, "max_logit": 9.0}},
            "ddp": {"step": 0, "busy": {"0": 0.1, "1": 0.5}, "reported": [0, 1]}}
    for s in range(40):
        rule.observe(StepRecord(step=s, loss=2.0, lr=[1e-3], grad_norm=1.0, **{cls.needs: full[cls.needs]}))
    before = pickle.dumps(rule.__dict__)
    for s in range(40, 60):
        assert rule.observe(StepRecord(step=s, loss=2.0, lr=[1e-3], grad_norm=1.0)) is None
    assert pickle.dumps(rule.__dict__) == before


def test_param_baselines_share_folds_of_the_same_vector_only_when_equal():
    from monitor.rules.trackers import ParamBaseline

    names = [f"p{i}" for i in range(6)]
    a, b, c, odd, plain, odd_plain = (ParamBaseline() for _ in range(6))
    odd.update({n: 9.0 for n in names})  # a different start: never shares with the others
    odd_plain.update({n: 9.0 for n in names})
    for step in range(45):
        vec = {n: (k + 1) * (1.0 + 0.2 * math.sin(step + k)) for k, n in enumerate(names)}
        for bl in (a, b, c, odd):
            bl.update(vec)
        plain.update(dict(vec))  # an equal vector, not the same one: folded on its own
        odd_plain.update(dict(vec))
        assert a.log_norms == b.log_norms == c.log_norms == plain.log_norms
        assert odd.log_norms == odd_plain.log_norms != plain.log_norms
    assert a.log_norms is b.log_norms is c.log_norms  # folded once, shared
    assert a.log_norms is not plain.log_norms


def test_param_baselines_share_folds_across_a_chunk_fed_rule_by_rule():
    """The engine feeds a chunk of records to one rule, then the next: the second baseline still finds
    the first one's folds of the whole chunk."""
    from monitor.rules.engine import _CHUNK
    from monitor.rules.trackers import _FOLDS, _FOLDS_KEPT, ParamBaseline

    vecs = [{"a": 1.0 + 0.1 * math.sin(s), "b": 2.0} for s in range(_CHUNK)]
    first, second = ParamBaseline(), ParamBaseline()
    for v in vecs:
        first.update(v)
    for v in vecs:
        second.update(v)
    assert second.log_norms is first.log_norms
    assert len(_FOLDS) <= _FOLDS_KEPT  # a bounded memo: it holds a few vectors, never a run's


def test_mad_by_bisection_equals_sorting_the_deviations():
    import random

    from monitor.rules.stats import _mad

    rng = random.Random(11)
    for trial in range(3000):
        n = rng.randint(1, 60)
        pool = [rng.gauss(0, 1), rng.gauss(5, 0.01), 0.0, -0.0, 1.0, round(rng.gauss(0, 3), 1)]
        vals = sorted(rng.choice(pool) if trial % 2 else rng.gauss(0, 10) for _ in range(n))
        assert _mad(vals, _plain_median_mad(vals)[0]) == _plain_median_mad(vals)[1], vals


SPIKES = [
    # (name, records, rule, whether it ends in a warning listing the spikes)
    ("three transient 2x loss spikes within 400 steps: the third escalates, listing them",
     recs(700, grad_norm=None, loss=noisy(lambda s: 4.0 if s in (250, 400, 560) else 2.0)), "loss.spike", True),
    ("the third in the cooldown after the first one's info: a worse finding gets through",
     recs(500, grad_norm=None, loss=noisy(lambda s: 4.0 if s in (250, 290, 310) else 2.0)), "loss.spike", True),
    ("the same spread over 900 steps: not recurring", recs(1200, grad_norm=None,
     loss=noisy(lambda s: 4.0 if s in (250, 700, 1150) else 2.0)), "loss.spike", False),
    ("hard batches of 1.3x recurring: not instability", recs(700, grad_norm=None,
     loss=noisy(lambda s: 2.6 if s in (250, 320, 400, 480) else 2.0)), "loss.spike", False),
    ("three clipped 6x gradient spikes within 400 steps", _with(recs(700, lr=warmup(), grad_norm=noisy(
        lambda s: 6.0 if s in (200, 300, 450) else 1.0)), clip_coef=lambda s: 0.2 if s in (200, 300, 450) else 1.0),
     "grad_norm.spike", True),
]


@pytest.mark.parametrize("name, records, rule, escalates", SPIKES, ids=[c[0] for c in SPIKES])
def test_recurring_spikes_escalate(name, records, rule, escalates):
    alerts = run_rules(records, [rule])
    assert alerts and alerts[0].severity.value == "info", [a.line() for a in alerts]
    loud = [a for a in alerts if a.severity.value != "info"]
    assert bool(loud) == escalates, [a.line() for a in alerts]
    if escalates:  # the third spike, within the cooldown of the second one's info or not
        assert loud == alerts[-1:] and len(loud[0].evidence["spike_steps"]) == 3
        assert "spikes of at least" in loud[0].message
