"""How a sweep stops short, and what the user is told: a full disk (`DiskFullStop`, exit 74) and a study
database lost for longer than the searcher's retries (`StudyStorageLost`, exit 75). Both leave the
sweep resumable with `sweep resume SPEC`, whose exact command `resume_command` writes.

Imports no Ray: the CLI maps these exceptions to messages before anything heavy is loaded.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

from sweep.spec import SweepSpec

DISK_FULL_MARK = "disk full: "  # how `trial_worker.entry.DiskFull` starts its reason


class DiskFullStop(RuntimeError):
    """A trial could not write its checkpoint (disk full): the sweep stopped, resumable once space is freed."""


class StudyStorageLost(RuntimeError):
    """The study database failed for longer than the searcher's retries: the sweep stopped rather than go on unrecorded."""


class QuietStops:
    """Tune's log while a sweep may stop for a full disk or a lost study database: drops Tune's tracebacks of a study write
    that gave up (the controller reports it once) and Ray's tracebacks of the DiskFull trial errors (the trial's
    FAIL line and the study hold the reason) and Tune's own Ctrl+C messages once the sweep stops (the controller
    says once what happened and how to continue), and notes whether Tune failed to save its experiment state.
    Also drops Tune's traceback for a checkpoint it could not delete because it was gone already (a resumed
    sweep's restored state can list one deleted after its save)."""

    def __init__(self, progress):
        from sweep._compat.ray import TUNE_LOGGERS

        self.progress, self.state_unsaved, self.loggers = progress, None, TUNE_LOGGERS

    def __enter__(self):
        for name in self.loggers:
            logging.getLogger(name).addFilter(self)
        return self

    def __exit__(self, *exc):
        for name in self.loggers:
            logging.getLogger(name).removeFilter(self)

    def filter(self, record) -> bool:
        from sweep._compat.ray import (CHECKPOINT_HANDLING_FAILED, STATE_SAVE_FAILED_MESSAGE, STOP_MESSAGES,
                                       TRIAL_FAILED_MESSAGES)

        text = str(record.msg)
        exc = record.exc_info[1] if record.exc_info else None
        if text.startswith(CHECKPOINT_HANDLING_FAILED) and isinstance(exc, FileNotFoundError):
            return False  # after a resume: a checkpoint Tune's older state listed was already deleted; nothing lost
        about = f"{text} {exc!r} {getattr(exc, '__cause__', None)!r}"
        if exc is not None and storage_failure(exc) is not None:
            return False  # a study write that gave up: the controller says it once, without Tune's traceback
        if "DiskFull" in about and text.startswith(TRIAL_FAILED_MESSAGES):
            return False
        if not getattr(self.progress, "disk_full", None):
            # A save that failed on the full disk before the stop: the state saved at the stop is what counts.
            return not (text.startswith(STATE_SAVE_FAILED_MESSAGE) and "No space left" in repr(exc))
        if text.startswith(STATE_SAVE_FAILED_MESSAGE):
            self.state_unsaved = (str(exc).strip().splitlines() or [type(exc).__name__])[-1] if exc else "failed"
            return False
        return not text.startswith(STOP_MESSAGES)


def resume_command(spec_path, spec: SweepSpec, study_name: str, storage: Optional[str]) -> str:
    """The `sweep resume` command that continues this sweep (a storage URL without its password)."""
    from sweep.record import url_without_password

    again = f"sweep resume {spec_path}"
    if storage:
        again += f" --storage {url_without_password(storage)}"
    if study_name != spec.name:
        again += f" --name {study_name}"
    return again


def disk_full_message(reason: str, *, run_dir: "Path | str", again: str, state_unsaved: Optional[str] = None) -> str:
    """What `sweep run` says when a full disk stopped it (`again`: the resume command)."""
    reason = reason.split(" [", 1)[0] if reason.endswith("]") else reason  # the library's own words stay in the study
    return (f"sweep: stopped: {reason.replace('`sweep resume SPEC`', 'resume')}.\n"
            f"The trial that hit it is recorded FAIL with that reason; trials still running were stopped unfinished and "
            f"no new trial was started. Ray Tune's run folder {run_dir} keeps every checkpoint written before.\n"
            + (f"Ray Tune could not save its last experiment state there either ({state_unsaved}): the run folder may "
               f"be older than the study, and `sweep resume` may redo work from where it was last saved.\n"
               if state_unsaved else "") +
            f"Free space on the disk of {run_dir}, then continue with: {again}")


def storage_failure(error: Optional[BaseException]) -> Optional[BaseException]:
    """The storage error a StudySearch write gave up on, in `error`'s chain (Tune wraps it in a TuneError)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if getattr(error, "study_write_failed", None):
            return error
        error = error.__cause__ or error.__context__
    return None


def storage_lost_message(failure: BaseException, *, study_name: str, storage_url: str, run_dir: "Path | str", again: str) -> str:
    """What `sweep run` says when the study database stayed unreachable (`again`: the resume command)."""
    from sweep.record import safe_url
    from sweep.search import storage_error_text

    what, tries, waited = getattr(failure, "study_write_failed")
    return (f"sweep: stopped: could not write to the study database {safe_url(storage_url)}: {what} (study "
            f"{study_name!r}) failed {tries} times over {waited:.0f} s: {storage_error_text(failure)}\n"
            f"Nothing recorded is lost: the study keeps every write made before the failure, and Ray Tune's run "
            f"folder {run_dir} keeps the trials' results and checkpoints.\n"
            f"Once the database is back, continue with: {again}")
