"""`sweep resume`: what may be resumed, what is trusted, and how Tune's state is made to agree with the study.

The study is the record of a sweep; Tune's run folder (its pickled tuner, searcher and callbacks, its
experiment state, the trials' checkpoints) is how the work goes on. A resume:

1. refuses a study that does not exist or was started with another spec (`check_resumable`), and a run
   folder that another user could have written (restoring unpickles it) or whose state files were cut
   short and cannot be put back from Ray's own copies (`run_folder_problem`);
2. restores Tune's run (`Tuner.restore`) when Tune saved one, after marking ended in Tune's saved state the
   trials the study has finished since (they are never trained or reported again), and writing in the study
   which RUNNING trials no restored Ray trial runs (`sweep.record.search.release_trials`): the searcher, whose only
   state is the study, hands those out again with their recorded params (never re-sampled), draws its
   sampler's random state afresh so it cannot repeat the draws made after Tune's save, and adds no trial
   once the study holds its `num_trials`. When Tune saved nothing yet (killed while Ray started or during the
   base evaluation), every RUNNING trial is released and a fresh Tuner runs the trials the study still lacks;
3. after the fit, records FAIL whatever stayed RUNNING (`fail_lost_trials`).

Why Tune's restore, corrected from the study, rather than a fresh Tuner seeded from the study: the restore
keeps each trial's Ray trial id, folder, registered checkpoints and retry count, so everything keyed by them
(the study's `ray_trial_id`, Tune's per-trial `result.json`, the trial's W&B run) stays one per trial across
any number of resumes, and a trial continues from the checkpoint Tune verified and registered. What the
restore gets wrong is only what happened after Tune's last save, and the study has all of it: the searcher
(above) and ASHA's rungs (`sweep.schedule.StudyASHA`, which Tune never saves) are rebuilt from it. Limit: a
checkpoint written after that save is not known to Tune; the trial continues from the one before (its steps
since are trained again; a rung it reported is kept as first recorded).
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Any, Optional

from sweep.processes import pid_exists
from sweep.spec import SweepSpec, public_dict, spec_hash

LOST_REASON = "lost: the controller was killed before Ray Tune saved this trial; not resumable"
UNFINISHED_REASON = "unfinished: Ray Tune ended the sweep without finishing this trial (see the run's Ray logs)"


class ResumeRefused(Exception):
    """`sweep resume` cannot continue this sweep (no such study, the spec was edited, an untrusted run folder)."""


def check_resumable(optuna, rstorage, study_name: str, spec: SweepSpec, spec_path: Path, run_dir: "Path | str"):
    """(the study to resume, whether Tune saved a run to restore), after checking the study exists, was
    started with this very spec, and that its run folder (if Tune wrote one) may be restored from."""
    from sweep.record import scrub

    run_dir = Path(run_dir)  # a local or mounted folder: a resume on a URI is refused before (controller)

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
    _set_aside_unpaired_saves(run_dir)
    if not tune_saved(run_dir):
        return study, False
    problem = run_folder_problem(run_dir)
    if problem:
        raise ResumeRefused(f"sweep resume: will not restore study {study_name!r} from {run_dir}: {problem}")
    _end_in_tune_what_the_study_finished(run_dir, study)
    return study, True


def _end_in_tune_what_the_study_finished(run_dir: Path, study) -> None:
    """Trials the study has finished since Tune's last save (killed right after a trial ended) are marked ended in
    the Tune state that `Tuner.restore` reads, so they are neither trained nor reported again."""
    from sweep._compat.ray import match_search_state, mark_trials_terminated, trials_in_state
    from sweep.record.search import release_trials

    finished = {t.user_attrs["ray_trial_id"] for t in study.get_trials(deepcopy=False)
                if t.state.is_finished() and t.user_attrs.get("ray_trial_id")}
    state = sorted(run_dir.glob("experiment_state-*.json"))[-1]
    ended = mark_trials_terminated(state, finished)
    trials = trials_in_state(state)
    match_search_state(state.with_name(state.name.replace("experiment_state-", "search_gen_state-")), trials)
    release_trials(study, held=set(trials))  # the study's RUNNING trials Tune will not run: handed out again
    if ended:
        print(f"sweep resume: {len(ended)} trial(s) finished in the study after Ray Tune's last save; not run again",
              file=sys.stderr, flush=True)


def tune_saved(run_dir: Path) -> bool:
    """Whether Tune saved a run in `run_dir` that `Tuner.restore` can continue: its tuner and an experiment
    state (Tune writes the first one once the fit has started; a controller killed before has none)."""
    return (run_dir / "tuner.pkl").exists() and any(run_dir.glob("experiment_state-*.json"))


TRIAL_ERROR_PICKLE = "error.pkl"  # Tune's pickled error of a failed trial, in its trial folder
STATE_KINDS = ("experiment_state-{}.json", "search_gen_state-{}.json", "searcher-state-{}.pkl")  # one Tune save


def _set_aside_unpaired_saves(run_dir: Path) -> None:
    """Set aside the files of Tune's newest saves that a kill left incomplete.

    Each Tune session saves its experiment state, its search generator's and its searcher's state
    (`STATE_KINDS`, named by the session's start time) and copies them into the run folder in no set order;
    `Tuner.restore` takes the newest file of each kind, so a kill during the copy pairs one session's trials
    with another session's searcher (which then asks for more trials than the sweep has). Files of a session
    newer than the newest complete one are renamed `.<name>.unpaired`: Tune restores that complete session,
    and the study (the searcher's only state, `release_trials`) covers what happened since.
    """
    stamps: dict[str, list[Path]] = {}
    for kind in STATE_KINDS:
        prefix, suffix = kind.split("{}")
        for p in run_dir.glob(kind.format("*")):
            stamps.setdefault(p.name[len(prefix):-len(suffix)], []).append(p)
    complete = [stamp for stamp, files in stamps.items() if len(files) == len(STATE_KINDS)]
    for stamp in sorted(stamps):
        if complete and stamp <= max(complete):
            continue
        for p in stamps[stamp]:
            p.rename(p.with_name(f".{p.name}.unpaired"))
        print(f"sweep resume: Ray Tune's save {stamp} in {run_dir} was cut short by the kill; "
              + ("restoring the one before" if complete else "starting its trials anew"), file=sys.stderr, flush=True)


def _flat(d: Any, prefix: str = "") -> dict:
    if isinstance(d, dict):
        out: dict = {}
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: d}


def run_folder_problem(run_dir: Path) -> Optional[str]:
    """Why Tune's run folder must not be restored from, or None.

    Restoring unpickles the folder's `tuner.pkl` and searcher/callback state, and unpickling runs code:
    like ssh with its keys, only files owned by this user (or root) and not writable by every user
    are trusted. And Tune's state files, copied into the run folder, are cut short if the controller died
    or the disk filled while they were copied; restoring from them would fail deep inside Tune, so they are
    put back from Ray's own copies when those are still there (`_restore_from_ray_staging`), else refused.
    """
    from sweep._compat.ray import ray_temp_dir

    errors = sorted(run_dir.glob(f"*/{TRIAL_ERROR_PICKLE}"))  # each failed trial's error: Tune unpickles it too
    for p in [run_dir, *sorted(run_dir.glob("*.pkl")), *sorted(run_dir.glob("*.json")), *errors]:
        why = distrust(p)
        if why == "owner":
            return (f"{p} belongs to user id {p.stat().st_uid}, not to you ({os.getuid()}); restoring unpickles it, "
                    "which runs code. Resume as its owner, or start a new study: sweep run SPEC --name NEW_NAME")
        if why:
            return (f"{p} is writable by every user ({why}); restoring unpickles it, which runs code. If you trust "
                    f"it: chmod o-w {p}, then resume again")
    # Tune restores from the newest of each of its state files (named <kind>-<time>.json/.pkl) and tuner.pkl.
    newest: dict[str, Path] = {}
    for p in sorted([*run_dir.glob("*.json"), *run_dir.glob("*.pkl")]):
        newest[re.sub(r"-\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d(?=\.\w+$)", "", p.name)] = p
    # A failed trial's pickled error, cut short as the disk filled: Tune's restored run would fail at its end,
    # unpickling it for its results. It goes; the trial keeps its error text (error.txt) and its FAIL in the study.
    for p in errors:
        why = _torn(p)
        if why:
            p.unlink()
            print(f"sweep resume: {p} was cut short ({why}); removed (the trial's error text and its FAIL in the "
                  "study stay)", file=sys.stderr, flush=True)
    torn = {p: _torn(p) for p in newest.values()}
    torn = {p: why for p, why in torn.items() if why}
    if torn and not _restore_from_ray_staging(run_dir, list(torn)):
        p, why = next(iter(torn.items()))
        return (f"Ray Tune's state file {p.name} is cut short ({why}), and Ray's own copy of it (in the Ray session "
                f"folder under {ray_temp_dir()}) is gone: the controller died, or the disk filled, while it was "
                "copied here. Every trial and rung recorded in the study is kept; continue the search as a new study: "
                "sweep run SPEC --name NEW_NAME")
    return None


def distrust(path: Path) -> Optional[str]:
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


def _restore_from_ray_staging(run_dir: Path, torn: list[Path]) -> bool:
    """Put back Tune's state files that were cut short in the run folder from Ray's own copies; True if all were.

    A full disk or a kill can cut Tune's copy into the run folder short, while Ray's session folder keeps the
    whole file (`sweep._compat.ray.staged_experiment_dirs`). A copy is used only from a session folder of this
    user (or root) that no other user can write, whose experiment state names this run folder's storage path,
    and only if it is whole itself.
    """
    import shutil

    from sweep._compat.ray import staged_experiment_dirs, state_names_run_folder

    def trusted(p: Path) -> bool:
        return distrust(p) is None

    for d in staged_experiment_dirs(run_dir):
        states = [p for p in d.glob("experiment_state-*.json") if trusted(p) and not _torn(p)]
        if not (trusted(d) and any(state_names_run_folder(p, run_dir) for p in states)):
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


def fail_lost_trials(study_name: str, rstorage, *, only: Optional[set] = None, reason: str = LOST_REASON) -> int:
    """After a fit nothing may stay RUNNING: a trial Tune never finished is recorded FAIL with the reason.
    `only`: storage trial ids to consider (this run's), so another controller's running trials are left
    alone. Returns how many."""
    import optuna

    from sweep.record import fail_running_trials

    study = optuna.load_study(study_name=study_name, storage=rstorage)
    return len(fail_running_trials(study, reason, only=only))


def record_controller(study, resume_cmd: str) -> None:
    """Note in the study which process drives it (host, pid) and how to resume it, for `sweep status`."""
    import socket

    study.set_user_attr("controller", {"host": socket.gethostname(), "pid": os.getpid(), "resume": resume_cmd})


def stale_running_note(study) -> Optional[str]:
    """For `sweep status`: what to do about trials left RUNNING by a controller that is gone, or None."""
    import socket

    import optuna

    running = [t.number for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))]
    if not running:
        return None
    ctl = study.user_attrs.get("controller") or {}
    again = ctl.get("resume") or "sweep resume SPEC"
    which = f"trial{'s' if len(running) > 1 else ''} {', '.join(map(str, running))}"
    if ctl.get("host") == socket.gethostname() and isinstance(ctl.get("pid"), int):
        if pid_exists(ctl["pid"]):
            return None  # its controller is still at work
        return (f"{which} RUNNING, but the sweep's controller (pid {ctl['pid']}) is gone: they are stale. "
                f"Continue the sweep with: {again}")
    where = f" (pid {ctl['pid']} on {ctl['host']})" if ctl.get("host") else ""
    return f"{which} RUNNING: if the sweep's controller{where} no longer runs, continue the sweep with: {again}"


def never_started_note(study) -> Optional[str]:
    """For `sweep status`: a study whose sweep stopped before its first trial started (killed, or Ctrl+C, while Ray
    started or the base model was evaluated), or None."""
    import socket

    if study.get_trials(deepcopy=False):
        return None
    ctl = study.user_attrs.get("controller") or {}
    if ctl.get("host") == socket.gethostname() and isinstance(ctl.get("pid"), int) and pid_exists(ctl["pid"]):
        return None  # its controller is still starting it
    again = ctl.get("resume") or "sweep resume SPEC"
    return (f"study {study.study_name!r} never started: its sweep stopped before the first trial. "
            f"Start it with: {again}")
