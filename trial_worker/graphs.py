"""A trial's training micro-steps: the token-summed loss, and CUDA graphs that replay them.

Why graphs: at small effective batches a QLoRA step of a 1B model is bound by the host, not
the GPU. On an H200 an effective-batch-2 step (~900 real tokens) took ~0.2 s of which the GPU
ran kernels for ~23 ms (benchmarks/README.md): ~1,100 kernel launches a step, each behind the
Python of PEFT's LoRA layers, bitsandbytes' 4-bit autograd functions and transformers. A CUDA
graph replays the whole forward and backward of a micro-batch with one launch.

What is captured, per micro-batch shape: the model's forward over a padding-free micro-batch
(`data.FlatCollator`), the loss (`token_nll`), and the gradients of the trainable (LoRA)
parameters (`torch.autograd.grad`) into static buffers. What stays eager: the optimizer step,
gradient clipping, the LR schedule, logging, checkpoints and evaluation. The graph's gradients
reach the parameters through the backward of the loss tensor `StepGraphs.run` returns
(`GraphGrads`), multiplied by whatever gradient the Trainer's backward sends in, so the
Trainer's own loss scaling and gradient accumulation apply exactly as for an eager step.

Shapes: a graph is keyed by the micro-batch's token count, which the collator rounds up to a
bucket (`data.bucket_length`; coarser buckets with graphs, since a host-bound step pays nothing
for a little padding); the row boundaries are padded with empty rows to a fixed count and the
varlen kernel's maximum row length is the bucket length (flash attention only sizes its grid by
it). All graphs share one memory pool: each graph's intermediates are dead when it ends, and
graphs never run concurrently.

Left eager (and so no graphs): the CPU, gradient checkpointing (its recomputation saves and
restores RNG state, which a capture cannot), an LM head that is more than hidden @ W^T or is
trained (`lm_head_not_plain`: TRL's fused head then), an attention other than ours
(`runs_varlen`), TRL's own packing, and anything `capture` fails on (the trial then runs
eagerly, and says so once on stderr).
"""

from __future__ import annotations

import contextlib
import sys
from typing import Any, Optional

