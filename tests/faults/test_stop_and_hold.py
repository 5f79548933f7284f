"""Ctrl+C, SIGTERM and a second controller (#20 items 1, 2, 5).

One sweep's controller is stopped three times, at moments drawn from a seeded random generator, as a
terminal and a batch scheduler stop it: Ctrl+C (SIGINT to the whole process group, as a terminal sends it)
during `sweep run`; SIGTERM during the first `sweep resume`, then a second signal right after (stop at once);
the last `sweep resume` finishes the sweep. While the first controller runs, a second `sweep run` and a
`sweep resume` of the same study are refused at once, naming the holder.

Checked: each stop exits 130 with one line (what was stopped, `sweep resume SPEC`), no traceback, no Ray
`Tuner.restore` hint; no trial is FAIL; the trials left unfinished are RUNNING in the study and continue from
their checkpoints on resume (their rungs recorded before the stop are kept); the refused controllers changed
nothing; no trial or pack temp folder of the sweep is left after any stop, nor at the end.
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import optuna
import pytest

from trial_worker.attempt import TEMP_KINDS

from sweep_helpers import kill_processes_with_env, small_spec, sweep_cli, sweep_env

NUM_TRIALS = 4
RUNGS = (4, 8, 16)
STOPPED = re.compile(r"^sweep: stopped by (Ctrl\+C|SIGTERM)( at once)?: (.*); nothing recorded is lost\. "
                     r"Continue with: sweep resume (\S+)$")


class Session:
    """`sweep ARGS` in a session of its own (as a shell runs a foreground job): a signal goes to its whole process
    group, as Ctrl+C in a terminal sends it."""

    def __init__(self, *args, cwd: Path, env: dict):
        self.proc = subprocess.Popen([sys.executable, "-m", "sweep.cli", *map(str, args)], cwd=cwd, env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        self.out: list[str] = []
        self.err: list[str] = []
        self.readers = [threading.Thread(target=lambda s=s, ls=ls: [ls.append(x) for x in s], daemon=True)
                        for s, ls in ((self.proc.stdout, self.out), (self.proc.stderr, self.err))]
        for r in self.readers:
            r.start()

    def wait_for(self, pattern: str, timeout: float) -> bool:
        deadline = time.time() + timeout
        while time.time() < deadline and self.proc.poll() is None:
            if any(re.search(pattern, x) for x in list(self.out)):
                return True
            time.sleep(0.05)
        return any(re.search(pattern, x) for x in list(self.out))

    def signal(self, sig: int) -> None:
        os.killpg(self.proc.pid, sig)

    def finish(self, timeout: float) -> int:
        try:
            self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            for r in self.readers:
                r.join(5)
        return self.proc.returncode

    def tail(self) -> str:
        return "".join(self.out)[-3000:] + "\n--- stderr ---\n" + "".join(self.err)[-3000:]


def temp_folders(home: str) -> set[str]:
    """Trial and pack temp folders that this sweep (its processes carry SWEEP_HOME=`home`) left or holds: those of
    an ended process, and those of a live one of this sweep (another test's live trials are not this sweep's)."""
    import psutil

    out = set()
    for e in os.scandir(tempfile.gettempdir()):
        if not e.name.startswith(TEMP_KINDS):
            continue
        try:
            ours = psutil.Process(int(e.name.rsplit("-", 2)[-2])).environ().get("SWEEP_HOME") == home
        except (psutil.Error, ValueError):
            ours = True  # its process has ended: left behind
        if ours:
            out.add(e.name)
    return out


def _states(storage: str) -> dict:
    study = optuna.load_study(study_name="held", storage=storage)
    return {t.number: (t.state.name, dict(t.intermediate_values)) for t in study.trials}


def _stopped(cli: Session, how: str, at_once: bool | None) -> re.Match:
    lines = [x for x in "".join(cli.err).splitlines() if x.strip()]
    assert lines and (m := STOPPED.match(lines[-1])), cli.tail()
    assert m[1] == how and at_once in (None, bool(m[2])), cli.tail()
    text = "".join(cli.out) + "".join(cli.err)
    assert "Traceback" not in text and "Tuner.restore" not in text and "Resume experiment" not in text, cli.tail()
    return m


@pytest.mark.parametrize("packing,seed", [("off", 3), ("on", 4)])
def test_ctrl_c_and_sigterm_stop_resumably_and_a_second_controller_is_refused(tmp_path, assets, fault_row, packing, seed):
    rng = random.Random(seed)
    # A pack trains the 4 trials of RUNGS in about 2 s: longer rungs, so that each stop finds trials running.
    spec = small_spec(tmp_path, assets, name="held", rungs=RUNGS if packing == "off" else (8, 16, 32), params={},
                      search={"sampler": "random", "seed": seed, "num_trials": NUM_TRIALS, "params": {
                          "learning_rate": {"type": "loguniform", "low": 1e-3, "high": 3e-2},
                          "lora_r": {"type": "choice", "values": [2, 4, 8]}}},
                      resources={"gpus_per_trial": 0, "cpus_per_trial": 1, "max_concurrent_trials": 2, "max_failures": 1,
                                 "packing": packing})
    env = sweep_env(tmp_path)
    storage = f"sqlite:///{tmp_path / 'held.db'}"
    registry = Path(env["SWEEP_HOME"]) / "studies.json"
    before_tmp = temp_folders(env['SWEEP_HOME'])
    t_start = time.perf_counter()
    said, moments = [], []
    try:
        # 1. `sweep run`; while it runs, a second controller of the same study is refused at once (the lease
        # does not depend on packing: checked once).
        cli = Session("run", spec, cwd=tmp_path, env=env)
        assert cli.wait_for(r" started ", 120), cli.tail()
        trials_then, registry_then = len(_states(storage)), registry.read_text()
        for command in ("run", "resume") if packing == "off" else ():
            t0 = time.perf_counter()
            r = sweep_cli(command, spec, cwd=tmp_path, env=env, timeout=60)
            assert r.returncode == 2, (r.stdout, r.stderr)
            assert re.search(rf"^sweep {command}: study 'held' is held by another controller: pid {cli.proc.pid} on host "
                             r"\S+, since \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC \(lease renewed \d+ s ago\)", r.stderr, re.M), r.stderr
            assert "Traceback" not in r.stderr and time.perf_counter() - t0 < 30
            said.append(r.stderr.strip().splitlines()[-1])
        assert len(_states(storage)) <= NUM_TRIALS and registry.read_text() == registry_then
        assert trials_then <= len(_states(storage))

        # 2. Ctrl+C at a random moment after the first rung.
        assert cli.wait_for(r" rung 1/", 120), cli.tail()
        delay = rng.uniform(0.0, 3.0 if packing == "off" else 0.5)  # (a pack trains these 4 trials in seconds)
        time.sleep(delay)
        moments.append(f"Ctrl+C {delay:.1f} s after the first rung")
        t0 = time.perf_counter()
        cli.signal(signal.SIGINT)
        assert cli.finish(120) == 130, cli.tail()
        stop_s = time.perf_counter() - t0
        m = _stopped(cli, "Ctrl+C", at_once=False)
        assert m[4] == str(spec), m[0]
        said.append(m[0])
        states = _states(storage)
        assert "FAIL" not in {s for s, _ in states.values()}, states
        running = {n for n, (s, _) in states.items() if s == "RUNNING"}
        named = {int(x) for x in re.findall(r"\d+", m[3].split(" left unfinished")[0])} if "left unfinished" in m[3] else set()
        assert named == running, (m[0], states)
        kill_processes_with_env(f"SWEEP_HOME={env['SWEEP_HOME']}\0".encode())  # (none should be left: checked below)
        assert not temp_folders(env['SWEEP_HOME']) - before_tmp, temp_folders(env['SWEEP_HOME']) - before_tmp
        first_stop = {n: steps for n, (s, steps) in states.items()}

        # 3. `sweep resume`, stopped by SIGTERM (a scheduler) at a random moment, then a second signal: at once.
        cli = Session("resume", spec, cwd=tmp_path, env=env)
        assert cli.wait_for(r" started ", 120), cli.tail()
        delay = rng.uniform(0.0, 2.0 if packing == "off" else 0.3)
        time.sleep(delay)
        cli.signal(signal.SIGTERM)
        assert cli.wait_for(r"stopping \(SIGTERM\)", 20), cli.tail()
        t0 = time.perf_counter()
        # Mostly while Tune stops its running trials (seconds): the second signal stops at once. On a fast machine
        # Tune may have stopped already: then the sweep ends as after one signal, its line cut short by none.
        cli.signal(signal.SIGINT)
        assert cli.finish(60) == 130, cli.tail()
        at_once_s = time.perf_counter() - t0
        m = _stopped(cli, "SIGTERM", at_once=None)
        moments.append(f"SIGTERM {delay:.1f} s after a trial started on resume, then Ctrl+C while it stopped"
                       + ("" if m[2] else " (after Tune had stopped)"))
        said.append(m[0])
        states = _states(storage)
        assert "FAIL" not in {s for s, _ in states.values()}, states
        for n, steps in first_stop.items():  # rungs recorded before the first stop are kept
            assert {k: v for k, v in states[n][1].items() if k in steps} == steps, (n, steps, states[n])
        assert not temp_folders(env['SWEEP_HOME']) - before_tmp, temp_folders(env['SWEEP_HOME']) - before_tmp

        # 4. The last `sweep resume` finishes the sweep: the stopped trials went on from their checkpoints.
        cli = Session("resume", spec, cwd=tmp_path, env=env)
        assert cli.finish(300) == 0, cli.tail()
        assert "Traceback" not in "".join(cli.err), cli.tail()
    finally:
        kill_processes_with_env(f"SWEEP_HOME={env['SWEEP_HOME']}\0".encode())
    seconds = time.perf_counter() - t_start
    final = _states(storage)
    assert len(final) == NUM_TRIALS and {s for s, _ in final.values()} <= {"COMPLETE", "PRUNED"}, final
    for n in running:  # left unfinished by Ctrl+C: continued, not restarted (its first rungs as first recorded)
        assert final[n][1].items() >= first_stop[n].items(), (n, first_stop[n], final[n])
    assert not temp_folders(env['SWEEP_HOME']) - before_tmp, temp_folders(env['SWEEP_HOME']) - before_tmp
    packed = packing == "on"
    fault_row(fault="Ctrl+C, SIGTERM" + (" (packed)" if packed else " and a second controller (one trial per process)"),
              injected=f"seed {seed}: " + ("" if packed else "a second `sweep run` and `sweep resume` while the first runs; ")
                       + "; ".join(moments) + f"; {NUM_TRIALS} trials, 2 at once",
              lost="0: " + ("" if packed else "both second controllers refused (exit 2) naming pid and since when, the "
                                              "study unchanged; ") + "each stop "
                   f"exit 130 with one line (Ctrl+C took {stop_s:.1f} s, the second signal {at_once_s:.1f} s), no traceback "
                   f"or Tuner.restore hint; no trial FAIL; {len(running)} left unfinished continued from their rungs; "
                   "no temp folder left", seconds=seconds)
    print("\n".join(said))


def test_a_signal_after_a_signal_stopped_the_sweep_cannot_cut_its_last_line_short():
    """A second Ctrl+C or SIGTERM that comes as the stopped sweep ends (after its handlers' block, before the
    line saying what stopped is printed) is ignored: Typer would turn it into a silent exit 130. A sweep that was
    not stopped by a signal gives the handlers from before it back. (In a process of its own.)"""
    code = """if True:
        import os, signal, time
        from sweep.stops import Interrupts, SweepInterrupted
        before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        with Interrupts():
            pass
        assert {s: signal.getsignal(s) for s in before} == before, "handlers not given back"
        stops = Interrupts()
        try:
            with stops:  # Tune not running: the first signal stops at once
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)
        except SweepInterrupted:
            pass
        assert stops.signal == "SIGTERM" and stops.at_once, (stops.signal, stops.at_once)
        for sig in (signal.SIGINT, signal.SIGTERM):
            os.kill(os.getpid(), sig)
        time.sleep(0.3)
        print("the last line")
    """
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "the last line", (r.returncode, r.stdout, r.stderr[-2000:])
