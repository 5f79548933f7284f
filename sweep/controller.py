"""The controller: a Ray Tune `Tuner` with a searcher whose only state is the Optuna study, and ASHA.

`run_sweep` is the whole of `sweep run` and `sweep resume`, read top to bottom:
  spec -> study (created, spec recorded; on resume: checked) -> assets (demo model/data if asked)
  -> Ray -> base model's val loss (once per study: reused from a study of the same model and data, else
  evaluated beside the first trials) -> Tuner(StudySearch on the study, ASHAScheduler
  on the budget unit, trials with {cpu, gpu}), new or restored -> fit -> nothing left RUNNING ->
  leaderboard.
Around it: `sweep.progress` (the terminal), `sweep.resume` (what a resume trusts and how it agrees
with the study), `sweep.stops` (disk full, study database lost), `sweep._compat` (library internals).
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path, PurePosixPath
from typing import Optional, Union
from urllib.parse import urlsplit, urlunsplit

from sweep._compat.ray import ray_temp_dir as _ray_temp_dir  # noqa: F401  (the fault tests find Ray's folders by it)
from sweep._compat.ray import shutdown_ray
from sweep.processes import end_orphans, end_processes, mark_ray_owner, own_ray
from sweep.resume import UNFINISHED_REASON, ResumeRefused, check_resumable, fail_lost_trials, record_controller
from sweep.spec import SweepSpec, default_storage, is_uri, public_dict, resolve_paths, run_storage, spec_hash
from sweep.terminal import terminal_console
from sweep.stops import (DiskFullStop, Interrupts, QuietStops, StudyStorageLost, SweepInterrupted, SweepStopped,
                         disk_full_message, interrupted_message, resume_command, storage_failure, storage_lost_message)

# A sweep's run folder: a local (or mounted) folder, or a URI in Tune's storage (s3://bucket/prefix/<study>).
RunDir = Union[Path, str]

__all__ = ["run_sweep", "terminal_console", "DiskFullStop", "ResumeRefused", "StudyStorageLost", "SweepStopped"]


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

    `resume=True` (`sweep resume`): continue a sweep whose controller died (see `sweep.resume`):
    finished trials stay as recorded, unfinished ones continue from their newest verified checkpoint,
    and the spec must be the one the study was started with (its `spec_hash`).
    """
    import optuna

    from sweep.record import ControllerLease, open_storage
    from trial_worker.entry import mark

    mark("controller: run_sweep")
    console = console or terminal_console()
    spec_path = Path(spec_path)
    study_name = study_name or spec.name
    storage_url = storage or spec.storage or default_storage(spec, spec_path)
    spec = resolve_paths(spec, spec_path.parent)
    out_dir = run_storage(spec)  # Tune's storage_path: a URI (s3://...) unchanged, else an absolute local folder
    run_dir = run_folder(out_dir, study_name)
    again = resume_command(spec_path, spec, study_name, storage)
    if resume and is_uri(out_dir):
        raise ResumeRefused(
            f"sweep resume: output_dir = {spec.output_dir!r} is not a local or mounted folder: a resume reads and "
            "repairs Ray Tune's saved state in the run folder, which sweep does on a local or mounted folder only "
            "(NFS, or the bucket mounted on every node by a FUSE mount that supports renames, e.g. gcsfuse). "
            f"The study keeps every finished trial: `sweep status {study_name}`.")
    address = address or os.environ.get("RAY_ADDRESS")
    _quiet_libraries(local_ray=not address)

    # One controller per study: the lease is taken before the study is created or touched (`StudyHeld`).
    rstorage = open_storage(storage_url)
    lease = ControllerLease(rstorage, study_name).acquire()
    if lease.taken_over:
        gone = lease.taken_over
        console.print(f"took over study {study_name!r} from its earlier controller (pid {gone['pid']} on "
                      f"{gone['host']}), which is gone")
    from rich.markup import escape

    stops = Interrupts(say=lambda text: console.print(f"[yellow]{escape(text)}[/]"))
    state: dict = {"fit": False}
    try:
        with stops:
            try:
                return _run(optuna, spec, spec_path=spec_path, study_name=study_name, storage=storage,
                            storage_url=storage_url, rstorage=rstorage, address=address, num_trials=num_trials,
                            console=console, resume=resume, run_dir=run_dir, out_dir=out_dir, again=again,
                            stops=stops, state=state)
            except KeyboardInterrupt:
                # `SweepInterrupted` from the handlers, or a plain KeyboardInterrupt: Ray's `ray.wait`/`ray.get`
                # turn an exception a signal handler raised while they wait into one of their own.
                raise SweepStopped(_stopped_line(optuna, rstorage, study_name, stops, state, again)) from None
            except (SweepStopped, DiskFullStop, StudyStorageLost, ResumeRefused):
                raise
            except Exception:
                _undo_unstarted(optuna, rstorage, study_name, storage_url, state, console)
                raise
    finally:
        if state.get("early") is not None:  # ended with the sweep, however it ended (its Ray actor went with Ray)
            state["early"].end()
        lease.release()


