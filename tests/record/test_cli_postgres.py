"""`sweep run / status / export / report` on a PostgreSQL study, through the CLI, with W&B offline.

A real (tiny) sweep: real Ray, real QLoRA trials of the demo's tiny Llama on the CPU, the
study on the throwaway PostgreSQL server, the password only in PGPASSWORD.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import uuid

import optuna
import pytest

from sweep.spec import load_spec
from sweep_helpers import LiveCli, small_spec, sweep_cli

ROOT = __import__('pathlib').Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow
RUNGS = [2, 4]


def test_a_sweep_on_postgresql_through_the_cli(pg_server, tmp_path):
    db = f"t_{uuid.uuid4().hex[:12]}"
    pg_server.create_database(db)
    url = f"postgresql+psycopg://{pg_server.user}@127.0.0.1:{pg_server.port}/{db}"  # no password in the URL
    spec = small_spec(tmp_path, None, name="pgcli", rungs=RUNGS, num_trials=2,
                      params={"learning_rate": {"type": "choice", "values": [2.0e-2, 1.0e-7]}},
                      tracking={"wandb": {"mode": "auto", "project": "pgcli"}})  # no key: offline
    env = {k: v for k, v in os.environ.items() if k != "WANDB_API_KEY"}
    env.update(SWEEP_HOME=str(tmp_path / "home"), PGPASSWORD=pg_server.password, WANDB_MODE="offline",
               WANDB_CONFIG_DIR=str(tmp_path / "wandb_config"))

    run = LiveCli("run", str(spec), "--storage", url, cwd=tmp_path, env=env)
    try:
        # While it runs (from its first line: Ray, the base evaluation and the trials are still to come), a second
        # controller of the study is refused at once, naming the holder (the lease table lives in the PostgreSQL
        # database), without the password.
        assert run.wait_for(r"^study pgcli in ", 240), run.tail()
        seconds = [subprocess.Popen([sys.executable, "-m", "sweep.cli", command, str(spec), "--storage", url], cwd=tmp_path,
                                    env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                   for command in ("run", "resume")]
        for command, second in zip(("run", "resume"), seconds):
            out, err = second.communicate(timeout=60)
            assert second.returncode == 2, out[-2000:] + err[-2000:]
            assert re.search(rf"^sweep {command}: study 'pgcli' is held by another controller: pid {run.proc.pid} on "
                             r"host \S+, since .* UTC \(lease renewed \d+ s ago\)", err, re.M), err
            assert "Traceback" not in err and pg_server.password not in out + err
        assert run.proc.poll() is None, "the sweep ended before the second controllers were refused: " + run.tail()
    finally:
        returncode = run.finish()
    assert returncode == 0, run.tail()
    assert pg_server.password not in run.stdout + run.stderr

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

    r = sweep_cli("status", "pgcli", "--json", cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)["trials"]
    assert len(rows) == 2 and rows[0]["number"] == study.best_trial.number

    out = tmp_path / "best.yaml"
    r = sweep_cli("export", "pgcli", "-o", str(out), cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    assert load_spec(out).training.learning_rate == pytest.approx(study.best_trial.params["learning_rate"])

    r = sweep_cli("report", "pgcli", "-o", str(tmp_path / "report.html"), cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    assert "pgcli-trial-" in (tmp_path / "report.html").read_text()  # W&B run ids in the leaderboard

    r = sweep_cli("wandb-sync", "pgcli", "--dry-run", cwd=tmp_path, env=env)
    assert r.returncode == 0 and "2 offline runs" in r.stdout, r.stdout + r.stderr
