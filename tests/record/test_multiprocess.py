"""Several controller processes writing one study at once: no lost and no duplicate trials (SQLite and PostgreSQL)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import optuna
from optuna.trial import TrialState

from sweep.record import load_study

N_PROCS, N_TRIALS = 4, 6

# Each process does what a controller does: opens the storage, creates-or-loads the study
# (all at the same moment), then asks, reports three rungs and tells, trial after trial.
WORKER = textwrap.dedent("""
    import sys, math, optuna
    sys.path.insert(0, {root!r})
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    from sweep.record import open_storage
    from sweep.record.search import StudySearch
    url, proc, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    space = {{"learning_rate": optuna.distributions.FloatDistribution(1e-5, 1e-2, log=True),
              "lora_r": optuna.distributions.CategoricalDistribution([4, 8, 16])}}
    s = StudySearch(space, sampler=optuna.samplers.RandomSampler(seed=proc), study_name="shared",
                    storage=open_storage(url), budget_key="steps", top_rung=40, retry_backoff_s=0.05, retries=8)
    for j in range(n):
        tid = f"p{{proc}}-t{{j}}"
        s.suggest(tid)
        for k, steps in enumerate((10, 20)):
            s.on_trial_result(tid, {{"steps": steps, "val_loss": 3.0 - k - proc / 10}})
        s.on_trial_complete(tid, result={{"steps": 40, "val_loss": 1.0 - proc / 10 - j / 100}})
    print("done", proc)
""")


def test_processes_writing_one_study_lose_and_duplicate_nothing(storage_url, tmp_path):
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[2])
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(root=root))
    procs = [subprocess.Popen([sys.executable, str(script), storage_url, str(i), str(N_TRIALS)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(N_PROCS)]
    for i, p in enumerate(procs):
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0 and f"done {i}" in out, err[-3000:]

    study = load_study(storage_url, "shared")
    trials = study.trials
    assert len(trials) == N_PROCS * N_TRIALS
    assert sorted(t.number for t in trials) == list(range(N_PROCS * N_TRIALS))
    ids = [t.user_attrs["ray_trial_id"] for t in trials]
    assert sorted(ids) == sorted(f"p{i}-t{j}" for i in range(N_PROCS) for j in range(N_TRIALS))
    for t in trials:
        proc, j = (int(x) for x in t.user_attrs["ray_trial_id"][1:].split("-t"))
        assert t.state == TrialState.COMPLETE
        assert sorted(t.intermediate_values) == [10, 20, 40]
        assert abs(t.value - (1.0 - proc / 10 - j / 100)) < 1e-9
    assert len(optuna.get_all_study_summaries(study._storage)) == 1  # one study, created once
