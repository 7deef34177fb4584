"""The KV cache of memory attention for `generate`: InfLLM (Xiao et al. 2024, arXiv 2402.04617).

Each layer keeps sinks, a local window and a memory of past blocks (attention/memory.py's LayerMemory, where the
attention and its positions are explained). The cache hands out positions that keep RoPE within
window + block_size whatever the text's length, so generation runs past the model's context; the memory itself
grows with the text (all past K/V is kept: on the device, or in host memory with `memory_placement` host).

Same contract as the other caches: `prepare(n)` gives the positions of the next n tokens, the model runs with them
(each layer calling `attention`), then `advance(n)`.
"""

from __future__ import annotations

import torch

from longseq.attention.memory import LayerMemory, query_positions, reference_memory_attention, rope_table
from longseq.config import ModelConfig
from longseq.config.policy import MEMORY_PREFILL_TOKENS
from longseq.errors import LongseqError


class MemoryKVCache:
    """Per layer: LayerMemory (sinks, recent tokens, block memory); `length` is the tokens seen so far."""

    def __init__(self, cfg: ModelConfig, batch_size: int, device: torch.device | str, dtype: torch.dtype,
                 inv_freq: torch.Tensor):
        self.spec = spec = cfg.attention
        spec.check_context(cfg.max_seq_len)
        span = spec.local_window + spec.block_size  # positions 0 .. span-1 are all the model sees
        if cfg.rope.type == "dynamic" and span > cfg.rope.original_max_position_embeddings:
            # Dynamic NTK changes the frequencies with the longest position of each call: stored keys could not be
            # re-rotated consistently.
            raise LongseqError("memory attention with dynamic NTK RoPE needs window + block size <= the native "
                               f"context ({cfg.rope.original_max_position_embeddings})")
        self.device = torch.device(device)
        table = rope_table(inv_freq, span, dtype, device)
        self.layers = [LayerMemory(spec, batch_size, cfg.num_kv_heads, cfg.head_dim, device, dtype, table)
                       for _ in range(cfg.num_layers)]
        self.length = 0
        self.pending = 0

    def prefill_chunk(self) -> int:
        """Prompt tokens per forward: whole query blocks, about MEMORY_PREFILL_TOKENS."""
        bs = self.spec.block_size
        return bs * max(1, MEMORY_PREFILL_TOKENS // bs)

    def prepare(self, num_tokens: int) -> torch.Tensor:
        """Positions (1, n) of the next n tokens, each in its query block's frame."""
        self.pending = num_tokens
        return query_positions(num_tokens, self.spec, self.device)[None]

    def attention(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  window: int | None) -> torch.Tensor:
        """q (B, H, n, D), k/v (B, H_kv, n, D) rotated at the positions `prepare` gave -> (B, H, n, D). The layer's
        own sliding window (None under memory attention) gives way to the memory's local window."""
        return self.layers[layer_idx].attend(q, k, v)

    def advance(self, num_tokens: int) -> None:
        assert num_tokens == self.pending, "advance() must follow prepare() with the same count"
        self.length += num_tokens
        self.pending = 0

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)


class ReferenceMemoryCache:
    """The naive memory cache for tests: keeps every token's K/V un-rotated and attends each query block
    with `reference_memory_attention` at true positions. Same `prepare` / `attention` / `advance` contract (and the
    same positions, which it un-rotates its inputs from)."""

    def __init__(self, cfg: ModelConfig, inv_freq: torch.Tensor | None):
        self.spec, self.inv_freq = cfg.attention, inv_freq
        self.keys: list[torch.Tensor | None] = [None] * cfg.num_layers  # (B, H_kv, T, D) un-rotated
        self.values: list[torch.Tensor | None] = [None] * cfg.num_layers
        self.length = 0

    def _unrotate(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        if self.inv_freq is None:
            return x
        half = x.shape[-1] // 2
        z = torch.complex(x[..., :half].double(), x[..., half:].double())
        angle = -positions.double()[:, None] * self.inv_freq.double()  # (n, D/2)
        z = z * torch.polar(torch.ones_like(angle), angle)
        return torch.cat([z.real, z.imag], dim=-1).to(x.dtype)

    def prepare(self, num_tokens: int) -> torch.Tensor:
        self._positions = query_positions(num_tokens, self.spec, "cpu")
        return self._positions[None]

    def attention(self, layer_idx, q, k, v, window):
        q, k = self._unrotate(q, self._positions), self._unrotate(k, self._positions)
        old_k, old_v = self.keys[layer_idx], self.values[layer_idx]
        self.keys[layer_idx] = k if old_k is None else torch.cat([old_k, k], dim=2)
        self.values[layer_idx] = v if old_v is None else torch.cat([old_v, v], dim=2)
        out, bs = [], self.spec.block_size
        for a in range(0, q.shape[2], bs):
            end = self.length + min(a + bs, q.shape[2])
            out.append(reference_memory_attention(q[:, :, a : a + bs], self.keys[layer_idx][:, :, :end],
                                                  self.values[layer_idx][:, :, :end], self.spec, self.inv_freq))
        return torch.cat(out, dim=2)

    def advance(self, num_tokens: int) -> None:
        self.length += num_tokens
