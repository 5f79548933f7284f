"""The private corners of Ray, Optuna and TRL that `sweep/_compat/` and `trial_worker/_compat.py` rely on:
each still exists and behaves as the code assumes, for the installed versions (pyproject.toml pins the range).
Fast: no Ray cluster, no model."""

from __future__ import annotations

import importlib
import inspect
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_the_switch_keeps_a_local_ray_on_loopback():
    # In a fresh interpreter, as the controller does it before `import ray`.
    code = ("from sweep._compat.ray import keep_local_ray_on_loopback; keep_local_ray_on_loopback(); "
            "import ray._private.ray_constants as c; print(c.ENABLE_RAY_CLUSTER)")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"}
    env["PYTHONPATH"] = str(ROOT)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stderr
    # The variable is what Ray itself reads when imported.
    env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "1"
    code = "import ray._private.ray_constants as c; print(c.ENABLE_RAY_CLUSTER)"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "True", out.stderr


def test_tune_loggers_and_messages_the_stop_filter_recognises_exist():
    from sweep._compat import ray as compat

    sources = ""
    for name in compat.TUNE_LOGGERS:
        module = importlib.import_module(name)  # a logger per module: logging.getLogger(__name__)
        assert isinstance(getattr(module, "logger", None), logging.Logger) and module.logger.name == name, name
        sources += inspect.getsource(module)
    for text in (*compat.TRIAL_FAILED_MESSAGES, compat.STATE_SAVE_FAILED_MESSAGE, *compat.STOP_MESSAGES,
                 compat.CHECKPOINT_HANDLING_FAILED):
        assert text in sources, f"Tune no longer logs {text!r}"


def test_the_internals_the_reset_retry_and_the_quiet_notice_patch_exist(capsys):
    """`retry_trials_lost_in_reset` and `quiet_worker_death_notices` patch Tune's and Ray's private code: what they
    rely on is there, in the order Ray calls it (the actor's error callback, then its task's), and the notice
    filter drops the worker-died notice only."""
    import ray._private.worker as ray_worker
    from ray.air.execution._internal import actor_manager
    from ray.tune.execution.tune_controller import TuneController

    from sweep._compat import ray as compat

    for name in ("_trial_task_failure", "_set_trial_status", "_unstage_trial_with_resources", "_actor_failed"):
        assert callable(getattr(TuneController, name, None)), name
    reset = inspect.getsource(TuneController._schedule_trial_reset)
    assert "self._resetting_trials.add(trial)" in reset and "on_error=self._trial_task_failure" in reset
    manager = inspect.getsource(actor_manager.RayActorManager)
    assert manager.index("tracked_actor._on_error(tracked_actor, exception)") < \
        manager.index("tracked_actor_task._on_error(tracked_actor, exception)")
    listener = inspect.getsource(ray_worker.listen_error_messages)
    assert "print_to_stdstream(" in listener and '"pid": "raylet"' in listener
    compat.retry_trials_lost_in_reset()
    compat.retry_trials_lost_in_reset()  # idempotent
    assert TuneController._trial_task_failure._sweep_retries_reset

    original = ray_worker.print_to_stdstream
    try:
        compat.quiet_worker_death_notices()
        compat.quiet_worker_death_notices()  # idempotent
        ray_worker.print_to_stdstream({"lines": [compat.WORKER_DIED_NOTICE + ". Lease ID: 1"], "pid": "raylet",
                                       "is_err": False}, ignore_prefix=False)
        assert compat.WORKER_DIED_NOTICE not in capsys.readouterr().out
        ray_worker.print_to_stdstream({"lines": ["something else the raylet says"], "pid": "raylet", "is_err": False},
                                      ignore_prefix=False)
        assert "something else the raylet says" in capsys.readouterr().out
    finally:
        ray_worker.print_to_stdstream = original


def test_sigusr1_ends_a_tune_run_like_ctrl_c():
    from ray.tune import tune as tune_module

    from sweep._compat.ray import interrupt_tune

    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGUSR1)}
    try:
        interrupted = tune_module._setup_signal_catching()
        interrupt_tune(RuntimeError("not in the main thread"))
        assert interrupted.wait(5), "Tune's handler did not take SIGUSR1"
    finally:
        for s, h in saved.items():
            signal.signal(s, h)


