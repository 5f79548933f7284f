"""Ray / Ray Tune internals used by the controller (tested: tests/compat/test_compat.py; ray <2.61).

Importing this module does not import Ray: each function imports what it touches.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

# Loggers whose records the controller filters while a sweep may stop (sweep.stops.QuietStops):
# Tune's driver loop, its experiment-state saver, its result reader, and Ray's worker module that prints actors' errors.
TUNE_LOGGERS = ("ray.tune.tune", "ray.tune.execution.tune_controller", "ray.tune.execution.experiment_state",
                "ray._private.worker", "ray.tune.analysis.experiment_analysis")
# The first words of Tune's own log messages that the controller recognises (they are not an API).
TRIAL_FAILED_MESSAGES = ("Trial task failed", "Unhandled error")
STATE_SAVE_FAILED_MESSAGE = "Saving experiment state to storage"
# (a fit stopped by a signal: a trial started just before it has no result yet to read; the study keeps it)
STOP_MESSAGES = ("Stop signal received", "Experiment has been interrupted", "Trials did not complete",
                 "Failed to fetch metrics for")
# Tune could not delete a checkpoint its (restored, older) state still listed: it registered the new one first.
CHECKPOINT_HANDLING_FAILED = "Trial %s: Error handling checkpoint"


def keep_local_ray_on_loopback() -> None:
    """Bind a local Ray's servers to 127.0.0.1 only.

    Ray 2.60 turns `_node_ip_address="127.0.0.1"` back into the node's routable IP and binds its
    gRPC servers to all interfaces; its single-machine mode (`RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`,
    read when ray is imported into `ray._private.ray_constants.ENABLE_RAY_CLUSTER`) keeps the node
    IP at 127.0.0.1. The constant is set too, in case ray was imported before the variable was.
    """
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    if os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"].lower() in ("1", "true"):
        return  # the user asked for the node to be exposed
    import ray._private.ray_constants as ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False


# What Tune's `fit` imports before it starts the first trial, that `ray.init` never does: its default TensorBoard
# logger's tensorboardX, and W&B, which the count of callbacks for Ray's usage stats imports through Ray's W&B
# integration (~3 s between the fit's start and the first trial's, 2 cores; 2.9 s on an H100 host).
TUNE_FIT_IMPORTS = ("tensorboardX", "wandb")


def import_for_tune() -> threading.Thread:
    """Import `TUNE_FIT_IMPORTS` on a thread of their own, while `ray.init` waits for Ray's processes; join it
    before the fit. Only packages the main thread does not import meanwhile: two threads importing the same
    modules at once can deadlock on their import locks. A package that is missing or fails is Tune's to meet."""
    import importlib

    def run() -> None:
        for name in TUNE_FIT_IMPORTS:
            try:
                importlib.import_module(name)
            except Exception:  # noqa: BLE001 - only a head start
                pass

    thread = threading.Thread(target=run, name="sweep-tune-imports", daemon=True)
    thread.start()
    return thread


def retry_trials_lost_in_reset() -> None:
    """A trial whose reused actor dies while Tune resets it for the trial (its `reset` task) is retried like one whose
    actor died while it trained, instead of failing without ever training.

    Tune (ray <2.61) sees such a loss twice: Ray's actor manager calls `TuneController._actor_failed` (which, for a
    PENDING trial, sets it RUNNING and hands it to `_trial_task_failure`: retried), then the reset task's error
    callback with the same exception, which finds the trial PENDING again and fails it for good. And the trial
    would stay in `_resetting_trials`, so its next start would wait for a reset that never ends. Patched here:
    the trial leaves `_resetting_trials` (a reset that failed while its actor lives on is handled as Tune's
    `_actor_failed` handles a PENDING trial), and the second report of the same loss is dropped; the failure is
    counted once against `max_failures`. Idempotent."""
    from ray.exceptions import RayActorError
    from ray.tune.execution.tune_controller import TuneController
    from ray.tune.experiment import Trial

    original = TuneController._trial_task_failure
    if getattr(original, "_sweep_retries_reset", False):
        return

    def _trial_task_failure(self, trial, exception):
        handled = self.__dict__.setdefault("_sweep_reset_losses", {})
        if handled.get(trial) is exception:
            del handled[trial]
            return  # the same lost reset, already handled when its actor was reported failed
        if trial in self._resetting_trials:
            self._resetting_trials.discard(trial)
            if isinstance(exception, RayActorError):  # the one loss Ray reports twice (actor, then its task)
                handled[trial] = exception
            if trial.status == Trial.PENDING:
                self._set_trial_status(trial, Trial.RUNNING)
                self._unstage_trial_with_resources(trial)
        return original(self, trial, exception)

    _trial_task_failure._sweep_retries_reset = True  # type: ignore[attr-defined]
    TuneController._trial_task_failure = _trial_task_failure  # type: ignore[method-assign]


