"""Controller killed (#6 item 2): `kill -9` of `sweep run` mid-sweep, then `sweep resume SPEC`.

Finished trials stay as recorded, unfinished ones continue (Tune's run folder, `Tuner.restore`),
nothing stays RUNNING, the study holds the trial count the spec asked for; a spec edited since
the sweep started is refused, saying what changed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import optuna

from sweep_helpers import kill_processes_with_env, processes_with_env, small_spec, sweep_cli, sweep_env

RUNGS = (4, 8, 16)
LRS = [0.02, 0.01, 0.005, 0.002]


def _snapshot(study):
    return {t.number: (t.state.name, t.value, dict(t.intermediate_values), t.params["learning_rate"]) for t in study.trials}


def _resume_finishes(spec, tmp_path, env, storage: str, lrs: list):
    """`sweep resume SPEC` ends the sweep: the spec's trial count, each grid point once, none RUNNING or failed."""
    r = sweep_cli("resume", spec, cwd=tmp_path, env=env)
    try:
        assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    finally:
        kill_processes_with_env(f"SWEEP_HOME={env['SWEEP_HOME']}\0".encode())
    study = optuna.load_study(study_name=spec.stem, storage=storage)
    after = _snapshot(study)
    assert len(after) == len(lrs), after  # the trial count the spec asked for
    assert sorted(v[3] for v in after.values()) == sorted(lrs)  # each grid point once: no duplicate
    assert all(v[0] in ("COMPLETE", "PRUNED") for v in after.values()), after  # none RUNNING, none failed
    return study, after


def _sweep_run(spec, tmp_path, env) -> tuple[subprocess.Popen, list[str]]:
    """`sweep run SPEC` started, with the lines it prints gathered as they come."""
    proc = subprocess.Popen([sys.executable, "-m", "sweep.cli", "run", str(spec)], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    return proc, lines


def test_a_killed_controller_resumes_with_finished_trials_kept_and_none_running(tmp_path, assets, fault_row):
    spec = small_spec(tmp_path, assets, name="ctl", rungs=RUNGS, params={"learning_rate": {"type": "choice", "values": LRS}})
    # Tune saves its experiment state every ~1 s instead of its adaptive period ("auto", ~10 s+),
    # so the kill below lands while trials are still running yet after a save that saw one finish.
    env = sweep_env(tmp_path, TUNE_GLOBAL_CHECKPOINT_S="1")
    marker = f"SWEEP_HOME={env['SWEEP_HOME']}\0".encode()
    storage = f"sqlite:///{tmp_path / 'ctl.db'}"
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "sweep.cli", "run", str(spec)], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    finished = threading.Event()

    def read():
        for line in proc.stdout:
            lines.append(line)
            if " COMPLETE" in line or " PRUNED" in line:
                finished.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        assert finished.wait(240), "no trial finished:\n" + "".join(lines)
        t_done = time.time()
        # Kill once Tune's experiment state (written every few seconds) has seen that trial end.
        deadline = time.time() + 40
        while time.time() < deadline and not any(p.stat().st_mtime > t_done + 0.5
                                                 for p in (tmp_path / "runs" / "ctl").glob("experiment_state-*.json")):
            time.sleep(0.2)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
        orphans = kill_processes_with_env(marker)
    assert proc.returncode == -signal.SIGKILL

    before = _snapshot(optuna.load_study(study_name="ctl", storage=storage))
    done_before = {n: v for n, v in before.items() if v[0] != "RUNNING"}
    running_before = {n for n, v in before.items() if v[0] == "RUNNING"}
    assert done_before and running_before and len(before) <= len(LRS), before

    # An edited spec is refused, naming the field; nothing started.
    original = spec.read_text()
    spec.write_text(original.replace("0.005", "0.004"))
    r = sweep_cli("resume", spec, cwd=tmp_path, env=env, probe_imports=True)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "was edited since study 'ctl' started" in r.stderr and "search.params.learning_rate.values" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and "HEAVY_IMPORTED=\n" in r.stderr, r.stderr
    spec.write_text(original)

    study, after = _resume_finishes(spec, tmp_path, env, storage, LRS)
    seconds = time.perf_counter() - t0
    for n, v in done_before.items():  # finished trials stay exactly as recorded
        assert after[n] == v, (n, v, after[n])
    for n in running_before:  # unfinished trials continued in the same study trial
        assert set(before[n][2]) <= set(after[n][2]), (before[n], after[n])
    fault_row(fault="controller killed, then `sweep resume`",
              injected="`kill -9` of `sweep run` once 1 trial finished and Tune's experiment state saved it; orphaned Ray "
                       f"processes ({orphans}) killed; an edited spec tried first; then `sweep resume SPEC`",
              lost=f"0 of {len(LRS)} trials: {len(done_before)} finished kept as recorded, {len(running_before)} unfinished "
                   f"continued, {len(after) - len(before)} not yet started ran; none RUNNING; edited spec refused (exit 2)",
              seconds=seconds)


