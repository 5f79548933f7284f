"""`sweep report`: one self-contained HTML file of a study (plotly inlined; no server, no network).

Read from the study alone: val loss vs budget step for every trial (the point where ASHA
stopped a PRUNED trial marked ×, a FAIL trial's last point marked ✕ in red), the base
model's loss as a reference line, how many trials reached each rung, parallel coordinates
over the searched params → val loss, parameter importances (`optuna.importance`, when
enough trials finished), samples/s vs val loss, and the leaderboard.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Optional

import optuna
from optuna.trial import TrialState
from pydantic import ValidationError

from sweep.record.leaderboard import base_metrics, leaderboard
from trial_worker.config import BudgetConfig

STATE_COLORS = {"COMPLETE": "#2a9d8f", "PRUNED": "#e9a23b", "FAIL": "#d62828", "RUNNING": "#457b9d", "WAITING": "#999999"}


def _need_plotly():
    try:
        import plotly.graph_objects as go
    except ImportError:
        raise ImportError("``plotly`` package not found; install it with `pip install 'sweep[report]'`") from None
    return go


def _rungs(study: optuna.Study) -> list[int]:
    """The rungs of the study's recorded spec (`BudgetConfig.rungs`); else the budget values trials reported at."""
    budget = (study.user_attrs.get("spec") or {}).get("budget")
    try:
        return BudgetConfig.model_validate(budget).rungs
    except ValidationError:  # no recorded spec (a study not made by `sweep run`), or one from an older sweep
        return sorted({s for t in study.trials for s in t.intermediate_values})


def curves_figure(study: optuna.Study, unit: str):
    """Val loss vs budget step, one line per trial; stop points marked; base model as a line."""
    go = _need_plotly()
    fig = go.Figure()
    for t in study.get_trials(deepcopy=False):
        iv = sorted(t.intermediate_values.items())
        if not iv:
            continue
        xs, ys = [s for s, _ in iv], [v for _, v in iv]
        color = STATE_COLORS.get(t.state.name, "#777")
        params = "<br>".join(f"{k}={_fmt(v)}" for k, v in sorted(t.params.items()))
        fig.add_trace(go.Scatter(
            x=xs, y=ys, mode="lines+markers", name=f"trial {t.number} ({t.state.name})",
            line=dict(color=color, width=2 if t.state == TrialState.COMPLETE else 1),
            marker=dict(size=5), legendgroup=t.state.name,
            hovertemplate=f"trial {t.number} {t.state.name}<br>{unit} %{{x}}<br>val_loss %{{y:.4f}}<br>{params}<extra></extra>",
        ))
    # The stop points: where ASHA cut a trial (PRUNED) or it failed.
    for state, symbol, label in (("PRUNED", "x", "stopped by ASHA"), ("FAIL", "x-thin-open", "failed")):
        pts = [(max(t.intermediate_values), t.intermediate_values[max(t.intermediate_values)], t.number)
               for t in study.get_trials(deepcopy=False, states=(TrialState[state],)) if t.intermediate_values]
        if pts:
            fig.add_trace(go.Scatter(
                x=[p[0] for p in pts], y=[p[1] for p in pts], mode="markers", name=label,
                marker=dict(symbol=symbol, size=13, color=STATE_COLORS[state], line=dict(width=2, color=STATE_COLORS[state])),
                text=[f"trial {p[2]}" for p in pts], hovertemplate="%{text} " + label + " at %{x}<extra></extra>",
            ))
    base = base_metrics(study)
    if base and base.get("val_loss") is not None:
        fig.add_hline(y=base["val_loss"], line_dash="dash", line_color="#555",
                      annotation_text=f"base model {base['val_loss']:.4f}", annotation_position="top right")
    rungs = _rungs(study)
    fig.update_layout(title=f"Validation loss vs {unit}", xaxis_title=unit, yaxis_title="val loss",
                      template="plotly_white", height=520, legend=dict(font=dict(size=10)))
    if rungs:
        fig.update_xaxes(tickvals=rungs)
    return fig


