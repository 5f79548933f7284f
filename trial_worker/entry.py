"""The worker's one door for `sweep`: everything the controller and the CLI call, imported here by name.

`sweep` imports nothing else from `trial_worker` (tests/spec/test_layering.py): the trial plan (packed or
one trial per process, `trial_worker.pack.tune`), a trial's Tune trainable and job (`trial_worker.attempt`),
the base evaluation, assets, input checks and production. Importing this module loads neither torch nor Ray.
"""

from __future__ import annotations

# None of these modules loads torch, transformers or Ray on import.
from trial_worker.attempt import evaluate_base, remove_temp_folders, run_trial, trainable, trial_job
from trial_worker.inputs.demo import prepare_assets
from trial_worker.inputs.check import check_job
from trial_worker.data import load_splits
from trial_worker.formats import export_formats
from trial_worker.marks import mark  # the start-up timeline (benchmarks/sweep_makespan.py)
from trial_worker.pack import PackingRefused, packing_said, trials_pack  # the packing decision (sweep validate asks it too)
from trial_worker.pack.tune import pack_names, trial_plan  # packed or one-trial-per-process: the controller's one choice
from trial_worker.pack.early import start as start_early_pack  # the first pack's process, started before Ray
from trial_worker.production import ProductionError, load_run, train
from trial_worker.production.chat import serve
from trial_worker.production.compare import compare
from trial_worker.production.gguf import GGUFExportError, export_run_gguf

__all__ = ["run_trial", "trainable", "evaluate_base", "remove_temp_folders", "prepare_assets", "trial_job",
           "check_job", "load_splits", "export_formats", "mark", "PackingRefused", "packing_said", "trials_pack", "trial_plan",
           "pack_names", "start_early_pack",
           "ProductionError", "load_run", "train", "serve", "compare", "GGUFExportError", "export_run_gguf"]