def test_killed_while_a_checkpoint_is_written_the_sweep_resumes_from_intact_checkpoints(tmp_path, assets, fault_row):
    """The machine dies mid-checkpoint: every process of the sweep (controller, Ray, trial workers) gets
    `kill -9` the moment a new checkpoint folder appears in Tune's run folder, while the trial worker is
    still copying it there. `sweep resume` must not resume from the torn folder, and loses nothing."""
    import yaml

    from trial_worker.checkpoint import verify

    lrs = LRS[:2]
    spec = small_spec(tmp_path, assets, name="torn", rungs=RUNGS, params={"learning_rate": {"type": "choice", "values": lrs}})
    data = yaml.safe_load(spec.read_text())
    data["model"]["lora"]["r"] = 1024  # a ~35 MB checkpoint: its copy takes long enough to be caught in the act
    spec.write_text(yaml.safe_dump(data, sort_keys=False))
    env = sweep_env(tmp_path, TUNE_GLOBAL_CHECKPOINT_S="1")
    marker = f"SWEEP_HOME={env['SWEEP_HOME']}\0".encode()
    storage = f"sqlite:///{tmp_path / 'torn.db'}"
    run_dir = tmp_path / "runs" / "torn"
    t0 = time.perf_counter()
    proc, lines = _sweep_run(spec, tmp_path, env)

    def checkpoint_dirs() -> set:
        try:
            return {c.path for t in os.scandir(run_dir) if t.is_dir() for c in os.scandir(t.path)
                    if c.name.startswith("checkpoint_") and c.is_dir()}
        except OSError:
            return set()

    caught = None
    try:
        # After the first rung (so there is a checkpoint to fall back to) wait for the next checkpoint to appear.
        deadline = time.time() + 240
        while time.time() < deadline and not checkpoint_dirs() and proc.poll() is None:
            time.sleep(0.05)
        seen = checkpoint_dirs()
        assert seen, "no checkpoint was written:\n" + "".join(lines)
        pids, refreshed = [], 0.0
        while time.time() < deadline and proc.poll() is None:
            if time.time() - refreshed > 0.2:
                pids, refreshed = processes_with_env(marker), time.time()
            new = checkpoint_dirs() - seen
            if new:
                for pid in pids:  # everything at once, as a power cut would
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                caught = sorted(new)[0]
                break
            time.sleep(0.0005)
        assert caught, "the sweep ended before a second checkpoint was written:\n" + "".join(lines)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)
        kill_processes_with_env(marker)
    problem = verify(caught)  # None: the copy had just finished; else: what the kill left torn
    before = _snapshot(optuna.load_study(study_name="torn", storage=storage))

    study, after = _resume_finishes(spec, tmp_path, env, storage, lrs)
    seconds = time.perf_counter() - t0
    for n, v in before.items():
        if v[0] != "RUNNING":
            assert after[n] == v, (n, v, after[n])  # finished trials exactly as recorded
        for step, value in v[2].items():  # every rung recorded before the kill is kept as it was
            assert after[n][2][step] == value, (n, step)
    events = [e["note"] for t in study.trials for e in t.user_attrs.get("checkpoint_events", [])]
    # Nothing was resumed from a folder failing its hashes: Tune had not registered the torn one, or the
    # hash check rejected it (and said so).
    assert all("rejected" in e for e in events), events
    state = "torn (" + problem + ")" if problem else "complete (the copy had just finished)"
    print(f"checkpoint {caught} at the kill: {state}")
    fault_row(fault="whole sweep killed while a checkpoint is written, then `sweep resume`",
              injected="`kill -9` of the controller, Ray and the trial workers the moment a new `checkpoint_*` folder "
                       "appeared in Tune's run folder (35 MB checkpoint being copied there)",
              lost=f"0 of {len(lrs)} trials; the checkpoint at the kill was {state}; resumed from intact checkpoints "
                   f"({len(events)} rejected by the hash check); none RUNNING; rungs recorded before the kill unchanged",
              seconds=seconds)


