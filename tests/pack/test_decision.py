"""Whether trials pack: one decision (`trial_worker.pack.trials_pack`), asked by `sweep validate` and by the
trial plan, the only way a sweep's trials reach a pack. A setting a pack would not train as written is refused
by name before anything runs (`packing: on`), or runs one trial per process (`packing: auto`)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from trial_worker.pack import PackingRefused, trials_pack

ROOT = Path(__file__).resolve().parents[2]
SPEC = {
    "name": "t", "model": {"name_or_path": "some/model"}, "data": {"path": "some/data"},
    "budget": {"min": 10, "max": 40, "reduction_factor": 2},
    "search": {"params": {"learning_rate": {"type": "loguniform", "low": 1.0e-5, "high": 1.0e-3}}},
}
# A setting in the job, or values a search may give a trial: (change, the field named, the value named)
NOT_AS_WRITTEN = [
    ({"model": {"lora": {"bias": "all"}}}, "model.lora.bias", "= 'all'"),
    ({"data": {"packing": True}}, "data.packing", "= true"),
    ({"model": {"lora": {"target_modules": ["q_proj", "lm_head"]}}}, "model.lora.target_modules", "lm_head is not a decoder layer"),
    ({"model": {"lora": {"target_modules": ["model.embed_tokens", "v_proj"]}}}, "model.lora.target_modules",
     "model.embed_tokens is not a decoder layer"),
    ({"search": {"params": {"packing": {"type": "choice", "values": [False, True]}}}}, "search.params.packing", "= true"),
    ({"search": {"params": {"group_by_length": {"type": "choice", "values": [True]}}}}, "search.params.group_by_length", "= true"),
]


def _spec(tmp_path, change: dict, packing: str) -> Path:
    data = yaml.safe_load(yaml.safe_dump(SPEC))
    for section, values in change.items():
        for k, v in values.items():
            data[section][k] = {**data[section].get(k, {}), **v} if isinstance(v, dict) else v
    data["resources"] = {"packing": packing}
    f = tmp_path / f"{packing}.yaml"
    f.write_text(yaml.safe_dump(data))
    return f


def _validate(f: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sweep.cli", "validate", str(f)], capture_output=True, text=True, cwd=ROOT)


@pytest.mark.parametrize("change, field, value", NOT_AS_WRITTEN, ids=[c[1] for c in NOT_AS_WRITTEN])
def test_a_setting_a_pack_would_not_train_as_written_is_refused_by_name(tmp_path, change, field, value):
    # packing on: `sweep validate` (and so `sweep run`) refuses it, naming the file, the field, the value, the way out
    r = _validate(_spec(tmp_path, change, "on"))
    out = r.stdout + r.stderr
    assert r.returncode == 2, out
    assert "on.yaml" in out and field in out and value in out and "set resources.packing: off" in out, out
    assert "Traceback" not in out
    # packing auto: the spec is fine, and the plan's decision is one trial per process even on a GPU cluster
    f = _spec(tmp_path, change, "auto")
    r = _validate(f)
    assert r.returncode == 0 and f"trials: one trial per process (packing auto: {field} = " in r.stdout, r.stdout
    from sweep.spec import load_spec

    spec = load_spec(f)
    assert not trials_pack(spec.resources.model_dump(), spec.job().model_dump(mode="json"), spec.search_params(),
                           gpus_in_cluster=1)


def _decide(packing="auto", gpus_per_trial=1.0, gpus=None, execution="auto", **job) -> bool:
    return trials_pack({"packing": packing, "gpus_per_trial": gpus_per_trial},
                       {"training": {"execution": execution}, "data": {"packing": False}, **job}, None, gpus)


def test_auto_packs_on_gpus_where_a_trial_fits_one_and_may_run_its_own_way():
    assert _decide(gpus=8) and _decide(gpus_per_trial=0.5, gpus=1)
    assert _decide(gpus=None)  # sweep validate: the cluster not known, answered as on GPUs
    assert not _decide(gpus=0)  # a CPU-only cluster
    assert not _decide(gpus_per_trial=2, gpus=8)
    assert not _decide(execution="as_written", gpus=8)
    assert _decide("on", gpus_per_trial=0, gpus=0) and not _decide("off", gpus=8)


def test_on_refuses_every_problem_at_once():
    with pytest.raises(PackingRefused) as e:
        _decide("on", gpus_per_trial=2, gpus=8, model={"lora": {"bias": "all"}})
    assert [p[0] for p in e.value.problems] == ["model.lora.bias", "resources.gpus_per_trial"]


def test_the_plan_asks_the_same_decision(monkeypatch):
    # a search that may give a trial TRL's sequence packing, on a GPU cluster: the plan runs one trial per process
    ray = pytest.importorskip("ray")
    from trial_worker.pack.tune import trial_plan

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"GPU": 1.0, "CPU": 8.0})
    job = {"training": {"execution": "auto"}, "data": {"packing": False}}
    resources = {"packing": "auto", "gpus_per_trial": 1, "cpus_per_trial": 1}
    plan = trial_plan(job, resources=resources, run_dir=None, name="t",
                      search_params={"packing": {"type": "choice", "values": [False, True]}})
    assert plan.mode == "solo" and plan.packs == []
    with pytest.raises(PackingRefused, match="search.params.packing"):
        trial_plan(job, resources={**resources, "packing": "on"}, run_dir=None, name="t",
                   search_params={"packing": {"type": "choice", "values": [False, True]}})


@pytest.mark.parametrize("config", [{"model_type": "gemma2", "final_logit_softcapping": 30.0},
                                    {"model_type": "gemma3", "text_config": {"final_logit_softcapping": 30.0}},
                                    {"model_type": "cohere", "logit_scale": 0.0625}])
def test_a_model_whose_logits_the_pack_would_not_compute_runs_one_trial_per_process(tmp_path, config):
    """A logit softcap or scale in the model's config.json (Gemma 2/3, Cohere): the pack's loss is a plain
    hidden @ W^T, so `auto` runs one trial per process and `on` is refused naming the model and the setting,
    read before anything loads (it had failed every trial at the pack's build)."""
    import json

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(config))
    assert not _decide(gpus=8, model={"name_or_path": str(model)})
    with pytest.raises(PackingRefused) as e:
        _decide("on", gpus=8, model={"name_or_path": str(model)})
    [(field, value, why)] = e.value.problems
    key = next(k for k in ("final_logit_softcapping", "logit_scale") if k in json.dumps(config))
    assert field == "model.name_or_path" and value == str(model) and f"sets {key}=" in why, why
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "config.json").write_text(json.dumps({"model_type": "llama", "logit_scale": 1.0}))
    assert _decide(gpus=8, model={"name_or_path": str(plain)})


def test_validate_says_how_the_trials_will_run(tmp_path):
    """`sweep validate` says whether the trials pack, and why not where `auto` runs one per process."""
    said = {packing: _validate(_spec(tmp_path, {}, packing)).stdout for packing in ("auto", "on", "off")}
    assert "trials: packed on GPUs (resources.packing: auto)" in said["auto"], said
    assert "trials: packed (resources.packing: on)" in said["on"] and "trials: one trial per process (resources.packing: off)" in said["off"]
    f = _spec(tmp_path, {}, "auto")
    d = yaml.safe_load(f.read_text())
    d["resources"]["gpus_per_trial"] = 0
    d["training"] = {"use_cpu": True}
    f.write_text(yaml.safe_dump(d))
    assert "trials: one trial per process (packing auto: resources.gpus_per_trial is 0, and auto packs on GPUs)" in _validate(f).stdout
