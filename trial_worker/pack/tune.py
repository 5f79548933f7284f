"""Tune's side of packed trials: the pack servers, and the trainable that relays a trial.

`trial_plan` is what the controller calls: where trials do not pack (`trial_worker.pack.trials_pack`, the one
packing decision) it is one trial per process; otherwise it starts one pack server per GPU (one on the CPU when
there is none) and gives Tune `run_packed_trial`, a trainable that needs almost no resources of its own: it
hands the trial's job to a pack, relays each rung report with its checkpoint to `tune.report`, and leaves the
pack when Tune stops it. Every trial stays one Tune trial (so one Optuna trial and one W&B run); ASHA is
unchanged. Reports carry `pack`, the pack the trial ran in.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Optional

PACK_TRIAL_CPUS = 0.05  # a packed trial's own Tune actor only waits on its pack


@dataclass
class TrialPlan:
    """How the sweep's trials run: the Tune trainable (with its resources) and how the base model is evaluated.
    Its holder keeps the pack servers alive (Ray ends an actor once its owner holds no handle to it)."""

    mode: str  # "packed" | "solo"
    trainable: Callable[[], Any]  # -> the Tune trainable with its resources
    evaluate_base: Callable[[Any], dict]
    packs: list


def pack_names(name: str, n: int) -> list[str]:
    """The Ray names of a run's `n` pack servers (`name`: the run's)."""
    return [f"sweep-pack-{name}-{i}" for i in range(n)]


def trial_plan(job: dict, *, resources: dict, run_dir: Optional[str], name: str, search_params: Optional[dict] = None,
               early: Optional[dict] = None) -> TrialPlan:
    """The sweep's `TrialPlan` (call after `ray.init`, once per run): packed or one trial per process, as
    `trial_worker.pack.trials_pack` decides from `resources`, the job, `search_params` (the values trials may
    take) and the cluster's GPUs; the only way a sweep's trials reach a pack. The pack servers are named after
    the run: a plan asked for again in the same Ray session gets the same ones. `early`: the ticket of the pack
    process the controller started before Ray (`pack.early`), which the first pack's actor adopts."""
    import ray
    from ray import tune

    from trial_worker.attempt import evaluate_base, trainable
    from trial_worker.pack import trials_pack

    cpus, gpus = resources["cpus_per_trial"], resources["gpus_per_trial"]
    in_cluster = ray.cluster_resources().get("GPU", 0)
    if not trials_pack(resources, job, search_params, gpus_in_cluster=in_cluster):
        def solo_base(j) -> dict:
            return ray.get(ray.remote(evaluate_base).options(num_cpus=cpus, num_gpus=gpus).remote(j))

        def solo():
            return tune.with_resources(trainable(job, run_dir=run_dir), {"cpu": cpus, "gpu": gpus})

        return TrialPlan("solo", solo, solo_base, [])

    from trial_worker.pack.server import PackServer

    actor = ray.remote(PackServer)
    n = max(1, int(in_cluster)) if gpus > 0 else 1
    names = pack_names(name, n)
    # The driver owns the packs (they outlive every trial); restarted when killed, empty, with the base reloaded.
    packs = [actor.options(name=nm, num_cpus=cpus, num_gpus=1 if gpus > 0 and in_cluster else 0, max_restarts=-1,
                           max_concurrency=1000, get_if_exists=True).remote(nm, None, early if i == 0 else None)
             for i, nm in enumerate(names)]

    def packed_base(j) -> dict:
        return ray.get(packs[0].evaluate_base.remote(j))

    def run_packed(config, job, run_dir=None):
        return run_packed_trial(config, job, run_dir, packs=tuple(names), pack_cpus=cpus)

    run_packed.__name__ = run_packed.__qualname__ = "run_packed_trial"  # Tune's trial names

    def packed():
        return tune.with_resources(trainable(job, run_dir=run_dir, function=run_packed),
                                   {"cpu": PACK_TRIAL_CPUS, "gpu": 0})

    return TrialPlan("packed", packed, packed_base, packs)


def _choose_pack(names: list[str]):
    """(actor, info) of the least busy pack on this trial's node (its checkpoints are handed over as local folders)."""
    import ray

    here = ray.get_runtime_context().get_node_id()
    actors = [ray.get_actor(n) for n in names]
    infos = ray.get([a.info.remote() for a in actors])
    order = sorted(range(len(actors)), key=lambda i: (infos[i]["node"] != here, infos[i]["trials"], i))
    return actors[order[0]], infos[order[0]]


def run_packed_trial(config: dict[str, Any], job: dict, run_dir: Optional[str] = None,
                     packs: tuple = (), pack_cpus: float = 1.0) -> None:
    """Tune function trainable of a packed trial: the same reports, checkpoints, retries and fatal-failure rule
    as `attempt.run_trial`, with the training done by a pack server."""
    import time

    from ray import tune

    from trial_worker.attempt import attempt, remove_temp_folders, trial_job
    from trial_worker.marks import mark, mark_process_start

    started_at = time.time()  # Tune started this attempt of the trial (`setup_s` in its reports)
    mark_process_start("trial: process started")  # when Ray started this actor's process
    mark("trial: started")
    remove_temp_folders()  # what killed workers and packs on this node left behind
    trial = trial_job(config, job, cpus=pack_cpus)
    trial_id = tune.get_context().get_trial_id()
    pack, info = _choose_pack(list(packs))
    # A full disk, in the pack's checkpoint save or in Tune's copy, stops the sweep as in a solo trial.
    with attempt(run_dir, os.path.join(info["output_dir"], trial_id)) as a:
        _relay(pack, info["name"], trial_id, trial, a, started_at)


def _relay(pack, pack_name: str, trial_id: str, job, attempt, started_at: float) -> None:
    """The trial in the pack, from `attempt.resume_from`: each rung the pack reports goes to Tune
    (`attempt.report`), then the pack goes on; its failure is raised here as the trial's."""
    import uuid

    import ray

    from trial_worker import lifecycle, recipe

    # This attempt's token: what an earlier attempt of the trial still sends the pack (its `leave`, delivered
    # late by Ray after a pack restart) cannot drop this one, and a pack that lost it says so at the next poll.
    token = uuid.uuid4().hex
    ray.get(pack.join.remote(trial_id, job, attempt.resume_from, started_at, token))
    try:
        while True:
            for event in ray.get(pack.poll.remote(trial_id, 5.0, token)):
                if event["kind"] == "done":
                    return
                if event["kind"] == "error":
                    known = {"NonFiniteLoss": lifecycle.NonFiniteLoss, "TrialOOM": recipe.TrialOOM}
                    if event["type"] in known:
                        raise known[event["type"]](event["message"])
                    raise RuntimeError(f"{event['type']}: {event['message']} (in pack {pack_name})\n"
                                       f"{event.get('traceback', '')}")
                attempt.report(dict(event["metrics"], pack=event["pack"]), event["checkpoint"])
                pack.proceed.remote(trial_id, token)  # Tune has its copy and did not stop the trial: it goes on
    finally:
        pack.leave.remote(trial_id, token)