def _run(optuna, spec: SweepSpec, *, spec_path: Path, study_name: str, storage: Optional[str], storage_url: str,
         rstorage, address: Optional[str], num_trials: Optional[int], console, resume: bool, run_dir: RunDir,
         out_dir: str, again: str, stops: "Interrupts", state: dict) -> dict:
    """`run_sweep` once this controller holds the study's lease, with its signal handlers installed."""
    from sweep.record import record_spec, register_study, registered_studies, safe_url

    job = spec.job()
    # The study: created (or continued by `sweep run` on an existing name), or checked for a resume.
    restore = False
    if resume:
        study, restore = check_resumable(optuna, rstorage, study_name, spec, spec_path, run_dir)
    else:
        state["created"] = study_name not in optuna.get_all_study_names(rstorage)
        study = optuna.create_study(storage=rstorage, study_name=study_name, direction="minimize", load_if_exists=True)
    record_spec(study, public_dict(spec), spec_hash(spec))
    state["registered_before"] = registered_studies().get(study_name)
    register_study(study_name, storage_url)
    console.print(f"study [bold]{study_name}[/] in {safe_url(storage_url)}")
    # The trials the study is to hold (an earlier sweep's under this name, then this one's): what `sweep resume`
    # completes, and the searcher's limit whatever Tune's own trial count says (`StudySearch._study_is_full`).
    if resume:
        n_trials = study.user_attrs.get("num_trials") or spec.num_trials
    else:
        n_trials = (num_trials or spec.num_trials) + len(study.get_trials(deepcopy=False))
    state["n_trials"] = n_trials
    if not resume:
        study.set_user_attr("num_trials", n_trials)
    elif _nothing_to_resume(study, n_trials, console):
        if not address:
            end_orphans(run_dir)  # what a controller killed at the very end left of its local Ray
            _remove_temp_folders()
        return _summary(study, study_name, storage_url, errors=0)
    record_controller(study, again)

    from trial_worker.entry import prepare_assets
    from trial_worker.entry import mark

    mark("controller: study recorded")
    prepare_assets(job)
    mark("controller: assets ready")
    # A local Ray's first pack starts now, its imports, load and data beside Ray's start (`pack.early`).
    early = None if address else _start_early_pack(spec, job, run_dir)
    state["early"] = early
    ray = _start_ray(address, run_dir, console)
    mark("controller: ray up")
    stops.install()  # again: `ray.init` set a SIGTERM handler of its own
    try:
        # Packed trials or one per process (`trial_worker.pack.tune.trial_plan`), chosen once: the plan holds the
        # pack servers' handles (Ray ends an actor whose owner holds none) for the whole fit.
        plan = _trial_plan(spec, job, run_dir, early=early.ticket if early else None)
        mark(f"controller: plan {plan.mode}")
        if early is not None and plan.mode != "packed":
            early.end()
        searcher = _searcher(spec, study_name, rstorage, resumed=resume)
        base = _evaluate_base_once(study, rstorage, job, plan, console, stops, on_gpu=_on_gpu(ray, spec),
                                   retry=searcher.retry)
        # W&B's offline runs are local files: beside a local run folder, else in ./sweep_runs.
        callbacks = _callbacks(searcher, spec, study_name, Path("sweep_runs" if is_uri(out_dir) else out_dir), console)
        trainable = plan.trainable()
        if restore:
            tuner, progress = _restored_tuner(run_dir, trainable, console)
        else:
            # A resume before Tune saved anything (killed while Ray started, during the base evaluation or the
            # first trials' start): the trials the study lacks, its RUNNING ones first with their recorded params.
            n_new = n_trials
            if resume:
                from sweep.record.search import release_trials

                n_new -= searcher.retry("read the study", lambda: release_trials(study, held=set()))[1]
            tuner = _new_tuner(spec, study_name, out_dir, trainable, searcher, callbacks, n_new, from_study=resume)
            progress = callbacks[0]
        budget, res = spec.budget, spec.resources
        console.print(f"ASHA over {n_trials} trials, rungs {' -> '.join(map(str, budget.rungs))} {budget.unit}, "
                      f"{res.cpus_per_trial:g} CPU / {res.gpus_per_trial:g} GPU per trial")

        state["fit"] = True
        mark("controller: fit")
        with _trials_start_together(plan.mode, res.max_concurrent_trials, n_trials):
            results = _fit(ray, tuner, progress, run_dir=run_dir, again=again, stops=stops)
        mark("controller: fit done")
        if base is not None:
            base.join()  # the leaderboard and export show the base beside the trials
        errors = sum(1 for r in results if r.error is not None)
        # Nothing may stay RUNNING. The study is written and read once more after the fit: retried like the
        # searcher's own writes. A fresh run ends only its own trials; a resume every one left running.
        if resume:
            errors += searcher.retry("fail lost trials", lambda: fail_lost_trials(study_name, rstorage))
        else:
            errors += searcher.retry("fail unfinished trials", lambda: fail_lost_trials(
                study_name, rstorage, only=searcher.storage_trial_ids(), reason=UNFINISHED_REASON))
        rows = _leaderboard(searcher, study_name, rstorage, console)
        mark("controller: leaderboard")
    except (DiskFullStop, SweepStopped):
        raise
    except Exception as e:
        failure = storage_failure(e)
        if failure is None:
            raise
        raise StudyStorageLost(storage_lost_message(failure, study_name=study_name, storage_url=storage_url,
                                                    run_dir=run_dir, again=again)) from None
    finally:
        # Ray's dashboard and runtime-env agents can outlive `ray.shutdown()` for many seconds (they wait to notice
        # their raylet is gone): what this controller's local Ray started ends with it.
        # Their SIGTERM is blocked (`_start_ray`): killed at once, not after a graceful wait that only runs out.
        ours = own_ray(run_dir) if not address else []
        shutdown_ray(ray)
        if ours:
            end_processes(ours, grace_s=0.0)
        if early is not None:  # the pack process started before Ray: ended with it, before its folders are removed
            early.end()
        mark("controller: ray down")
        _remove_temp_folders()

    return _summary(study, study_name, storage_url, errors=errors, rows=rows)