def rungs_figure(study: optuna.Study, unit: str):
    """How many trials reached each rung."""
    go = _need_plotly()
    rungs = _rungs(study)
    counts = [sum(1 for t in study.get_trials(deepcopy=False) if r in t.intermediate_values) for r in rungs]
    fig = go.Figure(go.Bar(x=[f"{unit} {r}" for r in rungs], y=counts, text=counts, textposition="outside",
                           marker_color="#457b9d", hovertemplate="%{x}: %{y} trials<extra></extra>"))
    fig.update_layout(title="Trials reaching each rung", yaxis_title="trials", template="plotly_white", height=360)
    return fig


def _last_loss(row: dict) -> Optional[float]:
    v = row.get("val_loss")
    return v if v is not None and math.isfinite(v) else None


def parallel_figure(study: optuna.Study, rows: list[dict]):
    """Parallel coordinates: every searched param → val loss (last rung's, for a PRUNED trial)."""
    go = _need_plotly()
    rows = [r for r in rows if _last_loss(r) is not None and r["params"]]
    if not rows:
        return None
    names = sorted({k for r in rows for k in r["params"]})
    dims = []
    for name in names:
        vals = [r["params"].get(name) for r in rows]
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals if v is not None) and len(set(vals)) > 3:
            log = all(v is not None and v > 0 for v in vals) and max(vals) / min(vals) > 20
            if log:
                dims.append(dict(label=f"log10 {name}", values=[math.log10(v) for v in vals]))
            else:
                dims.append(dict(label=name, values=vals))
        else:
            cats = [str(v) for v in sorted(set(vals), key=lambda v: (isinstance(v, str), v if not isinstance(v, str) else 0, str(v)))]
            dims.append(dict(label=name, values=[cats.index(str(v)) for v in vals],
                             tickvals=list(range(len(cats))), ticktext=cats))
    losses = [_last_loss(r) for r in rows]
    dims.append(dict(label="val loss", values=losses))
    fig = go.Figure(go.Parcoords(line=dict(color=losses, colorscale="Viridis_r", showscale=True,
                                           colorbar=dict(title="val loss")), dimensions=dims))
    fig.update_layout(title="Searched parameters → val loss (last rung reached)", template="plotly_white", height=440)
    return fig


def importance_figure(study: optuna.Study):
    """Parameter importances (fANOVA on COMPLETE trials), or None when too few trials finished."""
    go = _need_plotly()
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(done) < 2 or not done[0].params:
        return None
    try:
        imp = optuna.importance.get_param_importances(study)
    except Exception:  # e.g. every COMPLETE trial has the same params: nothing to attribute
        return None
    if not imp:
        return None
    names = list(imp)[::-1]
    fig = go.Figure(go.Bar(x=[imp[n] for n in names], y=names, orientation="h", marker_color="#2a9d8f",
                           hovertemplate="%{y}: %{x:.3f}<extra></extra>"))
    fig.update_layout(title=f"Parameter importance for val loss ({len(done)} COMPLETE trials)",
                      xaxis_title="importance (fANOVA)", template="plotly_white", height=120 + 40 * len(names))
    return fig


def throughput_figure(rows: list[dict]):
    """Samples/s vs val loss: what a faster configuration costs in loss."""
    go = _need_plotly()
    pts = [r for r in rows if r.get("samples_per_s") is not None and _last_loss(r) is not None]
    if not pts:
        return None
    fig = go.Figure()
    for state in ("COMPLETE", "PRUNED", "RUNNING", "FAIL"):
        sel = [r for r in pts if r["state"] == state]
        if sel:
            fig.add_trace(go.Scatter(x=[r["samples_per_s"] for r in sel], y=[_last_loss(r) for r in sel], mode="markers",
                                     name=state, marker=dict(size=10, color=STATE_COLORS[state]),
                                     text=[f"trial {r['number']}" for r in sel],
                                     hovertemplate="%{text}<br>%{x:.1f} samples/s<br>val_loss %{y:.4f}<extra></extra>"))
    fig.update_layout(title="Throughput vs val loss", xaxis_title="samples/s", yaxis_title="val loss (last rung)",
                      template="plotly_white", height=400)
    return fig


