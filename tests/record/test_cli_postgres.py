"""`sweep run / status / export / report` on a PostgreSQL study, through the CLI, with W&B offline.

A real (tiny) sweep: real Ray, real QLoRA trials of the demo's tiny Llama on the CPU, the
study on the throwaway PostgreSQL server, the password only in PGPASSWORD.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import optuna
import pytest
import yaml

from sweep.spec import load_spec

ROOT = __import__('pathlib').Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow
RUNGS = [2, 4]


def _sweep(*args, cwd, env):
    return subprocess.run([sys.executable, "-m", "sweep.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=900)


def test_a_sweep_on_postgresql_through_the_cli(pg_server, tmp_path):
    db = f"t_{uuid.uuid4().hex[:12]}"
    pg_server.create_database(db)
    url = f"postgresql+psycopg://{pg_server.user}@127.0.0.1:{pg_server.port}/{db}"  # no password in the URL
    demo = yaml.safe_load((ROOT / "search_spaces" / "demo_cpu.yaml").read_text())
    demo["name"] = "pgcli"
    demo["model"]["name_or_path"] = str(tmp_path / "assets" / "tiny-llama")
    demo["data"]["path"] = str(tmp_path / "assets" / "tasks")
    demo["data"]["max_eval_samples"] = 16
    demo["budget"] = {"unit": "steps", "min": RUNGS[0], "max": RUNGS[-1], "reduction_factor": 2}
    demo["output_dir"] = str(tmp_path / "runs")
    demo["search"] = {"sampler": "grid", "seed": 1, "num_trials": 2,
                      "params": {"learning_rate": {"type": "choice", "values": [2.0e-2, 1.0e-7]}}}
    demo["tracking"] = {"wandb": {"mode": "auto", "project": "pgcli"}}  # no key: offline
    demo["resources"]["max_concurrent_trials"] = 2
    spec = tmp_path / "pgcli.yaml"
    spec.write_text(yaml.safe_dump(demo, sort_keys=False))
    env = {k: v for k, v in os.environ.items() if k != "WANDB_API_KEY"}
    env.update(SWEEP_HOME=str(tmp_path / "home"), PGPASSWORD=pg_server.password, WANDB_MODE="offline",
               WANDB_CONFIG_DIR=str(tmp_path / "wandb_config"))

    r = _sweep("run", str(spec), "--storage", url, cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert pg_server.password not in r.stdout + r.stderr

    study = optuna.load_study(study_name="pgcli", storage=pg_server.url.rsplit("/", 1)[0] + f"/{db}")
    assert len(study.trials) == 2
    assert {t.state.name for t in study.trials} <= {"COMPLETE", "PRUNED"}
    assert "base_val_loss" in study.user_attrs
    for t in study.trials:
        assert sorted(t.intermediate_values) == RUNGS[: len(t.intermediate_values)]
        assert t.user_attrs["wandb_run_id"] == f"pgcli-trial-{t.number}"

    # The registry finds the study by name; neither it nor the study holds the password.
    reg = (tmp_path / "home" / "studies.json").read_text()
    assert pg_server.password not in reg and json.loads(reg)["pgcli"] == url
    assert pg_server.password not in json.dumps(study.user_attrs)

    r = _sweep("status", "pgcli", "--json", cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)["trials"]
    assert len(rows) == 2 and rows[0]["number"] == study.best_trial.number

    out = tmp_path / "best.yaml"
    r = _sweep("export", "pgcli", "-o", str(out), cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    assert load_spec(out).training.learning_rate == pytest.approx(study.best_trial.params["learning_rate"])

    r = _sweep("report", "pgcli", "-o", str(tmp_path / "report.html"), cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    assert "pgcli-trial-" in (tmp_path / "report.html").read_text()  # W&B run ids in the leaderboard

    r = _sweep("wandb-sync", "pgcli", "--dry-run", cwd=tmp_path, env=env)
    assert r.returncode == 0 and "2 offline runs" in r.stdout, r.stdout + r.stderr
