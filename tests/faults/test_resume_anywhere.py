"""Resume at any moment (#11 item 2): one sweep's controller is killed (`kill -9` of the `sweep run`/`sweep
resume` process) at 20+ moments spread over its life, each kill followed by `sweep resume SPEC`, which is
killed in turn at the next moment; the last resume finishes the sweep. The same again with packed trials
(`resources.packing: on`: a pack server trains the trials) at 8 of those moments.

The moments are found by watching the CLI's own lines (Ray starting, the base evaluation, a trial started, a
rung reported, a trial finished, the leaderboard), the run folder (a checkpoint folder appearing: killed while
Tune copies it) and the study database (its write journal: killed while the study is written), plus timed kills.
The controller's Ray processes are left running at each kill, as a user's would be: the next resume must end them.

Checked at the end: the last `sweep resume` exits 0; no trial RUNNING; exactly `num_trials` trials; every trial
finished before a kill unchanged (state, value, intermediate values); no finished trial trained again (its
Ray trials' result rows counted at the kill and at the end); no two trials with the same params; no Ray process
of the sweep left 10 s after the end.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path

import optuna
import pytest

from sweep_helpers import LiveCli, kill_processes_with_env, processes_with_env, small_spec, sweep_cli, sweep_env

NUM_TRIALS = 10
RUNGS = (2, 4, 8)
FINISHED = r" (COMPLETE|PRUNED|FAIL)"
LEADERBOARD = r"^\s+study anywhere\s*$"  # the title of the leaderboard printed at the end

# (what, how): ("line", pattern, count, delay_s): the n-th stdout line of this process matching pattern, then
# delay; ("checkpoint",): a new checkpoint folder in the run folder; ("study",): the study being written;
# ("after", seconds): a timed kill. The moments that need the sweep to move on come first, those that come in
# any run of the controller (Ray and Tune starting, the study's first writes) last, then the end.
POINTS = [
    ("during Ray start", ("line", r"^study ", 1, 0.3)),
    ("during the base evaluation", ("line", r"evaluating the base model", 1, 1.0)),
    ("right after the base evaluation", ("line", r"base model: val_loss", 1, 0.0)),
    ("while Tune starts", ("line", r"ASHA over", 1, 0.2)),
    ("right after a trial started", ("line", r" started ", 1, 0.0)),
    ("right after a rung report", ("line", r" rung 1/", 1, 0.0)),
    ("while a checkpoint is written", ("checkpoint",)),
    ("right after a trial finished", ("line", FINISHED, 1, 0.0)),
    ("right after a rung report", ("line", r" rung 2/", 1, 0.0)),
    ("while the study is written", ("study",)),
    ("right after a trial finished", ("line", FINISHED, 1, 0.3)),
    ("while a checkpoint is written", ("checkpoint",)),
    ("right after a rung report", ("line", r" rung 1/", 2, 0.0)),
    ("right after a trial finished", ("line", FINISHED, 2, 0.0)),
    ("timed, 8 s in", ("after", 8.0)),
    ("during Ray start", ("after", 2.0)),
    ("while Tune restores", ("line", r"ASHA over", 1, 0.5)),
    ("while the study is written", ("study",)),
    ("right after a trial started", ("line", r" started ", 1, 0.0)),
    ("while the study is written", ("study",)),
    ("during Ray start", ("after", 3.0)),
    ("at the end: the leaderboard", ("line", LEADERBOARD, 1, 0.0)),
]


def _snapshot(storage: str) -> dict:
    study = optuna.load_study(study_name="anywhere", storage=storage)
    return {t.number: {"state": t.state.name, "value": t.value, "steps": dict(t.intermediate_values),
                       "params": t.params, "ray_ids": {t.user_attrs.get("ray_trial_id")}} for t in study.trials}


def _result_rows(run_dir: Path) -> dict:
    """Rows of Tune's result.json per Ray trial id: one per report, i.e. per rung trained."""
    rows: dict = {}
    for f in run_dir.glob("*/result.json"):
        for line in f.read_text(errors="replace").splitlines():
            try:
                r = json.loads(line)
            except ValueError:
                continue  # a line a kill cut short
            rows[r.get("trial_id")] = rows.get(r.get("trial_id"), 0) + 1
    return rows


