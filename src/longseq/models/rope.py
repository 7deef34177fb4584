"""Rotary position embedding (RoFormer, arXiv 2104.09864) and its context-extension variants."""

from __future__ import annotations

import math

import torch
from torch import nn

from longseq.config import RopeConfig


def inv_freq_for(rope: RopeConfig, head_dim: int, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (head_dim/2,) in float32 and the cos/sin scale for one RoPE configuration.

    `seq_len` matters only for dynamic NTK, whose base grows with the longest position seen.
    """
    dim = head_dim
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    base = rope.theta
    orig = rope.original_max_position_embeddings
    if rope.type == "dynamic" and seq_len is not None and seq_len > orig:
        # Dynamic NTK (bloc97 / emozilla, reddit r/LocalLLaMA 2023): stretch the base with the sequence length.
        base = base * ((rope.factor * seq_len / orig) - (rope.factor - 1)) ** (dim / (dim - 2))
    inv_freq = 1.0 / (base**exponents)  # (dim/2,)
    if rope.type == "linear":
        # Position interpolation (Chen et al., arXiv 2306.15595): positions / factor.
        return inv_freq / rope.factor, 1.0
    if rope.type == "llama3":
        return _llama3(inv_freq, rope), 1.0
    if rope.type == "yarn":
        return _yarn(inv_freq, rope, dim)
    return inv_freq, 1.0


def _llama3(inv_freq: torch.Tensor, rope: RopeConfig) -> torch.Tensor:
    # Llama 3.1 (Meta's reference `apply_scaling`): keep high frequencies, divide low ones by factor,
    # interpolate smoothly in between by wavelength.
    orig = rope.original_max_position_embeddings
    low_wavelen = orig / rope.low_freq_factor
    high_wavelen = orig / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (orig / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


def _yarn(inv_freq: torch.Tensor, rope: RopeConfig, dim: int) -> tuple[torch.Tensor, float]:
    # YaRN (Peng et al., arXiv 2309.00071): NTK-by-parts interpolation + attention temperature sqrt(1/t).
    factor, orig = rope.factor, rope.original_max_position_embeddings

    def mscale(scale: float, m: float = 1.0) -> float:  # YaRN eq. 22: 0.1 ln(s) + 1
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = rope.attention_factor
    if attention_factor is None:
        if rope.mscale and rope.mscale_all_dim:
            attention_factor = mscale(factor, rope.mscale) / mscale(factor, rope.mscale_all_dim)
        else:
            attention_factor = mscale(factor)

    def correction_dim(num_rotations: float) -> float:  # YaRN eq. 17: dim at which r wavelengths fit in orig
        return dim * math.log(orig / (num_rotations * 2 * math.pi)) / (2 * math.log(rope.theta))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp  # 1: keep the original frequency, 0: interpolate by factor
    inv_freq = (inv_freq / factor) * (1 - extrapolation) + inv_freq * extrapolation
    return inv_freq, float(attention_factor)


class RotaryEmbedding(nn.Module):
    """cos/sin tables computed per forward from explicit positions: O(S * head_dim), no max-length table."""

    def __init__(self, rope: RopeConfig, head_dim: int):
        super().__init__()
        self.rope, self.head_dim = rope, head_dim
        inv_freq, self.attention_factor = inv_freq_for(rope, head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        # llama.cpp stores Llama 3.1 scaling as per-frequency divisors (`rope_freqs`); None elsewhere.
        self.freq_factors: torch.Tensor | None = None
        # Angles in float64: the engine's memory attention (attention/paged_memory.py) sets it, its positions
        # running far past the context, where float32's position * inv_freq is off by a sizeable fraction of a
        # radian (its rounding step at 2^20 is 2^-4) while keys are re-rotated exactly.
        self.exact_angles = False

    def reset(self, device: torch.device | str) -> None:
        """Recompute the (non-persistent) tables on `device`; used after building the model on `meta`."""
        inv_freq, self.attention_factor = inv_freq_for(self.rope, self.head_dim)
        if self.freq_factors is not None:
            inv_freq = inv_freq / self.freq_factors.float().cpu()
        self.inv_freq = inv_freq.to(device)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (B, S) int -> cos, sin (B, S, head_dim) in `dtype`."""
        inv_freq, scale = self.inv_freq, self.attention_factor
        if self.rope.type == "dynamic":
            # The base depends on the longest position in this call (a host sync; dynamic NTK only).
            seq_len = int(positions.max()) + 1
            if seq_len > self.rope.original_max_position_embeddings:
                inv_freq, scale = inv_freq_for(self.rope, self.head_dim, seq_len)
                inv_freq = inv_freq.to(positions.device)
        if self.exact_angles:
            freqs = positions[..., None].double() * inv_freq.double()  # (B, S, head_dim/2)
        else:
            freqs = positions[..., None].float() * inv_freq  # (B, S, head_dim/2), float32 for long positions
        emb = torch.cat((freqs, freqs), dim=-1)  # (B, S, head_dim): HF layout, halves rotate together
        return (emb.cos() * scale).to(dtype), (emb.sin() * scale).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, S, D); cos/sin (B, S, D). Rotates pairs (i, i + D/2): the HF ("rotate_half") layout."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos + rotated * sin
