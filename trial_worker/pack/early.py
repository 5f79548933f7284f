"""A pack started before Ray: its imports, the 4-bit load, the data and the warm-up step overlap Ray's own start.

A pack server is a Ray actor, so it could only start once `ray.init` was done and Ray had started its process
(H100, 2026-12-07, 24 trials: the actor's `__init__` ran 13.4 s after `sweep run` started, its engine was ready
24.6 s later). The controller of a local Ray therefore starts the first pack's process itself, at once
(`start`): a plain Python process that builds the pack (`server.PackServer`, the same class) and serves it on a
Unix socket of its own. When Ray has started the pack's actor, the actor adopts that process (`adopt`) and
relays each call to it (`Relay`): trials, Tune and the controller see one Ray actor, as before.

Lifetimes, so that no pack is ever left holding a GPU:
- the process ends when the controller that started it is gone, and, once adopted, when its actor is (the
  actor holds a connection open for its whole life: the process ends at its end of file);
- an actor whose process is gone (killed) ends itself, and Ray restarts it empty (`max_restarts=-1`) with the
  pack built in its own process: exactly what a killed pack process did before;
- it is adopted once, by the actor of the GPU it was started on (Ray's GPU id for the actor), else ended;
- the controller ends it after the sweep, and when the plan did not pack after all (`EarlyPack.end`).
SIGINT and SIGTERM are ignored there, as Ray's own processes block them: a stop reaches the controller, which
stops the sweep and ends it. The process itself is `trial_worker.pack.process`.
"""

from __future__ import annotations

import json
import os
import queue
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from trial_worker.marks import mark

OFF_ENV = "SWEEP_EARLY_PACK"  # "0": the pack is built in its Ray actor's process, as before
METHODS = ("info", "join", "poll", "proceed", "leave", "evaluate_base")  # what a relay may call
ADOPT_WAIT_S = 120.0  # how long an actor waits for the started process to listen (it does at once)


def visible_gpus() -> list[str]:
    """This machine's GPUs as CUDA and Ray name them: CUDA_VISIBLE_DEVICES where set, else `nvidia-smi`'s
    indices (none where it is missing). Nothing of torch or Ray is imported."""
    seen = os.environ.get("CUDA_VISIBLE_DEVICES")
    if seen is not None:
        ids = [d.strip() for d in seen.split(",") if d.strip()]
        return [] if ids in (["-1"], ["NoDevFiles"]) else ids
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(i) for i, line in enumerate(ln for ln in out.splitlines() if ln.startswith("GPU "))]


@dataclass
class EarlyPack:
    """The controller's handle on the pack process it started: `ticket` goes to the first pack's actor."""

    proc: subprocess.Popen
    folder: Path
    ticket: dict

    def end(self) -> None:
        """End the process (adopted or not; nothing if it has ended) and remove its folder."""
        if self.proc.poll() is None:
            self.proc.kill()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        shutil.rmtree(self.folder, ignore_errors=True)


def start(job: dict, *, resources: dict, search_params: Optional[dict], pack_name: str) -> Optional[EarlyPack]:
    """Start the first pack's process now, where the sweep's trials pack on this machine (a local Ray): on the
    first visible GPU where trials take GPUs and the machine has one, else on the CPU. None where they do not
    pack, or where `SWEEP_EARLY_PACK=0`. `job`: the sweep's job as plain data."""
    if os.environ.get(OFF_ENV, "1") == "0":
        return None
    from trial_worker.pack import trials_pack

    gpus = visible_gpus()
    try:
        if not trials_pack(resources, job, search_params, gpus_in_cluster=len(gpus)):
            return None
    except Exception:  # noqa: BLE001 - refused: the trial plan says why, with the sweep's own message
        return None
    device = gpus[0] if resources.get("gpus_per_trial", 1) > 0 and gpus else ""
    from trial_worker.attempt import child_env, temp_folder

    folder = Path(temp_folder("sweep-early-pack"))  # named for the controller: removed by any sweep once it is gone
    key = secrets.token_hex(16)
    key_file = folder / "key"
    key_file.touch(mode=0o600)
    key_file.write_text(key)
    (folder / "pack.json").write_text(json.dumps({"name": pack_name, "job": job, "parent": os.getpid()}))
    env = child_env(CUDA_VISIBLE_DEVICES=device)
    with open(folder / "stderr.txt", "wb") as err:  # a file, not a pipe: nothing can fill it and stall the pack
        proc = subprocess.Popen([sys.executable, "-m", "trial_worker.pack.process", str(folder)], env=env,
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
    threading.Thread(target=proc.wait, name="early-pack-reaper", daemon=True).start()  # no zombie once it ends
    mark("controller: early pack started")
    return EarlyPack(proc, folder, {"folder": str(folder), "pid": proc.pid, "device": device, "name": pack_name})


# ------------------------------------------------------------------ the actor's side
class Relay:
    """The pack server of an adopted process, called from the actor's threads (each call on a connection of
    its own, reused). A lost process ends this actor's process, for Ray to restart it empty."""

    def __init__(self, address: str, key: bytes, lease: Any, pid: int):
        self.address, self.key, self.lease, self.pid = address, key, lease, pid
        self.idle: queue.SimpleQueue = queue.SimpleQueue()

    def call(self, method: str, *args, **kwargs):
        from multiprocessing.connection import Client

        try:
            try:
                conn = self.idle.get_nowait()
            except queue.Empty:  # every connection in use: a new one
                conn = Client(self.address, family="AF_UNIX", authkey=self.key)
            conn.send((method, args, kwargs))
            kind, value = conn.recv()
        except (EOFError, OSError) as e:
            mark(f"pack: its process {self.pid} is gone ({type(e).__name__}); this actor ends, for Ray to restart it")
            os._exit(1)
        self.idle.put(conn)
        if kind == "error":
            raise value
        return value


def adopt(ticket: dict, gpu_ids: list) -> Optional[Relay]:
    """The relay to the process `ticket` names, adopted by this actor; None (and that process ended) where it
    runs on another GPU than `gpu_ids` (Ray's for this actor), has ended, or was adopted already (this actor
    is a restart of the one that had it)."""
    from multiprocessing.connection import Client

    folder, pid, device = Path(ticket["folder"]), int(ticket["pid"]), ticket["device"]
    if device and [str(g) for g in gpu_ids][:1] != [device]:
        mark(f"pack: the early pack runs on GPU {device}, this actor has {gpu_ids}: ended")
        _kill(pid)
        return None
    from trial_worker.attempt import process_exists

    address = folder / "socket"
    deadline = time.monotonic() + ADOPT_WAIT_S
    while not (folder / "listening").exists():
        if not process_exists(pid) or time.monotonic() > deadline:
            _kill(pid)
            return None
        time.sleep(0.02)
    try:
        key = (folder / "key").read_text().encode()
        lease = Client(str(address), family="AF_UNIX", authkey=key)
        lease.send(("adopt", (os.getpid(),), {}))
        kind, value = lease.recv()
    except (EOFError, OSError, ValueError):
        _kill(pid)
        return None
    if kind != "ok":
        mark(f"pack: the early pack was not adopted: {value}")
        _kill(pid)
        return None
    mark("pack: early pack adopted")
    return Relay(str(address), key, lease, pid)


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except OSError:
        pass
