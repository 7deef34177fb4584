"""The sparse mixture-of-experts block that replaces a decoder layer's MLP (Mixtral, Qwen2-MoE, Qwen3-MoE).

out = sum over the token's top-k experts of weight · expert(x) (Shazeer et al. 2017, arXiv 1701.06538; Mixtral:
Jiang et al. 2024, arXiv 2401.04088), plus, in Qwen2-MoE, sigmoid(shared_expert_gate(x)) · shared_expert(x), a
dense SwiGLU MLP every token runs (transformers' Qwen2MoeSparseMoeBlock). Routing and the expert compute are
models/moe.py's. Parameter names are transformers' (>= 5): `mlp.gate.weight` (the router), `mlp.experts.gate_up_proj`
and `mlp.experts.down_proj` (stacked), `mlp.shared_expert.*`, `mlp.shared_expert_gate.weight`; per-expert
checkpoints are stacked on load (models/expert_weights.py).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from longseq.config import ModelConfig
from longseq.models import moe


class Experts(nn.Module):
    """Every expert's SwiGLU weights, stacked: gate_up_proj (E, 2I, d), gate rows first; down_proj (E, d, I)."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        for w in (self.gate_up_proj, self.down_proj):  # nn.Linear's default: U(±1/sqrt(in_features))
            bound = 1 / math.sqrt(w.shape[-1])
            nn.init.uniform_(w, -bound, bound)


class SparseMoeBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, shared_expert: nn.Module | None = None):
        """`shared_expert`: Qwen2-MoE's always-on MLP (llama.SharedExpert), or None."""
        super().__init__()
        self.top_k, self.norm_topk_prob = cfg.experts_per_token, cfg.norm_topk_prob
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)  # the router
        self.experts = Experts(cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size)
        self.shared_expert = shared_expert
        self.shared_expert_gate = nn.Linear(cfg.hidden_size, 1, bias=False) if shared_expert is not None else None
        self.mode: str | None = None  # moe.IMPLEMENTATIONS; None: moe.MODE (tests force one)
        # set_recompute marks every layer's MLP; the experts keep their SwiGLU products (no recompute of them yet).
        self.recompute_act = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, S, d) -> (B, S, d)."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (T, d)
        weights, ids = moe.route(self.gate(x), self.top_k, self.norm_topk_prob)  # (T, k) each
        out = moe.experts(x, ids, weights, self.experts.gate_up_proj, self.experts.down_proj, self.mode)
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out.view(shape)
