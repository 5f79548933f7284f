"""Packed training is each trial's solo training: K trials on one base give each the losses it gets alone.

All on the tiny Llama, 4-bit base with fp32 compute, the real bitsandbytes layers. "Alone" is the same engine
holding that one trial; "packed" holds several at once, with different learning rates, schedulers, optimizers,
batch sizes, accumulation, LoRA ranks and dropout.
"""

from __future__ import annotations

import importlib.util
import math
import tempfile
from pathlib import Path

import pytest

from trial_worker.config import JobConfig

torch = pytest.importorskip("torch")

REL = 1e-3
# Different everything that makes a trial that trial.
TRIALS = {
    "a": {},
    "b": {"training": {"learning_rate": 1e-3, "lr_scheduler_type": "cosine", "per_device_train_batch_size": 2,
                       "gradient_accumulation_steps": 3, "seed": 7, "warmup_ratio": 0.2},
          "lora": {"r": 4, "alpha": 8, "dropout": 0.1}},
    "c": {"training": {"per_device_train_batch_size": 1, "gradient_accumulation_steps": 2, "optim": "sgd",
                       "learning_rate": 0.05, "seed": 3}, "lora": {"r": 16, "alpha": 32, "target_modules": ["q_proj", "v_proj"]}},
}


@pytest.fixture(scope="module")
def jobs(tmp_path_factory) -> dict[str, JobConfig]:
    from trial_worker.inputs.demo import write_task_data, write_tiny_llama

    root = tmp_path_factory.mktemp("pack")
    model, data = write_tiny_llama(root / "tiny"), write_task_data(root / "tasks", n_train=120, n_val=24)

    def job(training=None, lora=None) -> JobConfig:
        return JobConfig.model_validate({
            "model": {"name_or_path": str(model), "quantization": {"bnb_4bit_compute_dtype": "float32"},
                      "lora": {"r": 8, "alpha": 16, **(lora or {})}},
            "data": {"path": str(data), "max_seq_length": 64},
            "training": {"learning_rate": 5e-3, "per_device_train_batch_size": 4, "use_cpu": True, "torch_threads": 2,
                         **(training or {})},
            "budget": {"min": 2, "max": 4},
        })

    return {k: job(**v) for k, v in TRIALS.items()}


@pytest.fixture(scope="module")
def engine(jobs, tmp_path_factory):
    from trial_worker.pack.engine import PackEngine

    return PackEngine(jobs["a"], output_dir=str(tmp_path_factory.mktemp("out")))


def drive(engine, jobs, *, join: dict | None = None, leave: dict | None = None, ids=None, resume: dict | None = None,
          poison: dict | None = None):
    """Train `ids` to the end in `engine`: {id: (per-step losses, rung val losses, checkpoints, error)}.

    `join`/`leave`: {id: pack step at which it joins / is taken out}; `poison`: {id: pack step at which its
    adapter turns NaN}; `resume`: {id: checkpoint to start from}."""
    ids = list(ids or jobs)
    join, leave, poison, resume = join or {}, leave or {}, poison or {}, resume or {}
    out = {i: {"val": [], "ckpt": [], "error": None} for i in ids}
    trials, n = {}, 0
    while True:
        for i in ids:
            if i not in trials and join.get(i, 0) <= n:
                trials[i] = engine.add(i, jobs[i], lambda m, d, i=i: (out[i]["val"].append(m["val_loss"]),
                                                                      out[i]["ckpt"].append(d)),
                                       resume_from=resume.get(i))
            if i in leave and leave[i] == n:
                engine.remove(i)
            if i in poison and poison[i] == n:
                with torch.no_grad():
                    next(iter(trials[i].named_params.values())).fill_(float("nan"))
        for t in engine.trials.values():
            if t.state == "parked":
                t.state = "running"
        engine.readmit()
        for t in [t for t in engine.trials.values() if t.state == "done"]:
            engine.remove(t.id)
        if not engine.step() and all(i in trials for i in ids):
            break
        n += 1
    for t in engine.failed:
        out[t.id]["error"] = t.error
    engine.failed.clear()
    for i in ids:
        out[i]["loss"] = [loss for _, loss in trials[i].history]
    return out


def close(a: list[float], b: list[float]) -> bool:
    return len(a) == len(b) and all(math.isclose(x, y, rel_tol=REL) for x, y in zip(a, b))


@pytest.fixture(scope="module")
def solo(engine, jobs, tmp_path_factory):
    import shutil

    out = {}
    for i in jobs:
        out[i] = drive(engine, jobs, ids=[i])[i]
        # the first rung's checkpoint, kept apart (later runs of the same trial id write the same folder names)
        out[i]["rung1"] = str(shutil.copytree(out[i]["ckpt"][0], tmp_path_factory.mktemp("kept") / i))
    return out