def _checkpoints(run_dir: Path) -> set:
    try:
        return {c.path for t in os.scandir(run_dir) if t.is_dir() for c in os.scandir(t.path)
                if c.name.startswith("checkpoint_") and c.is_dir()}
    except OSError:
        return set()


def _wait_and_kill(cli: LiveCli, how: tuple, run_dir: Path, db: Path, t0: float, timeout: float = 600) -> str:
    """Kill the controller at the moment `how` names; returns what was caught, or "" if the process ended first."""
    deadline = time.time() + timeout
    kind = how[0]
    seen_ckpt = _checkpoints(run_dir)
    journal = db.with_name(db.name + "-journal")
    mtime = db.stat().st_mtime_ns if db.exists() else 0
    caught = ""
    while time.time() < deadline and cli.proc.poll() is None:
        if kind == "line":
            _, pattern, count, delay = how
            if sum(1 for x in list(cli.out) if re.search(pattern, x)) >= count:
                time.sleep(delay)
                caught = "line"
        elif kind == "after":
            if time.time() - t0 >= how[1]:
                caught = "timer"
        elif kind == "checkpoint":
            if _checkpoints(run_dir) - seen_ckpt:
                caught = "new checkpoint folder"
        elif kind == "study":
            if journal.exists():
                caught = "study journal open"
            elif db.exists() and db.stat().st_mtime_ns != mtime:
                caught = "study file just written"
        if caught:
            break
        time.sleep(0.001 if kind in ("checkpoint", "study") else 0.02)
    if cli.proc.poll() is not None:
        return ""
    os.kill(cli.proc.pid, signal.SIGKILL)
    cli.proc.wait(30)
    return caught or "time out"


# Packed trials (`resources.packing: on`): the same sweep with its trials trained by a pack server (a Ray actor
# the controller owns, killed with it), at the moments where a pack holds trials, fewer of them (CI time).
PACKED_POINTS = [POINTS[i] for i in (1, 4, 6, 7, 9, 12, 14, 21)]


