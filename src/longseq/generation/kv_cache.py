"""A contiguous, preallocated KV cache for `generate` (the paged cache belongs to the serving engine)."""

from __future__ import annotations

import torch

from longseq.attention import attention
from longseq.config import ModelConfig


class KVCache:
    """K and V of every layer for `batch_size` sequences of up to `max_seq_len` tokens, all the same length.

    Memory: 2 * num_layers * batch_size * num_kv_heads * max_seq_len * head_dim * dtype bytes (GQA/MQA keep
    it small). The model writes through `update`; the caller moves `length` on with `advance` after a forward.
    """

    def __init__(
        self, cfg: ModelConfig, batch_size: int, max_seq_len: int, device: torch.device | str, dtype: torch.dtype
    ):
        shape = (batch_size, cfg.num_kv_heads, max_seq_len, cfg.head_dim)  # (B, H_kv, T, D)
        self.k = [torch.empty(shape, device=device, dtype=dtype) for _ in range(cfg.num_layers)]
        self.v = [torch.empty(shape, device=device, dtype=dtype) for _ in range(cfg.num_layers)]
        self.max_seq_len = max_seq_len
        self.length = 0
        self.variant = cfg.attention  # masks beyond the window, ALiBi, chunked compute

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, H_kv, S, D) after the cached tokens; return views of all keys and values so far."""
        end = self.length + k.shape[2]
        if end > self.max_seq_len:
            raise ValueError(f"KV cache holds {self.max_seq_len} tokens; {end} requested")
        self.k[layer_idx][:, :, self.length : end] = k
        self.v[layer_idx][:, :, self.length : end] = v
        return self.k[layer_idx][:, :, :end], self.v[layer_idx][:, :, :end]

    def attention(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  window: int | None) -> torch.Tensor:
        """Store this step's k, v (B, H_kv, S, D), then attend q (B, H, S, D) over all cached positions."""
        q_start = self.length
        k_all, v_all = self.update(layer_idx, k, v)  # (B, H_kv, q_start + S, D)
        return attention(q, k_all, v_all, q_start=q_start, window=window, variant=self.variant)

    def prepare(self, num_tokens: int) -> None:
        """Positions of the next tokens: None, the model's default (they follow the cached ones)."""
        return None

    def advance(self, num_tokens: int) -> None:
        self.length += num_tokens

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)
