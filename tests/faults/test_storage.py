"""Storage errors (#6 item 4), injected under a real `sweep run`: the study's database restarted, locked by
another writer, and down for longer than the searcher's retries.

A write to the study that fails is retried (`StudySearch._retry`, logged on the controller's stderr) and never
silently dropped: the sweep either records everything Ray reported, or stops with one clear message and exit
75, after which `sweep resume SPEC` finishes it. "Nothing lost" is checked against Ray's own record of what
the trials reported (every trial's `result.json` under the run's output_dir): each reported rung is an
intermediate value of the one study trial of that Ray trial.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import time
import uuid
from pathlib import Path

import optuna
import pytest

from sweep_helpers import LiveCli, small_spec, sweep_env

RUNGS = (4, 8, 16)
LRS = [0.02, 0.005]
RETRY_LINE = re.compile(r"study \S+: (.+?) failed \(try (\d+) of (\d+)\), retrying in [\d.]+s: (.*)")


def retries(run: LiveCli) -> list[tuple[str, int, str]]:
    """(write, try, database's message) of each retry the controller logged."""
    return [(m[1], int(m[2]), m[4]) for m in map(RETRY_LINE.search, list(run.err)) if m]


def ray_reports(run_dir: Path) -> dict[str, dict[int, list[float]]]:
    """What Ray Tune recorded that each trial reported: {ray trial id: {budget step: [val_loss, ...]}}."""
    out: dict[str, dict[int, list[float]]] = {}
    for rj in run_dir.rglob("result.json"):
        for line in rj.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                if r.get("val_loss") is not None and r.get("steps") is not None:
                    out.setdefault(r["trial_id"], {}).setdefault(int(r["steps"]), []).append(r["val_loss"])
    return out


def check_nothing_lost(study: optuna.Study, run_dir: Path, n_trials: int) -> int:
    """The study holds exactly `n_trials` trials, one per Ray trial, none RUNNING, and every rung Ray reported
    (with its metrics); returns how many rung reports that is."""
    trials = study.trials
    by_ray_id = {t.user_attrs.get("ray_trial_id"): t for t in trials}
    reports = ray_reports(run_dir)
    states = [(t.number, t.state.name, t.user_attrs.get("fail_reason")) for t in trials]
    assert len(trials) == n_trials, states
    assert None not in by_ray_id and len(by_ray_id) == n_trials, [t.user_attrs.get("ray_trial_id") for t in trials]
    assert all(s in ("COMPLETE", "PRUNED") for _, s, _ in states), states         # none RUNNING, none failed
    assert set(reports) == set(by_ray_id), (sorted(reports), sorted(by_ray_id))  # one study trial per Ray trial
    n_rungs = 0
    for rid, reported in reports.items():
        t = by_ray_id[rid]
        assert sorted(t.intermediate_values) == sorted(reported), (t.number, t.intermediate_values, reported)
        for step, values in reported.items():   # a rung reported again after a resume: the first report stands
            assert t.intermediate_values[step] == pytest.approx(values[0]), (t.number, step, values)
            assert t.user_attrs[f"rung_{step}"]["val_loss"] == pytest.approx(values[0])
        n_rungs += len(reported)
    return n_rungs


def _pg_url(pg_server, name: str) -> str:
    db = f"{name}_{uuid.uuid4().hex[:10]}"
    pg_server.create_database(db)
    return f"postgresql+psycopg://{pg_server.user}@127.0.0.1:{pg_server.port}/{db}"  # the password: PGPASSWORD only


def _study(pg_server, url: str, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=url.replace(f"{pg_server.user}@", f"{pg_server.user}:{pg_server.password}@"))


def test_postgresql_restarted_mid_sweep_loses_nothing(tmp_path, assets, pg_server, fault_row):
    url = _pg_url(pg_server, "restart")
    spec = small_spec(tmp_path, assets, name="pgrestart", rungs=RUNGS, params={"learning_rate": {"type": "choice", "values": LRS}})
    t0 = time.perf_counter()
    run = LiveCli("run", spec, "--storage", url, cwd=tmp_path, env=sweep_env(tmp_path, PGPASSWORD=pg_server.password))
    restarts = []
    try:
        # Once the first rung is printed (trials running, rungs being recorded); then as the last trial ends
        # (its final writes, then the controller's own: unfinished trials failed, the leaderboard read).
        for event, pattern, count in (("the first rung was printed", r" rung 1/", 1),
                                      ("the last trial ended", r" (COMPLETE|PRUNED|FAIL)\b", len(LRS))):
            if run.wait_for(pattern, 300, count) and run.proc.poll() is None:
                pg_server.restart()
                restarts.append(event)
    finally:
        rc = run.finish()
    seconds = time.perf_counter() - t0
    assert rc == 0, run.tail()
    assert restarts, "the sweep ended before any rung:\n" + run.tail()
    assert pg_server.password not in run.stdout + run.stderr
    assert "Traceback" not in run.stderr, run.stderr[-4000:]
    n_rungs = check_nothing_lost(_study(pg_server, url, "pgrestart"), tmp_path / "runs" / "pgrestart", len(LRS))
    retried = retries(run)
    fault_row(fault="PostgreSQL restarted mid-sweep",
              injected=f"`sweep run --storage postgresql+psycopg://...` (password in PGPASSWORD); `pg_ctl restart -m fast` "
                       f"{len(restarts)}x: once {', once '.join(restarts)}",
              lost=f"none: {len(LRS)} of {len(LRS)} trials and all {n_rungs} rungs Ray reported are in the study; no duplicate, none RUNNING; "
                   f"{len(retried)} failed tries retried" + (f" ({', '.join(sorted({w for w, _, _ in retried}))})" if retried else ""),
              seconds=seconds)


LOCKER = """
import sqlite3, sys, time
c = sqlite3.connect(sys.argv[1], timeout=60, isolation_level=None)
c.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
sys.stdin.readline()
c.execute("COMMIT")
print("released", flush=True)
"""


def test_sqlite_locked_by_another_writer_is_retried_and_loses_nothing(tmp_path, assets, fault_row):
    db = tmp_path / "locked.db"
    busy_s = 2  # SQLite's busy timeout for this study (`?timeout=`); the lock is held far longer
    spec = small_spec(tmp_path, assets, name="locked", rungs=RUNGS, params={"learning_rate": {"type": "choice", "values": LRS}})
    t0 = time.perf_counter()
    run = LiveCli("run", spec, "--storage", f"sqlite:///{db}?timeout={busy_s}", cwd=tmp_path, env=sweep_env(tmp_path))
    locker, held = None, 0.0
    try:
        assert run.wait_for(r" rung 1/", 300), "no trial reached its first rung:\n" + run.tail()
        # Another process takes the database: no other connection may read or write it until it commits.
        locker = subprocess.Popen([sys.executable, "-c", LOCKER, str(db)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert locker.stdout.readline().strip() == "locked"
        t_lock = time.time()
        # Hold it over several busy timeouts, until the controller has failed and retried a write twice
        # (its retries give up after 5 tries, ~17 s here: release before that).
        while time.time() - t_lock < 40 and run.proc.poll() is None:
            if time.time() - t_lock >= 10 and len(retries(run)) >= 2:
                break
            time.sleep(0.1)
        locker.stdin.write("release\n")
        locker.stdin.flush()
        assert locker.stdout.readline().strip() == "released"
        held = time.time() - t_lock
        locker.wait(10)
    finally:
        if locker is not None and locker.poll() is None:
            locker.kill()
        rc = run.finish()
    seconds = time.perf_counter() - t0
    retried = retries(run)
    assert rc == 0, run.tail()
    assert held > busy_s * 4, held
    # The retries are on the controller's stderr, where the user sees them, with the database's own words.
    assert len(retried) >= 2 and all("database is locked" in msg for _, _, msg in retried), run.stderr[-4000:]
    assert "giving up" not in run.stderr and "Traceback" not in run.stderr, run.stderr[-4000:]
    study = optuna.load_study(study_name="locked", storage=f"sqlite:///{db}")
    n_rungs = check_nothing_lost(study, tmp_path / "runs" / "locked", len(LRS))
    writes = sorted({w for w, _, _ in retried})
    fault_row(fault="SQLite study locked by another writer",
              injected=f"`sweep run` on a SQLite study (busy timeout {busy_s} s via `?timeout=`); another process holds "
                       f"`BEGIN EXCLUSIVE` on it for {held:.0f} s once the first rung was printed",
              lost=f"none: {len(LRS)} of {len(LRS)} trials and all {n_rungs} rungs Ray reported are in the study; no duplicate, none RUNNING; "
                   f"{len(retried)} failed tries retried ({', '.join(writes)}: database is locked), logged on stderr",
              seconds=seconds)


def test_postgresql_down_longer_than_the_retries_stops_clearly_then_resumes(tmp_path, assets, pg_server, fault_row):
    url = _pg_url(pg_server, "down")
    spec = small_spec(tmp_path, assets, name="pgdown", rungs=RUNGS, params={"learning_rate": {"type": "choice", "values": LRS}})
    # Tune saves its experiment state (what `sweep resume` restores) every ~1 s instead of every 10 s+: a trial
    # asked after its last save is, on resume, recorded FAIL as lost and asked again (as for a killed controller).
    env = sweep_env(tmp_path, PGPASSWORD=pg_server.password, TUNE_GLOBAL_CHECKPOINT_S="1")
    t0 = time.perf_counter()
    run = LiveCli("run", spec, "--storage", url, cwd=tmp_path, env=env)
    down_at = None
    try:
        assert run.wait_for(r" rung 1/", 300), "no trial reached its first rung:\n" + run.tail()
        pg_server.stop(mode="fast")  # a clean shutdown (commits flushed); it stays down until the controller gives up
        down_at = time.time()
        rc = run.finish(timeout=180)
        down_s = time.time() - down_at
    finally:
        if down_at is not None:
            pg_server.start()  # the session's server, for the tests after this one
    out, err = run.stdout, run.stderr
    assert rc == 75, run.tail()
    assert "Traceback" not in out + err and pg_server.password not in out + err, run.tail()
    stops = [line for line in err.splitlines() if line.startswith("sweep: stopped:")]
    assert len(stops) == 1, err[-4000:]
    assert "could not write to the study database" in stops[0] and re.search("refused|closed", stops[0]), stops[0]
    assert "Nothing recorded is lost" in err, err[-4000:]
    again = re.search(r"Once the database is back, continue with: (sweep resume .+)", err)
    assert again, err[-4000:]

    before = _study(pg_server, url, "pgdown").trials
    recorded = {t.number: dict(t.intermediate_values) for t in before}
    assert any(recorded.values()), recorded  # rungs were recorded before the outage

    # The command the message gave, as the user would paste it.
    args = shlex.split(again[1])[2:]
    resumed = LiveCli("resume", *args, cwd=tmp_path, env=env)
    rc = resumed.finish()
    seconds = time.perf_counter() - t0
    assert rc == 0, resumed.tail()
    assert pg_server.password not in resumed.stdout + resumed.stderr
    study = _study(pg_server, url, "pgdown")
    n_rungs = check_nothing_lost(study, tmp_path / "runs" / "pgdown", len(LRS))
    for t in study.trials:  # the rungs recorded before the outage, as they were
        assert {s: v for s, v in t.intermediate_values.items() if s in recorded.get(t.number, {})} == recorded.get(t.number, {})
    n_before = sum(map(len, recorded.values()))
    fault_row(fault="PostgreSQL down longer than the retries, then `sweep resume`",
              injected=f"`pg_ctl stop -m fast` once the first rung was printed, kept down until the controller "
                       f"stopped ({down_s:.0f} s); started again; then the `sweep resume` command its message gave",
              lost=f"0: `sweep run` exit 75 with one message (what failed, nothing lost, the resume command), no traceback, "
                   f"no password; {n_before} rungs recorded before the outage kept; after resume {len(LRS)} of {len(LRS)} "
                   f"trials, all {n_rungs} rungs Ray reported in the study, none RUNNING", seconds=seconds)