def _remove_temp_folders() -> list:
    """The trials' and packs' temp folders on this machine whose process has ended (`trial_worker.entry`)."""
    from trial_worker.entry import remove_temp_folders

    return remove_temp_folders()


def _stopped_line(optuna, rstorage, study_name: str, stops: "Interrupts", state: dict, again: str) -> str:
    """The one line of a sweep stopped by Ctrl+C or SIGTERM: which trials were left unfinished, how many were
    not started, and the resume command."""
    running: list[int] = []
    not_started = 0
    try:
        study = optuna.load_study(study_name=study_name, storage=rstorage)
        trials = study.get_trials(deepcopy=False)
        running = [t.number for t in trials if t.state == optuna.trial.TrialState.RUNNING]
        not_started = max(0, int(state.get("n_trials") or 0) - len(trials))
    except Exception:  # noqa: BLE001 - the line is said without the counts rather than not at all
        trials = []
    return interrupted_message(stops.signal or "Ctrl+C", at_once=stops.at_once, running=running,
                               not_started=not_started, again=again, before_trials=not state.get("fit") and not trials)


def _undo_unstarted(optuna, rstorage, study_name: str, storage_url: str, state: dict, console) -> None:
    """A sweep that failed before its first trial started leaves nothing behind: the study it created (still
    without trials) is deleted and its name's registry entry put back as it was."""
    from sweep.record import unregister_study

    if not state.get("created") or state.get("fit"):
        return
    try:
        study = optuna.load_study(study_name=study_name, storage=rstorage)
        if study.get_trials(deepcopy=False):
            return
        optuna.delete_study(study_name=study_name, storage=rstorage)
        if "registered_before" in state:
            unregister_study(study_name, state["registered_before"])
    except Exception as e:  # noqa: BLE001 - the failure itself is what the user must see
        console.print(f"sweep: could not remove study {study_name!r} that failed before its first trial: {e}")
        return
    console.print(f"sweep: failed before the first trial started; study {study_name!r} removed (it held no trial)")