def test_packed_trials_train_as_they_would_alone(engine, jobs, solo):
    packed = drive(engine, jobs)
    for i in jobs:
        assert len(solo[i]["loss"]) == 4 and len(solo[i]["val"]) == 2  # rungs at steps 2 and 4
        assert close(packed[i]["loss"], solo[i]["loss"]), (i, packed[i]["loss"], solo[i]["loss"])
        assert close(packed[i]["val"], solo[i]["val"]), (i, packed[i]["val"], solo[i]["val"])
    # the trials did learn, each differently (so equality above is not the same numbers three times)
    assert len({round(solo[i]["loss"][-1], 6) for i in jobs}) == 3
    assert all(solo[i]["val"][-1] < solo[i]["val"][0] or i == "c" for i in jobs)


def test_joining_and_leaving_leaves_the_others_unchanged(engine, jobs, solo):
    # b joins late, c is taken out midway (as ASHA prunes): a's and b's numbers are their solo ones
    moved = drive(engine, jobs, join={"b": 3}, leave={"c": 2})
    assert close(moved["a"]["loss"], solo["a"]["loss"])
    assert close(moved["b"]["loss"], solo["b"]["loss"]) and close(moved["b"]["val"], solo["b"]["val"])
    assert len(moved["c"]["loss"]) < 4


def test_the_warm_up_step_leaves_no_trace_in_the_trials_that_follow(jobs, solo, tmp_path, monkeypatch):
    """A GPU pack's throwaway first step (`PackEngine._warm_up`, run here on the CPU): it trains and steps a
    trial of the engine's job while the data is being made, then nothing of it is left (no trial, step count,
    memory measure, data) and every trial after it trains to the very numbers it trains alone."""
    from trial_worker.pack.engine import PackEngine

    ran = []
    warm_up = PackEngine._warm_up

    def counted(self, job):
        warm_up(self, job)
        ran.append(len(self.trials))

    monkeypatch.setattr(PackEngine, "_warm_up", counted)
    engine = PackEngine(jobs["a"], output_dir=str(tmp_path / "out"), warm_up=True)
    assert ran == [0] and engine.warmed_up
    assert not engine.trials and engine.steps == 0 and engine.token_bytes is None and not engine.evaluating
    assert all(not layer.adapters for layer in engine.layers.values())
    assert len({s.ids for s in engine.train_seqs}) > 100  # the real data, not the warm-up's one row
    packed = drive(engine, jobs)
    for i in jobs:
        assert close(packed[i]["loss"], solo[i]["loss"]), (i, packed[i]["loss"], solo[i]["loss"])
        assert close(packed[i]["val"], solo[i]["val"]), (i, packed[i]["val"], solo[i]["val"])


def test_the_padding_free_layout_trains_as_the_row_layout(engine, jobs, solo):
    """The GPU's layout (one padding-free sequence, every token a row of the routing), here on the CPU: each
    trial packed = alone = the row layout's numbers."""
    engine.flat = True
    try:
        alone_b = drive(engine, jobs, ids=["b"])["b"]
        packed = drive(engine, jobs)
    finally:
        engine.flat = False
    for i in jobs:  # the row layout's numbers (b's dropout masks too: drawn over its own tokens in the same order)
        assert close(packed[i]["loss"], solo[i]["loss"]) and close(packed[i]["val"], solo[i]["val"]), i
    assert close(packed["b"]["loss"], alone_b["loss"]) and close(packed["b"]["val"], alone_b["val"])


@pytest.mark.parametrize("flat", [False, True])
def test_the_grouped_lora_matmul_trains_as_the_per_trial_matmuls(engine, jobs, solo, flat):
    """The GPU's LoRA execution (`lora.MODE` "grouped": every trial's weights gathered into one grouped matmul
    pair a layer, gradients spread back in one multi-tensor add), here in fp32 on the CPU, trains each trial as
    alone: ranks 8/4/16 (zero-padded to 16), scalings 2/2/1, b's dropout, c on two of the seven projections."""
    from trial_worker.pack import lora

    engine.flat, lora.MODE = flat, "grouped"
    try:
        packed = drive(engine, jobs, join={"b": 1})
    finally:
        engine.flat, lora.MODE = False, "auto"
    for i in jobs:
        assert close(packed[i]["loss"], solo[i]["loss"]), (i, packed[i]["loss"], solo[i]["loss"])
        assert close(packed[i]["val"], solo[i]["val"]), (i, packed[i]["val"], solo[i]["val"])


def test_a_trial_gone_nan_fails_alone(engine, jobs, solo):
    from trial_worker.lifecycle import NonFiniteLoss

    hit = drive(engine, jobs, poison={"b": 2})
    assert isinstance(hit["b"]["error"], NonFiniteLoss) and "diverged" in str(hit["b"]["error"])
    assert hit["a"]["error"] is None and hit["c"]["error"] is None
    assert close(hit["a"]["loss"], solo["a"]["loss"]) and close(hit["a"]["val"], solo["a"]["val"])
    assert close(hit["c"]["loss"], solo["c"]["loss"]) and close(hit["c"]["val"], solo["c"]["val"])


