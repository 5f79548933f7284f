"""The sweep's terminal: one line per trial event (started, each rung, how it ended, retries).

This module imports Ray (its `Callback` base); the controller imports it once Ray is needed.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Optional

from ray.tune import Callback

from sweep.stops import DISK_FULL_MARK, DiskFullStop


class Progress(Callback):
    """One line per trial event: started, each rung (val loss, ppl), and how it ended.

    Also the sweep's disk-full stop: a trial that failed (or is retried) on a full disk stops the
    whole sweep (`disk_full` holds the reason), since every trial after it would hit the same disk.

    Tune pickles its callbacks with the experiment state, so the console (which holds a lock) is kept
    out of the pickled state and made again after a restore; the clock restarts there too, so the
    times a resumed sweep prints count from the resume.
    """

    def __init__(self, searcher, unit: str, rungs: list, console):
        self.searcher, self.unit, self.rungs, self.t0 = searcher, unit, rungs, time.time()
        self.console = console
        self.disk_full: Optional[str] = None  # the DiskFull reason that stopped the sweep

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "console"}

    def __setstate__(self, state):
        from sweep.terminal import terminal_console

        self.__dict__.update(state)
        self.console = terminal_console()
        self.t0 = time.time()

    def _say(self, text: str) -> None:
        self.console.print(f"[dim]{time.time() - self.t0:7.1f}s[/] {text}")

    def _label(self, trial) -> str:
        n = self.searcher.trial_number(trial.trial_id)
        return f"trial {n:>3}" if n is not None else f"trial {trial.trial_id}"

    def on_trial_start(self, iteration, trials, trial, **info):
        if self.searcher.finished_before(trial.trial_id):
            return  # a trial the study had finished before a resume: its actor ends at once, nothing to say
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
        if self.searcher.finished_before(trial.trial_id):
            return
        state = self.searcher.final_state(trial.trial_id) or "DONE"
        color = {"COMPLETE": "green", "PRUNED": "yellow"}.get(state, "white")
        b = (trial.last_result or {}).get(self.unit)
        self._say(f"{self._label(trial)} [{color}]{state}[/] at {self.unit} {b}")

    def on_trial_error(self, iteration, trials, trial, **info):
        from rich.markup import escape

        from sweep.record import error_summary

        reason = error_text(trial)
        self.searcher.record_failure(trial.trial_id, reason)
        self._say(f"{self._label(trial)} [red]FAIL[/]: {escape(error_summary(reason))}")
        self._stop_if_disk_full(trial, reason)

    def on_trial_recover(self, iteration, trials, trial, **info):
        from rich.markup import escape

        from sweep.record import error_summary

        reason = error_text(trial)
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
        from sweep._compat.ray import interrupt_tune

        line = next((x for x in reversed(reason.splitlines()) if DISK_FULL_MARK in x), None)
        if line is None or self.disk_full:
            return
        self.disk_full = line[line.index(DISK_FULL_MARK):].strip()
        self._say(f"[red]stopping the sweep[/]: {self._label(trial)} hit a full disk; no new trial starts")
        interrupt_tune(DiskFullStop("disk full"))


def _fmt(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def error_text(trial) -> str:
    """The end of a failed Ray trial's error file (Tune's traceback), or its error message."""
    path = getattr(trial, "error_file", None)
    try:
        if path and os.path.exists(path):
            return Path(path).read_text()[-4000:]
    except OSError:
        pass
    return str(getattr(trial, "error_msg", "") or "trial failed")