@pytest.mark.parametrize("packing", ["off", "on"])
def test_a_sweep_killed_at_any_moment_resumes_with_nothing_lost_or_trained_twice(tmp_path, assets, fault_row, packing):
    # 22 moments need a sweep that lasts: one trial per process gets 12 trials (with 10, a run where ASHA stopped
    # most trials at their first rung had finished the sweep after 14 kills)
    points, min_kills, num_trials = (POINTS, 20, NUM_TRIALS + 2) if packing == "off" else (PACKED_POINTS, 7, NUM_TRIALS)
    spec = small_spec(tmp_path, assets, name="anywhere", rungs=RUNGS, params={},
                      search={"sampler": "random", "seed": 1, "num_trials": num_trials, "params": {
                          "learning_rate": {"type": "loguniform", "low": 1e-3, "high": 3e-2},
                          "lora_r": {"type": "choice", "values": [2, 4, 8]}}},
                      resources={"gpus_per_trial": 0, "cpus_per_trial": 1, "max_concurrent_trials": 2, "packing": packing})
    env = sweep_env(tmp_path)
    marker = f"SWEEP_HOME={env['SWEEP_HOME']}\0".encode()
    db, run_dir = tmp_path / "anywhere.db", tmp_path / "runs" / "anywhere"
    storage = f"sqlite:///{db}"
    t_start = time.perf_counter()
    table, finished_at_kill, rows_at_kill, status_said = [], {}, {}, ""
    try:
        for i, (what, how) in enumerate(points):
            t0 = time.time()
            cli = LiveCli("run" if i == 0 else "resume", spec, cwd=tmp_path, env=env)
            caught = _wait_and_kill(cli, how, run_dir, db, t0)
            if not caught:  # the sweep ended before this moment came: it must have ended well
                assert cli.proc.returncode == 0, cli.tail()
                table.append((what, "not reached: the sweep had finished", time.time() - t0))
                break
            assert "Traceback" not in cli.stderr and "Token authentication" not in cli.stderr, cli.tail()
            snap = _snapshot(storage) if db.exists() else {}
            rows = _result_rows(run_dir)
            for n, t in snap.items():
                if t["state"] != "RUNNING":
                    finished_at_kill.setdefault(n, t)
                    for rid in t["ray_ids"]:
                        rows_at_kill.setdefault(rid, rows.get(rid, 0))
            running = sum(1 for t in snap.values() if t["state"] == "RUNNING")
            if running and not status_said:  # `sweep status` on the stale trials says what to do
                r = sweep_cli("status", "anywhere", cwd=tmp_path, env=env)
                status_said = r.stderr.strip()
                assert r.returncode == 0 and "is gone: they are stale" in r.stderr and f"sweep resume {spec}" in r.stderr, r.stderr
            table.append((what, f"killed ({caught}); study: {len(snap) - running} finished, {running} running",
                          time.time() - t0))
        else:
            t0 = time.time()
            cli = LiveCli("resume", spec, cwd=tmp_path, env=env)
            cli.proc.wait(400)
            time.sleep(0.5)  # the reader threads finish the pipes
            assert cli.proc.returncode == 0, cli.tail()
            done = "nothing to resume" in cli.stdout
            table.append(("(final resume)", "exit 0" + (", said there is nothing to resume" if done else ""),
                          time.time() - t0))
        assert "Traceback" not in cli.stderr, cli.tail()
        # Every Ray process of the sweep is gone within 10 s of the end (the killed runs' ones included).
        deadline = time.time() + 10
        while processes_with_env(marker) and time.time() < deadline:
            time.sleep(0.2)
        left = [Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ")[:80] for p in processes_with_env(marker)]
        assert not left, left
    finally:
        kill_processes_with_env(marker)
        print("\n".join(f"{i + 1:>2}. {w:<36} {o}  ({s:.1f} s)" for i, (w, o, s) in enumerate(table)))
        print(status_said)
    seconds = time.perf_counter() - t_start

    after = _snapshot(storage)
    kills = sum(1 for _, o, _ in table if o.startswith("killed"))
    assert kills >= min_kills, table
    assert len(after) == num_trials, (after, table)
    assert not [n for n, t in after.items() if t["state"] == "RUNNING"], after
    for n, t in finished_at_kill.items():  # finished before a kill: exactly as recorded then
        assert {k: after[n][k] for k in ("state", "value", "steps")} == {k: t[k] for k in ("state", "value", "steps")}, (n, t, after[n])
    rows = _result_rows(run_dir)
    trained_again = {rid: (n, rows.get(rid, 0)) for rid, n in rows_at_kill.items() if rows.get(rid, 0) != n}
    assert not trained_again, trained_again  # no report (rung trained) of a finished trial after its end
    params = [tuple(sorted(t["params"].items())) for t in after.values()]
    assert len(set(params)) == len(params), params  # never the same params twice (the space is continuous)
    fault_row(fault="controller killed at any moment, resumed each time" + (", packed trials" if packing == "on" else ""),
              injected=f"`kill -9` of the controller at {kills} moments chained over one sweep ({num_trials} trials, 2 at "
                       "once): " + "; ".join(f"{w} ({o.split(';')[0]})" for w, o, _ in table[:-1]),
              lost=f"0: last resume exit 0, {num_trials} trials, none RUNNING, {len(finished_at_kill)} finished before a "
                   "kill unchanged, none trained again, no params twice, no Ray process left 10 s after",
              seconds=seconds)
