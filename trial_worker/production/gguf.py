"""`sweep export-gguf`: a merged Llama-architecture model as one GGUF file, for llama.cpp and Ollama.

Written with the `gguf` package's `GGUFWriter` (llama.cpp's own Python writer, the one its
`convert_hf_to_gguf.py` uses); there is no HF-to-GGUF converter in transformers or in the
`gguf` package itself, so this module does that converter's job for the Llama architecture:

- hyperparameters under llama.cpp's `llama.*` keys;
- tensors renamed by `gguf`'s own name map (`model.layers.0.self_attn.q_proj.weight` ->
  `blk.0.attn_q.weight`); q/k rows permuted from HF's rotate-half RoPE layout to llama.cpp's
  interleaved one (transformers' GGUF loader undoes exactly this); norms kept in f32, the
  matrices in the chosen type (by default the checkpoint's own: a bf16 merge stays bf16,
  bit for bit; or f16 / f32 / q8_0);
- the byte-level BPE tokenizer (tokens, token types, merges, special ids, pre-tokenizer name)
  and the chat template, so `AutoTokenizer.from_pretrained(folder, gguf_file=...)` and
  llama.cpp rebuild the same tokenizer.

The file loads back with `AutoModelForCausalLM.from_pretrained(folder, gguf_file=...)`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

from trial_worker.inputs.demo import LLAMA3_SPLIT

OUT_TYPES = ("auto", "f16", "bf16", "f32", "q8_0")
# `auto`: the checkpoint's own dtype, so the file holds exactly the merged weights.
_AUTO_TYPES = {"bfloat16": "bf16", "float16": "f16", "float32": "f32"}
# llama.cpp's pre-tokenizer names for the splits we can recognise in a tokenizer.json.
_PRE_TOKENIZERS = {LLAMA3_SPLIT: "llama-bpe"}
_NORMAL, _CONTROL, _USER_DEFINED = 1, 3, 4  # llama.cpp's token types


class GGUFExportError(ValueError):
    """The model or tokenizer cannot be written as GGUF (not Llama, not byte-level BPE, ...)."""


def _permute(w, n_head: int):
    """HF's q/k row order (rotate-half RoPE) -> llama.cpp's (interleaved pairs), per head."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _pre_tokenizer_name(tokenizer_json: dict) -> str:
    pre = tokenizer_json.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt2"
    for step in pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else []:
        if step.get("type") == "Split":
            regex = (step.get("pattern") or {}).get("Regex")
            if regex in _PRE_TOKENIZERS:
                return _PRE_TOKENIZERS[regex]
    raise GGUFExportError(
        f"the tokenizer's pre-tokenizer {json.dumps(pre)[:200]} has no llama.cpp name we know; "
        f"known: GPT-2 byte-level, and the splits of {sorted(_PRE_TOKENIZERS.values())}"
    )


def _add_tokenizer(writer, tokenizer) -> None:
    data = json.loads(tokenizer.backend_tokenizer.to_str())
    model = data.get("model") or {}
    if model.get("type") != "BPE" or "ByteLevel" not in json.dumps(data.get("decoder")):
        raise GGUFExportError(f"only byte-level BPE tokenizers can be written (GGUF `gpt2`); this one is {model.get('type')!r}")
    vocab = tokenizer.get_vocab()
    tokens = [""] * len(vocab)
    for token, i in vocab.items():
        tokens[i] = token
    added = {t["id"]: t for t in data.get("added_tokens", [])}
    types = [(_CONTROL if added[i]["special"] else _USER_DEFINED) if i in added else _NORMAL for i in range(len(tokens))]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer_name(data))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for name, add in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id),
                      ("pad_token_id", writer.add_pad_token_id), ("unk_token_id", writer.add_unk_token_id)):
        token_id = getattr(tokenizer, name, None)
        if isinstance(token_id, int) and token_id >= 0:
            add(token_id)
    # Whether plain text starts with BOS: what the tokenizer itself does.
    probe = tokenizer("a")["input_ids"]
    writer.add_add_bos_token(bool(probe) and probe[0] == tokenizer.bos_token_id)
    writer.add_add_eos_token(False)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def _check_type(out_type: str) -> None:
    if out_type not in OUT_TYPES:
        raise GGUFExportError(f"the GGUF type is {out_type!r}, but must be one of {', '.join(OUT_TYPES)}")