def test_ray_folders_are_where_the_controller_looks():
    from ray._common.utils import get_default_ray_temp_dir
    from ray._private import services
    from ray.train._internal import storage

    from sweep._compat.ray import ray_temp_dir

    assert str(ray_temp_dir()) == get_default_ray_temp_dir()
    assert "driver_artifacts" in inspect.getsource(storage.StorageContext)  # session_*/artifacts/*/<exp>/driver_artifacts
    assert "--session-dir=" in inspect.getsource(services)  # how `session_dir_of` tells Ray processes' sessions


def test_session_dir_of_reads_a_ray_processes_arguments(tmp_path):
    from sweep._compat.ray import session_dir_of

    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", "--session-dir=/tmp/ray/session_x"])
    try:
        for _ in range(100):
            if session_dir_of(p.pid):
                break
            time.sleep(0.05)
        assert session_dir_of(p.pid) == "/tmp/ray/session_x"
        assert session_dir_of(os.getpid()) is None
    finally:
        p.kill()
        p.wait()


def test_a_restored_tuner_keeps_its_callbacks_where_the_controller_finds_them(tmp_path):
    from ray import tune

    from sweep._compat.ray import restored_callbacks

    class Mark(tune.Callback):
        pass

    mark = Mark()
    tuner = tune.Tuner(lambda config: None, run_config=tune.RunConfig(storage_path=str(tmp_path), callbacks=[mark]))
    assert restored_callbacks(tuner) == [mark]


def test_tune_state_marks_a_trial_ended_the_way_restore_reads_it(tmp_path):
    import json

    from ray.tune import PlacementGroupFactory
    from ray.tune.experiment import Trial

    from sweep._compat.ray import mark_trials_terminated

    trials = [Trial("f", stub=True, trial_id=i, placement_group_factory=PlacementGroupFactory([{"CPU": 1}]))
              for i in ("done1", "live1")]
    for t in trials:
        t.set_status(Trial.RUNNING)
    state = tmp_path / "experiment_state-x.json"
    state.write_text(json.dumps({"trial_data": [list(t.get_json_state()) for t in trials], "runner_data": {}}))
    assert mark_trials_terminated(state, {"done1", "gone"}) == ["done1"]
    status = {json.loads(pair[0])["trial_id"]: json.loads(pair[0])["status"]
              for pair in json.loads(state.read_text())["trial_data"]}
    assert status == {"done1": Trial.TERMINATED, "live1": Trial.RUNNING}
    # What restore makes of it: the status key as saved (a RUNNING one is queued again as PENDING).
    assert 'state["status"] == Trial.RUNNING' in inspect.getsource(Trial.__setstate__)


def test_the_concurrency_limiters_saved_live_trials_can_be_forgotten(tmp_path):
    from ray.tune.search import ConcurrencyLimiter, SearchGenerator
    from ray.tune.search.optuna import OptunaSearch

    from sweep._compat.ray import match_search_state

    searcher = OptunaSearch({"x": optuna.distributions.FloatDistribution(0, 1)}, metric="loss", mode="min")
    limiter = ConcurrencyLimiter(searcher, max_concurrent=2)
    for tid in ("a", "b"):
        limiter.suggest(tid)
    assert limiter.suggest("c") is None  # full
    gen = SearchGenerator(limiter)
    gen.save_to_dir(str(tmp_path), session_str="s")
    [saved] = tmp_path.glob("search_gen_state-*.json")
    match_search_state(saved, {"a": "TERMINATED", "b": "RUNNING", "c0": "TERMINATED"})
    again = SearchGenerator(ConcurrencyLimiter(searcher, max_concurrent=2))
    again.restore_from_dir(str(tmp_path))
    assert again.searcher.live_trials == {"b"} and again.searcher.suggest("c") is not None
    assert again.get_state()["counter"] == 3 and again.get_state()["finished"] is False  # one per restored trial


def test_asha_keeps_its_rungs_where_the_scheduler_rebuilds_them():
    from ray.tune.schedulers import ASHAScheduler

    from sweep._compat.ray import asha_metric_op, asha_rungs

    asha = ASHAScheduler(metric="val_loss", mode="min", time_attr="steps", max_t=8, grace_period=2, reduction_factor=2)
    assert asha_metric_op(asha) == -1.0
    rungs = asha_rungs(asha)
    assert sorted(m for m, _ in rungs) == [2, 4, 8]  # milestones min * rf**k up to max
    recorded = dict(rungs)[4]
    recorded.update({"a": -1.0, "b": -2.0})  # values as ASHA keeps them: metric_op * val_loss

    class Trial:
        trial_id = "c"

    # A worse trial than both recorded ones reaching rung 4 is stopped by the rebuilt cutoff.
    assert asha._brackets[0].on_result(Trial(), 4, -3.0) == "STOP"


