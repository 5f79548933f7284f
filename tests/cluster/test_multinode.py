"""Several nodes for real (#14 item 2): a Ray head and two worker nodes, each started with `ray start` as its own
processes on this machine, `sweep run --address` from the head, the study in PostgreSQL, the run folder on a path
every node reads and writes. One worker node's raylet is killed with `kill -9` mid-way to a rung: its trials go on
on the other node from their last rung checkpoints, and the sweep ends with exactly `num_trials` trials.

The head has no CPUs (`--num-cpus=0`): the controller asks each trial for `{cpu: cpus_per_trial, gpu:
gpus_per_trial}`, so trials (and the base model's evaluation) can only be placed on the worker nodes, as on a
cluster whose head is a small CPU machine. Every process these Ray nodes start carries the test's SWEEP_HOME in
its environment: they are found, and stopped, by that marker (never by `ray stop`, which stops every Ray on the
machine, other users' too).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import optuna
import psutil
import pytest

from sweep_helpers import LiveCli, kill_processes_with_env, processes_with_env, small_spec, sweep_env, TRIAL_ACTOR_TITLES

pytestmark = pytest.mark.faults

RAY = Path(sys.executable).parent / "ray"  # the venv's `ray`, beside its python
# Reduction factor 100 (the most a spec allows): 990 steps between the rungs, for the kill to land mid-way. On
# 2026-12-06 a trial here ran ~75 steps/s: 310 steps (rungs 10 -> 320, as before) were over in ~4 s, at times
# before the kill (the tree then landed failed it too: no retry to record, or no trial actor left to kill).
RUNGS = (10, 1000)
NUM_TRIALS = 2


def _free_ports(n: int) -> list[int]:
    """`n` distinct ports free now, from 20000-32767: above Ray's worker ports (10002-19999) and below Linux's
    ephemeral range (32768-60999), where the outgoing connections of every Ray on the machine take ports
    (a port picked there was taken before the raylet bound it)."""
    import random

    socks = []
    try:
        for port in random.sample(range(20000, 32768), 4 * n):
            s = socket.socket()
            try:
                s.bind(("", port))
            except OSError:
                s.close()
                continue
            socks.append(s)
            if len(socks) == n:
                return [s.getsockname()[1] for s in socks]
        raise RuntimeError(f"not {n} free ports in 20000-32767")
    finally:
        for s in socks:
            s.close()


class RayNodes:
    """A head and `workers` worker nodes started with `ray start`, on free ports, in their own temp folder."""

    def __init__(self, env: dict, workers: int = 2, cpus_per_worker: int = 2):
        self.env = dict(env,
                        # A killed raylet is declared dead after 3 missed health checks 1 s apart (Ray's default:
                        # 5 checks 3 s apart), so its trials are retried sooner.
                        RAY_health_check_period_ms="1000", RAY_health_check_failure_threshold="3",
                        RAY_health_check_initial_delay_ms="1000",
                        # Ray 2.60 turns token authentication on when ~/.ray/auth_token exists (a local `ray.init`
                        # writes one) and the mode is unset, for `ray start --head` but not for the nodes joining
                        # it: set it for every node and the driver, with this cluster's own token.
                        RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
        self.marker = f"SWEEP_HOME={env['SWEEP_HOME']}\0".encode()
        # Short: Ray's unix socket paths live under it and must stay under 108 bytes.
        self.temp_dir = tempfile.mkdtemp(prefix="sweep-rc-", dir="/tmp")
        # Every port of every node at once, so that no two of them are the same.
        self.ports = iter(_free_ports(2 + 6 * (1 + workers)))
        self.port, dashboard = next(self.ports), next(self.ports)
        self.address = f"127.0.0.1:{self.port}"
        self.node_manager_ports: dict[str, int] = {}
        self._raylets: dict[int, str] = {}
        self.workers, self.cpus_per_worker, self.dashboard = workers, cpus_per_worker, dashboard

    def start(self) -> None:
        """Start the head, then the worker nodes; on failure stop what started."""
        try:
            self._wait("head", self._start("head", ["--head", f"--port={self.port}", "--num-cpus=0", "--num-gpus=0",
                                                    f"--temp-dir={self.temp_dir}", "--include-dashboard=false",
                                                    f"--dashboard-port={self.dashboard}"]))
            # One after the other: nodes joining at once in one session folder can pick the same socket name
            # (sockets/raylet.1) and one raylet dies on "bind: Address already in use".
            for i in range(self.workers):
                name = f"worker{i + 1}"
                self._wait(name, self._start(name, [f"--address={self.address}", "--num-gpus=0",
                                                    f"--num-cpus={self.cpus_per_worker}"]))
        except BaseException:
            self.stop()
            raise

    def _start(self, name: str, extra: list[str]) -> subprocess.Popen:
        nm, om, agent, agent_grpc, env_agent, metrics = (next(self.ports) for _ in range(6))
        self.node_manager_ports[name] = nm
        cmd = [str(RAY), "start", "--node-ip-address=127.0.0.1", "--disable-usage-stats", *extra,
               f"--node-manager-port={nm}", f"--object-manager-port={om}", f"--dashboard-agent-listen-port={agent}",
               f"--dashboard-agent-grpc-port={agent_grpc}", f"--runtime-env-agent-port={env_agent}",
               f"--metrics-export-port={metrics}", f"--object-store-memory={100 * 2**20}"]
        return subprocess.Popen(cmd, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def _wait(self, name: str, proc: subprocess.Popen) -> None:
        out, _ = proc.communicate(timeout=120)
        if proc.returncode != 0:  # the raylets' own errors say why (a port taken, ...)
            errors = [f"{p.name}: {line}" for p in Path(self.temp_dir).glob("session_latest/logs/raylet*.out")
                      for line in p.read_text(errors="replace").splitlines() if " E " in line or " C " in line]
            raise AssertionError(f"ray start ({name}) failed:\n{out[-2000:]}\n" + "\n".join(errors)[-3000:])

    def raylets(self) -> dict[int, str]:
        """{pid: node name} of the nodes' raylets alive now (found once; a killed one drops out)."""
        if not self._raylets:
            for pid in processes_with_env(self.marker):
                try:
                    p = psutil.Process(pid)
                    port = next((a.split("=", 1)[1] for a in p.cmdline() if a.startswith("--node_manager_port=")), None)
                    if p.name() == "raylet" and port:
                        self._raylets[pid] = next(n for n, nm in self.node_manager_ports.items() if str(nm) == port)
                except (psutil.Error, StopIteration):
                    pass
        return {pid: name for pid, name in self._raylets.items() if psutil.pid_exists(pid)}

    def raylet(self, name: str) -> psutil.Process:
        """The raylet process of node `name`."""
        return psutil.Process(next(pid for pid, n in self.raylets().items() if n == name))

    def stop(self) -> int:
        """Stop every process of these nodes: SIGTERM first (Ray's own shutdown), then SIGKILL what is left; how many
        needed SIGKILL."""
        for pid in processes_with_env(self.marker):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.time() + 10
        while processes_with_env(self.marker) and time.time() < deadline:
            time.sleep(0.2)
        left = kill_processes_with_env(self.marker)
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        return left


