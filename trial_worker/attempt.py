"""One attempt of a trial under Ray Tune, solo or packed: the trial's job, the Tune trainable, and what every
attempt does around its training (resume point, deterministic-failure refusal, full disk, temp folders).

The solo worker (`run_trial`) and the pack's trials (`trial_worker.pack.tune.run_packed_trial`) both run
through `attempt`; `sweep` reaches these through `trial_worker.entry`. Importing this module loads neither
torch nor Ray.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Union

from trial_worker.config import JobConfig, with_params


def trial_job(config: dict[str, Any], job: Union[dict, JobConfig], *, cpus: float | None = None,
              gpus: float | None = None) -> JobConfig:
    """The job a trial runs: the sweep's job with the trial's sampled params applied.

    When the job leaves `torch_threads` unset, it becomes `cpus` (the CPUs Ray gave the trial).
    When it leaves `gpu_memory_fraction` unset and `gpus` (the GPUs Ray gave it) is a share of one
    GPU (`resources.gpus_per_trial: 0.25`), the trial's CUDA memory is capped at that share, so trials
    sharing a GPU cannot take each other's memory; whole GPUs leave it unset (no cap).
    """
    # Validated once, here: from this object on the trial's job is passed as it is (to the recipe, or to a pack).
    data = with_params(job.model_dump() if isinstance(job, JobConfig) else copy.deepcopy(job), config)
    training = data.setdefault("training", {})
    if training.get("torch_threads") is None and cpus:
        training["torch_threads"] = max(1, int(cpus))
    if training.get("gpu_memory_fraction") is None and gpus and 0 < gpus < 1:
        training["gpu_memory_fraction"] = float(gpus)
    return JobConfig.model_validate(data)


FATAL_DIR = "failed_trials"  # <run_dir>/failed_trials/<trial id>.json: a deterministic failure of an earlier attempt


def run_trial(config: dict[str, Any], job: dict, run_dir: str | None = None) -> None:
    """Ray Tune function trainable: one QLoRA trial, reporting at each rung with a checkpoint.

    `config` holds the searched params by flat name (`learning_rate`, `lora_r`, ...). Resumes
    from `ray.tune.get_checkpoint()` when Tune hands one back (a restored or retried trial),
    after checking its hashes (`trial_worker.checkpoint`): a checkpoint cut short, corrupted
    or deleted is skipped for the newest older one that verifies, or the trial restarts from
    step 0; the first report after that carries `checkpoint_note` saying which and why.
    Each report carries `REPORT_KEYS`, among them `steps` and `samples`, so ASHA's `time_attr`
    can be either budget unit.

    A trial that fails deterministically (NaN/inf loss, out of memory at micro-batch 1) leaves
    its reason in `run_dir/FATAL_DIR` (`run_dir`: the sweep's Tune run folder; without it, the
    trial's local folder), so that a Tune retry (`max_failures`) fails at once with the same
    reason instead of training into the same wall again.
    """
    import time

    import ray

    from trial_worker.recipe import run

    started_at = time.time()  # Tune started this attempt of the trial (`setup_s` in its reports)
    remove_temp_folders()  # what killed workers on this node left behind
    assigned = ray.get_runtime_context().get_assigned_resources()
    trial = trial_job(config, job, cpus=assigned.get("CPU"), gpus=assigned.get("GPU"))
    output_dir = temp_folder("sweep-trial")
    try:
        with attempt(run_dir, output_dir) as a:
            run(trial, report=a.report, resume_from=a.resume_from, output_dir=output_dir, started_at=started_at)
    finally:
        shutil.rmtree(output_dir, ignore_errors=True)


class Attempt:
    """One attempt of a trial as `attempt` sets it up: where it resumes from, and its rung report to Tune."""

    def __init__(self, resume_from: str | None, note: list[str]):
        self.resume_from = resume_from
        self.note = note  # the checkpoints skipped on the way in: said once, by the first report
        self.writing: dict = {}  # the checkpoint being copied into the run's storage: {"step", "path", "local"}

    def report(self, metrics: dict, checkpoint_dir: str) -> None:
        """`tune.report` of a rung with its checkpoint folder (`report_checkpoint`)."""
        metrics = dict(metrics)
        if self.note:
            metrics["checkpoint_note"] = self.note.pop()
        report_checkpoint(metrics, checkpoint_dir, self.writing)


@contextlib.contextmanager
def attempt(run_dir: str | None, output_dir: str):
    """What every attempt of a trial does around its training, one trial per process (`run_trial`) or in a pack
    (`trial_worker.pack.tune.run_packed_trial`) alike: refuse to start when an earlier attempt failed
    deterministically (`fatal_path`); pick the checkpoint to resume from (`_resume_point`, saying which were
    skipped and why); turn a full disk under `output_dir` or in Tune's copy into `DiskFull`; and keep a NaN loss
    or an out-of-memory at micro-batch 1 as the trial's fatal failure. Yields the `Attempt`."""
    import json

    from ray import tune

    from trial_worker.lifecycle import NonFiniteLoss
    from trial_worker.recipe import TrialOOM

    fatal = fatal_path(run_dir)
    vanished = _VANISHED_CHECKPOINT.pop("path", None)  # see `trainable`
    try:
        with _resume_point(tune.get_checkpoint(), vanished) as (resume_from, problems):
            note: list[str] = []
            if problems:
                then = f"resumed from {Path(resume_from).name}" if resume_from else "restarted from step 0"
                note.append("; ".join(problems) + f"; {then}")
                print(f"sweep: {note[0]}", file=sys.stderr, flush=True)
            a = Attempt(resume_from, note)
            with disk_full_stops(output_dir, a.writing):
                yield a
    except (NonFiniteLoss, TrialOOM) as e:
        fatal.parent.mkdir(parents=True, exist_ok=True)
        fatal.write_text(json.dumps({"reason": f"{type(e).__name__}: {e}"}))
        raise


# The temp folders of trials and packs: `<tmp>/<kind>-<pid>-<random>`, named for the process that uses them, so
# any sweep on the node can remove those whose process is gone (a worker killed, a sweep stopped or ended).
TEMP_KINDS = ("sweep-trial-", "sweep-sweep-pack-", "sweep-pack-data-", "sweep-early-pack-")


def temp_folder(kind: str) -> str:
    """A new temp folder `<tmp>/<kind>-<this pid>-<random>` (see `remove_temp_folders`)."""
    return tempfile.mkdtemp(prefix=f"{kind}-{os.getpid()}-")


def child_env(**extra: str) -> dict[str, str]:
    """The environment of a Python process this one starts that imports this package: it finds it (and every
    other module) where this one did (an editable install, PYTHONPATH, a Ray worker's path); `extra` set on top."""
    return dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p and os.path.isdir(p)), **extra)


