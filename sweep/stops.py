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

DISK_FULL_MARK = "disk full: "  # how `trial_worker.attempt.DiskFull` starts its reason


class DiskFullStop(RuntimeError):
    """A trial could not write its checkpoint (disk full): the sweep stopped, resumable once space is freed."""


class StudyStorageLost(RuntimeError):
    """The study database failed for longer than the searcher's retries: the sweep stopped rather than go on unrecorded."""


class QuietStops:
    """Tune's log while a sweep runs: drops Tune's tracebacks of a study write that gave up (the controller reports
    it once), Ray's tracebacks of failed trial attempts (a lost worker, a DiskFull: the trial's one FAIL or retry
    line and the study hold the reason) and Tune's own stop messages with their `Tuner.restore` hint (the
    controller says once what stopped the sweep and gives `sweep resume`), and notes whether Tune failed to save
    its experiment state.
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
        if exc is not None and storage_failure(exc) is not None:
            return False  # a study write that gave up: the controller says it once, without Tune's traceback
        if text.startswith(TRIAL_FAILED_MESSAGES):
            # A trial's attempt that failed (its worker lost, an error in it): the progress line says it once
            # (`FAIL: ...` or `retry N from ...`) and the study keeps the reason; Ray's traceback adds nothing.
            return False
        if text.startswith(STOP_MESSAGES):
            return False  # Ctrl+C, a full disk: the controller says once what stopped and how to continue
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
    from sweep.record.search import storage_error_text

    what, tries, waited = getattr(failure, "study_write_failed")
    return (f"sweep: stopped: could not write to the study database {safe_url(storage_url)}: {what} (study "
            f"{study_name!r}) failed {tries} times over {waited:.0f} s: {storage_error_text(failure)}\n"
            f"Nothing recorded is lost: the study keeps every write made before the failure, and Ray Tune's run "
            f"folder {run_dir} keeps the trials' results and checkpoints.\n"
            f"Once the database is back, continue with: {again}")


# ------------------------------------------------------------------ Ctrl+C and SIGTERM

EXIT_INTERRUPTED = 130  # the shell's 128 + SIGINT, for SIGTERM too: the sweep was stopped from outside, resumable


class SweepInterrupted(KeyboardInterrupt):
    """Raised in the main thread by a Ctrl+C (SIGINT) or SIGTERM that must stop the sweep at once: the second
    one, or the first before Tune runs. A KeyboardInterrupt, so no `except Exception` on the way (Tune's loop,
    its cleanup) holds it up."""


class SweepStopped(RuntimeError):
    """The sweep was stopped by Ctrl+C or SIGTERM; the message is the one line the user reads (exit 130)."""


class Interrupts:
    """The sweep's SIGINT and SIGTERM handlers, installed for the whole of `run_sweep` (main thread only).

    While Tune runs (`tune_running`), the first signal is handed to Tune as its own stop (SIGUSR1, which Tune
    handles like Ctrl+C): no new trial starts, Tune saves its experiment state with the running trials
    unfinished and stops their actors; the study keeps them RUNNING, and `sweep resume` continues them. Tune's
    own SIGINT handler is kept out (`TUNE_DISABLE_SIGINT_HANDLER`): it would print Ray's restore hint and
    make a second Ctrl+C a plain KeyboardInterrupt at any point. A second signal (or the first when Tune is not
    running: Ray starting, the base evaluation, the leaderboard) raises `SweepInterrupted` at once; nothing
    recorded is lost (each study write is one transaction, and Tune's last saved state stays on disk, as after
    a kill). Signals after that are ignored, so the ending of Ray's processes is never cut short.
    """

    def __init__(self, say=None):
        self.signal: Optional[str] = None  # "Ctrl+C" or "SIGTERM": the first signal received
        self.at_once = False  # a signal stopped the sweep at once (SweepInterrupted raised)
        self.tune_running = False
        self.closing = False  # no signal is acted on any more (the sweep is ending)
        self.say = say or (lambda text: None)
        self._old: dict = {}

    def __enter__(self):
        import os
        import threading

        if threading.current_thread() is threading.main_thread():
            os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
            self.install()
        return self

    def install(self) -> None:
        """(Re)install the handlers: `ray.init` sets a SIGTERM handler of its own (`sys.exit`)."""
        import signal
        import threading

        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGINT, signal.SIGTERM):
            old = signal.signal(sig, self._handle)
            self._old.setdefault(sig, old)

    def __exit__(self, *exc):
        import signal

        for sig, old in self._old.items():
            # A sweep a signal stopped is ending: a later signal (a second Ctrl+C as Ray's processes end) must not
            # cut short the line that says what was stopped and how to continue (Typer would turn the
            # KeyboardInterrupt into a silent exit 130). Otherwise the handlers before the sweep come back.
            signal.signal(sig, signal.SIG_IGN if self.closing else old if old is not None else signal.SIG_DFL)
        self._old.clear()

    def _handle(self, signum, frame) -> None:
        import signal

        from sweep._compat.ray import interrupt_tune

        name = "Ctrl+C" if signum == signal.SIGINT else signal.Signals(signum).name
        if self.closing:
            return  # Tune has stopped, or the sweep stops at once: let the ending of Ray's processes finish
        if self.signal is None and self.tune_running:
            self.signal = name
            self.say(f"stopping ({name}): no new trial starts, running trials stop unfinished (resumable); "
                     f"{'Ctrl+C' if name == 'Ctrl+C' else name} again stops at once")
            interrupt_tune(SweepInterrupted(name))
            return
        self.signal = self.signal or name
        self.at_once = self.closing = True
        raise SweepInterrupted(name)


def interrupted_message(how: str, *, at_once: bool, running: list[int], not_started: int, again: str,
                        before_trials: bool = False) -> str:
    """The one line `sweep run`/`resume` ends with after Ctrl+C or SIGTERM (`again`: the resume command)."""
    if before_trials:
        what = "before any trial started"
    else:
        which = (f"trial{'s' if len(running) > 1 else ''} {', '.join(map(str, running))} left unfinished"
                 if running else "no trial was running")
        what = f"{which}, {not_started} not started"
    return (f"sweep: stopped by {how}{' at once' if at_once else ''}: {what}; nothing recorded is lost. "
            f"Continue with: {again}")
