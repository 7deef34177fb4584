"""A rolling KV cache with attention sinks for unbounded generation in bounded memory: StreamingLLM (Xiao et al.
2023, arXiv 2309.17453).

The cache keeps the first `sink_tokens` tokens and the most recent tokens, `sink_tokens + window` in all. As in the
paper (sec. 3.2), positions are those inside the cache, not in the text: the held keys sit at 0 .. held-1 and each
new token comes next, so RoPE never sees a position beyond the cache size however long generation runs. Keys are
stored with their rotation removed and rotated to their current cache position at every step (the paper's
implementation re-applies RoPE to the cached keys too).

The caller asks for positions first (`prepare(n)`, which evicts the oldest window tokens to make room), runs the
model with them, then calls `advance(n)`.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from longseq.attention import attention, reference_attention
from longseq.config import ModelConfig
from longseq.models.rope import apply_rope


def _rotation(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype):
    """Plain RoPE cos/sin (1, S, D) for positions (S,): a pure rotation (no YaRN scale, which k already holds).

    Angles in float64: a key is un-rotated once and re-rotated at every step, so R(p') R(-p) must be exact."""
    freqs = positions[:, None].double() * inv_freq.double()  # (S, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)[None]
    return emb.cos().to(dtype), emb.sin().to(dtype)


class SinkKVCache:
    """K/V of the sink tokens and a ring of the latest `window` tokens, per layer; fixed memory."""

    def __init__(self, cfg: ModelConfig, batch_size: int, device: torch.device | str, dtype: torch.dtype,
                 inv_freq: torch.Tensor):
        self.sink, self.window = cfg.attention.sink_tokens, cfg.sliding_window
        if self.window is None:
            raise ValueError("streaming attention needs cfg.sliding_window (the recent tokens kept)")
        self.capacity = self.sink + self.window
        if cfg.rope.type == "dynamic" and self.capacity > cfg.rope.original_max_position_embeddings:
            # Dynamic NTK changes the frequencies with the longest position of each call: cached keys could not be
            # re-rotated consistently.
            raise ValueError("streaming attention with dynamic NTK RoPE needs sink_tokens + window <= the native "
                             f"context ({cfg.rope.original_max_position_embeddings})")
        shape = (batch_size, cfg.num_kv_heads, self.capacity, cfg.head_dim)  # (B, H_kv, sink + window, D)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_layers)]  # RoPE removed
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_layers)]
        self.inv_freq, self.rope = inv_freq, not cfg.attention.alibi
        self.inner = replace(cfg.attention, variant="causal")  # inside the cache every held key is visible
        self.device, self.dtype = torch.device(device), dtype
        self.seen = 0  # tokens processed so far
        self.sink_slots: list[int] = []  # slots of the sink tokens (0 .. sink-1)
        self.window_slots: list[int] = []  # slots of the window tokens, oldest first
        self.free = list(range(self.sink, self.capacity))
        self.pending = 0

    @property
    def length(self) -> int:
        """Keys held: the cache position of the next token."""
        return len(self.sink_slots) + len(self.window_slots)

    def prefill_chunk(self) -> int:
        """Prompt tokens per forward: fill the cache, then half a window at a time (each prompt token then sees at
        least half a window of recent tokens; decode sees the whole window)."""
        room = self.capacity - self.length
        return room if room > 0 else max(1, self.window // 2)

    def max_chunk(self) -> int:
        """The most tokens one forward may add now."""
        return max(self.window, self.capacity - self.length)

    def prepare(self, num_tokens: int) -> torch.Tensor:
        """Make room for `num_tokens` new tokens (evicting the oldest window tokens); return their positions (1, n).

        Every held key stays visible to all new tokens, so the new token i sees at most window - n + i + 1 recent
        tokens: one token at a time (decode) gives exactly StreamingLLM's sink + window attention.
        """
        if num_tokens > self.max_chunk():
            raise ValueError(f"at most {self.max_chunk()} tokens per forward; {num_tokens} given")
        evict = max(0, self.length + num_tokens - self.capacity)
        self.free.extend(self.window_slots[:evict])
        del self.window_slots[:evict]
        held = self.length
        self._order = torch.tensor(self.sink_slots + self.window_slots, dtype=torch.long, device=self.device)
        new_slots = []
        for t in range(self.seen, self.seen + num_tokens):
            new_slots.append(t if t < self.sink else self.free.pop(0))
        self._new_slots = torch.tensor(new_slots, dtype=torch.long, device=self.device)
        self._held_rot = _rotation(torch.arange(held, device=self.device), self.inv_freq, self.dtype)
        new_pos = torch.arange(held, held + num_tokens, device=self.device)
        cos, sin = _rotation(new_pos, self.inv_freq, self.dtype)
        self._unrotate = (cos, -sin)  # R(-p): cos(-x) = cos x, sin(-x) = -sin x
        self.pending = num_tokens
        for t, slot in zip(range(self.seen, self.seen + num_tokens), new_slots, strict=True):
            (self.sink_slots if t < self.sink else self.window_slots).append(slot)
        return new_pos[None]

    def attention(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  window: int | None) -> torch.Tensor:
        """q (B, H, n, D), k/v (B, H_kv, n, D) rotated at the positions `prepare` gave -> (B, H, n, D)."""
        held = self._order.numel()
        k_held = self.k[layer_idx][:, :, self._order]  # (B, H_kv, held, D), position order
        v_held = self.v[layer_idx][:, :, self._order]
        if self.rope:
            k_held = apply_rope(k_held, *self._held_rot)
        out = attention(q, torch.cat([k_held, k], dim=2), torch.cat([v_held, v], dim=2), q_start=held,
                        variant=self.inner)
        self.k[layer_idx][:, :, self._new_slots] = apply_rope(k, *self._unrotate) if self.rope else k
        self.v[layer_idx][:, :, self._new_slots] = v
        return out

    def advance(self, num_tokens: int) -> None:
        assert num_tokens == self.pending, "advance() must follow prepare() with the same count"
        self.seen += num_tokens
        self.pending = 0

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


class ReferenceSinkCache:
    """The naive StreamingLLM cache for tests: keeps every token's K/V forever and, at each step, picks the sinks
    and the latest keys, un-rotates and re-rotates them with complex arithmetic in float64 and runs the dense
    reference attention. Same `prepare` / `attention` / `advance` contract as SinkKVCache."""

    def __init__(self, cfg: ModelConfig, inv_freq: torch.Tensor):
        self.sink, self.window = cfg.attention.sink_tokens, cfg.sliding_window
        self.capacity = self.sink + self.window
        self.inv_freq = inv_freq.double()
        self.rope = not cfg.attention.alibi
        self.inner = replace(cfg.attention, variant="causal")
        self.keys: list[list[torch.Tensor]] = [[] for _ in range(cfg.num_layers)]  # per token: un-rotated (B, H_kv, D)
        self.values: list[list[torch.Tensor]] = [[] for _ in range(cfg.num_layers)]
        self.seen = 0

    def _rotate(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # x (B, H, S, D) in the rotate-half layout: pair (i, i + D/2) is the complex number x_i + i x_{i+D/2}.
        half = x.shape[-1] // 2
        z = torch.complex(x[..., :half].double(), x[..., half:].double())
        angle = positions.double()[:, None] * self.inv_freq  # (S, D/2)
        z = z * torch.polar(torch.ones_like(angle), angle)
        return torch.cat([z.real, z.imag], dim=-1).to(x.dtype)

    def prepare(self, num_tokens: int) -> torch.Tensor:
        sinks = min(self.seen, self.sink)
        held = self.seen if self.seen + num_tokens <= self.capacity else self.capacity - num_tokens
        self._picked = list(range(sinks)) + list(range(self.seen - (held - sinks), self.seen))
        self._start = held
        return torch.arange(held, held + num_tokens)[None]

    def attention(self, layer_idx, q, k, v, window):
        n = k.shape[2]
        new_pos = torch.arange(self._start, self._start + n)
        k_raw = self._rotate(k, -new_pos) if self.rope else k
        for i in range(n):
            self.keys[layer_idx].append(k_raw[:, :, i])
            self.values[layer_idx].append(v[:, :, i])
        if self._picked:
            k_held = torch.stack([self.keys[layer_idx][i] for i in self._picked], dim=2)
            v_held = torch.stack([self.values[layer_idx][i] for i in self._picked], dim=2)
            if self.rope:
                k_held = self._rotate(k_held, torch.arange(len(self._picked)))
            k, v = torch.cat([k_held, k], dim=2), torch.cat([v_held, v], dim=2)
        return reference_attention(q, k, v, q_start=len(self._picked), variant=self.inner)

    def advance(self, num_tokens: int) -> None:
        self.seen += num_tokens