IGNORE_INDEX = -100
# Logits of the LM head are built this many elements at a time (fp32): ~0.5 GiB per chunk, so
# the loss never holds the [tokens, vocab] logits of a whole micro-batch.
LOGIT_CHUNK_ELEMENTS = 2 ** 27
# Inputs of a padding-free micro-batch that the backbone takes (data.FlatCollator's keys).
FLAT_INPUTS = ("input_ids", "position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


def _chunked_nll():
    import torch

    class ChunkedNLL(torch.autograd.Function):
        """Per-token -log softmax(h W^T)[label] (0 where the label is ignored); d/dh computed in the forward.

        The LM head runs chunk by chunk: one matmul per chunk forward and one for the gradient,
        nothing recomputed, and no host sync (TRL's fused head indexes the label positions with a
        boolean mask, Liger's counts them with `.item()`: both stop a CUDA graph capture, and a
        sync mid-step stalls the GPU). The LM head is frozen: no dW.
        """

        @staticmethod
        def forward(ctx, hidden, weight, labels, chunk):
            out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
            grad = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
            for s in range(0, hidden.shape[0], chunk):
                h, y = hidden[s:s + chunk].to(weight.dtype), labels[s:s + chunk]
                logits = (h @ weight.t()).float()
                valid = (y != IGNORE_INDEX).float()
                target = y.clamp(min=0)[:, None]
                lse = torch.logsumexp(logits, dim=-1)
                out[s:s + chunk] = (lse - logits.gather(1, target)[:, 0]) * valid
                if grad is not None:
                    probs = logits.sub_(lse[:, None]).exp_()  # softmax, in place
                    probs.scatter_add_(1, target, -valid[:, None])  # minus one-hot of the label
                    probs.mul_(valid[:, None])
                    grad[s:s + chunk] = (probs.to(weight.dtype) @ weight).to(grad.dtype)
            ctx.save_for_backward(grad)
            return out

        @staticmethod
        def backward(ctx, g):
            (grad,) = ctx.saved_tensors
            return grad * g[:, None].to(grad.dtype), None, None, None

    return ChunkedNLL


_NLL: Any = None


def per_token_nll(hidden, weight, labels):
    """[tokens] fp32: each position's next-token NLL under the LM head `weight` (0 where `labels` is -100).

    `hidden` [tokens, hidden] and `labels` [tokens] are already aligned (label t is what position t
    predicts). Differentiable in `hidden`; no host sync.
    """
    global _NLL
    if _NLL is None:
        _NLL = _chunked_nll()
    return _NLL.apply(hidden, weight, labels, max(1, LOGIT_CHUNK_ELEMENTS // weight.shape[0]))


# Config fields with which a model's logits are more than `hidden @ W^T` (TRL's fused head reads the same ones).
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling")


def lm_head_not_plain(model) -> Optional[str]:
    """Why `per_token_nll` cannot stand for this model's LM head (None: it can): a logit softcap or scale in its
    config, a bias, or a trainable head (`per_token_nll` computes no weight gradient)."""
    backbone, head = causal_lm_parts(model)
    config = backbone.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in LOGIT_TRANSFORMS:
        value = getattr(text, name, None)
        if value is not None and value != 1.0:
            return f"its config sets {name}={value}"
    if getattr(head, "bias", None) is not None:
        return "its LM head has a bias"
    if head.weight.requires_grad:
        return "its LM head is trained"
    return None


def causal_lm_parts(model):
    """(backbone, LM head) of a (PEFT-wrapped) causal LM: the head is applied by `token_nll`, in chunks."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    return lm.base_model, lm.get_output_embeddings()


def token_nll(model, batch: dict, n_items, *, autocast_dtype=None):
    """The training loss of a micro-batch: summed next-token NLL of its label tokens / `n_items`.

    `n_items` is the label-token count of the whole effective batch (the Trainer's
    `num_items_in_batch`), so the loss is the token-mean over the effective batch however it
    is split into micro-batches. No host sync: the same code runs eagerly and under capture.
    """
    import torch

    backbone, head = causal_lm_parts(model)
    inputs = {k: batch[k] for k in FLAT_INPUTS if k in batch}
    if "attention_mask" in batch:
        inputs["attention_mask"] = batch["attention_mask"]
    # The autocast accelerate wraps a prepared model's forward in (the backbone is called directly here);
    # no cast cache, which a CUDA graph capture must not keep.
    ctx = (torch.autocast(batch["input_ids"].device.type, dtype=autocast_dtype, cache_enabled=False)
           if autocast_dtype is not None else contextlib.nullcontext())
    with ctx:
        hidden = backbone(**inputs, use_cache=False).last_hidden_state
    labels = batch["labels"]
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    y = labels[:, 1:].reshape(-1)
    total = per_token_nll(h, head.weight, y).sum()
    if n_items is None:
        n_items = (y != IGNORE_INDEX).sum()
    return total / torch.as_tensor(n_items, device=total.device).clamp(min=1)


_MASKS: dict = {}


def runs_varlen(model) -> bool:
    """Whether `model` attends with `model.FLAT_ATTENTION` (sdpa, and the varlen kernel for padding-free batches)."""
    from trial_worker._compat import attn_implementation
    from trial_worker.model import FLAT_ATTENTION, _varlen_kernel

    return attn_implementation(getattr(model, "config", None)) == FLAT_ATTENTION and _varlen_kernel() is not None


def varlen_inputs(batch: dict, model) -> dict:
    """`batch`, with a 4-D placeholder attention mask where `model`'s varlen kernel will run (model.flat_attention).

    transformers returns a 4-D mask as it is (`masking_utils._preprocess_mask_arguments`), so no
    [tokens x tokens] mask is built from the position ids of a padding-free micro-batch (1 GiB at
    32k tokens, and a host sync), which the varlen kernel never reads. Anywhere else (the CPU, another
    attention implementation, which would read the placeholder as "attend to everything") `batch` is
    returned unchanged: the mask built from the position ids is what keeps its rows apart.
    """
    cu = batch.get("cu_seq_lens_q")
    if cu is None or not cu.is_cuda or batch["input_ids"].shape[0] != 1 or "attention_mask" in batch \
            or not runs_varlen(model):
        return batch
    import torch

    mask = _MASKS.get(cu.device)
    if mask is None:
        mask = _MASKS[cu.device] = torch.ones((1, 1, 1, 1), dtype=torch.bool, device=cu.device)
    return {**batch, "attention_mask": mask}


def _graph_grads():
    import torch

    from trial_worker._compat import foreach_mul

    class GraphGrads(torch.autograd.Function):
        """The replayed loss, whose backward hands the graph's parameter gradients to autograd.

        Scaled by the incoming gradient, so `loss / k` or any other scaling the Trainer applies
        before its backward reaches the parameters as it would from an eager step; autograd's
        own accumulation then adds them into `.grad`.
        """

        @staticmethod
        def forward(ctx, loss, grads, *params):
            ctx.grads = grads
            return loss.clone()

        @staticmethod
        def backward(ctx, g):
            return (None, None, *foreach_mul(ctx.grads, g))

    return GraphGrads


class _Graph:
    def __init__(self, graph, inputs: dict, n_items, loss, grads):
        self.graph, self.inputs, self.n_items, self.loss, self.grads = graph, inputs, n_items, loss, grads


class StepGraphs:
    """One CUDA graph per micro-batch shape, each a captured `token_nll` forward + backward.

    `run(batch, n_items)` returns the micro-batch's loss with its gradients pending on its
    backward, or None when this micro-batch must run eagerly: the very first one (kernels,
    allocator and library state are warmed by a real step before anything is captured), or
    after a failed capture.
    """

    STATIC = ("input_ids", "labels", "position_ids", "cu_seq_lens_q")

    def __init__(self, model, *, row_slots: int, autocast_dtype=None):
        import torch

        self.model = model
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.row_slots = row_slots
        self.autocast_dtype = autocast_dtype
        self.graphs: dict[int, _Graph] = {}
        self.pool: Any = None
        self.stream = torch.cuda.Stream()
        self.warm = False
        self.failures = 0
        self.disabled: Optional[str] = None
        self.replays = 0
        self._apply = _graph_grads().apply

    def fits(self, batch: dict) -> bool:
        cu = batch.get("cu_seq_lens_q")
        return (self.disabled is None and cu is not None and cu.is_cuda and batch["input_ids"].shape[0] == 1
                and cu.shape[0] == self.row_slots + 1 and int(batch["max_length_q"]) == batch["input_ids"].shape[1]
                and "attention_mask" in batch)  # varlen_inputs' placeholder: the varlen kernel will run

    def run(self, batch: dict, n_items) -> Any:
        import torch

        if not self.warm or not self.fits(batch):
            self.warm = True
            return None
        key = batch["input_ids"].shape[1]
        rec = self.graphs.get(key)
        if rec is None:
            rec = self._capture(batch, n_items)
            if rec is None:
                return None
            self.graphs[key] = rec
        else:
            for k, t in rec.inputs.items():
                t.copy_(batch[k], non_blocking=True)
            rec.n_items.copy_(torch.as_tensor(n_items), non_blocking=True)
        rec.graph.replay()
        self.replays += 1
        return self._apply(rec.loss, rec.grads, *self.params)

    def _inputs(self, static: dict) -> dict:
        length = static["input_ids"].shape[1]
        return varlen_inputs({**static, "cu_seq_lens_k": static["cu_seq_lens_q"], "max_length_q": length,
                              "max_length_k": length}, causal_lm_parts(self.model)[0])

    def _capture(self, batch: dict, n_items) -> Optional[_Graph]:
        import torch

        static = {k: batch[k].clone() for k in self.STATIC}
        n = torch.as_tensor(n_items, dtype=torch.float32).to(static["input_ids"].device).clone()
        graph = torch.cuda.CUDAGraph()
        # The blocks the eager micro-steps left cached go back to the device first, so the graph's own pool can
        # reuse that memory instead of adding to it (as `torch.cuda.graph` does; one sync per capture).
        torch.cuda.empty_cache()
        self.stream.wait_stream(torch.cuda.current_stream())
        try:
            with torch.cuda.stream(self.stream):
                # thread_local: CUDA calls of other threads (the dataloader's pinning) do not break the capture.
                graph.capture_begin(pool=self.pool, capture_error_mode="thread_local")
                try:
                    loss = token_nll(self.model, self._inputs(static), n, autocast_dtype=self.autocast_dtype)
                    grads = torch.autograd.grad(loss, self.params, allow_unused=True)
                finally:
                    graph.capture_end()
        except torch.OutOfMemoryError:
            torch.cuda.current_stream().wait_stream(self.stream)
            raise
        except RuntimeError as e:  # an op that cannot be captured: this micro-batch runs eagerly
            torch.cuda.current_stream().wait_stream(self.stream)
            self.failures += 1
            first = (str(e).strip().splitlines() or ["?"])[0][:300]
            if self.failures >= 2:
                self.disabled = first
                print(f"sweep: CUDA graphs off for this trial (capture failed twice: {first}); training runs eagerly",
                      file=sys.stderr, flush=True)
            return None
        torch.cuda.current_stream().wait_stream(self.stream)
        if self.pool is None:
            self.pool = graph.pool()
        grads = [g if g is not None else torch.zeros_like(p) for g, p in zip(grads, self.params)]
        return _Graph(graph, static, n, loss.detach(), grads)


# Graphs by default only where a micro-batch holds at most this many tokens (micro-batch x max_seq_length):
# there the step is bound by the host. H200, Llama-3.2-1B shape, realistic rows (2026-11-30): graphs
# gave +48% tokens/s at 2 x 1,024 and +35% at 8 x 1,024, but -12% at 32 x 1,024, where the step is
# bound by the GPU and the coarser buckets only add padding (benchmarks/README.md).
GRAPH_MAX_TOKENS = 8 * 1024


def graphs_wanted(setting: Optional[bool], *, cpu: bool, gradient_checkpointing: bool, packing: bool,
                  micro_batch_tokens: int = 0) -> bool:
    """CUDA graphs for a trial's micro-steps: `training.cuda_graphs`, or by default where the host is the limit."""
    if cpu or gradient_checkpointing or packing:
        return False
    return micro_batch_tokens <= GRAPH_MAX_TOKENS if setting is None else setting