def test_optuna_internals_the_record_uses(tmp_path):
    from sweep._compat.optuna import (cached_frozen, set_user_attr_of_finished_trial, study_id, study_storage, trial_id,
                                      trial_of_number)

    url = f"sqlite:///{tmp_path}/o.db"
    study = optuna.create_study(storage=url, study_name="o")
    trial = study.ask()
    trial.report(1.5, 10)
    assert cached_frozen(trial).intermediate_values == {10: 1.5}
    frozen = study.trials[0]
    assert trial_id(frozen) == trial_id(trial) and study_storage(study).get_trial(trial_id(trial)).number == 0
    assert trial_of_number(study, 0) == trial_id(trial)
    assert study_storage(study).get_study_id_from_name("o") == study_id(study)  # the dashboard's page of the study
    study.tell(trial, 1.0)
    with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):  # what the searcher skips on a resume
        study_storage(study).set_trial_user_attr(trial_id(trial), "k", 1)
    set_user_attr_of_finished_trial(study_storage(study), trial_id(trial), "fail_reason", "why")  # a cached storage
    set_user_attr_of_finished_trial(optuna.storages.RDBStorage(url), trial_id(trial), "fail_reason", "why 2")
    assert optuna.load_study(study_name="o", storage=url).trials[0].user_attrs["fail_reason"] == "why 2"


@pytest.mark.parametrize("storage", ["sqlite", "inmemory"])
def test_several_attrs_and_a_report_written_at_once(tmp_path, storage):
    # RDBStorage's `_without_commit` setters in one session; any other storage: the public calls (the fallback).
    from sweep._compat.optuna import cached_frozen, write_running_trial

    url = f"sqlite:///{tmp_path}/o.db"
    study = optuna.create_study(storage=url if storage == "sqlite" else optuna.storages.InMemoryStorage())
    trial = study.ask()
    write_running_trial(trial, {"a": 1, "b": {"c": [1.5, None]}}, (10, 2.0))
    write_running_trial(trial, {"a": 2}, (10, 9.0))  # as Trial.report: the first value at a step stands
    for t in (cached_frozen(trial), study.trials[0]):
        assert t.user_attrs == {"a": 2, "b": {"c": [1.5, None]}} and t.intermediate_values == {10: 2.0}
    study.tell(trial, 1.0)
    with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):
        write_running_trial(trial, {"a": 3})
    assert study.trials[0].user_attrs["a"] == 2


def test_worker_internals_ray_train_session_and_trl_metrics():
    from ray.train._internal import session, storage
    from trl import SFTTrainer

    from trial_worker._compat import add_logged_tokens, storage_checkpoint

    assert callable(session.get_storage)
    assert {"checkpoint_fs_path", "storage_filesystem"} <= set(dir(storage.StorageContext)) | set(
        inspect.signature(storage.StorageContext.__init__).parameters) | set(inspect.getsource(storage.StorageContext).split())
    with pytest.raises(AttributeError):
        storage_checkpoint()  # outside a Tune session: the worker says "the run's storage" instead
    # SFTTrainer keeps its logged metrics in `_metrics[mode][name]` lists and averages them in `log`.
    assert 'self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}' in inspect.getsource(SFTTrainer.__init__)
    assert "self._metrics[mode]" in inspect.getsource(SFTTrainer.log)
    # ... and counts the tokens it trained in `_total_train_tokens`, which the worker adds to with its own count.
    assert "self._total_train_tokens" in inspect.getsource(SFTTrainer)

    class Trainer:
        _metrics: dict = {"train": {}}
        _total_train_tokens = 100

    assert add_logged_tokens(Trainer, 23) == 123 and add_logged_tokens(Trainer, 7) == 130
    assert Trainer._metrics["train"]["num_tokens"] == [130]


