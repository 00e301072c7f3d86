"""`monitor check RUN --report FILE.html`: one self-contained HTML page about a run.

The page holds a header (run facts, optimizer groups, alert counts, the preflight checklist), the
run's attempts when it has several (resumes, restarts), inline SVG plots with a vertical marker per
firing alert and per attempt start, and the alerts table with each alert's fix and evidence.
Everything is inline (CSS and SVG, no scripts, fonts, stylesheets or images), so the file reads
offline, from disk and on paper. No torch and no plotting library: the plotting helper
(`Series`, `Marks`, `Plot`, `svg_plot`, in report_svg) draws axes, ticks, log scales and legends itself.

Long runs are downsampled per series to at most `MAX_POINTS` points by bucket min/max, so a
one-step spike survives; NaN/Inf values are never dropped silently: they break the line and get a
mark of their own. The same input always gives the same bytes.
"""

from __future__ import annotations

import datetime as _dt
import math
from collections.abc import Sequence
from statistics import median

from monitor.exporters.report_charts import attempt_markers, build_plots
from monitor.exporters.report_svg import MAX_POINTS, Marks, Plot, Series, downsample, svg_plot
from monitor.exporters.report_text import esc, fmt_num, format_evidence
from monitor.runlog.attempts import describe
from monitor.schema import Alert, RunInfo, StepRecord

__all__ = ["render_report", "Series", "Marks", "Plot", "svg_plot", "downsample", "format_evidence", "MAX_POINTS"]

SEVERITY_ICONS = {"info": "ℹ", "warning": "⚠", "critical": "✖"}


def _finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