WORKER_DIED_NOTICE = "A worker died or was killed while executing a task by an unexpected system error"


def quiet_worker_death_notices() -> None:
    """Drop the raylet's "A worker died or was killed while executing a task ..." notice from the driver's terminal:
    the controller says each lost attempt once (its `retry`/`FAIL` line, the reason recorded in the study). Ray
    prints it from its error-listener thread through `ray._private.worker.print_to_stdstream` (looked up at each
    call); every other message goes through unchanged. Idempotent."""
    import ray._private.worker as ray_worker

    original = ray_worker.print_to_stdstream
    if getattr(original, "_sweep_quiet", False):
        return

    def print_to_stdstream(data, ignore_prefix: bool):
        if data.get("pid") == "raylet":
            lines = [x for x in data.get("lines", []) if not str(x).startswith(WORKER_DIED_NOTICE)]
            if not lines:
                return None
            data = {**data, "lines": lines}
        return original(data, ignore_prefix)

    print_to_stdstream._sweep_quiet = True  # type: ignore[attr-defined]
    ray_worker.print_to_stdstream = print_to_stdstream


def shutdown_ray(ray) -> bool:
    """`ray.shutdown()`, with the processes of a local Ray this driver started killed without Ray's graceful step.

    Ray's shutdown SIGTERMs each of its processes and waits up to 1 s for it to exit, before SIGKILL. The
    controller starts its local Ray with SIGTERM blocked (`controller._start_ray`), so every such wait ran out:
    5.3 s of a sweep's end on this CPU (2026-12-06), 0.3 s without. Ray has no switch for it:
    `ray._private.worker.shutdown` calls its private `Node.kill_all_processes(allow_graceful=True)`; this
    passes `allow_graceful=False` for this one shutdown. A driver connected to a cluster started no processes
    (its node object holds none): for it this is a plain disconnect. True when the switch was taken."""
    import ray._private.worker as ray_worker

    node: Any = getattr(ray_worker, "_global_node", None)
    kill = getattr(node, "kill_all_processes", None)
    if node is None or kill is None:
        ray.shutdown()
        return False

    def kill_all_processes(*args, **kwargs):
        kwargs["allow_graceful"] = False
        return kill(*args, **kwargs)

    node.kill_all_processes = kill_all_processes  # this node object is dropped by the shutdown
    ray.shutdown()
    return True


def interrupt_tune(fallback: BaseException) -> None:
    """End `Tuner.fit` the way Ctrl+C does: Tune stops starting trials, saves its experiment state one last
    time with the running trials unfinished, stops their actors and returns. Tune handles SIGUSR1 like SIGINT
    while it runs in the main thread (its private `ray.tune.tune._setup_signal_catching`); elsewhere
    `fallback` is raised from the callback, which ends the fit too."""
    if threading.current_thread() is threading.main_thread() and callable(signal.getsignal(signal.SIGUSR1)):
        signal.raise_signal(signal.SIGUSR1)
    else:
        raise fallback


def ray_temp_dir() -> Path:
    """Where Ray keeps its session folders on this machine (as `ray._common.utils.get_default_ray_temp_dir`)."""
    base = os.environ.get("RAY_TMPDIR") or (os.environ.get("TMPDIR") if sys.platform.startswith("linux") else None)
    return Path(base or "/tmp") / "ray"


def staged_experiment_dirs(run_dir: Path) -> list[Path]:
    """Folders where Ray may keep its own copies of Tune's experiment state for `run_dir`, newest first.

    Tune writes its experiment state in the Ray session folder of the driver
    (`session_*/artifacts/<time>/<experiment>/driver_artifacts`) and copies it into the run folder.
    Resolved: `session_latest` links to one of them.
    """
    staged = {d.resolve() for d in ray_temp_dir().glob(f"session_*/artifacts/*/{run_dir.name}/driver_artifacts")
              if d.is_dir()}
    return sorted(staged, key=lambda d: d.stat().st_mtime, reverse=True)


