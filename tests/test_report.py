"""The HTML report: real StepRecords and alerts in, the page parsed back with html.parser and the
SVG fragments with an XML parser."""

from __future__ import annotations

import math
import random
import re
import time
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path

import pytest

from monitor.exporters.report import MAX_POINTS, downsample, format_evidence, render_report
from monitor.rules.engine import RulesEngine
from monitor.schema import Alert, OptimizerInfo, ParamGroupInfo, RunInfo, Severity, StepRecord

# --------------------------------------------------------------------------------------------
# a small DOM from html.parser


class Node:
    def __init__(self, tag: str, attrs: dict[str, str | None], parent: Node | None = None) -> None:
        self.tag, self.attrs, self.parent = tag, attrs, parent
        self.children: list[Node] = []
        self.content: list[Node | str] = []  # children and text, in document order

    @property
    def classes(self) -> set[str]:
        return set((self.attrs.get("class") or "").split())

    def text(self) -> str:
        return "".join(c if isinstance(c, str) else c.text() for c in self.content)

    def iter(self):
        yield self
        for c in self.children:
            yield from c.iter()

    def find_all(self, tag: str | None = None, cls: str | None = None, **attrs: str) -> list[Node]:
        return [n for n in self.iter() if (tag is None or n.tag == tag) and (cls is None or cls in n.classes)
                and all(n.attrs.get(k.replace("_", "-")) == v for k, v in attrs.items())]

    def find(self, *a, **kw) -> Node:
        found = self.find_all(*a, **kw)
        assert len(found) == 1, (a, kw, len(found))
        return found[0]


_VOID = {"meta", "br", "hr", "img", "input", "link", "area", "base", "col", "embed", "source", "track", "wbr"}


