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

from sweep_helpers import kill_processes_with_env, small_spec, sweep_cli, sweep_env

RUNGS = (4, 8, 16)
LRS = [0.02, 0.01, 0.005, 0.002]


def _snapshot(study):
    return {t.number: (t.state.name, t.value, dict(t.intermediate_values), t.params["learning_rate"]) for t in study.trials}


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

    r = sweep_cli("resume", spec, cwd=tmp_path, env=env)
    try:
        assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    finally:
        kill_processes_with_env(marker)
    seconds = time.perf_counter() - t0
    study = optuna.load_study(study_name="ctl", storage=storage)
    after = _snapshot(study)
    assert len(after) == len(LRS), after  # the trial count the spec asked for
    assert sorted(v[3] for v in after.values()) == sorted(LRS)  # each grid point once: no duplicate
    assert all(v[0] in ("COMPLETE", "PRUNED") for v in after.values()), after  # none RUNNING, none failed
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
