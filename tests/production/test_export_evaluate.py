"""From a study to a model through the CLI: `sweep export` (every format, re-derived schedule),
`sweep train`, `sweep evaluate` (base vs tuned)."""

from __future__ import annotations

import csv
import json
import math

import optuna
import pytest
import yaml
from typer.testing import CliRunner

from sweep.cli import app
from sweep.record.export import export_best
from sweep.spec import load_spec, parse_spec, public_dict

runner = CliRunner()


def _spec_text(tiny_model: str, task_data: str) -> str:
    return f"""
name: prodstudy
model:
  name_or_path: {tiny_model}
  quantization: {{bnb_4bit_compute_dtype: float32}}
  lora: {{r: 4, alpha: 16}}
data: {{path: {task_data}, max_seq_length: 64, validation_split: validation, max_eval_samples: 24}}
training:
  per_device_train_batch_size: 2
  gradient_accumulation_steps: 2
  warmup_ratio: 0.1
  gradient_checkpointing: false
  use_cpu: true
  torch_threads: 2
  logging_steps: 2
  save_steps: 10
  save_total_limit: 1
search:
  params:
    learning_rate: {{type: loguniform, low: 1.0e-4, high: 1.0e-2}}
    lora_r: {{type: choice, values: [4, 8]}}
budget: {{min: 5, max: 20, reduction_factor: 2}}
resources: {{gpus_per_trial: 0, cpus_per_trial: 1}}
"""


@pytest.fixture(scope="module")
def study(tiny_model, task_data):
    spec = parse_spec(_spec_text(tiny_model, task_data), "prodstudy.yaml")
    st = optuna.create_study(study_name="prodstudy", direction="minimize")
    st.set_user_attr("spec", public_dict(spec))
    st.set_user_attr("base_val_loss", 5.7)
    st.set_user_attr("base_ppl", math.exp(5.7))
    dists = {"learning_rate": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True),
             "lora_r": optuna.distributions.CategoricalDistribution([4, 8])}
    for value, lr, r in ((2.0, 1e-4, 4), (1.25, 8e-3, 8)):
        st.add_trial(optuna.trial.create_trial(params={"learning_rate": lr, "lora_r": r}, distributions=dists,
                                               value=value, user_attrs={"ppl_last": math.exp(value), "budget_reached": 20}))
    return st


def test_export_to_a_file_is_the_training_config_as_before(study, tmp_path):
    out = tmp_path / "best.yaml"
    info = export_best(study, out)
    assert info == "trial 1, val_loss 1.2500"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.yaml"]
    spec = load_spec(out)
    assert spec.search is None and spec.budget.rungs == [20]
    assert spec.training.learning_rate == pytest.approx(8e-3) and spec.model.lora.r == 8


def test_export_to_a_folder_writes_every_format_and_they_load(study, tmp_path):
    from peft import LoraConfig
    from transformers import BitsAndBytesConfig
    from trl import SFTConfig

    out = tmp_path / "export"
    info = export_best(study, f"{out}/", steps=200)
    assert "trial 1" in info and "200 steps" in info
    names = {p.name for p in out.iterdir()}
    assert names == {"train.yaml", "sft_config.json", "lora_config.json", "bnb_config.json", "axolotl.yaml", "EXPORT.md"}
    assert "trial 1: val_loss 1.2500" in (out / "EXPORT.md").read_text()
    assert "study 'prodstudy'" in (out / "axolotl.yaml").read_text()

    spec = load_spec(out / "train.yaml")  # sweep's own config validates as a spec
    assert spec.budget.rungs == [200] and spec.budget.unit == "steps"
    sft = SFTConfig(**json.loads((out / "sft_config.json").read_text()))
    assert sft.max_steps == 200 and sft.warmup_steps == 20  # warmup ratio 0.1 kept, re-derived in steps
    assert sft.per_device_train_batch_size * sft.gradient_accumulation_steps == 4  # effective batch kept
    assert sft.learning_rate == pytest.approx(8e-3) and sft.save_steps == 10 and sft.save_total_limit == 1
    lora = LoraConfig(**json.loads((out / "lora_config.json").read_text()))
    assert (lora.r, lora.lora_alpha, lora.task_type) == (8, 16, "CAUSAL_LM")
    assert set(lora.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    bnb = BitsAndBytesConfig.from_dict(json.loads((out / "bnb_config.json").read_text()))
    assert bnb.load_in_4bit and bnb.bnb_4bit_quant_type == "nf4" and bnb.bnb_4bit_use_double_quant
    ax = yaml.safe_load((out / "axolotl.yaml").read_text())
    assert ax["adapter"] == "qlora" and ax["lora_r"] == 8 and ax["max_steps"] == 200
    assert ax["micro_batch_size"] * ax["gradient_accumulation_steps"] == 4 and ax["warmup_ratio"] == 0.1
    assert ax["datasets"][0]["type"] == "chat_template"


def test_export_to_a_path_without_a_suffix_is_a_folder(study, tmp_path):
    out = tmp_path / "export"  # `sweep export NAME -o export`: no suffix, no slash
    export_best(study, str(out))
    assert out.is_dir() and {"train.yaml", "sft_config.json", "EXPORT.md"} <= {p.name for p in out.iterdir()}
    assert load_spec(out / "train.yaml").budget.rungs == [20]
    from sweep.record.export import ExportError

    with pytest.raises(ExportError, match=r"-o .*best\.json: the training config is YAML: give a file ending in \.yaml"):
        export_best(study, str(tmp_path / "best.json"))
    assert not (tmp_path / "best.json").exists()


def test_export_epochs_counts_the_train_split(study, tmp_path):
    out = tmp_path / "e.yaml"
    export_best(study, out, epochs=2)
    # 160 train rows, effective batch 4: 2 epochs = 80 steps
    assert load_spec(out).budget.rungs == [80]
    with pytest.raises(Exception, match="not both"):
        export_best(study, tmp_path / "x.yaml", steps=3, epochs=1)


def test_export_train_evaluate_through_the_cli(study, tmp_path):
    exp = tmp_path / "export"
    export_best(study, f"{exp}/", steps=30)
    run_dir = tmp_path / "run"
    r = runner.invoke(app, ["train", str(exp / "train.yaml"), "-o", str(run_dir)])
    assert r.exit_code == 0, r.output
    assert "adapter" in r.output and (run_dir / "adapter" / "adapter_model.safetensors").exists()
    assert [p.name for p in run_dir.glob("checkpoint-*")] == ["checkpoint-30"]  # save_total_limit 1

    r = runner.invoke(app, ["evaluate", str(run_dir), "--prompts", "10", "--max-new-tokens", "8"])
    assert r.exit_code == 0, r.output
    rows = list(csv.DictReader(open(run_dir / "evaluation.csv")))
    assert len(rows) == 10 and all(row["reference"] for row in rows)
    assert {"base_exact", "tuned_exact", "base_f1", "tuned_f1", "base_grade_0_5", "tuned_grade_0_5"} <= set(rows[0])
    md = (run_dir / "evaluation.md").read_text()
    table = {line.split("|")[1].strip(): line.split("|") for line in md.splitlines() if line.startswith(("| base |", "| tuned |"))}
    base_ppl, tuned_ppl = float(table["base"][3]), float(table["tuned"][3])
    print(f"base ppl {base_ppl}, tuned ppl {tuned_ppl}")
    assert tuned_ppl < 0.5 * base_ppl  # trained on the task: much lower perplexity on its held-out split

    r = runner.invoke(app, ["train", str(exp / "train.yaml"), "-o", str(run_dir)])
    assert r.exit_code == 2 and "--resume" in r.output