class _TreeBuilder(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Node("#root", {})
        self.cur = self.root

    def handle_starttag(self, tag, attrs):
        n = Node(tag, dict(attrs), self.cur)
        self.cur.children.append(n)
        self.cur.content.append(n)
        if tag not in _VOID:
            self.cur = n

    def handle_startendtag(self, tag, attrs):
        n = Node(tag, dict(attrs), self.cur)
        self.cur.children.append(n)
        self.cur.content.append(n)

    def handle_endtag(self, tag):
        n = self.cur
        while n is not self.root and n.tag != tag:
            n = n.parent
        assert n is not self.root, f"unbalanced </{tag}>"
        self.cur = n.parent

    def handle_data(self, data):
        self.cur.content.append(data)


def parse(doc: str) -> Node:
    b = _TreeBuilder()
    b.feed(doc)
    b.close()
    assert b.cur is b.root, "unclosed elements"
    return b.root


def plots(root: Node) -> dict[str, Node]:
    return {f.attrs["data-plot"]: f for f in root.find_all("figure", cls="plot")}


def omitted(root: Node) -> set[str]:
    return {n.attrs["data-plot"] for n in root.find_all("li", cls="omitted-plot")}


def series_labels(fig: Node) -> list[str]:
    return [g.attrs["data-series"] for g in fig.find("g", cls="series").children]


def check_self_contained(doc: str) -> None:
    assert "http://" not in doc and "https://" not in doc
    assert not re.search(r"<(script|link|img|iframe|object|embed)\b", doc, re.I)
    assert not re.search(r"url\(", doc, re.I)
    assert not re.search(r'\b(src|href)="(?!#)', doc)  # only in-page anchors
    assert "@import" not in doc


def check_svgs_are_xml(doc: str) -> int:
    svgs = re.findall(r"<svg\b.*?</svg>", doc, re.S)
    for s in svgs:
        ET.fromstring(s)  # well-formed: every attribute quoted, every text escaped
    return len(svgs)


def check_markers(root: Node, firing: list[Alert]) -> None:
    """Every plot: exactly one marker per firing alert, with its tooltip."""
    for key, fig in plots(root).items():
        markers = fig.find_all("g", cls="alert-marker")
        got = sorted((m.attrs["data-rule"], int(m.attrs["data-step"]), int(m.attrs["data-rank"])) for m in markers)
        want = sorted((a.rule, a.step, a.rank) for a in firing)
        assert got == want, key
        for m in markers:
            a = next(a for a in firing if (a.rule, a.step, a.rank) == (m.attrs["data-rule"], int(m.attrs["data-step"]),
                                                                        int(m.attrs["data-rank"])))
            assert m.attrs["data-severity"] == a.severity.value
            title = m.find("title").text()
            assert a.rule in title and f"step {a.step}" in title and a.message in title and a.hint in title


def check_table(root: Node, firing: list[Alert]) -> None:
    rows = root.find_all("tr", cls="alert-row")
    assert len(rows) == len(firing)
    def key(r: Node) -> tuple[str, int, int]:
        return r.attrs["data-rule"], int(r.attrs["data-step"]), int(r.attrs["data-rank"])

    assert sorted(map(key, rows)) == sorted((a.rule, a.step, a.rank) for a in firing)
    for r in rows:
        cells = r.find_all("td")
        a = next(a for a in firing if (a.rule, a.step, a.rank) == key(r))
        assert [c.text().strip() for c in cells[1:6]] == [a.rule, str(a.step), str(a.rank), a.message, a.hint]
        assert a.severity.value in cells[0].text()
        for k in a.evidence:
            assert f"{k}=" in cells[6].text()


# --------------------------------------------------------------------------------------------
# inputs


def synthetic_run(steps: int = 20_000, *, ranks: int = 1, attention: bool = False, fp16: bool = False,
                  spike: int | None = 12_000, nan_at: int | None = 15_000, seed: int = 0
                  ) -> tuple[RunInfo, dict[int, list[StepRecord]]]:
    """A long healthy-looking run with one loss/grad spike and one NaN step (real StepRecords)."""
    rng = random.Random(seed)
    info = RunInfo(run_id="synthetic", world_size=ranks, max_steps=steps, created=1_700_000_000.0,
                   optimizer=OptimizerInfo(name="AdamW", groups=[
                       ParamGroupInfo(lr=6e-4, initial_lr=6e-4, betas=[0.9, 0.95], weight_decay=0.1, params=50),
                       ParamGroupInfo(lr=6e-4, initial_lr=6e-4, betas=[0.9, 0.95], weight_decay=0.0, params=98)]),
                   scaler={"enabled": fp16})
    warm = max(1, steps // 40)
    records: dict[int, list[StepRecord]] = {}
    for rk in range(ranks):
        t = 1_700_000_000.0
        scale = 65536.0
        out = []
        for s in range(steps):
            lr = 6e-4 * (s + 1) / warm if s < warm else 6e-5 + 0.5 * (6e-4 - 6e-5) * (1 + math.cos(math.pi * (s - warm) / (steps - warm)))
            loss = 2.8 + 8.2 * math.exp(-s / (steps / 8)) + rng.gauss(0, 0.05)
            g = 0.4 + 0.6 * math.exp(-s / (steps / 10)) + abs(rng.gauss(0, 0.05))
            skipped = fp16 and s > 0 and s % 997 == 0
            if s == spike:
                loss, g = loss * 8, 80.0
            if s == nan_at:
                loss, g = math.nan, math.inf
            st = 5.0 if s == 0 else 0.3 + abs(rng.gauss(0, 0.02))
            t += st
            att = None
            if attention and s % 100 == 0:
                att = {f"layer{i}": {"entropy_ratio": 0.8 - 0.02 * i + rng.gauss(0, 0.01), "entropy_min": 0.3,
                                     "max_logit": 8.0 + i + rng.gauss(0, 0.5), "max_prob": 0.4}
                       for i in (0, 1, 2, 10)}  # natural order: 10 last
            out.append(StepRecord(
                step=s, rank=rk, time=t, loss=loss, lr=[lr, lr * 0.1], grad_norm=g,
                grad_norm_clipped=min(g, 1.0) if math.isfinite(g) else g, clip_coef=min(1.0, 1.0 / g) if g else 1.0,
                max_norm=1.0, loss_scale=scale if fp16 else None, skipped=skipped, step_time=st, tokens=16_384,
                attention=att, autocast="float16" if fp16 else None,
            ))
            if skipped:
                scale /= 2
            elif fp16 and s % 2000 == 1999:
                scale *= 2
        records[rk] = out
    return info, records


def replay(info: RunInfo, records: dict[int, list[StepRecord]]) -> list[Alert]:
    """The real rules over the records, as `monitor check` replays them."""
    engine = RulesEngine(info)
    for rk in sorted(records):
        engine.start(rk)
        engine.observe_many(records[rk])
    return engine.alerts


@pytest.fixture(scope="module")
def trainer_run(tmp_path_factory):
    from monitor.runlog.reader import read_alerts, read_run
    from monitor.trainer import TrainConfig, train

    run = tmp_path_factory.mktemp("report") / "run"
    train(TrainConfig.from_preset("tiny", max_steps=60, faults=["nan-at:40"]), run_dir=run,
          monitor_config={"metrics": {"enabled": False}, "console": {"enabled": False}}, progress=False)
    return read_run(run), read_alerts(run)


# --------------------------------------------------------------------------------------------
# tests


@pytest.mark.slow
def test_report_of_a_trainer_run(trainer_run):
    data, alerts = trainer_run
    firing = [a for a in alerts if a.status == "firing"]
    assert any(a.rule == "loss.nonfinite" and a.step == 40 for a in firing)
    doc = render_report(data.info, data.records, alerts, problems=data.problems)
    assert doc == render_report(data.info, data.records, alerts, problems=data.problems)  # deterministic
    check_self_contained(doc)
    root = parse(doc)

    assert root.find("head").find("title").text() == "trainmon report — run"
    facts = {dt.text(): dd.text() for dt, dd in zip(root.find_all("dt"), root.find_all("dd"))}
    assert facts["Run"] == data.info.run_id and facts["World size"] == "1" and facts["Max steps"] == "60"
    assert facts["Steps"].startswith("0–59: 60 step records")
    assert "UTC" in facts["Time span"]
    assert "AdamW" in root.find("section", id="run").text()
    groups = root.find("table", cls="groups").find_all("tr")[1:]
    assert [[c.text() for c in g.find_all("td")][:6] for g in groups] == [
        ["0", "5e-5", "0.002", "0.9, 0.95", "1e-8", "0.1"], ["1", "5e-5", "0.002", "0.9, 0.95", "1e-8", "0"]]
    summary = root.find("p", cls="summary")
    assert summary.attrs["data-alerts"] == str(len(firing)) and "critical" in summary.text()

    # The attention probe sampled every 10 steps: its two plots are there too.
    assert set(plots(root)) == {"loss", "lr", "grad_norm", "step_time", "throughput", "attention_entropy",
                                "attention_max_logit"}
    assert omitted(root) == {"loss_scale"}
    assert check_svgs_are_xml(doc) == 7
    check_markers(root, firing)
    check_table(root, firing)

    # NaN from step 40 on: one mark for the run of 20 non-finite losses, not silently dropped
    nan = plots(root)["loss"].find("g", cls="nonfinite")
    assert (nan.attrs["data-step"], nan.attrs["data-last-step"], nan.attrs["data-count"]) == ("40", "59", "20")
    assert "nan" in nan.find("title").text()
    assert plots(root)["grad_norm"].find_all("g", cls="nonfinite")
    legend = plots(root)["grad_norm"].find("g", cls="legend").text()
    assert "grad norm (pre-clip)" in legend and "clipped norm" in legend and "clip threshold (max_norm)" in legend
    # the two param groups follow the same schedule: one line says so
    assert series_labels(plots(root)["lr"]) == ["groups 0, 1 (equal)"]
    # alerts.jsonl keeps NaN evidence as "NaN": shown as nan
    row = root.find("tr", cls="alert-row", data_rule="loss.nonfinite")
    assert "loss=nan" in row.find_all("td")[6].text()


def test_report_of_a_20k_step_run_is_small_and_keeps_spikes_and_nans():
    info, records = synthetic_run(20_000)
    alerts = replay(info, records)
    firing = [a for a in alerts if a.status == "firing"]
    rules = {a.rule for a in firing}
    assert "loss.nonfinite" in rules and any(a.step == 12_000 for a in firing), sorted((a.rule, a.step) for a in firing)

    t0 = time.perf_counter()
    doc = render_report(info, records, alerts)
    elapsed = time.perf_counter() - t0
    size = len(doc.encode())
    print(f"\n20k-step report: {size / 1024:.0f} KiB in {elapsed * 1000:.0f} ms")
    assert size < 600_000  # well under 2 MB

    check_self_contained(doc)
    root = parse(doc)
    assert set(plots(root)) == {"loss", "lr", "grad_norm", "step_time", "throughput"}
    check_svgs_are_xml(doc)
    check_markers(root, firing)
    check_table(root, firing)
    for fig in plots(root).values():
        for path in fig.find_all("path"):
            if path.parent.parent is fig.find("g", cls="series"):
                assert len(re.findall(r"-?[\d.]+,-?[\d.]+", path.attrs["d"])) <= MAX_POINTS
    loss = plots(root)["loss"]
    nan = loss.find("g", cls="nonfinite")
    assert (nan.attrs["data-step"], nan.attrs["data-count"]) == ("15000", "1")
    inf = plots(root)["grad_norm"].find("g", cls="nonfinite", data_series="grad norm (pre-clip)")
    assert inf.attrs["data-step"] == "15000" and "inf" in inf.find("title").text()
    assert "(log scale)" in plots(root)["grad_norm"].find("g", cls="y-axis").text()  # 0.4 .. 80: wide


def test_downsample_keeps_the_spike_and_the_gap():
    x = list(range(20_000))
    y: list[float | None] = [1.0 + 0.001 * (i % 7) for i in x]
    y[12_345] = 50.0
    y[100] = math.nan
    y[200] = None  # not recorded: no gap
    pts, bad = downsample(x, y, 1500)
    assert len(pts) <= 1500
    assert (12_345, 50.0) in pts
    assert bad == [(100, y[100])] and math.isnan(bad[0][1])
    pts, _ = downsample(x[:1000], y[:1000], 1500)
    assert pts[100] is None and len(pts) == 999  # the NaN breaks the line, the missing value is left out


def test_multi_rank_fp16_with_attention():
    info, records = synthetic_run(3000, ranks=3, attention=True, fp16=True, spike=2000, nan_at=None, seed=1)
    alerts = replay(info, records)
    alerts.append(Alert(rule="run.custom", severity=Severity.info, step=1500, rank=2, message="an info note",
                        hint="nothing to do"))
    firing = [a for a in alerts if a.status == "firing"]
    doc = render_report(info, records, alerts, title="three ranks")
    root = parse(doc)
    check_self_contained(doc)
    assert set(plots(root)) == {"loss", "lr", "grad_norm", "loss_scale", "step_time", "throughput",
                                "attention_entropy", "attention_max_logit"}
    assert not omitted(root)
    check_svgs_are_xml(doc)
    check_markers(root, firing)
    check_table(root, firing)
    assert series_labels(plots(root)["loss"]) == ["loss rank 0", "loss rank 1", "loss rank 2"]
    assert series_labels(plots(root)["attention_entropy"]) == ["layer0", "layer1", "layer2", "layer10"]
    skipped = plots(root)["loss_scale"].find_all("g", cls="skipped")
    assert sum(int(g.attrs["data-count"]) for g in skipped) == len({r.step for r in records[0] if r.skipped}) == 3
    assert "(log scale)" in plots(root)["loss_scale"].find("g", cls="y-axis").text()
    legend = plots(root)["loss"].find("g", cls="legend").text()
    assert "info alert" in legend and ("warning alert" in legend or "critical alert" in legend)


def test_absent_data_is_omitted_and_preflight_is_a_checklist():
    info = RunInfo(run_id="bare", source="llmc", preflight=[Alert(
        rule="preflight.no_clipping", severity=Severity.warning, step=0, message="no clipping seen",
        hint="clip at 1.0")])
    records = {0: [StepRecord(step=s, time=1_700_000_000.0 + s, loss=3.0 - s / 100) for s in range(50)]}
    pre = Alert(rule="preflight.lr_range", severity=Severity.critical, step=0, message="peak LR 0.5 is far too high",
                hint="use 3e-4", evidence={"lr": 0.5, "low": 1e-5, "high": 1e-2})
    resolved = Alert(rule="preflight.lr_range", severity=Severity.critical, step=3, message="", hint="",
                     status="resolved")
    doc = render_report(info, records, [pre, resolved])
    root = parse(doc)
    assert set(plots(root)) == {"loss"}
    assert omitted(root) == {"lr", "grad_norm", "loss_scale", "step_time", "throughput", "attention_entropy",
                             "attention_max_logit"}
    check_markers(root, [pre])  # the resolved event is not a marker
    check_table(root, [pre])
    assert "resolved at step 3" in root.find("tr", cls="alert-row").text()
    items = root.find("section", id="preflight").find_all("li", cls="preflight-item")
    assert [(i.attrs["data-rule"], i.attrs["data-severity"]) for i in items] == [
        ("preflight.lr_range", "critical"), ("preflight.no_clipping", "warning")]
    assert "use 3e-4" in items[0].text()

    clean = parse(render_report(RunInfo(run_id="x"), {}, []))
    assert "No preflight findings" in clean.find("section", id="preflight").text()
    assert not plots(clean) and "lr" in omitted(clean)
    assert clean.find("p", cls="summary").attrs["data-alerts"] == "0"


def test_attempts_get_a_section_and_a_marker_on_every_plot():
    from monitor.schema import Attempt

    def run(attempts: list[Attempt]) -> tuple[str, Node]:
        info = RunInfo(run_id="resumed", attempts=attempts)
        resume = attempts[-1].start_step if len(attempts) > 1 else 40
        records = {0: [StepRecord(step=s, attempt=1 if s < resume else len(attempts), time=1_700_000_000.0 + s,
                                  loss=3.0 - s / 100, lr=[1e-3], grad_norm=1.0) for s in range(40)]}
        alert = Alert(rule="loss.spike", severity=Severity.warning, step=30, message="spike", hint="lower the LR")
        doc = render_report(info, records, [alert])
        check_svgs_are_xml(doc)
        return doc, parse(doc)

    first = Attempt(id=1, started=1_700_000_000.0, host="node1", pid=11, ended=1_700_000_020.0, steps=25)
    doc, root = run([first, Attempt(id=2, kind="resumed", start_step=20, lineage_start=0, started=1_700_000_100.0,
                                    host="node2", pid=22)])
    items = root.find("section", id="attempts").find_all("li", cls="attempt")
    assert [(i.attrs["data-attempt"], i.attrs["data-kind"]) for i in items] == [("1", "fresh"), ("2", "resumed")]
    assert items[0].text().startswith("attempt 1: fresh, pid 11 on node1") and "ended at step 25" in items[0].text()
    assert items[1].text().startswith("attempt 2: resumed at step 20, pid 22 on node2")
    assert set(plots(root)) == {"loss", "lr", "grad_norm"}
    for key, fig in plots(root).items():
        (marker,) = fig.find_all("g", cls="attempt-marker")
        assert (marker.attrs["data-attempt"], marker.attrs["data-step"]) == ("2", "20"), key
        assert marker.find("text").text() == "attempt 2: resumed"
        assert marker.find("title").text() == items[1].text()
        assert "attempt start" in fig.find("g", cls="legend").text()
        assert len(fig.find_all("g", cls="alert-marker")) == 1  # the alert markers are unchanged
    assert "Dashed lines mark where each attempt" in root.find("section", id="plots").text()

    _, root = run([first, Attempt(id=2, kind="restarted", start_step=0, started=1_700_000_100.0)])
    assert plots(root)["loss"].find("g", cls="attempt-marker").find("text").text() == "attempt 2: restarted"

    # one attempt listed renders byte for byte what a run without attempts does: no section, no marker
    single, root = run([first])
    assert single == run([])[0]
    assert not root.find_all("section", id="attempts") and not root.find_all("g", cls="attempt-marker")
    assert "attempt start" not in single


def test_text_is_escaped():
    evil = '<script>alert("x")</script> & "quotes"'
    info = RunInfo(run_id=evil, source=evil)
    records = {0: [StepRecord(step=s, loss=1.0, scalars={}) for s in range(5)]}
    a = Alert(rule="loss.spike", severity=Severity.warning, step=2, message=evil, hint=evil,
              evidence={evil: evil})
    doc = render_report(info, records, [a], title=evil, problems=[evil])
    assert "<script" not in doc
    check_svgs_are_xml(doc)
    root = parse(doc)
    assert root.find("head").find("title").text() == evil
    assert evil in plots(root)["loss"].find("g", cls="alert-marker").find("title").text()
    assert evil in root.find("div", cls="problems").text()


def test_evidence_is_compact():
    ev = dict(format_evidence({
        "loss": "NaN", "grad_norm": "Infinity", "lr": 0.00059999, "z": 12.3456, "scale": 65536.0, "skipped": False,
        "first_step": None, "top_params": [
            {"param": "blocks.0.attn.c_attn.weight", "before": 0.1, "after": 4.0, "ratio": 40.0},
            {"param": "wpe.weight", "before": 0.1, "after": 1.0, "ratio": 10.0},
            {"param": "ln_f.weight", "before": 0.1, "after": 0.5, "ratio": 5.0},
            {"param": "lm_head.weight", "before": 0.1, "after": 0.3, "ratio": 3.0}],
        "layers": [{"layer": "h.3", "entropy_ratio": 0.1234567, "baseline": 0.8}],
        "params": [f"p{i}" for i in range(20)],
    }))
    assert ev["loss"] == "nan" and ev["grad_norm"] == "inf"
    assert ev["lr"] == "6e-4" and ev["z"] == "12.35" and ev["scale"] == "65536" and ev["skipped"] == "false"
    assert ev["top_params"] == "[blocks.0.attn.c_attn.weight ×40, wpe.weight ×10, ln_f.weight ×5, … +1 more]"
    assert ev["layers"] == "[h.3 (entropy_ratio=0.1235, baseline=0.8)]"
    assert ev["params"] == "[p0, p1, p2, … +17 more]"


@pytest.mark.slow
def test_example_page_renders_without_torch(tmp_path: Path):
    """report.py imports no torch (it runs where torch is absent)."""
    import subprocess
    import sys

    code = ("import sys; sys.modules['torch'] = None\n"
            "from monitor.exporters.report import render_report\n"
            "from monitor.schema import RunInfo, StepRecord\n"
            "print(len(render_report(RunInfo(run_id='r'), {0: [StepRecord(step=0, loss=1.0)]}, [])))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) > 1000


@pytest.mark.slow
def test_check_writes_the_report(tmp_path):
    from typer.testing import CliRunner

    from monitor.cli.app import app
    from monitor.trainer import TrainConfig, train

    train(TrainConfig.from_preset("tiny", max_steps=30, faults=["nan-at:20"]), run_dir=tmp_path / "run",
          monitor_config={"metrics": {"enabled": False}, "console": {"enabled": False}}, progress=False)
    result = CliRunner().invoke(app, ["check", str(tmp_path / "run"), "--report", str(tmp_path / "r.html")])
    assert result.exit_code == 1, result.output
    html = (tmp_path / "r.html").read_text()
    assert html.startswith("<!DOCTYPE html>") and "loss.nonfinite" in html
    bad = CliRunner().invoke(app, ["check", str(tmp_path / "run"), "--report", str(tmp_path / "no" / "r.html")])
    assert bad.exit_code == 2 and "cannot write the report" in bad.output