def remove_temp_folders(root: str | None = None) -> list[str]:
    """Remove this user's trial and pack temp folders (`TEMP_KINDS`) on this machine whose process has ended; return
    them. A folder of a live process (or of a pid reused since) is left alone; so is one this user does not own."""
    found: list[str] = []
    try:
        entries = list(os.scandir(root or tempfile.gettempdir()))
    except OSError:
        return found
    for e in entries:
        if not e.name.startswith(TEMP_KINDS):
            continue
        pid = e.name.rsplit("-", 2)[-2] if e.name.count("-") >= 3 else ""
        try:
            if not pid.isdigit() or not e.is_dir(follow_symlinks=False) or e.stat(follow_symlinks=False).st_uid != os.getuid():
                continue
        except OSError:
            continue
        if process_exists(int(pid)):
            continue
        shutil.rmtree(e.path, ignore_errors=True)
        found.append(e.path)
    return found


def process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (ended, not yet reaped) uses nothing any more
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def report_checkpoint(metrics: dict, checkpoint_dir: str, writing: dict) -> None:
    """`tune.report` with the checkpoint folder, which is removed once Tune has its copy; when Tune's copy into
    the run's storage fails, `writing` learns which checkpoint and where (for `disk_full_stops`)."""
    from ray import tune

    try:
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(checkpoint_dir))
    except OSError:
        writing.update(step=metrics["steps"], **_storage_checkpoint())
        raise
    # Tune has copied the checkpoint into the run's storage; the local copy is dead weight.
    shutil.rmtree(checkpoint_dir, ignore_errors=True)


