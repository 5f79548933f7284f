"""The W&B comparison workspace of a study, as code (`wandb-workspaces`).

Panels: parallel coordinates over the searched params → val loss; val loss vs budget
step, one line per trial; samples/s vs val loss; the runs table shows state, rung
reached and val loss, sorted by val loss, filtered to the study's group.

`build_workspace` needs no network (the model serialises offline with `workspace_json`);
`publish` saves it to W&B (needs WANDB_API_KEY or `wandb login`).
"""

from __future__ import annotations

import json
from typing import Optional, Sequence


def _need():
    try:
        import wandb_workspaces.reports.v2 as wr
        import wandb_workspaces.workspaces as ws
        from wandb_workspaces import expr
    except ImportError:
        raise ImportError("``wandb-workspaces`` package not found; install it with "
                          "`pip install 'sweep[wandb]'`") from None
    return ws, wr, expr


def searched_params(study) -> list[str]:
    """The study's searched parameter names (from its spec, else from its trials)."""
    spec = study.user_attrs.get("spec") or {}
    names = list(((spec.get("search") or {}).get("params") or {}))
    if not names:
        names = sorted({k for t in study.get_trials(deepcopy=False) for k in t.params})
    return names


def _log_scale(study, name: str) -> bool:
    spec = study.user_attrs.get("spec") or {}
    p = ((spec.get("search") or {}).get("params") or {}).get(name) or {}
    return p.get("type") == "loguniform"


def build_workspace(study, *, entity: str, project: str, params: Optional[Sequence[str]] = None):
    """A `wandb_workspaces.workspaces.Workspace` comparing the study's trial runs."""
    ws, wr, expr = _need()
    params = list(params) if params is not None else searched_params(study)
    group = study.study_name
    pc = wr.ParallelCoordinatesPlot(
        title="searched params → val loss",
        columns=[wr.ParallelCoordinatesPlotColumn(metric=wr.Config(p), log=_log_scale(study, p) or None) for p in params]
        + [wr.ParallelCoordinatesPlotColumn(metric=wr.SummaryMetric("val_loss"), display_name="val loss")],
    )
    unit = ((study.user_attrs.get("spec") or {}).get("budget") or {}).get("unit", "steps")
    curves = wr.LinePlot(title=f"val loss vs {unit} (one line per trial)", x="Step", y=["val_loss"],
                         title_x=unit, title_y="val loss", max_runs_to_show=200)
    train = wr.LinePlot(title=f"train loss vs {unit}", x="Step", y=["train_loss"], title_x=unit, max_runs_to_show=200)
    speed = wr.ScatterPlot(title="samples/s vs val loss", x=wr.SummaryMetric("samples_per_s"),
                           y=wr.SummaryMetric("val_loss"))
    rungs = wr.BarPlot(title="rung reached per trial", metrics=[wr.SummaryMetric("rung_reached")], orientation="h",
                       max_runs_to_show=200)
    return ws.Workspace(
        entity=entity,
        project=project,
        name=f"sweep: {group}",
        sections=[
            ws.Section(name=f"ASHA search: {group}", is_open=True, panels=[pc, curves, speed, rungs, train]),
        ],
        runset_settings=ws.RunsetSettings(
            filters=[expr.Metric("Group") == group],
            pinned_columns=["summary:state", "summary:rung_reached", "summary:val_loss", "summary:samples_per_s"]
            + [f"config:{p}" for p in params],
            order=[expr.Ordering(expr.Summary("val_loss"), ascending=True)],
        ),
    )


def workspace_json(workspace) -> str:
    """The workspace as the JSON W&B stores (no network)."""
    from dashboards._compat import workspace_model

    return json.dumps(workspace_model(workspace).model_dump(by_alias=True, exclude_none=True), indent=2)


def publish(workspace) -> str:
    """Save the workspace to W&B; return its URL."""
    workspace.save()
    return workspace.url
