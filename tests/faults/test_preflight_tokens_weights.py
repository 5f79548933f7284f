"""Input that used to fail only after the study was created (#20 item 4): rows whose every response token falls
beyond `data.max_seq_length`, and a model folder whose weights are damaged (a safetensors file cut short at a
random point, seeded; an index naming a shard that is not there). `sweep validate` and `sweep run` refuse them
with exit 2 and one message naming the file or field, before anything is created: no study database, no
registry entry, no run folder, no Ray or torch imported. Rows dropped for length are a warning with the count;
the counts are the worker's own (the model's tokenizer through transformers gives the same tokens)."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import yaml

from sweep_helpers import small_spec, sweep_cli, sweep_env, write_tiny_family


def _spec(tmp_path: Path, assets: dict, name: str, **data) -> Path:
    spec = small_spec(tmp_path, assets, name=name, params={"learning_rate": {"type": "choice", "values": [0.01]}})
    d = yaml.safe_load(spec.read_text())
    d["data"].update(data)
    spec.write_text(yaml.safe_dump(d, sort_keys=False))
    return spec


def _nothing_created(tmp_path: Path, name: str, r) -> None:
    assert not (tmp_path / f"{name}.db").exists() and not (tmp_path / "runs").exists(), r.stderr
    assert not (tmp_path / "home" / "studies.json").exists() or name not in (tmp_path / "home" / "studies.json").read_text()
    assert "Traceback" not in r.stderr and "HEAVY_IMPORTED=\n" in r.stderr + "\n", r.stderr


@pytest.mark.parametrize("seed", [1, 2])
def test_damaged_weights_are_refused_naming_the_file(tmp_path, assets, fault_row, seed):
    model = tmp_path / "model"
    shutil.copytree(assets["model"], model)
    weights = model / "model.safetensors"
    size = weights.stat().st_size
    cut = random.Random(seed).randrange(1, size - 1)  # anywhere: in the length, the header or the tensors
    with open(weights, "r+b") as f:
        f.truncate(cut)
    spec = _spec(tmp_path, dict(assets, model=str(model)), "damaged")
    env = sweep_env(tmp_path)
    for command in ("validate", "run"):
        r = sweep_cli(command, spec, cwd=tmp_path, env=env, probe_imports=True)
        assert r.returncode == 2, (r.stdout, r.stderr)
        assert f"model.name_or_path = '{model}': the weights file {weights} " in r.stderr, r.stderr
        _nothing_created(tmp_path, "damaged", r)
    # A sharded checkpoint whose index names a shard that is not there.
    weights.unlink()
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}}))
    r = sweep_cli("run", spec, cwd=tmp_path, env=env, probe_imports=True)
    assert r.returncode == 2 and "names 1 shard file(s) that are not in the folder: model-00002-of-00002.safetensors" in r.stderr, r.stderr
    _nothing_created(tmp_path, "damaged", r)
    fault_row(fault="damaged model weights", injected=f"seed {seed}: model.safetensors cut at byte {cut} of {size}; then an "
                                                      "index naming a missing shard; `sweep validate` and `sweep run`",
              lost="nothing started: exit 2 naming the file, no study, no registry entry, no run folder, no Ray/torch import")


def test_rows_with_no_response_token_within_max_seq_length(tmp_path, assets, fault_row):
    from sweep.spec import load_spec
    from trial_worker.inputs.check import FolderTokenizer, check_job
    from trial_worker.data import tokenize_chat
    from trial_worker.model import load_tokenizer

    env = sweep_env(tmp_path)
    spec = _spec(tmp_path, assets, "short", max_seq_length=16)  # every prompt of the demo tasks is longer
    r = sweep_cli("run", spec, cwd=tmp_path, env=env, probe_imports=True)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "data.max_seq_length = 16: 200 of 200 train rows keep no response token within data.max_seq_length = 16" in r.stderr
    assert "nothing is left to train on: raise data.max_seq_length" in r.stderr, r.stderr
    _nothing_created(tmp_path, "short", r)

    # Some rows dropped: a warning with the count, and the count is what the worker's own tokenizer gives.
    job = load_spec(_spec(tmp_path, assets, "some", max_seq_length=40)).job()
    found = check_job(job, hub=False)
    assert not found.problems, found.problems
    [train_warning] = [w for w in found.warnings if w.field == "data.max_seq_length" and "train rows" in w.message]
    shown = int(train_warning.message.split(" of ")[0])
    rows = [json.loads(x) for x in Path(assets["data"], "train.jsonl").read_text().splitlines()]
    real = load_tokenizer(job.model)
    light = FolderTokenizer(Path(assets["model"]))
    assert all(tokenize_chat(real, r["messages"]) == tokenize_chat(light, r["messages"]) for r in rows[:50])
    truth = sum(not any(tokenize_chat(real, r["messages"])["completion_mask"][:40]) for r in rows)
    assert 0 < shown == truth < len(rows), (shown, truth)
    fault_row(fault="rows with no response token within max_seq_length",
              injected="max_seq_length 16 (every prompt is longer), then 40 (some are)",
              lost=f"nothing started at 16: exit 2 naming data.max_seq_length, no study; at 40 a warning: {shown} of "
                   f"{len(rows)} train rows dropped, the count transformers' tokenizer gives")


def test_lora_target_modules_the_model_does_not_have_are_named_with_the_layers_it_has(tmp_path, assets):
    """A model whose layers are not Llama's: `target_modules` naming none of them is refused before anything starts
    (every trial would fail in PEFT), naming the layers the checkpoint has; naming some of them is a warning that
    says which ones LoRA will train. Read from the safetensors headers, without torch."""
    from sweep.spec import load_spec
    from trial_worker.inputs.check import check_job

    model = Path(write_tiny_family("phi3", assets["model"], tmp_path / "phi3"))
    env = sweep_env(tmp_path)
    spec = _spec(tmp_path, dict(assets, model=str(model)), "fused")
    d = yaml.safe_load(spec.read_text())
    d["model"]["lora"] = {**d["model"].get("lora", {}), "target_modules": ["q_proj", "k_proj", "v_proj"]}
    spec.write_text(yaml.safe_dump(d, sort_keys=False))
    for command in ("validate", "run"):
        r = sweep_cli(command, spec, cwd=tmp_path, env=env, probe_imports=True)
        assert r.returncode == 2, (r.stdout, r.stderr)
        assert f'model.lora.target_modules = ["q_proj", "k_proj", "v_proj"]: names none of the layers of the model {model}: ' in r.stderr, r.stderr
        assert "its decoder's layers are down_proj, gate_up_proj, o_proj, qkv_proj" in r.stderr, r.stderr
        _nothing_created(tmp_path, "fused", r)

    def found(targets):
        d["model"]["lora"]["target_modules"] = targets
        spec.write_text(yaml.safe_dump(d, sort_keys=False))
        return check_job(load_spec(spec).job(), hub=False)

    default = found(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    assert not default.problems, default.problems
    [w] = [w for w in default.warnings if w.field == "model.lora.target_modules"]
    assert "(the default: Llama's layer names) q_proj, k_proj, v_proj, gate_proj, up_proj name no layer" in w.message
    assert "so LoRA trains o_proj, down_proj only" in w.message, w.message
    for fine in (["qkv_proj", "o_proj"], ["self_attn.qkv_proj"], "all-linear"):
        ok = found(fine)
        assert not ok.problems and not [w for w in ok.warnings if w.field == "model.lora.target_modules"], (fine, ok)
    # the tiny Llama: its own names are all there (no finding), the fused ones are not
    d["model"]["name_or_path"] = assets["model"]
    assert not [f for f in found(["q_proj", "down_proj"]).warnings if f.field == "model.lora.target_modules"]
    assert [f.field for f in found(["qkv_proj"]).problems] == ["model.lora.target_modules"]


def test_a_searched_max_seq_length_that_keeps_no_row_is_refused_before_anything_starts(tmp_path, assets):
    """A search over `max_seq_length` down to a length every prompt fills: those trials would fail (solo or packed),
    so `sweep validate` / `sweep run` refuse it by the search field and value; the lengths that keep rows pass."""
    env = sweep_env(tmp_path)
    spec = _spec(tmp_path, assets, "searched")
    d = yaml.safe_load(spec.read_text())
    d["search"]["params"]["max_seq_length"] = {"type": "choice", "values": [16, 64]}
    spec.write_text(yaml.safe_dump(d, sort_keys=False))
    for command in ("validate", "run"):
        r = sweep_cli(command, spec, cwd=tmp_path, env=env, probe_imports=True)
        assert r.returncode == 2, (r.stdout, r.stderr)
        assert "search.params.max_seq_length = 16: a trial given max_seq_length 16 keeps no train row" in r.stderr, r.stderr
        assert "= 64" not in r.stderr
        _nothing_created(tmp_path, "searched", r)
    d["search"]["params"]["max_seq_length"] = {"type": "choice", "values": [48, 64]}
    spec.write_text(yaml.safe_dump(d, sort_keys=False))
    r = sweep_cli("validate", spec, cwd=tmp_path, env=env)
    assert r.returncode == 0 and "max_seq_length" not in r.stderr, r.stderr