def run_folder(storage_path: str, study_name: str) -> RunDir:
    """The sweep's run folder in Tune's storage: `<storage_path>/<study name>`, a local `Path`, or for a URI the
    URI's path extended (its query, e.g. `endpoint_override`, kept at the end) as a string."""
    if not is_uri(storage_path):
        return Path(storage_path) / study_name
    u = urlsplit(storage_path)
    return urlunsplit(u._replace(path=f"{u.path.rstrip('/')}/{study_name}"))


def _summary(study, study_name: str, storage_url: str, *, errors: int, rows: Optional[list] = None) -> dict:
    from sweep.record import safe_url

    if rows is None:
        counts: dict[str, int] = {}
        for t in study.get_trials(deepcopy=False):
            counts[t.state.name] = counts.get(t.state.name, 0) + 1
    else:
        counts = {}
        for r in rows:
            counts[r["state"]] = counts.get(r["state"], 0) + 1
    return {"study": study_name, "storage": safe_url(storage_url), "states": counts, "errors": errors}


def _nothing_to_resume(study, n_trials: int, console) -> bool:
    """True (and said) when the study already holds its `n_trials` trials, all finished."""
    trials = study.get_trials(deepcopy=False)
    if len(trials) < n_trials or any(not t.state.is_finished() for t in trials):
        return False
    console.print(f"sweep resume: study {study.study_name!r} is finished ({len(trials)} of {n_trials} trials, none "
                  "running): nothing to resume. See it with: sweep status " + study.study_name)
    return True


def _quiet_libraries(*, local_ray: bool) -> None:
    """Optuna's per-trial info lines, Ray's new console output and its sync warnings off: the sweep prints its own.
    Set before anything imports ray (a resume may, reading Tune's state)."""
    import optuna

    if local_ray and "ray" not in sys.modules:
        # Token authentication on, as Ray 2.60 sets it by default for a new local Ray, but said explicitly (read
        # when ray is imported): Ray then skips its warning that it enabled it, which asks nothing of the user.
        os.environ.setdefault("RAY_AUTH_MODE", "token")

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")


