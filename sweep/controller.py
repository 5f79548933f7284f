"""The controller: a Ray Tune `Tuner` with an Optuna searcher on the study and ASHA.

`run_sweep` is the whole of `sweep run`:
  spec -> assets (demo model/data if asked) -> study (created, spec recorded) ->
  base model's val loss (once per study) -> Tuner(OptunaSearch on the study,
  ASHAScheduler on the budget unit, trials with {cpu, gpu}) -> leaderboard.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional

from sweep.spec import SweepSpec, default_storage, public_dict, resolve_paths, spec_hash


def _make_progress_callback(searcher, spec: SweepSpec, console):
    from ray.tune import Callback

    class Progress(Callback):
        """One line per trial event: started, each rung (val loss, ppl), and how it ended.

        Tune pickles its callbacks with the experiment state, so the console (which holds
        a lock) is kept out of the pickled state and made again after a restore.
        """

        def __init__(self, searcher, unit, rungs, console):
            self.searcher, self.unit, self.rungs, self.t0 = searcher, unit, rungs, time.time()
            self.console = console
            self.disk_full = None  # the DiskFull reason that stopped the sweep

        def __getstate__(self):
            return {k: v for k, v in self.__dict__.items() if k != "console"}

        def __setstate__(self, state):
            self.__dict__.update(state)
            self.console = terminal_console()

        def _say(self, text: str) -> None:
            self.console.print(f"[dim]{time.time() - self.t0:7.1f}s[/] {text}")

        def _label(self, trial) -> str:
            n = self.searcher.trial_number(trial.trial_id)
            return f"trial {n:>3}" if n is not None else f"trial {trial.trial_id}"

        def on_trial_start(self, iteration, trials, trial, **info):
            params = " ".join(f"{k}={_fmt(v)}" for k, v in sorted(trial.config.items()))
            self._say(f"{self._label(trial)} [cyan]started[/]  {params}")

        def on_trial_result(self, iteration, trials, trial, result, **info):
            b = result.get(self.unit)
            r = self.rungs.index(b) + 1 if b in self.rungs else "?"
            self._say(
                f"{self._label(trial)} rung {r}/{len(self.rungs)} ({self.unit} {b})"
                f"  val_loss [bold]{result.get('val_loss', float('nan')):.4f}[/]  ppl {result.get('ppl', float('nan')):.2f}"
                f"  {result.get('samples_per_s', 0):.1f} samples/s"
            )
            if result.get("checkpoint_note"):
                from rich.markup import escape

                self._say(f"{self._label(trial)} [yellow]{escape(str(result['checkpoint_note']))}[/]")

        def on_trial_complete(self, iteration, trials, trial, **info):
            state = self.searcher.final_state(trial.trial_id) or "DONE"
            color = {"COMPLETE": "green", "PRUNED": "yellow"}.get(state, "white")
            b = (trial.last_result or {}).get(self.unit)
            self._say(f"{self._label(trial)} [{color}]{state}[/] at {self.unit} {b}")

        def on_trial_error(self, iteration, trials, trial, **info):
            from rich.markup import escape

            from sweep.record import error_summary

            reason = _error_text(trial)
            self.searcher.record_failure(trial.trial_id, reason)
            self._say(f"{self._label(trial)} [red]FAIL[/]: {escape(error_summary(reason))}")
            self._stop_if_disk_full(trial, reason)

        def on_trial_recover(self, iteration, trials, trial, **info):
            from rich.markup import escape

            from sweep.record import error_summary

            reason = _error_text(trial)
            # A Ray retry (`max_failures`) into a full disk would fail the same way: stop the sweep instead; the
            # trial stays unfinished in the study and `sweep resume` continues it from its last checkpoint.
            self._stop_if_disk_full(trial, reason)
            if self.disk_full:
                return
            # Tune retries from the trial's latest registered checkpoint (the metrics are its report's), else
            # from the start.
            latest = getattr(trial, "latest_checkpoint_result", None)
            resumes_from = (getattr(latest, "metrics", None) or {}).get(self.unit) if latest is not None else None
            error = error_summary(reason)
            self.searcher.record_retry(trial.trial_id, error, resumes_from or 0)
            attempt = getattr(getattr(trial, "run_metadata", None), "num_failures", None)
            self._say(f"{self._label(trial)} [yellow]retry{f' {attempt}' if attempt else ''}[/] "
                      f"from {f'its checkpoint at {self.unit} {resumes_from}' if resumes_from else 'the start'}: "
                      f"{escape(error)}")

        def _stop_if_disk_full(self, trial, reason: str) -> None:
            line = next((x for x in reversed(reason.splitlines()) if DISK_FULL_MARK in x), None)
            if line is None or self.disk_full:
                return
            self.disk_full = line[line.index(DISK_FULL_MARK):].strip()
            self._say(f"[red]stopping the sweep[/]: {self._label(trial)} hit a full disk; no new trial starts")
            _interrupt_tune()

    return Progress(searcher, spec.budget.unit, list(spec.budget.rungs), console)


DISK_FULL_MARK = "disk full: "  # how `trial_worker.entry.DiskFull` starts its reason


def _interrupt_tune() -> None:
    """End `Tuner.fit` the way Ctrl+C does: Tune stops starting trials, saves its experiment state one last time
    with the running trials still unfinished (so `Tuner.restore` continues them, and the searcher records
    nothing for them), stops their actors and returns. Tune handles SIGUSR1 like SIGINT while it runs in the
    main thread (`ray.tune.tune._setup_signal_catching`); elsewhere the callback's exception ends the fit."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread() and callable(signal.getsignal(signal.SIGUSR1)):
        signal.raise_signal(signal.SIGUSR1)
    else:
        raise DiskFullStop("disk full")