def test_transformers_and_tune_internals_the_worker_uses(tiny_model):
    """The attention a loaded model runs, read where `from_pretrained(attn_implementation=...)` puts it; Tune's
    function trainable, the class the worker's restore-past-a-gone-checkpoint subclasses."""
    from ray.tune.trainable import Trainable
    from transformers import AutoConfig, AutoModelForCausalLM

    from trial_worker._compat import attn_implementation, function_trainable

    for attn in ("eager", "sdpa"):
        model = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation=attn)
        assert attn_implementation(model.config) == attn
    assert attn_implementation(AutoConfig.from_pretrained(tiny_model)) in (None, "eager", "sdpa")
    assert attn_implementation(object()) is None

    def fn(config):
        return None

    cls = function_trainable(fn)
    assert isinstance(cls, type) and issubclass(cls, Trainable) and callable(getattr(cls, "restore"))


def test_trls_fused_head_as_sft_trainer_puts_it_on_the_model(tiny_model):
    """SFTTrainer puts TRL's fused LM head on the model it trains, and the loss through it is the model's own."""
    import torch
    from transformers import AutoModelForCausalLM
    from trl import SFTTrainer
    from trl.trainer import add_fused_lm_head

    from trial_worker._compat import fused_head_nll

    assert "add_fused_lm_head(" in inspect.getsource(SFTTrainer.__init__)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation="eager").float()
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :5] = -100  # the prompt
    own = model(input_ids=ids, labels=labels).loss
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))  # as SFTTrainer.__init__ does
    inputs = {"input_ids": ids, "labels": labels}
    assert torch.allclose(fused_head_nll(model, inputs), own, rtol=1e-4)
    tokens = int((labels[:, 1:] != -100).sum())
    assert torch.allclose(fused_head_nll(model, inputs, 2 * tokens), own / 2, rtol=1e-4)


@pytest.mark.parametrize("optim_bits", [8, 32])
def test_bitsandbytes_step_without_sync_is_bitsandbytes_own_step(optim_bits):
    """The worker's bitsandbytes step (no GPU wait per parameter) leaves the same weights and state, bit for bit."""
    import bitsandbytes as bnb
    import torch

    from trial_worker._compat import lean_bnb_step

    torch.manual_seed(0)
    shapes = [(64, 128), (16, 2048), (7,)]  # 8-bit blockwise state, and a small one bitsandbytes keeps in 32 bit
    grads = [[torch.randn(s) for s in shapes] for _ in range(4)]
    runs = []
    for lean in (False, True):
        params = [torch.nn.Parameter(torch.full(s, 0.5)) for s in shapes]
        opt = bnb.optim.AdamW(params, lr=1e-2, weight_decay=0.1, optim_bits=optim_bits)
        if lean:
            opt = lean_bnb_step(opt)
            assert type(opt).__name__ == "LeanAdamW" and isinstance(opt, bnb.optim.AdamW)
        for step in grads:
            for p, g in zip(params, step):
                p.grad = g.clone()
            opt.step()
        runs.append((params, opt.state_dict()))
    (a, sa), (b, sb) = runs
    assert all(torch.equal(x, y) for x, y in zip(a, b)) and not torch.equal(a[0], torch.full((64, 128), 0.5))
    for k, state in sa["state"].items():
        for name, value in state.items():
            other = sb["state"][k][name]
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, other), name
            else:
                assert repr(value) == repr(other), name
    paged = bnb.optim.PagedAdamW([torch.nn.Parameter(torch.zeros(8))], lr=1e-3)
    assert type(lean_bnb_step(paged)) is bnb.optim.PagedAdamW  # paged state needs bitsandbytes' syncs


