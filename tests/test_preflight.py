"""Preflight checks on real PyTorch objects: found at attach (and kept in run.json) or in the first steps."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TinyLM, batches

import monitor
from monitor.rules import REGISTRY, Finding, Rule, RuleConfig, register
from monitor.schema import Severity

QUIET = {"metrics": {"enabled": False}, "console": {"enabled": False}}


def _run(tmp_path, opt_factory, *, scaler=None, autocast=None, clip=True, steps=12):
    torch.manual_seed(0)
    model = TinyLM()
    opt = opt_factory(model)
    with monitor.attach(model, opt, scaler=scaler, run_dir=tmp_path / "r", config=QUIET) as mon:
        at_attach = [a.rule for a in mon.alerts]
        for x, y in batches(steps):
            with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
                _, loss = model(x, y)
            (scaler.scale(loss) if scaler else loss).backward()
            if scaler:
                scaler.unscale_(opt)
            if clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            if scaler:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
            opt.zero_grad()
        mon.flush()
        alerts = {a.rule: a for a in mon.alerts if a.rule.startswith("preflight.")}
    return at_attach, alerts, json.loads((tmp_path / "r" / "run.json").read_text())


def _groups(model, wd=0.1):
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    return [{"params": decay, "weight_decay": wd}, {"params": rest, "weight_decay": 0.0}]


def test_a_clean_setup_has_no_findings(tmp_path):
    at_attach, alerts, info = _run(tmp_path, lambda m: torch.optim.AdamW(_groups(m), lr=3e-4, betas=(0.9, 0.95)))
    assert alerts == {} and info["preflight"] == []


def test_coupled_adam_decay_and_decayed_norms_at_attach(tmp_path):
    at_attach, alerts, info = _run(tmp_path, lambda m: torch.optim.Adam(m.parameters(), lr=3e-4, weight_decay=0.1))
    assert {"preflight.adam_coupled_weight_decay", "preflight.decay_on_norm_bias"} <= set(at_attach)
    assert "AdamW" in alerts["preflight.adam_coupled_weight_decay"].hint
    assert "norm.weight" in alerts["preflight.decay_on_norm_bias"].message  # names the parameters
    assert {a["rule"] for a in info["preflight"]} >= {"preflight.adam_coupled_weight_decay"}


def test_lr_far_out_of_range_is_a_warning(tmp_path):
    _, alerts, _ = _run(tmp_path, lambda m: torch.optim.AdamW(_groups(m), lr=0.5))
    assert alerts["preflight.lr_range"].severity == Severity.warning


def test_fp16_autocast_without_grad_scaler_is_critical(tmp_path):
    _, alerts, _ = _run(tmp_path, lambda m: torch.optim.AdamW(_groups(m), lr=3e-4), autocast=torch.float16)
    assert alerts["preflight.fp16_without_scaler"].severity == Severity.critical


def test_grad_scaler_with_bf16_is_info_and_fp16_with_scaler_is_fine(tmp_path):
    _, alerts, _ = _run(tmp_path / "a", lambda m: torch.optim.AdamW(_groups(m), lr=3e-4),
                        scaler=torch.amp.GradScaler("cpu"), autocast=torch.bfloat16)
    assert alerts["preflight.scaler_with_bf16"].severity == Severity.info
    _, alerts, _ = _run(tmp_path / "b", lambda m: torch.optim.AdamW(_groups(m), lr=3e-4),
                        scaler=torch.amp.GradScaler("cpu"), autocast=torch.float16)
    assert alerts == {}


def test_no_clipping_is_reported_after_the_first_steps(tmp_path):
    _, alerts, _ = _run(tmp_path, lambda m: torch.optim.AdamW(_groups(m), lr=3e-4), clip=False)
    assert alerts["preflight.no_clipping"].severity == Severity.info


def test_a_users_own_rule_runs_in_the_training_process(tmp_path):
    class LossAboveThree(Rule):
        """The loss is above three.

        Symptom: loss > `limit`.
        Why: this user cares.
        Fix: train longer.
        """

        id = "custom.loss_above"
        family = "custom"
        severity = Severity.warning

        class Config(RuleConfig):
            limit: float = 3.0

        def observe(self, r):
            if r.loss is not None and r.loss > self.config.limit:
                return Finding(message=f"loss {r.loss:.2f}", hint="train longer", evidence={"loss": r.loss})
            return None

    register(LossAboveThree)
    try:
        model = TinyLM()
        opt = torch.optim.AdamW(_groups(model), lr=3e-4)
        cfg = {**QUIET, "rules": {"custom.loss_above": {"limit": 1.0}}}
        with monitor.attach(model, opt, run_dir=tmp_path / "r", config=cfg) as mon:
            for x, y in batches(3):
                model(x, y)[1].backward()
                opt.step()
                opt.zero_grad()
            mon.flush()
            assert [a.rule for a in mon.alerts if a.rule.startswith("custom.")] == ["custom.loss_above"]
        with pytest.raises(monitor.ConfigError, match=r"rules\.custom\.loss_above\.limt"):
            monitor.load_config({"rules": {"custom.loss_above": {"limt": 1}}})
    finally:
        REGISTRY.unregister("custom.loss_above")