class DiskFullStop(RuntimeError):
    """A trial could not write its checkpoint (disk full): the sweep stopped, resumable once space is freed."""


class _QuietStops:
    """While a sweep may stop for a full disk or a lost study database: drops Tune's tracebacks of a study write
    that gave up (the controller reports it once) and Ray's tracebacks of the DiskFull trial errors (the trial's
    FAIL line and the study hold the reason) and Tune's own Ctrl+C messages once the sweep stops (the controller
    says once what happened and how to continue), and notes whether Tune failed to save its experiment state."""

    LOGGERS = ("ray.tune.tune", "ray.tune.execution.tune_controller", "ray.tune.execution.experiment_state",
               "ray._private.worker")

    def __init__(self, progress):
        self.progress, self.state_unsaved = progress, None

    def __enter__(self):
        for name in self.LOGGERS:
            logging.getLogger(name).addFilter(self)
        return self

    def __exit__(self, *exc):
        for name in self.LOGGERS:
            logging.getLogger(name).removeFilter(self)

    def filter(self, record) -> bool:
        text = str(record.msg)
        exc = record.exc_info[1] if record.exc_info else None
        about = f"{text} {exc!r} {getattr(exc, '__cause__', None)!r}"
        if exc is not None and _storage_failure(exc) is not None:
            return False  # a study write that gave up: the controller says it once, without Tune's traceback
        if "DiskFull" in about and text.startswith(("Trial task failed", "Unhandled error")):
            return False
        if not getattr(self.progress, "disk_full", None):
            # A save that failed on the full disk before the stop: the state saved at the stop is what counts.
            return not (text.startswith("Saving experiment state to storage") and "No space left" in repr(exc))
        if text.startswith("Saving experiment state to storage"):
            self.state_unsaved = (str(exc).strip().splitlines() or [type(exc).__name__])[-1] if exc else "failed"
            return False
        return not text.startswith(("Stop signal received", "Experiment has been interrupted", "Trials did not complete"))