def test_torchs_multi_tensor_and_grouped_ops_the_pack_uses():
    """torch's private `_foreach_norm`, `_foreach_mul` and `_grouped_mm` compute what their names say."""
    import torch

    from trial_worker._compat import foreach_add, foreach_copy, foreach_mul, foreach_norm, grouped_mm, has_grouped_mm

    g = torch.Generator().manual_seed(0)
    ts = [torch.randn(s, generator=g) for s in ((3, 5), (7,), (2, 2, 2))]
    assert all(torch.allclose(n, t.norm()) for n, t in zip(foreach_norm(ts), ts))
    assert all(torch.equal(m, t * 2.5) for m, t in zip(foreach_mul(ts, torch.tensor(2.5)), ts))
    dst = [torch.zeros(3, 5, dtype=torch.bfloat16), torch.zeros(7)]
    foreach_copy(dst, ts[:2])
    assert torch.equal(dst[0], ts[0].bfloat16()) and torch.equal(dst[1], ts[1])
    foreach_add(dst, ts[:2])
    assert torch.equal(dst[1], ts[1] * 2)
    assert has_grouped_mm()
    x, w = torch.randn(10, 16, generator=g).bfloat16(), torch.randn(3, 16, 8, generator=g).bfloat16()
    ends = [4, 4, 10]  # an empty group too (a trial with no rows in a step)
    out = grouped_mm(x, w, torch.tensor(ends, dtype=torch.int32))
    for i, (a, b) in enumerate(zip([0, *ends[:-1]], ends)):
        assert torch.allclose(out[a:b].float(), (x[a:b] @ w[i]).float(), rtol=1e-2, atol=1e-2)


def test_wandb_workspaces_model_is_what_the_dashboard_json_writes():
    """wandb-workspaces' private `_to_model` gives the pydantic model its `save` sends, with the study's group."""
    pytest.importorskip("wandb_workspaces")
    from dashboards._compat import workspace_model
    from dashboards.wandb_workspace import build_workspace

    study = optuna.create_study(study_name="study-x")
    w = build_workspace(study, entity="e", project="p", params=["learning_rate"])
    model = workspace_model(w)
    assert hasattr(model, "model_dump") and "study-x" in str(model.model_dump(by_alias=True, exclude_none=True))


def test_a_local_ray_with_sigterm_blocked_is_shut_down_by_kill():
    """`shutdown_ray` reaches Ray's own process teardown and makes it kill (the controller's local Ray blocks
    SIGTERM, so Ray's graceful SIGTERM only waited): right after it, Ray's head processes are gone and the
    driver is disconnected."""
    script = """
import json, signal, psutil, ray
from sweep._compat.ray import shutdown_ray
mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
ray.init(include_dashboard=False, logging_level="WARNING", log_to_driver=False, num_cpus=1)
signal.pthread_sigmask(signal.SIG_SETMASK, mask)
head = [p for p in psutil.Process().children(recursive=True) if p.name() in ("gcs_server", "raylet")]
forced = shutdown_ray(ray)
alive = [p.name() for p in head if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
print(json.dumps({"forced": forced, "head": len(head), "alive": alive, "initialized": ray.is_initialized()}))
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out == {"forced": True, "head": 2, "alive": [], "initialized": False}, out


def test_bitsandbytes_imports_without_torchs_compiler_and_its_cpu_ops_still_compile_on_first_use():
    # A fresh interpreter, as a pack or trial process loads a 4-bit base: bitsandbytes comes in without Inductor
    # (its import-time `torch.compile` wrappers are deferred); its CPU 4-bit round trip then compiles on first use,
    # as bitsandbytes' own wrappers would, and gives what the eager function gives.
    code = """
import sys, torch
from trial_worker._compat import import_bitsandbytes
bnb = import_bitsandbytes()
assert torch.compile.__module__.startswith("torch"), torch.compile
print("torch._dynamo.eval_frame" in sys.modules)
from bitsandbytes.backends.default import ops
from bitsandbytes.backends.utils import _get_4bit_code
torch.manual_seed(0)
w = torch.randn(64, 128)
q, state = bnb.functional.quantize_4bit(w, blocksize=64, quant_type="nf4")
args = (q.view(torch.uint8).reshape(-1), state.absmax, _get_4bit_code("nf4", q.device), 64, w.shape, torch.float32)
back = ops._dequantize_4bit_compute(*args)  # bitsandbytes' wrapper, now through the deferred torch.compile
print("torch._dynamo.eval_frame" in sys.modules)
print(float((back - ops._dequantize_4bit_compute.__wrapped__(*args)).abs().max()), float((back - w).abs().max()))
"""
    # TORCHDYNAMO_DISABLE: torch.compile is called, and wraps, but runs the function eagerly (a CPU Inductor
    # build would take half a minute here)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TORCHDYNAMO_DISABLE": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    before, after, vs_eager, vs_weights = out.stdout.split()
    assert (before, after) == ("False", "True"), out.stdout  # compiled at its first call, not at the import
    assert float(vs_eager) == 0.0 and 0 < float(vs_weights) < 1.0, out.stdout