def _processes(nodes: RayNodes) -> list:
    out = []
    for pid in processes_with_env(nodes.marker):
        try:
            p = psutil.Process(pid)
            out.append((pid, p.ppid(), " ".join(p.cmdline())[:50]))
        except psutil.Error:
            pass
    return out


def _trial_workers_by_node(nodes: RayNodes) -> dict[int, str]:
    """{pid: node name} of the trial actors alive now (a Ray worker is a child of its node's raylet)."""
    raylets = nodes.raylets()
    out = {}
    for pid in processes_with_env(nodes.marker):
        try:
            p = psutil.Process(pid)
            if " ".join(p.cmdline()).startswith(TRIAL_ACTOR_TITLES) and p.ppid() in raylets:
                out[pid] = raylets[p.ppid()]
        except psutil.Error:
            pass
    return out


@pytest.fixture(scope="module")
def assets(tiny_model, tmp_path_factory):
    from trial_worker.inputs.demo import write_task_data

    return {"model": tiny_model, "data": str(write_task_data(tmp_path_factory.mktemp("tasks") / "tasks", n_train=200, n_val=40))}


def test_a_lost_worker_node_its_trials_go_on_on_the_other_node(tmp_path, assets, pg_server):
    db = f"mn_{uuid.uuid4().hex[:10]}"
    pg_server.create_database(db)
    url = f"postgresql+psycopg://{pg_server.user}@127.0.0.1:{pg_server.port}/{db}"  # the password: PGPASSWORD
    shared = tmp_path / "shared"  # stands for an NFS mount at the same path on every node
    spec = small_spec(tmp_path, assets, name="multinode", rungs=RUNGS, num_trials=NUM_TRIALS,
                      output_dir=str(shared / "runs"), budget={"unit": "steps", "min": RUNGS[0], "max": RUNGS[-1],
                                                               "reduction_factor": RUNGS[1] // RUNGS[0]},
                      resources={"gpus_per_trial": 0, "cpus_per_trial": 1, "max_concurrent_trials": 2, "max_failures": 1},
                      params={"learning_rate": {"type": "choice", "values": [0.02, 0.005]}})
    env = sweep_env(tmp_path, PGPASSWORD=pg_server.password)
    t0 = time.perf_counter()
    nodes = RayNodes(env)
    seen: dict[int, str] = {}  # every trial actor seen during the sweep -> its node
    watching = threading.Event()

    def watch():
        while not watching.is_set():
            seen.update(_trial_workers_by_node(nodes))
            time.sleep(0.2)

    watcher = threading.Thread(target=watch, daemon=True)
    run = None
    try:
        nodes.start()
        watcher.start()
        run = LiveCli("run", spec, "--address", nodes.address, "--storage", url, cwd=tmp_path, env=nodes.env)
        # A trial that ASHA let go on past rung 1 (the first to get there always does: no other result to compare
        # with): once its rung checkpoint is in the shared run folder and Tune has taken the report (the terminal's
        # rung line), kill the raylet of the node of *that trial's* actor (the pid of its reports), while it is
        # training (titled `...train`) and the study still has it RUNNING a moment later (not a trial ASHA has just
        # stopped, whose actor may still carry the title), mid-way to rung 2.
        assert run.wait_for(" rung 1/", 240), "no trial reached its first rung:\n" + run.tail()
        study_url = pg_server.url.rsplit("/", 1)[0] + f"/{db}"
        deadline, victim, alive = time.time() + 60, None, {}
        while time.time() < deadline and victim is None:
            time.sleep(0.3)
            for rj in (shared / "runs").rglob("result.json"):
                rows = [json.loads(x) for x in rj.read_text().splitlines() if x.strip()]
                if not rows or not list(rj.parent.glob("checkpoint_*")):
                    continue
                pid = rows[-1]["pid"]
                alive = _trial_workers_by_node(nodes)
                try:
                    training = pid in alive and ".train" in " ".join(psutil.Process(pid).cmdline())
                except psutil.Error:
                    training = False
                running = {t.user_attrs.get("ray_trial_id") for t in optuna.load_study(
                    study_name="multinode", storage=study_url).get_trials(states=[optuna.trial.TrialState.RUNNING])}
                if training and rows[-1]["trial_id"] in running:
                    victim = alive[pid]
                    break
        assert victim, (f"no trial actor training past rung 1 on a worker node: actors {alive}; "
                        f"raylets {nodes.raylets()}; processes {_processes(nodes)}\n" + run.tail())
        raylet = nodes.raylet(victim)
        on_victim = sorted(pid for pid, node in alive.items() if node == victim)
        raylet.send_signal(signal.SIGKILL)  # the node is lost: its raylet, then its workers, go
        killed_at = time.time()
        returncode = run.proc.wait(300)
    finally:
        watching.set()
        if run is not None:
            run.finish(timeout=60)
        left = nodes.stop()
    seconds = time.perf_counter() - t0
    assert returncode == 0, run.tail()
    assert not processes_with_env(nodes.marker), f"Ray processes of the test were left running ({left} needed SIGKILL)"

    # Trials ran on the worker nodes only (never on the head), and after the loss only on the survivor.
    assert set(seen.values()) <= {"worker1", "worker2"} and victim in seen.values(), seen
    survivor = "worker2" if victim == "worker1" else "worker1"

    study = optuna.load_study(study_name="multinode", storage=pg_server.url.rsplit("/", 1)[0] + f"/{db}")
    trials = study.trials
    ray_ids = [t.user_attrs.get("ray_trial_id") for t in trials]
    assert len(trials) == NUM_TRIALS and len(set(ray_ids)) == NUM_TRIALS, ray_ids  # exactly num_trials, no duplicate
    states = {t.number: (t.state.name, t.user_attrs.get("fail_reason")) for t in trials}
    assert {s for s, _ in states.values()} <= {"COMPLETE", "PRUNED"}, states       # none RUNNING, none FAIL
    for t in trials:  # each rung once, at its budget step
        assert sorted(t.intermediate_values) == list(RUNGS[: len(t.intermediate_values)]), t.intermediate_values
    retries = [(t.number, e) for t in trials for e in t.user_attrs.get("retries", [])]
    assert retries, "the study records no retry of the lost node's trials:\n" + run.tail()

    # Tune's record: the trial that had a rung checkpoint went on from it (the first report of its new life is the
    # next rung: iterations_since_restore 1, training_iteration k+1), in an actor on the surviving node.
    resumed = []
    for rj in (shared / "runs").rglob("result.json"):
        for r in (json.loads(x) for x in rj.read_text().splitlines() if x.strip()):
            if r["timestamp"] >= int(killed_at) and r["pid"] not in on_victim:
                assert seen.get(r["pid"]) in (survivor, None), (r["pid"], seen)
            if r["iterations_since_restore"] == 1 and r["training_iteration"] > 1:
                assert r["steps"] == RUNGS[r["training_iteration"] - 1], r
                assert seen.get(r["pid"]) == survivor, (r["pid"], seen)
                resumed.append(r["steps"])
    top = [r for rj in (shared / "runs").rglob("result.json") for r in map(json.loads, filter(None, rj.read_text().splitlines()))
           if r["steps"] == RUNGS[-1]]
    assert top and all(r["pid"] not in on_victim for r in top), (
        f"a trial reached rung 2 on the lost node before the kill: {top}\n" + run.tail())
    assert resumed, "no trial continued from its rung checkpoint:\n" + run.tail()
    # The study says from which checkpoint each retry went on: the rung before the one it reported next.
    assert sorted(e["resumes_from"] for _, e in retries if e["resumes_from"]) == sorted(
        RUNGS[RUNGS.index(s) - 1] for s in resumed), retries
    print(f"lost {victim} ({len(on_victim)} trial actor(s) on it) mid-way to rung 2; {len(resumed)} trial(s) resumed on "
          f"{survivor} at steps {resumed}; {len(retries)} retries recorded; {seconds:.0f} s")