def test_resumed_from_a_rung_checkpoint_continues_as_if_never_stopped(engine, jobs, solo):
    from trial_worker.checkpoint import verify

    assert verify(solo["b"]["rung1"]) is None  # hashed manifest, as the solo worker's checkpoints
    # b comes back from its first rung (as a Tune retry after its pack was killed) into a pack with a
    again = drive(engine, {"b": jobs["b"], "a": jobs["a"]}, ids=["b", "a"], resume={"b": solo["b"]["rung1"]})
    assert close(again["b"]["loss"], solo["b"]["loss"][2:])  # steps 3-4 only, the same numbers
    assert close(again["b"]["val"], solo["b"]["val"][1:])


def test_out_of_memory_sends_the_newest_trial_back_to_wait_and_loses_nothing(engine, jobs, solo):
    # A pack of more than two trials runs out of memory (raised by the real CUDA error type from a hook on
    # the decoder, as the allocator would in the middle of the step; the CPU has no memory limit to hit).
    hits = []

    def too_many(module, args, kwargs):
        if sum(slot is not None for _, _, slot in engine.routing.spans) > 2:
            hits.append(engine.steps)
            raise torch.OutOfMemoryError("CUDA out of memory (a pack of 3)")

    hook = engine.model.get_decoder().register_forward_pre_hook(too_many, with_kwargs=True)
    try:
        limit = engine.max_trials
        out = drive(engine, jobs)
    finally:
        hook.remove()
        engine.max_trials = limit
    assert len(hits) == 1, hits  # once: after it the pack holds two trials, the third waits its turn
    assert all(out[i]["error"] is None for i in jobs)
    for i in jobs:  # the step the error cut short was undone and done again: the same numbers as alone
        assert close(out[i]["loss"], solo[i]["loss"]) and close(out[i]["val"], solo[i]["val"]), i


def test_the_pack_scores_validation_as_the_solo_worker_does(engine, jobs):
    # the same rows, tokens, masking and token-mean: the base model's loss from the warm pack is the worker's
    from trial_worker.recipe import evaluate_base

    alone, packed = evaluate_base(jobs["a"]), engine.evaluate(None)
    assert packed["tokens"] == alone["tokens"] > 0
    assert math.isclose(packed["val_loss"], alone["val_loss"], rel_tol=1e-5)


def test_the_base_evaluation_runs_beside_the_first_trials_steps(engine, jobs, solo):
    # queued before the first trial joins (as the controller asks it), it takes a validation group per pack step:
    # the trial trains from the first step on, with its own numbers, and the base's score is the whole-split one
    from trial_worker.pack.batch import pack_rows

    whole = engine.evaluate(None)
    groups, engine.val_groups = engine.val_groups, pack_rows(engine.val_seqs, 96)  # several evaluation forwards
    seen: dict = {}
    try:
        assert len(engine.val_groups) >= 3
        engine.queue_evaluation(None, lambda metrics, error: seen.update(
            metrics=metrics, error=error, trial_steps=engine.trials["a"].step, pack_steps=engine.steps))
        out = drive(engine, jobs, ids=["a"])
    finally:
        engine.val_groups = groups
    assert seen["error"] is None and seen["metrics"]["tokens"] == whole["tokens"]
    assert math.isclose(seen["metrics"]["val_loss"], whole["val_loss"], rel_tol=1e-5)
    assert seen["pack_steps"] >= 3 and seen["trial_steps"] >= 2  # it trained while the base was scored
    assert close(out["a"]["loss"], solo["a"]["loss"]) and close(out["a"]["val"], solo["a"]["val"])


def test_reports_count_a_trials_set_up_from_its_start_to_its_first_pack_step(engine, jobs):
    import time

    from trial_worker.config import REPORT_KEYS

    reports: list[dict] = []
    t = engine.add("timed", jobs["a"], lambda m, d: reports.append(m), started_at=time.time() - 50.0)
    for _ in range(1000):
        if t.state == "parked":
            t.state = "running"
        if not engine.step():
            break
    engine.remove("timed")
    assert len(reports) == 2 and all(set(m) == set(REPORT_KEYS) for m in reports)
    assert 50 < reports[0]["setup_s"] == reports[1]["setup_s"] < 50 + reports[0]["wall_s"]


