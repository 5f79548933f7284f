"""`sweep report`: one self-contained HTML file, rendered by a real headless Chromium."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import pytest
from views_helpers import ROOT, build_study

from chromium import CHROMIUM, FLAGS, console_messages as _console_messages, dump


def _dump(page, profile):
    return dump(page.as_uri(), profile)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """A 12-trial study (COMPLETE, PRUNED, FAIL, base loss) and its report, written through the CLI."""
    import os

    work = tmp_path_factory.mktemp("report")
    url = f"sqlite:///{work / 'study.db'}"
    study = build_study(url, name="rep", n=12)
    out = work / "report.html"
    env = dict(os.environ, SWEEP_HOME=str(work / "home"))
    r = subprocess.run([sys.executable, "-m", "sweep.cli", "report", "rep", "--storage", url, "-o", str(out)],
                       capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    return {"study": study, "html": out.read_text(), "path": out, "work": work}


def test_the_report_is_one_self_contained_file(report):
    html = report["html"]
    # plotly.js is inlined once; nothing is fetched from anywhere.
    assert html.count("Plotly.newPlot") >= 5
    assert not re.search(r"<script[^>]+src=", html)
    assert not re.search(r"<link[^>]+href=", html)
    data = json.loads(re.search(r"id='sweep-report-data'>(.*?)</script>", html).group(1))
    assert data["charts"] == ["curves", "rungs", "importance", "parallel", "throughput"]
    assert sum(data["states"].values()) == 12 and set(data["states"]) == {"COMPLETE", "PRUNED", "FAIL"}


def test_the_report_shows_what_the_study_holds(report):
    from sweep.record.leaderboard import leaderboard

    html, study = report["html"], report["study"]
    rows = leaderboard(study)
    best = rows[0]
    assert best["state"] == "COMPLETE"
    assert f"best: trial {best['number']}" in html
    assert "base model 4.2000" in html            # reference line on the curves
    assert "stopped by ASHA" in html                # PRUNED stop points marked
    # Leaderboard rows in rank order, one per trial.
    numbers = [int(n) for n in re.findall(r"<tr[^>]*><td>\d+</td><td>(\d+)</td>", html)]
    assert numbers == [r["number"] for r in rows]
    # The rung chart counts trials with a report at each rung.
    for step in (10, 20, 40):
        n = sum(1 for t in study.trials if step in t.intermediate_values)
        assert f"steps {step}" in html and n > 0


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")
def test_chromium_renders_every_chart_with_no_console_errors(report, tmp_path):
    shot = tmp_path / "report.png"
    base = [CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]
    # The detector sees a page's errors: a page with one is caught.
    bad = tmp_path / "bad.html"
    bad.write_text("<html><body><script>console.error('boom'); notDefined();</script></body></html>")
    caught = _console_messages(_dump(bad, tmp_path / "p0").stderr)
    assert any("boom" in m for m in caught) and any("Uncaught ReferenceError" in m for m in caught), caught

    dom = _dump(report["path"], tmp_path / "profile")
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert _console_messages(dom.stderr) == []
    # Each chart div got its SVG from plotly.js: they rendered.
    for key in ("curves", "rungs", "importance", "parallel", "throughput"):
        m = re.search(rf'id="chart-{key}"[^>]*class="[^"]*js-plotly-plot', dom.stdout) or \
            re.search(rf'class="[^"]*js-plotly-plot[^"]*"[^>]*id="chart-{key}"', dom.stdout)
        assert m, f"chart {key} did not render"
    assert dom.stdout.count('class="main-svg"') >= 10
    snap = subprocess.run(base + ["--window-size=1280,2400", f"--screenshot={shot}", report["path"].as_uri()],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert snap.returncode == 0 and shot.stat().st_size > 50_000, snap.stderr[-2000:]
    keep = ROOT / "tests" / "views" / ".last_report.png"
    shutil.copy(shot, keep)  # for a person to look at (ignored by git)


def test_a_study_with_only_pruned_trials_still_reports(tmp_path):
    import optuna

    from sweep.record.report import build_report

    st = optuna.create_study(storage=f"sqlite:///{tmp_path / 's.db'}", study_name="p")
    t = st.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    t.report(1.0, 10)
    st.tell(t, state=optuna.trial.TrialState.PRUNED)
    html = build_report(st)
    assert "parameter importances need at least 2 COMPLETE trials" in html
    assert "chart-curves" in html
