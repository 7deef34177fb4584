"""Counter-based random numbers for sampling: each value is a pure function of (key, output position, token id), so
a seeded request draws the same numbers whatever else shares its batch and whatever its row.

The hash is SplitMix64's mixing function (Steele, Lea and Flood, "Fast splittable pseudorandom number generators",
OOPSLA 2014) over a Weyl sequence, on int64 tensors: PyTorch's int64 arithmetic wraps modulo 2^64 (two's
complement), and its right shift is arithmetic, so the logical shifts below mask off the sign fill.

The uniforms have 52 bits and -log u is taken in float64, so the Gumbel noise -log(-log u) reaches 36.7: a token
less likely than about e^-36 relative to the best one is drawn too rarely, nothing else is off. (With float32
uniforms it would stop at 16.6, and thousands of tail tokens of a 128K vocabulary sit that far below the best.)
"""

from __future__ import annotations

import torch

MASK64 = (1 << 64) - 1
GAMMA = 0x9E3779B97F4A7C15  # 2^64 / golden ratio, odd: SplitMix64's Weyl increment
MIX1, MIX2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
UNIFORM_BITS = 52  # float64 holds (m + 1/2) * 2^-52 exactly for m < 2^52: uniforms in (0, 1), never 0 or 1


def signed64(x: int) -> int:
    """An unsigned 64-bit value as the int64 with the same bits."""
    x &= MASK64
    return x - (1 << 64) if x >> 63 else x


def mix64_int(x: int) -> int:
    """SplitMix64's mixing function on a Python int (unsigned 64-bit result)."""
    x &= MASK64
    x = ((x ^ (x >> 30)) * MIX1) & MASK64
    x = ((x ^ (x >> 27)) * MIX2) & MASK64
    return x ^ (x >> 31)


def seed_key(seed: int) -> int:
    """A request's key (int64) from its seed (any int): mixed, so nearby seeds give unrelated streams."""
    return signed64(mix64_int(seed + GAMMA))


def _xorshift_(x: torch.Tensor, n: int, tmp: torch.Tensor) -> None:
    torch.bitwise_right_shift(x, n, out=tmp)
    tmp &= (1 << (64 - n)) - 1  # a logical shift: mask off the sign fill
    x ^= tmp


def _mix64_(x: torch.Tensor) -> torch.Tensor:
    # In place, with one temporary: a (B, V) hash is memory-bound, and on CPU fresh buffers cost page faults.
    tmp = torch.empty_like(x)
    _xorshift_(x, 30, tmp)
    x *= signed64(MIX1)
    _xorshift_(x, 27, tmp)
    x *= signed64(MIX2)
    _xorshift_(x, 31, tmp)
    return x


def mix64(x: torch.Tensor) -> torch.Tensor:
    """SplitMix64's mixing function, elementwise on int64 tensors (a bijection of the 64-bit patterns)."""
    return _mix64_(x.clone())


def row_states(keys: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """keys (B,) int64, positions (B,) int64 (the output index of the token each row samples) -> (B,) int64: the
    start of the row's stream for this position."""
    return _mix64_(keys ^ mix64(positions * signed64(GAMMA)))


def uniforms(states: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """states (B,) int64 -> (B, V) float64 uniforms in (0, 1): token t of a row hashes state + t * GAMMA."""
    tokens = torch.arange(vocab_size, device=states.device, dtype=torch.int64) * signed64(GAMMA)  # (V,)
    h = _mix64_(states[:, None] + tokens)  # (B, V)
    bits = torch.bitwise_right_shift(h, 64 - UNIFORM_BITS, out=h) & ((1 << UNIFORM_BITS) - 1)  # the top bits
    return bits.double().add_(0.5).mul_(2.0**-UNIFORM_BITS)


def gumbel(states: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """states (B,) -> (B, V) float32 standard Gumbel noise -log(-log u); the inner log in float64 (-log u of a u
    near 1 is tiny: its relative precision is the upper tail's)."""
    return uniforms(states, vocab_size).log_().neg_().float().log_().neg_()