@contextlib.contextmanager
def disk_full_stops(output_dir: str, writing: dict):
    """A full disk under the block (ENOSPC/EDQUOT, however the library words it) raised as `DiskFull`, which the
    controller turns into a stop of the whole sweep; other errors pass as they are. `output_dir`: where the trial
    writes its own checkpoints; `writing`: filled by `report_checkpoint` when Tune's copy failed."""
    try:
        yield
    except (OSError, RuntimeError) as e:
        if isinstance(e, DiskFull) or not _is_disk_full(e, writing.get("path") or output_dir):
            raise
        raise DiskFull.writing(e, output_dir=output_dir, **writing) from e


def fatal_path(run_dir: str | None) -> Path:
    """Where this Tune trial's deterministic failure is kept (see `run_trial`); raises `TrialNotRetried` when an
    earlier attempt left one there."""
    import json

    from ray import tune

    context = tune.get_context()
    if run_dir:  # the run's folder in Tune's storage: the same for every attempt, on any node
        fatal = Path(run_dir) / FATAL_DIR / f"{context.get_trial_id()}.json"
    else:
        fatal = Path(context.get_trial_dir()) / FATAL_DIR / "trial.json"
    if fatal.exists():
        raise TrialNotRetried(json.loads(fatal.read_text())["reason"])
    return fatal


class DiskFull(OSError):
    """`disk full`: a checkpoint of the trial could not be written (ENOSPC/EDQUOT): on Tune's storage
    (`output_dir`) while Tune copied it there, or in the trial's local temp folder while the Trainer saved it.

    The partial checkpoint is removed (it never got its manifest, so it could not be resumed from anyway,
    and its bytes are given back); the checkpoints written before are left as they are. The controller
    stops the sweep on it (`sweep.controller`): every trial after it would hit the same full disk.
    """

    @classmethod
    def writing(cls, error: BaseException, *, output_dir: str, step: int | None = None, path: str | None = None,
                local: bool = True) -> "DiskFull":
        if path is None:  # the Trainer's own save, in the local temp folder
            steps = [int(p.name.rsplit("-", 1)[-1]) for p in Path(output_dir).glob("checkpoint-*")
                     if p.name.rsplit("-", 1)[-1].isdigit()]
            step = max(steps) if steps else None
            path = str(Path(output_dir) / f"checkpoint-{step}") if steps else output_dir
        room = ""
        if local:
            shutil.rmtree(path, ignore_errors=True)
            where = _existing(path)
            try:
                st = os.statvfs(where)
                room = f" ({st.f_bavail * st.f_frsize / 2**20:.1f} MB free of {st.f_blocks * st.f_frsize / 2**20:.1f} MB on {where})"
            except OSError:
                pass
        cause = str(error).strip().splitlines()[-1][:200] if str(error).strip() else type(error).__name__
        of = f"the checkpoint of step {step}" if step is not None else "a checkpoint"
        return cls(errno.ENOSPC, f"disk full: no space left on device writing {of} to {path}{room}; earlier "
                                 f"checkpoints are kept; free space there, then `sweep resume SPEC` [{cause}]")


_DISK_FULL_TEXT = ("No space left on device", "Disk quota exceeded", "StorageFull", "QuotaExceeded")


def _is_disk_full(error: BaseException, path: str) -> bool:
    """ENOSPC/EDQUOT anywhere in `error`'s chain: an OSError's errno, or the text of a library that drops it
    (safetensors: `StorageFull`; torch.save: "file write failed" while the disk of `path` has no room left)."""
    seen: set[int] = set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or any(t in str(e) for t in _DISK_FULL_TEXT):
            return True
        if isinstance(e, RuntimeError) and "file write failed" in str(e):
            try:
                st = os.statvfs(_existing(path))
                return st.f_bavail * st.f_frsize < 1 << 20
            except OSError:
                return False
        e = e.__cause__ or e.__context__
    return False


