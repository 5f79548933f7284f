"""Packed trials: one warm process per GPU trains several trials at once on one shared 4-bit base.

The shape follows mLoRA (TUDB-Labs/mLoRA, arXiv 2312.02515): the frozen base, the per-trial adapters and the
dispatcher that builds one batch from several trials' micro-batches are separate pieces.

- `lora`    the multi-adapter LoRA layer: one base forward for every row, each trial's rows through its own
            A/B (its own r, alpha, dropout), routed by row ranges (mLoRA's BatchLoRA, on row slices).
- `batch`   tokenising prompt-completion rows, and the dispatcher: one batch from several trials' micro-batches,
            each trial's sequences packed padding-free into its own rows (no row ever mixes two trials, so a
            trial whose activations turn NaN cannot touch another's through attention).
- `engine`  the packed training loop: per trial its own optimizer, LR schedule (horizon: the top rung), effective
            batch and accumulation, data order and seed, rung evaluation, checkpoints and reports; the loss of a
            trial is normalised on its own tokens, so its gradients are those of its solo run.
- `server`  the pack server, a Ray actor per GPU that holds the base, the CUDA context and the imports warm and
            runs the engine in a thread; `tune` the Tune trainable that hands a trial's work to a pack server and
            relays its reports and checkpoints.

Whether a sweep's trials pack at all is decided here, once: `trials_pack`, asked by `sweep validate` and by
the trial plan (the only way a sweep's trials reach a pack; the engine trusts the jobs it is given).
"""

from typing import Any, Optional

from trial_worker.config import searchable_params

# Settings a pack would not train as written (a pack has no sequence packing, no trained biases, no fp16 loss
# scaling, its own data order): field -> (the setting packs take, why not the others).
_AS_PACKS_TRAIN = {
    "data.packing": (False, "TRL's sequence packing (rows concatenated to max_seq_length) is not how a pack batches rows"),
    "model.lora.bias": ("none", "a pack trains LoRA adapters only, not the base's biases"),
    "training.fp16": (False, "a pack trains in the base's compute dtype without fp16 loss scaling (use bf16)"),
    "training.group_by_length": (False, "a pack draws each trial's rows in its own seeded order, not grouped by length"),
}

# `packing: auto` packs on GPUs: on the same 10 trials of the reference space (H100, 2026-12-05,
# benchmarks/results/sweep_makespan.json) a pack trained 2.56M tokens in 150 s (17.0k tokens/s over the sweep's
# wall time) and one trial per process 2.03M tokens in 250 s without finishing (7.9k tokens/s): 2.2x.
AUTO_PACKS = True


class PackingRefused(ValueError):
    """`resources.packing: on` with settings packed trials would not train as written. `problems`:
    [(field, value, what is wrong and what is allowed)], every one at once."""

    def __init__(self, problems: list[tuple[str, Any, str]]):
        self.problems = problems
        super().__init__("; ".join(f"{field}={value!r}: {why}" for field, value, why in problems))


def trials_pack(resources: dict, job: dict, search_params: Optional[dict] = None,
                gpus_in_cluster: Optional[float] = None) -> bool:
    """Whether the sweep's trials run packed: the one packing decision, asked once per sweep (by `sweep validate`
    and by the trial plan; the pack engine trusts the jobs it is given).

    `resources`, `job`: the spec's `resources` and job as plain data (`JobConfig.model_dump(mode="json")`);
    `search_params`: `search.params` as plain data, the values trials may take; `gpus_in_cluster`: the cluster's
    GPUs, None where not known (`sweep validate`: `auto` then answers as on a cluster with GPUs). `on` packs, and
    raises `PackingRefused` for any setting a pack would not train as written; `off` does not; `auto` (with
    `AUTO_PACKS`) packs where there are GPUs, a trial fits one GPU, the job does not ask to run exactly as written,
    and a pack trains every trial's settings as written."""
    mode = resources.get("packing", "auto")
    if mode == "off":
        return False
    problems = _not_as_written(job, search_params)
    if mode == "on":
        gpus = resources.get("gpus_per_trial", 1)
        refused = [(field, value, f"resources.packing is on, and {why}: packed trials would not train this setting as "
                    "written; change it, or set resources.packing: off") for field, value, why in problems]
        if gpus > 1:
            refused.append(("resources.gpus_per_trial", gpus, "resources.packing is on: a pack trains on one GPU, so a "
                            "trial needs at most 1; set resources.packing: off for trials on several GPUs"))
        if refused:
            raise PackingRefused(refused)
        return True
    return auto_unpacked(resources, job, problems, gpus_in_cluster) is None


