"""Bad specs (#6 item 8): through the real CLI, one clear message, no traceback, nothing started or written.

Each case is a file a person could write. `sweep validate` and `sweep run` must exit non-zero
with a message naming the file, the field path, the value and what is allowed; `sweep run`
must not import Ray or torch (nothing started) and must leave an existing study untouched.
The loader is also fuzzed with hypothesis: any text gives a SweepSpec or a SpecError.
"""

from __future__ import annotations

import hashlib
import time

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sweep_helpers import sweep_cli, sweep_env
from sweep.spec import SpecError, SweepSpec, parse_spec

BASE = {
    "name": "bad",
    "model": {"name_or_path": "some/model"},
    "data": {"path": "some/data"},
    "budget": {"min": 10, "max": 40, "reduction_factor": 2},
    "training": {"use_cpu": True},
    "resources": {"gpus_per_trial": 0},
    "search": {"params": {"learning_rate": {"type": "loguniform", "low": 1.0e-5, "high": 1.0e-3}}},
}


def _with(section: str, key: str, value) -> str:
    d = yaml.safe_load(yaml.safe_dump(BASE))
    if section == "":
        d[key] = value
    else:
        node = d
        for part in section.split("."):
            node = node.setdefault(part, {})
        node[key] = value
    return yaml.safe_dump(d, sort_keys=False)


LR = "search.params.learning_rate"
# id -> (file text, field path in the message, words in the message: value and what is allowed)
CASES = {
    "unknown_field": (_with("training", "lerning_rate", 1e-4), "training.lerning_rate", ["did you mean 'learning_rate'", "Allowed:"]),
    "unknown_section": (_with("", "serch", {}), "serch", ["unknown field", "did you mean 'search'"]),
    "wrong_type": (_with("training", "per_device_train_batch_size", "four"), "training.per_device_train_batch_size", ["'four'", "integer"]),
    "low_gt_high": (_with("search.params", "learning_rate", {"type": "uniform", "low": 0.1, "high": 0.01}), LR + ".low", ["0.1", "need low <= high"]),
    "log_nonpositive": (_with("search.params", "learning_rate", {"type": "loguniform", "low": 0, "high": 1e-3}), LR + ".low", ["= 0", "log-scale range needs low > 0"]),
    "log_int_nonpositive": (_with("search.params", "lora_r", {"type": "int", "low": 0, "high": 8, "log": True}), "search.params.lora_r.low", ["log-scale range needs low > 0"]),
    "reduction_factor_1": (_with("budget", "reduction_factor", 1), "budget.reduction_factor", ["= 1", "greater than or equal to 2"]),
    "budget_min_gt_max": (_with("budget", "min", 80), "budget", ["min (80) is greater than max (40)"]),
    "unknown_scheduler": (_with("training", "lr_scheduler_type", "cosinus"), "training.lr_scheduler_type", ["'cosinus'", "'cosine'"]),
    "unknown_optimizer": (_with("training", "optim", "adam"), "training.optim", ["'adam'", "'adamw_torch'"]),
    "unknown_sampler": (_with("search", "sampler", "bayes"), "search.sampler", ["'bayes'", "'tpe'"]),
    "unknown_param_type": (_with("search.params", "learning_rate", {"type": "normal", "low": 0, "high": 1}), LR, ["type:", "choice, uniform, loguniform, int"]),
    "python_object_tag": ("!!python/object/apply:os.system ['touch PWNED']\n", "<top>", ["not valid YAML", "no !!python tags"]),
    "python_tag_in_field": (_with("", "name", "x").replace("name: x", "name: !!python/name:os.system ''"), "<top>", ["no !!python tags"]),
    "empty_file": ("", "<top>", ["the file is empty"]),
    "only_comments": ("# nothing here\n", "<top>", ["the file is empty"]),
    "top_level_list": ("- a\n- b\n", "<top>", ["must be a mapping"]),
    "not_yaml": ("model: {name_or_path: [\n", "<top>", ["not valid YAML"]),
    "huge_int_budget": (_with("budget", "max", 10**30), "budget.max", ["1000000000000000000000000000000", "less than or equal to 1000000000"]),
    "huge_float_budget": (_with("budget", "max", 1e300), "budget.max", ["integer"]),
    "inf_budget": (_with("budget", "max", float("inf")), "budget.max", ["finite"]),
    "huge_lr_bound": (_with("search.params", "learning_rate", {"type": "loguniform", "low": 1e-5, "high": 1e300}), LR, ["1e+300", "less than or equal to 10"]),
    "nan_bound": (_with("search.params", "learning_rate", {"type": "uniform", "low": 1e-5, "high": float("nan")}), LR + ".high", ["NaN", "finite number"]),
    "huge_lora_alpha": (_with("model", "lora", {"alpha": 1e300}), "model.lora.alpha", ["less than or equal to"]),
    "inf_max_grad_norm": (_with("training", "max_grad_norm", float("inf")), "training.max_grad_norm", ["finite number"]),
    "huge_int_step": (_with("search.params", "lora_r", {"type": "int", "low": 1, "high": 8, "step": 10**23}), "search.params.lora_r.step", ["less than or equal to"]),
    "huge_num_trials": (_with("search", "num_trials", 10**12), "search.num_trials", ["less than or equal to 100000"]),
    "bad_storage_url": (_with("", "storage", "postgres-ish://u:hunter2@db/x"), "<top>", ["SQLAlchemy URL", "***"]),
}