def _disk_full_message(reason: str, *, run_dir: Path, spec: SweepSpec, spec_path: Path, study_name: str,
                       storage: Optional[str], state_unsaved: Optional[str] = None) -> str:
    again = _resume_command(spec_path, spec, study_name, storage)
    reason = reason.split(" [", 1)[0] if reason.endswith("]") else reason  # the library's own words stay in the study
    return (f"sweep: stopped: {reason.replace('`sweep resume SPEC`', 'resume')}.\n"
            f"The trial that hit it is recorded FAIL with that reason; trials still running were stopped unfinished and "
            f"no new trial was started. Ray Tune's run folder {run_dir} keeps every checkpoint written before.\n"
            + (f"Ray Tune could not save its last experiment state there either ({state_unsaved}): the run folder may "
               f"be older than the study, and `sweep resume` may redo work from where it was last saved.\n"
               if state_unsaved else "") +
            f"Free space on the disk of {run_dir}, then continue with: {again}")


def _resume_command(spec_path, spec: SweepSpec, study_name: str, storage: Optional[str]) -> str:
    """The `sweep resume` command that continues this sweep (a storage URL without its password)."""
    from sweep.record import url_without_password

    again = f"sweep resume {spec_path}"
    if storage:
        again += f" --storage {url_without_password(storage)}"
    if study_name != spec.name:
        again += f" --name {study_name}"
    return again


def terminal_console():
    """The sweep's console: the terminal's width, or 160 columns when the output is piped to a file."""
    from rich.console import Console

    return Console(highlight=False, width=None if sys.stdout.isatty() else 160)


def _fmt(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def _error_text(trial) -> str:
    path = getattr(trial, "error_file", None)
    try:
        if path and os.path.exists(path):
            text = Path(path).read_text()
            return text[-4000:]
    except OSError:
        pass
    return str(getattr(trial, "error_msg", "") or "trial failed")


class ResumeRefused(Exception):
    """`sweep resume` cannot continue this sweep (no such study or run folder, or the spec was edited)."""


def _flat(d: Any, prefix: str = "") -> dict:
    if isinstance(d, dict):
        out: dict = {}
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: d}


