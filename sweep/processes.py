"""The local Ray's processes on this machine: marked with their controller and run folder, found again, ended.

A controller's local Ray (raylet, GCS, dashboard and runtime-env agents, workers) inherits a mark naming the
controller and its run folder (`mark_ray_owner`). The controller ends its own at the end of a sweep
(`own_ray`, `end_processes`); a later `sweep run`/`resume` of the same run folder ends what a killed one left
(`end_orphans`). Linux: read from /proc.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional


OWNER_ENV = "SWEEP_RAY_OWNER"  # "<controller pid>:<run folder>", in the environment of every process of a local Ray


def mark_ray_owner(run_dir: "Path | str") -> None:
    """Name this controller and its run folder in the environment its local Ray (and every Ray process) inherits,
    so that a later `sweep run`/`resume` of the same run folder can find what it leaves behind if killed."""
    os.environ[OWNER_ENV] = f"{os.getpid()}:{run_dir}"


def end_orphans(run_dir: "Path | str", *, grace_s: float = 5.0) -> list[int]:
    """End the local Ray processes (raylet, GCS, dashboard and runtime-env agents, workers) that a killed
    controller of `run_dir` left running: this user's processes whose environment names `run_dir` and a
    controller that no longer exists, with every process they started. SIGTERM,
    then SIGKILL after `grace_s`. Returns their pids.

    Ray's agents outlive a `kill -9` of the driver by minutes; nothing else ends them (Linux: read from /proc).
    They do not always carry the environment mark (Ray starts them with an environment of its own at times), so
    the children of the marked processes go too.
    """
    ended: list[int] = []
    # Looked for again after each round: a raylet under SIGTERM may start agents again while it shuts down.
    for _ in range(3):
        marked = [pid for pid in _processes_of_this_user() if _orphan_of(pid, run_dir)]
        found = [pid for pid in _with_descendants(marked) + _stray_agents() if pid not in ended]
        if not found:
            break
        end_processes(found, grace_s=grace_s)
        ended += found
    return ended


RAY_AGENTS = (b"ray::DashboardAgent", b"ray::RuntimeEnvAgent")


def _stray_agents() -> list[int]:
    """This user's Ray agents whose raylet is gone (their parent is no raylet any more): leaks of a Ray that
    was killed, which do not always carry the mark `_orphan_of` reads and can outlive it by minutes."""
    out = []
    for pid in _processes_of_this_user():
        try:
            if not Path(f"/proc/{pid}/cmdline").read_bytes().startswith(RAY_AGENTS):
                continue
        except OSError:
            continue
        parent = _parent(pid)
        if parent is None:
            continue
        try:
            under_raylet = b"raylet" in Path(f"/proc/{parent}/cmdline").read_bytes()
        except OSError:
            under_raylet = False
        if not under_raylet:
            out.append(pid)
    return out


def own_ray(run_dir: "Path | str") -> list[int]:
    """The processes of this controller's local Ray for `run_dir` (marked with this process), and all below them."""
    me = (os.getpid(), str(run_dir))
    return _with_descendants([pid for pid in _processes_of_this_user() if _owner(pid) == me])


def end_processes(pids: list[int], *, grace_s: float) -> None:
    """SIGTERM `pids`, then SIGKILL those left after `grace_s`."""
    import signal
    import time

    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 2.0)):
        for pid in pids:
            if pid_exists(pid):
                try:
                    os.kill(pid, sig)
                except (ProcessLookupError, PermissionError):
                    pass
        deadline = time.time() + wait
        while time.time() < deadline and any(pid_exists(p) for p in pids):
            time.sleep(0.1)


def _with_descendants(pids: list[int]) -> list[int]:
    """`pids` and every process below them (Linux: parents read from /proc)."""
    children: dict[int, list[int]] = {}
    for pid in _processes_of_this_user():
        parent = _parent(pid)
        if parent is not None:
            children.setdefault(parent, []).append(pid)
    out, todo = [], list(pids)
    while todo:
        pid = todo.pop()
        if pid not in out:
            out.append(pid)
            todo += children.get(pid, [])
    return out


def _parent(pid: int) -> Optional[int]:
    """Process `pid`'s parent (Linux: /proc), or None if it is gone."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def _processes_of_this_user() -> list[int]:
    try:
        names = os.listdir("/proc")
    except OSError:
        return []
    out = []
    for d in names:
        if d.isdigit() and int(d) != os.getpid():
            try:
                if os.stat(f"/proc/{d}").st_uid == os.getuid():
                    out.append(int(d))
            except OSError:
                pass
    return out


def _owner(pid: int) -> Optional[tuple[int, str]]:
    """(controller pid, run folder) from process `pid`'s `OWNER_ENV` mark, or None."""
    prefix = f"{OWNER_ENV}=".encode()
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    owner = next((e[len(prefix):].decode(errors="replace") for e in env if e.startswith(prefix)), None)
    controller, _, folder = (owner or "").partition(":")
    return (int(controller), folder) if controller.isdigit() else None


def _orphan_of(pid: int, run_dir: "Path | str") -> bool:
    owner = _owner(pid)
    return owner is not None and owner[1] == str(run_dir) and not pid_exists(owner[0])


def pid_exists(pid: int) -> bool:
    """Whether process `pid` is alive (a zombie, dead but not yet reaped, is not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
            return True
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
