"""Where a sweep's start-up time goes: named moments, written as JSON lines to the file `SWEEP_TIMELINE` names.

Unset (every user run), `mark` does nothing. `benchmarks/sweep_makespan.py` sets it for the controller, whose
Ray workers (the pack servers, the trials) inherit it, and reads the moments back against the sweep's start.
"""

from __future__ import annotations

import json
import os
import time
from typing import Optional

ENV = "SWEEP_TIMELINE"


def enabled() -> bool:
    """Whether moments are recorded (`SWEEP_TIMELINE` set): callers skip building a mark's text otherwise."""
    return bool(os.environ.get(ENV))


def mark(event: str, t: Optional[float] = None) -> None:
    """Record that `event` happened (at `t`, `time.time()`; default now) in this process."""
    path = os.environ.get(ENV)
    if not path:
        return
    line = json.dumps({"t": time.time() if t is None else t, "pid": os.getpid(), "event": event})
    with open(path, "a", encoding="utf-8") as f:  # one short write per line: lines of several processes stay whole
        f.write(line + "\n")


def mark_process_start(event: str) -> None:
    """Record `event` at the moment this process started (not now), where psutil can tell it."""
    if not enabled():
        return
    try:
        import psutil

        started = psutil.Process().create_time()
    except Exception:  # noqa: BLE001 - no mark: "now" would be a wrong start
        return
    mark(event, started)


def read(path: str, since: float) -> list[tuple[float, int, str]]:
    """[(seconds after `since`, pid, event)] of the moments in `path`, in time order."""
    if not os.path.exists(path):
        return []
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                m = json.loads(line)
            except ValueError:
                continue
            out.append((round(m["t"] - since, 2), m["pid"], m["event"]))
    return sorted(out)