def export_gguf(model_dir: str | os.PathLike, out_file: str | os.PathLike, *, out_type: str = "auto",
                log: Callable[[str], None] = print) -> Path:
    """Write the model folder `model_dir` (a merged Llama checkpoint with its tokenizer) as the GGUF file `out_file`."""
    import gguf
    import numpy as np
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    _check_type(out_type)
    config = AutoConfig.from_pretrained(model_dir)
    if config.model_type != "llama":
        raise GGUFExportError(f"{model_dir}: model_type is {config.model_type!r}; only 'llama' models can be written as GGUF here")
    if out_type == "auto":
        out_type = _AUTO_TYPES.get(str(getattr(config, "dtype", None) or "").replace("torch.", ""), "f16")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    n_head, n_kv = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    rope = getattr(config, "rope_parameters", None) or {}
    rope_theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    if rope.get("rope_type", "default") != "default":
        raise GGUFExportError(f"{model_dir}: RoPE scaling {rope.get('rope_type')!r} is not written here; only the default RoPE")

    out = Path(out_file)
    out.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(out), arch="llama")
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(Path(model_dir).resolve().name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_rope_dimension_count(head_dim)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(rope_theta)
    writer.add_vocab_size(config.vocab_size)
    file_type = {"f16": gguf.LlamaFileType.MOSTLY_F16, "bf16": gguf.LlamaFileType.MOSTLY_BF16,
                 "f32": gguf.LlamaFileType.ALL_F32, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[out_type]
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_tokenizer(writer, tokenizer)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for name, tensor in model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue  # llama.cpp reuses token_embd when there is no output.weight
        new = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise GGUFExportError(f"{model_dir}: no GGUF name for the tensor {name!r}")
        w = tensor.detach().float().numpy()
        if name.endswith("q_proj.weight"):
            w = _permute(w, n_head)
        elif name.endswith("k_proj.weight"):
            w = _permute(w, n_kv)
        if w.ndim == 1 or out_type == "f32":
            writer.add_tensor(new, np.ascontiguousarray(w, dtype=np.float32))
        elif out_type == "f16":
            writer.add_tensor(new, w.astype(np.float16))
        else:
            qtype = gguf.GGMLQuantizationType.BF16 if out_type == "bf16" else gguf.GGMLQuantizationType.Q8_0
            writer.add_tensor(new, gguf.quants.quantize(w, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    log(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB, {out_type})")
    return out


def export_run_gguf(target: str | os.PathLike, out_file: str | os.PathLike | None = None, *, out_type: str = "auto",
                    log: Callable[[str], None] = print) -> Path:
    """GGUF of a `sweep train` output folder (its `merged/`, merged now if missing) or of a model folder.

    Default file: `<run>/<name>.gguf` beside `merged/` (for a model folder: inside it).
    """
    from trial_worker.production import MERGED_DIR, ProductionError, load_run, merge_adapter

    _check_type(out_type)
    target = Path(target)
    if (target / "config.json").is_file():
        model_dir = target
    elif (target / MERGED_DIR / "config.json").is_file():
        model_dir = target / MERGED_DIR
    else:
        try:
            job, adapter = load_run(target)
        except ProductionError as e:
            raise GGUFExportError(f"{target} is neither a model folder (config.json) nor a finished `sweep train` "
                                  f"output: {e}") from None
        log(f"{target} has no {MERGED_DIR}/: merging the adapter into the base first")
        model_dir = merge_adapter(job, adapter, target / MERGED_DIR)
    out = Path(out_file) if out_file else target / f"{target.resolve().name}.gguf"
    return export_gguf(model_dir, out, out_type=out_type, log=log)