def _check_message(err: str, file: str, path: str, words: list[str]) -> None:
    assert "Traceback" not in err, err
    assert err.startswith(f"{file}: the spec is not valid"), err
    assert f" {path}" in err or f" {path} =" in err, (path, err)
    for w in words:
        assert w in err, (w, err)
    assert "hunter2" not in err  # a password in a bad URL is never echoed


@pytest.fixture(scope="module")
def cli_results(tmp_path_factory):
    """Every bad file through `sweep validate` and `sweep run`, in one folder with an existing study."""
    work = tmp_path_factory.mktemp("bad-specs")
    env = sweep_env(work)
    # A study that must stay untouched: each bad spec points at it.
    import optuna

    db = work / "existing.db"
    study = optuna.create_study(study_name="bad", storage=f"sqlite:///{db}")
    study.set_user_attr("marker", 1)
    study.add_trial(optuna.trial.create_trial(params={}, distributions={}, value=1.0))
    digest = hashlib.sha256(db.read_bytes()).hexdigest()
    out = {}
    t0 = time.perf_counter()
    for case, (text, *_ ) in CASES.items():
        f = work / f"{case}.yaml"
        text = text if "storage" in text or not text.strip() or text.startswith(("!!", "- ", "#", "model: {")) \
            else text + f"storage: sqlite:///{db}\noutput_dir: {work / 'runs'}\n"
        f.write_text(text)
        v = sweep_cli("validate", f.name, cwd=work, env=env, timeout=60)
        r = sweep_cli("run", f.name, cwd=work, env=env, timeout=60, probe_imports=True)
        out[case] = (f.name, v, r)
    return {"work": work, "db": db, "digest": digest, "out": out, "seconds": time.perf_counter() - t0}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_spec_is_refused_with_one_clear_message(cli_results, case):
    name, v, r = cli_results["out"][case]
    _, path, words = CASES[case]
    for proc, what in ((v, "validate"), (r, "run")):
        assert proc.returncode == 2, (what, proc.returncode, proc.stdout, proc.stderr)
        err = proc.stderr.split("\nHEAVY_IMPORTED=")[0].strip()
        _check_message(err, name, path, words)
        assert "ok —" not in proc.stdout
    assert "HEAVY_IMPORTED=\n" in r.stderr + "\n", r.stderr[-300:]   # neither Ray nor torch was imported: nothing started


def test_nothing_was_started_or_written(cli_results, fault_row):
    work = cli_results["work"]
    assert hashlib.sha256(cli_results["db"].read_bytes()).hexdigest() == cli_results["digest"], "the study changed"
    assert not (work / "runs").exists() and not (work / "PWNED").exists()
    assert sorted(p.name for p in work.glob("*.db*")) == ["existing.db"]
    assert not (work / "home" / "studies.json").exists()
    n = len(CASES)
    fault_row(fault=f"bad specs ({n} cases)",
              injected="files with unknown fields, wrong types, low > high, log bounds <= 0, reduction factor 1, min > max, "
                       "unknown scheduler/optimizer/sampler, `!!python` tags, empty, huge/inf/NaN numbers; `sweep validate` + `sweep run`",
              lost=f"nothing started (no Ray/torch import), study file byte-identical, {n}/{n} exit 2 with file:line field = value: rule",
              seconds=cli_results["seconds"])


# ------------------------------------------------------------------ fuzzing

_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=12))
_keys = st.sampled_from(["name", "model", "data", "budget", "training", "search", "resources", "storage", "tracking",
                         "min", "max", "reduction_factor", "unit", "params", "type", "low", "high", "values", "step",
                         "log", "learning_rate", "lora_r", "sampler", "num_trials", "name_or_path", "path", "lora",
                         "alpha", "r", "optim", "wandb", "mode", "gpus_per_trial", "x"])
_trees = st.recursive(_scalars, lambda kids: st.one_of(st.lists(kids, max_size=4), st.dictionaries(_keys, kids, max_size=6)),
                      max_leaves=25)


def _parse(text: str):
    try:
        return parse_spec(text, "fuzz.yaml")
    except SpecError as e:
        assert str(e).startswith("fuzz.yaml: the spec is not valid")
        return e


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=300))
def test_fuzz_any_text_gives_a_spec_or_a_spec_error(text):
    assert isinstance(_parse(text), (SweepSpec, SpecError))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_trees)
def test_fuzz_any_yaml_tree_gives_a_spec_or_a_spec_error(tree):
    assert isinstance(_parse(yaml.safe_dump(tree)), (SweepSpec, SpecError))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(["budget", "training", "search", "model", "data", "resources"]), _keys, _scalars)
def test_fuzz_one_field_of_a_valid_spec_gives_a_spec_or_a_spec_error(section, key, value):
    d = yaml.safe_load(yaml.safe_dump(BASE))
    target = d[section] if section != "search" else d["search"]["params"]["learning_rate"]
    target[key] = value
    assert isinstance(_parse(yaml.safe_dump(d)), (SweepSpec, SpecError))