def _start_ray(address: Optional[str], run_dir: RunDir, console):
    """Ray: the cluster at `address`, else a local Ray listening on 127.0.0.1 only, after ending what a killed
    controller of this run folder left of its own local Ray. Returns the `ray` module."""
    from sweep._compat.ray import (import_for_tune, keep_local_ray_on_loopback, quiet_worker_death_notices,
                                   retry_trials_lost_in_reset)

    if not address:
        keep_local_ray_on_loopback()  # before `import ray` reads the switch
        ended = end_orphans(run_dir)
        if ended:
            console.print(f"ended {len(ended)} Ray processes that a killed controller of {run_dir} left running")
        mark_ray_owner(run_dir)
    import ray

    from trial_worker.entry import mark

    mark("controller: ray imported")
    retry_trials_lost_in_reset()  # a worker lost while Tune resets it for its next trial: retried, not FAIL
    quiet_worker_death_notices()  # a lost worker: the controller's one line, not also the raylet's notice
    # A trial stopped by ASHA waits in `tune.report`; when its actor is reused Tune gives the old
    # training thread this long to unwind (cleanup, freeing memory) before failing the next trial.
    # Ray's default of 2 s is too short on a busy machine.
    os.environ.setdefault("TUNE_FUNCTION_THREAD_TIMEOUT_S", "120")
    # A local Ray's processes (and the trial workers they start) inherit this thread's signal mask: SIGTERM is
    # blocked for them, as Ray blocks SIGINT, so that a SIGTERM to the whole process group (a batch scheduler,
    # systemd) reaches only the controller, which stops the sweep cleanly and ends them itself; a raylet ended
    # by it would take the controller down mid-save. (`_compat.ray.shutdown_ray` ends them with SIGKILL.)
    import signal

    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM}) if not address else None
    mark("controller: ray.init")
    imports = import_for_tune()
    try:
        _ray_init(ray, address)
    finally:
        if mask is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        imports.join()
    mark("controller: tune's imports done")
    return ray


def _ray_init(ray, address: Optional[str]) -> None:
    ray.init(
        runtime_env={"env_vars": {"TUNE_FUNCTION_THREAD_TIMEOUT_S": os.environ["TUNE_FUNCTION_THREAD_TIMEOUT_S"]}},
        address=address,
        include_dashboard=False,
        configure_logging=True,
        logging_level="WARNING",
        log_to_driver=False,  # trial errors reach the terminal and the study through the callback
        ignore_reinit_error=True,
    )


PENDING_TRIALS_ENV = "TUNE_MAX_PENDING_TRIALS_PG"


@contextlib.contextmanager
def _trials_start_together(mode: str, max_concurrent: Optional[int], n_trials: int):
    """Packed trials start together. Under a searcher of its own and no `max_concurrent_trials`, Tune keeps one
    trial pending at a time (`TUNE_MAX_PENDING_TRIALS_PG` "auto"), so trials start one after another, each waiting
    for its actor (H100, 2026-12-06, benchmarks/results/sweep_first_step.json: one every 3.2 s, the 6th 16 s after
    the first). A packed trial's actor takes 0.05 CPU and only waits on its pack, so up to all of them (the
    concurrency limit, at most a pack's 64) may be pending at once. One trial per process keeps Tune's rule (a
    pending trial there waits for a GPU, and the searcher would decide it with less known). A value the user set
    is kept."""
    if mode != "packed" or PENDING_TRIALS_ENV in os.environ:
        yield
        return
    os.environ[PENDING_TRIALS_ENV] = str(max(1, min(n_trials, max_concurrent or n_trials, 64)))
    try:
        yield
    finally:
        os.environ.pop(PENDING_TRIALS_ENV, None)


def _on_gpu(ray, spec: SweepSpec) -> bool:
    """Whether the trials (and so the base evaluation) run on GPUs."""
    return spec.resources.gpus_per_trial > 0 and ray.cluster_resources().get("GPU", 0) > 0


