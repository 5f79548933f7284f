"""The QLoRA model: tokenizer + base in 4 bit (bitsandbytes NF4/FP4) + LoRA adapters (PEFT)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from trial_worker.config import ModelConfig, TrainingConfig
from trial_worker.formats import bnb_config, dtype_of, peft_lora_config

if TYPE_CHECKING:  # pragma: no cover
    from peft import PeftModel
    from transformers import PreTrainedTokenizerBase

# A plain turn-based template for tokenizers that ship none (base models): prompt-completion
# data needs some chat template. Models with their own template keep it.
FALLBACK_CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '### ' + message['role'] | capitalize + ':\\n' + message['content'] | trim + '\\n\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '### Assistant:\\n' }}{%- endif %}"
)


def use_cpu(training: TrainingConfig) -> bool:
    """CPU when the job says so, or when no GPU is visible."""
    import torch

    if training.use_cpu is not None:
        return training.use_cpu
    return not torch.cuda.is_available()


# Our attention implementation (registered with transformers by `register_attention`): sdpa, except
# that a padding-free micro-batch (data.FlatCollator) on a CUDA GPU runs flash-attention's varlen
# kernel from torch itself (`torch.nn.attention.varlen`), so each row attends only to itself at a cost
# that grows with the sum of the squared row lengths, not with the square of the whole micro-batch.
FLAT_ATTENTION = "sdpa_varlen"


def _varlen_kernel():
    """torch's flash-attention varlen kernel (torch >= 2.10, CUDA), or None."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def flat_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function: varlen flash attention over a padding-free micro-batch, else sdpa.

    query/key/value arrive as [batch, heads, tokens, head_dim]. A padding-free micro-batch is one
    sequence (batch 1) with `cu_seq_lens_q` (row boundaries, from the collator); the kernel takes
    [tokens, heads, head_dim] and, for grouped-query attention, as many key/value heads as query heads.
    Everything else (padded validation batches, generation, the CPU) goes to transformers' sdpa,
    which keeps packed rows apart with the block-diagonal mask built from the position ids. cuDNN's
    sdpa is left out there: it builds a graph per new shape, milliseconds of host time per layer.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cu = kwargs.get("cu_seq_lens_q")
    varlen = _varlen_kernel()
    if cu is not None and varlen is not None and query.is_cuda and query.shape[0] == 1 and dropout == 0.0:
        q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))
        if k.shape[1] != q.shape[1]:
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
            v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
        longest = int(kwargs["max_length_q"])
        out = varlen(q, k, v, cu, cu, longest, longest, scale=scaling, window_size=(-1, 0))  # (-1, 0): causal
        return out[None], None
    if query.is_cuda:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
            return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                          **kwargs)
    return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)


def register_attention() -> None:
    """Make `FLAT_ATTENTION` an attention implementation transformers knows (masks built as for sdpa)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(FLAT_ATTENTION, flat_attention)
    AttentionMaskInterface.register(FLAT_ATTENTION, sdpa_mask)


def load_tokenizer(cfg: ModelConfig) -> "PreTrainedTokenizerBase":
    """The model's tokenizer, with a pad token and a chat template guaranteed."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(cfg.name_or_path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    if tok.pad_token is None:
        # The pad id never reaches the loss (labels are -100 there), so eos is a safe stand-in.
        tok.pad_token = tok.eos_token
    if not tok.chat_template:
        tok.chat_template = FALLBACK_CHAT_TEMPLATE
    tok.padding_side = "right"
    return tok


def load_base(cfg: ModelConfig, *, cpu: bool):
    """The frozen base model: 4-bit when `quantization.load_in_4bit`, else in the compute dtype."""
    import torch
    from transformers import AutoModelForCausalLM

    q = cfg.quantization
    compute_dtype = dtype_of(q.bnb_4bit_compute_dtype)
    kwargs = dict(
        revision=cfg.revision,
        trust_remote_code=cfg.trust_remote_code,
        dtype=compute_dtype,
        device_map={"": "cpu"} if cpu else {"": torch.cuda.current_device()},
    )
    register_attention()
    # Ours is sdpa, with torch's varlen kernel for padding-free micro-batches on CUDA: "sdpa" in a spec gets it too.
    kwargs["attn_implementation"] = FLAT_ATTENTION if cfg.attn_implementation in (None, "sdpa") else cfg.attn_implementation
    if q.load_in_4bit:
        from trial_worker._compat import import_bitsandbytes

        import_bitsandbytes()  # before transformers imports it, without the compiler stack it would pull in
        kwargs["quantization_config"] = bnb_config(cfg)
    try:
        model = AutoModelForCausalLM.from_pretrained(cfg.name_or_path, **kwargs)
    except ValueError as e:
        # Ours is sdpa underneath; an architecture transformers runs without sdpa (Gemma 2's attention softcap,
        # say) gets transformers' own choice for it, unless the spec named another.
        if cfg.attn_implementation not in (None, "sdpa") or "does not support an attention implementation" not in str(e):
            raise
        kwargs.pop("attn_implementation")
        model = AutoModelForCausalLM.from_pretrained(cfg.name_or_path, **kwargs)
    model.config.use_cache = False  # training; the KV cache only costs memory here
    if cpu and q.load_in_4bit:
        keep_cpu_4bit_trainable(model)
    return model


def keep_cpu_4bit_trainable(model) -> None:
    """Stop bitsandbytes from repacking 4-bit weights for CPU inference when the model is evaluated.

    On CPUs with AVX512-BF16, `Linear4bit` in eval mode converts its weight to an
    inference-only layout and keeps it; training afterwards runs through `gemv_4bit`, which
    has no backward, so LoRA layers below it get no gradient. Evaluating between rungs
    would silently break training from the first rung on.
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def freeze_base(model) -> None:
    """Freeze every base weight, keeping its dtype (our replacement for PEFT's k-bit preparation).

    `peft.prepare_model_for_kbit_training` also upcasts norms and embeddings to fp32. With a
    bf16 compute dtype that makes each RMSNorm return fp32 activations, so every 4-bit layer
    casts its input to bf16 and its output back to fp32: on an H100 those casts were ~25% of
    a Llama-3.2-1B step's GPU time (benchmarks/profile_trial.py). Llama's RMSNorm computes its
    variance in fp32 anyway, so keeping the weights in the compute dtype loses nothing that
    matters, and the loss matches the seed stack's (benchmarks/results/trial_throughput.json).
    """
    for param in model.parameters():
        param.requires_grad_(False)


def add_lora(model, cfg: ModelConfig, *, gradient_checkpointing: bool) -> "PeftModel":
    """Freeze the base and wrap it with LoRA adapters (QLoRA when the base is 4-bit)."""
    from peft import get_peft_model

    freeze_base(model)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return get_peft_model(model, peft_lora_config(cfg))


def load_model(cfg: ModelConfig, training: TrainingConfig):
    """(tokenizer, PEFT model): the whole QLoRA model of a job, on the job's device."""
    tokenizer = load_tokenizer(cfg)
    base = load_base(cfg, cpu=use_cpu(training))
    # Checkpointing is switched on by the Trainer when the execution plan asks for it
    # (trial_worker.execution), not fixed here, so a probe can try the model both ways.
    model = add_lora(base, cfg, gradient_checkpointing=False)
    return tokenizer, model