def _fmt(v) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _table(rows: list[dict], base_loss: Optional[float], unit: str) -> str:
    params = sorted({k for r in rows for k in r["params"]})
    head = ["rank", "trial", "state", unit, "val loss", "ppl"] + (["vs base"] if base_loss is not None else []) + \
           ["samples/s", "tokens/s", "W&B run"] + params
    out = ["<table class='board'><thead><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr></thead><tbody>"]
    for r in rows:
        cells = [r["rank"], r["number"], f"<span class='st {r['state']}'>{r['state']}</span>",
                 r["budget_reached"] if r["rung_reached"] else "—", _fmt(r["val_loss"]), _fmt(r["ppl"])]
        if base_loss is not None:
            cells.append("—" if r["val_loss"] is None else f"{base_loss - r['val_loss']:+.3f}")
        cells += [_fmt(r["samples_per_s"]), _fmt(r["tokens_per_s"]), html.escape(r.get("wandb") or "—")]
        cells += [html.escape(_fmt(r["params"].get(p))) for p in params]
        title = f" title='{html.escape(r['fail_reason'][-300:])}'" if r.get("fail_reason") else ""
        out.append(f"<tr{title}>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    out.append("</tbody></table>")
    return "".join(out)


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1200px;color:#222}
h1{margin-bottom:4px} .sub{color:#666;margin-top:0}
.grid{display:grid;grid-template-columns:1fr 1fr;gap:12px} .chart{border:1px solid #eee;border-radius:6px;padding:4px}
table.board{border-collapse:collapse;font-size:13px;width:100%} .board th,.board td{border-bottom:1px solid #eee;padding:4px 8px;text-align:right}
.board th{background:#f6f6f6;position:sticky;top:0} .st{font-weight:600} .COMPLETE{color:#2a9d8f} .PRUNED{color:#c77d12} .FAIL{color:#d62828}
.note{color:#666;font-size:13px}
"""


def build_report(study: optuna.Study) -> str:
    """The report of a study as one HTML string (plotly.js inlined once)."""
    _need_plotly()
    import plotly.io as pio

    rows = leaderboard(study)
    for r, t in zip(rows, [study.trials[r["number"]] for r in rows]):
        r["wandb"] = t.user_attrs.get("wandb_url") or t.user_attrs.get("wandb_run_id")
    unit = next((r["budget_unit"] for r in rows if r.get("budget_unit")), None) or "steps"
    base = base_metrics(study)
    base_loss = base.get("val_loss") if base else None
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["state"]] = counts.get(r["state"], 0) + 1
    figs = [("curves", curves_figure(study, unit)), ("rungs", rungs_figure(study, unit)),
            ("importance", importance_figure(study)), ("parallel", parallel_figure(study, rows)),
            ("throughput", throughput_figure(rows))]
    parts, first = [], True
    for key, fig in figs:
        if fig is None:
            continue
        div = pio.to_html(fig, full_html=False, include_plotlyjs=first, div_id=f"chart-{key}",
                          config={"displaylogo": False, "responsive": True})
        first = False
        parts.append((key, f"<div class='chart' id='box-{key}'>{div}</div>"))
    by = dict(parts)
    missing = []
    if "importance" not in by:
        missing.append("parameter importances need at least 2 COMPLETE trials with different params")
    best = next((r for r in rows if r["state"] == "COMPLETE"), None)
    sub = ", ".join(f"{n} {s}" for s, n in counts.items())
    if base:
        sub += f" — base model val loss {_fmt(base_loss)} (ppl {_fmt(base.get('ppl'))})"
    if best:
        sub += f" — best: trial {best['number']}, val loss {_fmt(best['val_loss'])}"
    body = [f"<h1>sweep report: {html.escape(study.study_name)}</h1><p class='sub'>{html.escape(sub)}</p>",
            by.get("curves", ""),
            "<div class='grid'>" + by.get("rungs", "") + by.get("importance", "") + "</div>",
            by.get("parallel", ""), by.get("throughput", ""),
            "<h2>Leaderboard</h2>", _table(rows, base_loss, unit)]
    if missing:
        body.append("<p class='note'>" + "; ".join(html.escape(m) for m in missing) + ".</p>")
    data = json.dumps({"study": study.study_name, "trials": len(rows), "states": counts,
                       "charts": [k for k, _ in parts]})
    return ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
            f"<title>sweep report: {html.escape(study.study_name)}</title><style>{_CSS}</style></head><body>"
            + "".join(body)
            + f"<script type='application/json' id='sweep-report-data'>{html.escape(data, quote=False)}</script>"
            + "</body></html>")


def write_report(study: optuna.Study, out) -> Path:
    """Write the report to `out`; return its path."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(build_report(study), encoding="utf-8")
    return out