def _evaluate_base_once(study, rstorage, job, plan, console, stops: "Interrupts", *, on_gpu: bool, retry):
    """The base model's val loss and perplexity on the validation split, recorded once per study: taken from an
    earlier study of the same storage that evaluated the same model, data and split (`record.base_eval_key`),
    else evaluated beside the first trials (a thread, returned for the caller to join before the leaderboard)
    so that Tune starts them at once: on a pack the base is loaded for both, and its evaluation is one pass
    over the validation split. A failed base evaluation is said and leaves the sweep going (the leaderboard
    then shows no base line). `retry`: the searcher's policy for transient storage errors."""
    import threading

    from sweep.record import base_eval_key, record_base_metrics, reuse_base_metrics

    if "base_val_loss" in study.user_attrs:
        return None
    earlier = reuse_base_metrics(study, rstorage, base_eval_key(job, on_gpu=on_gpu))
    if earlier is not None:
        attrs = study.user_attrs
        ppl = attrs.get("base_ppl")  # None where it overflowed
        console.print(f"base model: val_loss {attrs['base_val_loss']:.4f}  ppl {'inf' if ppl is None else f'{ppl:.2f}'} "
                      f"(evaluated for study '{earlier}': the same model, data and split)")
        return None
    console.print("evaluating the base model (once per study, beside the first trials) ...")

    def evaluate() -> None:
        try:
            base = plan.evaluate_base(job)
            # beside the searcher's own writes: a transient storage error (SQLite busy) is tried again as theirs are
            retry("record the base model's metrics", lambda: record_base_metrics(study, base["val_loss"], base["ppl"]))
        except Exception as e:  # noqa: BLE001 - the trials go on; the base is what the leaderboard lacks
            if not stops.signal:
                from rich.markup import escape

                console.print(f"[yellow]the base model's evaluation failed[/]: {escape(f'{type(e).__name__}: {e}')}")
            return
        console.print(f"base model: val_loss {base['val_loss']:.4f}  ppl {base['ppl']:.2f}")

    thread = threading.Thread(target=evaluate, name="sweep-base-evaluation", daemon=True)
    thread.start()
    return thread


def _searcher(spec: SweepSpec, study_name: str, rstorage, *, resumed: bool):
    """What to try: a Tune searcher over the study, recording the truth (`sweep.record.search.StudySearch`)."""
    from sweep.record.search import StudySearch
    from sweep.space import make_sampler, optuna_space

    if spec.search is None:
        raise ValueError("a sweep needs the spec's `search` section (what to try); this spec has none")
    return StudySearch(optuna_space(spec), metric=spec.search.metric, mode=spec.search.mode, sampler=make_sampler(spec),
                       study_name=study_name, storage=rstorage, budget_key=spec.budget.unit,
                       top_rung=spec.budget.rungs[-1], resumed=resumed)


def _callbacks(searcher, spec: SweepSpec, study_name: str, out_dir: Path, console) -> list:
    """The terminal's progress lines first, then one W&B run per trial (on the driver) unless disabled."""
    callbacks = [_make_progress_callback(searcher, spec, console)]
    if spec.tracking.wandb.mode != "disabled":
        from sweep.record.tracking import make_wandb_callback

        callbacks.append(make_wandb_callback(searcher, spec, study_name, out_dir, console))
    return callbacks


def _make_progress_callback(searcher, spec: SweepSpec, console):
    from sweep.progress import Progress

    return Progress(searcher, spec.budget.unit, list(spec.budget.rungs), console)


def _run_name(run_dir: RunDir) -> str:
    """The run folder's name (the pack servers are named after it)."""
    return run_dir.name if isinstance(run_dir, Path) else PurePosixPath(urlsplit(run_dir).path).name


def _start_early_pack(spec: SweepSpec, job, run_dir: RunDir):
    """The first pack's process, started before Ray where this sweep's trials pack (`trial_worker.pack.early`)."""
    from trial_worker.entry import pack_names, start_early_pack

    return start_early_pack(job.model_dump(mode="json"), resources=spec.resources.model_dump(),
                            search_params=spec.search_params(), pack_name=pack_names(_run_name(run_dir), 1)[0])


def _trial_plan(spec: SweepSpec, job, run_dir: RunDir, early: Optional[dict] = None):
    """Packed trials (a warm pack server per GPU, `trial_worker.pack`) or one trial per process, by
    `resources.packing`: the trainable with its resources, and where the base model is evaluated. `early`: the
    ticket of the pack process started before Ray."""
    from trial_worker.entry import trial_plan

    # The worker keeps a trial's deterministic failure in the run folder as a local path; on a URI run folder it
    # keeps it in the trial's own folder instead (run_dir None: `trial_worker.attempt.fatal_path`).
    folder = str(run_dir) if isinstance(run_dir, Path) else None
    return trial_plan(job.model_dump(mode="json"), resources=spec.resources.model_dump(), run_dir=folder,
                      name=_run_name(run_dir), search_params=spec.search_params(), early=early)