def state_names_run_folder(state_file: Path, run_dir: Path) -> bool:
    """Whether a Tune experiment state is `run_dir`'s: Tune pickles each trial's storage context (storage
    path included) into it, as hex."""
    try:
        return str(run_dir.parent).encode().hex() in state_file.read_text(errors="replace")
    except OSError:
        return False


def session_dir_of(pid: int) -> str | None:
    """The Ray session folder a Ray process of this machine belongs to (its `--session-dir=`/`--temp-dir`
    arguments name it: the raylet, GCS, dashboard agent and runtime-env agent all get it), or None."""
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    for a in args:
        for flag in (b"--session-dir=", b"--session_dir="):
            if a.startswith(flag):
                return a[len(flag):].decode(errors="replace")
    return None


# ------------------------------------------------------------------ Ray Tune's restore

def restored_callbacks(tuner: Any) -> list:
    """The callbacks `Tuner.restore` unpickled from the run folder (it takes no RunConfig, and keeps them on its
    private `_local_tuner`): the controller needs its own progress callback back to see a disk-full stop."""
    return list(tuner._local_tuner.get_run_config().callbacks or [])


def asha_rungs(scheduler: Any) -> list:
    """ASHAScheduler's rungs, every bracket's: (milestone, {Ray trial id: metric_op * value}) pairs, in the private
    `_brackets[i]._rungs` lists that its decisions read; `metric_op` (`_metric_op`) is -1 for "min", 1 for "max"."""
    return [rung for bracket in scheduler._brackets for rung in bracket._rungs]


def asha_metric_op(scheduler: Any) -> float:
    return scheduler._metric_op


def mark_trials_terminated(state_file: Path, trial_ids: set) -> list:
    """In a Tune experiment state (`experiment_state-*.json`: `trial_data` holds one [trial JSON, run metadata]
    pair per trial, the trial's `status` a plain string), mark the unfinished trials among `trial_ids`
    TERMINATED, so that `Tuner.restore` does not start them again. Written atomically; returns their ids."""
    data = json.loads(state_file.read_text())
    changed = []
    for pair in data.get("trial_data", []):
        trial = json.loads(pair[0])
        if trial.get("trial_id") in trial_ids and trial.get("status") in ("PENDING", "RUNNING", "PAUSED"):
            trial["status"] = "TERMINATED"
            pair[0] = json.dumps(trial, indent=2)
            changed.append(trial["trial_id"])
    if changed:
        tmp = state_file.with_name(f".{state_file.name}.tmp")
        tmp.write_text(json.dumps(data, indent=2))
        os.replace(tmp, state_file)
    return changed


def trials_in_state(state_file: Path) -> dict:
    """{Ray trial id: status} of the trials in a Tune experiment state."""
    trials = (json.loads(pair[0]) for pair in json.loads(state_file.read_text()).get("trial_data", []))
    return {t["trial_id"]: t.get("status") for t in trials}


def match_search_state(search_gen_state: Path, trials: dict) -> None:
    """Make a `search_gen_state-*.json` (a pickle of plain data: `{"counter": int, "name:ConcurrencyLimiter":
    {"live_trials": set, "num_unfinished_live_trials": int}, "finished": bool}`) agree with the experiment
    state's `trials` ({id: status}): Tune copies the two files separately, so a kill can leave one older than
    the other; its trial counter (or its "finished") would then ask for fewer trials than the study still needs
    run, and its limiter count trials that ended (or are marked ended) against `max_concurrent_trials` forever.
    The file belongs to a run folder `sweep.resume` has trusted."""
    import pickle

    state = pickle.loads(search_gen_state.read_bytes())
    # One trial created per trial restored, and not finished: Tune asks for the rest, the study's trials that no
    # restored trial runs first; the searcher says when the study holds them all (`StudySearch._study_is_full`).
    state["counter"] = len(trials)
    state["finished"] = False
    limiter = state.get("name:ConcurrencyLimiter")
    if isinstance(limiter, dict):
        limiter["live_trials"] = {i for i, s in trials.items() if s in ("PENDING", "RUNNING", "PAUSED")}
        limiter["num_unfinished_live_trials"] = len(limiter["live_trials"])
    tmp = search_gen_state.with_name(f".{search_gen_state.name}.tmp")
    tmp.write_bytes(pickle.dumps(state))
    os.replace(tmp, search_gen_state)