def _check_resumable(optuna, rstorage, study_name: str, spec: SweepSpec, spec_path: Path, run_dir: Path):
    """The study to resume, after checking it exists, has a run folder, and was started with this very spec."""
    from sweep.record import scrub

    try:
        study = optuna.load_study(study_name=study_name, storage=rstorage)
    except KeyError:
        raise ResumeRefused(f"sweep resume: no study {study_name!r} to resume; start it with `sweep run {spec_path}`") from None
    old_hash, new_hash = study.user_attrs.get("spec_hash"), spec_hash(spec)
    if old_hash != new_hash:
        old = _flat(study.user_attrs.get("spec") or {})
        new = _flat(scrub(json.loads(json.dumps(public_dict(spec), default=str))))
        changed = [f"  {k}: {old.get(k, '(absent)')!r} -> {new.get(k, '(absent)')!r}"
                   for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
        raise ResumeRefused(
            f"sweep resume: {spec_path} was edited since study {study_name!r} started (spec hash {old_hash} -> {new_hash}); "
            "a resumed sweep must search the space it started with. Changed:\n" + ("\n".join(changed) or "  (formatting only)")
            + f"\nUndo the edit, or start a new study: sweep run {spec_path} --name NEW_NAME")
    if not (run_dir / "tuner.pkl").exists():
        raise ResumeRefused(f"sweep resume: no Ray Tune run folder {run_dir} (tuner.pkl) to resume study {study_name!r} from")
    problem = _run_folder_problem(run_dir)
    if problem:
        raise ResumeRefused(f"sweep resume: will not restore study {study_name!r} from {run_dir}: {problem}")
    return study


def _run_folder_problem(run_dir: Path) -> Optional[str]:
    """Why Tune's run folder must not be restored from, or None.

    Restoring unpickles the folder's `tuner.pkl` and searcher/callback state, and unpickling runs code:
    like ssh with its keys, only files owned by this user (or root) and not writable by every user
    are trusted. And Tune's state files, copied into the run folder, are cut short if the controller died
    or the disk filled while they were copied; restoring from them would fail deep inside Tune, so they are
    put back from Ray's own copies when those are still there (`_restore_from_ray_staging`), else refused.
    """
    for p in [run_dir, *sorted(run_dir.glob("*.pkl")), *sorted(run_dir.glob("*.json"))]:
        why = _distrust(p)
        if why == "owner":
            return (f"{p} belongs to user id {p.stat().st_uid}, not to you ({os.getuid()}); restoring unpickles it, "
                    "which runs code. Resume as its owner, or start a new study: sweep run SPEC --name NEW_NAME")
        if why:
            return (f"{p} is writable by every user ({why}); restoring unpickles it, which runs code. If you trust "
                    f"it: chmod o-w {p}, then resume again")
    # Tune restores from the newest of each of its state files (named <kind>-<time>.json/.pkl) and tuner.pkl.
    import re

    newest: dict[str, Path] = {}
    for p in sorted([*run_dir.glob("*.json"), *run_dir.glob("*.pkl")]):
        newest[re.sub(r"-\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d(?=\.\w+$)", "", p.name)] = p
    torn = {p: _torn(p) for p in newest.values()}
    torn = {p: why for p, why in torn.items() if why}
    if torn and not _restore_from_ray_staging(run_dir, list(torn)):
        p, why = next(iter(torn.items()))
        return (f"Ray Tune's state file {p.name} is cut short ({why}), and Ray's own copy of it (in the Ray session "
                f"folder under {_ray_temp_dir()}) is gone: the controller died, or the disk filled, while it was "
                "copied here. Every trial and rung recorded in the study is kept; continue the search as a new study: "
                "sweep run SPEC --name NEW_NAME")
    return None


def _distrust(path: Path) -> Optional[str]:
    """Why a file to be unpickled on restore is not trusted: "owner" (neither this user's nor root's), or
    "mode ..." (writable by every user); None if trusted."""
    import stat

    st = path.stat()
    if hasattr(os, "getuid") and st.st_uid not in (os.getuid(), 0):
        return "owner"
    if st.st_mode & stat.S_IWOTH:
        return f"mode {stat.filemode(st.st_mode)}"
    return None


def _torn(path: Path) -> Optional[str]:
    """What is wrong with one of Tune's state files (JSON or pickle), None if it is whole. A pickle is parsed
    opcode by opcode (`pickletools.genops`), which runs nothing. Some of Tune's `.json` files are pickles
    (`search_gen_state-*.json`): a file starting with the pickle protocol byte is read as one."""
    import pickletools

    data = path.read_bytes()
    try:
        if path.suffix == ".json" and not data.startswith(b"\x80"):
            json.loads(data)
        else:
            for _ in pickletools.genops(data):
                pass
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    return None


def _ray_temp_dir() -> Path:
    """Where Ray keeps its session folders on this machine (as `ray._common.utils.get_default_ray_temp_dir`)."""
    base = os.environ.get("RAY_TMPDIR") or (os.environ.get("TMPDIR") if sys.platform.startswith("linux") else None)
    return Path(base or "/tmp") / "ray"


def _restore_from_ray_staging(run_dir: Path, torn: list[Path]) -> bool:
    """Put back Tune's state files that were cut short in the run folder from Ray's own copies; True if all were.

    Tune writes its experiment state in the Ray session folder of the driver
    (`session_*/artifacts/<time>/<experiment>/driver_artifacts`) and copies it into the run folder; a full disk or
    a kill can cut that copy short, while the session folder keeps the whole file. A copy is used only from a
    session folder of this user (or root) that no other user can write, whose experiment state names this run
    folder's storage path, and only if it is whole itself.
    """
    import shutil

    def trusted(p: Path) -> bool:
        return _distrust(p) is None

    # Tune pickles each trial's storage context (storage path included) into the experiment state, as hex.
    ours = str(run_dir.parent).encode().hex()
    staged = {d.resolve() for d in _ray_temp_dir().glob(f"session_*/artifacts/*/{run_dir.name}/driver_artifacts")
              if d.is_dir()}  # resolved: session_latest links to one of them
    for d in sorted(staged, key=lambda d: d.stat().st_mtime, reverse=True):
        states = [p for p in d.glob("experiment_state-*.json") if trusted(p) and not _torn(p)]
        if not (trusted(d) and any(ours in p.read_text() for p in states)):
            continue
        copies = {p: d / p.name for p in torn}
        if not all(c.is_file() and trusted(c) and not _torn(c) for c in copies.values()):
            continue
        for p, c in copies.items():
            tmp = p.with_name(f".{p.name}.restoring")
            shutil.copyfile(c, tmp)
            os.replace(tmp, p)
            print(f"sweep resume: Tune's {p.name} in {run_dir} was cut short; put back from Ray's own copy {c}",
                  file=sys.stderr, flush=True)
        return True
    return False


class StudyStorageLost(RuntimeError):
    """The study database failed for longer than the searcher's retries: the sweep stopped rather than go on unrecorded."""


def _storage_failure(error: BaseException) -> Optional[BaseException]:
    """The storage error a StudySearch write gave up on, in `error`'s chain (Tune wraps it in a TuneError)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if getattr(error, "study_write_failed", None):
            return error
        error = error.__cause__ or error.__context__
    return None


def _storage_lost_message(failure: BaseException, *, study_name: str, storage_url: str, spec: SweepSpec,
                          spec_path: Path, storage: Optional[str], run_dir: Path) -> str:
    from sweep.record import safe_url
    from sweep.search import storage_error_text

    what, tries, waited = failure.study_write_failed
    again = _resume_command(spec_path, spec, study_name, storage)
    return (f"sweep: stopped: could not write to the study database {safe_url(storage_url)}: {what} (study "
            f"{study_name!r}) failed {tries} times over {waited:.0f} s: {storage_error_text(failure)}\n"
            f"Nothing recorded is lost: the study keeps every write made before the failure, and Ray Tune's run "
            f"folder {run_dir} keeps the trials' results and checkpoints.\n"
            f"Once the database is back, continue with: {again}")


LOST_REASON = "lost: the controller was killed before Ray Tune saved this trial; not resumable"
UNFINISHED_REASON = "unfinished: Ray Tune ended the sweep without finishing this trial (see the run's Ray logs)"


def _fail_lost_trials(study_name: str, rstorage, *, only: Optional[set] = None, reason: str = LOST_REASON) -> int:
    """After a fit nothing may stay RUNNING: a trial Tune never finished (or, on resume, one the killed
    controller asked for but Tune had not saved) is recorded FAIL with the reason. `only`: trial ids
    to consider (this run's), so another controller's running trials are left alone. Returns how many."""
    import optuna

    from sweep.record import set_trial_user_attr_any_state

    study = optuna.load_study(study_name=study_name, storage=rstorage)
    lost = [t for t in study.trials if t.state == optuna.trial.TrialState.RUNNING
            and (only is None or t._trial_id in only)]
    for t in lost:
        set_trial_user_attr_any_state(rstorage, t._trial_id, "fail_reason", reason)
        study.tell(t.number, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)
    return len(lost)


def run_sweep(
    spec: SweepSpec,
    *,
    spec_path,
    study_name: Optional[str] = None,
    storage: Optional[str] = None,
    address: Optional[str] = None,
    num_trials: Optional[int] = None,
    console=None,
    resume: bool = False,
) -> dict:
    """Run the search the spec describes; return a summary (study, storage, counts by state).

    `resume=True` (`sweep resume`): continue a sweep whose controller died, from its Tune run folder
    (`tune.Tuner.restore`): finished trials stay as recorded, unfinished ones continue from their
    last checkpoint, and the spec must be the one the study was started with (its `spec_hash`).
    """
    console = console or terminal_console()
    spec_path = Path(spec_path)
    study_name = study_name or spec.name
    storage_url = storage or spec.storage or default_storage(spec, spec_path)
    spec = resolve_paths(spec, spec_path.parent)
    job = spec.job()

    import optuna

    from sweep.record import open_storage, record_base_metrics, record_spec, register_study, safe_url

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        # A local Ray listens on this machine only. Ray 2.60 turns `_node_ip_address="127.0.0.1"`
        # back into the node's routable IP and binds its gRPC servers (GCS, raylet, workers) to all
        # interfaces; in its single-machine mode (this switch, read when ray is imported) the node IP
        # is 127.0.0.1 and every server binds there. Set it yourself to 1 to expose the node.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

    rstorage = open_storage(storage_url)
    run_dir = Path(spec.output_dir or "sweep_runs").resolve() / study_name
    if resume:
        study = _check_resumable(optuna, rstorage, study_name, spec, spec_path, run_dir)
    else:
        study = optuna.create_study(storage=rstorage, study_name=study_name, direction="minimize", load_if_exists=True)
    record_spec(study, public_dict(spec), spec_hash(spec))
    register_study(study_name, storage_url)
    console.print(f"study [bold]{study_name}[/] in {safe_url(storage_url)}")

    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from sweep.search import StudySearch
    from sweep.space import make_sampler, optuna_space
    from trial_worker.entry import prepare_assets, trial_plan

    prepare_assets(job)

    if not address and os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"].lower() not in ("1", "true"):
        import ray._private.ray_constants as ray_constants

        ray_constants.ENABLE_RAY_CLUSTER = False  # in case ray was imported before the switch was set
    # A trial stopped by ASHA waits in `tune.report`; when its actor is reused Tune gives the old
    # training thread this long to unwind (cleanup, freeing memory) before failing the next trial.
    # Ray's default of 2 s is too short on a busy machine.
    os.environ.setdefault("TUNE_FUNCTION_THREAD_TIMEOUT_S", "120")
    ray.init(
        runtime_env={"env_vars": {"TUNE_FUNCTION_THREAD_TIMEOUT_S": os.environ["TUNE_FUNCTION_THREAD_TIMEOUT_S"]}},
        address=address,
        include_dashboard=False,
        configure_logging=True,
        logging_level="WARNING",
        log_to_driver=False,  # trial errors reach the terminal and the study through the callback
        ignore_reinit_error=True,
    )
    res = spec.resources
    # Packed trials (one warm process per GPU, trial_worker.pack) or one trial per process: the trainable,
    # its resources, and where the base model is evaluated.
    plan = trial_plan(job.model_dump(mode="json"), resources=res.model_dump(), run_dir=str(run_dir), name=study_name)
    try:
        if "base_val_loss" not in study.user_attrs:
            console.print("evaluating the base model (once per study) ...")
            base = plan.evaluate_base(job)
            record_base_metrics(study, base["val_loss"], base["ppl"])
            console.print(f"base model: val_loss {base['val_loss']:.4f}  ppl {base['ppl']:.2f}")

        n_trials = num_trials or spec.num_trials
        budget = spec.budget
        searcher = StudySearch(
            optuna_space(spec),
            metric="val_loss",
            mode="min",
            sampler=make_sampler(spec),
            study_name=study_name,
            storage=rstorage,
            budget_key=budget.unit,
            top_rung=budget.rungs[-1],
        )
        scheduler = ASHAScheduler(
            time_attr=budget.unit,
            max_t=budget.max,
            grace_period=budget.min,
            reduction_factor=budget.reduction_factor,
        )
        trainable = plan.trainable
        out_dir = Path(spec.output_dir or "sweep_runs").resolve()
        callbacks = [_make_progress_callback(searcher, spec, console)]
        if spec.tracking.wandb.mode != "disabled":
            from sweep.tracking import make_wandb_callback  # one W&B run per trial, on the driver

            callbacks.append(make_wandb_callback(searcher, spec, study_name, out_dir, console))
        if resume:
            # The searcher (on the study), scheduler and callbacks come back from the run folder's pickles,
            # which this sweep wrote under the spec's output_dir.
            tuner = tune.Tuner.restore(str(run_dir), trainable=trainable, resume_unfinished=True,
                                       resume_errored=False, restart_errored=False)
            console.print(f"resuming {run_dir}")
        else:
            tuner = tune.Tuner(
                trainable,
                tune_config=tune.TuneConfig(
                    metric="val_loss",
                    mode="min",
                    search_alg=searcher,
                    scheduler=scheduler,
                    num_samples=n_trials,
                    max_concurrent_trials=res.max_concurrent_trials,
                    reuse_actors=True,
                ),
                run_config=tune.RunConfig(
                    name=study_name,
                    storage_path=str(out_dir),
                    verbose=0,
                    callbacks=callbacks,
                    checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
                    failure_config=tune.FailureConfig(max_failures=res.max_failures),
                ),
            )
        console.print(
            f"ASHA over {n_trials} trials, rungs {' -> '.join(map(str, budget.rungs))} {budget.unit}, "
            f"{res.cpus_per_trial:g} CPU / {res.gpus_per_trial:g} GPU per trial"
            + (f", packed: {len(plan.packs)} pack(s)" if plan.mode == "packed" else "")
        )
        # On resume the callbacks are the ones restored from the run folder (Tuner.restore takes no RunConfig).
        progress = callbacks[0] if not resume else next(
            (c for c in tuner._local_tuner.get_run_config().callbacks or [] if hasattr(c, "_stop_if_disk_full")), None)
        if progress is not None:
            progress.disk_full = None
        with _QuietStops(progress) as logs:
            try:
                results = tuner.fit()
            except Exception:
                if not getattr(progress, "disk_full", None):
                    raise
                results = None  # the callback's exception ended the fit (Tune not in the main thread)
            if getattr(progress, "disk_full", None):
                ray.shutdown()  # its unhandled-error messages of the stopped trials are filtered too
                # Trials stopped unfinished stay RUNNING in the study: `sweep resume` continues them.
                raise DiskFullStop(_disk_full_message(progress.disk_full, run_dir=run_dir, spec=spec, spec_path=spec_path,
                                                      study_name=study_name, storage=storage, state_unsaved=logs.state_unsaved))
        errors = sum(1 for r in results if r.error is not None)
        # The study is written and read once more after the fit: retried like the searcher's own writes.
        if resume:
            errors += searcher._retry("fail lost trials", lambda: _fail_lost_trials(study_name, rstorage))
        else:
            mine = {t._trial_id for t in searcher._ot_trials.values()}
            errors += searcher._retry("fail unfinished trials", lambda: _fail_lost_trials(
                study_name, rstorage, only=mine, reason=UNFINISHED_REASON))

        from sweep.leaderboard import leaderboard, render

        study = searcher._retry("read the study", lambda: optuna.load_study(study_name=study_name, storage=rstorage))
        rows = searcher._retry("read the leaderboard", lambda: leaderboard(study))
        searcher._retry("read the leaderboard", lambda: render(rows, study, console=console))
    except DiskFullStop:
        raise
    except Exception as e:
        failure = _storage_failure(e)
        if failure is None:
            raise
        raise StudyStorageLost(_storage_lost_message(failure, study_name=study_name, storage_url=storage_url, spec=spec,
                                                     spec_path=spec_path, storage=storage, run_dir=run_dir)) from None
    finally:
        ray.shutdown()

    counts: dict[str, int] = {}
    for r in rows:
        counts[r["state"]] = counts.get(r["state"], 0) + 1
    return {"study": study_name, "storage": safe_url(storage_url), "states": counts, "errors": errors}