def auto_unpacked(resources: dict, job: dict, problems: list[tuple[str, Any, str]],
                  gpus_in_cluster: Optional[float] = None) -> Optional[str]:
    """Why `packing: auto` runs one trial per process (None: it packs), given `problems` (`_not_as_written`)."""
    gpus = resources.get("gpus_per_trial", 1)
    if not AUTO_PACKS:
        return "auto does not pack in this version"
    if gpus_in_cluster is not None and gpus_in_cluster <= 0:
        return "the cluster has no GPU, and auto packs on GPUs"
    if gpus <= 0:
        return "resources.gpus_per_trial is 0, and auto packs on GPUs"
    if gpus > 1:
        return f"a trial takes {gpus:g} GPUs (resources.gpus_per_trial), and a pack trains on one"
    if job["training"].get("execution", "auto") == "as_written":
        return "training.execution is as_written"
    if problems:
        field, value, why = problems[0]
        return f"{field} = {value!r}: {why}"
    return None


def packing_said(resources: dict, job: dict, search_params: Optional[dict] = None) -> str:
    """How the trials will run, in a line for `sweep validate` (the cluster's GPUs not known: as on GPUs)."""
    mode = resources.get("packing", "auto")
    if mode == "off":
        return "one trial per process (resources.packing: off)"
    if mode == "on":
        return "packed (resources.packing: on): one pack per GPU trains the trials together"
    why = auto_unpacked(resources, job, _not_as_written(job, search_params))
    return "packed on GPUs (resources.packing: auto)" if why is None else f"one trial per process (packing auto: {why})"


# Module names of the LM head and the token embeddings across decoder families: LoRA there (PEFT allows it when
# named) is not what a pack wraps (`pack.lora.install`: the decoder's linear layers).
HEAD_AND_EMBEDDINGS = frozenset({"lm_head", "embed_tokens", "embed_out", "wte", "wpe", "word_embeddings", "output",
                                 "embed_in", "embeddings", "tok_embeddings"})


def _model_config(name: Any) -> dict:
    """The model's `config.json` as data, from its local folder or the hub's local cache; {} where neither has
    it (read when the engine loads the model)."""
    import json
    import os

    if not isinstance(name, str):
        return {}
    path = os.path.join(os.path.expanduser(name), "config.json")
    if not os.path.isfile(path):
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(name, "config.json")
        except Exception:  # noqa: BLE001 - not a repo id, or no cache: nothing to read
            cached = None
        if not isinstance(cached, str):
            return {}
        path = cached
    try:
        with open(path) as f:
            config = json.load(f)
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def _model_not_as_written(job: dict) -> list[tuple[str, Any, str]]:
    """The model's own reason a pack would not train it as written: a logit softcap or scale in its config (as
    `graphs.lm_head_not_plain` finds it in the loaded model), which the pack's loss does not apply."""
    from trial_worker.graphs import LOGIT_TRANSFORMS

    model = job.get("model") or {}
    targets = (model.get("lora") or {}).get("target_modules")
    if isinstance(targets, list):
        outside = [t for t in targets if isinstance(t, str) and (t.rsplit(".", 1)[-1] in HEAD_AND_EMBEDDINGS)]
        if outside:
            return [("model.lora.target_modules", targets, f"{', '.join(outside)} is not a decoder layer: a pack "
                     "trains LoRA on the decoder's linear layers only, not on the LM head or the embeddings")]
    name = model.get("name_or_path")
    config = _model_config(name)
    text = config.get("text_config")
    for section in (config, text if isinstance(text, dict) else {}):
        for key in LOGIT_TRANSFORMS:
            value = section.get(key)
            if value is not None and value != 1.0:
                return [("model.name_or_path", name, f"the model's config sets {key}={value}, which the pack's loss "
                         "does not apply")]
    return []


def _not_as_written(job: dict, search_params: Optional[dict]) -> list[tuple[str, Any, str]]:
    """[(field, value, why)] for each setting of the job, or value a search may give it, that packs would not
    train as written."""
    out = _model_not_as_written(job)
    for field, (ok, why) in _AS_PACKS_TRAIN.items():
        node: Any = job
        for part in field.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is not None and node != ok:
            out.append((field, node, why))
    where = searchable_params()
    for name, p in (search_params or {}).items():
        section, field = where.get(name, ("", ""))
        rule = _AS_PACKS_TRAIN.get(f"model.lora.{field}" if section == "lora" else f"{section}.{field}")
        if rule is None:
            continue
        ok, why = rule
        bad = [v for v in (p.get("values", []) if isinstance(p, dict) else []) if v != ok]
        if bad:
            out.append((f"search.params.{name}", bad[0], why))
    return out
