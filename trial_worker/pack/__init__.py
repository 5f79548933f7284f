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
"""

from typing import Any, Optional

# Settings a pack would not train as written (a pack has no sequence packing, no trained biases, no fp16 loss
# scaling, its own data order): field -> (the setting packs take, why not the others). Checked with
# `resources.packing: on` (sweep validate) and by `packing: auto`, which then runs one trial per process.
_AS_PACKS_TRAIN = {
    "data.packing": (False, "TRL's sequence packing (rows concatenated to max_seq_length) is not how a pack batches rows"),
    "model.lora.bias": ("none", "a pack trains LoRA adapters only, not the base's biases"),
    "training.fp16": (False, "a pack trains in the base's compute dtype without fp16 loss scaling (use bf16)"),
    "training.group_by_length": (False, "a pack draws each trial's rows in its own seeded order, not grouped by length"),
}
_SEARCH_NAMES = {"packing": "data.packing", "group_by_length": "training.group_by_length", "fp16": "training.fp16"}


def unpackable(job: dict, search_params: Optional[dict] = None) -> list[tuple[str, Any, str]]:
    """What packed trials could not train as written: [(field, value, why)], from the job (a `JobConfig` as a
    dict) and the values a search may give it (`search.params` as a dict); [] when a pack can train every trial."""
    out = []
    for field, (ok, why) in _AS_PACKS_TRAIN.items():
        node: Any = job
        for part in field.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is not None and node != ok:
            out.append((field, node, why))
    for name, p in (search_params or {}).items():
        if name not in _SEARCH_NAMES:
            continue
        ok, why = _AS_PACKS_TRAIN[_SEARCH_NAMES[name]]
        bad = [v for v in (p.get("values", []) if isinstance(p, dict) else []) if v != ok]
        if bad:
            out.append((f"search.params.{name}", bad[0], why))
    return out