def _rows(fmt: str, n: int, rng) -> list[dict]:
    """`n` raw rows of `fmt`, written here (not by the demo's task generator): multi-turn chats with a system
    turn, instructions with and without input, plain text and text with an instruction marker."""
    words = "apple banana cherry delta echo fox golf hotel india juliet kilo lima mike".split()

    def say(k: int) -> str:
        return " ".join(rng.choice(words) for _ in range(k))

    out = []
    for i in range(n):
        if fmt == "sharegpt":
            conv = [{"from": "system", "value": say(3)}]
            for _ in range(rng.randint(1, 3)):
                conv += [{"from": "human", "value": say(rng.randint(2, 6))}, {"from": "gpt", "value": say(rng.randint(2, 8))}]
            out.append({"conversations": conv})
        elif fmt == "messages":
            turns = [[{"role": "user", "content": say(4)}, {"role": "assistant", "content": say(5)}]
                     for _ in range(rng.randint(2, 3))]
            out.append({"messages": [m for t in turns for m in t]})
        elif fmt == "instruction":
            out.append({"instruction": say(4), "input": say(2) if i % 2 else "", "output": say(6)})
        elif fmt == "text":
            out.append({"text": say(rng.randint(5, 30)) if i % 2 else f"[INST] {say(4)} [/INST] {say(6)}"})
    return out


@pytest.mark.parametrize("arch", ["qwen2", "phi3"])
def test_other_decoder_families_train_packed_as_alone(jobs, tmp_path, arch):
    """Not only Llama: a Qwen2 (biased projections, tied LM head) and a Phi-3 (fused projections) pack as they
    train alone, and `target_modules` a model lacks is refused naming the layers it has."""
    from sweep_helpers import write_tiny_family
    from trial_worker.pack.engine import PackEngine

    path = write_tiny_family(arch, jobs["a"].model.name_or_path, tmp_path / arch)
    targets = {"phi3": "all-linear"}.get(arch)
    shaped = {}
    for i in ("a", "b"):
        d = jobs[i].model_dump()
        d["model"]["name_or_path"] = path
        if targets:
            d["model"]["lora"]["target_modules"] = targets
        shaped[i] = JobConfig.model_validate(d)
    engine = PackEngine(shaped["a"], output_dir=str(tmp_path / "out"))
    alone = {i: drive(engine, shaped, ids=[i])[i] for i in shaped}
    packed = drive(engine, shaped)
    for i in shaped:
        assert len(alone[i]["loss"]) == 4 and alone[i]["error"] is None and packed[i]["error"] is None
        assert close(packed[i]["loss"], alone[i]["loss"]), (i, packed[i]["loss"], alone[i]["loss"])
        assert close(packed[i]["val"], alone[i]["val"]), (i, packed[i]["val"], alone[i]["val"])
    assert alone["a"]["loss"] != alone["b"]["loss"]
    if arch == "phi3":
        with pytest.raises(ValueError, match=r"names none of the model's linear layers \(down_proj, gate_up_proj, "
                                             r"o_proj, qkv_proj\)"):
            engine.add("c", jobs["c"].model_copy(update={"model": shaped["a"].model.model_copy(update={
                "lora": jobs["c"].model.lora})}), lambda m, d: None)