def _utc(t: float) -> str:
    return _dt.datetime.fromtimestamp(t, tz=_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _duration(s: float) -> str:
    s = max(0.0, s)
    if s < 60:
        return f"{s:.1f} s"
    m, sec = divmod(int(round(s)), 60)
    h, m = divmod(m, 60)
    d, h = divmod(h, 24)
    if d:
        return f"{d} d {h} h {m} min"
    if h:
        return f"{h} h {m} min"
    return f"{m} min {sec} s"


_CSS = """
*{box-sizing:border-box}
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;color:#111827;
background:#f6f7f9;margin:0;-webkit-print-color-adjust:exact;print-color-adjust:exact}
main{max-width:1100px;margin:0 auto;padding:20px 24px 40px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 10px;border-bottom:1px solid #d1d5db;padding-bottom:4px}
h3{font-size:14px;margin:0 0 4px}
.sub{color:#4b5563;margin:0 0 14px}
.card{background:#fff;border:1px solid #e5e7eb;border-radius:6px;padding:12px 14px;margin:0 0 14px}
dl.facts{display:grid;grid-template-columns:max-content 1fr;gap:3px 18px;margin:0}
dl.facts dt{color:#4b5563}dl.facts dd{margin:0}
table{border-collapse:collapse;width:100%;font-size:13px}
th,td{text-align:left;vertical-align:top;padding:5px 8px;border-bottom:1px solid #e5e7eb}
th{background:#f3f4f6;font-weight:600}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
.badge{display:inline-block;padding:0 7px;border-radius:9px;color:#fff;font-size:12px;font-weight:600;white-space:nowrap}
.sev-info{background:#6b7280}.sev-warning{background:#d97706}.sev-critical{background:#dc2626}
.summary{font-size:15px;margin:8px 0 0}
.summary .badge{margin-right:6px}
ul.checklist{list-style:none;padding:0;margin:0}
ul.checklist li{padding:5px 0;border-bottom:1px solid #f0f1f3}
ul.checklist li:last-child{border-bottom:0}
.icon{display:inline-block;width:1.4em;font-weight:700}
.icon.ok{color:#16a34a}.icon.info{color:#6b7280}.icon.warning{color:#d97706}.icon.critical{color:#dc2626}
.fix{color:#374151}
code,.ev{font:12px/1.4 ui-monospace,SFMono-Regular,Menlo,Consolas,monospace}
.ev span{display:inline-block;margin-right:10px;white-space:nowrap}
.ev b{font-weight:600;color:#4b5563}
figure.plot{background:#fff;border:1px solid #e5e7eb;border-radius:6px;margin:0 0 14px;padding:10px 10px 4px}
figure.plot svg{display:block;width:100%;height:auto}
figure.plot figcaption{font-size:12px;color:#4b5563;margin:2px 0 4px}
.omitted{color:#4b5563;font-size:13px}
.problems{border-color:#fcd34d;background:#fffbeb}
.resolved{display:block;color:#16a34a;font-size:12px}
tr:target td{background:#fef9c3}
footer{color:#6b7280;font-size:12px;margin-top:24px}
@media print{body{background:#fff;font-size:11px}main{max-width:none;padding:0}
.card,figure.plot{border-color:#d1d5db;break-inside:avoid;page-break-inside:avoid}
tr{break-inside:avoid;page-break-inside:avoid}h2{break-after:avoid;page-break-after:avoid}
@page{size:A4;margin:12mm}}
"""


def _severity_counts(alerts: Sequence[Alert]) -> dict[str, int]:
    counts = {"critical": 0, "warning": 0, "info": 0}
    for a in alerts:
        counts[a.severity.value] += 1
    return counts


def _optimizer_section(info: RunInfo) -> str:
    opt = info.optimizer
    if not opt.name and not opt.groups:
        return '<p class="omitted">Optimizer: not known for this run.</p>'
    o = [f"<h3>Optimizer: {esc(opt.name or 'unknown')}</h3>"]
    if opt.groups:
        o.append('<table class="groups"><thead><tr><th>group</th><th class="num">lr</th>'
                 '<th class="num">initial lr</th><th>betas</th><th class="num">eps</th><th class="num">weight decay</th>'
                 '<th class="num">momentum</th><th class="num">params</th><th class="num">elements</th></tr></thead><tbody>')
        for i, g in enumerate(opt.groups):
            betas = ", ".join(fmt_num(b) for b in g.betas) if g.betas else "–"
            o.append(f'<tr><td>{i}</td><td class="num">{fmt_num(g.lr)}</td><td class="num">{fmt_num(g.initial_lr)}</td>'
                     f'<td>{esc(betas)}</td><td class="num">{fmt_num(g.eps)}</td>'
                     f'<td class="num">{fmt_num(g.weight_decay)}</td><td class="num">{fmt_num(g.momentum)}</td>'
                     f'<td class="num">{g.params}</td><td class="num">{f"{g.numel:,}" if g.numel else "–"}</td></tr>')
        o.append("</tbody></table>")
    return "".join(o)


def _facts(info: RunInfo, records: dict[int, list[StepRecord]]) -> list[tuple[str, str]]:
    allr = [r for rs in records.values() for r in rs]
    facts = [("Run", info.run_id), ("Source", info.source), ("World size", str(info.world_size))]
    if allr:
        steps = [r.step for r in allr]
        per_rank = sorted(records)
        facts.append(("Steps", f"{min(steps)}–{max(steps)}: {len(allr):,} step records from {len(per_rank)} rank(s)"))
    else:
        facts.append(("Steps", "no step records"))
    facts.append(("Max steps", fmt_num(info.max_steps) if info.max_steps is not None else "not set"))
    times = [r.time for r in allr if _finite(r.time) and r.time > 0]
    if times:
        t0, t1 = min(times), max(times)
        facts.append(("Time span", f"{_utc(t0)} → {_utc(t1)} ({_duration(t1 - t0)})"))
    if info.model.name or info.model.parameters:
        facts.append(("Model", f"{info.model.name or '?'}, {info.model.parameters:,} parameters"
                               + (f" ({info.model.trainable:,} trainable)" if info.model.trainable != info.model.parameters else "")))
    env = ", ".join(x for x in (info.device, info.torch_version and f"torch {info.torch_version}",
                                info.cuda_version and f"CUDA {info.cuda_version}", info.hostname) if x)
    if env:
        facts.append(("Environment", env))
    if info.scheduler:
        sched = info.scheduler
        if info.schedule and info.schedule.get("warmup_steps") is not None:
            sched += f" (warmup {info.schedule['warmup_steps']} steps)"
        facts.append(("LR scheduler", sched))
    if info.scaler is not None:
        facts.append(("GradScaler", "enabled" if info.scaler.get("enabled") else "disabled"))
    first = min(records) if records else None
    if first is not None:
        recs = records[first]
        losses = [(r.step, r.loss) for r in recs if _finite(r.loss)]
        if losses:
            best = min(losses, key=lambda t: t[1])
            facts.append(("Loss", f"{fmt_num(losses[0][1])} at step {losses[0][0]} → {fmt_num(losses[-1][1])} at step "
                                  f"{losses[-1][0]}; min {fmt_num(best[1])} at step {best[0]}"
                                  + (f" (rank {first})" if len(records) > 1 else "")))
        nonfinite = sum(1 for r in recs if r.loss is not None and not math.isfinite(r.loss))
        if nonfinite:
            facts.append(("Non-finite loss", f"{nonfinite} step(s)" + (f" on rank {first}" if len(records) > 1 else "")))
        st = [r.step_time for r in recs if _finite(r.step_time) and r.step_time > 0]
        if st:
            tp = [r.tokens / r.step_time for r in recs if r.tokens is not None and _finite(r.step_time) and r.step_time > 0]
            facts.append(("Speed", f"median {fmt_num(median(st))} s/step"
                                   + (f", {fmt_num(round(median(tp)))} tokens/s" if tp else "")
                                   + (f" (rank {first})" if len(records) > 1 else "")))
        skipped = sum(1 for r in recs if r.skipped)
        if skipped:
            facts.append(("Skipped steps", f"{skipped} (GradScaler)"))
        unknown = sum(1 for r in recs if r.grad_norm_unknown)
        if unknown:
            facts.append(("Gradient norm", f"pre-clip norm unknown on {unknown} step(s): clipping ran on each "
                                           "micro-batch, or sharded parameters had no clip reporting the global norm"))
    return facts


def _preflight(info: RunInfo, firing: Sequence[Alert]) -> str:
    items: list[Alert] = [a for a in firing if a.rule.startswith("preflight.")]
    seen = {(a.rule, a.rank) for a in items}
    for a in info.preflight:  # what attach found, when the caller's alerts do not repeat it
        if a.status == "firing" and a.rule.startswith("preflight.") and (a.rule, a.rank) not in seen:
            seen.add((a.rule, a.rank))
            items.append(a)
    items.sort(key=lambda a: (-a.severity.rank, a.rule, a.rank))
    if not items:
        return ('<ul class="checklist"><li class="ok"><span class="icon ok">✓</span>No preflight findings: '
                'none of the preflight checks that ran on this run flagged its setup.</li></ul>')
    o = ['<ul class="checklist">']
    for a in items:
        s = a.severity.value
        o.append(f'<li class="preflight-item" data-rule="{esc(a.rule)}" data-severity="{s}">'
                 f'<span class="icon {s}">{SEVERITY_ICONS[s]}</span><span class="badge sev-{s}">{s}</span> '
                 f'<code>{esc(a.rule)}</code> {esc(a.message)}<br><span class="fix"><b>Fix:</b> {esc(a.hint)}</span></li>')
    o.append("</ul>")
    return "".join(o)


def _alerts_table(firing: Sequence[Alert], ids: Sequence[str], resolved: Sequence[Alert]) -> str:
    if not firing:
        return '<p class="omitted">No alerts fired.</p>'
    o = ['<table class="alerts"><thead><tr><th>severity</th><th>rule</th><th class="num">step</th>'
         '<th class="num">rank</th><th>message</th><th>fix</th><th>evidence</th></tr></thead><tbody>']
    for a, aid in zip(firing, ids):
        s = a.severity.value
        res = min((r.step for r in resolved if r.rule == a.rule and r.rank == a.rank and r.step >= a.step), default=None)
        res_html = f'<span class="resolved">resolved at step {res}</span>' if res is not None else ""
        ev = "".join(f"<span><b>{esc(k)}</b>={esc(v)}</span>" for k, v in format_evidence(a.evidence))
        o.append(f'<tr class="alert-row" id="{esc(aid)}" data-rule="{esc(a.rule)}" data-step="{a.step}" '
                 f'data-rank="{a.rank}" data-severity="{s}"><td><span class="badge sev-{s}">{s}</span>{res_html}</td>'
                 f'<td><code>{esc(a.rule)}</code></td><td class="num">{a.step}</td><td class="num">{a.rank}</td>'
                 f'<td>{esc(a.message)}</td><td class="fix">{esc(a.hint)}</td><td class="ev">{ev}</td></tr>')
    o.append("</tbody></table>")
    return "".join(o)


def render_report(info: RunInfo, records: dict[int, list[StepRecord]], alerts: list[Alert], *,
                  title: str | None = None, problems: Sequence[str] = ()) -> str:
    """The whole report as one self-contained HTML document (deterministic for the same input).

    ``records``: by rank, each in step order (as `read_run` gives them). ``alerts``: firing alerts
    are drawn and tabled; resolved events only annotate the alert they resolve. ``problems``:
    reading problems (damaged files) to show at the top.
    """
    records = {rk: sorted(rs, key=lambda r: r.step) for rk, rs in sorted(records.items()) if rs}
    order = {s: i for i, s in enumerate(("critical", "warning", "info"))}
    firing = sorted((a for a in alerts if a.status == "firing"),
                    key=lambda a: (a.step, order[a.severity.value], a.rule, a.rank, a.message))
    resolved = [a for a in alerts if a.status == "resolved"]
    ids = [f"alert-{i + 1}" for i in range(len(firing))]
    title = title or f"trainmon report — {info.run_id}"

    starts = attempt_markers(info)  # none unless the run has several attempts
    steps = [r.step for rs in records.values() for r in rs] + [a.step for a in firing] + [m.step for m in starts]
    x_domain = (min(steps), max(steps)) if steps else (0, 1)
    plots, omitted = build_plots(records)

    counts = _severity_counts(firing)
    o = ['<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
         '<meta name="viewport" content="width=device-width, initial-scale=1">'
         f"<title>{esc(title)}</title><style>{_CSS}</style></head><body><main>"]
    o.append(f"<header><h1>{esc(title)}</h1>")
    o.append(f'<p class="sub">Run <code>{esc(info.run_id)}</code> · source {esc(info.source)}</p>')
    if firing:
        parts = "".join(f'<span class="badge sev-{s}">{counts[s]} {s}</span>' for s in ("critical", "warning", "info")
                        if counts[s])
        o.append(f'<p class="summary" data-alerts="{len(firing)}">{len(firing)} alert(s): {parts}'
                 + "".join(f' · {counts[s]} {s}' for s in ("critical", "warning", "info") if not counts[s]) + "</p>")
    else:
        o.append('<p class="summary" data-alerts="0"><span class="icon ok">✓</span>No alerts: '
                 '0 critical · 0 warning · 0 info</p>')
    o.append("</header>")
    if problems:
        o.append('<div class="card problems"><h3>Problems reading the run</h3><ul>'
                 + "".join(f"<li>{esc(p)}</li>" for p in problems) + "</ul></div>")

    o.append('<section id="run"><h2>Run</h2><div class="card"><dl class="facts">')
    for k, v in _facts(info, records):
        o.append(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>")
    o.append(f'</dl></div><div class="card">{_optimizer_section(info)}</div></section>')

    if len(info.attempts) > 1:  # resumed or restarted into the same directory: which process wrote what
        items = "".join(f'<li class="attempt" data-attempt="{a.id}" data-kind="{esc(a.kind)}">'
                        f"{esc(describe(a))}</li>" for a in info.attempts)
        o.append(f'<section id="attempts"><h2>Attempts</h2><div class="card"><ul class="attempts">{items}</ul></div>'
                 "</section>")

    o.append(f'<section id="preflight"><h2>Preflight checklist</h2><div class="card">{_preflight(info, firing)}'
             "</div></section>")

    o.append('<section id="plots"><h2>Plots</h2>')
    if firing:
        o.append('<p class="omitted">Vertical lines mark alerts (hover for the rule and fix; click for its row '
                 'in the table).</p>')
    if starts:
        o.append('<p class="omitted">Dashed lines mark where each attempt after the first started; the plots '
                 "show the records that count (a resume supersedes the earlier attempts' records from its start "
                 "step on, a restart all of them).</p>")
    for p in plots:
        o.append(f'<figure class="plot" id="plot-{esc(p.key)}" data-plot="{esc(p.key)}"><h3>{esc(p.title)}</h3>')
        if p.note:
            o.append(f"<figcaption>{esc(p.note)}</figcaption>")
        o.append(svg_plot(p, x_domain, firing, ids, attempts=starts))
        o.append("</figure>")
    if omitted:
        o.append('<div class="card"><h3>Not plotted</h3><ul class="omitted">'
                 + "".join(f'<li class="omitted-plot" data-plot="{esc(k)}"><b>{esc(t)}</b>: {esc(why)}</li>'
                           for k, t, why in omitted) + "</ul></div>")
    o.append("</section>")

    o.append(f'<section id="alerts"><h2>Alerts</h2>{_alerts_table(firing, ids, resolved)}</section>')
    o.append("<footer>Generated by trainmon <code>monitor check --report</code>. Self-contained: no scripts, "
             "no external resources.</footer></main></body></html>\n")
    return "".join(o)
