"""The spec: every shipped YAML validates; each rule rejects bad input naming the field."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from sweep.spec import SpecError, load_spec, parse_spec

ROOT = Path(__file__).resolve().parents[2]
SPECS = sorted((ROOT / "search_spaces").glob("*.yaml"))

BASE = """
name: t
model: {name_or_path: some/model}
data: {path: some/data}
budget: {min: 10, max: 40, reduction_factor: 2}
search:
  params:
    learning_rate: {type: loguniform, low: 1.0e-5, high: 1.0e-3}
"""


def spec_with(extra: str = "", base: str = BASE):
    import yaml

    data = yaml.safe_load(base)
    for k, v in (yaml.safe_load(textwrap.dedent(extra)) or {}).items():
        if isinstance(v, dict) and isinstance(data.get(k), dict):
            data[k].update(v)
        else:
            data[k] = v
    return parse_spec(yaml.safe_dump(data), "t.yaml")


@pytest.mark.parametrize("path", SPECS, ids=[p.name for p in SPECS])
def test_every_shipped_spec_validates(path):
    spec = load_spec(path)
    assert spec.budget.rungs[-1] == spec.budget.max
    assert path.read_text().startswith("# sweep "), "every YAML opens with the command that runs it"


def test_reference_spec_is_the_documented_search():
    spec = load_spec(ROOT / "search_spaces" / "llama32_1b.yaml")
    assert spec.budget.rungs == [30, 60, 120]
    p = spec.search.params
    assert p["learning_rate"].values == [1e-4, 2e-4, 3e-4, 5e-4]
    assert p["lr_scheduler_type"].values == ["linear", "cosine", "constant"]
    assert p["per_device_train_batch_size"].values == [1, 2, 4]
    assert p["gradient_accumulation_steps"].values == [2, 4, 8]
    assert spec.model.quantization.bnb_4bit_quant_type == "nf4" and spec.model.quantization.bnb_4bit_use_double_quant
    assert spec.model.lora.r == 16 and spec.model.lora.alpha == 16 and spec.model.lora.dropout == 0
    assert spec.resources.gpus_per_trial == 1


def test_rungs_follow_the_ladder():
    s = spec_with("budget: {min: 30, max: 120, reduction_factor: 2}")
    assert s.budget.rungs == [30, 60, 120]
    s = spec_with("budget: {min: 10, max: 100, reduction_factor: 3}")
    assert s.budget.rungs == [10, 30, 90, 100]


@pytest.mark.parametrize(
    "extra, field, words",
    [
        ("budget: {min: 50, max: 10}", "budget", "greater than max"),
        ("budget: {reduction_factor: 1}", "budget.reduction_factor", "greater than or equal to 2"),
        ("training: {learning_rate: -1}", "training.learning_rate", "greater than 0"),
        ("training: {lr_scheduler_type: cosinus}", "training.lr_scheduler_type", "'cosine'"),
        ("training: {optim: adam}", "training.optim", "paged_adamw_8bit"),
        ("training: {bf16: true, fp16: true}", "training", "choose one"),
        ("training: {lerning_rate: 1.0e-4}", "training.lerning_rate", "did you mean 'learning_rate'"),
        ("model: {name_or_path: m, quantization: {bnb_4bit_quant_type: nf5}}", "model.quantization.bnb_4bit_quant_type", "'nf4' or 'fp4'"),
        ("data: {path: d, validation_split: validation, validation_fraction: 0.1}", "data", "not both"),
        ("search: {params: {learning_rate: {type: loguniform, low: 0, high: 1}}}", "search.params.learning_rate.low", "log-scale range needs low > 0"),
        ("search: {params: {learning_rate: {type: uniform, low: 0.1, high: 0.01}}}", "search.params.learning_rate.low", "greater than high"),
        ("search: {params: {learning_rat: {type: choice, values: [1]}}}", "search.params.learning_rat", "did you mean 'learning_rate'"),
        ("search: {params: {lr_scheduler_type: {type: choice, values: [linear, coz]}}}", "search.params.lr_scheduler_type", "'coz' is not allowed"),
        ("search: {params: {per_device_train_batch_size: {type: choice, values: [0, 2]}}}", "search.params.per_device_train_batch_size", "greater than 0"),
        ("search: {params: {learning_rate: {type: normal}}}", "search.params.learning_rate", "choice, uniform, loguniform, int"),
        ("search: {sampler: grid, params: {learning_rate: {type: loguniform, low: 1.0e-5, high: 1.0e-3}}}", "search.sampler", "grid search needs"),
        ("search: {sampler: annealing, params: {learning_rate: {type: choice, values: [1]}}}", "search.sampler", "'tpe', 'random' or 'grid'"),
        ("storage: 'http://x'", "storage", "SQLAlchemy URL"),
        ("resources: {gpus_per_trial: 1.5}", "resources.gpus_per_trial", "whole number"),
        # settings a pack would not train as written, with packed trials asked for
        ("resources: {packing: 'on'}\ndata: {path: d, packing: true}", "data.packing", "TRL's sequence packing"),
        ("resources: {packing: 'on'}\nmodel: {name_or_path: m, lora: {bias: all}}", "model.lora.bias", "not the base's biases"),
        ("resources: {packing: 'on'}\ntraining: {fp16: true, bf16: false}\nmodel: {name_or_path: m, quantization: "
         "{bnb_4bit_compute_dtype: float16}}", "training.fp16", "without fp16 loss scaling"),
        ("resources: {packing: 'on'}\nsearch: {params: {packing: {type: choice, values: [false, true]}}}",
         "search.params.packing", "resources.packing: off"),
        ("resources: {packing: 'on', gpus_per_trial: 2}", "resources.gpus_per_trial", "a pack trains on one GPU"),
    ],
)
def test_each_rule_names_the_field(extra, field, words):
    with pytest.raises(SpecError, match=None) as exc:
        spec_with(extra)
    msg = str(exc.value)
    assert f" {field}" in msg, msg
    assert words in msg, msg


def test_packs_take_every_setting_they_train_as_written():
    spec_with("resources: {packing: 'on'}\ndata: {path: d, packing: false}\nmodel: {name_or_path: m, lora: {bias: none}}")
    spec_with("resources: {packing: 'off', gpus_per_trial: 2}\ndata: {path: d, packing: true}")  # one trial per process


def test_every_problem_is_reported_at_once(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text(BASE.replace("some/model}", "some/model, lora: {r: 0}}") + "training: {learning_rate: -1, optim: adam}\n")
    with pytest.raises(SpecError) as exc:
        load_spec(f)
    msg = str(exc.value)
    assert "found 3 problems" in msg
    for field in ("model.lora.r", "training.learning_rate", "training.optim"):
        assert field in msg
    assert str(f) in msg and ":3:" in msg  # file and line


@pytest.mark.parametrize(
    "text, words",
    [("", "empty"), ("- a\n- b\n", "mapping"), ("a: [\n", "not valid YAML"),
     ("model: !!python/object/apply:os.system ['echo pwned']\n", "no !!python tags")],
)
def test_unreadable_files_get_one_clear_message(tmp_path, text, words):
    f = tmp_path / "x.yaml"
    f.write_text(text)
    with pytest.raises(SpecError, match=words):
        load_spec(f)


def _cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "sweep.cli", *args], capture_output=True, text=True, cwd=cwd)


def test_validate_cli_exit_codes_and_no_traceback(tmp_path):
    ok = _cli("validate", *map(str, SPECS))
    assert ok.returncode == 0, ok.stderr
    assert "ok" in ok.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {name_or_path: m}\ndata: {path: d}\nbudget: {min: 5, max: 1}\n")
    r = _cli("validate", str(bad))
    assert r.returncode == 2
    assert "budget" in r.stderr and "Traceback" not in r.stderr


HEAVY = ("torch", "transformers", "ray", "peft", "trl", "bitsandbytes", "optuna")


def test_import_sweep_and_validate_load_nothing_heavy():
    code = (
        "import sys, sweep, sweep.cli, sweep.spec\n"
        "from sweep.spec import load_spec\n"
        f"load_spec({str(SPECS[0])!r})\n"
        f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "", f"heavy modules imported: {r.stdout}"


def test_help_loads_nothing_heavy():
    code = (
        "import sys\nfrom sweep.cli import app\n"
        "try:\n    app(['--help'])\nexcept SystemExit:\n    pass\n"
        f"print('HEAVY=' + ','.join(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert "validate" in r.stdout and "run" in r.stdout
    assert "HEAVY=\n" in r.stdout + "\n" and "HEAVY=," not in r.stdout, r.stdout
    assert r.stdout.strip().endswith("HEAVY="), r.stdout


def test_validate_reports_field_and_cross_field_problems_at_once():
    with pytest.raises(SpecError) as e:
        spec_with("training: {learning_rate: -1}\n"
                  "search: {params: {lora_r: {type: int, low: 64, high: 8}, learning_rate: {type: loguniform, low: 0, high: 1}}}")
    paths = [p.path for p in e.value.problems]
    assert sorted(paths) == ["search.params.learning_rate.low", "search.params.lora_r.low", "training.learning_rate"], str(e.value)
    assert "greater than 0" in str(e.value) and "low (64) is greater than high (8)" in str(e.value)
    assert "log-scale range needs low > 0" in str(e.value)


def test_one_path_resolver_for_specs_and_generated_assets(tmp_path, monkeypatch):
    from trial_worker.config import resolve_path

    (tmp_path / "data").mkdir()
    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve_path("data", tmp_path) == str(tmp_path / "data")                 # exists under the spec's folder
    assert resolve_path("./nope", tmp_path) == str(tmp_path / "nope")               # ./ is always local
    assert resolve_path("~/data", tmp_path / "elsewhere") == str(tmp_path / "data")  # ~ is the home folder
    assert resolve_path("org/model", tmp_path) == "org/model"                        # a hub id stays
    assert resolve_path("org/model", tmp_path, generated=True) == str(tmp_path / "org" / "model")
    assert resolve_path("hf://datasets/x/y", tmp_path) == "hf://datasets/x/y"


def test_job_operations_live_on_the_job():
    from trial_worker.config import JobConfig

    spec = spec_with("budget: {min: 10, max: 100, reduction_factor: 3}")
    job = JobConfig.of(spec.model_dump())
    assert type(job) is JobConfig and job == spec.job()
    assert job.budget.rungs == [10, 30, 90, 100]
    top = job.at_top_rung()
    assert top.budget.rungs == [100] and top.training == job.training
    assert job.for_steps(7).budget.model_dump() == {"unit": "steps", "min": 7, "max": 7, "reduction_factor": 3}
