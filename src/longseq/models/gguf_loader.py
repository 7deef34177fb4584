"""Load a GGUF file (llama.cpp's format), dequantizing each tensor to the requested dtype as it is read (or, for a
quantized load, handing the decoder linears' blocks over packed where the layer format holds them as they are)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from longseq.config import ModelConfig
from longseq.config.gguf import from_gguf
from longseq.errors import LongseqError, first_line
from longseq.models.build import build_from_tensors

# llama.cpp tensor names -> HF names (llama.cpp `gguf-py/gguf/tensor_mapping.py`).
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "ffn_gate_inp": "mlp.gate",  # Mixtral's router
}
# Mixtral's experts, one (E, out, in) tensor per projection -> per-expert HF names (models/expert_weights.py).
_EXPERT_NAMES = {"ffn_gate_exps": "gate_proj", "ffn_up_exps": "up_proj", "ffn_down_exps": "down_proj"}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
# Metadata arrays too large to be worth decoding for the config.
_SKIPPED_FIELDS = ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges",
                   "tokenizer.ggml.scores")


def open_gguf(path: Path):
    from gguf import GGUFReader

    try:
        return GGUFReader(str(path))
    except Exception as e:  # truncated, corrupt or not a GGUF (the reader maps every tensor, so a cut file fails here)
        raise LongseqError(f"{path}: not a valid GGUF file, truncated or corrupt ({first_line(e)})") from None


def gguf_metadata(reader) -> dict[str, Any]:
    meta = {}
    for key, field in reader.fields.items():
        if key in _SKIPPED_FIELDS:
            continue
        try:
            meta[key] = field.contents()
        except Exception:  # an exotic field type we have no use for
            continue
    return meta


def hf_name(name: str) -> str | None:
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    m = _LAYER_RE.fullmatch(name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.{m.group(3)}"
    return None


def unpermute_qk(w: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (its `convert_hf_to_gguf.py` interleaves the two RoPE halves)."""
    rows = w.shape[0]
    return w.reshape(num_heads, rows // num_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def read_gguf_config(path: Path) -> ModelConfig:
    """The model config of a GGUF file, from its metadata alone (no tensor is read)."""
    return _config(open_gguf(path), path)


def _config(reader, path: Path) -> ModelConfig:
    by_name = {t.name: t for t in reader.tensors}
    embed = by_name.get("token_embd.weight")
    try:
        cfg = from_gguf(gguf_metadata(reader), vocab_size=int(embed.shape[-1]) if embed is not None else None)
    except LongseqError as e:  # from_gguf's messages do not name the file
        raise LongseqError(f"{path}: {e}") from None
    cfg.tie_word_embeddings = "output.weight" not in by_name
    return cfg


def _packed_blocks(t, name: str | None, cfg: ModelConfig, permuted: bool, types: tuple[str, ...]):
    """(name, GgufBlocks) for a decoder linear stored in one of `types` (the block types the requested
    quantization keeps packed: models/quant/gguf_int4.py's PACKED_BY_METHOD); None for anything else."""
    from longseq.models.quant import LINEAR
    from longseq.models.quant.gguf_int4 import GgufBlocks

    if name is None or t.tensor_type.name not in types or not LINEAR.match(name):
        return None
    N, K = int(t.shape[1]), int(t.shape[0])  # GGUF lists dimensions innermost first
    order = None
    if permuted and name.endswith(("q_proj.weight", "k_proj.weight")):
        heads = cfg.num_heads if name.endswith("q_proj.weight") else cfg.num_kv_heads
        order = unpermute_qk(np.arange(N), heads)
    return name, GgufBlocks(t.tensor_type.name, np.asarray(t.data), (N, K), order)


def load_gguf(path: Path, dtype: torch.dtype, device: torch.device, quant=None):
    """`quant`: models.quant.QuantLoader, quantizing the (dequantized) linears at load; with int4, Q4_0 / Q4_1 /
    Q4_K linears are handed over packed instead, with int8 Q8_0 ones (models/quant/gguf_int4.py, gguf_q8.py)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    from longseq.models.quant.gguf_int4 import PACKED_BY_METHOD

    reader = open_gguf(path)
    cfg = _config(reader, path)
    by_name = {t.name: t for t in reader.tensors}
    permuted = cfg.arch in ("llama", "mixtral")  # only llama.cpp's Llama converter (Mixtral's too) permutes Q/K

    def array(t) -> np.ndarray:
        if t.tensor_type in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
            return np.asarray(t.data)
        return dequantize(t.data, t.tensor_type)  # float32, one tensor at a time

    packed_types = PACKED_BY_METHOD.get(quant.method, ()) if quant is not None and quant.stored is None else ()

    def tensors():
        for t in reader.tensors:
            m = _LAYER_RE.fullmatch(t.name)
            if packed_types and (packed := _packed_blocks(t, hf_name(t.name), cfg, permuted, packed_types)) is not None:
                yield packed  # blocks go to the quantized layers as they are (models/quant/gguf_int4.py, gguf_q8.py)
                continue
            if m and m.group(2) in _EXPERT_NAMES and m.group(3) == "weight":
                try:
                    w = array(t)  # (E, out, in), one expert at a time to the builder
                except Exception as e:
                    raise LongseqError(f"{path}: cannot read tensor {t.name} ({first_line(e)})") from None
                for e in range(w.shape[0]):
                    yield f"model.layers.{m.group(1)}.mlp.experts.{e}.{_EXPERT_NAMES[m.group(2)]}.weight", \
                        torch.from_numpy(np.array(w[e], copy=True))
                continue
            name = hf_name(t.name)
            if name is None:
                if t.name == "rope_freqs.weight":
                    continue
                raise LongseqError(f"{path}: unsupported tensor {t.name!r} in a {cfg.arch} GGUF")
            try:  # corrupt metadata surfaces here, as a tensor that cannot be dequantized or reshaped
                w = array(t)
                if permuted and name.endswith(("q_proj.weight", "q_proj.bias")):
                    w = unpermute_qk(w, cfg.num_heads)
                elif permuted and name.endswith(("k_proj.weight", "k_proj.bias")):
                    w = unpermute_qk(w, cfg.num_kv_heads)
            except Exception as e:
                raise LongseqError(f"{path}: cannot read tensor {t.name} ({first_line(e)})") from None
            w = np.ascontiguousarray(w)
            yield name, torch.from_numpy(w if w.flags.writeable else w.copy())

    freq_factors = None
    if "rope_freqs.weight" in by_name:  # Llama 3.1 scaling, stored as per-frequency divisors
        freq_factors = torch.from_numpy(np.array(by_name["rope_freqs.weight"].data, dtype=np.float32))
    return build_from_tensors(cfg, tensors(), dtype, device, source=str(path), freq_factors=freq_factors,
                              quant=quant)