def test_trials_finished_after_tunes_last_save_are_not_trained_again_nor_replaced(tmp_path, assets, fault_row):
    """Tune saves its run every few seconds and after a trial's second checkpoint; a trial that starts and is
    pruned at its first rung between two saves, and then a kill, leave Tune's last save knowing fewer trials than
    the study holds. The restored Tune asks for more: the study, not Tune's older count, says how many the sweep
    has, so none is added beyond the spec's count (that ask would train a new trial, or repeat a grid point) and
    none finished is trained again. The older save is made exact here: Tune's state files as they were when the
    first trials started are put back after the kill."""
    spec = small_spec(tmp_path, assets, name="late", rungs=RUNGS, params={"learning_rate": {"type": "choice", "values": LRS}})
    env = sweep_env(tmp_path)
    marker = f"SWEEP_HOME={env['SWEEP_HOME']}\0".encode()
    storage = f"sqlite:///{tmp_path / 'late.db'}"
    run_dir = tmp_path / "runs" / "late"
    t0 = time.perf_counter()
    proc, lines = _sweep_run(spec, tmp_path, env)
    from sweep._compat.ray import trials_in_state
    from sweep.resume import STATE_KINDS

    def state_files() -> dict:
        return {p.name: p.read_bytes() for kind in STATE_KINDS for p in run_dir.glob(kind.format("*"))}

    def n_finished() -> int:
        return sum(1 for x in list(lines) if " COMPLETE" in x or " PRUNED" in x)

    old: dict = {}
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None and n_finished() < 3:
            files = state_files()
            exp = [n for n in files if n.startswith("experiment_state-")]
            if not old and len(files) == len(STATE_KINDS) and n_finished() == 0 and trials_in_state(run_dir / exp[0]):
                old = files  # Tune's save while its first trials run
            time.sleep(0.05)
        assert old and n_finished() >= 3, "no early save, or three trials did not finish:\n" + "".join(lines)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
        kill_processes_with_env(marker)
    for p in state_files():
        (run_dir / p).unlink()
    for name, data in old.items():
        (run_dir / name).write_bytes(data)
    saved = trials_in_state(next(run_dir.glob("experiment_state-*.json")))
    before = _snapshot(optuna.load_study(study_name="late", storage=storage))
    done_before = {n: v for n, v in before.items() if v[0] != "RUNNING"}
    assert len(done_before) >= 3 and len(saved) <= 2, (saved, before)  # a trial Tune's save never saw has finished

    study, after = _resume_finishes(spec, tmp_path, env, storage, LRS)
    seconds = time.perf_counter() - t0
    for n, v in done_before.items():
        assert after[n] == v, (n, v, after[n])
    fault_row(fault="controller killed after trials finished that Tune's last save never saw, then `sweep resume`",
              injected=f"`kill -9` of `sweep run` once 3 trials finished, Tune's state put back to its save while the first "
                       f"trials ran ({len(saved)} trial(s) in it, {len(before)} in the study)",
              lost=f"0 of {len(LRS)} trials: {len(done_before)} finished kept as recorded; no trial beyond the spec's count; "
                   "each grid point once; none RUNNING",
              seconds=seconds)
