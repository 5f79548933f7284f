"""Disk full on the checkpoint path (#6 item 5): a real ENOSPC under a real `sweep run`.

The sweep's `output_dir` (where Ray Tune keeps its run folder: every trial's checkpoints, results and the
experiment state) is a small tmpfs mounted for the test. Once the first rung is recorded, a ballast file takes
every free byte, so the next checkpoint Tune copies there fails with ENOSPC. The trial is recorded FAIL with
the disk-full reason, the sweep stops (no new trial starts, exit 74, one message saying what filled, where and
what to do), the checkpoints written before stay intact, and once the ballast is gone `sweep resume SPEC`
finishes the sweep, even with Tune's experiment state in the run folder cut short by the full disk (put back
from Ray's own copy in its session folder).

The study (SQLite) stays beside the spec, off the tmpfs, as it does by default: a full disk under the study's
database is a storage failure of the study (`test_storage.py`: the searcher's retries, then exit 75), and the
disk-full reason could not be recorded in a database on the full disk anyway.
"""

from __future__ import annotations

import errno
import json
import os
import re
import subprocess
import time
from pathlib import Path

import optuna
import pytest

from sweep_helpers import LiveCli, kill_processes_with_env, small_spec, sweep_cli, sweep_env
from trial_worker.checkpoint import MANIFEST, verify

RUNGS = (4, 16)
BUDGET = {"unit": "steps", "min": 4, "max": 16, "reduction_factor": 4}
LRS = [0.02, 0.01, 0.005]
TMPFS_MB = 48


def _mount_tmpfs(path: Path, mb: int) -> None:
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={mb}m", "tmpfs", str(path)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs at {path} (needs root / CAP_SYS_ADMIN): {r.stderr.strip()}")


def _free(directory: Path) -> int:
    st = os.statvfs(directory)
    return st.f_bavail * st.f_frsize


def _fill(directory: Path, leave: int) -> Path:
    """A ballast file taking every free byte of the filesystem of `directory` but `leave` (less than a checkpoint:
    the next checkpoint fills the disk while it is being written, as on a real disk filling up).

    The sweep keeps writing meanwhile (another trial's checkpoint may land between reading the free space and
    taking it), so the ballast grows in steps, re-reading the free space after each, until at most `leave` is free."""
    ballast = directory / "ballast"
    fd = os.open(ballast, os.O_CREAT | os.O_WRONLY, 0o600)
    try:
        for _ in range(100):
            want = _free(directory) - leave
            if want <= 0:
                break
            try:
                os.posix_fallocate(fd, os.fstat(fd).st_size, want)
            except OSError as e:  # the sweep took some of it first: read the free space again
                if e.errno != errno.ENOSPC:
                    raise
    finally:
        os.close(fd)
    return ballast


