"""The leaderboard of a study: every trial ranked, read from the study alone (no Ray).

Order: COMPLETE trials by val loss; then PRUNED ones, furthest budget first, then by the
val loss at the rung where ASHA stopped them; then RUNNING, WAITING and FAIL trials by
number. A PRUNED trial's loss was measured at a smaller budget, so it is never ranked
above a trial that trained to the top rung, however low it is.
"""

from __future__ import annotations

import json
import math
from typing import Any, Optional, Union

import optuna
from optuna.trial import FrozenTrial, TrialState

from sweep.record import error_summary, finite_or_none

_STATE_ORDER = {"COMPLETE": 0, "PRUNED": 1, "RUNNING": 2, "WAITING": 3, "FAIL": 4}


def base_metrics(study: optuna.Study) -> Optional[dict]:
    """{"val_loss", "ppl"} of the base model from the study attrs, or None."""
    attrs = study.user_attrs
    if attrs.get("base_val_loss") is None:
        return None
    return {"val_loss": attrs["base_val_loss"], "ppl": attrs.get("base_ppl")}



def _row(t: FrozenTrial) -> dict:
    a = t.user_attrs
    iv = t.intermediate_values
    last_step = max(iv) if iv else None
    rung_last = a.get(f"rung_{last_step}", {}) if last_step is not None else {}
    if not isinstance(rung_last, dict):
        rung_last = {}
    if t.state == TrialState.COMPLETE:
        val = finite_or_none(t.value)
    else:
        # PRUNED/RUNNING/FAIL: the last rung's loss (studies from other tools: the last intermediate value)
        val = finite_or_none(a.get("val_loss_last", rung_last.get("val_loss")))
        if val is None and last_step is not None:
            val = finite_or_none(iv[last_step])

    def last(key: str, final_key: Optional[str] = None):
        v = a.get(final_key or key)
        return finite_or_none(v if v is not None else rung_last.get(key))

    ppl = last("ppl", "ppl_last")
    if ppl is None and val is not None:
        ppl = math.exp(val) if val < 700 else None
    row = {
        "rank": 0,
        "number": t.number,
        "state": t.state.name,
        "params": dict(t.params),
        "rung_reached": a.get("rung_reached", len(iv)),
        "budget_reached": a.get("budget_reached", last_step if last_step is not None else 0),
        "budget_unit": a.get("budget_unit"),
        "val_loss": val,
        "ppl": ppl,
        "samples_per_s": last("samples_per_s"),
        "tokens_per_s": last("tokens_per_s"),
        "peak_mem_gb": last("peak_mem_gb"),
        "wall_s": last("wall_s"),
    }
    if t.state == TrialState.FAIL:
        row["fail_reason"] = a.get("fail_reason")
    row["retries"] = list(a.get("retries", []))
    return row


def _key(row: dict):
    state = _STATE_ORDER.get(row["state"], 5)
    loss = row["val_loss"] if row["val_loss"] is not None else math.inf
    if row["state"] == "COMPLETE":
        return (state, loss, row["number"])
    if row["state"] == "PRUNED":
        return (state, -(row["budget_reached"] or 0), loss, row["number"])
    return (state, row["number"])


def leaderboard(study: optuna.Study) -> list[dict]:
    """Rows (dicts) for every trial, ranked; see the module docstring for the order.

    Keys: rank, number, state, params, rung_reached, budget_reached, budget_unit,
    val_loss (final for COMPLETE, last rung's otherwise), ppl, samples_per_s,
    tokens_per_s, peak_mem_gb, wall_s, retries (Ray's retries of the trial, see `sweep.record`),
    and fail_reason for FAIL rows.
    """
    rows = sorted((_row(t) for t in study.get_trials(deepcopy=False)), key=_key)
    for i, r in enumerate(rows, 1):
        r["rank"] = i
    return rows


def _base_of(base: Union[optuna.Study, dict, None]) -> tuple[Optional[dict], Optional[str]]:
    if isinstance(base, optuna.Study):
        return base_metrics(base), base.study_name
    return base, None