def _existing(path: str) -> str:
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    return str(p)


def _storage_checkpoint() -> dict:
    """{"path", "local"} of the checkpoint Tune was copying into the run's storage when its `report` failed
    (Tune numbers it before the copy: the current `checkpoint_NNNNNN`)."""
    from trial_worker._compat import storage_checkpoint

    try:
        return storage_checkpoint()
    except Exception:  # not in a Tune session: say where in words
        return {"path": "the run's storage", "local": False}


class TrialNotRetried(RuntimeError):
    """A Tune retry of a trial that failed deterministically: it fails again at once, with the first reason."""


_VANISHED_CHECKPOINT: dict[str, str] = {}  # set by `SweepTrial.restore`, taken by the next `run_trial` in this actor


def trainable(job: dict, run_dir: str | None = None, function=None):
    """The Tune trainable of a sweep: `function` (default `run_trial`; same signature) with its job, as a class
    whose restore survives a deleted checkpoint.

    Tune's own restore refuses a checkpoint folder that no longer exists (and the retry fails);
    here the trial goes on instead, from the newest older checkpoint that verifies, or from step 0,
    and says so (see `run_trial`).
    """
    from ray import tune

    from trial_worker._compat import function_trainable

    base: Any = function_trainable(tune.with_parameters(function or run_trial, job=job, run_dir=run_dir))

    class SweepTrial(base):
        def restore(self, checkpoint_path):
            checkpoint = getattr(checkpoint_path, "checkpoint", checkpoint_path)
            try:
                return super().restore(checkpoint_path)
            except ValueError:
                path = getattr(checkpoint, "path", None)
                if not path or Path(path).exists():
                    raise
                # This class travels to the workers by value (cloudpickle), with copies of this module's
                # globals: reach the real module's dict, which run_trial reads.
                import trial_worker.attempt

                trial_worker.attempt._VANISHED_CHECKPOINT["path"] = path  # run_trial takes an older one, or step 0

    SweepTrial.__name__ = SweepTrial.__qualname__ = "SweepTrial"
    return SweepTrial


@contextlib.contextmanager
def _resume_point(checkpoint, vanished: str | None = None):
    """(checkpoint folder to resume from or None, notes on the checkpoints skipped) for Tune's `checkpoint`
    (or for `vanished`, the local path of one Tune handed back but that no longer exists).

    On a local (or shared) filesystem the older checkpoints Tune kept beside the given one
    (`CheckpointConfig(num_to_keep=...)`) are the fallbacks; on remote storage only the given
    one is downloaded and checked.
    """
    if checkpoint is None and vanished is None:
        yield None, []
        return
    import pyarrow.fs

    from trial_worker.checkpoint import choose

    if vanished is not None or isinstance(checkpoint.filesystem, pyarrow.fs.LocalFileSystem):
        given = Path(vanished or checkpoint.path)
        older = sorted((p for p in given.parent.glob("checkpoint_*") if p.name < given.name), reverse=True)
        chosen, notes = choose([given, *older])
        yield (str(chosen) if chosen else None), notes
        return
    with contextlib.ExitStack() as stack:
        try:
            local = stack.enter_context(checkpoint.as_directory())
        except OSError as e:
            yield None, [f"checkpoint {checkpoint.path} could not be fetched: {e}"]
            return
        chosen, notes = choose([local])
        yield (str(chosen) if chosen else None), notes


def evaluate_base(job: Union[dict, JobConfig]) -> dict[str, float]:
    """{"val_loss", "ppl", "tokens"} of the job's base model on its validation split (no training)."""
    from trial_worker.recipe import evaluate_base as _evaluate_base

    return _evaluate_base(job if isinstance(job, JobConfig) else JobConfig.model_validate(job))
