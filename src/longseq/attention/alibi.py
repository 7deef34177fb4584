"""ALiBi: attention with linear biases instead of position embeddings (Press et al. 2021, arXiv 2108.12409)."""

from __future__ import annotations

import math

import torch


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """(num_heads,) float32: the geometric head slopes of the paper (sec. 3), as its reference code `get_slopes`.

    For 2^n heads the slopes are 2^(-8/n), 2^(-16/n), ..., 2^-8; otherwise those of the nearest smaller power of
    two, then every other slope of the next larger one.
    """

    def power_of_two(n: int) -> list[float]:
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start ** (i + 1) for i in range(n)]

    if math.log2(num_heads).is_integer():
        slopes = power_of_two(num_heads)
    else:
        closest = 2 ** math.floor(math.log2(num_heads))
        slopes = power_of_two(closest) + alibi_slopes(2 * closest).tolist()[0::2][: num_heads - closest]
    return torch.tensor(slopes, dtype=torch.float32)


def alibi_bias(num_heads: int, q_positions: torch.Tensor, k_positions: torch.Tensor) -> torch.Tensor:
    """(H, S, T) float64: -slope_h * (q - k), the distance penalty added to the scores (paper eq. in sec. 3).

    Positive for keys after the query; the causal mask removes those anyway. Float64 so that float64 tests stay
    exact; callers cast to their compute dtype.
    """
    slopes = alibi_slopes(num_heads).double().to(q_positions.device)
    distance = (q_positions[:, None] - k_positions[None, :]).double()  # (S, T)
    return -slopes[:, None, None] * distance