def to_json(rows: list[dict], base: Union[optuna.Study, dict, None] = None, *, indent: int = 2) -> str:
    """{"study", "base", "trials": rows} as JSON (NaN never appears: missing numbers are null)."""
    b, name = _base_of(base)
    return json.dumps({"study": name, "base": b, "trials": rows}, indent=indent, allow_nan=False)


def _fmt(v: Any, spec: str = ".4f") -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return format(v, spec)
    return str(v)


def _fmt_param(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def _params(row: dict) -> str:
    return " ".join(f"{k}={_fmt_param(v)}" for k, v in sorted(row["params"].items()))


def render(rows: list[dict], base: Union[optuna.Study, dict, None] = None, *, console=None, limit: Optional[int] = None) -> None:
    """Print the leaderboard as a rich table, with each loss's gain over the base model."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console(highlight=False)
    b, name = _base_of(base)
    base_loss = b.get("val_loss") if b else None
    title = f"study {name}" if name else "leaderboard"
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["state"]] = counts.get(r["state"], 0) + 1
    caption = ", ".join(f"{n} {s}" for s, n in sorted(counts.items(), key=lambda x: _STATE_ORDER.get(x[0], 9)))
    if b:
        caption = f"base model: val_loss {_fmt(base_loss)}  ppl {_fmt(b.get('ppl'), '.2f')}" + (f"   |   {caption}" if caption else "")
    from rich import box

    table = Table(title=title, caption=caption or None, box=box.SIMPLE_HEAD, pad_edge=False)
    num = dict(justify="right", no_wrap=True)
    table.add_column("trial", **num)
    table.add_column("state", no_wrap=True)
    unit = next((r["budget_unit"] for r in rows if r.get("budget_unit")), None) or "budget"
    table.add_column(unit, **num)
    table.add_column("val_loss", **num)
    table.add_column("ppl", **num)
    if base_loss is not None:
        table.add_column("vs base", **num)
    table.add_column("samples/s", **num)
    table.add_column("tokens/s", **num)
    # Params in the table when there is room, else listed under it.
    shown = rows if limit is None else rows[:limit]
    wide = console.width >= 120
    params_inline = console.width >= 90 + max((len(_params(r)) for r in shown), default=0)
    if params_inline:
        table.add_column("params", overflow="fold", min_width=30)
    colors = {"COMPLETE": "green", "PRUNED": "yellow", "FAIL": "red", "RUNNING": "cyan"}
    for r in shown:
        cells = [
            str(r["number"]),
            f"[{colors.get(r['state'], 'white')}]{r['state']}[/]",
            _fmt(r["budget_reached"]) if r["rung_reached"] else "—",
            _fmt(r["val_loss"]),
            _fmt(r["ppl"], ".2f"),
        ]
        if base_loss is not None:
            # The gain: how much lower than the base model's loss (positive is better).
            if r["val_loss"] is None:
                cells.append("—")
            else:
                gain = base_loss - r["val_loss"]
                cells.append(f"{gain:+.3f}" + (f" {100 * gain / base_loss:+.0f}%" if base_loss and wide else ""))
        cells += [
            _fmt(r["samples_per_s"], ".1f"),
            _fmt(r["tokens_per_s"], ",.0f"),
        ]
        if params_inline:
            cells.append(_params(r))
        table.add_row(*cells)
    if not rows:
        console.print(f"{title}: no trials yet")
        return
    console.print(table)
    if not params_inline:
        for r in shown:
            console.print(f"  trial {r['number']:>3}: {_params(r)}", markup=False, highlight=False)
    for r in shown:
        for e in r["retries"]:
            where = f"its checkpoint at {e.get('unit', 'steps')} {e['resumes_from']}" if e.get("resumes_from") else "the start"
            console.print(f"  trial {r['number']:>3} retried from {where}: {e['error']}", markup=False, highlight=False)
        reason = (r.get("fail_reason") or "").strip()
        if r["state"] == "FAIL" and reason:
            console.print(f"  trial {r['number']:>3} failed: {error_summary(reason)}", markup=False, highlight=False)
    if limit is not None and len(rows) > limit:
        console.print(f"... {len(rows) - limit} more trials")
