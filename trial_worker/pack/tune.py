"""Tune's side of packed trials: the choice of mode, the pack servers, and the trainable that relays a trial.

`trial_plan` is what the controller calls: for `resources.packing: off` (or `auto` where packing does not
apply) it is today's one trial per process; otherwise it starts one pack server per GPU (one on the CPU when
there is none) and gives Tune `run_packed_trial`, a trainable that needs almost no resources of its own: it
hands the trial's job to a pack, relays each rung report with its checkpoint to `tune.report`, and leaves the
pack when Tune stops it. Every trial stays one Tune trial (so one Optuna trial and one W&B run); ASHA is
unchanged. Reports carry `pack`, the pack the trial ran in.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any, Callable, Optional

PACK_TRIAL_CPUS = 0.05  # a packed trial's own Tune actor only waits on its pack
# The plans of this driver's runs, by (run name, Ray job): the pack servers' handles must live as long as the run
# (Ray ends an actor once its owner holds no handle to it), and the controller asks for its plan more than once.
_PLANS: dict[tuple, "TrialPlan"] = {}


@dataclass
class TrialPlan:
    """How the sweep's trials run: the Tune trainable (with its resources) and how the base model is evaluated."""

    mode: str  # "packed" | "solo"
    trainable: Callable[[], Any]  # -> the Tune trainable with its resources
    evaluate_base: Callable[[Any], dict]
    packs: list


# `packing: auto` packs on GPUs: on the same 10 trials of the reference space (H100, 2026-12-05,
# benchmarks/results/sweep_makespan.json) a pack trained 2.56M tokens in 150 s (17.0k tokens/s over the sweep's
# wall time) and one trial per process 2.03M tokens in 250 s without finishing (7.9k tokens/s): 2.2x.
AUTO_PACKS = True


def packing_applies(resources: dict, job: dict, gpus_in_cluster: float, search_params: Optional[dict] = None) -> bool:
    """`resources.packing`: on, off, or auto (with `AUTO_PACKS`: on where there are GPUs, a trial fits one GPU,
    the job does not ask to run exactly as written, and a pack trains every trial's settings as written)."""
    from trial_worker.pack import unpackable

    mode = resources.get("packing", "auto")
    if mode in ("on", "off"):
        return mode == "on"
    return (AUTO_PACKS and gpus_in_cluster > 0 and 0 < resources["gpus_per_trial"] <= 1
            and job["training"].get("execution", "auto") != "as_written" and not unpackable(job, search_params))


def trial_plan(job: dict, *, resources: dict, run_dir: str, name: str, search_params: Optional[dict] = None) -> TrialPlan:
    """The sweep's `TrialPlan` (call after `ray.init`): packed or one trial per process, per `resources.packing`
    (`search_params`: the values trials may take, which `packing: auto` checks too).
    The same run asking again (same name, same Ray session) gets the same plan and pack servers."""
    import ray

    key = (name, ray.get_runtime_context().get_job_id())
    if key not in _PLANS:
        _PLANS.clear()  # plans of an earlier Ray session: their packs went with it
        _PLANS[key] = _new_plan(job, resources=resources, run_dir=run_dir, name=name, search_params=search_params)
    return _PLANS[key]


def _new_plan(job: dict, *, resources: dict, run_dir: str, name: str, search_params: Optional[dict] = None) -> TrialPlan:
    import ray
    from ray import tune

    from trial_worker.entry import evaluate_base, trainable

    cpus, gpus = resources["cpus_per_trial"], resources["gpus_per_trial"]
    in_cluster = ray.cluster_resources().get("GPU", 0)
    if not packing_applies(resources, job, in_cluster, search_params):
        def solo_base(j) -> dict:
            return ray.get(ray.remote(evaluate_base).options(num_cpus=cpus, num_gpus=gpus).remote(j))

        def solo():
            return tune.with_resources(trainable(job, run_dir=run_dir), {"cpu": cpus, "gpu": gpus})

        return TrialPlan("solo", solo, solo_base, [])

    from trial_worker.pack.server import PackServer

    actor = ray.remote(PackServer)
    n = max(1, int(in_cluster)) if gpus > 0 else 1
    names = [f"sweep-pack-{name}-{i}" for i in range(n)]
    # The driver owns the packs (they outlive every trial); restarted when killed, empty, with the base reloaded.
    packs = [actor.options(name=nm, num_cpus=cpus, num_gpus=1 if gpus > 0 and in_cluster else 0, max_restarts=-1,
                           max_concurrency=1000, get_if_exists=True).remote(nm) for nm in names]

    def packed_base(j) -> dict:
        return ray.get(packs[0].evaluate_base.remote(j.model_dump(mode="json") if hasattr(j, "model_dump") else j))

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
    as `entry.run_trial`, with the training done by a pack server."""
    import json
    import time
    from pathlib import Path

    from ray import tune

    import trial_worker.entry as entry
    from trial_worker import lifecycle, recipe

    started_at = time.time()  # Tune started this attempt of the trial (`setup_s` in its reports)
    entry.remove_temp_folders()  # what killed workers and packs on this node left behind
    fatal = entry.fatal_path(run_dir)
    vanished = entry._VANISHED_CHECKPOINT.pop("path", None)
    trial = entry.trial_job(config, job, cpus=pack_cpus)
    trial_id = tune.get_context().get_trial_id()
    pack, info = _choose_pack(list(packs))
    pack_name = info["name"]
    note: list[str] = []
    try:
        with entry._resume_point(tune.get_checkpoint(), vanished) as (resume_from, problems):
            if problems:
                then = f"resumed from {Path(resume_from).name}" if resume_from else "restarted from step 0"
                note.append("; ".join(problems) + f"; {then}")
                print(f"sweep: {note[0]}", file=sys.stderr, flush=True)
            writing: dict = {}
            # A full disk, in the pack's checkpoint save or in Tune's copy, stops the sweep as in a solo trial.
            with entry.disk_full_stops(os.path.join(info["output_dir"], trial_id), writing):
                _relay(pack, pack_name, trial_id, trial.model_dump(mode="json"), resume_from, note, writing, started_at)
    except (lifecycle.NonFiniteLoss, recipe.TrialOOM) as e:
        fatal.parent.mkdir(parents=True, exist_ok=True)
        fatal.write_text(json.dumps({"reason": f"{type(e).__name__}: {e}"}))
        raise


def _relay(pack, pack_name: str, trial_id: str, job: dict, resume_from: Optional[str], note: list[str],
           writing: dict, started_at: float) -> None:
    import ray

    from trial_worker import entry, lifecycle, recipe

    ray.get(pack.join.remote(trial_id, job, resume_from, started_at))
    try:
        while True:
            for event in ray.get(pack.poll.remote(trial_id, 5.0)):
                if event["kind"] == "done":
                    return
                if event["kind"] == "error":
                    known = {"NonFiniteLoss": lifecycle.NonFiniteLoss, "TrialOOM": recipe.TrialOOM}
                    if event["type"] in known:
                        raise known[event["type"]](event["message"])
                    raise RuntimeError(f"{event['type']}: {event['message']} (in pack {pack_name})\n"
                                       f"{event.get('traceback', '')}")
                metrics = dict(event["metrics"], pack=event["pack"])
                if note:
                    metrics["checkpoint_note"] = note.pop()
                entry.report_checkpoint(metrics, event["checkpoint"], writing)
                pack.proceed.remote(trial_id)  # Tune has its copy and did not stop the trial: it goes on
    finally:
        pack.leave.remote(trial_id)
