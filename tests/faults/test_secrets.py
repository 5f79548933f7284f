"""Secrets (#6 item 9): a canary W&B key and a canary PostgreSQL password never land anywhere we write."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path

import pytest

import pg_server  # tests/pg_server.py (tests/ is on sys.path: tests/conftest.py)
from sweep_helpers import small_spec, sweep_cli, sweep_env

def _files_with(root: Path, needles: list[str]) -> list[str]:
    hits = []
    for p in root.rglob("*"):
        if p.is_file() and not p.is_symlink():
            try:
                data = p.read_bytes()
            except OSError:
                continue
            for n in needles:
                if n.encode() in data:
                    hits.append(f"{p} holds {n[:6]}...")
    return hits


def test_canary_key_and_password_appear_nowhere(tmp_path, assets, fault_row):
    if not pg_server.available() or shutil.which("runuser") is None and os.geteuid() == 0:
        pytest.skip("needs PostgreSQL (initdb, pg_ctl)")
    key = "wandbcanary" + uuid.uuid4().hex            # a W&B key is 40 hex characters; any string does here
    pw = "pgcanary" + uuid.uuid4().hex[:20]
    srv = pg_server.start(password=pw)
    ray_tmp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))  # short: Ray's socket paths have a length limit
    try:
        storage = srv.url_no_password
        spec = small_spec(tmp_path, assets, name="secrets", storage=storage,
                          tracking={"wandb": {"mode": "offline", "project": "sweep-faults"}},
                          params={"learning_rate": {"type": "choice", "values": [0.02, 0.005]}})
        env = sweep_env(tmp_path, WANDB_API_KEY=key, PGPASSWORD=pw, RAY_TMPDIR=str(ray_tmp), WANDB_MODE="offline")
        t0 = time.perf_counter()
        runs = [sweep_cli("run", spec, cwd=tmp_path, env=env)]
        assert runs[0].returncode == 0, runs[0].stdout[-3000:] + runs[0].stderr[-3000:]
        runs.append(sweep_cli("status", "secrets", "--json", cwd=tmp_path, env=env, timeout=120))
        runs.append(sweep_cli("export", "secrets", "-o", tmp_path / "best.yaml", cwd=tmp_path, env=env, timeout=120))
        runs.append(sweep_cli("report", "secrets", "-o", tmp_path / "report.html", cwd=tmp_path, env=env, timeout=120))
        seconds = time.perf_counter() - t0
        for r in runs[1:]:
            assert r.returncode == 0, r.stderr[-2000:]
        needles = [key, pw]

        # 1. stdout/stderr of every command
        for r in runs:
            for n in needles:
                assert n not in r.stdout and n not in r.stderr, r.args
        # 2. every file we wrote: Ray results and checkpoints, W&B offline runs, registry, export, report
        assert (tmp_path / "best.yaml").exists() and list((tmp_path / "runs").rglob("result.json"))
        wandb_files = [p for p in (tmp_path / "runs").rglob("*.wandb")]
        assert wandb_files, "no offline W&B run was written"
        hits = _files_with(tmp_path, needles)
        # 3. Ray's session: logs of the driver, raylet, GCS and workers
        hits += _files_with(ray_tmp, needles)
        assert list(ray_tmp.rglob("*.log")) or list(ray_tmp.rglob("*.out")), "no Ray logs found"
        assert not hits, hits

        # 4. the study: every row of every table (attrs of the study and trials, params, values)
        import psycopg

        with psycopg.connect(host="127.0.0.1", port=srv.port, user=srv.user, password=pw, dbname="postgres") as c:
            tables = [r[0] for r in c.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")]
            dump = "\n".join(str(row) for t in tables for row in c.execute(f'SELECT * FROM "{t}"'))
            n_trials = c.execute("SELECT count(*) FROM trials").fetchone()[0]
        assert "trial_user_attributes" in tables and n_trials == 2 and "val_loss" in dump
        for n in needles:
            assert n not in dump
        n_files = sum(1 for p in tmp_path.rglob("*") if p.is_file()) + sum(1 for p in ray_tmp.rglob("*") if p.is_file())
    finally:
        pg_server.cleanup(srv)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    fault_row(fault="secrets in the output",
              injected="canary `WANDB_API_KEY` + canary `PGPASSWORD`; `sweep run` (PostgreSQL study, W&B offline), status, export, report",
              lost=f"0 leaks: 4 commands' stdout/stderr, {n_files} files (Ray results/logs, W&B offline, export, report), "
                   f"{len(tables)} study tables", seconds=seconds)