@pytest.mark.parametrize("fmt", ["sharegpt", "messages", "instruction", "text"])
def test_the_pack_tokenizes_every_format_as_the_solo_worker_does(jobs, tmp_path, fmt):
    # Multi-turn chats: every assistant turn is a target in both (not only the last one), rows cut at
    # max_seq_length the same way; the base model's validation loss and token count agree.
    import json
    import random

    from trial_worker.pack.engine import PackEngine
    from trial_worker.recipe import evaluate_base

    rng = random.Random(fmt)
    for split, n in (("train", 16), ("validation", 12)):
        with open(tmp_path / f"{split}.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in _rows(fmt, n, rng))
    data = jobs["a"].model_dump()
    data["data"].update(path=str(tmp_path), max_seq_length=96)
    job = JobConfig.model_validate(data)
    alone, packed = evaluate_base(job), PackEngine(job, output_dir=str(tmp_path / "out")).evaluate(None)
    assert packed["tokens"] == alone["tokens"] > 0
    assert math.isclose(packed["val_loss"], alone["val_loss"], rel_tol=1e-5)


@pytest.mark.gpu
def test_packed_equals_alone_on_a_gpu_in_bf16(jobs, tmp_path):
    """On a GPU (bf16 compute, bitsandbytes' CUDA 4-bit path, each trial's effective batch in one pack step):
    packed and alone within 1% at every rung."""
    from trial_worker.pack.engine import PackEngine

    gpu = {}
    for i, j in jobs.items():
        data = j.model_dump()
        data["model"]["quantization"]["bnb_4bit_compute_dtype"] = "bfloat16"
        data["training"].update(use_cpu=False, bf16=True)
        gpu[i] = JobConfig.model_validate(data)
    engine = PackEngine(gpu["a"], output_dir=str(tmp_path))
    alone = {i: drive(engine, gpu, ids=[i])[i] for i in gpu}
    packed = drive(engine, gpu)
    for i in gpu:
        assert all(math.isclose(x, y, rel_tol=0.01) for x, y in zip(packed[i]["val"], alone[i]["val"])), i
        assert len(packed[i]["val"]) == len(alone[i]["val"]) == 2


@pytest.mark.skipif(importlib.util.find_spec("liger_kernel") is not None, reason="Liger Kernel is installed here")
def test_a_pack_asked_for_liger_where_it_is_not_installed_says_which_field_and_how(jobs, tmp_path):
    """`training.use_liger_kernel: true` where Liger Kernel is missing: the pack's build fails naming the field and
    the way out, not with a bare import error from deep inside; left to its default it trains without."""
    from trial_worker.pack.engine import PackEngine

    data = jobs["a"].model_dump()
    data["training"]["use_liger_kernel"] = True
    with pytest.raises(ImportError, match=r"training.use_liger_kernel is true, but Liger Kernel does not import.*"
                                          r"pip install 'sweep\[gpu\]'.*training.use_liger_kernel: false"):
        PackEngine(JobConfig.model_validate(data), output_dir=str(tmp_path / "out"))
    assert PackEngine(jobs["a"], output_dir=str(tmp_path / "out2")).liger is False


def test_data_made_in_its_own_process_is_the_threads_and_its_errors_reach_the_pack(jobs, tmp_path):
    """The pack's data process (a GPU pack's default) gives the very sequences and pad id the in-process path
    gives, and a data error (no row keeps a response token) is raised in the pack with its message."""
    from trial_worker.pack.data import start
    from trial_worker.pack.engine import PackEngine

    job = jobs["b"]
    before = set(Path(tempfile.gettempdir()).glob("sweep-pack-data-*"))
    pad, train, val = start(job, own_process=True)()
    assert (pad, train, val) == start(job, own_process=False)()
    assert len(train) > 100 and all(s.n_targets for s in train + val)
    engine = PackEngine(job, output_dir=str(tmp_path / "out"), data_process=True)
    assert engine.train_seqs == train and engine.pad_id == pad

    data = job.model_dump()
    data["data"]["max_seq_length"] = 4  # every prompt is longer
    short = JobConfig.model_validate(data)
    with pytest.raises(ValueError, match="none of the .* train rows has a response token within max_seq_length=4"):
        start(short, own_process=True)()
    assert set(Path(tempfile.gettempdir()).glob("sweep-pack-data-*")) <= before  # nothing left


def test_a_trial_that_leaves_frees_its_adapters_and_optimizer_state_at_once(jobs, tmp_path):
    """`remove` frees a trial's adapters, gradients and optimizer state by their reference counts, with no
    garbage-collector pass (which the pack no longer runs per leaving trial): nothing of it outlives the call."""
    import gc
    import weakref

    from trial_worker.pack.engine import PackEngine

    data = jobs["b"].model_dump()
    data["training"].update(optim="adamw_8bit", lr_scheduler_type="cosine")
    job = JobConfig.model_validate(data)
    engine = PackEngine(job, output_dir=str(tmp_path / "out"))
    trial = engine.add("x", job, lambda m, d: None)
    engine.add("y", jobs["a"], lambda m, d: None)
    for _ in range(4):
        engine.step()
    assert trial.step >= 1 and trial.optimizer.state
    tensors = list(trial.params) + [v for s in trial.optimizer.state.values() for v in s.values()
                                    if isinstance(v, torch.Tensor)]
    refs = [weakref.ref(t) for t in tensors] + [weakref.ref(trial.optimizer), weakref.ref(trial.scheduler)]
    del tensors, trial
    gc.disable()
    try:
        engine.remove("x")
        alive = [r for r in refs if r() is not None]
    finally:
        gc.enable()
    assert not alive, f"{len(alive)} of {len(refs)} objects of the removed trial still alive"
    assert list(engine.trials) == ["y"] and engine.trials["y"].params  # the other trial keeps its own


def test_a_data_process_that_dies_is_an_error_of_the_pack_and_one_whose_pack_dies_ends(jobs, tmp_path):
    """The data process killed (out of memory, a signal) fails the pack's build with its exit status; and a
    data process whose pack is killed ends too, instead of tokenizing for nobody."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import psutil

    from trial_worker.pack.data import start

    job = jobs["a"]
    wait = start(job, own_process=True)
    [child] = [p for p in psutil.Process().children() if "trial_worker.pack.data" in " ".join(p.cmdline())]
    child.send_signal(signal.SIGKILL)
    with pytest.raises(RuntimeError, match="the pack's data process exited -9 without a result"):
        wait()

    # A "pack" (a Python process that starts the data process, then waits) killed: its data process goes with it,
    # here in the middle of rows that would take it a minute.
    folder = tmp_path / "long"
    folder.mkdir()
    rows = (Path(job.data.path) / "train.jsonl").read_text().splitlines()
    (folder / "train.jsonl").write_text("\n".join(rows * (100_000 // len(rows) + 1)) + "\n")
    data = job.model_dump()
    data["data"]["path"] = str(folder)
    job = JobConfig.model_validate(data)
    script = ("import sys, time; from trial_worker.config import JobConfig; from trial_worker.pack.data import start; "
              "start(JobConfig.model_validate_json(sys.stdin.read()), own_process=True); time.sleep(60)")
    pack = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, text=True)
    pack.stdin.write(job.model_dump_json())
    pack.stdin.close()
    deadline = time.time() + 30
    children: list = []
    while not children and time.time() < deadline:
        children = psutil.Process(pack.pid).children()
        time.sleep(0.1)
    assert children, "the pack did not start its data process"
    os.kill(pack.pid, signal.SIGKILL)
    pack.wait()
    gone, alive = psutil.wait_procs(children, timeout=10)
    assert not alive, [p.cmdline() for p in alive]


def serve(server, jobs: dict) -> None:
    """Join `jobs` ({id: job}) to a `PackServer` and drive them as their Tune attempts would (poll, go on after
    each rung) until each is done; any error fails the test."""
    import time

    for i, j in jobs.items():
        server.join(i, j)
    done: dict[str, bool] = {}
    deadline = time.monotonic() + 300
    while len(done) < len(jobs) and time.monotonic() < deadline:
        for i in jobs:
            for event in server.poll(i, 0.2):
                assert event["kind"] != "error", event
                if event["kind"] == "done":
                    done[i] = True
                else:
                    server.proceed(i)
    assert set(done) == set(jobs), (done, server.error)


def test_trials_queued_together_join_one_per_pack_step_and_the_first_trains_at_once(jobs, tmp_path, monkeypatch):
    """A join is host work that leaves the GPU idle when it happens before a step: the pack's first step starts
    after the first queued trial joined, and while the pack trains the others join one between two steps; all of
    them train to their end."""

    from trial_worker.marks import read
    from trial_worker.pack.server import PackServer

    monkeypatch.setenv("SWEEP_TIMELINE", str(tmp_path / "marks.jsonl"))
    serve(PackServer("joins"), {i: jobs[i] for i in ("a", "b", "c")})
    moments = [e for _, _, e in read(str(tmp_path / "marks.jsonl"), 0)
               if e.startswith(("engine: training step", "pack: admit"))]
    order = ["admit" if e.startswith("pack: admit") else "step" for e in moments][:5]
    assert order == ["admit", "step", "admit", "step", "admit"], moments
    assert moments[1].startswith("engine: training step 1 done (1 trials"), moments


def test_target_modules_match_layers_as_peft_matches_them(engine, jobs):
    """PEFT's rule for a list: a layer whose name is an entry or ends with "." + an entry; so `self_attn.q_proj`
    wraps what `q_proj` wraps (the preflight check takes the same rule: `config.targeted`)."""
    def layers(targets):
        d = jobs["a"].model_dump()
        d["model"]["lora"]["target_modules"] = targets
        t = engine.add("t", JobConfig.model_validate(d), lambda m, c: None)
        try:
            return sorted(t.named_params)
        finally:
            engine.remove("t")

    short = layers(["q_proj", "v_proj"])
    assert len(short) == 2 * 2 * 2 and all(".self_attn." in n for n in short)  # 2 layers x (q, v) x (A, B)
    assert layers(["self_attn.q_proj", "v_proj"]) == short
    assert layers(["model.layers.0.self_attn.q_proj"]) == [n for n in short if ".0.self_attn.q_proj." in n]


def _with_data(job: JobConfig, **data) -> JobConfig:
    d = job.model_dump()
    d["data"].update(data)
    return JobConfig.model_validate(d)


def test_trials_of_another_max_seq_length_share_the_pack_and_train_as_in_a_pack_of_their_own(engine, jobs, solo, tmp_path):
    """A search over `data.max_seq_length`: trials of another length join the same pack (one base), each training
    and scored on its own rows, cut at its own length, exactly as in a pack built for that data."""
    from trial_worker.pack.engine import PackEngine, pack_key

    short = {"b": _with_data(jobs["b"], max_seq_length=40), "c": _with_data(jobs["c"], max_seq_length=48)}
    assert pack_key(short["b"]) == pack_key(jobs["a"]) == engine.key
    own = {i: drive(PackEngine(j, output_dir=str(tmp_path / f"own-{i}")), short, ids=[i])[i] for i, j in short.items()}
    mixed = {"a": jobs["a"], **short}
    packed = drive(engine, mixed, join={"c": 2})
    assert close(packed["a"]["loss"], solo["a"]["loss"]) and close(packed["a"]["val"], solo["a"]["val"])
    for i in short:
        assert close(packed[i]["loss"], own[i]["loss"]), (i, packed[i]["loss"], own[i]["loss"])
        assert close(packed[i]["val"], own[i]["val"]), (i, packed[i]["val"], own[i]["val"])
    # the shorter cut trained on other numbers than the engine's own length gives the same trial
    assert not close(own["b"]["loss"], solo["b"]["loss"])
    assert len(engine.datasets) == 3 and max(engine.datasets[k].longest for k in engine.datasets) == engine.longest
    assert max(len(q.ids) for q in engine.data_for(short["b"]).train) <= 40


def test_a_trial_of_another_dataset_joins_while_the_pack_trains(jobs, tmp_path, monkeypatch):
    """The pack server makes a second dataset beside its steps and admits that trial once it is made: the first
    trial keeps training meanwhile, a trial queued after it on the pack's own data joins first, and all train to
    their end with their own rows."""
    import time

    from trial_worker.marks import read
    from trial_worker.pack.server import PackServer

    monkeypatch.setenv("SWEEP_TIMELINE", str(tmp_path / "marks.jsonl"))
    monkeypatch.setenv("SWEEP_DATA_CACHE", "0")  # made here, slowly: not read as an earlier test kept it
    from trial_worker.pack import data

    made = data.tokenized

    def slowly(job):  # b's dataset takes a while to make: c, queued after b, joins first
        if job.data.max_seq_length == 40:
            time.sleep(3)
        return made(job)

    monkeypatch.setattr(data, "tokenized", slowly)
    serve(PackServer("datasets"), {"a": jobs["a"], "b": _with_data(jobs["b"], max_seq_length=40), "c": jobs["c"]})
    moments = [e for _, _, e in read(str(tmp_path / "marks.jsonl"), 0)
               if e.startswith(("engine: training step", "pack: admit", "engine: another dataset", "pack: engine build"))]
    assert sum(e.startswith("pack: engine build") for e in moments) == 1, moments  # one base for both
    started = next(i for i, e in enumerate(moments) if e.startswith("engine: another dataset (") and " started" in e)
    admitted_b = next(i for i, e in enumerate(moments) if e.startswith("pack: admit b"))
    assert moments[admitted_b - 1].startswith("engine: another dataset ready"), moments
    assert started < admitted_b and moments[admitted_b - 2].startswith("engine: training step"), moments
    assert moments.index("pack: admit c") < admitted_b, moments  # not held behind b


def test_a_trial_whose_dataset_keeps_no_row_fails_alone_and_the_pack_goes_on(jobs):
    """A search down to a max_seq_length where no row keeps a response token: that trial fails with the data's own
    message, the trial beside it trains to its end."""
    import time

    from trial_worker.pack.server import PackServer

    server = PackServer("no-rows")
    server.join("a", jobs["a"])
    server.join("b", _with_data(jobs["b"], max_seq_length=4))
    ended: dict[str, dict] = {}
    deadline = time.monotonic() + 300
    while len(ended) < 2 and time.monotonic() < deadline:
        for i in ("a", "b"):
            for event in server.poll(i, 0.2):
                if event["kind"] in ("done", "error"):
                    ended[i] = event
                else:
                    server.proceed(i)
    assert ended["a"]["kind"] == "done", (ended, server.error)
    assert ended["b"]["kind"] == "error" and "has a response token within max_seq_length=4" in ended["b"]["message"], ended


def test_a_checkpoint_with_per_tensor_optimizer_state_is_refused_by_name(engine, jobs, solo, tmp_path):
    """A pack's checkpoint keeps its trial's optimizer state for one flat tensor; one written by the earlier pack
    (state per adapter tensor) is refused with what it is and what to do, not continued with a wrong state."""
    import shutil

    old = Path(shutil.copytree(solo["a"]["rung1"], tmp_path / "old"))
    st = torch.load(old / "trainer_state.pt", weights_only=False)
    st["optimizer"]["param_groups"][0]["params"] = [0, 1, 2]
    torch.save(st, old / "trainer_state.pt")
    with pytest.raises(ValueError, match=r"holds optimizer state for 3 tensors.*earlier version"):
        engine.add("old", jobs["a"], lambda m, d: None, resume_from=str(old))
    assert "old" not in engine.trials


def test_a_late_leave_of_an_earlier_attempt_does_not_drop_the_retry(jobs):
    """A trial's attempt that lost its pack (the pack process killed) still sends `leave`; Ray delivers it to
    the restarted pack, possibly after the trial's retry joined. That retry must train on to its end, not be
    dropped and wait forever; a poll for an attempt the pack does not hold gets an error at once (the attempt
    fails and Tune retries it), not an empty answer forever."""
    import time

    from trial_worker.formats import rung_steps
    from trial_worker.pack.server import PackServer

    server = PackServer("retries")
    assert server.poll("a", 0.1, "first")[0]["kind"] == "error"  # never joined here (a restarted pack)
    server.join("a", jobs["a"], attempt="first")
    server.join("a", jobs["a"], attempt="retry")  # the retry of the same trial
    server.leave("a", "first")  # the first attempt's leave, late
    server.proceed("a", "first")
    stale = server.poll("a", 0.1, "first")
    assert [e["kind"] for e in stale] == ["error"] and "does not hold this attempt" in stale[0]["message"], stale
    kinds = _attempt_to_its_end(server, "a", "retry")
    assert kinds.count("report") == len(rung_steps(jobs["a"])) and kinds[-1] == "done", (kinds, server.error)
    server.leave("a", "retry")
    deadline = time.monotonic() + 10
    while server.poll("a", 0.1, "retry")[:1] == [] and time.monotonic() < deadline:  # the leave is applied by the loop
        pass
    assert server.poll("a", 0.1, "retry")[0]["kind"] == "error"  # gone from the pack once it left


def test_a_poll_left_waiting_by_a_dead_attempt_does_not_take_the_retrys_reports(jobs):
    """A trial's attempt killed while its poll waits in the pack: the pack still runs that poll. When the retry
    joins, the orphan poll must end (an error its dead caller never sees), not take the retry's first rung
    report, which the retry would then never see (its trial parked for good, the sweep hung)."""
    import threading
    import time

    from trial_worker.formats import rung_steps
    from trial_worker.pack.server import PackServer

    server = PackServer("orphans", max_trials=1)
    # The one place is taken (a trial parked at its first rung) while the dead attempt's poll waits, so that
    # attempt has no event of its own: whatever its poll returns is the retry's.
    server.join("blocker", jobs["b"], attempt="x")
    deadline = time.monotonic() + 300
    while not any(e["kind"] == "report" for e in server.poll("blocker", 0.2, "x")) and time.monotonic() < deadline:
        pass
    server.join("a", jobs["a"], attempt="dead")
    orphan: list = []
    waiting = threading.Thread(target=lambda: orphan.extend(server.poll("a", 60.0, "dead")))
    waiting.start()
    time.sleep(0.2)  # the dead attempt's poll waits in the pack
    server.join("a", jobs["a"], attempt="retry")
    server.leave("blocker", "x")  # room for the retry
    waiting.join(timeout=10)
    assert not waiting.is_alive() and [e["kind"] for e in orphan] == ["error"], orphan
    kinds = _attempt_to_its_end(server, "a", "retry")
    assert kinds.count("report") == len(rung_steps(jobs["a"])) and kinds[-1] == "done", (kinds, server.error)


def test_a_trial_whose_attempt_stopped_polling_is_dropped_unless_tune_holds_its_rung_report(jobs, monkeypatch):
    """An attempt killed while its trial trains (and not retried: Tune stopped the trial then) never says
    `leave`: the pack drops the trial once its attempt has not polled for `LOST_S`, freeing its slot, rather
    than training it for nobody (also once parked at a rung whose report nobody took). A trial parked at a rung
    whose report its attempt took (Tune is taking it: the attempt does not poll then) is kept."""
    import time

    import trial_worker.pack.server as srv

    monkeypatch.setattr(srv, "LOST_S", 1.5)
    server = srv.PackServer("zombies")
    server.join("kept", jobs["a"], attempt="k")
    server.join("lost", jobs["b"], attempt="l")
    parked_at = None
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        events = server.poll("kept", 0.2, "k")  # "lost" is never polled
        if any(e["kind"] == "report" for e in events):
            parked_at = time.monotonic()
            break
    assert parked_at is not None, server.error
    while time.monotonic() < deadline and "lost" in server.attempts:
        time.sleep(0.1)
    assert "lost" not in server.attempts and "lost" not in (server.engine.trials if server.engine else {})
    time.sleep(2.0)  # "kept" sits parked (not polled) past LOST_S: Tune holds its report
    assert server.engine.trials["kept"].state == "parked"
    server.proceed("kept", "k")
    assert server.poll("kept", 5.0, "k")[0]["kind"] in ("report", "done")


def _attempt_to_its_end(server, trial_id: str, attempt: str, timeout: float = 300.0) -> list[str]:
    """Drive one attempt of a trial in `server` as `pack.tune._relay` does (poll; each rung report goes on)
    until it is done: the kinds of the events it got. An error event fails the test."""
    import time

    kinds: list[str] = []
    deadline = time.monotonic() + timeout
    while "done" not in kinds and time.monotonic() < deadline:
        for event in server.poll(trial_id, 0.2, attempt):
            assert event["kind"] != "error", event
            kinds.append(event["kind"])
            if event["kind"] == "report":
                server.proceed(trial_id, attempt)
    return kinds