def _new_tuner(spec: SweepSpec, study_name: str, out_dir: str, trainable, searcher, callbacks: list, n_trials: int,
               *, from_study: bool = False):
    """A Tuner for a new sweep: ASHA on the budget unit (when to stop), the searcher (what to try). `from_study`:
    a resume with no Tune state to restore, whose ASHA rungs start from the study's."""
    from ray import tune

    from sweep.schedule import StudyASHA

    budget, res = spec.budget, spec.resources
    scheduler = StudyASHA(searcher=searcher, from_study=from_study, time_attr=budget.unit, max_t=budget.max, grace_period=budget.min,
                          reduction_factor=budget.reduction_factor)
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(metric=searcher.metric, mode=searcher.mode, search_alg=searcher, scheduler=scheduler,
                                    num_samples=n_trials, max_concurrent_trials=res.max_concurrent_trials,
                                    reuse_actors=True),
        run_config=run_config(spec, study_name, out_dir, callbacks),
    )


def run_config(spec: SweepSpec, study_name: str, storage_path: str, callbacks: list):
    """Tune's RunConfig of a sweep: its run folder `<storage_path>/<study name>` (`storage_path` as
    `sweep.spec.run_storage` gives it: a URI goes to Ray unchanged, which opens it with pyarrow.fs), two
    checkpoints kept per trial, Ray's retries from the spec."""
    from ray import tune

    return tune.RunConfig(name=study_name, storage_path=storage_path, verbose=0, callbacks=callbacks,
                          checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
                          failure_config=tune.FailureConfig(max_failures=spec.resources.max_failures))


def _restored_tuner(run_dir: RunDir, trainable, console):
    """Tune's run restored from its folder, with its progress callback. The searcher (on the study), scheduler
    and callbacks come back from the folder's pickles, which this sweep wrote; the searcher reads everything but
    how to reach the study from the study itself (`sweep.record.search`, `sweep.resume`)."""
    from ray import tune

    from sweep._compat.ray import restored_callbacks

    tuner = tune.Tuner.restore(str(run_dir), trainable=trainable, resume_unfinished=True,
                               resume_errored=False, restart_errored=False)
    console.print(f"resuming {run_dir}")
    progress = next((c for c in restored_callbacks(tuner) if hasattr(c, "_stop_if_disk_full")), None)
    return tuner, progress


def _fit(ray, tuner, progress, *, run_dir: RunDir, again: str, stops: Optional[Interrupts] = None):
    """`tuner.fit()`, stopped short by a full disk (`DiskFullStop`, resumable), by Ctrl+C or SIGTERM (`SweepInterrupted`,
    resumable) or a lost study (raised on)."""
    if progress is not None:
        progress.disk_full = None
    with QuietStops(progress) as logs:
        if stops is not None:
            stops.tune_running = True
        try:
            results = tuner.fit()
        except Exception:
            if not getattr(progress, "disk_full", None):
                raise
            results = None  # the callback's exception ended the fit (Tune not in the main thread)
        finally:
            if stops is not None:
                stops.tune_running = False
                stops.closing = bool(stops.signal)
        if getattr(progress, "disk_full", None):
            shutdown_ray(ray)  # its unhandled-error messages of the stopped trials are filtered too
            # Trials stopped unfinished stay RUNNING in the study: `sweep resume` continues them.
            raise DiskFullStop(disk_full_message(progress.disk_full, run_dir=run_dir, again=again,
                                                 state_unsaved=logs.state_unsaved))
        if stops is not None and stops.signal:
            shutdown_ray(ray)  # as for a full disk: the stopped trials' messages are filtered too
            raise SweepInterrupted(stops.signal)  # the running trials stay RUNNING in the study: resumable
    return results


def _leaderboard(searcher, study_name: str, rstorage, console) -> list:
    """The study's leaderboard, printed; read with the searcher's retries."""
    import optuna

    from sweep.record.leaderboard import leaderboard, render

    study = searcher.retry("read the study", lambda: optuna.load_study(study_name=study_name, storage=rstorage))
    rows = searcher.retry("read the leaderboard", lambda: leaderboard(study))
    searcher.retry("read the leaderboard", lambda: render(rows, study, console=console))
    return rows
