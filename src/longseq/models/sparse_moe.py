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
from longseq.models import expert_parallel, moe, recompute, tiling
from longseq.models.expert_parallel import ExpertShard
from longseq.models.router_loss import RouterLoss


class Experts(nn.Module):
    """Every expert's SwiGLU weights, stacked: gate_up_proj (E, 2I, d), gate rows first; down_proj (E, d, I)."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        for w in (self.gate_up_proj, self.down_proj):  # nn.Linear's default: U(±1/sqrt(in_features))
            bound = 1 / math.sqrt(w.shape[-1])
            nn.init.uniform_(w, -bound, bound)

    def forward(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, mode: str | None = None):
        """Tokens x (T, d) through their top-k experts ids (T, k), weighted by weights (T, k): (T, d)."""
        return moe.experts(x, ids, weights, self.gate_up_proj, self.down_proj, mode)


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
        self.tile: int | None = None  # set_tiling: long training sequences in tiles of tokens (models/tiling.py)
        self.router_loss: RouterLoss | None = None  # training: where the router's statistics go (models/router_loss.py)
        self.expert_shard: ExpertShard | None = None  # expert parallelism: this rank's experts (expert_parallel.py)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, S, d) -> (B, S, d)."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (T, d)
        if self.tile is not None and torch.is_grad_enabled() and x.shape[0] > self.tile:
            # Routing is per token, so tiles are exact. The auxiliary loss takes the router over all tokens at once
            # (a (T, E) matmul); the tiles route again inside, without recording.
            if self.router_loss is not None:
                logits = self.gate(x)  # (T, E)
                self.router_loss.record(logits, moe.route(logits, self.top_k, self.norm_topk_prob)[1])
            params = [p for p in self.parameters() if p.requires_grad]
            with recompute.output_unused():  # the output only feeds the residual add (tiling.mlp's reasoning)
                return tiling.tiled_mlp(self.mixture, x, params, self.tile).view(shape)
        return self.mixture(x, record=self.router_loss is not None and torch.is_grad_enabled()).view(shape)

    def mixture(self, x: torch.Tensor, record: bool = False) -> torch.Tensor:
        """Tokens x (T, d) -> (T, d): route, the experts, Qwen2-MoE's shared expert; `record`: the router's
        statistics to router_loss."""
        logits = self.gate(x)  # (T, E)
        weights, ids = moe.route(logits, self.top_k, self.norm_topk_prob)  # (T, k) each
        if record:
            self.router_loss.record(logits, ids)
        if self.expert_shard is not None:
            out = expert_parallel.dispatch(self.experts, x, ids, weights, self.expert_shard, self.mode)
        else:
            out = self.experts(x, ids, weights, self.mode)
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out
