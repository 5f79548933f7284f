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