def _size(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


def _checkpoints(run_dir: Path) -> dict[str, str | None]:
    """{trial dir/checkpoint: what is wrong with it (None: verifies)} for every checkpoint folder of the run."""
    return {f"{c.parent.name}/{c.name}": verify(c) for c in sorted(run_dir.glob("*/checkpoint_*")) if c.is_dir()}


def _json_or_none(line: str):
    try:
        return json.loads(line)
    except ValueError:
        return None


def _snapshot(study):
    return {t.number: (t.state.name, t.value, dict(t.intermediate_values), t.params["learning_rate"],
                       t.user_attrs.get("fail_reason")) for t in study.trials}


@pytest.mark.parametrize("packing", ["off", "on"])  # one trial per process; trials trained by a pack process
def test_a_full_disk_fails_the_trial_clearly_stops_the_sweep_and_resume_finishes_it(tmp_path, assets, fault_row, packing):
    name = "diskfull"
    spec = small_spec(tmp_path, assets, name=name, rungs=RUNGS, budget=BUDGET,
                      params={"learning_rate": {"type": "choice", "values": LRS}},
                      resources={"gpus_per_trial": 0, "cpus_per_trial": 1, "max_concurrent_trials": 2, "packing": packing})
    runs = tmp_path / "runs"
    _mount_tmpfs(runs, TMPFS_MB)
    env = sweep_env(tmp_path)
    marker = f"SWEEP_HOME={env['SWEEP_HOME']}\0".encode()
    storage = f"sqlite:///{tmp_path / f'{name}.db'}"
    run_dir = runs / name
    t0 = time.perf_counter()
    try:
        run = LiveCli("run", spec, cwd=tmp_path, env=env)
        try:
            assert run.wait_for(f" rung 1/{len(RUNGS)}", 240), "no rung recorded:\n" + run.tail()
            before_fill = _checkpoints(run_dir)
            checkpoint_bytes = min(_size(c) for c in run_dir.glob("*/checkpoint_*"))
            ballast = _fill(runs, leave=checkpoint_bytes // 2)
            free_after_fill = _free(runs)
            assert free_after_fill < checkpoint_bytes, (free_after_fill, checkpoint_bytes)
            run.proc.wait(300)
        finally:
            returncode = run.finish()  # and kills whatever of Ray is left
        stdout, stderr = run.stdout, run.stderr
        assert returncode == 74, run.tail()

        # One clear message on the terminal: what filled, where, what to do; no traceback.
        assert "Traceback" not in stderr and "Traceback" not in stdout, stderr[-4000:]
        message = " ".join(stderr.split())
        assert re.search(r"sweep: stopped: disk full: no space left on device writing the checkpoint of step (\d+) to "
                         + re.escape(str(run_dir)) + r"/\S+/checkpoint_\d{6} \([\d.]+ MB free of 48\.0 MB on ", message), stderr
        assert str(run_dir) in message and f"then continue with: sweep resume {spec}" in message, stderr
        assert "Tuner.restore" not in stderr and "Stop signal received" not in stderr, stderr
        state_saved = "could not save its last experiment state" not in stderr

        study = optuna.load_study(study_name=name, storage=storage)
        stopped = _snapshot(study)
        full = {n: v for n, v in stopped.items() if v[0] == "FAIL"}
        assert full, stopped
        for v in full.values():  # recorded FAIL once, with the disk-full reason (not pyarrow's bare OSError)
            m = re.search(r"DiskFull: \[Errno 28\] disk full: no space left on device writing the checkpoint of step (\d+) to "
                          r"\S+ \([\d.]+ MB free of 48\.0 MB on .*\); earlier checkpoints are kept", v[4])
            assert m and int(m[1]) in RUNGS, v
            assert sorted(v[2]) == [s for s in RUNGS if s < int(m[1])], v  # the rungs before it stay recorded
        # The sweep stopped instead of running (or failing) every trial to come: some trial never ended (never
        # started, or was stopped unfinished: RUNNING for `sweep resume`).
        assert sum(v[0] != "RUNNING" for v in stopped.values()) < len(LRS), stopped
        assert not any(v[0] == "COMPLETE" for v in stopped.values()), stopped

        # The checkpoints written before the disk filled are all there and intact; the one cut short was removed.
        after_stop = _checkpoints(run_dir)
        assert before_fill and all(v is None for v in before_fill.values()), before_fill
        for c in before_fill:
            assert after_stop.get(c, "gone") is None, (c, after_stop)
        assert all(v is None for v in after_stop.values()), after_stop  # no partial checkpoint left to resume from

        # Tune copies its experiment state into the run folder as the sweep stops; on the full disk that copy is at
        # times cut short (CI saw it). Make it so every time (if the disk did not), as the copy would have been cut.
        [state] = sorted(run_dir.glob("experiment_state-*.json"))[-1:]
        text = state.read_text()
        cut_by_disk = _json_or_none(text) is None
        if not cut_by_disk:
            state.write_text(text[: len(text) // 3])

        # Space freed: `sweep resume SPEC` puts the state back from Ray's own copy and finishes the sweep.
        ballast.unlink()
        r = sweep_cli("resume", spec, cwd=tmp_path, env=env, timeout=400)
        kill_processes_with_env(marker)
        # Exit 1, as `sweep run` exits for a sweep with a failed trial: the disk-full trial stays FAIL (not retried).
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stdout[-4000:] + r.stderr[-4000:]
        assert f"Tune's {state.name} in {run_dir} was cut short; put back from Ray's own copy" in " ".join(r.stderr.split()), r.stderr
        assert _json_or_none(state.read_text()) is not None
        seconds = time.perf_counter() - t0
        after = _snapshot(optuna.load_study(study_name=name, storage=storage))
        assert len(after) == len(LRS), after  # the spec's trial count
        assert sorted(v[3] for v in after.values()) == sorted(LRS)  # each grid point once
        assert not any(v[0] == "RUNNING" for v in after.values()), after
        for n, v in stopped.items():
            if v[0] != "RUNNING":
                assert after[n] == v, (n, v, after[n])  # finished trials (the disk-full FAIL) unchanged
            else:
                assert set(v[2]) <= set(after[n][2]) and after[n][0] in ("COMPLETE", "PRUNED"), (v, after[n])
        assert all(v[0] in ("COMPLETE", "PRUNED") for n, v in after.items() if n not in full), after

        # No resumed trial went past a checkpoint that failed its hashes (none was cut short and kept).
        # (Tune's own result.json lines written as the disk filled may be cut short: those are not rows.)
        rows = [r for f in run_dir.glob("*/result.json") for x in f.read_text().splitlines() if (r := _json_or_none(x))]
        assert not [r for r in rows if r.get("checkpoint_note")], [r["checkpoint_note"] for r in rows if r.get("checkpoint_note")]
        assert all((c / MANIFEST).exists() for c in run_dir.glob("*/checkpoint_*")), list(run_dir.glob("*/checkpoint_*"))
    finally:
        kill_processes_with_env(marker)
        subprocess.run(["umount", "-l", str(runs)], capture_output=True)

    continued = [n for n, v in stopped.items() if v[0] == "RUNNING"]
    fault_row(fault="disk full on the checkpoint path, then `sweep resume`",
              injected=f"`sweep run` (3 trials, 2 at a time) with output_dir on a {TMPFS_MB} MB tmpfs; once rung 1 was "
                       f"recorded a ballast file left {free_after_fill // 1024} KiB free (half a {checkpoint_bytes // 1024} KiB "
                       f"checkpoint), so the next checkpoint copy filled the disk: a real ENOSPC; ballast removed, then `sweep resume SPEC`",
              lost=f"0 of {len(LRS)} trials: {len(full)} FAIL `DiskFull: disk full: ...` (rung {RUNGS[0]} kept), "
                   f"{len(before_fill)} earlier checkpoints intact (SHA-256), sweep stopped with {len(stopped)} of "
                   f"{len(LRS)} started (exit 74), {len(continued)} unfinished continued and {len(LRS) - len(stopped)} "
                   "not yet started ran on resume; none RUNNING"
                   + ("" if state_saved else "; Tune's last experiment state could not be saved (said on the terminal)")
                   + f"; Tune's experiment state in the run folder cut short ({'by the full disk' if cut_by_disk else 'by the test'}): "
                     "`sweep resume` put it back from Ray's own copy",
              seconds=seconds)


def test_a_trial_error_cut_short_by_the_full_disk_is_dropped_before_a_resume(tmp_path):
    """A failed trial's pickled error (Tune's error.pkl in its trial folder), cut short as the disk filled, would
    fail the resumed sweep at its end, where Tune unpickles every failed trial's error: the resume check removes
    it and keeps the error text; a whole one stays; one that every user could write is refused, as Tune's own
    state files are (unpickling runs code)."""
    import pickle

    from sweep.resume import run_folder_problem

    run = tmp_path / "run"
    for t in ("t1", "t2"):
        (run / t).mkdir(parents=True)
    whole = pickle.dumps(RuntimeError("no space left on device"))
    (run / "t1" / "error.pkl").write_bytes(whole[: len(whole) // 2])
    (run / "t1" / "error.txt").write_text("no space left on device")
    (run / "t2" / "error.pkl").write_bytes(whole)
    assert run_folder_problem(run) is None
    assert not (run / "t1" / "error.pkl").exists()
    assert (run / "t1" / "error.txt").read_text() == "no space left on device"
    assert (run / "t2" / "error.pkl").read_bytes() == whole
    (run / "t2" / "error.pkl").chmod(0o666)
    assert "writable by every user" in (run_folder_problem(run) or "")
